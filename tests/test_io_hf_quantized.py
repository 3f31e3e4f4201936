"""Reading other tools' checkpoints (GPTQ, AWQ, compressed-tensors) into QuantLinear.

The GPTQ and AWQ folders are written here by an obvious packer that follows each format's definition
(one shift-and-or per code), from known integer codes, zero points and fp16 scales; the expected
weights are computed in float64 as (q - z) * s. Both directions are independent of lowbit's reader."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lowbit
from lowbit.nn import QuantLinear

from conftest import tiny_transformer
from reference.checkpoint_packing import pack_words, v1_words

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _codes(rng, model, bits, group, zero_lo, act_order=False):
    """Per Linear of the blocks: codes q [K, N], zero points z [G, N], scales s [G, N] (fp16), the
    expected weight W [N, K] in float64, and g_idx [K] (the group of each input)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("model.layers"):
            N, K = m.weight.shape
            G = K // group
            q = rng.integers(0, 2**bits, (K, N))
            z = rng.integers(zero_lo, 2**bits, (G, N))
            s = torch.from_numpy(rng.uniform(0.001, 0.02, (G, N))).half()
            g = np.arange(K) // group
            if act_order:  # GPTQ's desc_act: the i-th input in activation order joins group i // group
                g = np.empty(K, dtype=np.int64)
                g[rng.permutation(K)] = np.arange(K) // group
            W = (s.double().numpy()[g] * (q - z[g])).T
            out[name] = (q, z, s, torch.from_numpy(W), torch.from_numpy(g).to(torch.int32))
    return out


def _write(folder, model, quant, per_module):
    folder.mkdir()
    state = {k: v for k, v in model.state_dict().items()
             if k.rsplit(".", 1)[0] not in per_module or not k.endswith(".weight")}
    for name, tensors in per_module.items():
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quant
    (folder / "config.json").write_text(json.dumps(cfg))


def _check(folder, model, codes):
    back = lowbit.load(folder)
    layers = dict(back.named_modules())
    for name, (_, _, _, W, _) in codes.items():
        w = layers[name].qweight.dequantize() if isinstance(layers[name], QuantLinear) else layers[name].weight
        assert torch.equal(w.double(), W), name  # fp16 scales x small ints: exact in float32
    ref = tiny_transformer("qwen2", 2)
    ref.load_state_dict({**model.state_dict(), **{f"{n}.weight": c[3].float() for n, c in codes.items()}})
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (back(ids).logits - ref(ids).logits).abs().max() <= 1e-5
    return back


def _sym(codes, bits, group):
    """GPTQ sym=True: every zero point is 2^(b-1)."""
    mid = 2 ** (bits - 1)
    return {n: (q, np.full_like(z, mid), s, torch.from_numpy((s.double().numpy()[g.long().numpy()] * (q - mid)).T), g)
            for n, (q, z, s, _, g) in codes.items()}


@pytest.mark.parametrize("fmt,bits,sym,act_order", [("gptq", 4, False, False), ("gptq_v2", 4, False, False),
                                                    ("gptq", 4, True, False), ("gptq", 8, False, False),
                                                    ("gptq_v2", 2, False, False), ("gptq", 4, False, True)])
def test_gptq_checkpoint_loads_exactly(tmp_path, fmt, bits, sym, act_order):
    """Zero points of 0 included: in v1 they borrow from the next field of their word."""
    rng = np.random.default_rng(bits)
    model = tiny_transformer("qwen2", 2)
    group = 32
    codes = _codes(rng, model, bits, group, zero_lo=0, act_order=act_order)
    if sym:
        codes = _sym(codes, bits, group)
    stored = (lambda w: v1_words(w, bits)) if fmt == "gptq" else (lambda w: w)
    per_module = {n: {"qweight": pack_words(q, bits, 0), "qzeros": stored(pack_words(z, bits, 1)),
                      "scales": s, "g_idx": g} for n, (q, z, s, _, g) in codes.items()}
    for n, m in model.named_modules():
        if n in per_module and m.bias is not None:
            per_module[n]["bias"] = m.bias.detach()
    _write(tmp_path / "m", model, {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False,
                                   "sym": sym, "checkpoint_format": fmt}, per_module)
    back = _check(tmp_path / "m", model, codes)
    layer = back.model.layers[0].mlp.up_proj
    if act_order:  # groups are not runs of inputs: exact float weights in a plain Linear
        assert type(layer) is torch.nn.Linear
    else:
        assert isinstance(layer, QuantLinear) and layer.qweight.scheme.symmetric == sym


def test_awq_checkpoint_loads_exactly(tmp_path):
    rng = np.random.default_rng(7)
    model = tiny_transformer("qwen2", 2)
    codes = _codes(rng, model, 4, 32, zero_lo=0)
    per_module = {n: {"qweight": pack_words(q, 4, 1, AWQ_ORDER), "qzeros": pack_words(z, 4, 1, AWQ_ORDER),
                      "scales": s} for n, (q, z, s, _, _) in codes.items()}
    for n, m in model.named_modules():
        if n in per_module and m.bias is not None:
            per_module[n]["bias"] = m.bias.detach()
    _write(tmp_path / "m", model, {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                   "version": "gemm"}, per_module)
    _check(tmp_path / "m", model, codes)


def test_gptq_reexports_to_compressed_tensors_for_transformers(tmp_path):
    """A symmetric GPTQ checkpoint read by lowbit and written as compressed-tensors loads in transformers
    with the same weights."""
    import transformers as tf

    rng = np.random.default_rng(3)
    model = tiny_transformer("qwen2", 2)
    codes = _sym(_codes(rng, model, 4, 32, zero_lo=0), 4, 32)
    per_module = {n: {"qweight": pack_words(q, 4, 0), "qzeros": v1_words(pack_words(z, 4, 1), 4), "scales": s}
                  for n, (q, z, s, _, _) in codes.items()}
    for n, m in model.named_modules():
        if n in per_module and m.bias is not None:
            per_module[n]["bias"] = m.bias.detach()
    _write(tmp_path / "m", model, {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True}, per_module)
    back = lowbit.load(tmp_path / "m")
    lowbit.save(back, tmp_path / "ct", format="compressed-tensors")
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (hf(ids).logits - back(ids).logits).abs().max() <= 1e-5
    mods = dict(hf.named_modules())
    for n, c in codes.items():
        assert torch.equal(mods[n].weight.double(), c[3]), n


def _gptq_folder(tmp_path):
    rng = np.random.default_rng(11)
    model = tiny_transformer("qwen2", 1)
    codes = _codes(rng, model, 4, 32, zero_lo=0)
    per_module = {n: {"qweight": pack_words(q, 4, 0), "qzeros": v1_words(pack_words(z, 4, 1), 4), "scales": s}
                  for n, (q, z, s, _, _) in codes.items()}
    for n, m in model.named_modules():
        if n in per_module and m.bias is not None:
            per_module[n]["bias"] = m.bias.detach()
    folder = tmp_path / "m"
    _write(folder, model, {"quant_method": "gptq", "bits": 4, "group_size": 32}, per_module)
    return folder


def test_bad_checkpoints_name_the_file_and_tensor(tmp_path):
    from safetensors.torch import load_file

    folder = _gptq_folder(tmp_path)
    f = folder / "model.safetensors"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 2])  # truncated download
    with pytest.raises(ValueError, match="model.safetensors is missing or corrupt"):
        lowbit.load(folder)
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="model.safetensors is missing or corrupt"):
        lowbit.load(folder)
    f.write_bytes(good)
    t = load_file(str(f))

    def rewrite(change):
        d = dict(t)
        change(d)
        save_file({k: v.contiguous() for k, v in d.items()}, str(f), metadata={"format": "pt"})

    rewrite(lambda d: d.pop("model.layers.0.mlp.up_proj.qzeros"))
    with pytest.raises(ValueError, match=r"model.safetensors: model.layers.0.mlp.up_proj.*qzeros"):
        lowbit.load(folder)
    rewrite(lambda d: d.update({"model.layers.0.mlp.up_proj.scales": d["model.layers.0.mlp.up_proj.scales"][:1]}))
    with pytest.raises(ValueError, match=r"up_proj.scales: shape \(1, 128\)"):
        lowbit.load(folder)
    rewrite(lambda d: d.update({"model.layers.0.mlp.up_proj.qweight": d["model.layers.0.mlp.up_proj.qweight"][:, :64],
                                "model.layers.0.mlp.up_proj.qzeros": d["model.layers.0.mlp.up_proj.qzeros"][:, :8],
                                "model.layers.0.mlp.up_proj.scales": d["model.layers.0.mlp.up_proj.scales"][:, :64]}))
    with pytest.raises(ValueError, match=r"up_proj: weight shape \(64, 64\) does not match"):
        lowbit.load(folder)
    rewrite(lambda d: d.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' has shape \(3,\)"):
        lowbit.load(folder)
    rewrite(lambda d: d.update({"model.layers.0.mlp.up_proj.g_idx": torch.arange(64, dtype=torch.int32)}))
    with pytest.raises(ValueError, match=r"up_proj.g_idx: group indices must lie in \[0, 2\)"):
        lowbit.load(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "bitsandbytes"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes' is not read by lowbit"):
        lowbit.load(folder)
