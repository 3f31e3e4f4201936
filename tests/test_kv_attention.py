"""The "lowbit_kv" attention reads lowbit.kv_cache from its codes: same logits as the old path
(dequantize the whole prefix, then sdpa), without dequantizing the prefix at each step."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lowbit
from lowbit.core import QTensor, quantize
from lowbit.methods.kivi import kv_schemes
from lowbit.nn import cache_keyword, use_kv_attention
from lowbit.nn.kv_attention import prefix_scores, prefix_sums

FORMATS = ["int8", "int4", "int2", "fp8"]
# float32 throughout: the two paths differ only in the order of float32 sums
# (codes: per-thread row buffers; old path: sdpa over dequantized K/V)
ATOL = 2e-4


def tiny_llama(attn: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                  max_position_embeddings=256, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config).eval()
    if attn == "codes":
        use_kv_attention(model)
    return model


@pytest.fixture(scope="module")
def models():
    return tiny_llama("sdpa"), tiny_llama("codes")


def _generate(model, ids, mask, cache):
    out = model.generate(ids, attention_mask=mask, **{cache_keyword(model): cache}, max_new_tokens=20,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("keys", ["channel", "token"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_generate_from_codes_equals_dequantize_path(models, fmt, keys):
    """Batch of 2, one row left-padded, 40-token prompt, 20 greedy steps; flushes happen during decode."""
    old, new = models
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 96, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0

    def cache():
        return lowbit.kv_cache(fmt, group_size=16, residual_length=8, keys=keys)
    c_old, c_new = cache(), cache()
    seq_old, logits_old = _generate(old, ids, mask, c_old)
    seq_new, logits_new = _generate(new, ids, mask, c_new)
    assert c_new.layers[0].quantized_length >= 48  # the prompt and early decode tokens are in codes
    assert torch.equal(seq_old, seq_new)
    assert (logits_new - logits_old).abs().max() < ATOL * logits_old.abs().max()


def test_no_whole_prefix_dequantize_per_step(models, monkeypatch):
    old, new = models
    calls = []
    real = QTensor.dequantize
    monkeypatch.setattr(QTensor, "dequantize", lambda self, *a, **k: calls.append(self.shape) or real(self, *a, **k))
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    for model, expect_calls in ((new, False), (old, True)):
        cache = lowbit.kv_cache("int4", group_size=16, residual_length=8)
        with torch.no_grad():
            logits = model(ids, **{cache_keyword(model): cache}, use_cache=True).logits
            calls.clear()
            tok = logits[:, -1:].argmax(-1)
            for _ in range(5):
                tok = model(tok, **{cache_keyword(model): cache}, use_cache=True).logits[:, -1:].argmax(-1)
        assert bool(calls) == expect_calls, (model.config._attn_implementation, len(calls))


def test_chunk_of_queries_over_codes_is_causal(models):
    """4 tokens in one forward over a quantized prefix: the codes path builds the causal mask itself."""
    old, new = models
    ids = torch.randint(1, 96, (2, 44), generator=torch.Generator().manual_seed(5))
    out = [_chunk_after_prefix(model, ids, 40) for model in (old, new)]
    assert (out[1] - out[0]).abs().max() < ATOL * out[0].abs().max()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("keys,G,D", [("channel", 8, 32), ("token", 16, 32), ("token", 64, 32), ("token", 16, 48)])
def test_codes_kernels_equal_float64_dequantize_then_matmul(gen, fmt, keys, G, D):
    T, B, H, R = 40, 2, 3, 5
    x = torch.randn(T, B, H, D, generator=gen) * 3
    x[..., 5] += 8.0  # an outlier channel: zero points far from 0, the bias terms large
    q_keys, q_values = (quantize(x, s) for s in kv_schemes(fmt, group_size=G, keys=keys))
    query = torch.randn(B, H, R, D, generator=gen)
    p = torch.rand(B, H, R, T, generator=gen)
    K = q_keys.dequantize().double().permute(1, 2, 0, 3)  # [B, H, T, D]
    V = q_values.dequantize().double().permute(1, 2, 0, 3)
    for got, want in ((prefix_scores(q_keys, query), query.double() @ K.transpose(-1, -2)),
                      (prefix_sums(q_values, p), p.double() @ V)):
        assert got.shape == want.shape
        assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max()


def test_long_chunk_falls_back_to_sdpa_over_the_dequantized_prefix(models):
    """More than MAX_QUERIES tokens in one forward over a quantized prefix: sdpa over the whole
    dequantized K/V, exactly the old path."""
    from lowbit.nn.kv_attention import MAX_QUERIES

    old, new = models
    ids = torch.randint(1, 96, (1, 40 + MAX_QUERIES + 1), generator=torch.Generator().manual_seed(9))
    out = [_chunk_after_prefix(model, ids, 40) for model in (old, new)]
    assert torch.equal(out[0], out[1])


def _chunk_after_prefix(model, ids, prefix: int) -> torch.Tensor:
    """Logits of ids[:, prefix:] in one forward, after ids[:, :prefix] filled an int4 cache (flushed to codes)."""
    cache = lowbit.kv_cache("int4", group_size=16, residual_length=8)
    with torch.no_grad():
        model(ids[:, :prefix], **{cache_keyword(model): cache}, use_cache=True)
        return model(ids[:, prefix:], **{cache_keyword(model): cache}, use_cache=True).logits
