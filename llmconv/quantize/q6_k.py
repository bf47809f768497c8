"""q6_K: 256 weights in 16 groups of 16, w = d * scale[g] * (q - 32), q 6-bit, scale int8.

Block (210 bytes): ql[128] low 4 bits, qh[64] high 2 bits, scales[16] int8, d fp16.
Follows llama.cpp's quantize_row_q6_K_ref (what llama-quantize runs without an imatrix).
"""
from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .k_common import (F32, GROUP_MAX_EPS, block_major, element_major, first_absmax, fp16_bits, fp16_value,
                       nearest_int, nearest_int_clip, over_superblocks, superblocks)
from .k_search import make_qx_quants_rmse1

TYPE_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K][1]     # 210 bytes per block


def _quantize_chunk(xb: np.ndarray, qwb: np.ndarray | None = None) -> np.ndarray:
    """qwb: the imatrix weights of these blocks' columns (quantize_row_q6_K_impl weights each
    group's search by them as they are), or None for quantize_row_q6_K_ref (weights x**2)."""
    nb = xb.shape[0]
    xt = element_major(xb, 16)                               # [16, nb*16]
    group_scale, L_search = make_qx_quants_rmse1(xt, 32, None if qwb is None else element_major(qwb, 16))
    group_scale = group_scale.reshape(nb, 16)

    max_scale = first_absmax(np.ascontiguousarray(group_scale.T))                  # signed, largest |scale|
    empty = np.abs(max_scale) < GROUP_MAX_EPS                # C zeroes the whole block
    iscale = F32(-128.0) / np.where(empty, F32(1.0), max_scale)
    d_bits = fp16_bits(F32(1.0) / iscale)
    q_scales = np.minimum(127, nearest_int(iscale[:, None] * group_scale)).astype(np.int8)

    # requantize against the stored fp16 d and int8 scales
    d = (fp16_value(d_bits)[:, None] * q_scales.astype(F32)).reshape(1, -1)   # [1, nb*16]
    L_new = nearest_int_clip(xt / d, -32, 31)
    L_new += 32
    L_new = L_new.astype(np.uint8)
    L = np.where(d != 0, L_new, L_search)                   # d == 0: C keeps the search's L
    L = block_major(L, nb)

    q = L.reshape(nb, 2, 4, 32)
    ql = (q[:, :, 0:2] & 0xF) | ((q[:, :, 2:4] & 0xF) << 4)  # [nb, 2, 2, 32]
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)

    out = np.empty((nb, TYPE_SIZE), dtype=np.uint8)
    out[:, 0:128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = q_scales.view(np.uint8)
    out[:, 208:210] = d_bits.reshape(nb, 1).view(np.uint8)
    out[empty] = 0
    return out


quantize_chunk_weighted = _quantize_chunk


def quantize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32[rows, n] -> uint8[rows, n // 256 * 210]."""
    return over_superblocks(x, TYPE_SIZE, _quantize_chunk, out)


def dequantize(b: np.ndarray) -> np.ndarray:
    """uint8[rows, nbytes] -> float32[rows, nbytes // 210 * 256] (dequantize_row_q6_K)."""
    rows, blk = superblocks(b, TYPE_SIZE)
    nb = blk.shape[0]
    ql = blk[:, 0:128].reshape(nb, 2, 2, 32)
    qh = blk[:, 128:192].reshape(nb, 2, 1, 32)
    scales = blk[:, 192:208].view(np.int8).astype(F32).reshape(nb, 16, 1)
    d = fp16_value(blk[:, 208:210].copy().view(np.uint16)).reshape(nb, 1, 1)

    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)         # [nb, 2, 4, 32]: quarters 0..3
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = ((low | (high << 4)).astype(np.int8) - 32).astype(F32).reshape(nb, 16, 16)
    y = (d * scales) * q                                       # C: d * sc[is] * q
    return y.reshape(rows, -1)
