"""The plan: every output tensor's GGUF name, shape, type and where its data comes from.

A source (Meta checkpoint, HF checkpoint, GGUF file) gives SourceTensors: lazy,
already named in GGUF terms. The plan picks a type for each; the executor then
loads, converts and writes them one at a time.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES

from .. import quantize as q
from ..errors import LlmconvError
from . import mixes


@dataclass
class SourceTensor:
    name: str                              # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]                 # numpy order
    load: Callable[[], np.ndarray]         # -> float32 array of `shape`
    files: list[Path]                      # where the bytes come from (for messages)
    source_name: str = ""                  # name in the source, e.g. "layers.0.attention.wq.weight"
    source_dtype: str = ""                 # "bf16", "f16", "f32", "q4_0", ...


@dataclass
class PlannedTensor:
    src: SourceTensor
    qtype: q.QuantType
    reason: str = ""                       # why this type, when it is not the requested one

    @property
    def name(self) -> str:
        return self.src.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.src.shape

    @property
    def nbytes(self) -> int:
        rows = int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1
        return rows * self.qtype.row_nbytes(self.shape[-1])


@dataclass
class Plan:
    tensors: list[PlannedTensor]
    file_type: int
    outtype: str
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(t.shape, dtype=np.int64)) for t in self.tensors)


def tensor_name(kind: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    base = TENSOR_NAMES[kind]
    if layer is not None:
        base = base.format(bid=layer)
    return f"{base}.{suffix}"


# Meta name (layer prefix stripped) -> GGUF tensor kind.
META_LAYER_NAMES = {
    "attention.wq.weight": MODEL_TENSOR.ATTN_Q,
    "attention.wk.weight": MODEL_TENSOR.ATTN_K,
    "attention.wv.weight": MODEL_TENSOR.ATTN_V,
    "attention.wo.weight": MODEL_TENSOR.ATTN_OUT,
    "attention_norm.weight": MODEL_TENSOR.ATTN_NORM,
    "feed_forward.w1.weight": MODEL_TENSOR.FFN_GATE,
    "feed_forward.w2.weight": MODEL_TENSOR.FFN_DOWN,
    "feed_forward.w3.weight": MODEL_TENSOR.FFN_UP,
    "ffn_norm.weight": MODEL_TENSOR.FFN_NORM,
}
META_GLOBAL_NAMES = {
    "tok_embeddings.weight": MODEL_TENSOR.TOKEN_EMBD,
    "norm.weight": MODEL_TENSOR.OUTPUT_NORM,
    "output.weight": MODEL_TENSOR.OUTPUT,
}


def meta_to_gguf_name(name: str) -> str | None:
    if name in META_GLOBAL_NAMES:
        return tensor_name(META_GLOBAL_NAMES[name])
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in META_LAYER_NAMES:
        return tensor_name(META_LAYER_NAMES[m.group(2)], int(m.group(1)))
    return None


# ---- which tensor gets which type ---------------------------------------------------------
#
# Default rules follow llama-quantize (llama_tensor_get_type) for LLaMA models without an imatrix:
#   * 1-D tensors (norms) stay F32.
#   * output.weight (or token_embd.weight when the embedding is tied) gets q6_K unless the
#     requested type is q8_0 or a float type. When q6_K is not available or the row does not
#     fit its 256-block, q8_0 is used (and the plan says so).
#   * a row length the requested type cannot block falls back to f16 (llama-quantize falls back
#     to a legacy type of the same size class for K-quants; for legacy types it uses f16).
# `--pure` quantizes every 2-D weight to the requested type; `--tensor-type RE=TYPE`,
# `--output-tensor-type`, `--token-embedding-type` override per tensor.
# K-quant outtypes (q4_k_m, q5_k_s, ...) are mixes: their per-tensor rules and row-length
# fallbacks live in mixes.py and replace the output rule here.

FLOAT_TYPES = {"f32", "f16", "bf16"}
OUTPUT_UPGRADE = "q6_k"


@dataclass
class TypePolicy:
    outtype: str
    pure: bool = False
    tied_embeddings: bool = False
    output_type: str | None = None
    token_embd_type: str | None = None
    overrides: list[tuple[re.Pattern, str]] = field(default_factory=list)
    model: mixes.ModelShape | None = None        # what a mix's layer/GQA rules look at
    mix: mixes.Mix | None = None                 # set from outtype when it names a K-quant mix

    def __post_init__(self):
        if self.mix is None:
            self.mix = mixes.find_mix(self.outtype)


def _qtype(name: str, where: str) -> q.QuantType:
    try:
        return q.get(name)
    except KeyError as e:
        raise LlmconvError(f"{where}: {e.args[0]}") from None


def choose_type(src: SourceTensor, policy: TypePolicy) -> tuple[q.QuantType, str]:
    if len(src.shape) < 2 or not src.name.endswith(".weight"):
        return q.get("f32"), ""
    n = src.shape[-1]
    wanted = policy.outtype
    reason = ""
    output_name = tensor_name(MODEL_TENSOR.OUTPUT)
    embd_name = tensor_name(MODEL_TENSOR.TOKEN_EMBD)
    is_output = src.name == output_name or (policy.tied_embeddings and src.name == embd_name)
    if policy.mix is not None:
        if policy.pure:
            wanted = policy.mix.base
        else:
            if policy.model is None:
                raise LlmconvError(f"{policy.mix.name} needs the model's layer and head counts")
            wanted, reason = mixes.tensor_type(policy.mix, src.name, src.shape, policy.model,
                                               policy.tied_embeddings)
    elif not policy.pure and wanted not in FLOAT_TYPES and is_output and wanted != "q8_0":
        if OUTPUT_UPGRADE in q.TYPES and q.get(OUTPUT_UPGRADE).can_hold_row(n):
            wanted, reason = OUTPUT_UPGRADE, "output tensor: llama-quantize's higher-precision choice"
        else:
            wanted, reason = "q8_0", "output tensor: q8_0 (llama-quantize would pick q6_K, which cannot hold this row)"
    if src.name == output_name and policy.output_type:
        wanted, reason = policy.output_type, "--output-tensor-type"
    if src.name == embd_name and policy.token_embd_type:
        wanted, reason = policy.token_embd_type, "--token-embedding-type"
    for pattern, t in policy.overrides:
        if pattern.search(src.name):
            wanted, reason = t, f"--tensor-type {pattern.pattern}={t}"
            break
    qt = _qtype(wanted, src.name)
    if not qt.can_hold_row(n) and policy.mix is not None and not reason.startswith("--"):
        # llama-quantize substitutes a 32-block type even with --pure
        wanted, reason = mixes.fallback(wanted, n)
        qt = _qtype(wanted, src.name)
    if not qt.can_hold_row(n):
        if policy.pure or reason.startswith("--"):
            raise LlmconvError(f"row length {n} is not a multiple of {qt.name}'s block size {qt.block_size}",
                               file=src.files[0] if src.files else None, tensor=src.name)
        reason = f"row length {n} does not fit {qt.name} blocks of {qt.block_size}: f16"
        qt = q.get("f16")
    return qt, reason


def make_plan(sources: list[SourceTensor], policy: TypePolicy) -> Plan:
    if policy.mix is not None:
        file_type, outtype = int(policy.mix.file_type), policy.mix.name
        if policy.model is not None and policy.model.n_attn_v is None:
            # llama-quantize counts the attn_v tensors it sees for attn_v's layer rules
            n_attn_v = sum(1 for s in sources if mixes.tensor_kind(s.name) == "attn_v")
            policy = dataclasses.replace(policy, model=dataclasses.replace(policy.model, n_attn_v=n_attn_v))
    else:
        out_qt = _qtype(policy.outtype, "--outtype")
        file_type, outtype = int(out_qt.file_type), out_qt.name
    tensors = []
    for src in sources:
        qt, reason = choose_type(src, policy)
        tensors.append(PlannedTensor(src, qt, reason))
    # a mix's own per-tensor choices are by design (--dry-run lists them); notes are for the rest
    notes = sorted({f"{t.name}: {t.qtype.name} ({t.reason})" for t in tensors
                    if t.reason and not t.reason.startswith(mixes.RULE_REASON)})
    return Plan(tensors, file_type, outtype, notes)


def parse_overrides(specs: list[str]) -> list[tuple[re.Pattern, str]]:
    out = []
    for spec in specs:
        if "=" not in spec:
            raise LlmconvError(f"--tensor-type {spec!r}: expected PATTERN=TYPE")
        pat, t = spec.rsplit("=", 1)
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise LlmconvError(f"--tensor-type {spec!r}: bad regex: {e}") from None
        _qtype(t, f"--tensor-type {spec!r}")
        out.append((rx, t.lower()))
    return out
