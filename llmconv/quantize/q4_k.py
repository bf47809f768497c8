"""q4_K: 256 weights in 8 groups of 32, w = d*sc[g]*q - dmin*m[g], q 4-bit, sc/m 6-bit.

Block (144 bytes): d fp16, dmin fp16, scales[12] (6-bit scales and mins, see
pack_scale_min_k4), qs[128]: byte 32*c + l holds weight 64c + l (low nibble) and 64c + 32 + l
(high nibble). Follows llama.cpp's quantize_row_q4_K_ref (llama-quantize without an imatrix).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .k_common import over_superblocks, superblocks
from .k_scale_min import dequantize_scale_min, quantize_scale_min

TYPE_SIZE = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K][1]  # 144 bytes per block
NMAX = 15


def _quantize_chunk(xb: np.ndarray) -> np.ndarray:
    nb = xb.shape[0]
    d_bits, dmin_bits, scales, L = quantize_scale_min(xb, NMAX, rmin=-1.0, rdelta=0.1, nstep=20)
    q = L.reshape(nb, 4, 2, 32)
    out = np.empty((nb, TYPE_SIZE), dtype=np.uint8)
    out[:, 0:2] = d_bits.reshape(nb, 1).view(np.uint8)
    out[:, 2:4] = dmin_bits.reshape(nb, 1).view(np.uint8)
    out[:, 4:16] = scales
    out[:, 16:144] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    return out


def quantize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32[rows, n] -> uint8[rows, n // 256 * 144]."""
    return over_superblocks(x, TYPE_SIZE, _quantize_chunk, out)


def dequantize(b: np.ndarray) -> np.ndarray:
    """uint8[rows, nbytes] -> float32[rows, nbytes // 144 * 256] (dequantize_row_q4_K)."""
    rows, blk = superblocks(b, TYPE_SIZE)
    nb = blk.shape[0]
    qs = blk[:, 16:144].reshape(nb, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(nb, 8, 32)
    return dequantize_scale_min(blk[:, 0:16], q).reshape(rows, -1)
