"""Float "block" types: f32, f16, bf16 (block size 1), with ggml's rounding.

Both casts round to nearest even, as ggml's FP32->FP16 and ggml_compute_fp32_to_bf16 do.
torch's casts are used because they are 5-7x faster than numpy's here (f16: 1100 vs 200
M/s on one core); tests/test_floats.py checks them bit for bit against numpy's f16 cast and
against ggml's bf16 rule on every class of float32 (normals, subnormals, overflow, ties).
NaN never reaches these casts: quantize_tensor rejects non-finite input first.
"""
from __future__ import annotations

import numpy as np
import torch


def f32_quantize(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8)


def f32_dequantize(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float32)


def f16_quantize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return torch.from_numpy(x).to(torch.float16).numpy().view(np.uint8)


def f16_dequantize(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def bf16_quantize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)


def bf16_dequantize(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def bf16_reference(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16 written out, for tests: round to nearest even on the top 16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
    return rounded
