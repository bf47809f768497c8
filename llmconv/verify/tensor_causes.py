"""Why a file tensor is not its source weight, when it is one of the usual slips: a tensor from
another layer, the Hugging Face Q/K row permutation (either direction), data of another type
than the one declared, or a few damaged blocks."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES

from .. import quantize as q
from . import metrics as M
from .model_file import ModelFile
from .expected import TensorCheck


def to_rotate_half(w: np.ndarray, n_head: int) -> np.ndarray:
    """Meta's adjacent-pair row order -> Hugging Face's rotate-half order, within each head (the
    permutation HF's convert_llama_weights_to_hf.py applies to wq/wk): rows 0, 2, 4, ... then 1, 3, 5, ..."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_rotate_half(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse: rotate-half -> adjacent pairs (what a GGUF converter applies to HF q/k weights)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def explain(check: TensorCheck, mf: ModelFile, source) -> str | None:
    """The first cause the numbers support, or None."""
    from .moe import explain_expert, is_expert_slice

    if is_expert_slice(check.name):
        return explain_expert(check, mf, source)
    ft = mf.tensors[check.name]
    by_name = {t.name: t for t in source.tensors}
    if check.name not in by_name or len(ft.shape) != 2 or tuple(ft.shape) != tuple(by_name[check.name].shape):
        return None
    deq = ft.array()
    src = by_name[check.name].load().reshape(deq.shape)
    bound = check.bound_rel_rmse
    for why in (
        qk_permutation(check, deq, src, source.hparams, bound),
        other_layer(check, deq, by_name, bound),
        other_type(check, ft, src),
        broken_blocks(deq, src, GGML_QUANT_SIZES[ft.ggml_type][0]),
    ):
        if why:
            return why
    return None


def qk_permutation(check: TensorCheck, deq, src, h, bound: float) -> str | None:
    kind = check.name.split(".")[-2]
    if kind not in ("attn_q", "attn_k"):
        return None
    heads = h.n_heads if kind == "attn_q" else h.n_kv_heads
    for f, what in (
        (to_rotate_half, "Hugging Face's Q/K permutation (adjacent pairs -> rotate-half)"),
        (from_rotate_half, "the HF->GGUF Q/K permutation (rotate-half -> adjacent pairs)"),
    ):
        if M.rel_rmse(deq, f(src, heads)) <= bound:
            return (
                f"matches the source with {what} applied to its rows; llama.cpp's 'llama' architecture "
                "wants Meta's adjacent-pair row order, which a Meta checkpoint already has"
            )
    return None


def other_layer(check: TensorCheck, deq, by_name: dict, bound: float) -> str | None:
    parts = check.name.split(".")
    if parts[0] != "blk":
        return None
    for other, st in by_name.items():
        o = other.split(".")
        if o[0] != "blk" or o[2:] != parts[2:] or other == check.name or tuple(st.shape) != deq.shape:
            continue
        if M.rel_rmse(deq, st.load()) <= bound:
            return f"matches the source's {other} (tensors swapped or misnumbered between layers?)"
    return None


def other_type(check: TensorCheck, ft, src) -> str | None:
    """The bytes hold another type's data (f16 declared as bf16), or values that went through a
    coarser type first (quantized at q4_0, then stored as q8_0)."""
    declared = q.get(ft.ggml_type)
    deq = ft.array()
    own = M.rel_rmse(deq, src)
    for qt in q.TYPES.values():
        # Types that llama.cpp only makes with an imatrix are not a plausible earlier pass here.
        if qt is declared or qt.requires_imatrix or not qt.can_hold_row(src.shape[-1]):
            continue
        if (qt.type_size, qt.block_size) == (declared.type_size, declared.block_size):
            as_other = q.dequantize_tensor(ft.raw, qt).reshape(src.shape)
            if M.rel_rmse(as_other, src) <= check.bound_rel_rmse / 10:
                return f"its bytes are {qt.name} data, but the file declares {declared.name}"
        if qt.type_size * declared.block_size < declared.type_size * qt.block_size:  # fewer bits than declared
            rt = q.dequantize_tensor(q.quantize_tensor(src, qt), qt).reshape(src.shape)
            if M.rel_rmse(deq, rt) < own / 4:
                return (
                    f"its values are the source quantized at {qt.name} and then stored as {declared.name}: "
                    "requantized from a lossier file, not converted from the checkpoint"
                )
    return None


def broken_blocks(deq: np.ndarray, src: np.ndarray, block: int) -> str | None:
    """Where a quantized tensor's error sits in a few blocks that are further from their source
    than the source is from zero (block RMS error > block RMS): rounding cannot do that, since
    every block is scaled to its own values, but a damaged block scale (or block bytes) does."""
    if block <= 1:
        return None
    rows, n = deq.shape
    d = (deq.astype(np.float64) - src).reshape(rows, n // block, block)
    s = src.astype(np.float64).reshape(rows, n // block, block)
    err2 = np.square(d).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.sqrt(err2 / np.square(s).sum(axis=-1))
    rel = np.where(np.isnan(rel), np.inf, rel)  # 0/0 only when err2 is nan
    bad = np.flatnonzero(rel > 1.0)
    if not len(bad) or len(bad) > max(1, rel.size // 100):
        return None  # none, or everywhere: not a local fault
    r, b = divmod(int(bad[np.argmax(rel.flat[bad])]), rel.shape[1])
    total = float(err2.sum())
    share = float(err2[r, b]) / total if np.isfinite(total) and total > 0 else 1.0
    return (
        f"{len(bad)} block(s) of {block} values far off the source; the worst, row {r} block {b} "
        f"(columns {b * block}..{b * block + block - 1}), is off by {rel[r, b]:.3g}x its own RMS and holds "
        f"{share:.0%} of the tensor's error: a corrupted block scale or block bytes"
    )
