"""q4_1: blocks of 32 weights as fp16 d, fp16 m + 16 bytes of 4-bit codes (20 bytes).

Matches ggml's quantize_row_q4_1_ref bit for bit:

    min, max = the block's extremes;  d = (max - min) / 15;  id = d ? 1/d : 0
    q = MIN(15, (int8)((w - min)*id + 0.5f))

in float32 with the *fp32* min and id (only the stored d and m are rounded to fp16). The
subtract, multiply and add are rounded separately: the llama-cpp-python x86-64 build has no
FMA in this routine (see q4_0.py). The MIN never bites for a finite id: (w - min)*id is at
most 15 * (1 + 3 * 2**-24), so no clamp is applied here. If 1/d overflows (d a tiny
subnormal) the C conversion of inf/NaN gives code 0 everywhere. ggml's scan keeps the
first minimum, which only shows in m's sign when the minimum is zero; we take that sign
from the first zero weight.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import _blocks as B_

TYPE_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_1][1]  # 20 bytes per block


def quantize_codes(xb: np.ndarray, levels: int):
    """Shared by q4_1 and q5_1: returns (dm uint32 [B], the blocks' first 4 bytes: fp16 d |
    fp16 m << 16; codes uint8 [8, 4B] in lanes order)."""
    B = xb.shape[0]
    lanes = B_.to_lanes(xb)
    dmi = B_.scratch("dmi", (3, B), np.float32)  # rows d, m, id
    d, m, inv = dmi
    mx = B_.block_max(lanes, out=B_.scratch("mx", (B,), np.float32))
    mn = B_.block_min(lanes, out=m)
    # ggml's d is (max - min) / levels with max and min the same first weight when all are
    # equal: +0.0 then, where numpy may give -0.0 (mixed-sign zeros); d's fp16 sign is never
    # set below, and such blocks get code 0 (ggml's too).
    np.subtract(mx, mn, out=d)
    d /= np.float32(levels)
    # One pass over |d| and |m|'s bits finds every rare case: NaN/inf input, fp16 overflow
    # (>= 65520), fp16 subnormals (< 2**-14, or 1/d overflowing), zeros.
    u = dmi[:2].view(np.uint32)
    a = np.bitwise_and(u, B_.F32_ABS, out=B_.scratch("abs_dm", (2, B), np.uint32))
    lo, hi = a.min(), a.max()
    if not hi < B_.FP16_ROUNDS_TO_INF:
        B_.check(mx, mn, np.abs(d), m)
    if lo == 0 and (mn == 0).any():  # ggml keeps the first minimum: m's sign for a zero
        zero = np.flatnonzero(mn == 0)
        m[zero] = B_.first_equal(xb, zero, mn[zero])
    # ggml: id = d ? 1/d : 0. Where d == 0 (all weights equal) this gives +-inf instead, and
    # those blocks get code 0 below with the ones whose 1/d overflows, as in ggml.
    np.divide(np.float32(1.0), d, out=inv)

    m_lane, inv_lane = B_.per_lane(dmi[1:])
    y = np.subtract(lanes, m_lane, out=lanes)
    y *= inv_lane
    # + 0.5 in float32, then the truncating conversion (the sum is >= 0.5), in one call: numpy
    # rounds the float32 sum first and converts it in its cast loop
    codes = np.add(y, np.float32(0.5), out=B_.scratch("codes", y.shape, np.uint8), dtype=np.float32, casting="unsafe")
    if lo < B_.FP16_NORMAL_EXP:  # only then can d be 0 or 1/d overflow
        dead = np.isinf(inv)
        if dead.any():
            codes.reshape(8, -1, 4)[:, dead] = 0
    return dm_words(dmi[:2], a, lo, hi), codes


def dm_words(dm: np.ndarray, a: np.ndarray, lo, hi) -> np.ndarray:
    """float32 [2, B] (d >= 0, m) -> uint32 [B]: fp16 d | fp16 m << 16. a: |d|, |m|'s bits,
    lo, hi: their min and max (see B_.fp16_magnitude_bits). d's sign bit stays clear."""
    h = B_.fp16_magnitude_bits(a, lo, hi)
    h[1] <<= np.uint32(16)
    h[0] |= h[1]
    h[0] |= np.bitwise_and(dm[1].view(np.uint32), np.uint32(0x80000000), out=h[1])  # m's sign
    return h[0]


def _kernel(xb: np.ndarray, out: np.ndarray) -> None:
    dm, codes = quantize_codes(xb, 15)
    B_.put_words(out, 0, dm[None, :])
    B_.put_words(out, 4, B_.pack_nibbles(codes, mask=False))


def quantize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return B_.quantize_rows(x, TYPE_SIZE, _kernel, out)


def _dequantize(blocks: np.ndarray) -> np.ndarray:
    dm = blocks[:, :4].copy().view(np.float16).astype(np.float32)
    q = np.concatenate([blocks[:, 4:] & np.uint8(0x0F), blocks[:, 4:] >> np.uint8(4)], axis=1)
    return q.astype(np.float32) * dm[:, :1] + dm[:, 1:]


def dequantize(b: np.ndarray) -> np.ndarray:
    return B_.dequantize_rows(b, TYPE_SIZE, _dequantize)
