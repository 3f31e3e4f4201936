"""Perplexity over fixed windows, and comparison against the unquantized model (KL, top-1 agreement).

Reference protocol (tests, benchmarks): BOS + wikitext-2 test.txt tokenized once as one string
(312,145 ids for SmolLM2), the first 40 non-overlapping windows of 512 tokens, ppl = exp(mean NLL
over every predicted token) = 25.57 for fp32 SmolLM2-135M-Instruct (25.62 without the BOS).

    ppl = perplexity(model, tokenizer, text).ppl
    ref = Reference.capture(fp32_model, ids, window=512, max_windows=40)   # runs fp32 once
    report = evaluate(quantized_model, ref)   # ppl, delta_ppl_pct, kl, top1_agreement in one pass
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


def token_ids(tokenizer_or_ids, text: str | None = None, *, bos: bool = True) -> torch.Tensor:
    """[n] int64 token ids: `text` tokenized once as a whole, or the given ids [n] / [1, n] as they are.

    With a tokenizer, the stream starts with one BOS token (`bos=True`, when the tokenizer has one)
    and no other special token, whatever the tokenizer adds by itself. This is the reference
    protocol: SmolLM2 on wikitext-2 test.txt gives 1 + 312,144 = 312,145 ids.
    """
    if isinstance(tokenizer_or_ids, torch.Tensor):
        if text is not None:
            raise ValueError("token_ids: give either token ids or a tokenizer with text, not ids and text")
        ids = tokenizer_or_ids
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"token_ids: ids must be [n] or [1, n], got shape {tuple(ids.shape)}")
        return ids.long()
    if text is None:
        raise ValueError("token_ids: a tokenizer needs `text`; or pass token ids [n] instead")
    ids = tokenizer_or_ids(text, add_special_tokens=False)["input_ids"]
    bos_id = getattr(tokenizer_or_ids, "bos_token_id", None)
    return torch.tensor(([bos_id] if bos and bos_id is not None else []) + ids, dtype=torch.long)


def windows(n_tokens: int, window: int, stride: int | None = None,
            max_windows: int | None = None) -> list[tuple[int, int]]:
    """[(start, first_scored)] for full windows ids[start:start+window]; position p >= first_scored
    (p >= 1) is predicted from the positions before it. Overlapping windows (stride < window) score
    only the tokens the previous window did not. Example: windows(2048, 512) -> 4 windows."""
    stride = window if stride is None else stride
    if window < 2 or stride < 1:
        raise ValueError(f"window must be >= 2 and stride >= 1, got window={window}, stride={stride}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    if n_tokens < window:
        raise ValueError(f"need at least window={window} tokens, got {n_tokens}; use a smaller window")
    starts = range(0, n_tokens - window + 1, stride)
    starts = starts[:max_windows] if max_windows is not None else starts
    return [(s, 1 if i == 0 or stride >= window else window - stride) for i, s in enumerate(starts)]


def _batches(ids: torch.Tensor, spans, batch_size: int, window: int):
    for i in range(0, len(spans), batch_size):
        chunk = spans[i:i + batch_size]
        yield chunk, torch.stack([ids[s:s + window] for s, _ in chunk])


def _logits(model, batch: torch.Tensor) -> torch.Tensor:
    """[b, window] ids -> [b, window, vocab] float32 logits."""
    device = next(model.parameters(), torch.empty(0)).device
    out = model(input_ids=batch.to(device), use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).float().cpu()


DEFAULT_WINDOWS = 40  # the reference protocol's count; None scores every window of the text


@dataclass(frozen=True)
class Perplexity:
    ppl: float      # exp(nll)
    nll: float      # mean negative log-likelihood per predicted token, nats
    tokens: int     # predicted tokens
    windows: int


@torch.inference_mode()
def perplexity(model, tokenizer_or_ids, text: str | None = None, *, window: int = 512,
               stride: int | None = None, max_windows: int | None = DEFAULT_WINDOWS, batch_size: int = 1,
               progress: bool = True) -> Perplexity:
    """Perplexity of a causal LM over the first `max_windows` windows of `window` tokens (see `windows`).

    The default, 40 windows of 512 tokens, is the reference protocol (about 2 minutes for
    SmolLM2-135M on 2 cores, with a progress bar); `max_windows=None` scores the whole text.

    tokenizer_or_ids: a tokenizer (then `text` is tokenized once as a whole after one BOS, see
    `token_ids`) or ids [n] / [1, n].
    The model maps input_ids [b, window] to logits [b, window, vocab]; any module types inside.
    Example: perplexity(model, tok, wikitext2("test"), max_windows=40).ppl  # 25.57 fp32 SmolLM2
    """
    ids = token_ids(tokenizer_or_ids, text)
    spans = windows(len(ids), window, stride, max_windows)
    total, count = 0.0, 0
    bar = tqdm(total=len(spans), desc="perplexity", unit="win", disable=not progress)
    for chunk, batch in _batches(ids, spans, batch_size, window):
        logp = torch.log_softmax(_logits(model, batch)[:, :-1], dim=-1)   # [b, window-1, vocab]
        target_logp = logp.gather(-1, batch[:, 1:, None])[..., 0]         # [b, window-1]
        for row, (_, first) in zip(target_logp, chunk):
            total -= row[first - 1:].double().sum().item()
            count += window - first
        bar.update(len(chunk))
        bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    bar.close()
    return Perplexity(ppl=math.exp(total / count), nll=total / count, tokens=count, windows=len(spans))


@dataclass
class Reference:
    """What the unquantized model predicted on fixed windows, kept so it need not run again.

    logprobs: [windows, window-1, vocab] in `dtype` (fp16: 40 x 511 x 49152 x 2 B = 2.0 GB)
    top1:     [windows, window-1] int64 argmax of the fp32 logits
    nll:      [windows, window-1] float64 NLL of the true next token (from fp32 logits)
    """
    ids: torch.Tensor
    spans: list[tuple[int, int]]
    window: int
    logprobs: torch.Tensor
    top1: torch.Tensor
    nll: torch.Tensor

    @classmethod
    @torch.inference_mode()
    def capture(cls, model, tokenizer_or_ids, text: str | None = None, *, window: int = 512,
                stride: int | None = None, max_windows: int | None = None, batch_size: int = 1,
                dtype: torch.dtype = torch.float16, progress: bool = True) -> "Reference":
        """Run the reference model once over the windows (see `windows`) and keep its log-probs.

        Example: ref = Reference.capture(fp32_model, ids, window=512, max_windows=40)
        """
        ids = token_ids(tokenizer_or_ids, text)
        spans = windows(len(ids), window, stride, max_windows)
        logprobs = None  # [windows, window-1, vocab], allocated once the vocab is known
        top1 = torch.empty(len(spans), window - 1, dtype=torch.long)
        nll = torch.empty(len(spans), window - 1, dtype=torch.float64)
        bar = tqdm(total=len(spans), desc="reference", unit="win", disable=not progress)
        for i, (chunk, batch) in enumerate(_batches(ids, spans, batch_size, window)):
            rows = slice(i * batch_size, i * batch_size + len(chunk))
            logits = _logits(model, batch)[:, :-1]                                # [b, window-1, vocab]
            logp = torch.log_softmax(logits, dim=-1)
            if logprobs is None:
                logprobs = torch.empty(len(spans), window - 1, logits.shape[-1], dtype=dtype)
            logprobs[rows] = logp
            top1[rows] = logits.argmax(-1)
            nll[rows] = -logp.gather(-1, batch[:, 1:, None])[..., 0].double()
            bar.update(len(chunk))
        bar.close()
        return cls(ids=ids, spans=spans, window=window, logprobs=logprobs, top1=top1, nll=nll)

    def mask(self) -> torch.Tensor:
        """[windows, window-1] bool: positions scored (overlapping windows score only new tokens)."""
        first = torch.tensor([f for _, f in self.spans])[:, None]
        return torch.arange(1, self.window)[None, :] >= first

    @property
    def ppl(self) -> float:
        return math.exp(self.nll[self.mask()].mean().item())


@dataclass(frozen=True)
class Report:
    ppl: float
    ref_ppl: float
    delta_ppl_pct: float    # 100 * (ppl - ref_ppl) / ref_ppl
    nll: float
    kl: float               # mean over scored tokens of KL(ref || model), nats
    kl_p99: float           # 99th percentile of the per-token KL
    top1_agreement: float   # fraction of scored tokens where both argmaxes agree
    tokens: int
    windows: int


@torch.inference_mode()
def evaluate(model, reference: Reference, *, batch_size: int = 1, progress: bool = True) -> Report:
    """Perplexity, KL(ref || model) and top-1 agreement of `model` in one pass over the reference windows.

    KL per token: sum_v p_ref(v) (log p_ref(v) - log p_model(v)) over the vocab; the model's
    log-probs are rounded to the reference's storage dtype first, so a model compared with itself
    gives exactly 0 whatever that dtype.
    Example: evaluate(quantized, Reference.capture(fp32_model, ids, max_windows=40)).kl
    """
    ref, window, mask = reference, reference.window, reference.mask()
    nll, kl, agree = [], [], []
    bar = tqdm(total=len(ref.spans), desc="evaluate", unit="win", disable=not progress)
    for i, (chunk, batch) in enumerate(_batches(ref.ids, ref.spans, batch_size, window)):
        rows = slice(i * batch_size, i * batch_size + len(chunk))
        logits = _logits(model, batch)[:, :-1]                               # [b, window-1, vocab]
        logq = torch.log_softmax(logits, dim=-1)
        m = mask[rows]
        nll.append(-logq.gather(-1, batch[:, 1:, None])[..., 0].double()[m])
        logp = ref.logprobs[rows].float()
        logq = logq.to(ref.logprobs.dtype).float()
        kl.append((logp.exp() * (logp - logq)).sum(-1).double()[m])
        agree.append((logits.argmax(-1) == ref.top1[rows])[m])
        bar.update(len(chunk))
        bar.set_postfix(ppl=f"{math.exp(torch.cat(nll).mean().item()):.3f}")
    bar.close()
    nll, kl, agree = torch.cat(nll), torch.cat(kl), torch.cat(agree)
    ppl, ref_ppl = math.exp(nll.mean().item()), reference.ppl
    return Report(ppl=ppl, ref_ppl=ref_ppl, delta_ppl_pct=100.0 * (ppl - ref_ppl) / ref_ppl,
                  nll=nll.mean().item(), kl=kl.mean().item(), kl_p99=kl.quantile(0.99).item(),
                  top1_agreement=agree.double().mean().item(), tokens=len(nll), windows=len(ref.spans))
