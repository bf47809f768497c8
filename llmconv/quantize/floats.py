"""Float "block" types: f32, f16, bf16 (block size 1), with ggml's rounding.

Both casts round to nearest even, as ggml's FP32->FP16 and ggml_compute_fp32_to_bf16 do.
torch's casts are used because they are 5-7x faster than numpy's here (f16: 1100 vs 200
M/s on one core); tests/test_floats.py checks them bit for bit against numpy's f16 cast and
against ggml's bf16 rule on every class of float32 (normals, subnormals, overflow, ties).
NaN never reaches these casts: quantize_tensor rejects non-finite input first.
torch is imported on the first f16/bf16 cast, not with this module: it costs ~1.4 s of CPU,
which a conversion to any other type does not need to pay.
"""
from __future__ import annotations

import numpy as np

TORCH_CAST_TYPES = ("f16", "bf16")      # the types whose quantize imports torch


def _into(x: np.ndarray, out: np.ndarray | None, dtype: str, itemsize: int) -> np.ndarray:
    """Cast float32 `x` to torch's `dtype` ("float16", "bfloat16"; round to nearest even),
    into `out` if given. torch's copy_ runs without the GIL, so threads convert chunks in parallel."""
    import torch

    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty(x.size * itemsize, np.uint8)
    elif out.nbytes != x.size * itemsize or not out.flags.c_contiguous:
        raise ValueError(f"output buffer of {out.nbytes} bytes, need {x.size * itemsize} contiguous")
    dst = torch.from_numpy(out.view(np.uint8).reshape(-1)).view(getattr(torch, dtype)).view(x.shape)
    dst.copy_(torch.from_numpy(x))
    return out.view(np.uint8).reshape(*x.shape[:-1], x.shape[-1] * itemsize)


def f32_quantize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        return x.view(np.uint8)
    if out.nbytes != x.nbytes or not out.flags.c_contiguous:
        raise ValueError(f"output buffer of {out.nbytes} bytes, need {x.nbytes} contiguous")
    np.copyto(out.view(np.float32).reshape(x.shape), x)
    return out.view(np.uint8).reshape(*x.shape[:-1], x.shape[-1] * 4)


def f32_dequantize(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float32)


def f16_quantize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return _into(x, out, "float16", 2)


def f16_dequantize(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def bf16_quantize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return _into(x, out, "bfloat16", 2)


def bf16_dequantize(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def bf16_reference(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16 written out, for tests: round to nearest even on the top 16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded[nan] = ((u[nan] >> 16) | 64).astype(np.uint16)
    return rounded


def widen_into(src: np.ndarray, out: np.ndarray) -> None:
    """Source weights (bf16 bits as uint16, float16 or float32, any strides) -> float32 `out`
    of the same shape. bf16 is the top half of a float32, so it widens exactly with a
    uint16 -> uint32 copy and a shift, in place in `out` (no temporary, no GIL held)."""
    if src.dtype == np.uint16:
        wide = out.view(np.uint32)
        np.copyto(wide, src, casting="safe")
        np.left_shift(wide, np.uint32(16), out=wide)
    else:
        np.copyto(out, src, casting="safe")
