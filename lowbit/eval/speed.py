"""Generation speed: prefill and greedy decode tokens per second with a KV cache."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..nn.cache import cache_keyword


@dataclass(frozen=True)
class GenerationSpeed:
    prefill_tokens_per_s: float   # prompt_tokens / time of one forward over the prompt
    decode_tokens_per_s: float    # new_tokens / time of new_tokens single-token steps
    prompt_tokens: int
    new_tokens: int
    runs: int                     # timed runs (median reported), after one warm-up


FILLER = ("The quick brown fox jumps over the lazy dog while the committee reviews its annual report "
          "on river water quality, noting that rainfall in the northern valleys rose again this year. ")


def _prompt(tokenizer, text: str | None, prompt_tokens: int) -> torch.Tensor:
    text = text if text is not None else FILLER * (prompt_tokens // 20 + 1)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < prompt_tokens:
        raise ValueError(f"generation_speed: prompt_tokens={prompt_tokens} is longer than the prompt text")
    return torch.tensor(ids[:prompt_tokens])[None]                                 # [1, prompt_tokens]


def _run(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    name = cache_keyword(model)  # also the output field holding the cache
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    t1 = time.perf_counter()
    cache, nxt = getattr(out, name), out.logits[:, -1].argmax(-1, keepdim=True)   # [1, 1]
    for _ in range(new_tokens):
        out = model(input_ids=nxt, use_cache=True, **{name: cache})
        cache, nxt = getattr(out, name), out.logits[:, -1].argmax(-1, keepdim=True)
    _ = nxt.item()  # wait for an asynchronous device
    return t1 - t0, time.perf_counter() - t1


@torch.inference_mode()
def generation_speed(model, tokenizer, *, prompt_tokens: int = 128, new_tokens: int = 32,
                     runs: int = 3, text: str | None = None, progress: bool = True,
                     warmup_tokens: int | None = None) -> GenerationSpeed:
    """Median prefill and decode throughput of greedy generation, batch 1, after one warm-up run
    (of `warmup_tokens` decode steps; default new_tokens: a few already load every kernel and cache).

    The prompt is the first `prompt_tokens` tokens of `text` (default: a repeated English
    sentence; speed does not depend on the words); decoding feeds
    one token [1, 1] per step with the KV cache from the step before.
    Example: generation_speed(model, tok, prompt_tokens=128, new_tokens=32).decode_tokens_per_s
    """
    if prompt_tokens < 1 or new_tokens < 1 or runs < 1:
        raise ValueError(f"generation_speed: prompt_tokens, new_tokens and runs must be >= 1, got "
                         f"{prompt_tokens}, {new_tokens}, {runs}")
    device = next(model.parameters(), torch.empty(0)).device
    prompt = _prompt(tokenizer, text, prompt_tokens).to(device)
    warmup = new_tokens if warmup_tokens is None else warmup_tokens
    if warmup < 1:
        raise ValueError(f"generation_speed: warmup_tokens must be >= 1, got {warmup}")
    times = [_run(model, prompt, warmup if i == 0 else new_tokens)
             for i in tqdm(range(runs + 1), desc="speed", unit="run", disable=not progress)][1:]
    prefill = statistics.median(t for t, _ in times)
    decode = statistics.median(t for _, t in times)
    return GenerationSpeed(prefill_tokens_per_s=prompt_tokens / prefill, decode_tokens_per_s=new_tokens / decode,
                           prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs)
