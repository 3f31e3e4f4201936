"""Encoder fidelity: how close a (quantized) encoder's sentence embeddings stay to the reference's.

    sents = sentences_from_text(wikitext2("test"), 64)
    fid = embedding_fidelity(quantized, fp32_model, tokenizer, sents)   # fid.cosine, fid.spearman
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


def sentences_from_text(text: str, n: int, *, min_words: int = 8, max_words: int = 40) -> list[str]:
    """`n` sentences spread evenly over `text` (wikitext headings skipped, its ' @-@ ' spacing undone).

    Example: sentences_from_text(wikitext2("test"), 64) -> 64 str of 8..40 words
    """
    text = re.sub(r" @(.)@ ", r"\1", text)
    text = re.sub(r" ([.,;:!?)'])", r"\1", text).replace("( ", "(")
    found = []
    for line in text.split("\n"):
        line = line.strip()
        if not line or line.startswith("="):
            continue
        for s in re.split(r"(?<=[.!?]) +(?=[A-Z\"])", line):
            if min_words <= len(s.split()) <= max_words:
                found.append(s)
    if len(found) < n:
        raise ValueError(f"sentences_from_text: asked for n={n} sentences, the text has only {len(found)} "
                         f"of {min_words}..{max_words} words; use a longer text or a smaller n")
    return [found[i * len(found) // n] for i in range(n)]


@torch.inference_mode()
def sentence_embeddings(model, tokenizer, sentences: list[str], *, batch_size: int = 32,
                        max_length: int = 256, progress: bool = False) -> torch.Tensor:
    """[n, hidden] float32 mean of the last hidden states over each sentence's non-padding tokens."""
    device = next(model.parameters(), torch.empty(0)).device
    out = []
    for i in tqdm(range(0, len(sentences), batch_size), desc="embed", unit="batch", disable=not progress):
        enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        res = model(**enc, output_hidden_states=True)
        hidden = res.last_hidden_state if getattr(res, "last_hidden_state", None) is not None \
            else res.hidden_states[-1]                                         # [b, t, hidden]
        m = enc["attention_mask"][..., None].to(hidden.dtype)                  # [b, t, 1]
        out.append(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu())
    return torch.cat(out)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """[n] float64 ranks 1..n, ties given their average rank (as Spearman's rho needs)."""
    order = x.argsort()
    sorted_x = x[order]
    r = torch.empty_like(x, dtype=torch.float64)
    r[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, r[order])
    r[order] = (sums / counts)[inverse]
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two [n] vectors (Pearson correlation of their average ranks)."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


@dataclass(frozen=True)
class EmbeddingFidelity:
    cosine: float       # mean cosine(model embedding, reference embedding) per sentence
    cosine_min: float
    spearman: float     # rank correlation of the pairwise cosine matrices' upper triangles
    sentences: int


def embedding_fidelity(model, ref_model, tokenizer, sentences: list[str], *,
                       batch_size: int = 32) -> EmbeddingFidelity:
    """Compare mean-pooled sentence embeddings [n, hidden] of `model` with those of `ref_model`.

    Example: embedding_fidelity(quantized, fp32_model, tok, sentences_from_text(text, 64)).cosine
    """
    if len(sentences) < 3:
        raise ValueError(f"embedding_fidelity: need at least 3 sentences, got {len(sentences)}")
    e = sentence_embeddings(model, tokenizer, sentences, batch_size=batch_size)
    r = sentence_embeddings(ref_model, tokenizer, sentences, batch_size=batch_size)
    cos = torch.nn.functional.cosine_similarity(e.double(), r.double(), dim=-1)   # [n]
    en, rn = torch.nn.functional.normalize(e.double(), dim=-1), torch.nn.functional.normalize(r.double(), dim=-1)
    iu = torch.triu_indices(len(sentences), len(sentences), offset=1)
    sim_e, sim_r = (en @ en.T)[iu[0], iu[1]], (rn @ rn.T)[iu[0], iu[1]]            # [n(n-1)/2]
    return EmbeddingFidelity(cosine=cos.mean().item(), cosine_min=cos.min().item(),
                             spearman=spearman(sim_e, sim_r), sentences=len(sentences))
