"""The format explorer's data against torch's own fp8 dtype, and its PNG."""
import numpy as np
import torch

from lowbit.analysis import format_profile, plot_formats
from lowbit.cli import main


def _fp8_e4m3_reference() -> np.ndarray:
    """Every finite value of torch.float8_e4m3fn, from its 256 bit patterns, sorted and distinct."""
    v = torch.arange(256, dtype=torch.int64).to(torch.uint8).view(torch.float8_e4m3fn).double().numpy()
    return np.unique(v[np.isfinite(v)] + 0.0)  # + 0.0: -0 and +0 are one value


def test_fp8_values_lie_as_torch_says():
    ref = _fp8_e4m3_reference()
    p = format_profile("fp8_e4m3")
    np.testing.assert_array_equal(p.values, ref)
    assert len(p.positive) == 126 and (p.positive <= 1).sum() == 56  # 7 exponents x 8 mantissas - 0, and 1.0
    assert p.share_within_one == np.mean(np.abs(ref) <= 1) == 113 / 253


def test_integer_values_are_evenly_spaced_and_nf4_is_not():
    for name in ("int4", "int8", "uint4"):
        assert np.all(np.diff(format_profile(name).values) == 1.0), name
    assert np.ptp(np.diff(format_profile("nf4").values)) > 0.05


def test_rounding_error_matches_a_cast_to_torch_fp8():
    p = format_profile("fp8_e4m3")
    x = torch.from_numpy(p.x * 448.0)
    q = x.to(torch.float8_e4m3fn).double().numpy() / 448.0
    np.testing.assert_allclose(p.rel_err, np.abs(q - p.x) / p.x, rtol=0, atol=1e-12)
    normal = p.x >= 2.0**-6 / 448.0
    assert p.rel_err[normal].max() <= 2.0**-4  # half a step of a 3-bit mantissa
    assert format_profile("int4").rel_err[-1] == 0.0  # the max itself is exact


def test_plot_is_a_png_image(tmp_path, capsys):
    import matplotlib.image as mpimg

    out = plot_formats(["fp8_e4m3", "fp4_e2m1", "int4", "nf4"], tmp_path / "f.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(out)
    assert img.ndim == 3 and img.shape[0] > 400 and img.shape[1] > 400 and img.std() > 0.05
    assert main(["formats", "--plot", "fp8_e5m2", "int8", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file() and "wrote" in capsys.readouterr().out
    assert main(["formats", "--plot", "int99", "--out", str(tmp_path / "h.png")]) == 2
    assert not (tmp_path / "h.png").exists()
