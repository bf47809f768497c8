"""q6_K: 256 weights in 16 groups of 16, w = d * scale[g] * (q - 32), q 6-bit, scale int8.

Block (210 bytes): ql[128] low 4 bits, qh[64] high 2 bits, scales[16] int8, d fp16.
Follows llama.cpp's quantize_row_q6_K_ref (what llama-quantize runs without an imatrix).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ._blocks import scratch
from .k_common import (
    F32,
    GROUP_MAX_EPS,
    element_major,
    first_absmax,
    fp16_bits,
    fp16_value,
    levels_block_major,
    nearest_int,
    over_superblocks,
    quarter_words,
    superblocks,
)
from .k_search import make_qx_quants_rmse1
from .q6_search import search_unweighted

TYPE_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.Q6_K][1]  # 210 bytes per block


_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
_LOW_2BITS = np.uint64(0x0303030303030303)


def _pack_low_nibbles(T: np.ndarray) -> np.ndarray:
    """quarter_words of L -> ql[blocks, 128]: byte 64h + 32k + l = low nibble of L[128h + 32k + l]
    | low nibble of L[128h + 32(k+2) + l] << 4 (k = 0, 1)."""
    ql = np.empty((2, 2) + T.shape[1:], dtype=np.uint64)
    t = np.empty_like(T[0])
    for h in range(2):
        for k in range(2):
            np.bitwise_and(T[4 * h + k], _LOW_NIBBLES, out=ql[h, k])
            np.bitwise_and(T[4 * h + k + 2], _LOW_NIBBLES, out=t)
            t <<= np.uint64(4)
            ql[h, k] |= t
    return np.ascontiguousarray(ql.transpose(2, 0, 1, 3)).view(np.uint8).reshape(-1, 128)


def _pack_high_bits(T: np.ndarray) -> np.ndarray:
    """quarter_words of L -> qh[blocks, 64]: byte 32h + l holds bits 4-5 of L[128h + 32k + l]
    in bits 2k..2k+1."""
    qh = np.zeros((2,) + T.shape[1:], dtype=np.uint64)
    t = np.empty_like(T[0])
    for h in range(2):
        for k in range(4):
            np.right_shift(T[4 * h + k], np.uint64(4), out=t)
            t &= _LOW_2BITS  # bits 4-5 of each byte (the next byte's come in above)
            t <<= np.uint64(2 * k)
            qh[h] |= t
    return np.ascontiguousarray(qh.transpose(1, 0, 2)).view(np.uint8).reshape(-1, 64)


def _quantize_chunk(xb: np.ndarray, qwb: np.ndarray | None = None) -> np.ndarray:
    """qwb: the imatrix weights of these blocks' columns (quantize_row_q6_K_impl weights each
    group's search by them as they are), or None for quantize_row_q6_K_ref (weights x**2)."""
    nb = xb.shape[0]
    xt = element_major(xb, 16, out=scratch("q6_xt", (16, nb * 16), F32))  # [16, nb*16]
    found = search_unweighted(xt) if qwb is None else None
    if found is None:
        group_scale, L_search = make_qx_quants_rmse1(xt, 32, None if qwb is None else element_major(qwb, 16))
    else:
        group_scale, L_search = found
    group_scale = group_scale.reshape(nb, 16)
    max_scale = first_absmax(np.ascontiguousarray(group_scale.T))  # signed, largest |scale|
    empty = np.abs(max_scale) < GROUP_MAX_EPS  # C zeroes the whole block
    iscale = F32(-128.0) / np.where(empty, F32(1.0), max_scale)
    d_bits = fp16_bits(F32(1.0) / iscale)
    q_scales = np.minimum(127, nearest_int(iscale[:, None] * group_scale)).astype(np.int8)

    # requantize against the stored fp16 d and int8 scales
    d = fp16_value(d_bits)[:, None] * q_scales.astype(F32)  # [nb, 16]
    T = quarter_words(levels_block_major(xb, d, -32, 31, L_search))  # 0..63

    out = np.empty((nb, TYPE_SIZE), dtype=np.uint8)
    out[:, 0:128] = _pack_low_nibbles(T)
    out[:, 128:192] = _pack_high_bits(T)
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

    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # [nb, 2, 4, 32]: quarters 0..3
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = ((low | (high << 4)).astype(np.int8) - 32).astype(F32).reshape(nb, 16, 16)
    y = (d * scales) * q  # C: d * sc[is] * q
    return y.reshape(rows, -1)
