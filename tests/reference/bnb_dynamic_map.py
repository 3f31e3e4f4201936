"""bitsandbytes' create_dynamic_map (bitsandbytes/functional.py), rewritten from its published
definition as an independent oracle for lowbit's `dynamic8` / `dynamic8_unsigned` formats.

bitsandbytes builds the map in float32 torch arithmetic: for exponent level i = 0..max_exponent_bits-1
it takes torch.linspace(0.1, 1, n + 1) (float32), the n midpoints of consecutive boundaries, and
scales them by 10 ** (i - (max_exponent_bits - 1)); a signed map adds the negatives. n is
2 ** (i + total_bits - 1 - max_exponent_bits) (signed) or twice that (unsigned, the sign bit is
spent on fractions). 0 and 1 close the table, which is returned sorted as float32.
"""
import torch


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1  # 0 for the 8-bit, 7-exponent map
    values: list[float] = []
    level = 0
    for level in range(max_exponent_bits):
        n = 2 ** (level + non_sign_bits - max_exponent_bits + (0 if signed else 1))
        values += _scaled_midpoints(n, level, max_exponent_bits, signed)
    if extra > 0:
        values += _scaled_midpoints(extra, level, max_exponent_bits, signed)
    values += [0.0, 1.0]
    if len(values) != 2 ** total_bits:
        raise ValueError(f"dynamic map has {len(values)} values, not {2 ** total_bits}")
    return torch.tensor(sorted(values), dtype=torch.float32)


def _scaled_midpoints(n: int, level: int, max_exponent_bits: int, signed: bool) -> list[float]:
    edges = torch.linspace(0.1, 1, n + 1)  # float32, as bitsandbytes
    mids = (edges[:-1] + edges[1:]) / 2.0
    scaled = (10 ** (level - (max_exponent_bits - 1))) * mids  # float32 tensor times a Python float
    out = scaled.tolist()
    return out + (-scaled).tolist() if signed else out
