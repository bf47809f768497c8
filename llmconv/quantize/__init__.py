"""Quantization kernels: one small unit per ggml block type.

Every unit is a pair of vectorized numpy functions over the *last* axis (GGUF's first dim):

    quantize(x: float32[..., n])            -> uint8[..., n // block_size * type_size]
    dequantize(blocks: uint8[..., nbytes])  -> float32[..., nbytes // type_size * block_size]

`quantize_tensor` / `dequantize_tensor` are what the rest of llmconv calls: they add
threading over row chunks, checks for non-finite input, and error messages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from . import floats


@dataclass(frozen=True)
class QuantType:
    name: str                      # lower-case CLI name: "q4_0"
    ggml_type: GGMLQuantizationType
    block_size: int                # weights per block
    type_size: int                 # bytes per block
    file_type: LlamaFileType       # general.file_type for a file "mostly" of this type
    quantize: Callable[[np.ndarray], np.ndarray]
    dequantize: Callable[[np.ndarray], np.ndarray]

    def row_nbytes(self, n: int) -> int:
        return n // self.block_size * self.type_size

    def can_hold_row(self, n: int) -> bool:
        return n % self.block_size == 0


TYPES: dict[str, QuantType] = {}


def register(qt: QuantType) -> QuantType:
    TYPES[qt.name] = qt
    return qt


register(QuantType("f32", GGMLQuantizationType.F32, 1, 4, LlamaFileType.ALL_F32,
                   floats.f32_quantize, floats.f32_dequantize))
register(QuantType("f16", GGMLQuantizationType.F16, 1, 2, LlamaFileType.MOSTLY_F16,
                   floats.f16_quantize, floats.f16_dequantize))
register(QuantType("bf16", GGMLQuantizationType.BF16, 1, 2, LlamaFileType.MOSTLY_BF16,
                   floats.bf16_quantize, floats.bf16_dequantize))


def get(t: str | int | GGMLQuantizationType) -> QuantType:
    """Look a type up by CLI name ("q4_0") or by GGMLQuantizationType."""
    if isinstance(t, str):
        qt = TYPES.get(t.lower())
        if qt is None:
            raise KeyError(f"unknown type {t!r}; known: {', '.join(TYPES)}")
        return qt
    for qt in TYPES.values():
        if qt.ggml_type == t:
            return qt
    raise KeyError(f"no kernel for ggml type {GGMLQuantizationType(t).name}")


class NonFiniteError(ValueError):
    """Input holds NaN/inf (or a scale overflows fp16). `row` is the first bad row."""

    def __init__(self, row: int, what: str = "NaN or inf"):
        self.row = row
        super().__init__(f"{what} in row {row}")


def _first_nonfinite_row(x2d: np.ndarray) -> int | None:
    bad = ~np.isfinite(x2d).all(axis=1)
    if bad.any():
        return int(np.argmax(bad))
    return None


def quantize_tensor(x: np.ndarray, qt: QuantType | str, threads: int = 1) -> np.ndarray:
    """float array [..., n] -> uint8 [..., row_nbytes(n)]. Raises NonFiniteError."""
    if isinstance(qt, str):
        qt = get(qt)
    x = np.asarray(x)
    shape = x.shape
    n = shape[-1]
    if not qt.can_hold_row(n):
        raise ValueError(f"row length {n} is not a multiple of {qt.name}'s block size {qt.block_size}")
    x2d = x.reshape(-1, n)
    row = _first_nonfinite_row(x2d)
    if row is not None:
        raise NonFiniteError(row)
    out = qt.quantize(np.ascontiguousarray(x2d, dtype=np.float32))
    return out.reshape(*shape[:-1], qt.row_nbytes(n))


def dequantize_tensor(raw: np.ndarray, qt: QuantType | str | GGMLQuantizationType) -> np.ndarray:
    """uint8 [..., nbytes] -> float32 [..., n]."""
    if not isinstance(qt, QuantType):
        qt = get(qt)
    raw = np.ascontiguousarray(raw).view(np.uint8)
    nbytes = raw.shape[-1]
    out = qt.dequantize(raw.reshape(-1, nbytes))
    return out.reshape(*raw.shape[:-1], nbytes // qt.type_size * qt.block_size)
