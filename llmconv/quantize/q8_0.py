"""q8_0: blocks of 32 weights as fp16 scale d + 32 x int8 (34 bytes).

Matches ggml's quantize_row_q8_0_ref (what llama-quantize uses without an imatrix):

    amax = max |x|;  d = amax / 127;  id = d ? 1/d : 0;  q = (int8) roundf(x * id)

in float32, d stored rounded to fp16 (nearest even), roundf rounding half away from zero.
Checked against llama.cpp 0.3.36's libggml-base (llama-cpp-python, x86-64): the reference
code there is plain SSE2 (`divss` by 127, a `roundf` call, `cvttss2si`), so there is no
fused multiply-add to emulate; tests/test_quant_kernels.py compares bytes with that build.
When d is a subnormal so small that 1/d overflows, x*id is inf/NaN and the C conversion
yields 0 for every weight; we write those zeros explicitly.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import _blocks as B_

TYPE_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][1]  # 34 bytes per block
# roundf(y) == trunc(y + copysign(0.49999997f, y)) for every float32 |y| < 2**23: adding the
# largest float below 1/2 can only push y across an integer when y's fraction is >= 1/2
# (at |y| == 0.5 the sum is exactly halfway and rounds up to 1.0, as roundf does).
_HALF_BELOW = np.float32(0.49999997).view(np.uint32)
_SIGN = np.uint32(0x80000000)


def _kernel(xb: np.ndarray, out: np.ndarray) -> None:
    lanes = B_.to_lanes(xb)
    mx, mn = B_.block_max(lanes), B_.block_min(lanes)
    amax = np.maximum(np.abs(mx), np.abs(mn))  # +0.0 for an all-zero block, as ggml
    d = amax / np.float32(127)
    inv = B_.reciprocal(d)
    B_.check(mx, mn, d)

    y = np.multiply(lanes, B_.per_lane(inv), out=lanes)
    half = B_.scratch("half", y.shape, np.uint32)
    np.bitwise_and(y.view(np.uint32), _SIGN, out=half)
    half |= _HALF_BELOW
    y += half.view(np.float32)
    codes = B_.scratch("codes", y.shape, np.int8)
    np.copyto(codes, y, casting="unsafe")  # truncates toward zero
    dead = np.isinf(inv)
    if dead.any():
        codes.reshape(8, -1, 4)[:, dead] = 0

    B_.put_u16(out, 0, B_.fp16_bits32(d).astype(np.uint16))
    B_.put_words(out, 2, codes.view(np.uint32).reshape(8, -1))


def quantize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return B_.quantize_rows(x, TYPE_SIZE, _kernel, out)


def _dequantize(blocks: np.ndarray) -> np.ndarray:
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return blocks[:, 2:].view(np.int8).astype(np.float32) * d


def dequantize(b: np.ndarray) -> np.ndarray:
    return B_.dequantize_rows(b, TYPE_SIZE, _dequantize)
