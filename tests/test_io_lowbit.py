"""lowbit checkpoint: identity after reload, atomic writes, clear errors."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.io.lowbit_format import load_lowbit, save_lowbit
from lowbit.nn import QuantLinear
from lowbit.pipeline import quantize

from test_pipeline import Toy


@pytest.mark.parametrize("recipe", ["w4g64", "nf4-dq", "nvfp4", "mxfp4", "w8a8-dynamic", "w8a8-static", "fp8"])
def test_reload_is_bit_identical(tmp_path, recipe):
    torch.manual_seed(0)
    model = Toy().eval()
    quantize(model, recipe, calibration=[torch.randint(0, 50, (2, 8))], progress=False)
    ids = torch.randint(0, 50, (2, 12))
    out = model(ids)
    save_lowbit(model, tmp_path / "q")
    back = load_lowbit(tmp_path / "q", model=Toy())
    assert isinstance(back.fc1, QuantLinear)
    assert torch.equal(back(ids), out)
    assert back.lowbit_recipe == model.lowbit_recipe
    assert back.fc1.quantized_nbytes() == model.fc1.quantized_nbytes()


def test_saving_again_replaces_the_checkpoint(tmp_path):
    model = quantize(Toy(), "w8", progress=False)
    save_lowbit(model, tmp_path / "q")
    save_lowbit(quantize(Toy(), "w4g64", progress=False), tmp_path / "q")
    assert load_lowbit(tmp_path / "q", model=Toy()).lowbit_recipe.name == "w4g64"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temp folders left


def test_interrupted_save_leaves_nothing_that_loads(tmp_path, monkeypatch):
    model = quantize(Toy(), "w8", progress=False)
    import lowbit.io.atomic as atomic

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "replace_dir", boom)
    with pytest.raises(KeyboardInterrupt):
        save_lowbit(model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not a lowbit checkpoint"):
        load_lowbit(tmp_path / "q", model=Toy())


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="not a lowbit checkpoint"):
        save_lowbit(quantize(Toy(), "w8", progress=False), tmp_path / "q")
    assert (tmp_path / "q" / "precious.txt").exists()


@pytest.fixture
def saved(tmp_path):
    save_lowbit(quantize(Toy(), "w4g64", progress=False), tmp_path / "q")
    return tmp_path / "q"


def test_corrupt_and_truncated_files(saved):
    w = saved / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is missing or corrupt"):
        load_lowbit(saved, model=Toy())
    (saved / "lowbit.json").write_text("{not json")
    with pytest.raises(ValueError, match="lowbit.json is corrupt"):
        load_lowbit(saved, model=Toy())


def test_missing_tensor_and_unknown_version(saved):
    w = saved / "model.safetensors"
    t = load_file(str(w))
    del t["fc1.qweight.scales"]
    save_file(t, str(w))
    with pytest.raises(ValueError, match="'fc1.qweight.scales' is missing"):
        load_lowbit(saved, model=Toy())
    meta = json.loads((saved / "lowbit.json").read_text()) | {"version": 99}
    (saved / "lowbit.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version 99 is not supported"):
        load_lowbit(saved, model=Toy())


def test_non_transformers_model_needs_a_skeleton(saved):
    with pytest.raises(ValueError, match="pass model="):
        load_lowbit(saved)
