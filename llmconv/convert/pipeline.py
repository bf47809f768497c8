"""`llmconv convert`: checkpoint directory -> plan -> GGUF file."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFValueType as T
from gguf import GGML_QUANT_VERSION, Keys
from gguf.utility import naming_convention

from ..errors import LlmconvError
from ..formats.gguf_writer import KV
from .gguf_source import GGUFSource, open_gguf_source
from ..formats.gguf_reader import check_write_caps
from .guards import check_tensor_names
from .hparams import LlamaHParams
from .metadata import (
    apply_kv_overrides,
    default_file_name,
    general_kvs,
    llama_kvs,
    load_model_metadata,
    parse_override_kv,
    vocab_kvs,
)
from . import moe
from .mixes import ModelShape
from .plan import Plan, TypePolicy, make_plan
from .sources import Source, open_source


@dataclass
class Conversion:
    """Everything decided before any data is written."""

    source: Source
    plan: Plan
    kvs: list[KV]
    name: str
    out_path: Path

    @property
    def hparams(self) -> LlamaHParams:
        return self.source.hparams

    @property
    def warnings(self) -> list[str]:
        return self.source.warnings


def resolve_outtype(outtype: str, source_dtype: str) -> str:
    """`auto` keeps the source precision: bf16 stays bf16, f16 stays f16, f32 stays f32."""
    outtype = outtype.lower()
    if outtype == "auto":
        return source_dtype if source_dtype in ("f32", "f16", "bf16") else "f16"
    return outtype


def plan_conversion(
    model_dir: str | Path,
    *,
    outtype: str = "auto",
    outfile: str | Path | None = None,
    ctx: int | None = None,
    pure: bool = False,
    output_type: str | None = None,
    token_embd_type: str | None = None,
    overrides=(),
    input_format: str = "auto",
    pre: str | None = None,
    tokenizer: str | Path | None = None,
    lora=(),
    metadata: str | Path | None = None,
    override_kv=(),
    imatrix=None,
    source: Source | None = None,
) -> Conversion:
    """`lora`: (adapter dir, scale) pairs, merged into the weights as they are loaded (convert/lora.py);
    `tokenizer`: --tokenizer, a tokenizer file or folder used instead of the checkpoint's own;
    `metadata`: --metadata FILE.json over the model card; `override_kv`: --override-kv specs.
    `source` reuses an already opened (and merged) checkpoint: several types from one read.
    `outfile` may be a directory, written with a trailing slash."""
    src = source
    if src is None:
        src = open_source(model_dir, input_format, ctx, pre, tokenizer)
        if lora:
            from .lora import apply_adapters

            apply_adapters(src, lora)
    h = src.hparams
    check_tensor_names(src.tensors, h.n_layers, src.path)
    # precision of the weights: a computed 1-D tensor (rope_freqs, f32) may come first
    weights_dtype = next((t.source_dtype for t in src.tensors if len(t.shape) > 1), src.tensors[0].source_dtype)
    outtype = resolve_outtype(outtype, weights_dtype)
    policy = TypePolicy(
        outtype,
        pure=pure,
        tied_embeddings=h.tied_embeddings,
        output_type=output_type,
        token_embd_type=token_embd_type,
        overrides=list(overrides),
        model=ModelShape(h.n_layers, h.n_heads, h.n_kv_heads, n_expert=h.n_expert),
        imatrix=imatrix,
    )
    plan = make_plan(src.tensors, policy)
    plan.notes[:0] = src.notes
    md = load_model_metadata(
        src.path,
        plan.n_params,
        Path(metadata) if metadata is not None else None,
        experts=moe.expert_params(plan.tensors),
    )
    out_path = output_path(outfile, default_file_name(md, plan.outtype))
    kvs = general_kvs(md, plan.file_type, h.arch) + llama_kvs(h) + list(src.extra_kvs) + vocab_kvs(src.vocab)
    kvs = apply_kv_overrides(kvs, [parse_override_kv(o) for o in override_kv])
    check_write_caps(kvs, src.path)
    return Conversion(src, plan, kvs, md.name, out_path)


def is_dir_arg(outfile: str | Path | None) -> bool:
    """`-o DIR/`: only a trailing slash makes -o a directory (an existing directory named like
    the output file is refused by the writer, not silently written into)."""
    return outfile is not None and str(outfile).endswith(("/", os.sep))


def output_path(outfile: str | Path | None, default_name: str) -> Path:
    """-o FILE, -o DIR/ (the default name in DIR) or nothing (the default name here)."""
    if outfile is None:
        return Path.cwd() / default_name
    return Path(outfile) / default_name if is_dir_arg(outfile) else Path(outfile)


def split_types(text: str) -> list[str]:
    """'q8_0,q6_K, q4_K_M' -> ['q8_0', 'q6_K', 'q4_K_M'] (several outputs from one read)."""
    types = [t.strip() for t in str(text).split(",") if t.strip()]
    if not types:
        raise LlmconvError(f"no output type in {text!r}")
    return types


def _several(items: list, outfile, what: str) -> list:
    if len(items) > 1 and outfile is not None and not is_dir_arg(outfile):
        raise LlmconvError(
            f"several output types write several files: -o must be a directory (e.g. -o {outfile}/), not a file name",
            file=Path(outfile),
        )
    seen: dict[Path, str] = {}
    for it in items:
        if it.out_path in seen:
            raise LlmconvError(
                f"{what} {seen[it.out_path]} and {it.plan.outtype} would both write this file", file=it.out_path
            )
        seen[it.out_path] = it.plan.outtype
    return items


def plan_conversions(
    model_dir: str | Path, outtypes: list[str], outfile: str | Path | None = None, **kw
) -> list[Conversion]:
    """One Conversion per type, all over one opened source (read once by write_ggufs)."""
    first = plan_conversion(model_dir, outtype=outtypes[0], outfile=outfile, **kw)
    rest = [plan_conversion(model_dir, outtype=t, outfile=outfile, source=first.source, **kw) for t in outtypes[1:]]
    return _several([first] + rest, outfile, "types")


def describe_plan(conv: Conversion) -> str:
    h = conv.hparams
    w = max([34] + [len(t.src.source_name + " " + t.src.source_dtype) for t in conv.plan.tensors])
    lines = [
        f"source   {conv.source.path}  ({conv.source.kind}, {h.family}, {conv.source.n_files} file(s))",
        f"model    dim {h.dim}, layers {h.n_layers}, heads {h.n_heads}/{h.n_kv_heads} kv, ffn {h.ffn_dim}, "
        f"vocab {h.vocab_size}, ctx {h.context_length}, rope_theta {h.rope_theta:g}, eps {h.norm_eps:g}"
        + (f", experts {h.n_expert} ({h.n_expert_used} per token)" if h.n_expert else ""),
        f"output   {conv.out_path}  ({conv.plan.outtype}, general.file_type {conv.plan.file_type})",
        "",
        f"{'GGUF name':30s} {'source':{w}s} {'shards':>6s} {'shape':>14s} {'type':>6s} {'bytes':>14s}",
    ]
    for t in conv.plan.tensors:
        shape = "x".join(str(d) for d in t.shape)
        lines.append(
            f"{t.name:30s} {t.src.source_name + ' ' + t.src.source_dtype:{w}s} {len(t.src.files):>6d} "
            f"{shape:>14s} {t.qtype.name:>6s} {t.nbytes:>14,d}"
        )
    lines.append(
        f"{len(conv.plan.tensors)} tensors, {conv.plan.n_params:,d} parameters, "
        f"{conv.plan.nbytes / 2**20:,.1f} MiB of tensor data"
    )
    lines += [f"note: {n}" for n in conv.plan.notes] + [f"warning: {w}" for w in conv.warnings]
    return "\n".join(lines)


def plan_json(conv: Conversion) -> dict:
    return {
        "source": str(conv.source.path),
        "input_format": conv.source.kind,
        "output": str(conv.out_path),
        "outtype": conv.plan.outtype,
        "file_type": conv.plan.file_type,
        "hparams": {k: getattr(conv.hparams, k) for k in conv.hparams.__dataclass_fields__},
        "n_params": conv.plan.n_params,
        "nbytes": conv.plan.nbytes,
        "tensors": [
            {
                "name": t.name,
                "source": t.src.source_name,
                "files": [str(f) for f in t.src.files],
                "shape": list(t.shape),
                "type": t.qtype.name,
                "bytes": t.nbytes,
                "reason": t.reason,
            }
            for t in conv.plan.tensors
        ],
        "notes": conv.plan.notes,
        "warnings": conv.warnings,
    }


@dataclass
class Requantization:
    source: GGUFSource
    plan: Plan
    kvs: list[KV]
    out_path: Path
    warnings: list[str]


def gguf_model_shape(src: GGUFSource) -> ModelShape | None:
    """Layer and head counts from a GGUF's {arch}.* keys, as llama.cpp reads them
    (head_count_kv defaults to head_count; per-layer arrays: layer 0)."""
    kv = {k.key: k.value for k in src.kvs}

    def first(key):
        v = kv.get(key.format(arch=src.arch))
        return v[0] if not isinstance(v, (int, float, str, bytes, type(None))) and len(v) else v  # per-layer array

    n_layers, n_heads = first(Keys.LLM.BLOCK_COUNT), first(Keys.Attention.HEAD_COUNT)
    if n_layers is None or n_heads is None:
        return None
    n_kv = first(Keys.Attention.HEAD_COUNT_KV)
    return ModelShape(
        int(n_layers),
        int(n_heads),
        int(n_heads if n_kv is None else n_kv),
        n_expert=int(first(Keys.LLM.EXPERT_COUNT) or 0),
    )


def requantized_name(src: GGUFSource, outtype: str) -> str:
    """The name convert would give the model, from the input's general.* keys
    (Name-Size-Finetune-Version-TYPE.gguf, llama.cpp's convention). Without general.name or
    general.basename: the input's file name with its type label replaced or added
    (model-F16.gguf -> model-Q4_K_M.gguf)."""
    from .. import quantize as q
    from .mixes import MIXES

    kv = {k.key: k.value for k in src.kvs}
    g = Keys.General
    parts = [kv.get(key) for key in (g.NAME, g.BASENAME, g.FINETUNE, g.VERSION, g.SIZE_LABEL)]
    parts = [_name_part(p) if isinstance(p, str) and p.strip() else None for p in parts]
    if parts[0] is not None or parts[1] is not None:
        return naming_convention(*parts, outtype.upper()) + ".gguf"
    name = src.path.name
    stem = name[:-5] if name.endswith(".gguf") else src.path.stem
    head, _, last = stem.rpartition("-")
    if head and (last.lower() in q.TYPES or last.lower() in MIXES):
        stem = head
    return f"{stem}-{outtype.upper()}.gguf"


def _name_part(text: str) -> str:
    """A metadata string made safe inside a file name: no path separators, no control characters."""
    return re.sub(r"[\x00-\x1f\x7f/\\]", "-", text)


def plan_requantize(
    in_path: str | Path,
    out_path: str | Path | None,
    qtype: str,
    *,
    pure: bool = False,
    output_type: str | None = None,
    token_embd_type: str | None = None,
    overrides=(),
    allow_requantize: bool = False,
    override_kv=(),
    imatrix=None,
    source: GGUFSource | None = None,
) -> Requantization:
    src = source or open_gguf_source(in_path, allow_requantize=allow_requantize)
    policy = TypePolicy(
        qtype.lower(),
        pure=pure,
        tied_embeddings=src.tied_embeddings,
        output_type=output_type,
        token_embd_type=token_embd_type,
        overrides=list(overrides),
        model=gguf_model_shape(src),
        imatrix=imatrix,
    )
    plan = make_plan(src.tensors, policy)
    kvs = list(src.kvs)
    # general.file_type and quantization_version go right after the other general.* keys
    at = max((i + 1 for i, kv in enumerate(kvs) if kv.key.startswith("general.")), default=0)
    kvs[at:at] = [
        KV(Keys.General.FILE_TYPE, plan.file_type, T.UINT32),
        KV(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION, T.UINT32),
    ]
    kvs = apply_kv_overrides(kvs, [parse_override_kv(o) for o in override_kv])
    # no OUT: next to the input, as llama-quantize writes [IN's directory]/ggml-model-TYPE.gguf
    out = output_path(
        out_path if out_path is not None else f"{Path(in_path).parent}{os.sep}", requantized_name(src, plan.outtype)
    )
    if out.exists() and Path(in_path).exists() and os.path.samefile(in_path, out):
        # the input is read while the output is written: even with --force this would destroy it
        raise LlmconvError("the output is the input file; write to another path", file=out)
    return Requantization(src, plan, kvs, out, requantize_warnings(src, plan.outtype))


def requantize_warnings(src: GGUFSource, outtype: str) -> list[str]:
    """llama-quantize's --allow-requantize warning: a quantized input's rounding errors stay in,
    and the new quantization adds its own on top."""
    quantized = sorted({t.name for t in src.source_types.values()} - {"F32", "F16", "BF16"})
    if not quantized:
        return []
    n = sum(t.name in quantized for t in src.source_types.values())
    return [
        f"{src.path}: {n} of {len(src.source_types)} tensors are already quantized ({', '.join(quantized)}); "
        f"requantizing them to {outtype} keeps their rounding errors and adds new ones, which can severely "
        f"reduce quality: quantize from the f16/bf16/f32 file if you have it"
    ]


def plan_requantizes(in_path: str | Path, out_path: str | Path | None, qtypes: list[str], **kw) -> list[Requantization]:
    first = plan_requantize(in_path, out_path, qtypes[0], **kw)
    rest = [plan_requantize(in_path, out_path, t, source=first.source, **kw) for t in qtypes[1:]]
    return _several([first] + rest, out_path, "types")
