"""Importance-weighted q4_0, q4_1, q5_0, q5_1: ggml's quantize_row_q*_impl with quant_weights.

With an imatrix llama.cpp replaces the closed-form legacy quantizers by a search per 32-weight
block, weighted by

    weight[j] = qw[j] * sqrt(sigma2 + x[j]**2)      sigma2 = sum(x**2) / n over the whole row

q4_0/q5_0 take the weighted make_qx_quants (symmetric, nmax 8/16), q4_1/q5_1 make_qkx3_quants
(scale and min, 37 steps); d and m are stored as fp16 as found (no requantization). q8_0 ignores
the imatrix in llama.cpp, so it has no weighted variant. Without an imatrix llama.cpp takes
the *_ref path (q4_0.py ... q5_1.py).
"""

from __future__ import annotations

import numpy as np

from ._blocks import QK, NonFiniteError
from .k_common import F32, seq_sum_from_zero
from .k_search import make_qkx2_quants, make_qx_quants_rmse1

ROWS_BLOCKS = 8192  # blocks per numpy pass: keeps the [32, blocks] temporaries in cache


def _row_sigma2(x: np.ndarray) -> np.ndarray:
    """C: `float sum_x2 = 0; for (j < n) sum_x2 += x[j]*x[j]; sigma2 = sum_x2/n` per row."""
    xx = np.ascontiguousarray((x * x).T)  # [n, rows]
    return seq_sum_from_zero(xx) / F32(x.shape[1])


def _search(x: np.ndarray, qw: np.ndarray, nmax: int, with_min: bool):
    """x[rows, n] -> (d float32[blocks], m float32[blocks] or None, L uint8[blocks, 32])."""
    rows, n = x.shape
    sigma2 = np.repeat(_row_sigma2(x), n // QK)[None, :]
    xt = np.ascontiguousarray(x.reshape(-1, QK).T)  # [32, blocks]
    qwt = np.tile(qw.reshape(-1, QK).T, (1, rows))
    weights = qwt * np.sqrt(sigma2 + xt * xt)
    if with_min:
        d, the_min, L = make_qkx2_quants(xt, weights, nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False)
        return d, -the_min, L.T
    d, L = make_qx_quants_rmse1(xt, nmax, weights)
    return d, None, L.T


def _fp16(v: np.ndarray, rows_per: int, start_row: int) -> np.ndarray:
    h = v.astype(np.float16)
    bad = ~np.isfinite(h)
    if bad.any():
        raise NonFiniteError(start_row + int(np.argmax(bad)) // rows_per, "scale overflows fp16")
    return h


def _nibbles(L: np.ndarray) -> np.ndarray:
    return (L[:, :16] & 0xF) | ((L[:, 16:] & 0xF) << 4)


def _high_bits(L: np.ndarray) -> np.ndarray:
    """qh: bit j = bit 4 of L[j], as 4 little-endian bytes."""
    return np.packbits((L >> 4) & 1, axis=1, bitorder="little")


def _quantize(x: np.ndarray, qw: np.ndarray, kind: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=F32)
    shape = x.shape
    n = shape[-1]
    if n % QK:
        raise ValueError(f"row length {n} is not a multiple of {QK}")
    x = x.reshape(-1, n)
    qw = np.ascontiguousarray(qw, dtype=F32).reshape(n)
    nmax = {"q4_0": 8, "q5_0": 16, "q4_1": 15, "q5_1": 31}[kind]
    with_min = kind in ("q4_1", "q5_1")
    five = kind in ("q5_0", "q5_1")
    type_size = 2 + (2 if with_min else 0) + (4 if five else 0) + 16
    per_row = n // QK
    out = np.empty((x.shape[0], per_row, type_size), np.uint8)
    step = max(1, ROWS_BLOCKS // per_row)
    with np.errstate(all="ignore"):
        for r0 in range(0, x.shape[0], step):
            d, m, L = _search(x[r0 : r0 + step], qw, nmax, with_min)
            o = out[r0 : r0 + step].reshape(-1, type_size)
            o[:, 0:2] = _fp16(d, per_row, r0).reshape(-1, 1).view(np.uint8)
            pos = 2
            if with_min:
                o[:, 2:4] = _fp16(m, per_row, r0).reshape(-1, 1).view(np.uint8)
                pos = 4
            if five:
                o[:, pos : pos + 4] = _high_bits(L)
                pos += 4
            o[:, pos:] = _nibbles(L)
    return out.reshape(*shape[:-1], per_row * type_size)


def q4_0_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return _quantize(x, qw, "q4_0")


def q4_1_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return _quantize(x, qw, "q4_1")


def q5_0_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return _quantize(x, qw, "q5_0")


def q5_1_weighted(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    return _quantize(x, qw, "q5_1")
