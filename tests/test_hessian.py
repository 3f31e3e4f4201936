"""The Hessian statistics and the output error every calibrated solver ranks by, against float64."""
import pytest
import torch

from lowbit.core.hessian import native_bf16, output_error
from lowbit.pipeline.stats import InputStats, add_gram


@pytest.mark.parametrize("cols", [64, 300, 577])
def test_output_error_is_the_float64_trace(cols):
    gen = torch.Generator().manual_seed(cols)
    X = torch.randn(2048, cols, generator=gen) * (torch.rand(cols, generator=gen) * 4)
    H = 2 * X.T @ X / len(X)
    d = torch.randn(96, cols, generator=gen) * 0.01
    ref = torch.trace(d.double() @ H.double() @ d.double().T)
    got = output_error(d, H)
    assert got.dtype == torch.float32 and got.dim() == 0
    # bf16 products (where native) round each input to 8 bits; the sum averages that out
    assert abs(float(got) / float(ref) - 1) < (2e-4 if native_bf16() else 1e-5)


def test_output_error_ranks_as_float64_does():
    """AWQ keeps the grid point of least output error: bf16 products must not reorder points 1% apart."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(1024, 256, generator=gen)
    H = 2 * X.T @ X / len(X)
    base = torch.randn(64, 256, generator=gen) * 0.01
    ds = [base * (1 + 0.01 * k) for k in range(5)]
    got = [float(output_error(d, H)) for d in ds]
    assert got == sorted(got) and len(set(got)) == 5


@pytest.mark.parametrize("cols,dtype", [(96, torch.float32), (512, torch.float32), (777, torch.float32),
                                        (512, torch.bfloat16)])
def test_gram_from_column_halves_is_x_transpose_x(cols, dtype):
    gen = torch.Generator().manual_seed(cols)
    x = (torch.randn(300, cols, generator=gen) * 3).to(dtype)
    acc = torch.full((cols, cols), 0.5)
    add_gram(acc, x)
    ref = 0.5 + x.double().T @ x.double()
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # bf16: each product rounded to 8 bits
    assert torch.allclose(acc.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()) / 100)
    assert torch.equal(acc, acc.T)


def test_input_stats_sum_batches_as_float64():
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(128, 400, generator=gen) * 2 for _ in range(3)]
    st = InputStats(400, hessian=True)
    for b, x in enumerate(xs):
        st.update(x, b)
        st.update(x, b)  # a layer sharing the input: counted once
    X = torch.cat(xs).double()
    assert torch.allclose(st.hessian.double(), 2 * X.T @ X / len(X), rtol=1e-5, atol=1e-5)
    assert torch.allclose(st.absmean.double(), X.abs().mean(0), rtol=1e-6)
    assert torch.equal(st.absmax, X.abs().amax(0).float())


@pytest.mark.parametrize("cols", [576, 2048, 1000])
def test_output_error_keeps_h_in_float32(cols):
    """Only D is rounded to bf16 (the blocked D^T D products; H multiplies in float32): with D exact in bf16
    (small integers) and H's entries 1 + 2^-10 (bf16 would round them to 1), the trace is float64's to 1e-6;
    and for uneven column blocks (1000: 3 of 333-334) as well."""
    gen = torch.Generator().manual_seed(cols)
    d = torch.randint(-2, 3, (64, cols), generator=gen).float()
    H = torch.full((cols, cols), 1 + 2.0 ** -10)
    H.diagonal().add_(3.0)
    ref = float(((d.double() @ H.double()) * d.double()).sum())
    assert abs(float(output_error(d, H)) / ref - 1) < 1e-6
