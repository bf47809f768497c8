"""K-quant file types ("mixes"): which block type each tensor of a LLaMA model gets.

A mix such as Q4_K_M is not one block type: llama-quantize gives most matrices the mix's base
type and a few sensitive ones more bits. The choices below are llama-quantize's for dense LLaMA
models without an importance matrix (llama.cpp's `llama_tensor_get_type`), written down as one
table that `tensor_type` reads:

    RULES              (mix, tensor kind, condition, type); the first row that matches wins,
                       no matching row means the mix's base type
    LLAMA_70B_ATTN_V   a last bump of attn_v on 80-layer GQA models (llama.cpp's "70B" type)
    EIGHT_EXPERTS      the very last word on attn_v/attn_k of 8-expert models (Mixtral), in every
                       quantized type, K-quant mix or not
    FALLBACK           the 32-block type used when a row does not split into 256-blocks

Layer-dependent conditions look at the tensor's layer index `i` and the layer count `n`,
with C's integer division (n/8 is n // 8 here: both are non-negative).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import LlamaFileType

from .. import quantize as q


@dataclass(frozen=True)
class Mix:
    name: str  # CLI name, lower case: "q4_k_m"
    file_type: LlamaFileType  # general.file_type
    base: str  # block type of every matrix no rule picks out


MIXES: dict[str, Mix] = {
    m.name: m
    for m in [
        Mix("q2_k", LlamaFileType.MOSTLY_Q2_K, "q2_k"),
        Mix("q3_k_s", LlamaFileType.MOSTLY_Q3_K_S, "q3_k"),
        Mix("q3_k_m", LlamaFileType.MOSTLY_Q3_K_M, "q3_k"),
        Mix("q3_k_l", LlamaFileType.MOSTLY_Q3_K_L, "q3_k"),
        Mix("q4_k_s", LlamaFileType.MOSTLY_Q4_K_S, "q4_k"),
        Mix("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M, "q4_k"),
        Mix("q5_k_s", LlamaFileType.MOSTLY_Q5_K_S, "q5_k"),
        Mix("q5_k_m", LlamaFileType.MOSTLY_Q5_K_M, "q5_k"),
        Mix("q6_k", LlamaFileType.MOSTLY_Q6_K, "q6_k"),
        Mix("iq4_nl", LlamaFileType.MOSTLY_IQ4_NL, "iq4_nl"),
        Mix("iq4_xs", LlamaFileType.MOSTLY_IQ4_XS, "iq4_xs"),
        Mix("iq2_xxs", LlamaFileType.MOSTLY_IQ2_XXS, "iq2_xxs"),
        Mix("iq2_xs", LlamaFileType.MOSTLY_IQ2_XS, "iq2_xs"),
        # llama.cpp's IQ2_S file is mostly IQ2_XS blocks, its IQ2_M mostly IQ2_S blocks
        Mix("iq2_s", LlamaFileType.MOSTLY_IQ2_S, "iq2_xs"),
        Mix("iq2_m", LlamaFileType.MOSTLY_IQ2_M, "iq2_s"),
        Mix("iq3_xxs", LlamaFileType.MOSTLY_IQ3_XXS, "iq3_xxs"),
        Mix("iq3_xs", LlamaFileType.MOSTLY_IQ3_XS, "iq3_s"),  # llama.cpp's IQ3_XS file is mostly IQ3_S
        Mix("iq3_s", LlamaFileType.MOSTLY_IQ3_S, "iq3_s"),
        Mix("iq3_m", LlamaFileType.MOSTLY_IQ3_M, "iq3_s"),
    ]
}

# llama-quantize's names without a size letter mean the medium mix.
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}


@dataclass(frozen=True)
class ModelShape:
    """The model facts the rules look at."""

    n_layers: int  # block count: the `n` of ffn_down's layer rules
    n_heads: int
    n_kv_heads: int
    n_attn_v: int | None = None  # attn_v tensors in the file (llama.cpp counts them); default n_layers
    n_expert: int = 0  # experts per MoE layer ({arch}.expert_count); 0 for a dense model

    @property
    def n_gqa(self) -> int:
        return self.n_heads // self.n_kv_heads if self.n_kv_heads else 0

    @property
    def is_llama_70b(self) -> bool:
        # llama.cpp's model type for an 80-layer llama whose K/V heads are shared
        return self.n_layers == 80 and self.n_heads != self.n_kv_heads


@dataclass(frozen=True)
class TensorInfo:
    kind: str  # "attn_v", "ffn_down", "attn_output", "output", ... (see tensor_kind)
    i: int  # layer index (0 for tensors outside the layers)
    n: int  # layer count the rule compares `i` with
    row: int  # row length (GGUF ne[0])
    model: ModelShape
    has_imatrix: bool = False  # llama-quantize was given an importance matrix


def _more_bits(t: TensorInfo) -> bool:
    # llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between
    return t.i < t.n // 8 or t.i >= 7 * t.n // 8 or (t.i - t.n // 8) % 3 == 2


CONDITIONS = {
    "always": lambda t: True,
    "n_gqa>=4": lambda t: t.model.n_gqa >= 4,
    "n_gqa>=4 or n_expert>=4": lambda t: t.model.n_gqa >= 4 or t.model.n_expert >= 4,
    "i<2": lambda t: t.i < 2,
    "i<4": lambda t: t.i < 4,
    "i<n/8": lambda t: t.i < t.n // 8,
    "i<n/16": lambda t: t.i < t.n // 16,
    "more_bits": _more_bits,
    "row%256==0": lambda t: t.row % 256 == 0,
    # llama.cpp singles out 8-expert models (Mixtral 8x7B/8x22B) by this exact count
    "n_expert==8": lambda t: t.model.n_expert == 8,
    "n_expert!=8": lambda t: t.model.n_expert != 8,
    "i<n/8 no imatrix": lambda t: t.i < t.n // 8 and not t.has_imatrix,
    "no imatrix": lambda t: not t.has_imatrix,
    "n/8<=i<7n/8": lambda t: t.n // 8 <= t.i < 7 * t.n // 8,
    "n_expert==8 and more_bits": lambda t: t.model.n_expert == 8 and _more_bits(t),
}

ALL = tuple(MIXES)
# The 2-bit grid mixes: llama-quantize's own branch of rules (no late bumps, see NO_LATE_BUMPS).
IQ2 = ("iq2_xxs", "iq2_xs", "iq2_s", "iq2_m")
IQ2_XXS_XS, IQ2_S_M = IQ2[:2], IQ2[2:]

# (mixes, tensor kind, condition, type). Order matters within a (mix, kind): first match wins.
RULES: list[tuple[tuple[str, ...], str, str, str]] = [
    # 2-bit grid mixes: output q5_K; the tensors llama.cpp deems sensitive get q2_K or iq3_S
    (IQ2, "output", "row%256==0", "q5_k"),
    (IQ2, "output", "always", "q8_0"),
    (IQ2_XXS_XS, "token_embd", "always", "q2_k"),
    (IQ2_S_M, "token_embd", "always", "iq3_s"),
    (IQ2, "attn_v", "n_gqa>=4 or n_expert>=4", "q4_k"),
    (IQ2_XXS_XS, "attn_v", "always", "q2_k"),
    (IQ2_S_M, "attn_v", "always", "iq3_s"),
    (IQ2, "attn_k", "n_expert==8", "q4_k"),
    (IQ2_XXS_XS, "ffn_down", "i<n/8", "q2_k"),
    (IQ2_S_M, "ffn_down", "i<n/8", "iq3_s"),
    (IQ2, "attn_output", "n_expert==8", "q5_k"),
    (IQ2_S_M, "attn_output", "always", "iq3_s"),
    # 3-bit grid mixes: iq3_xxs spends its bits on output/token_embd/attn_output and takes them
    # from attn_q/attn_k (iq2_s); iq3_xs puts the middle layers' q/k/gate/up in iq3_xxs
    (("iq3_xxs",), "output", "row%256==0", "q5_k"),
    (("iq3_xxs",), "token_embd", "always", "iq3_s"),
    (("iq3_xxs",), "attn_v", "n_gqa>=4", "q4_k"),
    (("iq3_xxs",), "attn_v", "no imatrix", "iq3_s"),
    (("iq3_xs", "iq3_s"), "attn_v", "n_gqa>=4", "q4_k"),
    (("iq3_m",), "attn_v", "always", "q4_k"),
    (("iq3_xs",), "attn_k", "always", "iq3_xxs"),
    (("iq3_xxs",), "attn_k", "always", "iq2_s"),
    (("iq3_xs",), "attn_q", "always", "iq3_xxs"),
    (("iq3_xxs",), "attn_q", "always", "iq2_s"),
    (("iq3_xxs",), "ffn_down", "i<n/8 no imatrix", "q4_k"),
    (("iq3_xxs",), "ffn_down", "no imatrix", "q3_k"),
    (("iq3_m",), "ffn_down", "i<n/8", "q4_k"),
    (("iq3_m",), "ffn_down", "n_expert==8 and more_bits", "q4_k"),
    (("iq3_xxs",), "attn_output", "n_expert!=8", "iq3_s"),
    (("iq3_m",), "attn_output", "n_expert!=8", "q4_k"),
    (("iq3_xs",), "ffn_gate", "n/8<=i<7n/8", "iq3_xxs"),
    (("iq3_xs",), "ffn_up", "n/8<=i<7n/8", "iq3_xxs"),
    # the output projection (and a tied token embedding, which serves as it) gets q6_K,
    # or q8_0 when its rows do not split into the mix's 256-blocks
    (ALL, "output", "row%256==0", "q6_k"),
    (ALL, "output", "always", "q8_0"),
    (("q2_k",), "attn_v", "n_gqa>=4", "q4_k"),
    (("q2_k",), "attn_v", "always", "q3_k"),
    (("q3_k_m",), "attn_v", "i<2", "q5_k"),
    (("q3_k_m",), "attn_v", "always", "q4_k"),
    (("q3_k_l",), "attn_v", "always", "q5_k"),
    (("q4_k_s",), "attn_v", "i<4", "q5_k"),
    (("q4_k_m", "q5_k_m"), "attn_v", "more_bits", "q6_k"),
    (("q2_k",), "ffn_down", "always", "q3_k"),
    (("q3_k_m",), "ffn_down", "i<n/16", "q5_k"),
    (("q3_k_m",), "ffn_down", "always", "q4_k"),
    (("q3_k_l",), "ffn_down", "always", "q5_k"),
    (("q4_k_s",), "ffn_down", "i<n/8", "q5_k"),
    (("q4_k_m", "q5_k_m"), "ffn_down", "more_bits", "q6_k"),
    (
        ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m", "iq4_nl", "iq4_xs", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m"),
        "attn_output",
        "n_expert==8",
        "q5_k",
    ),
    (("q2_k",), "attn_output", "n_expert!=8", "q3_k"),
    (("q3_k_m",), "attn_output", "n_expert!=8", "q4_k"),
    (("q3_k_l",), "attn_output", "n_expert!=8", "q5_k"),
    (("iq4_nl", "iq4_xs"), "attn_v", "n_gqa>=4", "q5_k"),
    (("iq4_nl", "iq4_xs"), "ffn_down", "i<n/8 no imatrix", "q5_k"),
]

# On llama.cpp's "70B" (80 layers, GQA) attn_v is 8x smaller than attn_q, so it gets q5_K cheaply.
LLAMA_70B_ATTN_V = {"q3_k": "q5_k", "q4_k": "q5_k"}

# On 8-expert models the attention is a small part of the file: attn_v and attn_k get q8_0
# ("trades just ~128MB" on Mixtral 8x7B), whatever the quantized type.
EIGHT_EXPERTS = {"attn_v": "q8_0", "attn_k": "q8_0"}

# A 256-block type whose row length is not a multiple of 256 falls back to a 32-block type of
# about the same size; if that does not fit either (row not a multiple of 32), f16.
FALLBACK = {
    "q2_k": "q4_0",
    "q3_k": "q4_0",
    "q4_k": "q5_0",
    "q5_k": "q5_1",
    "q6_k": "q8_0",
    "iq4_xs": "iq4_nl",
    "iq2_xxs": "iq4_nl",
    "iq2_xs": "iq4_nl",
    "iq2_s": "iq4_nl",
    "iq3_xxs": "iq4_nl",
    "iq3_s": "iq4_nl",
}

# Block types llama-quantize refuses to write without an imatrix ("this quantization requires an
# imatrix"; tensor_requires_imatrix), except into token_embd.weight and output.weight.
REQUIRES_IMATRIX = {"iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs"}
IMATRIX_EXEMPT = {"token_embd.weight", "output.weight"}

# Reasons that start with this are the mix working as designed, not something to warn about.
RULE_REASON = "mix rule"

_KINDS = ("attn_v", "attn_k", "attn_q", "ffn_down", "ffn_gate", "ffn_up", "attn_output")

# llama.cpp's IQ2 (and IQ1) branch of llama_tensor_get_type ends before the 70B attn_v bump and
# the 8-expert q8_0 bump, which the other mixes get.
NO_LATE_BUMPS = set(IQ2)


def find_mix(name: str) -> Mix | None:
    name = name.lower()
    return MIXES.get(ALIASES.get(name, name))


def tensor_kind(name: str, tied_embeddings: bool = False) -> str:
    """The kind a rule names: "output" for output.weight (and token_embd.weight when the
    model has no output.weight), "token_embd" for an untied token_embd.weight, the GGUF base name
    inside a layer, else "other"."""
    if name == "output.weight" or (tied_embeddings and name == "token_embd.weight"):
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    m = re.fullmatch(r"blk\.\d+\.(\w+)\.weight", name)
    if m and m.group(1) in _KINDS:
        return m.group(1)
    for kind in ("ffn_down", "ffn_gate", "ffn_up"):
        if m and m.group(1).startswith(kind):
            return kind  # the stacked experts, ffn_down_exps ...: llama.cpp matches the substring
    return "other"


def layer_index(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


def tensor_type(
    mix: Mix | str,
    name: str,
    shape: tuple[int, ...],
    model: ModelShape,
    tied_embeddings: bool = False,
    has_imatrix: bool = False,
) -> tuple[str, str]:
    """(block type, why) for one 2-D weight of `mix`. `shape` is numpy order (row length last).
    The reason is empty when the tensor simply gets the mix's base type."""
    if isinstance(mix, str):
        mix = find_mix(mix)
    kind = tensor_kind(name, tied_embeddings)
    n = (model.n_attn_v or model.n_layers) if kind == "attn_v" else model.n_layers
    info = TensorInfo(kind, layer_index(name), n, int(shape[-1]), model, has_imatrix)
    qtype, reason = mix.base, ""
    for mixes, rule_kind, cond, t in RULES:
        if mix.name in mixes and rule_kind == kind and CONDITIONS[cond](info):
            qtype, reason = t, f"{RULE_REASON} {mix.name}: {kind} {cond}"
            break
    if mix.name in NO_LATE_BUMPS:
        return qtype, reason
    if kind == "attn_v" and model.is_llama_70b and qtype in LLAMA_70B_ATTN_V:
        qtype, reason = LLAMA_70B_ATTN_V[qtype], f"{RULE_REASON} {mix.name}: attn_v on an 80-layer GQA model"
    qtype, reason = eight_expert_bump(qtype, reason, name, model)
    return qtype, reason  # the row-length fallback is the planner's (plan.choose_type)


def outtype_needs_imatrix(outtype: str) -> bool:
    """True for an --outtype llama-quantize only makes with an imatrix: a block type that needs
    one, or a mix whose base type or one of whose rules' types does (iq3_xs: attn_q iq3_xxs)."""
    mix = find_mix(outtype)
    if mix is None:
        return outtype.lower() in REQUIRES_IMATRIX
    return mix.base in REQUIRES_IMATRIX or any(mix.name in m and t in REQUIRES_IMATRIX for m, _, _, t in RULES)


def requires_imatrix(qtype: str, name: str) -> bool:
    """llama-quantize's tensor_requires_imatrix: writing `name` as `qtype` needs importance weights."""
    return qtype in REQUIRES_IMATRIX and name not in IMATRIX_EXEMPT


def eight_expert_bump(qtype: str, reason: str, name: str, model: ModelShape) -> tuple[str, str]:
    """llama-quantize's last rule for 8-expert models, for mixes and legacy types alike."""
    kind = tensor_kind(name)
    if model.n_expert == 8 and kind in EIGHT_EXPERTS:
        return EIGHT_EXPERTS[kind], f"{RULE_REASON}: {kind} of an 8-expert model"
    return qtype, reason


def fallback(qtype: str, row: int, reason: str = "") -> tuple[str, str]:
    """`qtype` if rows of length `row` split into its blocks, else llama-quantize's substitute."""
    block = q.get(qtype).block_size
    if row % block == 0:
        return qtype, reason
    sub = FALLBACK.get(qtype, "f16")
    if row % q.get(sub).block_size:
        sub = "f16"
    return sub, f"row length {row} does not fit {qtype} blocks of {block}: {sub} (llama-quantize's fallback)"


# With an imatrix llama-quantize gives q4_0/q5_0 files' first eighth of ffn_down layers the
# type with a min ("Guard against craziness in the first few ffn_down layers"); only then, so
# that files made without an imatrix stay as they were.
LEGACY_IMATRIX_FFN_DOWN = {"q4_0": "q4_1", "q5_0": "q5_1"}


def legacy_imatrix_type(outtype: str, name: str, n_ffn_down: int) -> str | None:
    """The type llama-quantize picks instead of `outtype` for tensor `name` when an imatrix is
    given, or None. `n_ffn_down` is the number of ffn_down tensors (llama.cpp's layer count here)."""
    if outtype not in LEGACY_IMATRIX_FFN_DOWN or tensor_kind(name) != "ffn_down":
        return None
    return LEGACY_IMATRIX_FFN_DOWN[outtype] if layer_index(name) < n_ffn_down // 8 else None
