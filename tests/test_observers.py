"""Activation observers against independent computations: numpy percentiles, a brute-force MSE
search on the raw values, TensorRT's entropy calibration written out (tests/reference/entropy_ref.py),
an exponential moving average written out."""
import numpy as np
import pytest
import torch

from lowbit.core.observers import OBSERVERS, HistogramObserver, make_observer
from reference.entropy_ref import entropy_threshold


def batches(kind: str, g: torch.Generator, n: int = 4, size: int = 5000) -> list[torch.Tensor]:
    """Batches [size // 50, 50] whose range grows from batch to batch (so the histogram re-bins)."""
    out = []
    for b in range(n):
        if kind == "gauss":
            x = torch.randn(size, generator=g)
        elif kind == "heavy":  # Student-t with 3 degrees of freedom: rare large values
            x = torch.randn(size, generator=g) / torch.sqrt((torch.randn(3, size, generator=g) ** 2).mean(0))
        else:  # "relu": non-negative with a few outliers
            x = torch.relu(torch.randn(size, generator=g)) * 2
            x[torch.randint(0, size, (3,), generator=g)] = 30.0
        out.append((x * (1 + 0.5 * b)).reshape(-1, 50))
    return out


def observed(kind, data, **kw):
    o = make_observer(kind, **kw)
    for x in data:
        o.update(x)
    return o


def test_moving_average_is_the_exponential_average_of_batch_ranges(gen):
    data = batches("gauss", gen, n=6)
    for m in (0.01, 0.3):
        o = observed("moving_average", data, momentum=m)
        lo, hi = float(data[0].min()), float(data[0].max())
        for x in data[1:]:
            lo, hi = (1 - m) * lo + m * float(x.min()), (1 - m) * hi + m * float(x.max())
        assert o.range(False) == pytest.approx((min(lo, 0.0), max(hi, 0.0)), rel=1e-12)
        a = max(abs(lo), abs(hi))
        assert o.range(True) == pytest.approx((-a, a), rel=1e-12)
    with pytest.raises(ValueError, match="MovingAverageObserver saw no data"):
        make_observer("moving_average").range(True)
    default = observed("moving_average", data[:2])  # momentum 0.01 unless told
    assert default.range(False)[1] == pytest.approx(0.99 * float(data[0].max()) + 0.01 * float(data[1].max()))


def test_minmax_is_the_running_min_and_max(gen):
    data = batches("heavy", gen)
    o = observed("minmax", data)
    allx = torch.cat([x.reshape(-1) for x in data])
    assert o.range(False) == (float(allx.min()), float(allx.max()))
    a = float(allx.abs().max())
    assert o.range(True) == (-a, a)
    pos = make_observer("minmax")
    pos.update(torch.tensor([2.0, 3.0]))
    assert pos.range(False) == (0.0, 3.0)  # zero stays representable
    const = make_observer("minmax")
    const.update(torch.full((4,), -3.0))  # one value seen: lo == hi is data, not emptiness
    assert const.range(True) == (-3.0, 3.0) and const.range(False) == (-3.0, 0.0)
    with pytest.raises(ValueError, match="MinMaxObserver saw no data"):
        make_observer("minmax").range(False)


@pytest.mark.parametrize("kind", ["gauss", "heavy", "relu"])
def test_histogram_counts_match_numpy(kind, gen):
    x = batches(kind, gen, n=1)[0]
    o = observed("percentile", [x])
    a = x.abs().reshape(-1).double().numpy()
    want, _ = np.histogram(a, bins=2048, range=(0, a.max()))
    got = o.hist_abs.numpy()
    assert got.sum() == len(a)
    assert np.abs(got - want).max() <= 1  # a value on a bin edge may land either side


@pytest.mark.parametrize("pct", [99.0, 99.9, 99.99])
@pytest.mark.parametrize("kind", ["gauss", "heavy", "relu"])
def test_percentile_matches_numpy(kind, pct, gen):
    data = batches(kind, gen)
    a = torch.cat([x.reshape(-1) for x in data]).abs().double().numpy()
    want = float(np.percentile(a, pct))
    width = a.max() / 2048
    one = observed("percentile", [torch.cat(data)], percentile=pct)  # one batch: the exact histogram
    t = one.range(True)[1]
    assert want - 1e-9 <= t <= want + width + 1e-9  # the upper edge of the bin holding the percentile
    grown = observed("percentile", data, percentile=pct)  # re-binned as the range grew
    assert abs(grown.range(True)[1] - want) <= 2 * width
    lo, hi = grown.range(False)
    allx = torch.cat(data)
    assert (lo, hi) == (max(min(float(allx.min()), 0.0), -grown.range(True)[1]),
                        min(max(float(allx.max()), 0.0), grown.range(True)[1]))


def real_mse(x: np.ndarray, t: float, levels: int) -> float:
    """Mean squared error of x on the symmetric grid {-n..n} * t / n, n = levels/2 - 1."""
    n = levels // 2 - 1
    return float(((x - np.clip(np.round(x / (t / n)), -n, n) * (t / n)) ** 2).mean())


@pytest.mark.parametrize("levels", [256, 16])
@pytest.mark.parametrize("kind", ["gauss", "heavy"])
def test_mse_clip_is_as_good_as_a_brute_force_search(kind, levels, gen):
    data = batches(kind, gen)
    x = torch.cat([b.reshape(-1) for b in data]).double().numpy()
    t = observed("mse", data).range(True, levels)[1]
    top = float(np.abs(x).max())
    best = min(real_mse(x, c, levels) for c in np.linspace(top / 64, top, 400))
    assert real_mse(x, t, levels) <= 1.01 * best, real_mse(x, t, levels) / best
    if levels == 16:  # at 4 bits clipping the tail pays (at 8 bits the best clip is near absmax)
        assert real_mse(x, t, levels) < 0.9 * real_mse(x, top, levels)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # log(0), 0/0 are handled, not warned about
@pytest.mark.parametrize("levels", [256, 16, 4])
@pytest.mark.parametrize("kind", ["gauss", "heavy", "relu"])
def test_entropy_is_tensorrts_kl_calibration(kind, levels, gen):
    data = batches(kind, gen)
    o = observed("entropy", data)
    assert isinstance(o, HistogramObserver) and o.bins == 2048
    want = entropy_threshold(o.hist_abs.numpy(), o.max_abs / o.bins, quantized_bins=levels // 2)
    assert o.range(True, levels) == pytest.approx((-want, want), rel=1e-12)
    top = float(torch.cat(data).abs().max())
    assert want < top  # every distribution here has a tail worth clipping


def test_unknown_observer_and_empty_histogram():
    with pytest.raises(ValueError, match="observer="):
        make_observer("nope")
    for kind in OBSERVERS:
        with pytest.raises(ValueError, match="saw no data"):
            make_observer(kind).range(True)


def mse_rule(h: np.ndarray, width: float, levels: int) -> float:
    """The rule the observer documents, one candidate at a time: clip at k bin widths, k = bins/16 ..
    bins in steps of bins/256; expected error per bin: step^2 / 12 inside the clip, (centre - t)^2
    outside, weighted by the bin's count; the first least wins."""
    bins = len(h)
    centres = (np.arange(bins) + 0.5) * width
    best, best_t = np.inf, None
    for k in range(bins // 16, bins + 1, max(1, bins // 256)):
        t = k * width
        step = t / (levels // 2 - 1 if levels > 2 else 1)
        err = float(np.sum(h * np.where(centres <= t, step**2 / 12, (centres - t) ** 2)))
        if err < best:
            best, best_t = err, t
    return best_t


@pytest.mark.parametrize("levels", [256, 16, 4])
def test_mse_rule_written_out(levels, gen):
    o = observed("mse", batches("heavy", gen))
    assert o.range(True, levels)[1] == pytest.approx(mse_rule(o.hist_abs.numpy(), o.max_abs / o.bins, levels),
                                                     rel=1e-12)
    # a spike in one bin: where the clip lands depends on the bin's centre, to half a bin
    for b, want in [(799, 792.0), (800, 800.0)]:
        spike = HistogramObserver("mse")
        spike.update(torch.tensor([-2048.0, 2048.0]))
        spike.hist_abs.zero_()
        spike.hist_abs[b] = 1000.0
        t = spike.range(True, levels)[1]
        assert t == pytest.approx(mse_rule(spike.hist_abs.numpy(), 1.0, levels), rel=1e-12)
        if levels == 4:
            assert t == want  # the candidate just below the spike's centre: (c - t)^2 beats (t / 1)^2 / 12


def test_histogram_edge_cases(gen):
    # re-binning moves each old bin's count to the new bin holding its centre
    for grow in (2.0, 1.0001):
        o = HistogramObserver()  # the default rule is percentile
        x = torch.rand(5000, generator=gen)
        x[0] = 1.0
        o.update(x)
        old = o.hist_abs.numpy().copy()
        o.update(torch.tensor([grow]))
        idx = np.minimum(((np.arange(2048) + 0.5) / 2048 / grow * 2048).astype(int), 2047)
        want = np.bincount(idx, weights=old, minlength=2048)
        want[2047] += 1
        assert np.array_equal(o.hist_abs.numpy(), want), grow
        assert o.range(True)[1] <= o.max_abs
    one = HistogramObserver("percentile", percentile=50.0)
    one.update(torch.tensor([1.0]))
    one.update(torch.tensor([-2.0]))
    assert one.hist_abs[1023] == 1 and one.hist_abs[2047] == 1
    assert one.range(True) == (-1024 / 2048 * 2.0, 1024 / 2048 * 2.0)
    # one value seen is data, not emptiness; an all-negative input keeps zero as the top of the range
    const = make_observer("percentile")
    const.update(torch.full((8,), -0.5))
    assert const.range(True) == (-0.5, 0.5) and const.range(False) == (-0.5, 0.0)
    # fewer bins: every candidate bin; as many bins as quantized levels: nothing to search, no clip
    small = HistogramObserver("mse", bins=256)
    for b in batches("heavy", gen):
        small.update(b)
    for levels in (16, 4, 256):
        assert small.range(True, levels)[1] == pytest.approx(
            mse_rule(small.hist_abs.numpy(), small.max_abs / 256, levels), rel=1e-12)
    spike = HistogramObserver("mse", bins=256)
    spike.update(torch.tensor([256.0]))
    spike.hist_abs.zero_()
    spike.hist_abs[101] = 10.0
    assert spike.range(True, 4)[1] == 101.0  # every bin is a candidate below 512 bins
    tiny = HistogramObserver("entropy", bins=128)
    tiny.update(batches("heavy", gen)[0])
    assert tiny.range(True, 256) == (-tiny.max_abs, tiny.max_abs)
