import subprocess
import sys

import pytest
import torch

from conftest import save_hf_folder
from lowbit.cli import main


def test_formats_table_lists_every_format(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in ["int4", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "e8m0", "nf4", "bf16"]:
        assert f"\n{name} " in out
    assert "448" in out and "57344" in out


def test_value_explains_bits_and_error(capsys):
    assert main(["formats", "fp8_e4m3", "--value", "1.06"]) == 0
    out = capsys.readouterr().out
    assert "1.06 -> 1.0" in out and "mantissa 000" in out and "exponent 0111" in out
    assert "look the same" in out and "-0.06" in out


def test_unknown_format_is_a_clear_error(capsys):
    assert main(["formats", "fp9", "--value", "1"]) == 2
    assert "unknown format 'fp9'" in capsys.readouterr().err


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "formats", "nf4"], capture_output=True, text=True)
    assert r.returncode == 0 and "values:" in r.stdout


def test_quantize_and_eval_commands_on_a_truncated_model(smollm2_2layers, tmp_path, capsys):
    """`lowbit quantize` (default method auto: AWQ + GPTQ for 4-bit weights, calibrated on --text), `lowbit eval`."""
    model, tok = smollm2_2layers
    src = save_hf_folder(model, tok, tmp_path / "small")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The river number {i} runs past the old mill and into the sea." for i in range(300)))
    out = tmp_path / "q"
    common = ["--text", str(text), "--window", "64"]
    assert main(["quantize", str(src), "--recipe", "w4g64", "--out", str(out), "--calibration-windows", "4",
                 *common]) == 0
    said = capsys.readouterr().out
    assert "(awq+gptq)" in said and "layer loss vs round-to-nearest" in said
    assert main(["eval", str(out), "--windows", "2", *common]) == 0
    said = capsys.readouterr().out
    assert "ppl" in said and "scoring windows 0-1 of 64 tokens" in said and "disjoint" in said
    assert main(["eval", str(out), "--windows", "1000", *common]) == 2
    assert "would reach into them" in capsys.readouterr().err
    assert main(["quantize", str(src), "--recipe", "w8", "--out", str(out), *common]) == 2
    assert main(["quantize", str(src), "--recipe", "w8", "--method", "rtn", "--out", str(out), "--force",
                 *common]) == 0
    assert main(["quantize", str(src), "--recipe", "w4g64", "--method", "nope", "--out", str(tmp_path / "x")]) == 2


def test_method_option_parsing():
    from lowbit.cli.common import method_options
    assert method_options(["gptq.damp=0.05", "gptq.act_order=false", "smoothquant.alpha=0.8"], {}) == \
        {"gptq": {"damp": 0.05, "act_order": False}, "smoothquant": {"alpha": 0.8}}
    with pytest.raises(ValueError, match="METHOD.OPTION=VALUE"):
        method_options(["damp=0.05"], {})


def test_out_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    import lowbit.io as lio

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(lio, "load_model", no_loading)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "lowbit.json").write_text("{}")
    assert main(["quantize", "smollm2-135m", "--recipe", "w8", "--out", str(ckpt)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    assert main(["quantize", "smollm2-135m", "--recipe", "w8", "--out", str(other), "--force"]) == 2
    assert "not a lowbit checkpoint" in capsys.readouterr().err
    (tmp_path / "file.txt").write_text("x")
    assert main(["quantize", "smollm2-135m", "--recipe", "w8", "--out", str(tmp_path / "file.txt")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_ctrl_c_exits_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import lowbit.io as lio

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lio, "load_model", interrupted)
    out = tmp_path / "q"
    assert main(["quantize", "smollm2-135m", "--recipe", "w8", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "lowbit: interrupted; nothing was written" and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_calibration_and_evaluation_windows_are_disjoint():
    from lowbit.cli.common import calibration_split, text_digest
    from lowbit.cli.eval import check_disjoint

    ids = torch.arange(10 * 64 + 17)
    batches, where = calibration_split(ids, 64, 3)
    assert [int(b[0, 0]) for b in batches] == [7 * 64, 8 * 64, 9 * 64] and all(b.shape == (1, 64) for b in batches)
    assert where["token_range"] == [7 * 64, 10 * 64] and where["first_window"] == 7
    where["text_sha256"] = text_digest("some text")
    assert "disjoint" in check_disjoint(where, "some text", 64, 7)
    with pytest.raises(ValueError, match="calibrated on tokens 448-640"):
        check_disjoint(where, "some text", 64, 8)
    assert "another text" in check_disjoint(where, "other text", 64, 10)


def test_eval_reads_another_tools_gptq_folder_with_lowbit_load(smollm2_2layers, tmp_path, capsys):
    """`lowbit eval` of a GPTQ folder (written here with an obvious packer: 4 bits, groups of 64, v1 zero
    points) goes through lowbit.load, whose weights are (q - z) * s: its perplexity is the one of a float
    model holding those weights. transformers alone would need GPTQModel to read the folder. A folder that
    an interrupted save left aside (.NAME.old-PID) is put back first."""
    import copy
    import json

    import numpy as np
    from safetensors.torch import save_file
    from reference.checkpoint_packing import pack_words, v1_words

    from lowbit.eval import perplexity, token_ids

    model, tok = smollm2_2layers
    ref = copy.deepcopy(model)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to the table
    for name, m in ref.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("model.layers"):
            w = m.weight.detach().double().numpy().T.reshape(-1, 64, m.out_features)  # [groups, 64, out]
            lo, hi = np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)
            s = torch.from_numpy((hi - lo) / 15).half()
            z = np.clip(np.round(-lo / s.double().numpy()), 0, 15).astype(np.int64)
            q = np.clip(np.round(w / s.double().numpy()[:, None] + z[:, None]), 0, 15).astype(np.int64)
            W = ((q - z[:, None]) * s.double().numpy()[:, None]).reshape(-1, m.out_features).T
            m.weight.data = torch.from_numpy(W).float()
            del state[f"{name}.weight"]
            state.update({f"{name}.qweight": pack_words(q.reshape(-1, m.out_features), 4, 0),
                          f"{name}.qzeros": v1_words(pack_words(z, 4, 1), 4), f"{name}.scales": s,
                          f"{name}.g_idx": torch.arange(m.in_features, dtype=torch.int32) // 64})
    folder = tmp_path / "gptq"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False,
                                  "sym": False, "checkpoint_format": "gptq"}
    (folder / "config.json").write_text(json.dumps(cfg))
    tok.save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"The river number {i} runs past the old mill and into the sea." for i in range(60)))
    ids = token_ids(tok, text.read_text())
    expected = perplexity(ref, ids, window=64, max_windows=2)

    aside = tmp_path / f".gptq.old-{2**22 + 7}"  # as a save stopped between its two renames leaves it
    folder.rename(aside)
    assert main(["eval", str(folder), "--windows", "2", "--text", str(text), "--window", "64"]) == 0
    said = capsys.readouterr().out
    assert folder.is_dir() and not aside.exists()
    assert "(gptq) with lowbit.load" in said
    assert f"ppl {expected.ppl:.3f} over {expected.tokens} tokens" in said
