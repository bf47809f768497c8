"""Float "block" types: f32, f16, bf16 (block size 1), with ggml's rounding.

numpy's float32 -> float16 cast rounds to nearest even, as ggml's FP32->FP16 does.
bf16 follows ggml_compute_fp32_to_bf16: round to nearest even on the top 16 bits,
NaN kept quiet.
"""
from __future__ import annotations

import numpy as np


def f32_quantize(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8)


def f32_dequantize(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float32)


def f16_quantize(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).astype(np.float16).view(np.uint8)


def f16_dequantize(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def bf16_quantize(x: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
    return rounded.view(np.uint8)


def bf16_dequantize(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
