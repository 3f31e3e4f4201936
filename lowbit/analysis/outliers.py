"""LLM.int8()'s outlier-feature analysis: which hidden dimensions exceed |x| >= 6, where and how often.

Dettmers et al. (2022, section 4.1) call a hidden dimension an outlier feature when its magnitude
reaches 6 in at least 25% of the layers and 6% of the sequence positions. Here a "site" is one
input tensor of the Linear layers that read the hidden state (q/k/v read one, gate/up another),
counted once however many layers read it:

    layers       sites where the dimension reaches the threshold on some token
    token_share  largest share, over sites, of the tokens on which it does

    rep = collect_outliers(model, windows)             # hooks on the Linear inputs
    rep.systematic()                                   # the paper's outlier features
    outlier_features({"site": x})                      # the same from activations [tokens, dim]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods.llm_int8 import DEFAULT_THRESHOLD, check_threshold
from ..pipeline.walk import is_linear


@dataclass(frozen=True)
class OutlierFeature:
    dim: int
    layers: int          # sites where |x[:, dim]| >= threshold on some token
    layer_share: float   # layers / sites
    token_share: float   # the largest share of a site's tokens with |x[:, dim]| >= threshold
    max_abs: float


@dataclass(frozen=True)
class OutlierReport:
    threshold: float
    sites: list[str]     # one name per distinct input tensor (its first reader)
    tokens: int          # tokens seen per site
    features: list[OutlierFeature]  # every dimension that reached the threshold, most layers first

    def systematic(self, layer_share: float = 0.25, token_share: float = 0.06) -> list[OutlierFeature]:
        """The features that reach the threshold in >= layer_share of the sites and >= token_share
        of some site's tokens (LLM.int8()'s definition)."""
        return [f for f in self.features if f.layer_share >= layer_share and f.token_share >= token_share]

    def summary(self) -> str:
        s = self.systematic()
        dims = ", ".join(f"{f.dim} ({f.layers}/{len(self.sites)} sites, {f.token_share:.0%} tokens)" for f in s[:8])
        return (f"{len(self.features)} dimensions reach |x| >= {self.threshold:g} somewhere over {len(self.sites)} "
                f"sites x {self.tokens} tokens; {len(s)} systematic (>= 25% of sites, >= 6% of tokens)"
                + (f": {dims}" if s else ""))


class _Counts:
    """Per-dimension counts of one site, accumulated batch by batch."""

    def __init__(self, dim: int):
        self.hits = torch.zeros(dim, dtype=torch.long)   # tokens with |x| >= threshold
        self.max_abs = torch.zeros(dim)
        self.tokens = 0

    def add(self, x: torch.Tensor, threshold: float) -> None:
        a = x.detach().reshape(-1, x.shape[-1]).abs().float()
        self.hits += (a >= threshold).sum(0)
        torch.maximum(self.max_abs, a.amax(0), out=self.max_abs)
        self.tokens += a.shape[0]


def _report(counts: dict[str, _Counts], threshold: float) -> OutlierReport:
    if not counts:
        raise ValueError("outlier analysis: no activations were seen")
    dims = {c.hits.numel() for c in counts.values()}
    if len(dims) != 1:
        raise ValueError(f"outlier analysis: sites of different widths {sorted(dims)}; give one hidden size")
    hits = torch.stack([c.hits for c in counts.values()])                    # [sites, dim]
    tokens = torch.tensor([c.tokens for c in counts.values()]).clamp(min=1)  # [sites]
    layers = (hits > 0).sum(0)
    share = (hits.double() / tokens[:, None]).amax(0)
    max_abs = torch.stack([c.max_abs for c in counts.values()]).amax(0)
    feats = [OutlierFeature(int(d), int(layers[d]), float(layers[d]) / len(counts), float(share[d]),
                            float(max_abs[d])) for d in layers.nonzero().flatten().tolist()]
    feats.sort(key=lambda f: (-f.layers, -f.token_share, f.dim))
    return OutlierReport(threshold, list(counts), int(tokens.max()), feats)


def outlier_features(acts: dict[str, torch.Tensor], threshold: float = DEFAULT_THRESHOLD) -> OutlierReport:
    """acts: {site: activations [..., dim]} (one hidden size) -> OutlierReport."""
    threshold = check_threshold(threshold)
    counts = {}
    for name, x in acts.items():
        counts[name] = _Counts(x.shape[-1])
        counts[name].add(x, threshold)
    return _report(counts, threshold)


@torch.no_grad()
def collect_outliers(model, calibration, threshold: float = DEFAULT_THRESHOLD) -> OutlierReport:
    """Run the calibration windows ([T] or [b, T]) through `model` with hooks on the inputs of its
    Linear layers that read the hidden state (input width = the most common one, the model width)."""
    threshold = check_threshold(threshold)
    linears = [(n, m) for n, m in model.named_modules() if is_linear(m) and n]
    widths = [m.weight.shape[1] if type(m).__name__ != "Conv1D" else m.weight.shape[0] for _, m in linears]
    hidden = max(set(widths), key=widths.count)
    counts: dict[str, _Counts] = {}
    last = {"x": None}

    def hook(name):
        def see(module, args):
            x = args[0]
            if x is last["x"]:  # the layer before read this very tensor: one site
                return
            last["x"] = x
            counts.setdefault(name, _Counts(hidden)).add(x, threshold)
        return see

    hooks = [m.register_forward_pre_hook(hook(n)) for (n, m), w in zip(linears, widths) if w == hidden]
    try:
        for x in calibration:
            x = x[None] if x.dim() == 1 else x
            model(x, use_cache=False) if getattr(model, "config", None) is not None else model(x)
            last["x"] = None
    finally:
        for h in hooks:
            h.remove()
    return _report(counts, threshold)
