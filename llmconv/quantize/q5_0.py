"""q5_0: blocks of 32 weights as fp16 d + 4 bytes qh + 16 bytes qs (22 bytes).

Codes are 5 bits: the low 4 bits pack like q4_0 (weight j low nibble, j+16 high nibble of
byte j), bit 4 of weight j's code is bit j of the little-endian uint32 qh. Matches ggml's
quantize_row_q5_0_ref bit for bit: same as q4_0 with d = max / -16 and
q = MIN(31, (int8)(w*id + 16.5f)), multiply and add rounded separately (no FMA in the
llama-cpp-python x86-64 build; see q4_0.py for how that was established).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import _blocks as B_
from .q4_0 import quantize_codes

TYPE_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_0][1]  # 22 bytes per block


def _kernel(xb: np.ndarray, out: np.ndarray) -> None:
    d16, codes = quantize_codes(xb, -16.0, 16.5, 31)
    B_.put_u16(out, 0, d16)
    B_.put_words(out, 2, B_.high_bits(codes)[None, :])
    B_.put_words(out, 6, B_.pack_nibbles(codes, mask=True))


def quantize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return B_.quantize_rows(x, TYPE_SIZE, _kernel, out)


def codes5(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """qh uint8 [B, 4], qs uint8 [B, 16] -> uint8 [B, 32] 5-bit codes."""
    bits = np.unpackbits(qh, axis=1, bitorder="little")  # [B, 32], bit j of weight j
    low = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)
    return low | (bits << np.uint8(4))


def _dequantize(blocks: np.ndarray) -> np.ndarray:
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = codes5(blocks[:, 2:6], blocks[:, 6:]).astype(np.int8) - np.int8(16)
    return q.astype(np.float32) * d


def dequantize(b: np.ndarray) -> np.ndarray:
    return B_.dequantize_rows(b, TYPE_SIZE, _dequantize)
