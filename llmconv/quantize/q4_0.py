"""q4_0: blocks of 32 weights as fp16 scale d + 16 bytes of 4-bit codes (18 bytes).

Byte j holds weight j in its low nibble and weight j+16 in its high nibble. Matches ggml's
quantize_row_q4_0_ref bit for bit:

    max = the signed weight of largest |w| (the first one on a tie, +0.0 for an all-zero block)
    d = max / -8;  id = d ? 1/d : 0;  q = MIN(15, (int8)(w*id + 8.5f))

all in float32, d stored rounded to fp16. The weight `max` itself gets code 0.

FMA: `w*id + 8.5f` gives a different code for some weights if the compiler fuses it into one
rounding. The build matched here is llama-cpp-python 0.3.36 on x86-64 (pip source build):
its quantize_row_q4_0_ref lives in libggml-base.so, which is compiled without -march flags,
and `objdump -d` shows `mulps` then `addps` (no vfmadd in any of the q4_0/q4_1/q5_0/q5_1/q8_0
reference routines), so we round after the multiply and again after the add. The oracle test
in tests/test_quant_kernels.py (llama_model_quantize on bf16-grid data) confirms byte equality.
When 1/d overflows (d a tiny subnormal) the C conversion of inf/NaN gives code 0 everywhere.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import _blocks as B_

TYPE_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0][1]  # 18 bytes per block


def signed_absmax(xb: np.ndarray, mx: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """ggml's `max` for q4_0/q5_0: the weight of largest magnitude, first one on a tie."""
    neg = -mn
    vmax = B_.select(neg > mx, mn, mx)
    tie = np.flatnonzero(neg == mx)  # +a and -a both present, or all zero
    if tie.size:
        amax = mx[tie]
        first = B_.first_signed(xb, tie, amax)
        vmax[tie] = np.where(amax == 0, np.float32(0.0), first)
    return vmax


def quantize_codes(xb: np.ndarray, divisor: float, offset: float, top: int):
    """Shared by q4_0 and q5_0: returns (fp16 bits of d as uint16 [B], codes uint8 [8, 4B] in lanes order)."""
    lanes = B_.to_lanes(xb)
    mx, mn = B_.block_max(lanes), B_.block_min(lanes)
    vmax = signed_absmax(xb, mx, mn)
    d = vmax / np.float32(divisor)
    inv = B_.reciprocal(d)
    B_.check(mx, mn, d)

    y = np.multiply(lanes, B_.per_lane(inv), out=lanes)
    y += np.float32(offset)
    codes = B_.scratch("codes", y.shape, np.uint8)
    np.copyto(codes, y, casting="unsafe")  # y > 0 here, so this is (int8) truncation
    B_.clamp_codes(codes, top)  # MIN(top, .)
    dead = np.isinf(inv)
    if dead.any():
        codes.reshape(8, -1, 4)[:, dead] = 0
    return B_.fp16_bits32(d).astype(np.uint16), codes


def _kernel(xb: np.ndarray, out: np.ndarray) -> None:
    d16, codes = quantize_codes(xb, -8.0, 8.5, 15)
    B_.put_u16(out, 0, d16)
    B_.put_words(out, 2, B_.pack_nibbles(codes, mask=False))


def quantize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return B_.quantize_rows(x, TYPE_SIZE, _kernel, out)


def nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [B, 16] -> uint8 [B, 32] codes (low nibbles first, then high)."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _dequantize(blocks: np.ndarray) -> np.ndarray:
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
    return q.astype(np.float32) * d


def dequantize(b: np.ndarray) -> np.ndarray:
    return B_.dequantize_rows(b, TYPE_SIZE, _dequantize)
