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


# -- load_gguf: a tiny Llama written by gguf-py, its metadata and tensor table damaged ------------
LLAMA_META = {"block_count": 1, "embedding_length": 64, "feed_forward_length": 128, "attention.head_count": 4,
              "attention.head_count_kv": 2, "context_length": 64, "vocab_size": 32}
LLAMA_FLOATS = {"attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0}


def llama_tensors(meta=LLAMA_META) -> dict[str, tuple[int, ...]]:
    h, f, v = meta["embedding_length"], meta["feed_forward_length"], meta["vocab_size"]
    kv = meta["attention.head_count_kv"] * h // meta["attention.head_count"]
    shapes = {"token_embd.weight": (v, h), "output_norm.weight": (h,)}
    for i in range(meta["block_count"]):
        shapes.update({f"blk.{i}.{k}": s for k, s in {
            "attn_norm.weight": (h,), "ffn_norm.weight": (h,), "attn_q.weight": (h, h), "attn_k.weight": (kv, h),
            "attn_v.weight": (kv, h), "attn_output.weight": (h, h), "ffn_gate.weight": (f, h),
            "ffn_up.weight": (f, h), "ffn_down.weight": (h, f)}.items()})
    return shapes


def write_llama_gguf(path, meta: dict | None = None, tensors: dict | None = None, extra=None):
    """A random 1-block Llama GGUF (f32, tied output): `meta` overrides llama.* values (int ->
    uint32, float -> float32, str -> string, KeyError -> dropped), `tensors` overrides shapes
    (None drops one); extra(writer) adds anything else."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in {**LLAMA_META, **LLAMA_FLOATS, **(meta or {})}.items():
        if v is KeyError:
            continue
        add = (w.add_string if isinstance(v, str) else w.add_float32 if isinstance(v, float)
               else w.add_uint64 if v >= 2**32 else w.add_uint32)
        add(f"llama.{k}", v)
    if extra:
        extra(w)
    rng = np.random.default_rng(0)
    for name, shape in {**llama_tensors(), **(tensors or {})}.items():
        if shape is not None:
            w.add_tensor(name, (0.1 * rng.standard_normal(shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def loads_gguf_or_names_the_file(path, what: str) -> str:
    from lowbit.io.gguf.read import load_gguf

    with deadline(30):
        try:
            model = load_gguf(path)
        except ValueError as e:
            assert str(path) in str(e), f"{what}: error does not name the file: {e}"
            return "error"
        with torch.no_grad():
            model(torch.arange(8)[None])
    return "ok"


def test_tiny_llama_gguf_loads_and_runs(tmp_path):
    assert loads_gguf_or_names_the_file(write_llama_gguf(tmp_path / "t.gguf"), "as written") == "ok"


def test_damaged_gguf_model(tmp_path):
    """Every hyper-parameter set to odd numbers and types, tensors dropped, reshaped or renamed,
    and the bytes of the file cut or flipped: load_gguf loads a model that runs, or names the file."""
    rng, seen = random.Random(3), set()
    numbers = [0, 1, 2, 3, 5, 31, 2**31, 2**32 - 1, 2**40, 2**63]
    good = write_llama_gguf(tmp_path / "good.gguf").read_bytes()
    for i in range(3 * CASES):
        path, kind = tmp_path / "case.gguf", ("meta", "table", "bytes")[i % 3]
        if kind == "meta":
            key = rng.choice(sorted({**LLAMA_META, **LLAMA_FLOATS}))
            value = rng.choice(numbers + [KeyError, "64", 0.5, LLAMA_META.get(key, 1) * 2])
            write_llama_gguf(path, {key: value})
            what = f"#{i}: llama.{key} = {value!r}"
        elif kind == "table":
            name = rng.choice(sorted(llama_tensors()))
            shape = rng.choice([None, (3,), (64, 3), (2, 64), (1, 1, 64)])
            tensors = {name: shape} if rng.random() < 0.7 else {name: None, "blk.7.attn_q.weight": (64, 64)}
            write_llama_gguf(path, tensors=tensors)
            what = f"#{i}: {tensors}"
        else:
            b = bytearray(good)
            if rng.random() < 0.5:
                b = b[:rng.randrange(len(b))]
            else:
                for _ in range(rng.randint(1, 4)):
                    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(b))
            what = f"#{i}: bytes"
        seen.add(loads_gguf_or_names_the_file(path, what))
    assert seen == {"ok", "error"}


# -- the Deep Compression reader ------------------------------------------------------------------
@pytest.fixture(scope="module")
def deep_compressed(tmp_path_factory):
    """A 1-layer Qwen2 whose Linear layers share 8 values each, 60% pruned, as a .safetensors file."""
    from lowbit.io.deep_compression import save_deep_compressed
    from lowbit.methods.deep_compression import magnitude_mask, share_weights
    from lowbit.nn import SharedLinear

    model = tiny_transformer("qwen2", 1)
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            c, codes = share_weights(m.weight, magnitude_mask(m.weight, 0.6), 3)
            model.set_submodule(name, SharedLinear.from_linear(m, c, codes))
    path = tmp_path_factory.mktemp("dc") / "m.safetensors"
    save_deep_compressed(model, path)
    return path


def loads_dc_or_names_the_file(path, what: str) -> str:
    from lowbit.io.deep_compression import load_deep_compressed

    with deadline(30):
        try:
            model = load_deep_compressed(path)
        except ValueError as e:
            assert str(path) in str(e), f"{what}: error does not name the file: {e}"
            return "error"
        with torch.no_grad():
            model(torch.arange(8)[None])
    return "ok"


def test_damaged_deep_compression_file(deep_compressed, tmp_path):
    """The JSON entry's fields set to junk (kept, gap_symbols, gap_bits, shape, config...), the
    safetensors bytes cut or flipped: a model that runs, or a ValueError naming the file."""
    from safetensors import safe_open
    from safetensors.torch import save

    from lowbit.io.deep_compression import KEY

    with safe_open(str(deep_compressed), "pt") as f:
        meta, tensors = json.loads(f.metadata()[KEY]), {k: f.get_tensor(k) for k in f.keys()}
    where = [p for p, _ in paths(meta) if p and p[0] in ("layers", "tied", "model") and p[:2] != ("model", "config")]
    where += [("model", "config", k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")]
    rng, seen = random.Random(4), set()
    data = deep_compressed.read_bytes()
    for i in range(2 * CASES):
        path = tmp_path / "case.safetensors"
        if i % 4 == 3:
            b = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(b))
            what = f"#{i}: bytes"
        else:
            m = json.loads(json.dumps(meta))
            at = rng.choice(where)
            value = rng.choice(JUNK + [2**31, 2**40, 17, [2**20, 2**20], [1, 2**40]])
            put(m, at, value)
            path.write_bytes(save(tensors, metadata={KEY: json.dumps(m)}))
            what = f"#{i}: {'.'.join(map(str, at))} = {str(value)[:30]!r}"
        seen.add(loads_dc_or_names_the_file(path, what))
    assert seen == {"ok", "error"}


# -- the streaming job's journal ------------------------------------------------------------------
def test_damaged_journal_resumes_or_starts_again_inside_its_folder(tmp_path):
    """journal.json's fields set to junk or to paths leaving the folder: _open_journal resumes a
    journal whose names all lie inside .partial, or starts again; nothing outside is touched."""
    import warnings

    from lowbit import version
    from lowbit.io.streaming.journal import open_journal
    from lowbit.io.checks import name_in

    partial = tmp_path / "job" / ".out.partial"
    outside = tmp_path / "job" / "keep"
    journal = {"digest": "d", "shards": [{"file": "model-00001.safetensors", "parts": ["embeddings"],
                                          "tensors": ["model.embed_tokens.weight"]}],
               "modules": {}, "inputs": {"block": 1, "folder": "inputs-00001", "batches": 2},
               "lowbit": version.__version__}
    escapes = ["..", ".", "", "../keep", str(outside), "a/b", "/", "keep/../x", "model\x00"]
    rng, seen = random.Random(5), set()
    for i in range(2 * CASES):
        shutil.rmtree(tmp_path / "job", ignore_errors=True)
        (outside / "sub").mkdir(parents=True)
        (outside / "model-00001.safetensors").write_bytes(b"x")
        (partial / "inputs-00001").mkdir(parents=True)
        (partial / "model-00001.safetensors").write_bytes(b"x")
        j = json.loads(json.dumps(journal))
        at = rng.choice([p for p, _ in paths(j) if p])
        put(j, at, rng.choice(escapes if at[-1] in ("file", "folder") or i % 3 == 0 else JUNK + [KeyError]))
        (partial / "journal.json").write_text(json.dumps(j))
        with deadline(10), warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            got = open_journal(partial, "d")
        assert sorted(p.name for p in outside.iterdir()) == ["model-00001.safetensors", "sub"], at
        for s in got.shards:
            name_in(partial, s["file"], "journal", "file")
        if got.inputs is not None:
            name_in(partial, got.inputs["folder"], "journal", "folder")
        seen.add("resumed" if got.shards else "again")
    assert seen == {"resumed", "again"}


# -- the safetensors row reader -------------------------------------------------------------------
def test_damaged_safetensors_rows(tmp_path):
    """Header values set to junk (dtype, shape, data_offsets), bytes cut or flipped: stored_tensors
    names the file, or every tensor it returns reads whole with the bytes its shape says."""
    from safetensors.torch import save

    from lowbit.io.streaming.rows import stored_tensors

    data = save({"a": torch.randn(6, 5), "b": torch.arange(12, dtype=torch.int16).reshape(3, 4),
                 "c": torch.ones(2, 3, 2, dtype=torch.bfloat16)})
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    rng, seen = random.Random(6), set()
    for i in range(3 * CASES):
        if i % 3 == 2:
            b = bytearray(data)
            b = b[:rng.randrange(len(b))] if rng.random() < 0.5 else b
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            raw, what = bytes(b), f"#{i}: bytes"
        else:
            h = json.loads(json.dumps(header))
            at = rng.choice([p for p, _ in paths(h) if len(p) >= 2])
            value = rng.choice(JUNK + [[2**20, 2**20], [0, 2**40], [2**40, 2**40 + 4], "F64", [60, 0]])
            put(h, at, value)
            text = json.dumps(h).encode()
            raw, what = struct.pack("<Q", len(text)) + text + data[8 + n:], f"#{i}: {at} = {str(value)[:30]!r}"
        path = tmp_path / "case.safetensors"
        path.write_bytes(raw)
        with deadline(10):
            try:
                found = stored_tensors(path)
            except ValueError as e:
                assert str(path) in str(e), f"{what}: error does not name the file: {e}"
                seen.add("error")
                continue
        for t in found.values():
            rows = t.read_rows(0, t.shape[0]) if t.shape else None
            assert rows is None or rows.shape == t.shape, what
        seen.add("ok")
    assert seen == {"ok", "error"}
