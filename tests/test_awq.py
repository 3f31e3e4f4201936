"""AWQ's scale search and clip search: the improvement the paper's method gives on activations with
outlier channels, and both searches against brute-force loops written out here."""
import pytest
import torch

from lowbit.core import PerGroup, quantize
from lowbit.methods import awq_scales
from lowbit.methods.awq import CLIP_RATIOS, awq_clip
from lowbit.pipeline import RECIPES
from lowbit.pipeline.stats import InputStats


def stats_of(x: torch.Tensor) -> InputStats:
    s = InputStats(x.shape[1], hessian=True)
    s.update(x, 0)
    return s


def layer_loss(w, w_hat, H) -> float:
    d = (w - w_hat).double()
    return float(((d @ H.double()) * d).sum())


def heavy_channels(g: torch.Generator, n=2048, d=128) -> torch.Tensor:
    """Channel sizes spread over three decades (|x| ~ U(0, 4)^3), as in an LLM's hidden states."""
    return torch.randn(n, d, generator=g) * (torch.rand(d, generator=g) * 4) ** 3


def few_outliers(g: torch.Generator, n=1024, d=128) -> torch.Tensor:
    """Unit channels plus 8 outlier channels 20x larger."""
    x = torch.randn(n, d, generator=g)
    x[:, torch.randperm(d, generator=g)[:8]] *= 20
    return x


# (data, scheme, bound): AWQ's scaled round to nearest over plain round to nearest, layer loss.
# Measured on these seeds: heavy w4g64 0.60-0.64, w3g64 0.62-0.70; outliers 0.26-0.40.
CASES = [("heavy", "w4g64", 0.75), ("heavy", "w3g64", 0.75),
         ("outliers", "w4g64", 0.5), ("outliers", "w4g64-sym", 0.5), ("outliers", "w3g64", 0.5)]


@pytest.mark.parametrize("data,name,bound", CASES)
def test_awq_scales_cut_the_layer_loss_on_outlier_channels(data, name, bound, gen):
    x = (heavy_channels if data == "heavy" else few_outliers)(gen)
    st = stats_of(x)
    scheme = RECIPES[name].weights
    ws = [torch.randn(64, 128, generator=gen) * 0.05 for _ in range(2)]  # two layers sharing the input
    s = awq_scales(ws, st, scheme)
    assert s.shape == (128,) and bool((s > 0).all())
    awq = sum(layer_loss(w, quantize(w * s, scheme).dequantize() / s, st.hessian) for w in ws)
    rtn = sum(layer_loss(w, quantize(w, scheme).dequantize(), st.hessian) for w in ws)
    assert awq <= bound * rtn, (awq / rtn)
    # salient channels (large mean |x|) are the ones scaled up
    big = st.absmean > st.absmean.median()
    assert float(s[big].min()) > float(s[~big].max())


def awq_scales_brute_force(ws, x, scheme, grid=20):
    """The paper's search written out: s = mean|x|^a / sqrt(max * min) for a = 0, 1/grid, ...; the
    first a with the least summed output error ||(W - Q(W s) / s) X^T||^2 wins. scheme: one, or
    one per layer."""
    schemes = scheme if isinstance(scheme, list) else [scheme] * len(ws)
    xm = x.abs().mean(0).clamp(min=1e-6)
    best, best_s = None, None
    for i in range(grid):
        s = xm ** (i / grid)
        s = s / torch.sqrt(s.max() * s.min())
        err = sum(float(((x.double() @ (w - quantize(w * s, sc).dequantize() / s).double().T) ** 2).sum())
                  for w, sc in zip(ws, schemes))
        if best is None or err < best * (1 - 1e-9):
            best, best_s = err, s
    return best_s


@pytest.mark.parametrize("name", ["w4g64", "w3g64"])
def test_awq_scales_equal_a_brute_force_search(name, gen):
    x = few_outliers(gen, n=256, d=64)
    st = stats_of(x)
    ws = [torch.randn(32, 64, generator=gen) * 0.05 for _ in range(2)]
    scheme = RECIPES[name].weights.replace(granularity=PerGroup(32))
    torch.testing.assert_close(awq_scales(ws, st, scheme), awq_scales_brute_force(ws, x, scheme), rtol=1e-5, atol=0)


def test_awq_scales_count_each_layer_on_its_own_scheme():
    """A mixed-precision group (q/k/v under different schemes): the search sums each layer's error
    on its own grid, which differs from pricing all of them on the first layer's (on this seed's
    data the two pick different exponents; on some draws they agree)."""
    gen = torch.Generator().manual_seed(0)
    x = few_outliers(gen, n=256, d=64)
    st = stats_of(x)
    ws = [torch.randn(32, 64, generator=gen) * 0.05 for _ in range(3)]
    schemes = [RECIPES[n].weights.replace(granularity=PerGroup(32)) for n in ("w8", "w3g64", "w3g64")]
    s = awq_scales(ws, st, schemes)
    torch.testing.assert_close(s, awq_scales_brute_force(ws, x, schemes), rtol=1e-5, atol=0)
    first = awq_scales(ws, st, schemes[0])  # the group priced on its first layer's (8-bit) grid
    assert not torch.allclose(s, first)

    def loss(t):
        return sum(layer_loss(w, quantize(w * t, sc).dequantize() / t, st.hessian) for w, sc in zip(ws, schemes))
    assert loss(s) <= loss(first)
    with pytest.raises(ValueError, match="2 schemes for 3 weights"):
        awq_scales(ws, st, schemes[:2])


def awq_clip_brute_force(w, x, scheme, gs):
    """Per row and group: each clip ratio of the group's range in turn, quantized alone; keep the
    first ratio with the least output error ||(w_g - Q(clip(w_g))) X_g^T||^2."""
    out = w.clone()
    for r in range(w.shape[0]):
        for c0 in range(0, w.shape[1], gs):
            wg, xg = w[r:r + 1, c0:c0 + gs], x[:, c0:c0 + gs].double()
            lo, hi = float(wg.min()), float(wg.max())
            if scheme.symmetric:
                hi = max(-lo, hi)
                lo = -hi
            best = None
            for ratio in CLIP_RATIOS:
                wc = wg.clamp(lo * ratio, hi * ratio)
                err = float(((xg @ (wg - quantize(wc, scheme).dequantize()).double().T) ** 2).sum())
                if best is None or err < best * (1 - 1e-9):
                    best, out[r:r + 1, c0:c0 + gs] = err, wc
    return out


@pytest.mark.parametrize("name", ["w4g64", "w4g64-sym"])
def test_awq_clip_equals_a_brute_force_search_and_helps(name, gen):
    x = heavy_channels(gen, n=256, d=64)
    st = stats_of(x)
    w = torch.randn(8, 64, generator=gen) * 0.05
    w[:, 3] *= 8  # a few large weights: clipping them pays on the other channels
    scheme = RECIPES[name].weights.replace(granularity=PerGroup(32))
    clipped = awq_clip(w, scheme, st)
    # the same ratio per (row, group); bounds rounded to float32 differently can move an end by an ulp
    torch.testing.assert_close(clipped, awq_clip_brute_force(w, x, scheme, 32), rtol=1e-6, atol=0)
    loss = lambda wh: layer_loss(w, wh, st.hessian)  # noqa: E731
    assert loss(quantize(clipped, scheme).dequantize()) < 0.95 * loss(quantize(w, scheme).dequantize())


def test_awq_clip_per_channel_and_unsupported_layouts(gen):
    from lowbit.core import PerChannel, Scheme

    x = heavy_channels(gen, n=256, d=48)
    st = stats_of(x)
    w = torch.randn(6, 48, generator=gen) * 0.05
    w[:, 3] *= 8
    scheme = Scheme("uint4", PerChannel(0), symmetric=False, range="minmax")
    torch.testing.assert_close(awq_clip(w, scheme, st), awq_clip_brute_force(w, x, scheme, 48), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"^awq clipping handles group, channel and tensor granularity, not "
                                         r"PerGroup\(size=16, axis=0\)$"):
        awq_clip(w, Scheme("int4", PerGroup(16, axis=0)), st)


def test_awq_scales_on_every_kth_row_equal_a_brute_force_search_of_those_rows(gen):
    """row_stride=k: the exact token-matmul loss of rows 0, k, 2k, ... (a group-wise grid rounds each row
    alone), so the choice is the brute-force search's on those rows; not the whole weight's in general."""
    x = few_outliers(gen, n=256, d=64)
    st = stats_of(x)
    ws = [torch.randn(32, 64, generator=gen) * 0.05, torch.randn(12, 64, generator=gen) * 0.05]
    scheme = RECIPES["w3g64"].weights.replace(granularity=PerGroup(32))
    got = awq_scales(ws, st, scheme, row_stride=4)
    torch.testing.assert_close(got, awq_scales_brute_force([w[::4] for w in ws], x, scheme), rtol=1e-5, atol=0)
    from lowbit.core import PerTensor
    with pytest.raises(ValueError, match="rounds each row alone"):
        awq_scales(ws, st, scheme.replace(granularity=PerTensor()), row_stride=4)


class CountingScheme:
    """A scheme with its own round trip (as a GGML type has): counts the grid points scored."""
    def __init__(self, scheme):
        self.scheme, self.calls = scheme, 0

    def roundtrip(self, w):
        self.calls += 1
        return quantize(w, self.scheme).dequantize()


def test_awq_coarse_search_scores_9_of_20_points_and_finds_the_minimum_of_a_unimodal_loss(gen):
    """coarse=4: exponents 0, 4, 8, 12, 16 of 20, then +-2 and +-1 around the best. On a smooth single-valley
    loss (many rows, fine 8-bit grid) that is the full grid's choice; the first point's loss (round to
    nearest, exponent 0) is always among those scored, so the choice is never worse than it."""
    x = heavy_channels(gen, n=1024, d=64)
    st = stats_of(x)
    ws = [torch.randn(256, 64, generator=gen) * 0.05]
    base = RECIPES["w4g64"].weights.replace(granularity=PerGroup(32))
    sc = CountingScheme(base)
    got = awq_scales(ws, st, sc, coarse=4)
    assert sc.calls == 9
    losses = [sum(layer_loss(w, quantize(w * s, base).dequantize() / s, st.hessian) for w in ws)
              for s in (awq_scales(ws, st, base, grid=20), got)]
    torch.testing.assert_close(got, awq_scales(ws, st, base), rtol=1e-6, atol=0)
    assert losses[1] == losses[0]
    with pytest.raises(ValueError, match="power of two"):
        awq_scales(ws, st, base, coarse=3)
