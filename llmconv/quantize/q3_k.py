"""q3_K: 256 weights in 16 groups of 16, w = d * (sc[g] - 32) * (q - 4), q 3-bit, sc 6-bit.

Block (110 bytes): hmask[32] (bit k of byte l: 3rd bit of weight 32k + l), qs[64] low 2 bits
(see pack_2bit_quarters), scales[12] (6-bit scales: low nibbles in bytes 0-7, top 2 bits in
bytes 8-11), d fp16. Follows llama.cpp's quantize_row_q3_K_ref (llama-quantize without an imatrix).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .k_common import (
    F32,
    fast_clip,
    first_absmax,
    fp16_bits,
    fp16_value,
    levels_block_major,
    nearest_int,
    over_superblocks,
    pack_2bit_words,
    quarter_words,
    superblocks,
    unpack_2bit_quarters,
)
from . import q3_search

TYPE_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.Q3_K][1]  # 110 bytes per block
# 1M weights per chunk, 4x k_common's (what the engine passes per call anyway): make_q3_quants's
# descent (q3_search.descend) runs in rounds over the whole chunk's changing groups, in numpy
# calls whose cost is partly per call; with 1024 super-blocks the kernel took ~18 % more time.
CHUNK_SUPERBLOCKS = 4096
_BITS = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
_BIT0_OF_EACH_BYTE = np.uint64(0x0101010101010101)
_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
_TOP_BITS = np.uint64(0x0303030303030303)  # bits 4-5 of each byte, shifted down


def pack_scales(ls: np.ndarray) -> np.ndarray:
    """16 six-bit scales per block -> 12 bytes: byte j < 8 holds the low nibbles of scales j
    (bits 0-3) and j+8 (bits 4-7); byte 8+k, bits 2t..2t+1: the top 2 bits of scale 4t + k.

    On the 16 scales as two uint64 words per block, 8 bytes per operation (numpy's uint8
    operations on [blocks, 8] slices run one short loop per block)."""
    nb = ls.shape[0]
    w = np.ascontiguousarray(ls, dtype=np.uint8).view(np.uint64).reshape(nb, 2)
    lo, hi = w[:, 0], w[:, 1]  # scales 0-7, 8-15
    out = np.empty((nb, 12), dtype=np.uint8)
    low = np.bitwise_and(hi, _LOW_NIBBLES)
    low <<= np.uint64(4)
    low |= lo & _LOW_NIBBLES
    out[:, 0:8] = low.view(np.uint8).reshape(nb, 8)
    # top 2 bits: byte k of t (scales k, 4 + k, 8 + k, 12 + k in bits 0-1, 32-33, 4-5, 36-37
    # of its word), then the upper half moved down by 30 onto bits 2-3 and 6-7
    t = np.right_shift(hi, np.uint64(4))
    t &= _TOP_BITS
    t <<= np.uint64(4)
    t |= np.right_shift(lo, np.uint64(4)) & _TOP_BITS
    t |= t >> np.uint64(30)
    out[:, 8:12] = t.view(np.uint8).reshape(nb, 8)[:, 0:4]
    return out


def unpack_scales(s: np.ndarray) -> np.ndarray:
    """12 bytes -> 16 six-bit scales (uint8, 0..63)."""
    nb = s.shape[0]
    low = np.concatenate([s[:, 0:8] & 0xF, s[:, 0:8] >> 4], axis=1)
    top = (s[:, None, 8:12] >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & 3
    return low | (top.reshape(nb, 16) << 4)


def high_bit_words(T: np.ndarray) -> np.ndarray:
    """quarter_words of L in 0..7 -> hmask[blocks, 32]: bit m of byte l is bit 2 of L[32m + l]."""
    h = np.empty_like(T[0])
    t = np.empty_like(T[0])
    for m in range(8):
        np.right_shift(T[m], np.uint64(2), out=t)
        t &= _BIT0_OF_EACH_BYTE
        if m == 0:
            h[...] = t
        else:
            t <<= np.uint64(m)
            h |= t
    return h.view(np.uint8).reshape(-1, 32)


def _quantize_chunk(xb: np.ndarray) -> np.ndarray:
    nb = xb.shape[0]
    group_scale, L_search = q3_search.search(xb.reshape(-1, 16))
    group_scale = group_scale.reshape(nb, 16)

    max_scale = first_absmax(np.ascontiguousarray(group_scale.T))
    has_scale = max_scale != 0
    iscale = F32(-32.0) / np.where(has_scale, max_scale, F32(1.0))
    # C: int8_t l = nearest_int(iscale*scales[j]); l = MAX(-32, MIN(31, l)) + 32
    ls = nearest_int(np.multiply(group_scale, np.repeat(iscale, 16).reshape(nb, 16))).astype(np.int8)
    fast_clip(ls, np.int8(-32), np.int8(31), out=ls)
    ls += np.int8(32)
    ls = ls.view(np.uint8)
    ls[~has_scale] = 0
    scales = pack_scales(ls)
    d_bits = np.where(has_scale, fp16_bits(F32(1.0) / iscale), np.uint16(0)).astype(np.uint16)

    # requantize against the stored scales (ls is what unpack_scales(scales) gives back)
    d = fp16_value(d_bits)[:, None] * (ls.astype(np.int8) - np.int8(32)).astype(F32)  # C: d_all * (sc - 32)
    L = levels_block_major(xb, d, -4, 3, L_search)  # 0..7
    T = quarter_words(L)
    hmask = high_bit_words(T)

    out = np.empty((nb, TYPE_SIZE), dtype=np.uint8)
    out[:, 0:32] = hmask
    out[:, 32:96] = pack_2bit_words(T)  # bits 0-1: L - 4 where L > 3
    out[:, 96:108] = scales
    out[:, 108:110] = d_bits.reshape(nb, 1).view(np.uint8)
    return out


def quantize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32[rows, n] -> uint8[rows, n // 256 * 110]."""
    return over_superblocks(x, TYPE_SIZE, _quantize_chunk, out, chunk=CHUNK_SUPERBLOCKS)


def dequantize(b: np.ndarray) -> np.ndarray:
    """uint8[rows, nbytes] -> float32[rows, nbytes // 110 * 256] (dequantize_row_q3_K)."""
    rows, blk = superblocks(b, TYPE_SIZE)
    nb = blk.shape[0]
    hm = blk[:, 0:32].reshape(nb, 1, 32)
    high = ((hm >> _BITS) & 1).reshape(nb, 256)
    q = unpack_2bit_quarters(blk[:, 32:96]).astype(np.int8) - np.where(high == 1, 0, 4).astype(np.int8)
    sc = unpack_scales(blk[:, 96:108]).astype(np.int8) - np.int8(32)
    d = fp16_value(blk[:, 108:110].copy().view(np.uint16)).reshape(nb, 1)
    dl = (d * sc.astype(F32))[:, :, None]  # C: dl = d_all * (sc - 32)
    return (dl * q.astype(F32).reshape(nb, 16, 16)).reshape(rows, -1)
