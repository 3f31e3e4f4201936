"""lowbit.eval on a 2-layer SmolLM2 and MiniLM, each figure checked against an independent computation."""
import copy

import pytest
import torch

from lowbit.eval import (Reference, embedding_fidelity, evaluate, generation_speed, model_size, perplexity,
                         sentences_from_text, spearman, token_ids, windows)
from lowbit.io import default_text, load_model


@pytest.fixture(scope="module")
def small_lm(smollm2_2layers):
    """SmolLM2-135M cut to its first 2 decoder layers, and its tokenizer."""
    return smollm2_2layers


@pytest.fixture(scope="module")
def ids(small_lm):
    return token_ids(small_lm[1], default_text()[:20_000])


def perturbed(model, scale=0.05, seed=0):
    """A copy with noise of `scale` x std added to one projection weight."""
    other = copy.deepcopy(model)
    w = other.model.layers[1].mlp.down_proj.weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w += scale * w.std() * torch.randn(w.shape, generator=g)
    return other


class FakeQuantLinear(torch.nn.Module):
    """Stands in for lowbit.nn.QuantLinear: no fp weight parameter, int8 codes + fp16 row scales."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("codes", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scales", scale.half())
        self.bias = None

    def quantized_nbytes(self) -> int:
        return self.codes.numel() + 2 * self.scales.numel()

    def forward(self, x):
        return x @ (self.codes.float() * self.scales.float()).T


def reference_nll(model, ids, window, spans):
    """Float64 NLL per scored token, computed directly from the logits."""
    out = []
    with torch.no_grad():
        for start, first in spans:
            x = ids[start:start + window]
            logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)   # [window, vocab]
            out.append(-logp[first - 1:-1].gather(-1, x[first:, None])[:, 0])
    return torch.cat(out)


def test_windows_layout():
    assert windows(2048, 512) == [(0, 1), (512, 1), (1024, 1), (1536, 1)]
    assert windows(2047, 512, max_windows=2) == [(0, 1), (512, 1)]
    assert windows(1024, 512, stride=256) == [(0, 1), (256, 256), (512, 256)]
    with pytest.raises(ValueError, match="window=512"):
        windows(100, 512)


@pytest.mark.parametrize("stride,batch_size", [(None, 1), (None, 2), (48, 2)])
def test_perplexity_matches_float64_nll(small_lm, ids, stride, batch_size):
    model, _ = small_lm
    spans = windows(len(ids), 96, stride, 3)
    nll = reference_nll(model, ids, 96, spans)
    r = perplexity(model, ids, window=96, stride=stride, max_windows=3, batch_size=batch_size, progress=False)
    assert r.windows == 3 and r.tokens == len(nll) == (95 * 3 if stride is None else 95 + 2 * 48)
    assert r.nll == pytest.approx(nll.mean().item(), rel=1e-5)
    assert r.ppl == pytest.approx(torch.exp(nll.mean()).item(), rel=1e-5)


def test_perplexity_accepts_tokenizer_and_text(small_lm):
    model, tok = small_lm
    text = default_text()[:3000]
    a = perplexity(model, tok, text, window=64, max_windows=2, progress=False)
    ids = torch.tensor([tok.bos_token_id] + tok(text)["input_ids"])[None]   # [1, n]: BOS, then the text
    b = perplexity(model, ids, window=64, max_windows=2, progress=False)
    assert a == b
    assert token_ids(tok, text, bos=False).tolist() == ids[0, 1:].tolist()


def test_reference_against_itself_is_exact(small_lm, ids):
    model, _ = small_lm
    ref = Reference.capture(model, ids, window=64, max_windows=3, progress=False)
    assert ref.logprobs.shape == (3, 63, 49152) and ref.logprobs.dtype == torch.float16
    rep = evaluate(model, ref, progress=False)
    assert rep.kl == 0.0 and rep.top1_agreement == 1.0 and rep.delta_ppl_pct == 0.0
    assert rep.ppl == pytest.approx(perplexity(model, ids, window=64, max_windows=3, progress=False).ppl, rel=1e-9)


def test_kl_and_agreement_against_perturbed_model(small_lm, ids):
    model, _ = small_lm
    other = perturbed(model, scale=0.5)
    ref = Reference.capture(model, ids, window=64, stride=32, max_windows=3, dtype=torch.float32, progress=False)
    rep = evaluate(other, ref, batch_size=2, progress=False)
    spans = windows(len(ids), 64, 32, 3)
    kl, agree = [], []
    with torch.no_grad():
        for start, first in spans:
            x = ids[start:start + 64][None]
            lp = torch.log_softmax(model(x).logits[0, first - 1:-1].double(), -1)
            lq = torch.log_softmax(other(x).logits[0, first - 1:-1].double(), -1)
            kl.append((lp.exp() * (lp - lq)).sum(-1))
            agree.append(lp.argmax(-1) == lq.argmax(-1))
    kl, agree = torch.cat(kl), torch.cat(agree)
    assert rep.tokens == len(kl) == 63 + 2 * 32
    assert rep.kl > 1e-3 and rep.kl == pytest.approx(kl.mean().item(), rel=1e-4)
    assert rep.top1_agreement == pytest.approx(agree.double().mean().item()) and rep.top1_agreement < 1
    assert rep.ppl == pytest.approx(perplexity(other, ids, window=64, stride=32, max_windows=3,
                                               progress=False).ppl, rel=1e-9)


def test_fp16_reference_kl_is_close_to_exact(small_lm, ids):
    model, _ = small_lm
    other = perturbed(model, scale=0.2)
    exact = evaluate(other, Reference.capture(model, ids, window=64, max_windows=2, dtype=torch.float32,
                                              progress=False), progress=False)
    half = evaluate(other, Reference.capture(model, ids, window=64, max_windows=2, progress=False), progress=False)
    assert half.kl == pytest.approx(exact.kl, rel=2e-2, abs=1e-4)


def test_eval_runs_with_replaced_linear_layers(small_lm, ids):
    model, _ = small_lm
    q = copy.deepcopy(model)
    for layer in q.model.layers:
        layer.mlp.down_proj = FakeQuantLinear(layer.mlp.down_proj)
    rep = evaluate(q, Reference.capture(model, ids, window=64, max_windows=2, progress=False), progress=False)
    assert 0 < rep.kl < 0.05 and rep.top1_agreement > 0.9


def test_model_size_fp32_and_quantized(small_lm):
    model, _ = small_lm
    n_params = sum(p.numel() for p in model.parameters())  # tied embedding listed once
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # RoPE tables are held too
    size = model_size(model)
    assert size.bytes == 4 * n_params + buffers and size.weights == n_params
    assert size.bits_per_weight == 8 * (4 * n_params + buffers) / n_params
    assert size.lm_head_tied and size.lm_head_bytes == 0 and size.embedding_bytes == 4 * 49152 * 576
    q = copy.deepcopy(model)
    lin = q.model.layers[0].mlp.down_proj
    q.model.layers[0].mlp.down_proj = FakeQuantLinear(lin)
    qsize = model_size(q)
    assert qsize.quantized_modules == 1 and qsize.weights == n_params
    assert qsize.bytes == 4 * n_params + buffers - 4 * lin.weight.numel() + lin.weight.numel() + 2 * lin.out_features


def test_model_size_untied_head():
    m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    m.get_output_embeddings = lambda: m[1]
    s = model_size(m)
    assert (s.bytes, s.embedding_bytes, s.lm_head_bytes, s.lm_head_tied) == (320, 160, 160, False)


def test_generation_speed_reports_positive_rates(small_lm):
    model, tok = small_lm
    s = generation_speed(model, tok, prompt_tokens=16, new_tokens=4, runs=1, progress=False)
    assert s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0 and (s.prompt_tokens, s.new_tokens) == (16, 4)


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm-l6")


def test_embedding_fidelity_self_and_perturbed(minilm):
    model, tok = minilm
    sents = sentences_from_text(default_text(), 24)
    assert len(set(sents)) == 24
    same = embedding_fidelity(model, model, tok, sents)
    assert same.cosine == pytest.approx(1.0, abs=1e-9) and same.spearman == pytest.approx(1.0, abs=1e-12)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.encoder.layer[2].parameters():
            p += 0.5 * p.std() * torch.randn(p.shape, generator=torch.Generator().manual_seed(0))
    diff = embedding_fidelity(other, model, tok, sents)
    assert 0 < diff.cosine < 0.9999 and diff.cosine_min <= diff.cosine and 0 < diff.spearman < 1


def test_sentences_from_wikitext_markup():
    text = " \n = Heading = \n \n He was born in 1 @,@ 000 BC , in a well @-@ known town . It rained for days .\n"
    assert sentences_from_text(text, 1, min_words=3) == ["He was born in 1,000 BC, in a well-known town."]
    with pytest.raises(ValueError, match="n=5"):
        sentences_from_text(text, 5)


def test_spearman_matches_scipy_with_ties():
    from scipy import stats
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 8, (200,), generator=g).double()
    b = a + torch.randn(200, generator=g, dtype=torch.float64)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a.numpy(), b.numpy())[0], rel=1e-12)
