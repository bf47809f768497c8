"""llmconv's public API: each command as one function that returns a result dataclass.

    import llmconv
    r = llmconv.convert("path/to/llama-2-7b", "out/", outtype="q8_0,q4_K_M")
    llmconv.verify(r.paths[0], "path/to/llama-2-7b").passed

`llmconv.convert`, `llmconv.quantize`, `llmconv.verify` and `llmconv.imatrix` call these
(see llmconv/__init__.py); `llmconv.inspect` and `llmconv.convert_lora` are these. The command
line (cli.py, convert/command.py, verify/command.py, imatrix/command.py) parses options,
calls one of them and prints the result (results.py: the result dataclasses). Bad input raises LlmconvError (errors.py).
Imports are inside the functions: `import llmconv` stays quick and loads no torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

from .errors import LlmconvError
from .results import ConvertLoraResult, ConvertResult, ImatrixResult, InspectResult, QuantizeResult, VerifyResult


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_size(text: str | int) -> int:
    """'4G' -> 4 * 2**30; plain numbers are bytes."""
    if isinstance(text, int):
        return text
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(num)
    except ValueError:
        raise LlmconvError(f"--split-max-size {text!r}: expected a size like 4G or 500M") from None
    if not math.isfinite(value) or value < 0 or value * units[unit] >= 2**63:
        raise LlmconvError(f"--split-max-size {text!r}: expected a finite, non-negative size below 8 EiB")
    return int(value * units[unit])


def _imatrix(imatrix):
    """An Imatrix, a path to an imatrix file, or None."""
    if imatrix is None or not isinstance(imatrix, (str, Path)):
        return imatrix
    from .imatrix import read_imatrix

    return read_imatrix(Path(imatrix))


def _lora_specs(lora) -> list[tuple[Path, float]]:
    """'ADAPTER[:SCALE]' strings or (adapter dir, scale) pairs."""
    if not lora:
        return []  # without adapters, no import of convert.lora (and of torch with it)
    from .convert.lora import parse_lora_spec

    return [parse_lora_spec(s) if isinstance(s, str) else (Path(s[0]), float(s[1])) for s in lora]


def _type_policy(pure, output_tensor_type, token_embedding_type, tensor_types) -> dict:
    from .convert.plan import parse_overrides

    return dict(
        pure=pure,
        output_type=output_tensor_type,
        token_embd_type=token_embedding_type,
        overrides=parse_overrides(list(tensor_types)),
    )


# ---- convert --------------------------------------------------------------------------------


def convert(
    src: str | Path,
    out: str | Path | None = None,
    *,
    outtype: str = "auto",
    format: str = "gguf",
    dry_run: bool = False,
    ctx: int | None = None,
    input_format: str = "auto",
    tokenizer: str | Path | None = None,
    pre: str | None = None,
    lora: Sequence = (),
    metadata: str | Path | None = None,
    override_kv: Sequence[str] = (),
    imatrix=None,
    imatrix_text: str | None = None,
    imatrix_ctx: int = 512,
    imatrix_chunks: int | None = None,
    pure: bool = False,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    tensor_types: Sequence[str] = (),
    threads: int | None = None,
    split_max_size: str | int = 0,
    split_max_tensors: int = 0,
    force: bool = False,
    checksum: bool = False,
    progress: bool = False,
    verbose: bool = False,
    on_warning: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Convert the checkpoint directory `src` (Meta, Hugging Face or Mistral) into GGUF file(s),
    or one ggjt file with format="ggml". `outtype` may list several types ("q8_0,q4_K_M"): one
    file each, from one read; `out` is a file, a directory ending in "/", or None (./Name-TYPE.gguf).
    `on_warning` hears each warning about the checkpoint before anything is written."""
    from .convert.pipeline import split_types

    types = split_types(outtype)
    max_size, threads = parse_size(split_max_size), threads or default_threads()
    if format == "ggml":
        _check_ggml_options(types, max_size, split_max_tensors, checksum, override_kv)
    lora = _lora_specs(lora)
    im = _convert_imatrix(src, imatrix, imatrix_text, lora, dry_run, imatrix_ctx, imatrix_chunks, progress, threads)
    policy = _type_policy(pure, output_tensor_type, token_embedding_type, tensor_types)
    convs = _plan_conversions(
        src,
        out,
        types,
        format,
        ctx=ctx,
        input_format=input_format,
        pre=pre,
        tokenizer=tokenizer,
        lora=lora,
        metadata=metadata,
        override_kv=override_kv,
        imatrix=im,
        **policy,
    )
    if dry_run:
        return ConvertResult(convs, dry_run=True)
    for w in convs[0].warnings:
        (on_warning or (lambda _: None))(w)
    written = _write_conversions(
        convs,
        format,
        threads=threads,
        progress=progress,
        force=force,
        verbose=verbose,
        split_max_size=max_size,
        split_max_tensors=split_max_tensors,
        checksum=checksum,
    )
    return ConvertResult(convs, written)


def _plan_conversions(src, out, types: list[str], format: str, **options) -> list:
    """One plan per type: a GGUF file each, or the one ggjt file."""
    if format == "ggml":
        from .convert.ggml_out import plan_ggml_conversion

        return [plan_ggml_conversion(src, outtype=types[0], outfile=out, **options)]
    from .convert.pipeline import plan_conversions

    return plan_conversions(src, types, out, **options)


def _write_conversions(
    convs: list,
    format: str,
    *,
    threads: int,
    progress: bool,
    force: bool,
    verbose: bool,
    split_max_size: int,
    split_max_tensors: int,
    checksum: bool,
) -> list:
    if format == "ggml":
        from .convert.ggml_out import write_ggml

        return [write_ggml(convs[0], threads=threads, progress=progress, force=force, verbose=verbose)]
    from .convert.execute import OutputRequest, write_ggufs

    # every type from one read of the checkpoint
    return write_ggufs(
        [OutputRequest(c.out_path, c.kvs, c.plan) for c in convs],
        threads=threads,
        progress=progress,
        force=force,
        verbose=verbose,
        split_max_size=split_max_size,
        split_max_tensors=split_max_tensors,
        checksum=checksum,
    )


def _check_ggml_options(types: list[str], max_size: int, max_tensors: int, checksum: bool, override_kv) -> None:
    if max_size or max_tensors:
        raise LlmconvError("--format ggml writes one file; --split-max-size/--split-max-tensors are for GGUF")
    if checksum:
        raise LlmconvError("--checksum is for GGUF output (verify --checksums reads GGUF)")
    if override_kv:
        raise LlmconvError("--override-kv is for GGUF output: a ggjt file has no key-value metadata")
    if len(types) > 1:
        raise LlmconvError("--format ggml writes one type per run; several types are for GGUF")


def _convert_imatrix(src, imatrix, imatrix_text, lora, dry_run, ctx, chunks, progress, threads):
    """The imatrix to quantize with: given, read from a file, or computed from `imatrix_text` first."""
    if imatrix is not None and imatrix_text:
        raise LlmconvError("--imatrix and --imatrix-text: give one")
    if imatrix_text and lora:
        raise LlmconvError(
            "--imatrix-text runs the checkpoint without the --lora merge; "
            "compute the imatrix from a merged checkpoint and pass --imatrix"
        )
    if imatrix_text and dry_run:
        from .imatrix import Imatrix

        return Imatrix()  # no weights to compute for a plan, but the imatrix type rules apply
    if imatrix_text:
        from .imatrix.collect import compute_imatrix

        return compute_imatrix(src, imatrix_text, ctx=ctx, chunks=chunks, progress=progress, threads=threads)
    return _imatrix(imatrix)


# ---- quantize -------------------------------------------------------------------------------


def quantize(
    src: str | Path,
    out: str | Path | None = None,
    *,
    outtype: str,
    allow_requantize: bool = False,
    override_kv: Sequence[str] = (),
    imatrix=None,
    pure: bool = False,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    tensor_types: Sequence[str] = (),
    threads: int | None = None,
    split_max_size: str | int = 0,
    split_max_tensors: int = 0,
    force: bool = False,
    checksum: bool = False,
    progress: bool = False,
    verbose: bool = False,
    on_warning: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Requantize the float GGUF `src` to `outtype` (several, comma-separated: one file each,
    from one read). `out` defaults to the name convert gives the model (from src's general.*
    keys; without them src's name with its type label replaced), next to src, as llama-quantize
    puts it. `on_warning` hears each warning (an already quantized input) before anything is written."""
    from .convert.execute import OutputRequest, write_ggufs
    from .convert.pipeline import plan_requantizes, split_types

    rqs = plan_requantizes(
        src,
        out,
        split_types(outtype),
        allow_requantize=allow_requantize,
        override_kv=override_kv,
        imatrix=_imatrix(imatrix),
        **_type_policy(pure, output_tensor_type, token_embedding_type, tensor_types),
    )
    for w in [w for rq in rqs for w in rq.warnings]:
        (on_warning or (lambda _: None))(w)
    written = write_ggufs(
        [OutputRequest(rq.out_path, rq.kvs, rq.plan) for rq in rqs],
        threads=threads or default_threads(),
        progress=progress,
        force=force,
        verbose=verbose,
        split_max_size=parse_size(split_max_size),
        split_max_tensors=split_max_tensors,
        checksum=checksum,
    )
    return QuantizeResult(Path(src), rqs, written)


# ---- convert-lora ---------------------------------------------------------------------------


def convert_lora(
    adapter: str | Path,
    base: str | Path,
    out: str | Path | None = None,
    *,
    outtype: str = "f32",
    input_format: str = "auto",
    force: bool = False,
    progress: bool = False,
    verbose: bool = False,
) -> ConvertLoraResult:
    """A PEFT LoRA adapter directory -> llama.cpp's LoRA GGUF, shaped by the `base` checkpoint."""
    from .convert.execute import write_gguf
    from .convert.lora_out import plan_adapter

    ac = plan_adapter(adapter, base, outtype=outtype, outfile=out, input_format=input_format)
    written = write_gguf(ac.out_path, ac.kvs, ac.plan, progress=progress, force=force, verbose=verbose)
    return ConvertLoraResult(Path(adapter), Path(base), ac, written)


# ---- verify, inspect, imatrix ---------------------------------------------------------------


def verify(
    file: str | Path,
    reference: str | Path,
    *,
    text: str | None = None,
    tokens: int = 256,
    engine: str | None = None,
    threads: int | None = None,
    activations: str = "ggml",
    ctx: int | None = None,
    imatrix=None,
    lora: Sequence = (),
    checksums: bool | str | Path = False,
    max_kld: float | None = None,
    min_top1: float | None = None,
    max_ppl_ratio: float | None = None,
    max_rel_dlogit: float | None = None,
    progress: bool = False,
) -> VerifyResult:
    """Check `file` against the checkpoint it was converted from (`text`: the text itself).
    `checksums`: True for the default sidecar, or the sidecar's path."""
    from .verify.report import add_checksums
    from .verify.run import run_verify

    report = run_verify(
        file,
        reference,
        text=text,
        tokens=tokens,
        engine=engine,
        threads=threads or default_threads(),
        activations=activations,
        ctx=ctx,
        progress=progress,
        lora=_lora_specs(lora),
        imatrix=_imatrix(imatrix),
        bounds={
            "max_kld": max_kld,
            "min_top1": min_top1,
            "max_ppl_ratio": max_ppl_ratio,
            "max_rel_dlogit": max_rel_dlogit,
        },
    )
    if checksums is not False and checksums is not None:
        add_checksums(report, Path(file), None if checksums is True or checksums == "" else Path(checksums))
    return VerifyResult(report)


def inspect(file: str | Path, tensors: str | None = None) -> InspectResult:
    """What a GGUF or ggml file holds; `tensors` is a regex filter on tensor names."""
    from .formats.inspect_cmd import summarize

    return InspectResult(summarize(file, tensors))


def imatrix(
    src: str | Path,
    out: str | Path = "imatrix.gguf",
    *,
    text: str = "builtin",
    ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> ImatrixResult:
    """llama-imatrix's importance matrix of checkpoint `src` over `text` (a file, or 'builtin')."""
    from .imatrix.collect import compute_imatrix
    from .imatrix.files import write_imatrix_gguf
    from .formats.atomic import check_output_path

    out = Path(out)
    check_output_path(out, force=force)  # before minutes of computing, not after
    im = compute_imatrix(src, text, ctx=ctx, chunks=chunks, progress=progress, threads=threads)
    write_imatrix_gguf(out, im, force=force)
    return ImatrixResult(out, im)
