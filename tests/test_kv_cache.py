"""lowbit.kv_cache: KIVI-style quantized KV cache in transformers' Cache interface."""

import pytest
import torch

import lowbit
from lowbit.core import quantize
from lowbit.methods.kivi import append_tokens, kv_schemes
from lowbit.nn import cache_keyword
from lowbit.nn.kv_cache import QuantizedKVLayer

B, H, D, G, R = 2, 3, 32, 16, 16


def _kv(gen, t):
    k = torch.randn(B, H, t, D, generator=gen)
    k[:, :, :, 5] += 8.0  # an outlier channel, as keys have
    return k, torch.randn(B, H, t, D, generator=gen)


def _fill(layer, gen, lengths):
    ks, vs = [], []
    for t in lengths:
        k, v = _kv(gen, t)
        layer.update(k, v)
        ks.append(k)
        vs.append(v)
    return torch.cat(ks, -2), torch.cat(vs, -2)


def _affine_step(x, dim_groups):
    """float64 reference: KIVI's min/max step (max - min) / (2^b - 1) per group, broadcast to x."""
    lo, hi = x.amin(dim_groups, keepdim=True), x.amax(dim_groups, keepdim=True)
    return lo, hi


@pytest.mark.parametrize("name,bits", [("int8", 8), ("int4", 4), ("int2", 2)])
def test_round_trip_within_the_affine_step_and_residual_exact(gen, name, bits):
    kq, vq = kv_schemes(name, group_size=G)
    layer = QuantizedKVLayer(kq, vq, residual_length=R)
    k_all, v_all = _fill(layer, gen, [40, 1, 23])  # 64 tokens: 48 quantized (3 key groups), 16 residual
    assert layer.quantized_length == 48 and layer.get_seq_length() == 64
    k_new, v_new = _kv(gen, 1)
    k_out, v_out = layer.update(k_new, v_new)
    # residual window and the current token come back exactly
    assert torch.equal(k_out[..., 48:, :], torch.cat([k_all[..., 48:, :], k_new], -2))
    assert torch.equal(v_out[..., 48:, :], torch.cat([v_all[..., 48:, :], v_new], -2))
    levels = 2**bits - 1
    # keys: per channel (b, h, d) over groups of G tokens
    k = k_all[..., :48, :].double().reshape(B, H, 3, G, D)
    step_k = (k.amax(3, keepdim=True) - k.amin(3, keepdim=True)) / levels
    err_k = (k_out[..., :48, :].double().reshape(B, H, 3, G, D) - k).abs()
    assert (err_k <= 0.5 * step_k * 1.01 + 1e-6).all()
    assert err_k.max() > 0.1 * step_k.max()  # really quantized
    # values: per token over groups of G along the head dim
    v = v_all[..., :48, :].double().reshape(B, H, 48, D // G, G)
    step_v = (v.amax(-1, keepdim=True) - v.amin(-1, keepdim=True)) / levels
    err_v = (v_out[..., :48, :].double().reshape(B, H, 48, D // G, G) - v).abs()
    assert (err_v <= 0.5 * step_v * 1.01 + 1e-6).all()


def test_fp8_round_trip_within_e4m3_precision(gen):
    kq, vq = kv_schemes("fp8", group_size=G)
    layer = QuantizedKVLayer(kq, vq, residual_length=0)
    k_all, v_all = _fill(layer, gen, [32])
    k_out, v_out = layer.update(*_kv(gen, 1))
    for x, y in ((k_all, k_out[..., :32, :]), (v_all, v_out[..., :32, :])):
        x, y = x.double(), y.double()
        floor = x.abs().max() / 448 * 2.0**-9  # half of e4m3's smallest subnormal, in the largest group's units
        assert ((y - x).abs() <= x.abs() / 16 * 1.001 + floor).all()  # 3 mantissa bits: half an ulp = 2^-4


def test_appending_chunks_equals_quantizing_the_whole(gen):
    for keys in ("channel", "token"):
        kq, _ = kv_schemes("int4", group_size=G, keys=keys)
        x = torch.randn(48, B, H, D, generator=gen)
        joined = append_tokens(quantize(x[:32], kq), quantize(x[32:], kq))
        whole = quantize(x, kq)
        assert torch.equal(joined.codes, whole.codes) and torch.equal(joined.scales, whole.scales)
        assert torch.equal(joined.dequantize(), whole.dequantize())


def test_bytes_per_token_exact(gen):
    layer = QuantizedKVLayer(*kv_schemes("int4", group_size=G), residual_length=R)
    _fill(layer, gen, [70])  # 48 quantized + 22 residual (flushes happen in whole groups of 16 beyond R)
    tq, tr = layer.quantized_length, layer.get_seq_length() - layer.quantized_length
    assert (tq, tr) == (48, 22)
    codes = 2 * tq * B * H * D * 4 // 8
    key_stats = 2 * 2 * B * H * D * (tq // G)        # fp16 scale + fp16 zero per channel per 16 tokens
    value_stats = 2 * 2 * tq * B * H * (D // G)      # fp16 scale + zero per token per 16 dims
    residual = 2 * tr * B * H * D * 4                # float32 keys and values
    assert layer.nbytes() == codes + key_stats + value_stats + residual


def test_beam_reorder_selects_batch_rows_exactly(gen):
    layer = QuantizedKVLayer(*kv_schemes("int2", group_size=G), residual_length=R)
    _fill(layer, gen, [50])
    before_k, before_v = layer.qkeys.dequantize(), layer.qvalues.dequantize()
    idx = torch.tensor([1, 1])
    layer.reorder_cache(idx)
    assert torch.equal(layer.qkeys.dequantize(), before_k[:, idx])
    assert torch.equal(layer.qvalues.dequantize(), before_v[:, idx])


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="int3"):
        lowbit.kv_cache("int3")
    with pytest.raises(ValueError, match="residual_length"):
        lowbit.kv_cache("int4", residual_length=-1)
    with pytest.raises(ValueError, match="keys"):
        lowbit.kv_cache("int4", keys="head")


def test_cache_keyword_is_the_one_the_forward_declares():
    class Renamed(torch.nn.Module):  # transformers >= 5.2x
        def forward(self, input_ids, cache=None, use_cache=None, **kwargs):
            return input_ids

    class Before(torch.nn.Module):  # transformers 4.46 .. 5.1x
        def forward(self, input_ids, past_key_values=None, use_cache=None, **kwargs):
            return input_ids

    assert cache_keyword(Renamed()) == "cache"
    assert cache_keyword(Before()) == "past_key_values"


@pytest.fixture(scope="module")
def tiny_smollm(smollm2_2layers):
    model, tok = smollm2_2layers
    ids = tok("The tower is 324 metres tall, about the same height as an 81-storey building, and the "
              "tallest structure in Paris. Its base is square, measuring 125 metres on each side.",
              return_tensors="pt").input_ids
    return model, ids


def test_generate_int8_matches_full_precision_greedy(tiny_smollm):
    model, ids = tiny_smollm
    ref = model.generate(ids, max_new_tokens=12, do_sample=False)
    cache = lowbit.kv_cache("int8", group_size=16, residual_length=8)
    out = model.generate(ids, **{cache_keyword(model): cache}, max_new_tokens=12, do_sample=False)
    assert cache.layers[0].quantized_length >= ids.shape[1] - 8 - 15  # the prompt really went into codes
    assert torch.equal(out, ref)


def test_forward_with_cache_reads_the_quantized_tokens(tiny_smollm):
    """A chunked forward through the cache gives the full forward's logits: close at int8, visibly
    off at int2 (so the codes are what attention reads)."""
    model, ids = tiny_smollm
    with torch.no_grad():
        full = model(ids).logits[0, 24:]

        def chunked(fmt):
            cache = lowbit.kv_cache(fmt, group_size=8, residual_length=0)
            model(ids[:, :24], **{cache_keyword(model): cache}, use_cache=True)
            assert cache.layers[0].quantized_length == 24
            return model(ids[:, 24:], **{cache_keyword(model): cache}, use_cache=True).logits[0]
        err8 = (chunked("int8") - full).abs().max() / full.abs().max()
        err2 = (chunked("int2") - full).abs().max() / full.abs().max()
    assert err8 < 0.01 and err2 > 5 * err8
