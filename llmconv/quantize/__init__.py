"""Quantization kernels: one small unit per ggml block type.

Every unit is a pair of vectorized numpy functions over rows (the last axis is GGUF's first dim):

    quantize(x: float32[rows, n])           -> uint8[rows, n // block_size * type_size]
    dequantize(blocks: uint8[rows, nbytes]) -> float32[rows, nbytes // type_size * block_size]

(the legacy and float units also take [..., n]; the K-quant and IQ units only 2-D).
`quantize_tensor` / `dequantize_tensor` are what the rest of llmconv calls: they take any
[..., n] array, and add threading over row chunks, checks for non-finite input, and error
messages.
"""

from __future__ import annotations

import inspect
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES as _SIZES
from gguf import GGMLQuantizationType, LlamaFileType

from . import floats


@dataclass(frozen=True)
class QuantType:
    name: str  # lower-case CLI name: "q4_0"
    ggml_type: GGMLQuantizationType
    block_size: int  # weights per block
    type_size: int  # bytes per block
    file_type: LlamaFileType  # general.file_type for a file "mostly" of this type
    quantize: Callable[[np.ndarray], np.ndarray]
    dequantize: Callable[[np.ndarray], np.ndarray]
    # True if `quantize` itself raises NonFiniteError for NaN/inf input (the block kernels see
    # it in their max/min for free); otherwise quantize_tensor scans the input first.
    checks_finite: bool = False
    # The importance-weighted kernel, (x[rows, n], imatrix[n]) -> blocks, that llama.cpp uses
    # when given an imatrix; None where llama.cpp ignores one (q8_0, the float types).
    quantize_weighted: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    # llama.cpp refuses to quantize to this type without an imatrix (ggml asserts; llama-quantize
    # stops: "this quantization requires an imatrix"); `quantize` then raises ImatrixRequired.
    requires_imatrix: bool = False

    def __post_init__(self):
        if (self.block_size, self.type_size) != _SIZES[self.ggml_type]:  # one place: gguf's table
            raise ValueError(
                f"{self.name}: block/type size {self.block_size}/{self.type_size}, gguf says {_SIZES[self.ggml_type]}"
            )

    def row_nbytes(self, n: int) -> int:
        return n // self.block_size * self.type_size

    def can_hold_row(self, n: int) -> bool:
        return n % self.block_size == 0


TYPES: dict[str, QuantType] = {}


def register(qt: QuantType) -> QuantType:
    TYPES[qt.name] = qt
    return qt


# The registry is a table, one type a row (its columns in QuantType's order): left as written.
# fmt: off
register(QuantType("f32", GGMLQuantizationType.F32, *_SIZES[GGMLQuantizationType.F32], LlamaFileType.ALL_F32,
                   floats.f32_quantize, floats.f32_dequantize))
register(QuantType("f16", GGMLQuantizationType.F16, *_SIZES[GGMLQuantizationType.F16], LlamaFileType.MOSTLY_F16,
                   floats.f16_quantize, floats.f16_dequantize))
register(QuantType("bf16", GGMLQuantizationType.BF16, *_SIZES[GGMLQuantizationType.BF16], LlamaFileType.MOSTLY_BF16,
                   floats.bf16_quantize, floats.bf16_dequantize))

# K-quants (256-weight super-blocks). llama.cpp has no plain "mostly Q4_K" file type: a file
# with every matrix in q4_K is what `llama-quantize --pure ... Q4_K_S` writes, hence the _S types.
from . import q2_k, q3_k, q4_k, q5_k, q6_k  # noqa: E402

register(QuantType("q6_k", GGMLQuantizationType.Q6_K, *_SIZES[GGMLQuantizationType.Q6_K], LlamaFileType.MOSTLY_Q6_K,
                   q6_k.quantize, q6_k.dequantize))
register(QuantType("q5_k", GGMLQuantizationType.Q5_K, *_SIZES[GGMLQuantizationType.Q5_K], LlamaFileType.MOSTLY_Q5_K_S,
                   q5_k.quantize, q5_k.dequantize))
register(QuantType("q4_k", GGMLQuantizationType.Q4_K, *_SIZES[GGMLQuantizationType.Q4_K], LlamaFileType.MOSTLY_Q4_K_S,
                   q4_k.quantize, q4_k.dequantize))
register(QuantType("q3_k", GGMLQuantizationType.Q3_K, *_SIZES[GGMLQuantizationType.Q3_K], LlamaFileType.MOSTLY_Q3_K_S,
                   q3_k.quantize, q3_k.dequantize))
register(QuantType("q2_k", GGMLQuantizationType.Q2_K, *_SIZES[GGMLQuantizationType.Q2_K], LlamaFileType.MOSTLY_Q2_K,
                   q2_k.quantize, q2_k.dequantize))

# Legacy 32-weight block types, bit-exact with ggml's quantize_row_*_ref.
from . import q4_0, q4_1, q5_0, q5_1, q8_0  # noqa: E402

register(QuantType("q8_0", GGMLQuantizationType.Q8_0, *_SIZES[GGMLQuantizationType.Q8_0], LlamaFileType.MOSTLY_Q8_0,
                   q8_0.quantize, q8_0.dequantize, checks_finite=True))
register(QuantType("q4_0", GGMLQuantizationType.Q4_0, *_SIZES[GGMLQuantizationType.Q4_0], LlamaFileType.MOSTLY_Q4_0,
                   q4_0.quantize, q4_0.dequantize, checks_finite=True))
register(QuantType("q4_1", GGMLQuantizationType.Q4_1, *_SIZES[GGMLQuantizationType.Q4_1], LlamaFileType.MOSTLY_Q4_1,
                   q4_1.quantize, q4_1.dequantize, checks_finite=True))
register(QuantType("q5_0", GGMLQuantizationType.Q5_0, *_SIZES[GGMLQuantizationType.Q5_0], LlamaFileType.MOSTLY_Q5_0,
                   q5_0.quantize, q5_0.dequantize, checks_finite=True))
register(QuantType("q5_1", GGMLQuantizationType.Q5_1, *_SIZES[GGMLQuantizationType.Q5_1], LlamaFileType.MOSTLY_Q5_1,
                   q5_1.quantize, q5_1.dequantize, checks_finite=True))


# Importance-weighted variants (llama.cpp's quantize_row_*_impl with quant_weights).
from . import k_weighted, legacy_weighted  # noqa: E402

for _name, _fn in {"q2_k": k_weighted.q2_k_weighted, "q3_k": k_weighted.q3_k_weighted,
                   "q4_k": k_weighted.q4_k_weighted, "q5_k": k_weighted.q5_k_weighted,
                   "q6_k": k_weighted.q6_k_weighted, "q4_0": legacy_weighted.q4_0_weighted,
                   "q4_1": legacy_weighted.q4_1_weighted, "q5_0": legacy_weighted.q5_0_weighted,
                   "q5_1": legacy_weighted.q5_1_weighted}.items():
    TYPES[_name] = replace(TYPES[_name], quantize_weighted=_fn)


# Non-linear 4-bit grid types; their search takes an imatrix when there is one.
from . import iq4  # noqa: E402

register(QuantType("iq4_nl", GGMLQuantizationType.IQ4_NL, *_SIZES[GGMLQuantizationType.IQ4_NL], LlamaFileType.MOSTLY_IQ4_NL,
                   iq4.iq4_nl_quantize, iq4.iq4_nl_dequantize, quantize_weighted=iq4.iq4_nl_quantize))
register(QuantType("iq4_xs", GGMLQuantizationType.IQ4_XS, *_SIZES[GGMLQuantizationType.IQ4_XS], LlamaFileType.MOSTLY_IQ4_XS,
                   iq4.iq4_xs_quantize, iq4.iq4_xs_dequantize, quantize_weighted=iq4.iq4_xs_quantize))


# Grid 2-bit types (256-weight super-blocks). IQ2_XXS and IQ2_XS exist only with an imatrix;
# IQ2_S has an unweighted search too (ggml's), which llama-quantize reaches for token_embd only.
from . import iq2  # noqa: E402

register(QuantType("iq2_xxs", GGMLQuantizationType.IQ2_XXS, *_SIZES[GGMLQuantizationType.IQ2_XXS], LlamaFileType.MOSTLY_IQ2_XXS,
                   iq2.iq2_xxs_quantize_unweighted, iq2.iq2_xxs_dequantize, quantize_weighted=iq2.iq2_xxs_quantize,
                   requires_imatrix=True))
register(QuantType("iq2_xs", GGMLQuantizationType.IQ2_XS, *_SIZES[GGMLQuantizationType.IQ2_XS], LlamaFileType.MOSTLY_IQ2_XS,
                   iq2.iq2_xs_quantize_unweighted, iq2.iq2_xs_dequantize, quantize_weighted=iq2.iq2_xs_quantize,
                   requires_imatrix=True))
# a file "mostly" of IQ2_S blocks is llama.cpp's IQ2_M (its IQ2_S file type is mostly IQ2_XS)
register(QuantType("iq2_s", GGMLQuantizationType.IQ2_S, *_SIZES[GGMLQuantizationType.IQ2_S], LlamaFileType.MOSTLY_IQ2_M,
                   iq2.iq2_s_quantize, iq2.iq2_s_dequantize, quantize_weighted=iq2.iq2_s_quantize))


# Grid 3-bit types (256-weight super-blocks); the same search with or without an imatrix.
from . import iq3  # noqa: E402

register(QuantType("iq3_xxs", GGMLQuantizationType.IQ3_XXS, *_SIZES[GGMLQuantizationType.IQ3_XXS], LlamaFileType.MOSTLY_IQ3_XXS,
                   iq3.iq3_xxs_quantize, iq3.iq3_xxs_dequantize, quantize_weighted=iq3.iq3_xxs_quantize))
register(QuantType("iq3_s", GGMLQuantizationType.IQ3_S, *_SIZES[GGMLQuantizationType.IQ3_S], LlamaFileType.MOSTLY_IQ3_S,
                   iq3.iq3_s_quantize, iq3.iq3_s_dequantize, quantize_weighted=iq3.iq3_s_quantize))
# fmt: on


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


# Defined next to the block kernels, which raise it; re-exported here.
from ._blocks import ImatrixRequired, NonFiniteError  # noqa: E402,F401


def _first_nonfinite_row(x2d: np.ndarray) -> int | None:
    bad = ~np.isfinite(x2d).all(axis=1)
    if bad.any():
        return int(np.argmax(bad))
    return None


CHUNK_BYTES = 4 << 20  # float32 input per work item: big enough to amortize numpy's per-call cost


def _writes_into(fn) -> bool:
    """Whether a kernel takes `out=` (the block and float kernels: writes into a given buffer)."""
    try:
        return "out" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _quantize_into(qt: QuantType, chunk: np.ndarray, dst: np.ndarray, imatrix: np.ndarray | None, into: bool) -> None:
    """dst[...] = the chunk quantized (weighted when given an imatrix); `into`: the kernel
    writes into dst itself (no per-chunk result array, no copy)."""
    if imatrix is not None:
        dst[...] = qt.quantize_weighted(chunk, imatrix)
    elif into:
        qt.quantize(chunk, out=dst)
    else:
        dst[...] = qt.quantize(chunk)


def quantize_tensor(
    x: np.ndarray, qt: QuantType | str, threads: int = 1, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """float array [..., n] -> uint8 [..., row_nbytes(n)]. Raises NonFiniteError.

    `imatrix` (float32[n], the importance of each input column) selects the type's weighted
    kernel, as llama.cpp does; types without one ignore it. For stacked experts x[n_mat, r, n]
    it may be [n_mat, n]: expert e's rows are weighted by imatrix[e] (llama-quantize's slices).

    Rows are cut into ~CHUNK_BYTES pieces, quantized by `threads` worker threads (numpy
    releases the GIL in the kernels). The cut depends only on the shape, and every row is
    quantized on its own, so the bytes are the same for any thread count. NonFiniteError
    names the first bad row of the whole tensor.
    """
    if isinstance(qt, str):
        qt = get(qt)
    x = np.asarray(x)
    shape = x.shape
    n = shape[-1]
    if not qt.can_hold_row(n):
        raise ValueError(f"row length {n} is not a multiple of {qt.name}'s block size {qt.block_size}")
    if imatrix is None and qt.requires_imatrix:
        raise ImatrixRequired(f"{qt.name} needs an importance matrix (--imatrix), as llama.cpp does")
    x2d = x.reshape(-1, n)
    rows = x2d.shape[0]
    out = np.empty((rows, qt.row_nbytes(n)), np.uint8)
    step = max(1, CHUNK_BYTES // (4 * max(n, 1)))
    starts = list(range(0, rows, step))

    weighted = imatrix is not None and qt.quantize_weighted is not None
    if weighted and np.ndim(imatrix) == 2 and np.shape(imatrix)[0] > 1:
        return _per_expert(x, qt, threads, np.asarray(imatrix, dtype=np.float32))
    if weighted:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix.shape[0] != n:
            raise ValueError(f"imatrix has {imatrix.shape[0]} values for rows of {n}")

    into = _writes_into(qt.quantize)

    def work(start: int) -> None:
        chunk = np.ascontiguousarray(x2d[start : start + step], dtype=np.float32)
        if weighted or not qt.checks_finite:
            row = _first_nonfinite_row(chunk)
            if row is not None:
                raise NonFiniteError(start + row)
        try:
            _quantize_into(qt, chunk, out[start : start + step], imatrix if weighted else None, into)
        except NonFiniteError as e:
            raise NonFiniteError(start + e.row, getattr(e, "what", "NaN or inf")) from None

    if threads <= 1 or len(starts) == 1:
        for s0 in starts:
            work(s0)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            futures = [pool.submit(work, s0) for s0 in starts]
            errors = [f.exception() for f in futures]  # waits for all; chunks are in row order
        for e in errors:
            if e is not None:
                raise e
    return out.reshape(*shape[:-1], qt.row_nbytes(n))


def _per_expert(x: np.ndarray, qt: QuantType, threads: int, imatrix: np.ndarray) -> np.ndarray:
    """quantize_tensor of stacked experts x[n_mat, r, n], expert e weighted by imatrix[e]."""
    if x.ndim != 3 or x.shape[0] != imatrix.shape[0]:
        raise ValueError(f"imatrix has {imatrix.shape[0]} slices for a tensor of shape {x.shape}")
    out = np.empty((*x.shape[:-1], qt.row_nbytes(x.shape[-1])), np.uint8)
    for e in range(x.shape[0]):
        try:
            out[e] = quantize_tensor(x[e], qt, threads, imatrix[e])
        except NonFiniteError as err:
            raise NonFiniteError(e * x.shape[1] + err.row, err.what) from None
    return out


def dequantize_tensor(raw: np.ndarray, qt: QuantType | str | GGMLQuantizationType) -> np.ndarray:
    """uint8 [..., nbytes] -> float32 [..., n]."""
    if not isinstance(qt, QuantType):
        qt = get(qt)
    raw = np.ascontiguousarray(raw).view(np.uint8)
    nbytes = raw.shape[-1]
    out = qt.dequantize(raw.reshape(-1, nbytes))
    return out.reshape(*raw.shape[:-1], nbytes // qt.type_size * qt.block_size)


from .._callable import make_callable  # noqa: E402  (llmconv.quantize(...) runs api.quantize)

make_callable(__name__)
