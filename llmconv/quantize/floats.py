"""Float "block" types: f32, f16, bf16 (block size 1), with ggml's rounding.

Both casts round to nearest even, as ggml's FP32->FP16 and ggml_compute_fp32_to_bf16 do.
torch's casts are used because they are 5-7x faster than numpy's here (f16: 1100 vs 200
M/s on one core); tests/test_floats.py checks them bit for bit against numpy's f16 cast and
against ggml's bf16 rule on every class of float32 (normals, subnormals, overflow, ties).
NaN never reaches these casts: quantize_tensor rejects non-finite input first.
A bf16 source written as f16 skips both the float32 and torch: bf16_bits_to_f16 transcodes
the stored bits (tested against numpy's cast for all 65536 of them).
torch is imported on the first f16/bf16 cast, not with this module: it costs ~1.4 s of CPU,
which a conversion to any other type does not need to pay.
"""

from __future__ import annotations

import numpy as np

TORCH_CAST_TYPES = ("f16", "bf16")  # the types whose quantize imports torch
FLOAT_TYPES = ("f32", "f16", "bf16")  # stored as floats: a copy or a cast, no quantization kernel


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


def stored_as_is(raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """An output in the type the source stores (bf16 -> bf16, f16 -> f16, f32 -> f32): the
    stored bytes themselves, which is what widening to float32 and casting back gives."""
    return raw


def bf16_bits_to_f16(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """bf16 (uint16 bits) -> f16 bits in `out` (uint16, same shape), equal to the cast of the
    widened float32 (round to nearest even) without importing torch and without the float32.

    Why it is exact: f16 has 3 more mantissa bits than bf16, so every bf16 whose exponent is
    in f16's normal range (2^-14 <= |x| < 2^16) is an f16: rebias the exponent (127 -> 15) and
    shift the mantissa left by 3, all in one integer subtract and shift of the magnitude bits.
    Only zeros, the values that become f16 subnormals (|x| < 2^-14: rounded) and those past
    f16's range (inf) are different: those few (about 0.3 % of a trained weight matrix) are cast
    by numpy, one by one. ~2 G weights/s on one core (numpy's own float16 cast: ~0.4 G)."""
    mag = np.bitwise_and(bits, 0x7FFF)
    np.subtract(mag, 0x3800, out=out, casting="unsafe")  # exponent 127 -> 15 bias (wraps if small)
    np.left_shift(out, 3, out=out)
    np.bitwise_or(out, np.bitwise_and(bits, 0x8000), out=out)
    odd = np.flatnonzero((mag < 0x3880) | (mag >= 0x4780))  # below 2^-14, zero, or 2^16 and past
    if odd.size:
        wide = np.left_shift(bits.reshape(-1)[odd].astype(np.uint32), 16).view(np.float32)
        out.reshape(-1)[odd] = wide.astype(np.float16).view(np.uint16)
    return out


# (stored dtype, output type) -> how to write the output from the stored bytes
FROM_STORED = {
    ("bf16", "bf16"): stored_as_is,
    ("f16", "f16"): stored_as_is,
    ("f32", "f32"): stored_as_is,
    ("bf16", "f16"): bf16_bits_to_f16,
}


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
