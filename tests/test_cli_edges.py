"""The command line's edges (issue 23): every argument refused before any model is loaded, in the
command line's words; outputs that are not the command's own never replaced; one meaning per
"bits/w"; truncated files named; GGUF file types findable."""
import json
import re

import numpy as np
import pytest
import torch

from conftest import tiny_transformer
from lowbit.cli import main


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: what is checked must be checked before loading."""
    import lowbit.io as lio
    import lowbit.io.models as models

    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    for mod, name in [(lio, "load_model"), (lio, "load"), (models, "load_tokenizer")]:
        monkeypatch.setattr(mod, name, loaded)


def tiny_gguf(path, rows: int = 64, cols: int = 64) -> int:
    """A small GGUF file (one F32 tensor, one Q8_0 tensor) written by gguf-py -> its size in bytes."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", np.ones((rows, cols), np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((rows, cols // 32 * 34), np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.stat().st_size


def error_of(capsys, argv) -> str:
    assert main(argv) == 2, argv
    return capsys.readouterr().err


QUANTIZE_REFUSALS = [
    (["--format", "onnx"], "--format onnx: choose lowbit or compressed-tensors"),
    (["--recipe", "nf4", "--format", "compressed-tensors"], "--recipe nf4: nf4 weights: compressed-tensors has no"),
    (["--recipe", "llm-int8", "--format", "compressed-tensors"], "LLM.int8()"),
    (["--window", "0"], "--window 0: give a number >= 2"),
    (["--calibration-windows", "0"], "--calibration-windows 0: give a number >= 1"),
    (["--text", "/no/such/text.txt"], "--text /no/such/text.txt: no such file"),
    (["--recipe", "q8_0"], "--recipe q8_0 is a llama.cpp GGUF file type: it needs a GGUF output, --out NAME.gguf"),
    (["--recipe", "w9"], "q4_k_m"),
    (["--method", "foo"], "--method foo: unknown method 'foo'"),
    (["--method", "foo"], "Choose auto"),
    (["--method", "gptq", "--method-option", "gptq.nope=1"], "gptq has no option 'nope'"),
    (["--method", "gptq", "--method-option", "awq.n_grid=4"], "awq is not in the method chain 'gptq'"),
    (["--budget", "0.5"], "--budget 0.5: the candidates"),
    (["--budget", "4", "--candidates", "w4g64,foo"], "--candidates foo: unknown recipe"),
    (["--candidates", "w4g64"], "give --budget too"),
    (["--shard-size", "0"], "--shard-size 0: give a size above 0"),
]


@pytest.mark.parametrize("extra,said", QUANTIZE_REFUSALS)
def test_quantize_refuses_every_bad_argument_before_loading(extra, said, tmp_path, capsys, no_loading):
    err = error_of(capsys, ["quantize", "smollm2-135m", "--out", str(tmp_path / "q"), *extra])
    assert said in err
    assert not (tmp_path / "q").exists()


def test_quantize_refuses_a_bad_model_and_gguf_mismatches_before_loading(tmp_path, capsys, no_loading):
    assert "MODEL /no/such/model: no such file or folder, and not a built-in model" in error_of(
        capsys, ["quantize", "/no/such/model", "--out", str(tmp_path / "q")])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "lowbit.json").write_text("{}")
    assert "a lowbit checkpoint (already quantized)" in error_of(capsys, ["quantize", str(ckpt), "--out",
                                                                         str(tmp_path / "q")])
    err = error_of(capsys, ["quantize", "smollm2-135m", "--recipe", "w4g64", "--out", str(tmp_path / "x.gguf")])
    assert "--recipe w4g64 is a lowbit recipe" in err and "q4_k_m" in err
    err = error_of(capsys, ["quantize", "smollm2-135m", "--recipe", "q4_k_m", "--method", "hqq", "--out",
                            str(tmp_path / "x.gguf")])
    assert "--method hqq: a .gguf --out takes auto (default), rtn" in err


def test_out_replaces_only_what_the_command_writes(tmp_path, capsys, no_loading):
    """--force replaces a GGUF file or a checkpoint folder; an ordinary file, never: not with --force either."""
    victim = tmp_path / "victim.gguf"
    victim.write_text("my notes, not a model")
    for force in ([], ["--force"]):
        err = error_of(capsys, ["quantize", "smollm2-135m", "--recipe", "q8_0", "--out", str(victim), *force])
        assert "not a GGUF file" in err and "even with --force" in err
    assert victim.read_text() == "my notes, not a model"
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    err = error_of(capsys, ["quantize", "smollm2-135m", "--recipe", "w8", "--out", str(notes), "--force"])
    assert "a file already exists there, and a lowbit checkpoint is a folder" in err
    from lowbit.cli.common import check_out

    real = tmp_path / "real.gguf"
    tiny_gguf(real)
    with pytest.raises(ValueError, match="pass --force"):
        check_out(str(real), False, writes="gguf")
    assert check_out(str(real), True, writes="gguf") == real


@pytest.mark.parametrize("extra,said", [
    (["--windows", "0"], "--windows 0: give a number >= 1"),
    (["--reference", "/no/such/ref"], "--reference /no/such/ref: no such file or folder"),
    (["--text", "/no/such.txt"], "--text /no/such.txt: no such file"),
    (["--window", "1"], "--window 1: give a number >= 2"),
])
def test_eval_refuses_every_bad_argument_before_loading(extra, said, capsys, no_loading):
    assert said in error_of(capsys, ["eval", "smollm2-135m", *extra])


def test_eval_announces_the_windows_it_scores():
    from lowbit.cli.eval import check_disjoint

    said = check_disjoint(None, "text", 64, 1000, n_tokens=147 * 64 + 5)
    assert said.startswith("windows 0-146 of 64 tokens") and "holds 147 of the 1000 asked" in said
    with pytest.raises(ValueError, match="fewer than one window"):
        check_disjoint(None, "text", 64, 4, n_tokens=63)


def test_truncated_gguf_is_named_before_loading(tmp_path, capsys, no_loading):
    from lowbit.io.gguf.file import parse_gguf

    whole = tmp_path / "whole.gguf"
    size = tiny_gguf(whole)
    parse_gguf(whole)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: size - 100])  # the header whole, the last tensor's data cut
    with pytest.raises(ValueError, match=r"cut.gguf is truncated: tensor 'blk.0.attn_q.weight'"):
        parse_gguf(cut)
    for argv in (["quantize", str(cut), "--recipe", "q8_0", "--out", str(tmp_path / "o.gguf")],
                 ["eval", str(cut)], ["memory", str(cut)]):
        assert "cut.gguf is truncated: tensor 'blk.0.attn_q.weight'" in error_of(capsys, argv)
    header_cut = tmp_path / "header.gguf"
    header_cut.write_bytes(whole.read_bytes()[:40])
    assert "is truncated or corrupt" in error_of(capsys, ["eval", str(header_cut)])


def test_bits_per_weight_means_one_thing_per_label(smollm2_2layers):
    """memory and compare give the same two figures for w8 on the same model, under the same labels."""
    import copy

    from lowbit.analysis import memory_table
    from lowbit.analysis.compare import table_head
    from lowbit.analysis.memory import format_memory
    from lowbit.analysis.run_dir import _plain
    from lowbit.eval import linear_bits_per_weight, model_size
    from lowbit.eval.size import BITS_LAYERS, BITS_MODEL
    from lowbit.pipeline import quantize

    model, _ = smollm2_2layers
    row = memory_table(model, ["w8"]).rows[0]
    q = copy.deepcopy(model)
    quantize(q, "w8")
    assert row.bits_per_weight_layers == pytest.approx(linear_bits_per_weight(q))
    assert row.bits_per_weight_model == pytest.approx(model_size(q).bits_per_weight, rel=1e-3)
    assert 8.0 < row.bits_per_weight_layers < 8.1 < 12 < row.bits_per_weight_model
    plain = _plain(row)
    assert {BITS_LAYERS.key, BITS_MODEL.key} <= plain.keys() and "bits_per_weight" not in plain
    memory, compare = format_memory(memory_table(model, ["w8"])), table_head()
    for text in (memory, compare):  # no bare "bits/w": each names its figure
        assert BITS_LAYERS.short in text and BITS_MODEL.short in text
        assert not re.findall(r"bits/w(?! layers| model| \(quantized layers\)| \(whole model\))", text)
    assert BITS_LAYERS.label in memory and BITS_MODEL.label in memory  # the legend says what each counts


def test_report_labels_both_figures(tmp_path):
    from lowbit.analysis import save_run, write_report
    from lowbit.analysis.compare import Comparison, CompareRow
    from lowbit.eval.size import BITS_LAYERS, BITS_MODEL

    row = CompareRow("w8", "rtn", "fp32", 8.05, 13.09, 220.2, 10.0, 0.1, 0.01, 0.99, float("nan"), 1.0, False)
    save_run(tmp_path, "m", Comparison([row], 64, 2, 0, 1000, 0))
    page = (write_report(tmp_path)).read_text()
    assert f"<th>{BITS_LAYERS.label}</th><th>{BITS_MODEL.label}</th>" in page
    assert "<td>8.05</td><td>13.09</td>" in page


def test_memory_gives_gguf_file_types_and_a_gguf_files_own_bytes(capsys):
    """q4_1 on SmolLM2 (whose packaged file is llama.cpp's Q4_1): the file type's bytes are the file's."""
    from lowbit.analysis import memory_table
    from lowbit.analysis.memory import gguf_weights
    from lowbit.io import builtin_model_path

    t = memory_table("smollm2-135m", ["q4_1", "q8_0"])
    path = builtin_model_path("smollm2-135m")
    assert t.saved.recipe == "as saved (q4_1)" and t.saved.weights_bytes == t.rows[0].weights_bytes
    assert gguf_weights(path).weights_bytes == t.saved.weights_bytes < path.stat().st_size
    assert t.rows[1].bits_per_weight_layers == pytest.approx(8.5)
    assert main(["memory", "smollm2-135m", "--recipe", "q4_k_m"]) == 0
    assert "q4_k_m" in capsys.readouterr().out


def test_eval_of_a_gguf_reports_the_files_bytes(smollm2_2layers, tmp_path, capsys, monkeypatch):
    import lowbit.io as lio
    from lowbit.analysis.memory import gguf_weights
    from lowbit.io import builtin_model_path

    monkeypatch.setattr(lio, "load_model", lambda *a, **k: smollm2_2layers)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"The mill number {i} stands by the river." for i in range(40)))
    path = builtin_model_path("smollm2-135m")
    assert main(["eval", str(path), "--windows", "1", "--window", "64", "--text", str(text)]) == 0
    out = capsys.readouterr().out
    w = gguf_weights(path)
    assert f"file {w.weights_bytes / 1e6:.1f} MB" in out and "bits/w (whole model) 5.74" in out
    assert "32.00" not in out and "pass --reference" in out


def test_memory_reads_a_lowbit_checkpoint_folder(tmp_path, capsys):
    from lowbit.analysis import memory_table
    from lowbit.io import save
    from lowbit.pipeline import quantize

    model = tiny_transformer("qwen2", 2)
    quantize(model, "w8")
    folder = save(model, tmp_path / "ckpt")
    t = memory_table(folder, ["w8"])
    assert t.saved.recipe == "as saved (w8)"
    assert t.saved.quantized_bytes == t.rows[0].quantized_bytes
    assert t.saved.bits_per_weight_layers == pytest.approx(t.rows[0].bits_per_weight_layers)
    assert main(["memory", str(folder)]) == 0
    err = error_of(capsys, ["memory", str(folder / "model.safetensors")])
    assert "a lowbit checkpoint's packed codes and scales" in err and f"give its folder, {folder}" in err


def test_memory_refuses_a_truncated_safetensors_file(tmp_path, capsys):
    from safetensors.torch import save_file

    whole = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.ones(64, 64)}, str(whole))
    (tmp_path / "cut.safetensors").write_bytes(whole.read_bytes()[:-1000])
    assert "is truncated or corrupt" in error_of(capsys, ["memory", str(tmp_path / "cut.safetensors")])


def test_memory_refuses_bad_arguments_in_cli_words(capsys):
    assert "--batch 0" in error_of(capsys, ["memory", "8B", "--batch", "0"])
    assert "--lora-rank 0" in error_of(capsys, ["memory", "8B", "--lora-rank", "0", "--train", "qlora"])
    err = error_of(capsys, ["memory", "8B", "--recipe", "w9"])
    assert "--recipe w9: unknown recipe" in err and "q4_k_m" in err and "fp32" in err


def test_compare_refuses_before_loading_and_replaces_a_run_only_with_force(tmp_path, capsys, monkeypatch,
                                                                          no_loading):
    assert "--recipes w9: unknown recipe" in error_of(capsys, ["compare", "smollm2-135m", "--recipes", "w8,w9"])
    assert "--windows 0" in error_of(capsys, ["compare", "smollm2-135m", "--windows", "0"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "table.json").write_text("{}")
    (run / "index.html").write_text("<html>old</html>")
    assert "holds an earlier run (table.json, index.html); pass --force" in error_of(
        capsys, ["compare", "smollm2-135m", "--recipes", "w8", "--out", str(run)])

    import lowbit.analysis as analysis
    import lowbit.io as lio
    from lowbit.analysis.compare import Comparison, CompareRow

    model = tiny_transformer("qwen2", 1)
    row = CompareRow("fp32", "-", "fp32", 32.0, 32.0, 1.0, 10.0, 0.0, 0.0, 1.0, float("nan"), 0.0, False)
    monkeypatch.setattr(lio, "load_model", lambda *a, **k: (model, None))
    monkeypatch.setattr(analysis, "compare_recipes", lambda *a, **k: Comparison([row], 64, 2, 0, 1000, 0))
    assert main(["compare", "smollm2-135m", "--recipes", "w8", "--out", str(run), "--force"]) == 0
    assert not (run / "index.html").exists()
    assert json.loads((run / "table.json").read_text())["comparison"]["rows"][0]["recipe"] == "fp32"


def test_version(capsys):
    import lowbit

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lowbit {lowbit.__version__}"


@pytest.mark.parametrize("name,value,said", [
    ("fp8_e4m3", "500", "saturated: 500.0 is outside fp8_e4m3's range [-448, 448]; stored as 448.0"),
    ("int4", "100", "clipped: 100.0 is outside int4's range [-8, 7]; stored as 7.0"),
    ("fp4_e2m1", "nan", "NaN: fp4_e2m1 has no NaN; the encoder stores it as -0.0"),
    ("fp8_e4m3", "nan", "NaN: stored as fp8_e4m3's NaN code"),
])
def test_formats_say_when_a_value_was_not_represented(name, value, said, capsys):
    assert main(["formats", name, "--value", value]) == 0
    out = capsys.readouterr().out
    assert said in out and "relative nan" not in out


def test_formats_plot_refuses_a_missing_folder_before_drawing(tmp_path, capsys, monkeypatch):
    import lowbit.analysis as analysis

    monkeypatch.setattr(analysis, "plot_formats", lambda *a: pytest.fail("drew before checking --out"))
    out = tmp_path / "no" / "such" / "x.png"
    assert "the folder" in error_of(capsys, ["formats", "--plot", "int4", "--out", str(out)])
    assert not (tmp_path / "no").exists()
