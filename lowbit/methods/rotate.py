"""Orthogonal rotations for QuaRot / SpinQuant-style weight rotation (Ashkboos et al. 2024; Liu et
al. 2024): a model's residual stream x becomes x Q for an orthogonal Q, which spreads outlier
channels over all channels before the weights are quantized; the model computes the same function
once Q is folded into every weight that reads or writes the stream (pipeline/rotate.py).

    Q = rotation(576, seed=0)                  # [576, 576] float64, Q Q^T = I
    hadamard(576)                              # Paley II (q = 17, order 36) x Sylvester 16, entries +-1

A Hadamard matrix spreads best (every entry of Q is +-1/sqrt(n)); orders built here: 2^k (Sylvester),
and 2^k times a Paley order (q + 1 for a prime q = 3 mod 4: 4, 8, 12, 20, 24, 32, 44, 48, 60, 68,
72, ...; 2(q + 1) for a prime q = 1 mod 4: 12, 28, 36, 60, 76, ...). QuaRot's "randomized Hadamard"
is diag(random signs) H / sqrt(n). Other sizes, or kind="orthogonal": a seeded random orthogonal
matrix (QR of a Gaussian, signs fixed so it is Haar-distributed).
"""
from __future__ import annotations

import torch

KINDS = ("hadamard", "orthogonal")


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) over GF(q), chi the quadratic character (Legendre symbol), q prime."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    i = torch.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def _paley(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m by Paley's constructions, or None when neither applies."""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: H = I + S, S = [[0, 1^T], [-1, Q]] (S skew)
        S = torch.zeros(m, m, dtype=torch.float64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + S
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II: C = [[0, 1^T], [1, Q]] (symmetric)
        C = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)  # what C's zeros (its diagonal) become
        return torch.kron(C, one) + torch.kron(torch.eye(m // 2, dtype=torch.float64), zero)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """H: [n, n] float64 with entries +-1 and H H^T = n I, as Kronecker(base, Sylvester 2^k), or
    None when no base order built here divides n with a power-of-two quotient."""
    for k in range(n.bit_length(), -1, -1):  # the largest power of two first: the smallest base
        if n % (1 << k):
            continue
        m = n >> k
        base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if base is None:
            continue
        H = base
        for _ in range(k):
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
        return H
    return None


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal [n, n] float64: QR of a Gaussian with R's diagonal made positive."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))[None, :]


def rotation(n: int, *, seed: int = 0, kind: str = "hadamard") -> tuple[torch.Tensor, str]:
    """(Q: [n, n] float64 orthogonal, what it is). kind "hadamard": diag(random signs) H / sqrt(n)
    where a Hadamard order fits n (else the random orthogonal matrix, and the description says so);
    "orthogonal": QR of a Gaussian. Both are seeded: the same (n, seed, kind) gives the same Q."""
    if kind not in KINDS:
        raise ValueError(f"rotation kind={kind!r}: choose one of {', '.join(KINDS)}")
    g = torch.Generator().manual_seed(int(seed))
    H = hadamard(n) if kind == "hadamard" else None
    if H is None:
        why = "" if kind == "orthogonal" else f" (no Hadamard order built here fits {n})"
        return random_orthogonal(n, g), f"random orthogonal {n}{why}"
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return signs[:, None] * H / n ** 0.5, f"randomized Hadamard {n}"


def rotate_options(*, seed: int = 0, kind: str = "hadamard", heads: bool = True) -> dict:
    """The options of the `rotate` transform (Recipe.method_options["rotate"]): seed of the random
    signs / matrix, kind of R1 and R2 ("hadamard" | "orthogonal"), heads: also rotate each attention
    head's values (R2, v_proj output and o_proj input) besides the residual stream (R1)."""
    if kind not in KINDS:
        raise ValueError(f"rotate: kind={kind!r}; choose one of {', '.join(KINDS)}")
    if not isinstance(heads, bool):
        raise ValueError(f"rotate: heads={heads!r}; give true or false")
    return {"seed": int(seed), "kind": kind, "heads": heads}
