"""The plan: every output tensor's GGUF name, shape, type and where its data comes from.

A source (Meta checkpoint, HF checkpoint, GGUF file) gives SourceTensors: lazy,
already named in GGUF terms. The plan picks a type for each; the executor then
loads, converts and writes them one at a time.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from gguf import MODEL_TENSOR, TENSOR_NAMES

from .. import quantize as q
from ..errors import LlmconvError
from . import mixes

if TYPE_CHECKING:
    from ..imatrix import Imatrix


@dataclass
class SourceTensor:
    name: str  # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # numpy order
    load: Callable[[], np.ndarray]  # -> float32 array of `shape`
    files: list[Path]  # where the bytes come from (for messages)
    source_name: str = ""  # name in the source, e.g. "layers.0.attention.wq.weight"
    source_dtype: str = ""  # "bf16", "f16", "f32", "q4_0", ...
    # a 3-D tensor stacked from 2-D sources (MoE experts): one loader per slice, so the writer
    # can convert slice by slice (convert/moe.py); `load` still returns the whole tensor
    parts: list[Callable[[], np.ndarray]] | None = None
    # rows [a, b) as float32 into out[b - a, n] (1-D tensors: one row); None: only `load` works.
    # Lets the streaming engine read a tensor chunk by chunk into reused buffers.
    read_rows: Callable[[int, int, np.ndarray], None] | None = None
    prefetch: Callable[[], None] | None = None  # start reading the bytes from disk (a hint)


class Why(enum.Enum):
    """Why a tensor gets its type. Notes are for the choices a user did not ask for by name."""

    REQUESTED = "requested"  # the --outtype (1-D tensors: f32)
    MIX_RULE = "mix rule"  # a K-quant mix's per-tensor rule: by design, --dry-run lists it
    OUTPUT = "output tensor"  # llama-quantize's higher-precision type for output.weight
    OVERRIDE = "override"  # --output-tensor-type, --token-embedding-type, --tensor-type
    FALLBACK = "fallback"  # the row length does not split into the wanted type's blocks


NOTED = (Why.OUTPUT, Why.OVERRIDE, Why.FALLBACK)


@dataclass
class PlannedTensor:
    src: SourceTensor
    qtype: q.QuantType
    reason: str = ""  # why this type, when it is not the requested one
    why: Why = Why.REQUESTED
    imatrix: np.ndarray | None = None  # the column importances its weighted kernel uses

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
    model: mixes.ModelShape | None = None  # what a mix's layer/GQA rules look at
    mix: mixes.Mix | None = None  # set from outtype when it names a K-quant mix
    imatrix: "Imatrix | None" = None  # llmconv.imatrix.Imatrix: weights + imatrix rules

    n_ffn_down: int = 0  # layers with ffn_down tensors (llama-quantize's n_layer for its rules)

    def __post_init__(self):
        if self.mix is None:
            self.mix = mixes.find_mix(self.outtype)


def _qtype(name: str, where: str) -> q.QuantType:
    try:
        return q.get(name)
    except KeyError:
        raise LlmconvError(f"{where}: {unknown_type_message(name)}") from None


def is_type_name(name: str) -> bool:
    """A name --outtype/--type takes (q4_0, q4_K_M, q4_k, f16; not 'auto')."""
    n = name.lower()
    return n in q.TYPES or n in mixes.MIXES or n in mixes.ALIASES


def check_type_name(name: str, where: str) -> None:
    """Refuse an unknown type before any file is opened, naming the option the user typed."""
    if not is_type_name(name):
        raise LlmconvError(f"{where}: {unknown_type_message(name, auto=False)}")


def unknown_type_message(name: str, auto: bool = True) -> str:
    """'unknown type ...; did you mean q4_K_M?' over every name --outtype takes."""
    import difflib

    known = [*q.TYPES, *mixes.MIXES, *mixes.ALIASES]
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
    hint = f"; did you mean {_display(close[0])}?" if close else ""
    names = dict.fromkeys(map(_display, sorted(known, key=lambda k: (k[0] != "f", k[:2] != "q8", k))))
    return f"unknown type {name!r}{hint} (known: {', '.join(names)}{', auto' if auto else ''})"


def _display(name: str) -> str:
    """llama.cpp's spelling: q4_K_M, q6_K, iq4_XS."""
    return re.sub(r"_k(_[sml])?$", lambda m: "_K" + (m.group(1) or "").upper(), name)


def choose_type(src: SourceTensor, policy: TypePolicy) -> tuple[q.QuantType, str, Why]:
    if len(src.shape) < 2 or not src.name.endswith(".weight") or src.name.endswith(".ffn_gate_inp.weight"):
        return q.get("f32"), "", Why.REQUESTED  # norms, biases, MoE routers: llama-quantize never touches them
    n = src.shape[-1]
    wanted, reason, why = policy.outtype, "", Why.REQUESTED
    output_name = tensor_name(MODEL_TENSOR.OUTPUT)
    embd_name = tensor_name(MODEL_TENSOR.TOKEN_EMBD)
    is_output = src.name == output_name or (policy.tied_embeddings and src.name == embd_name)
    if policy.mix is not None:
        if policy.pure:
            wanted = policy.mix.base
        else:
            if policy.model is None:
                raise LlmconvError(f"{policy.mix.name} needs the model's layer and head counts")
            wanted, reason = mixes.tensor_type(
                policy.mix, src.name, src.shape, policy.model, policy.tied_embeddings, policy.imatrix is not None
            )
            why = Why.MIX_RULE if reason else Why.REQUESTED
    elif (
        not policy.pure
        and policy.imatrix is not None
        and mixes.legacy_imatrix_type(wanted, src.name, policy.n_ffn_down) is not None
    ):
        wanted = mixes.legacy_imatrix_type(wanted, src.name, policy.n_ffn_down)
        why = Why.MIX_RULE
        reason = f"{mixes.RULE_REASON} {policy.outtype} with an imatrix: ffn_down in the first eighth of the layers"
    elif not policy.pure and wanted not in FLOAT_TYPES and is_output and wanted != "q8_0":
        why = Why.OUTPUT
        if OUTPUT_UPGRADE in q.TYPES and q.get(OUTPUT_UPGRADE).can_hold_row(n):
            wanted, reason = OUTPUT_UPGRADE, "output tensor: llama-quantize's higher-precision choice"
        else:
            wanted, reason = "q8_0", "output tensor: q8_0 (llama-quantize would pick q6_K, which cannot hold this row)"
    if policy.mix is None and not policy.pure and wanted not in FLOAT_TYPES and policy.model is not None:
        bumped, reason = mixes.eight_expert_bump(wanted, reason, src.name, policy.model)
        why = Why.MIX_RULE if bumped != wanted else why
        wanted = bumped
    if src.name == output_name and policy.output_type:
        wanted, reason, why = policy.output_type, "--output-tensor-type", Why.OVERRIDE
    if src.name == embd_name and policy.token_embd_type:
        wanted, reason, why = policy.token_embd_type, "--token-embedding-type", Why.OVERRIDE
    for pattern, t in policy.overrides:
        if pattern.search(src.name):
            wanted, reason, why = t, f"--tensor-type {pattern.pattern}={t}", Why.OVERRIDE
            break
    qt = _qtype(wanted, src.name)
    if not qt.can_hold_row(n) and policy.mix is not None and why is not Why.OVERRIDE:
        # llama-quantize substitutes a 32-block type even with --pure
        wanted, reason = mixes.fallback(wanted, n)
        why = Why.FALLBACK
        qt = _qtype(wanted, src.name)
    if not qt.can_hold_row(n):
        if policy.pure or why is Why.OVERRIDE:
            raise LlmconvError(
                f"row length {n} is not a multiple of {qt.name}'s block size {qt.block_size}",
                file=src.files[0] if src.files else None,
                tensor=src.name,
            )
        reason, why = f"row length {n} does not fit {qt.name} blocks of {qt.block_size}: f16", Why.FALLBACK
        qt = q.get("f16")
    return qt, reason, why


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
    # llama-quantize's count is the layer count; a Llama 4 MoE layer has two ffn_down tensors (experts, shared)
    policy = dataclasses.replace(
        policy, n_ffn_down=len({mixes.layer_index(s.name) for s in sources if mixes.tensor_kind(s.name) == "ffn_down"})
    )
    tensors = []
    for src in sources:
        qt, reason, why = choose_type(src, policy)
        weights = None
        if policy.imatrix is not None and qt.quantize_weighted is not None:
            n_mat = src.shape[0] if len(src.shape) == 3 else 1  # stacked experts: a slice each
            weights = policy.imatrix.for_tensor(src.name, src.shape[-1], n_mat)
        # (an empty Imatrix is convert --dry-run --imatrix-text's stand-in: nothing computed yet)
        if (
            weights is None
            and (qt.requires_imatrix or mixes.requires_imatrix(qt.name, src.name))
            and (policy.imatrix is None or policy.imatrix.entries)
        ):
            raise LlmconvError(_imatrix_missing(qt.name, policy.imatrix is not None), tensor=src.name)
        tensors.append(PlannedTensor(src, qt, reason, why, weights))
    return Plan(tensors, file_type, outtype, plan_notes(tensors))


def _imatrix_missing(qtype: str, have_one: bool) -> str:
    if have_one:  # llama-quantize: "Missing importance matrix for tensor ... in a very low-bit quantization"
        return f"the imatrix has no entry for this tensor, which {qtype} needs (llama-quantize refuses too)"
    return (
        f"{qtype} needs an importance matrix, as llama-quantize requires one: "
        f"give --imatrix FILE (convert also takes --imatrix-text builtin)"
    )


def plan_notes(tensors: list[PlannedTensor]) -> list[str]:
    """One note per kind of choice the user did not name, not one per tensor: on a 30-layer
    model, "150 tensors: q5_0 (row length 576 ...): attn_k, attn_output, ... in all 30 layers"."""
    groups: dict[tuple[str, str], list[str]] = {}
    for t in tensors:
        if t.why in NOTED:
            groups.setdefault((t.qtype.name, t.reason), []).append(t.name)
    layers = {int(m.group(1)) for t in tensors if (m := _LAYER.match(t.name))}
    notes = []
    for (qname, reason), names in groups.items():
        if len(names) == 1:
            notes.append(f"{names[0]}: {qname} ({reason})")
        else:
            notes.append(f"{len(names)} tensors: {qname} ({reason}): {_name_summary(names, len(layers))}")
    return sorted(notes)


_LAYER = re.compile(r"blk\.(\d+)\.(.+)$")


def _name_summary(names: list[str], n_layers: int) -> str:
    """'attn_k, ffn_up in all 30 layers; output.weight' -- layer tensors by kind and layer set."""
    by_kind: dict[str, set[int]] = {}
    other = []
    for name in names:
        m = _LAYER.match(name)
        if m:
            by_kind.setdefault(m.group(2).removesuffix(".weight"), set()).add(int(m.group(1)))
        else:
            other.append(name)
    by_layers: dict[tuple[int, ...], list[str]] = {}
    for kind, ls in by_kind.items():
        by_layers.setdefault(tuple(sorted(ls)), []).append(kind)
    parts = [f"{', '.join(sorted(kinds))} in {_layer_set(ls, n_layers)}" for ls, kinds in sorted(by_layers.items())]
    return "; ".join(parts + sorted(other))


def _layer_set(layers: tuple[int, ...], n_layers: int) -> str:
    if len(layers) == n_layers and n_layers > 1:
        return f"all {n_layers} layers"
    runs, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + (None,)):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(runs)


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
