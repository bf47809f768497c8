"""The expected pass: the reference forward pass over the checkpoint with every weight replaced
by its quantize->dequantize round trip at the type the file stores that tensor in (llmconv's
bit-exact kernels), and each matrix product's input rounded as llama.cpp's CPU backend rounds it
for that weight type. A correct file's candidate pass multiplies exactly these numbers.

The same visit compares each tensor with the file (one quantization serves both):
  - exact bytes: llmconv's quantization of the source rows against the file's rows, block by
    block; a block that differs but is as close to the source as llmconv's (a different but
    equally good rounding, e.g. an FMA-fused or ARM build) is counted apart from a block that is
    further from the source (damaged bytes);
  - the dequantization error against the source weight (rel_rmse, rel_max_err).

It works in the checkpoint's own layout: a Hugging Face q_proj/k_proj is permuted by rows
(rotate-half order), and a row's blocks do not change when rows move, so its rows are taken
to GGUF order, compared and rounded there, and put back. Tensors the reference reads only in
part (the embedding lookup) or not at all are compared afterwards (`compare_rest`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from .. import quantize as q
from .bounds import TENSOR_BOUNDS, type_name
from .hooks import ForwardHooks
from .candidate import activation_rounding
from .model_file import FileTensor, ModelFile, dequantize
from .moe import expert_slice, split_expert_slice

ROWS_PER_CHUNK_BYTES = 32 << 20  # float32 source rows handled at a time


@dataclass
class TensorCheck:
    """One file tensor against its source weight."""

    name: str
    type: str
    blocks: int = 0  # blocks compared byte for byte
    blocks_differ: int = 0  # ... whose bytes differ from llmconv's quantization
    blocks_damaged: int = 0  # ... and that are further from the source than llmconv's
    worst_block: tuple[int, int] | None = None  # (row, block) of the damaged block furthest off
    exact: bool = True  # the bytes were compared (False: no kernel, or shapes differ)
    rel_rmse: float = float("inf")
    rel_max_err: float = float("inf")
    bound_rel_rmse: float = float("inf")
    bound_rel_max_err: float = float("inf")
    note: str | None = None

    @property
    def bytes_summary(self) -> str:
        if not self.exact:
            return "not compared"
        if not self.blocks_differ:
            return "identical"
        return f"{self.blocks_differ} of {self.blocks} blocks differ"

    @property
    def out_of_bounds(self) -> bool:
        return not (self.rel_rmse <= self.bound_rel_rmse and self.rel_max_err <= self.bound_rel_max_err)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bytes"] = self.bytes_summary
        d["worst_block"] = list(self.worst_block) if self.worst_block else None
        return d


def rotate_half_order(rows: int, heads: int) -> np.ndarray:
    """perm with hf_rows = gguf_rows[perm]: Hugging Face's rotate-half row order of Meta's
    adjacent pairs, within each head (rows 0, 2, 4, ... then 1, 3, 5, ...)."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)


class _Errors:
    """Running sums for rel_rmse and rel_max_err over row chunks."""

    def __init__(self):
        self.err2 = self.src2 = self.err_max = self.src_max = 0.0

    def add(self, deq: np.ndarray, src: np.ndarray) -> None:
        d = deq.astype(np.float64) - src
        self.err2 += float(np.sum(d * d))
        self.src2 += float(np.sum(np.square(src, dtype=np.float64)))
        if d.size:
            self.err_max = max(self.err_max, float(np.abs(d).max()))
            self.src_max = max(self.src_max, float(np.abs(src).max()))

    def result(self) -> tuple[float, float]:
        if not np.isfinite(self.err2):
            return float("inf"), float("inf")
        rmse = (self.err2 / self.src2) ** 0.5 if self.src2 > 0 else (0.0 if self.err2 == 0 else float("inf"))
        mx = self.err_max / self.src_max if self.src_max > 0 else (0.0 if self.err_max == 0 else float("inf"))
        return rmse, mx


def compare_rows(
    check: TensorCheck,
    qt: q.QuantType,
    src: np.ndarray,
    file_raw: np.ndarray,
    r0: int,
    threads: int,
    imatrix: np.ndarray | None = None,
) -> np.ndarray:
    """Quantize source rows [rows, n] as the file's type, compare with the file's rows block by
    block, accumulate nothing but the block counts; returns llmconv's round trip of the rows."""
    ours = q.quantize_tensor(src, qt, threads, imatrix=imatrix)
    theirs = np.ascontiguousarray(file_raw).reshape(ours.shape)
    rt = q.dequantize_tensor(ours, qt)
    nb = ours.shape[-1] // qt.type_size
    differ = (ours.reshape(-1, nb, qt.type_size) != theirs.reshape(-1, nb, qt.type_size)).any(axis=-1)
    check.blocks += differ.size
    if differ.any():
        check.blocks_differ += int(differ.sum())
        deq = q.dequantize_tensor(theirs, qt)
        s = src.reshape(-1, nb, qt.block_size).astype(np.float64)
        sse_file = np.square(deq.reshape(s.shape) - s).sum(axis=-1)
        sse_ours = np.square(rt.reshape(s.shape) - s).sum(axis=-1)
        # an equally good rounding stays within a few % of llmconv's block error; damage does not
        damaged = differ & ~(sse_file <= sse_ours * 1.1 + 1e-30)
        if damaged.any():
            check.blocks_damaged += int(damaged.sum())
            rel = np.where(damaged, sse_file / np.maximum(sse_ours, 1e-30), -1.0)
            r, b = np.unravel_index(int(np.argmax(rel)), rel.shape)
            check.worst_block = check.worst_block or (r0 + int(r), int(b))
    return rt


def check_tensor(
    ft: FileTensor, src: np.ndarray, threads: int = 1, keep: bool = True, imatrix: np.ndarray | None = None
) -> tuple[TensorCheck, np.ndarray | None]:
    """Compare the file tensor with its source weight `src` (GGUF row order, float32), row chunk
    by row chunk; return the check and, with `keep`, the expected weight (llmconv's round trip
    at the file's type; the file's own values when llmconv has no kernel for that type)."""
    tname = type_name(ft.ggml_type)
    b_rmse, b_max = TENSOR_BOUNDS.get(tname, (float("inf"), float("inf")))
    check = TensorCheck(ft.name, tname, bound_rel_rmse=b_rmse, bound_rel_max_err=b_max)
    if tuple(ft.shape) != tuple(src.shape):
        check.exact = False
        check.note = f"shape {tuple(ft.shape)} in the file, {tuple(src.shape)} in the source"
        return check, None
    try:
        qt = q.get(ft.ggml_type)
    except KeyError:
        qt = None
    src2 = src.reshape(-1, src.shape[-1]) if src.ndim > 1 else src.reshape(1, -1)
    raw2 = ft.raw.reshape(src2.shape[0], -1)
    out = np.empty(src2.shape, np.float32) if keep else None
    errs = _Errors()
    step = max(1, ROWS_PER_CHUNK_BYTES // (4 * src2.shape[1]))
    for r0 in range(0, src2.shape[0], step):
        s = np.ascontiguousarray(src2[r0 : r0 + step], dtype=np.float32)
        deq = q.dequantize_tensor(raw2[r0 : r0 + step], ft.ggml_type) if qt is not None else ft.rows(r0, r0 + step)
        errs.add(deq, s)
        if qt is not None and np.isfinite(s).all():
            rt = compare_rows(check, qt, s, raw2[r0 : r0 + step], r0, threads, imatrix)
        else:
            check.exact = False
            rt = deq
        if out is not None:
            out[r0 : r0 + len(s)] = rt
    check.rel_rmse, check.rel_max_err = errs.result()
    if qt is None:
        check.note = f"llmconv has no {tname} quantizer: bytes not compared, the expected pass uses the file's values"
    return check, (out.reshape(src.shape) if out is not None else None)


class ExpectedWeights:
    """ForwardHooks for the expected pass over a checkpoint, against the file `mf`. `names` maps
    the checkpoint's tensor names to GGUF names; `row_orders` gives, per GGUF name, the row
    order the checkpoint stores it in (HF Q/K: rotate_half_order) when it is not GGUF's."""

    def __init__(
        self,
        mf: ModelFile,
        names: dict[str, str],
        row_orders: dict[str, np.ndarray],
        activations: str = "ggml",
        threads: int = 1,
        imatrix=None,
    ):
        self.mf, self.names, self.row_orders = mf, names, row_orders
        self.activations, self.threads = activations, threads
        self.imatrix = imatrix  # llmconv.imatrix.Imatrix the file was quantized with, or None
        self.checks: dict[str, TensorCheck] = {}

    def importance(self, ft: FileTensor) -> np.ndarray | None:
        """The imatrix weights the file's tensor was quantized with (an expert: its slice)."""
        if self.imatrix is None:
            return None
        expert = split_expert_slice(ft.name)
        if expert is None:
            return self.imatrix.for_tensor(ft.name, ft.shape[-1])
        stacked = self.mf.tensors[expert[0]]
        w = self.imatrix.for_tensor(expert[0], ft.shape[-1], n_mat=stacked.shape[0])
        return None if w is None else w[expert[1]]

    def file_tensor(self, name: str) -> FileTensor | None:
        g = self.names.get(name)
        if isinstance(g, tuple):  # an expert: (stacked tensor, index), verify/moe.py
            t = self.mf.tensors.get(g[0])
            return expert_slice(t, g[1]) if t is not None and len(t.shape) == 3 and g[1] < t.shape[0] else None
        return self.mf.tensors.get(g) if g is not None else None

    def weight(self, name: str, w: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        ft = self.file_tensor(name)
        if ft is None or ft.shape[-1] != w.shape[-1]:
            return w  # the structure checks report it; the pass keeps the source value
        a = w.detach().numpy()
        if rows is not None:  # a lookup: round-trip just these rows (quantization is per row)
            try:
                qt = q.get(ft.ggml_type)
            except KeyError:  # no kernel: the file's own rows
                return torch.from_numpy(dequantize(ft.raw[rows.numpy()], ft))
            return torch.from_numpy(q.dequantize_tensor(q.quantize_tensor(a, qt, self.threads), qt))
        order = self.row_orders.get(ft.name)
        src = a if order is None else a[np.argsort(order)]  # to GGUF row order
        imp = self.importance(ft)
        check, expected = check_tensor(ft, src, self.threads, imatrix=imp)
        self.checks.setdefault(ft.name, check)
        if expected is None:
            return w
        return torch.from_numpy(expected if order is None else expected[order])

    def matmul_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        ft = self.file_tensor(name)
        if self.activations != "ggml" or ft is None:
            return x
        rnd = activation_rounding(ft.ggml_type, x.shape[-1])
        return x if rnd is None else torch.from_numpy(rnd(np.ascontiguousarray(x.numpy())))

    def hooks(self):
        return ForwardHooks(weight=self.weight, matmul_input=self.matmul_input)


def compare_rest(
    mf: ModelFile, source, checks: dict[str, TensorCheck], threads: int = 1, progress: Callable | None = None
) -> None:
    """Compare the file tensors the expected pass did not read in full (the embedding of an
    untied model, rope_freqs), loading their source tensors in GGUF layout."""
    for st in source.tensors:
        ft = mf.tensors.get(st.name)
        if ft is None or st.name in checks or f"{st.name}[0]" in checks:  # experts: checked slice by slice
            continue
        src = np.asarray(st.load(), dtype=np.float32).reshape(st.shape)
        checks[st.name], _ = check_tensor(ft, src, threads, keep=False)
        del src
