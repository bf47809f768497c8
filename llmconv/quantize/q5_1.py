"""q5_1: blocks of 32 weights as fp16 d, fp16 m, 4 bytes qh, 16 bytes qs (24 bytes).

Like q4_1 with 31 levels: d = (max - min) / 31, q = (uint8)((w - min)*id + 0.5f) (ggml has no
MIN here; the value cannot exceed 31 for a finite id), bits packed as in q5_0. Matches
ggml's quantize_row_q5_1_ref bit for bit on the llama-cpp-python x86-64 build (no FMA; see
q4_0.py and q4_1.py).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import _blocks as B_
from .q4_1 import quantize_codes
from .q5_0 import codes5

TYPE_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_1][1]  # 24 bytes per block


def _kernel(xb: np.ndarray, out: np.ndarray) -> None:
    dm, codes = quantize_codes(xb, 31)
    B_.put_words(out, 0, dm[None, :])
    B_.put_words(out, 4, B_.high_bits(codes)[None, :])
    B_.put_words(out, 8, B_.pack_nibbles(codes, mask=True))


def quantize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return B_.quantize_rows(x, TYPE_SIZE, _kernel, out)


def _dequantize(blocks: np.ndarray) -> np.ndarray:
    dm = blocks[:, :4].copy().view(np.float16).astype(np.float32)
    q = codes5(blocks[:, 4:8], blocks[:, 8:])
    return q.astype(np.float32) * dm[:, :1] + dm[:, 1:]


def dequantize(b: np.ndarray) -> np.ndarray:
    return B_.dequantize_rows(b, TYPE_SIZE, _dequantize)
