"""`llmconv convert --format ggml`: a Conversion -> one legacy ggjt v3 file.

ggjt v3 is what llama.cpp read from May to August 2023 and what pre-GGUF runtimes
(ctransformers, old llama-cpp-python, koboldcpp, ...) still read. Its header holds seven
integers; everything else about the model is assumed by the loader:

    RoPE base 10000 on adjacent pairs, no grouped-query attention, a SentencePiece
    vocabulary with BOS 1 / EOS 2, the RMS norm epsilon and the context length supplied
    at load time, the feed-forward size derived from n_mult.

A model that differs where a loader cannot be told is refused (it would load and then
compute something else); where a loader can be told (epsilon, context) the conversion
warns and says what to tell it.
"""

from __future__ import annotations

import errno
import re
import time
from dataclasses import replace
from pathlib import Path

from gguf import MODEL_TENSOR, TokenType

from ..errors import LlmconvError
from ..formats.atomic import atomic_output
from ..formats.ggml_reader import ASSUMED_CONTEXT, ASSUMED_NORM_EPS, ASSUMED_ROPE_THETA, read_ggml
from ..formats.ggml_writer import GGJT_TYPES, GGJTFileWriter, GGJTHParams, GGJTTensor, find_n_mult, plan_layout
from ..progress import byte_bar
from . import stream
from .execute import WriteResult
from .pipeline import Conversion, plan_conversion
from .plan import META_GLOBAL_NAMES, META_LAYER_NAMES, PlannedTensor, tensor_name
from .tokenizer import Vocab

LOADER_ROPE_BASE = ASSUMED_ROPE_THETA
LOADER_RMS_EPS = ASSUMED_NORM_EPS  # ctransformers and llama.cpp from late July 2023 (LLAMA_DEFAULT_RMS_EPS)
LOADER_BOS, LOADER_EOS = 1, 2
TYPE_NAMES = "f32, f16, q4_0, q4_1, q8_0"

# GGUF name -> Meta name, the names ggjt files use
_GLOBAL = {tensor_name(kind): meta for meta, kind in META_GLOBAL_NAMES.items()}
_LAYER = {tensor_name(kind, 0).split(".", 2)[2]: meta for meta, kind in META_LAYER_NAMES.items()}


def ggjt_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    raise LlmconvError("no ggjt name for this tensor: ggjt files hold only LLaMA's own tensors", tensor=gguf_name)


def ggjt_vocab(vocab: Vocab) -> list[tuple[bytes, float]]:
    """Token bytes as ggjt loaders match them against raw text (they never see U+2581):
    U+2581 becomes a space, a byte token <0xNN> the byte itself, control tokens nothing,
    the unknown token " \u2047 ". Added (user-defined) tokens keep their text."""
    out = []
    for text, score, ttype in zip(vocab.tokens, vocab.scores, vocab.token_types):
        if ttype == TokenType.UNKNOWN:
            text = " \u2047 ".encode()
        elif ttype == TokenType.CONTROL:
            text = b""
        elif ttype == TokenType.BYTE:
            m = re.fullmatch(rb"<0x([0-9A-Fa-f]{2})>", text)
            if not m:
                raise LlmconvError(f"byte token {text!r} is not of the form <0xNN>", file=vocab.source)
            text = bytes([int(m.group(1), 16)])
        elif ttype != TokenType.USER_DEFINED:
            text = text.replace("\u2581".encode(), b" ")
        out.append((text, float(score)))
    return out


def check_ggjt(conv: Conversion) -> list[str]:
    """Refuse what ggjt cannot hold; return warnings for what the loader must be told."""
    h = conv.hparams
    src = conv.source.path
    if conv.source.vocab.model != "llama":
        raise LlmconvError(
            f"the tokenizer is {conv.source.vocab.model!r} (byte-level BPE); ggjt loaders read only "
            "SentencePiece vocabularies: use --format gguf",
            file=src,
        )
    if h.n_expert:
        raise LlmconvError(
            f"a mixture of experts ({h.n_expert} experts) cannot be recorded in a ggjt file: use --format gguf",
            file=src,
        )
    if h.head_dim * h.n_heads != h.dim:
        raise LlmconvError(
            f"head size {h.head_dim} != dim / n_heads = {h.dim // h.n_heads} cannot be recorded in a "
            "ggjt file; its loaders assume dim / n_heads: use --format gguf",
            file=src,
        )
    if h.n_kv_heads != h.n_heads:
        raise LlmconvError(
            f"grouped-query attention (n_kv_heads {h.n_kv_heads} != n_heads {h.n_heads}) cannot be "
            "recorded in a ggjt file; its loaders assume n_kv_heads == n_heads: use --format gguf",
            file=src,
        )
    if h.rope_theta != LOADER_ROPE_BASE:
        raise LlmconvError(
            f"RoPE base {h.rope_theta:g} cannot be recorded in a ggjt file; its loaders use "
            f"{LOADER_ROPE_BASE:g}: use --format gguf",
            file=src,
        )
    rope_keys = [kv.key for kv in conv.source.extra_kvs if "rope" in kv.key]
    if rope_keys:
        raise LlmconvError(
            f"RoPE scaling ({', '.join(rope_keys)}) cannot be recorded in a ggjt file: use --format gguf", file=src
        )
    warnings = []
    if h.norm_eps != LOADER_RMS_EPS:
        warnings.append(
            f"ggjt files do not record the RMS norm epsilon ({h.norm_eps:g} for this model): loaders assume "
            f"{LOADER_RMS_EPS:g} (ctransformers, llama.cpp from late July 2023) or 1e-06 (earlier llama.cpp); "
            f"pass {h.norm_eps:g} where the loader takes it (llama.cpp --rms-norm-eps)"
        )
    warnings.append(
        f"ggjt files do not record the context length ({h.context_length} for this model): loaders use "
        f"the one they are given (llama.cpp -c, ctransformers context_length=; both default to {ASSUMED_CONTEXT})"
    )
    v = conv.source.vocab
    if (v.bos_id, v.eos_id) != (LOADER_BOS, LOADER_EOS):
        warnings.append(f"BOS/EOS are tokens {v.bos_id}/{v.eos_id}, but ggjt loaders use {LOADER_BOS}/{LOADER_EOS}")
    dropped = [kv.key for kv in conv.source.extra_kvs]
    if dropped:
        warnings.append(f"not representable in ggjt, dropped: {', '.join(dropped)}")
    return warnings


def ggjt_hparams(conv: Conversion) -> GGJTHParams:
    h = conv.hparams
    n_mult = find_n_mult(h.dim, h.ffn_dim, h.multiple_of)
    if n_mult is None:
        raw = 8 * h.dim // 3
        raise LlmconvError(
            f"feed-forward size {h.ffn_dim} cannot be expressed in a ggjt file: its loaders compute "
            f"it from dim {h.dim} as ceil({raw} / n_mult) * n_mult, which is never below {raw} "
            "(use --format gguf)",
            file=conv.source.path,
        )
    return GGJTHParams(
        n_vocab=len(conv.source.vocab),
        n_embd=h.dim,
        n_mult=n_mult,
        n_head=h.n_heads,
        n_layer=h.n_layers,
        n_rot=h.rope_dim,
        ftype=conv.plan.file_type,
    )


def ggjt_tensors(conv: Conversion) -> list[tuple[PlannedTensor, GGJTTensor]]:
    planned = list(conv.plan.tensors)
    out_name, embd_name = tensor_name(MODEL_TENSOR.OUTPUT), tensor_name(MODEL_TENSOR.TOKEN_EMBD)
    if not any(t.name == out_name for t in planned):
        # tied embeddings: ggjt loaders require output.weight, so write the embedding twice
        embd = next(t for t in planned if t.name == embd_name)
        planned.append(replace(embd, src=replace(embd.src, name=out_name)))
    out = []
    for t in planned:
        if t.qtype.ggml_type not in GGJT_TYPES:
            where = t.src.files[0] if t.src.files else None
            raise LlmconvError(
                f"type {t.qtype.name} cannot be stored in a ggjt v3 file (only {TYPE_NAMES})", file=where, tensor=t.name
            )
        out.append((t, GGJTTensor(ggjt_name(t.name), t.shape, t.qtype.ggml_type, t.nbytes)))
    return out


def plan_ggml_conversion(
    model_dir: str | Path, *, outtype: str = "auto", outfile: str | Path | None = None, **kw
) -> Conversion:
    """plan_conversion for a ggjt file: every 2-D weight in the requested type (ggjt-era
    loaders know no per-tensor upgrades), 'auto' is f16 unless the source is f32, and the
    default file name ends in .bin."""
    kw["pure"] = True
    conv = plan_conversion(model_dir, outtype=outtype, outfile=outfile, **kw)
    if outtype.lower() == "auto" and conv.plan.outtype not in ("f32", "f16"):
        conv = plan_conversion(model_dir, outtype="f16", outfile=outfile, **kw)
    if outfile is None:
        conv.out_path = conv.out_path.with_suffix(".bin")
    for w in check_ggjt(conv):
        conv.warnings.append(w)
    ggjt_hparams(conv)
    ggjt_tensors(conv)
    return conv


def write_ggml(
    conv: Conversion, threads: int = 1, progress: bool = True, force: bool = False, verbose: bool = False
) -> WriteResult:
    check_ggjt(conv)  # refuses what ggjt cannot hold, also for a Conversion planned elsewhere
    hparams = ggjt_hparams(conv)
    pairs = ggjt_tensors(conv)
    layout = plan_layout(hparams, ggjt_vocab(conv.source.vocab), [g for _, g in pairs])
    out_path = Path(conv.out_path)
    start = time.perf_counter()
    with atomic_output(out_path, force=force) as tmp:
        try:
            with GGJTFileWriter(tmp, layout) as writer, byte_bar(layout.total_size, out_path.name, progress) as bar:
                bar.update(len(layout.header))

                def done(job: stream.Job, t: PlannedTensor, g) -> None:
                    writer.mark_written(g.name)
                    if verbose:
                        bar.write(f"  {g.name:36s} {t.qtype.name:6s} {str(t.shape):18s} {t.nbytes:>12,d} B")

                # the same engine as GGUF output: chunks read once, converted and pwritten by workers
                jobs = [
                    stream.Job(
                        t.src,
                        [
                            stream.Sink(
                                t.qtype, writer.fd, writer.place(g.name), getattr(t, "imatrix", None), writer.direct_fd
                            )
                        ],
                        done=lambda job, t=t, g=g: done(job, t, g),
                    )
                    for t, g in pairs
                ]
                stream.run(jobs, threads, progress=bar.update)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise LlmconvError(f"write failed: {e.strerror}", file=out_path) from None
            raise
        check_written(Path(tmp.read_path), hparams, layout, out_path)
    return WriteResult(out_path, len(pairs), layout.total_size, time.perf_counter() - start, paths=[out_path])


def check_written(path: Path, hparams: GGJTHParams, layout, label: Path) -> None:
    """Re-read the header and every tensor record just written and compare with the layout."""
    size = path.stat().st_size
    if size != layout.total_size:
        raise LlmconvError(f"written size {size} != planned {layout.total_size}", file=label)
    g = read_ggml(path)
    got_h = (
        g.hparams.n_vocab,
        g.hparams.n_embd,
        g.hparams.n_mult,
        g.hparams.n_head,
        g.hparams.n_layer,
        g.hparams.n_rot,
        g.hparams.ftype,
    )
    want_h = (
        hparams.n_vocab,
        hparams.n_embd,
        hparams.n_mult,
        hparams.n_head,
        hparams.n_layer,
        hparams.n_rot,
        hparams.ftype,
    )
    if (g.magic, g.version, got_h) != ("ggjt", 3, want_h):
        raise LlmconvError(f"re-read header disagrees: {g.magic} v{g.version} {got_h} != ggjt v3 {want_h}", file=label)
    got = [(t.name, t.ggml_type, t.shape, t.offset, t.nbytes) for t in g.tensors]
    want = [(t.name, int(t.ggml_type), t.shape, t.data_offset, t.nbytes) for t in layout.tensors]
    for a, b in zip(got, want):
        if a != b:
            raise LlmconvError(f"re-read tensor record disagrees: {a[1:]} != {b[1:]}", file=label, tensor=b[0])
    if len(got) != len(want):
        raise LlmconvError(f"re-read {len(got)} tensors, wrote {len(want)}", file=label)
