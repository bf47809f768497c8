"""The scale/min half shared by q4_K and q5_K: 8 groups of 32 weights, w ~ d*sc*q - dmin*m.

Per group, make_qkx2_quants picks a scale and a min with weights av_x + |x|; the 8 scales and
8 mins are then quantized to 6 bits against the block's largest (d = max/63 in fp16), and
every weight is requantized against the stored values, as quantize_row_q{4,5}_K_ref do.
"""

from __future__ import annotations

import numpy as np

from .k_common import (
    F32,
    element_major,
    fp16_bits,
    fp16_value,
    levels_block_major,
    nearest_int,
    pack_scale_min_k4,
    seq_sum_of_products,
    unpack_scale_min_k4,
)
from .k_search import qkx2_search


def quantize_scale_min(xb: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """[nb, 256] -> (d fp16 bits[nb], dmin fp16 bits[nb], scales uint8[nb, 12], L uint8[nb, 256])."""
    nb = xb.shape[0]
    xt = element_major(xb, 32)  # [32, nb*8]
    av_x = np.sqrt(seq_sum_of_products(xt, xt) / F32(32))  # C: sum_x2 = 0; sum_x2 += x*x
    weights = av_x + np.abs(xt)
    scale, the_min, L_search = qkx2_search(xt, weights, nmax, rmin, rdelta, nstep, use_mad=False)
    scale = scale.reshape(nb, 8)
    the_min = the_min.reshape(nb, 8)

    # C: running max with `>` starting at 0, so never below 0
    max_scale = np.maximum(scale.max(axis=1), F32(0.0))
    max_min = np.maximum(the_min.max(axis=1), F32(0.0))
    inv_scale = np.where(max_scale > 0, F32(63.0) / np.where(max_scale > 0, max_scale, F32(1.0)), F32(0.0))
    inv_min = np.where(max_min > 0, F32(63.0) / np.where(max_min > 0, max_min, F32(1.0)), F32(0.0))
    # C stores nearest_int into a uint8_t, then clamps to 63
    ls = np.minimum(nearest_int(inv_scale[:, None] * scale).astype(np.uint8), 63)
    lm = np.minimum(nearest_int(inv_min[:, None] * the_min).astype(np.uint8), 63)
    d_bits = fp16_bits(max_scale / F32(63.0))
    dmin_bits = fp16_bits(max_min / F32(63.0))

    # requantize against the stored values (ls/lm survive the 6-bit packing unchanged);
    # d == 0: C keeps the search's L
    d = fp16_value(d_bits)[:, None] * ls.astype(F32)  # [nb, 8]
    dm = fp16_value(dmin_bits)[:, None] * lm.astype(F32)
    L = levels_block_major(xb, d, 0, nmax, L_search, dm=dm)
    return d_bits, dmin_bits, pack_scale_min_k4(ls, lm), L


def dequantize_scale_min(head: np.ndarray, q: np.ndarray) -> np.ndarray:
    """head = the block's first 16 bytes (d, dmin, scales[12]); q[nb, 8, 32] levels -> float32[nb, 256]."""
    nb = head.shape[0]
    head = np.ascontiguousarray(head)
    d = fp16_value(head[:, 0:2].copy().view(np.uint16)).reshape(nb, 1)
    dmin = fp16_value(head[:, 2:4].copy().view(np.uint16)).reshape(nb, 1)
    sc, mn = unpack_scale_min_k4(head[:, 4:16])
    d1 = (d * sc.astype(F32))[:, :, None]  # C: d1 = d * sc; y = d1*q - m1
    m1 = (dmin * mn.astype(F32))[:, :, None]
    return (d1 * q.astype(F32) - m1).reshape(nb, 256)
