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
    """Shared by q4_1 and q5_1: returns (d16, m16, codes uint8 [8, 4B] in lanes order)."""
    lanes = B_.to_lanes(xb)
    mx, mn = B_.block_max(lanes), B_.block_min(lanes)
    # max - min is +0.0 when all weights are equal (ggml: x0 - x0); abs turns numpy's
    # possible -0.0 (from mixed-sign zeros) into that.
    d = np.abs(mx - mn) / np.float32(levels)
    inv = B_.reciprocal(d)
    m = mn.copy()
    zero = np.flatnonzero(mn == 0)
    if zero.size:
        m[zero] = B_.first_equal(xb, zero, mn[zero])
    B_.check(mx, mn, d, m)

    y = np.subtract(lanes, B_.per_lane(m), out=lanes)
    y *= B_.per_lane(inv)
    y += np.float32(0.5)
    codes = B_.scratch("codes", y.shape, np.uint8)
    np.copyto(codes, y, casting="unsafe")  # y >= 0.5: truncation
    dead = np.isinf(inv)
    if dead.any():
        codes.reshape(8, -1, 4)[:, dead] = 0
    return d.astype(np.float16), m.astype(np.float16), codes


def _kernel(xb: np.ndarray, out: np.ndarray) -> None:
    d16, m16, codes = quantize_codes(xb, 15)
    B_.put_u16(out, 0, d16)
    B_.put_u16(out, 2, m16)
    B_.put_words(out, 4, B_.pack_nibbles(codes, mask=False))


def quantize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return B_.quantize_rows(x, TYPE_SIZE, _kernel, out)


def _dequantize(blocks: np.ndarray) -> np.ndarray:
    dm = blocks[:, :4].copy().view(np.float16).astype(np.float32)
    q = np.concatenate([blocks[:, 4:] & np.uint8(0x0F), blocks[:, 4:] >> np.uint8(4)], axis=1)
    return q.astype(np.float32) * dm[:, :1] + dm[:, 1:]


def dequantize(b: np.ndarray) -> np.ndarray:
    return B_.dequantize_rows(b, TYPE_SIZE, _dequantize)
