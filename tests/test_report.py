"""`lowbit report`: the page renders in a real headless browser with every image shown."""
import contextlib
import html
import json
import re
import shutil
import subprocess
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_transformer, wikitext_excerpt
from lowbit.analysis import compare_recipes, load_run, memory_table, pareto_front, save_run, write_report
from lowbit.analysis.compare import CompareRow, Comparison
from lowbit.cli import main

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The test's own wrapper page uses JavaScript (the report has none): it loads the report in a frame
# and writes what it found into the DOM that --dump-dom prints.
WRAPPER = """<!DOCTYPE html><html><head><script>
function check(frame) {
  var d = frame.contentDocument, imgs = Array.prototype.slice.call(d.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                   .map(function (i) { return i.getAttribute('src'); });
  document.getElementById('result').textContent = JSON.stringify(
    {images: imgs.length, broken: broken, scripts: d.scripts.length, title: d.title});
}
</script></head><body><pre id="result">pending</pre>
<iframe src="index.html" width="1200" height="900" onload="check(this)"></iframe></body></html>"""


def render(run_dir: Path, tmp_path: Path) -> dict:
    """Open RUN_DIR/index.html in headless chromium over a local HTTP server; -> what the page showed,
    plus every request the server answered with an error status."""
    (run_dir / "_check.html").write_text(WRAPPER)
    failed = []

    class Handler(SimpleHTTPRequestHandler):
        def log_request(self, code="-", size="-"):
            if str(code).isdigit() and int(code) >= 400 and "favicon" not in self.path:
                failed.append((self.path, int(code)))

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(run_dir)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
                              "--virtual-time-budget=10000", "--dump-dom",
                              f"http://127.0.0.1:{server.server_address[1]}/_check.html"],
                             capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
        with contextlib.suppress(OSError):
            (run_dir / "_check.html").unlink()
    m = re.search(r'<pre id="result">(.*?)</pre>', out.stdout, re.S)
    assert m, f"chromium printed no result (rc {out.returncode}): {out.stderr[-2000:]}"
    assert m.group(1) != "pending", "the report never loaded in the frame"
    return {**json.loads(html.unescape(m.group(1))), "failed_requests": failed}


def _row(recipe, bits, size, ppl):
    return CompareRow(recipe, "rtn", "fp32", bits, bits + 1.0, size, ppl, 100 * (ppl / 20 - 1), 0.1, 0.9,
                      float("nan"), 1.0, False)


@pytest.fixture
def run_dir(tmp_path):
    """A run folder as compare and the per-layer tools leave it (numbers made up, files real)."""
    run = tmp_path / "run"
    rows = [_row("fp32", 32, 540, 20.0), _row("w8", 8, 220, 20.1), _row("w4g64", 4.5, 90, 24.0),
            _row("nf4", 4.5, 170, 23.0), _row("w2g64", 2.5, 63, 80.0)]
    cmp = Comparison(rows, 64, 2, 0, 1000, 0)
    save_run(run, "tiny", cmp, memory_table(tiny_transformer("qwen2", 2), ["fp32", "w8", "w4g64"], context=64))
    rng = np.random.default_rng(0)
    layers = [{"name": f"model.layers.{i}.{p}", "recipe": r, "sqnr_db": float(rng.uniform(10, 30)),
               "max_err": 0.1, "clipped_share": 0.0, "output_rel_err": 0.05,
               "sensitivity": float(rng.uniform(0, 1)) if r == "w4g64" else None}
              for i in range(2) for p in ("q_proj", "down_proj") for r in ("w4g64", "w8")]
    (run / "layers.json").write_text(json.dumps(layers))
    (run / "histograms").mkdir()
    for x in layers[:3]:
        np.savez(run / "histograms" / f"{x['name']}__{x['recipe']}.npz", values=rng.standard_normal(5000),
                 grid=np.linspace(-3, 3, 16), name=x["name"], recipe=x["recipe"])
    return run


def test_pareto_front_against_brute_force():
    rng = np.random.default_rng(1)
    sizes, ppls = list(rng.uniform(1, 10, 30)), list(rng.uniform(1, 10, 30))
    dominated = {i for i in range(30) for j in range(30)
                 if sizes[j] <= sizes[i] and ppls[j] <= ppls[i] and (sizes[j], ppls[j]) != (sizes[i], ppls[i])}
    assert set(pareto_front(sizes, ppls)) == set(range(30)) - dominated
    assert pareto_front([1, 2, 3], [5, 6, 4]) == [0, 2]


def test_report_renders_in_a_browser_with_every_image(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir)]) == 0
    page = (run_dir / "index.html").read_text()
    assert "<script" not in page.lower() and "Not in this run" not in page
    assert page.count("<img") == 4 and "<td>w2g64</td>" in page and "–" in page  # tok/s was not measured
    shown = render(run_dir, tmp_path)
    assert shown == {"images": 4, "broken": [], "scripts": 0, "title": "lowbit report", "failed_requests": []}
    # the check can fail: a corrupt PNG is reported broken
    (run_dir / "report" / "memory.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert render(run_dir, tmp_path)["broken"] == ["report/memory.png"]


def test_report_says_what_is_absent(run_dir):
    (run_dir / "layers.json").unlink()
    shutil.rmtree(run_dir / "histograms")
    page = write_report(run_dir).read_text()
    assert "no layers.json" in page and "no histograms" in page and page.count("<img") == 2
    (run_dir / "layers.json").write_text(json.dumps([{"name": "x"}]))
    with pytest.raises(ValueError, match="sqnr_db"):
        write_report(run_dir)
    with pytest.raises(ValueError, match="no table.json"):
        write_report(run_dir / "nothing")


def test_compare_leaves_a_run_folder_the_report_reads(smollm2_2layers, tmp_path):
    model, tok = smollm2_2layers
    cmp = compare_recipes(model, tok, wikitext_excerpt()[:20000], "w8", window=64, windows=2, speed=False, progress=False)
    save_run(tmp_path, "smollm2-2layers", cmp, memory_table(model, ["fp32", "w8"], context=64))
    table = load_run(tmp_path)["table"]
    assert [r["recipe"] for r in table["comparison"]["rows"]] == ["fp32", "w8"]
    assert table["comparison"]["rows"][0]["decode_tok_s"] is None  # NaN is stored as null
    assert table["memory"]["rows"][1]["weights_bytes"] * 1e-6 == pytest.approx(table["comparison"]["rows"][1]["size_mb"])
    assert write_report(tmp_path).is_file()


def test_compare_refuses_a_file_as_run_folder_before_loading(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as e:
        main(["compare", "no-such-model", "--recipes", "w8", "--out", str(tmp_path / "f")])
    assert e.value.code == 2 and "is a file" in capsys.readouterr().err


def test_compare_and_report_on_minilm(tmp_path, capsys):
    """An encoder (all-MiniLM-L6-v2, real weights): `lowbit compare --out` scores sentence embeddings
    and the report draws them; the page renders with every image."""
    text = tmp_path / "text.txt"
    text.write_text(wikitext_excerpt()[:30000])
    run = tmp_path / "run"
    assert main(["compare", "minilm-l6", "--recipes", "w8,w4g64:rtn,w2g64:rtn", "--text", str(text),
                 "--windows", "2", "--no-speed", "--out", str(run)]) == 0
    said = capsys.readouterr().out
    assert "cosine" in said and "16 sentences" in said
    rows = load_run(run)["table"]["comparison"]["rows"]
    assert [r["recipe"] for r in rows] == ["fp32", "w8", "w4g64:rtn", "w2g64:rtn"]
    assert rows[0]["cosine"] == pytest.approx(1.0, abs=1e-9) and rows[0]["ppl"] is None
    cos = [r["cosine"] for r in rows]
    assert cos[0] > cos[1] > cos[2] > cos[3]  # fewer bits, further from fp32
    assert main(["report", str(run)]) == 0
    page = (run / "index.html").read_text()
    assert "Embedding error against size" in page and "<th>cosine</th>" in page
    shown = render(run, tmp_path)
    assert shown["broken"] == [] and shown["images"] == 2 and shown["failed_requests"] == []
