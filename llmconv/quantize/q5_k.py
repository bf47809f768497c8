"""q5_K: 256 weights in 8 groups of 32, w = d*sc[g]*q - dmin*m[g], q 5-bit, sc/m 6-bit.

Block (176 bytes): d fp16, dmin fp16, scales[12] (see pack_scale_min_k4), qh[32]: bit k of
byte l is the 5th bit of weight 32k + l, qs[128]: low 4 bits laid out as in q4_K.
Follows llama.cpp's quantize_row_q5_K_ref (llama-quantize without an imatrix).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .k_common import over_superblocks, superblocks
from .k_scale_min import dequantize_scale_min, quantize_scale_min

TYPE_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.Q5_K][1]  # 176 bytes per block
NMAX = 31
_BITS = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)


def _quantize_chunk(xb: np.ndarray) -> np.ndarray:
    nb = xb.shape[0]
    d_bits, dmin_bits, scales, L = quantize_scale_min(xb, NMAX, rmin=-0.5, rdelta=0.1, nstep=15)
    groups = L.reshape(nb, 8, 32)
    qh = np.bitwise_or.reduce((groups >> 4) << _BITS, axis=1)  # [nb, 32]
    low = (L & 0xF).reshape(nb, 4, 2, 32)
    out = np.empty((nb, TYPE_SIZE), dtype=np.uint8)
    out[:, 0:2] = d_bits.reshape(nb, 1).view(np.uint8)
    out[:, 2:4] = dmin_bits.reshape(nb, 1).view(np.uint8)
    out[:, 4:16] = scales
    out[:, 16:48] = qh
    out[:, 48:176] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    return out


def quantize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32[rows, n] -> uint8[rows, n // 256 * 176]."""
    return over_superblocks(x, TYPE_SIZE, _quantize_chunk, out)


def dequantize(b: np.ndarray) -> np.ndarray:
    """uint8[rows, nbytes] -> float32[rows, nbytes // 176 * 256] (dequantize_row_q5_K)."""
    rows, blk = superblocks(b, TYPE_SIZE)
    nb = blk.shape[0]
    qh = blk[:, 16:48].reshape(nb, 1, 32)
    qs = blk[:, 48:176].reshape(nb, 4, 1, 32)
    low = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(nb, 8, 32)
    q = low | (((qh >> _BITS) & 1) << 4)
    return dequantize_scale_min(blk[:, 0:16], q).reshape(rows, -1)
