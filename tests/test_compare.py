"""The main job's table: rows name their method, calibration never reads evaluated windows."""
import warnings

import pytest
import torch

import lowbit.analysis.compare as compare_mod
from lowbit.analysis import compare_recipes, format_table, parse_specs
from lowbit.cli import main
from lowbit.cli.compare import MAIN_RECIPES
from lowbit.eval import token_ids
from lowbit.io import default_text


@pytest.fixture(scope="module")
def text():
    return default_text()


def test_parse_specs():
    assert parse_specs("w8, w4g64:auto,") == [("w8", None), ("w4g64", "auto")]
    assert parse_specs([("w8", None), "nf4:rtn"]) == [("w8", None), ("nf4", "rtn")]
    with pytest.raises(ValueError, match="at least one"):
        parse_specs(" , ")
    specs = dict((f"{n}:{m}" if m else n, m) for n, m in parse_specs(MAIN_RECIPES))
    assert specs["w4g64:rtn"] == "rtn" and specs["w4g64:auto"] == "auto"


def test_rows_name_methods_and_calibrate_after_the_evaluated_windows(smollm2_2layers, text, monkeypatch, capsys):
    model, tok = smollm2_2layers
    seen, streamed = [], []
    real = compare_mod.quantize

    def spy(q, recipe, calibration=None, **kw):
        seen.append((recipe.method, calibration))
        return real(q, recipe, calibration=calibration, **kw)

    monkeypatch.setattr(compare_mod, "quantize", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' past_key_values rename: none left
        cmp = compare_recipes(model, tok, text, "w4g64:rtn,w4g64:auto", window=64, windows=3,
                              calibration_windows=2, batch_size=2, decode_tokens=2, progress=True,
                              on_row=streamed.append)
    bars = capsys.readouterr().err
    assert "compare [w4g64:auto: awq+gptq]" in bars and "compare [w4g64:rtn: rtn]" in bars
    assert [r.recipe for r in cmp.rows] == ["fp32", "w4g64:rtn", "w4g64:auto"] and streamed == cmp.rows
    assert [r.method for r in cmp.rows] == ["-", "rtn", "awq+gptq"]
    assert [r.calibrated for r in cmp.rows] == [False, False, True]
    fp = cmp.rows[0]
    assert fp.kl == 0.0 and fp.delta_ppl_pct == 0.0 and fp.top1 == 1.0 and fp.embeddings == "fp32"
    assert all(r.decode_tok_s > 0 for r in cmp.rows)
    # only the calibrated row got calibration, and it is windows 3 and 4: tokens 192..319
    ids = token_ids(tok, text)
    assert [m for m, c in seen if c is not None] == ["awq+gptq"]
    calib = next(c for _, c in seen if c is not None)
    assert [tuple(c.shape) for c in calib] == [(1, 64), (1, 64)]
    assert torch.equal(torch.cat([c[0] for c in calib]), ids[192:320])
    table = format_table(cmp)
    assert "evaluated: windows 0-2 of 64 tokens (tokens 0-191" in table
    assert "calibration (w4g64:auto): windows 3-4 (tokens 192-319)" in table
    assert "2 greedy decode steps" in table
    # calibrated AWQ+GPTQ beats round to nearest on the evaluated windows
    assert cmp.rows[2].kl < cmp.rows[1].kl


def test_text_too_short_and_unknown_recipe(smollm2_2layers):
    model, tok = smollm2_2layers
    with pytest.raises(ValueError, match="calibration windows"):
        compare_recipes(model, tok, "A short text. " * 40, "w4g64:auto", window=64, windows=2,
                        calibration_windows=8, speed=False, progress=False)
    with pytest.raises(ValueError, match="unknown recipe"):
        compare_recipes(model, tok, "A short text.", "w5", progress=False)


def test_cli_compare_refuses_a_bad_recipe_before_loading(capsys):
    assert main(["compare", "no-such-model", "--recipes", "w8,w5"]) == 2
    assert "--recipes w5: unknown recipe" in capsys.readouterr().err


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 100 for c in text]}


def test_generation_speed_short_warmup_without_future_warning():
    from conftest import tiny_transformer
    from lowbit.eval import generation_speed

    model = tiny_transformer("qwen2", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        s = generation_speed(model, _CharTokenizer(), prompt_tokens=8, new_tokens=3, runs=1, warmup_tokens=1,
                             progress=False)
    assert s.new_tokens == 3 and s.decode_tokens_per_s > 0
    with pytest.raises(ValueError, match="warmup_tokens"):
        generation_speed(model, _CharTokenizer(), prompt_tokens=8, new_tokens=3, warmup_tokens=0, progress=False)
