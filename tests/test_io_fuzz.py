"""Fuzzing the readers: a lowbit checkpoint (model.safetensors + lowbit.json) of a tiny
transformers model, and a tiny GGUF file, damaged in seeded random ways (truncated, bytes
flipped, JSON values of the wrong type, huge declared sizes). Every case must end in a
ValueError that names the file, or in a model that loads and runs; never another exception,
and never a hang (each case runs under an alarm)."""
import contextlib
import json
import random
import shutil
import signal
import struct

import numpy as np
import pytest
import torch

from conftest import tiny_transformer
from lowbit.io import read_gguf_tensors
from lowbit.io.lowbit_format import load_lowbit, save_lowbit
from lowbit.pipeline import quantize

CASES = 30  # seeded cases per damage kind and checkpoint, about 20 ms each on a quiet machine


@contextlib.contextmanager
def deadline(seconds: int):
    def hang(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def loads_or_names_the_file(folder, what: str, run: bool = True) -> str:
    """'ok' (the model loaded, and ran if `run`) or 'error' (a ValueError naming the folder)."""
    with deadline(30):
        try:
            model = load_lowbit(folder)
        except ValueError as e:
            assert str(folder) in str(e), f"{what}: error does not name the file: {e}"
            return "error"
        if run:
            with torch.no_grad():
                model(torch.arange(8)[None])
    return "ok"


@pytest.fixture(scope="module", params=["w4g64", "nf4-dq", "llm-int8"])
def checkpoint(request, tmp_path_factory):
    model = tiny_transformer("qwen2", 1)
    quantize(model, request.param, calibration=[torch.randint(0, 100, (2, 8))], progress=False)
    path = tmp_path_factory.mktemp("fuzz") / "q"
    save_lowbit(model, path)
    return path


def damaged(checkpoint, tmp_path, name: str, data: bytes):
    folder = tmp_path / "case"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(checkpoint, folder)
    (folder / name).write_bytes(data)
    return folder


def test_damaged_safetensors(checkpoint, tmp_path):
    data = (checkpoint / "model.safetensors").read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    rng, seen = random.Random(0), set()
    for i in range(CASES):
        b = bytearray(data)
        kind = ("truncate", "flip-header", "flip-anywhere", "huge-header-size")[i % 4]
        if kind == "truncate":
            b = b[:rng.randrange(len(b))]
        elif kind == "huge-header-size":
            b[:8] = struct.pack("<Q", rng.choice([2**63 - 1, 2**40, len(b), header]))
        else:
            end = header if kind == "flip-header" else len(b)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(end)] ^= 1 << rng.randrange(8)
        seen.add(loads_or_names_the_file(damaged(checkpoint, tmp_path, "model.safetensors", bytes(b)), f"{kind} #{i}"))
    assert "error" in seen


JUNK = [None, True, -1, 0, 2**70, 1.5, float("nan"), "", "float32", "load", "os.system", [], [1, -2], {},
        {"kind": "group"}, [[[[]]]], "x" * 10_000]


def paths(node, at=()):
    """Every (path, value) in a JSON tree."""
    yield at, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        yield from paths(v, at + (k,))


def put(tree, at, value):
    for k in at[:-1]:
        tree = tree[k]
    if value is KeyError:
        del tree[at[-1]]
    else:
        tree[at[-1]] = value


def test_damaged_lowbit_json(checkpoint, tmp_path):
    meta = json.loads((checkpoint / "lowbit.json").read_text())
    where = [p for p, _ in paths(meta) if p]
    rng, seen = random.Random(1), set()
    for i in range(2 * CASES):
        m = json.loads(json.dumps(meta))
        at = rng.choice(where)
        value = rng.choice(JUNK + [KeyError] * 2 if isinstance(at[-1], str) else JUNK)
        put(m, at, value)
        text = json.dumps(m)
        if i % 10 == 0:
            text = text[:rng.randrange(len(text))]
        what = f"#{i}: {'.'.join(map(str, at))} = {str(value)[:30]!r}"
        # A config value transformers accepts but its forward trips on (output_hidden_states="x")
        # is transformers' to check: after a config edit the model must load or fail, not run.
        run = at[:2] != ("model", "config")
        seen.add(loads_or_names_the_file(damaged(checkpoint, tmp_path, "lowbit.json", text.encode()), what, run))
    assert "error" in seen


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["model"].update({"class": "AutoTokenizer"}),
     "model.class 'AutoTokenizer' is not a transformers model"),
    (lambda m: m["model"].update({"class": "PretrainedConfig"}), "model.class .* is not a transformers model"),
    (lambda m: m["model"].update({"class": "__import__"}), "model.class .* is not a transformers model"),
    (lambda m: m["model"].update({"class": 3}), "field model.class must be str"),
    (lambda m: m["model"].update({"class": "BertModel"}), "BertModel does not take a 'qwen2' config"),
    (lambda m: m["model"]["config"].pop("model_type"), "model.config.model_type must be str"),
    (lambda m: m["model"]["config"].update({"model_type": "no-such-model"}), "model.config is not a valid"),
    (lambda m: m.update({"modules": []}), "field modules must be dict"),
    (lambda m: m.update({"recipe": "w4"}), "field recipe must be dict or null"),
    (lambda m: next(iter(m["modules"].values())).update({"dtype": "load"}), r"\.dtype is 'load'"),
    (lambda m: next(iter(m["modules"].values())).update({"dtype": "int8"}), r"\.dtype is 'int8'.*float32"),
    (lambda m: next(iter(m["modules"].values())).update({"shape": [2**62, 64]}),
     r"shape is \[4611686018427387904, 64\] but"),
    (lambda m: next(iter(m["modules"].values())).update({"shape": [-1, 64]}), "shape must be a list of non-negative"),
    (lambda m: next(iter(m["modules"].values()))["scheme"].update({"format": 5}), "scheme is not a valid scheme"),
    (lambda m: next(iter(m["modules"].values()))["scheme"]["granularity"].update({"size": "64"}),
     "granularity.size must be a positive integer"),
    (lambda m: m["modules"].update({"model.layers.7.mlp.up_proj": next(iter(m["modules"].values()))}),
     r"modules\['model.layers.7.mlp.up_proj'\]: the model built from the config has no module"),
    (lambda m: m["modules"].update({"model..x": {}}), r"modules\['model..x'\] is not a module name"),
    (lambda m: m["modules"].update({"model.norm": m["modules"]["model.layers.0.self_attn.q_proj"]}),
     r"modules\['model.norm'\].shape is \[64, 64\] but the model's model.norm is a Qwen2RMSNorm"),
    (lambda m: m["modules"].update({"model.layers.0.mlp.up_proj": m["modules"]["model.layers.0.mlp.down_proj"]}),
     r"shape is \[64, 128\] but the model's model.layers.0.mlp.up_proj is a Linear "
     r"with weight \[out, in\] = \[128, 64\]"),
])
def test_lowbit_json_fields_are_checked(tmp_path, edit, match):
    model = tiny_transformer("qwen2", 1)
    quantize(model, "w4g64", progress=False)
    save_lowbit(model, tmp_path / "q")
    meta = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    edit(meta)
    (tmp_path / "q" / "lowbit.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match) as e:
        load_lowbit(tmp_path / "q")
    assert str(tmp_path / "q") in str(e.value)


# -- GGUF ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A 1 kB GGUF: string, integer and array metadata; f32, f16 and Q4_1 tensors."""
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "tiny")
    w.add_uint32("llama.block_count", 1)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    rng = np.random.default_rng(0)
    w.add_tensor("t.f32", rng.standard_normal((4, 32)).astype(np.float32))
    w.add_tensor("t.f16", rng.standard_normal((2, 32)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
    w.add_tensor("t.q41", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reads_or_names_the_file(path, what: str) -> str:
    with deadline(30):
        try:
            out = read_gguf_tensors(path)
        except ValueError as e:
            assert str(path) in str(e), f"{what}: error does not name the file: {e}"
            return "error"
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in out.values())
    return "ok"


def test_gguf_reads_back(tiny_gguf):
    out = read_gguf_tensors(tiny_gguf)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"t.f32": (4, 32), "t.f16": (2, 32), "t.q41": (2, 64)}
    out["t.f32"] += 1  # a copy, not a read-only view of the memory-mapped file
    assert not torch.equal(out["t.f32"], read_gguf_tensors(tiny_gguf)["t.f32"])


def test_damaged_gguf(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    rng, seen = random.Random(2), set()
    # huge declared sizes at the fields that declare them: tensor count, KV count, first key's
    # length, the token array's length, the first tensor's dimension count and first dimension
    tokens = data.find(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8
    t0 = data.find(b"t.f32") + len("t.f32")
    fields = [(8, 8), (16, 8), (24, 8), (tokens, 8), (t0, 4), (t0 + 4, 8)]
    for i in range(3 * CASES):
        b = bytearray(data)
        kind = ("truncate", "flip", "huge")[i % 3]
        if kind == "truncate":
            b = b[:rng.randrange(len(b))]
        elif kind == "flip":
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        else:
            at, width = rng.choice(fields)
            b[at:at + width] = rng.choice([2**63 - 1, 2**40, 2**31, 1000]).to_bytes(8, "little")[:width]
        path = tmp_path / "case.gguf"
        path.write_bytes(bytes(b))
        seen.add(reads_or_names_the_file(path, f"{kind} #{i}"))
    assert seen == {"ok", "error"}


UP = "model.layers.0.mlp.up_proj.qweight"


@pytest.mark.parametrize("key, change, match", [
    (f"{UP}.scales", lambda t: t.float(), r"is float32 \[128, 1\], expected float16 \[128, 1\]"),
    (f"{UP}.zeros", lambda t: t[:64], r"is float16 \[64, 1\], expected float16 \[128, 1\]"),
    (f"{UP}.codes", lambda t: t.view(torch.int8), r"codes' is int8 \[4096\], expected uint8"),
    (f"{UP}.codes", lambda t: t[1:], r"codes' is uint8 \[4095\], expected uint8 \[4096\]"),
])
def test_tensor_dtypes_and_shapes_are_checked(tmp_path, key, change, match):
    from safetensors.torch import load_file, save_file

    model = tiny_transformer("qwen2", 1)
    quantize(model, "w4g64", progress=False)
    save_lowbit(model, tmp_path / "q")
    w = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(w))
    tensors[key] = change(tensors[key]).contiguous()
    save_file(tensors, str(w))
    with pytest.raises(ValueError, match=match) as e:
        load_lowbit(tmp_path / "q")
    assert str(w) in str(e.value)
