"""q2_K: 256 weights in 16 groups of 16, w = d*sc[g]*q - dmin*m[g], q 2-bit, sc/m 4-bit.

Block (84 bytes): scales[16] (scale in the low nibble, min in the high nibble), qs[64]
(see pack_2bit_quarters), d fp16, dmin fp16. Follows llama.cpp's quantize_row_q2_K_ref
(llama-quantize without an imatrix).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .k_common import (
    F32,
    element_major,
    fp16_bits,
    fp16_value,
    levels_block_major,
    nearest_int,
    over_superblocks,
    pack_2bit_quarters,
    superblocks,
    unpack_2bit_quarters,
)
from .k_search import qkx2_search

TYPE_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.Q2_K][1]  # 84 bytes per block


def _quantize_chunk(xb: np.ndarray) -> np.ndarray:
    nb = xb.shape[0]
    xt = element_major(xb, 16)  # [16, nb*16]
    scale, the_min, L_search = qkx2_search(xt, np.abs(xt), 3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=True)
    scale = scale.reshape(nb, 16)
    the_min = the_min.reshape(nb, 16)
    max_scale = np.maximum(scale.max(axis=1), F32(0.0))  # C: running max from 0
    max_min = np.maximum(the_min.max(axis=1), F32(0.0))

    has_scale = max_scale > 0
    has_min = max_min > 0
    iscale = F32(15.0) / np.where(has_scale, max_scale, F32(1.0))
    imin = F32(15.0) / np.where(has_min, max_min, F32(1.0))
    # C stores nearest_int in a uint8_t and ORs the min in as (l << 4), also truncated to 8 bits
    ls = np.where(has_scale[:, None], nearest_int(iscale[:, None] * scale), 0).astype(np.uint8)
    lm = np.where(has_min[:, None], nearest_int(imin[:, None] * the_min), 0)
    scales = ls | (lm << 4).astype(np.uint8)
    d_bits = np.where(has_scale, fp16_bits(max_scale / F32(15.0)), np.uint16(0)).astype(np.uint16)
    dmin_bits = np.where(has_min, fp16_bits(max_min / F32(15.0)), np.uint16(0)).astype(np.uint16)

    d = fp16_value(d_bits)[:, None] * (scales & 0xF).astype(F32)  # [nb, 16]
    dm = fp16_value(dmin_bits)[:, None] * (scales >> 4).astype(F32)
    L = levels_block_major(xb, d, 0, 3, L_search, dm=dm)  # d == 0: keep the search's L

    out = np.empty((nb, TYPE_SIZE), dtype=np.uint8)
    out[:, 0:16] = scales
    out[:, 16:80] = pack_2bit_quarters(L)
    out[:, 80:82] = d_bits.reshape(nb, 1).view(np.uint8)
    out[:, 82:84] = dmin_bits.reshape(nb, 1).view(np.uint8)
    return out


def quantize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32[rows, n] -> uint8[rows, n // 256 * 84]."""
    return over_superblocks(x, TYPE_SIZE, _quantize_chunk, out)


def dequantize(b: np.ndarray) -> np.ndarray:
    """uint8[rows, nbytes] -> float32[rows, nbytes // 84 * 256] (dequantize_row_q2_K)."""
    rows, blk = superblocks(b, TYPE_SIZE)
    nb = blk.shape[0]
    scales = blk[:, 0:16]
    d = fp16_value(blk[:, 80:82].copy().view(np.uint16)).reshape(nb, 1)
    dmin = fp16_value(blk[:, 82:84].copy().view(np.uint16)).reshape(nb, 1)
    dl = (d * (scales & 0xF).astype(F32))[:, :, None]  # C: dl*q - ml
    ml = (dmin * (scales >> 4).astype(F32))[:, :, None]
    q = unpack_2bit_quarters(blk[:, 16:80]).astype(F32).reshape(nb, 16, 16)
    return (dl * q - ml).reshape(rows, -1)
