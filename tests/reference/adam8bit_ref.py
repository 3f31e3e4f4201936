"""8-bit block-wise AdamW written plainly in float64 numpy: the oracle for lowbit.optim's 8-bit path.

Per block of `block` values: decode m = map1[code] * absmax, v = map2[code] * absmax, take the
AdamW step in float64 with the undecoded new m and v, then store each block's new absmax and the
index of the nearest map value to m / absmax (v / absmax), ties to the larger value; a positive
v whose nearest value is 0 takes the smallest positive one (lowbit.optim.blockwise.quantize_second_moment).
"""
import math

import numpy as np


def nearest_code(x: float, table: np.ndarray) -> int:
    """Index of the table value nearest to x; of two equally near, the larger (the last)."""
    d = np.abs(x - table)
    return int(len(table) - 1 - np.argmin(d[::-1]))


def adamw8bit_step(p, g, m_codes, m_absmax, v_codes, v_absmax, map1, map2, *, block, step, lr, beta1, beta2,
                   eps, weight_decay):
    """p, g: float64 [n]; codes: int [blocks * block]; absmax: float64 [blocks]; maps: float64 [256].
    Returns new (p, m_codes, m_absmax, v_codes, v_absmax)."""
    p, m_codes, v_codes = p.copy(), m_codes.copy(), v_codes.copy()
    m_absmax, v_absmax = m_absmax.copy(), v_absmax.copy()
    n = len(p)
    for b in range(len(m_absmax)):
        idx = range(b * block, min((b + 1) * block, n))
        m = {j: map1[m_codes[j]] * m_absmax[b] for j in idx}
        v = {j: map2[v_codes[j]] * v_absmax[b] for j in idx}
        for j in idx:
            p[j] *= 1 - lr * weight_decay
            m[j] = beta1 * m[j] + (1 - beta1) * g[j]
            v[j] = beta2 * v[j] + (1 - beta2) * g[j] ** 2
            m_hat = m[j] / (1 - beta1 ** step)
            v_hat = v[j] / (1 - beta2 ** step)
            p[j] -= lr * m_hat / (math.sqrt(v_hat) + eps)
        m_absmax[b] = max(abs(x) for x in m.values())
        v_absmax[b] = max(v.values())
        for j in idx:
            m_codes[j] = nearest_code(m[j] / m_absmax[b] if m_absmax[b] else 0.0, map1)
            v_codes[j] = nearest_code(v[j] / v_absmax[b] if v_absmax[b] else 0.0, map2)
            if v[j] > 0 and map2[v_codes[j]] == 0:
                v_codes[j] = int(np.flatnonzero(map2 > 0)[0])
    return p, m_codes, m_absmax, v_codes, v_absmax
