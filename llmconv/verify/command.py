"""`llmconv verify`: the command line over api.verify (run.py: the engine; report.py: its schema)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..clitypes import FiniteFloatRange, threads_default
from ..errors import LlmconvError, read_text_file
from ..jsonout import check_json_path, emit_json, json_option


@click.command(context_settings={"max_content_width": 100})
@click.argument("file", type=click.Path(path_type=Path))
@click.argument("extra", nargs=-1, metavar="")  # only to say where a second path belongs
@click.option(
    "--reference",
    "-r",
    "reference",
    type=click.Path(path_type=Path),
    metavar="CKPT_DIR",
    help="Required: the original checkpoint the file was converted from: a Meta directory (params.json, "
    "consolidated.NN.pth, tokenizer.model) or a Hugging Face one (config.json, safetensors, "
    "tokenizer).",
)
@click.option(
    "--text",
    "text_file",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="UTF-8 text to evaluate on. Default: a bundled English text (llmconv/verify/default_text.txt).",
)
@click.option(
    "--tokens",
    "-n",
    type=int,
    default=256,
    show_default=True,
    metavar="N",
    help="Positions to evaluate: BOS plus the text's first N-1 tokens.",
)
@json_option("the full report (schema: llmconv/verify/report.py)")
@click.option(
    "--max-kld",
    type=FiniteFloatRange(min=0),
    metavar="X",
    help="Quality gate: fail if the mean KL divergence (float reference || file) exceeds X nats. "
    "Default: not gated (quality is reported).",
)
@click.option(
    "--min-top1",
    type=FiniteFloatRange(0, 1),
    metavar="X",
    help="Quality gate: fail if fewer than this fraction of positions have the float reference's top token.",
)
@click.option(
    "--max-ppl-ratio",
    type=FiniteFloatRange(min=0),
    metavar="X",
    help="Quality gate: fail if the file's perplexity over the reference's exceeds X.",
)
@click.option(
    "--max-rel-dlogit",
    type=FiniteFloatRange(min=0),
    metavar="X",
    help="Quality gate: fail if any |logit - reference logit| exceeds X times the reference's largest |logit|.",
)
@click.option(
    "--ctx",
    type=click.IntRange(1, 2**32 - 1),
    metavar="N",
    help="The context length the file was converted with (`convert --ctx N`); default: the checkpoint's.",
)
@click.option(
    "--engine",
    type=click.Choice(["llama.cpp"]),
    help="Also run the file in llama.cpp (needs llama-cpp-python): its figures are shown beside the "
    "candidate's, and quality gates apply to it too.",
)
@click.option(
    "--threads",
    "-t",
    type=click.IntRange(1, 256),
    default=threads_default,
    show_default="all cores",
    metavar="N",
    help="Threads for quantizing the expected weights and for --engine llama.cpp.",
)
@click.option(
    "--activations",
    type=click.Choice(["ggml", "f32"]),
    default="ggml",
    show_default=True,
    help="How the quality candidate rounds activations. ggml: before each matmul, as llama.cpp's CPU "
    "backend does (what users get); f32: not at all (the weights' error alone). Fidelity always "
    "compares float32 passes.",
)
@click.option(
    "--imatrix",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="The importance matrix the file was quantized with (convert/quantize --imatrix): the "
    "expected pass quantizes with it too.",
)
@click.option(
    "--lora",
    "lora",
    metavar="ADAPTER[:SCALE]",
    multiple=True,
    help="The file was converted with `convert --lora`: apply the same PEFT adapter(s), in the same "
    "order and scales, to the reference's weights.",
)
@click.option(
    "--checksums",
    "checksums",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[SIDECAR]",
    help="Also check every tensor's sha256 against the sidecar `convert --checksum` wrote (default FILE.sha256.json).",
)
@click.option("--force", "-f", is_flag=True, help="Let --json FILE overwrite an existing file.")
def verify(file, extra, reference, text_file, json_path, checksums, force, **options):
    """Check that a converted file is its checkpoint (fidelity), and what its quantization costs (quality).

    \b
    Fidelity (gated): three forward passes on the same tokens. The float reference runs the
    checkpoint in PyTorch; the expected pass runs it again with every weight quantized and
    dequantized at the type the file stores it in (llmconv's bit-exact kernels); the candidate
    runs the file alone in numpy. For a correct file candidate and expected agree to float
    rounding, whatever the model and type. Every tensor's bytes are compared with llmconv's
    quantization of its source, and every metadata key that changes behaviour (context length,
    eps, RoPE, head counts, special token ids, add_bos/eos, pre-tokenizer, chat template) and the
    vocabulary with the checkpoint. A failure names its cause where it can.

    \b
    Quality (informational unless gated): KL divergence, top-1 agreement, perplexity ratio and
    max logit error against the float reference, shown beside llama.cpp's published LLaMA-3-8B
    figures for the file's type. Gate it with --max-kld, --min-top1, --max-ppl-ratio.

    \b
    Exit status:
      0  fidelity holds (and the quality gates asked for)
      1  a check failed: the report names the cause first
      2  bad input (missing file, not a checkpoint, a checkpoint of another model, ...)

    \b
    Examples:
      llmconv verify Llama-2-7B-Q4_0.gguf --reference llama-2-7b/
      llmconv verify Model-00001-of-00003.gguf -r ckpt/             # a split file: all its parts
      llmconv verify out.gguf -r ckpt/ --text some.txt --tokens 512 --json report.json
      llmconv verify out.gguf -r ckpt/ --max-kld 0.05 --min-top1 0.85      # also gate quality
      llmconv verify out.gguf -r ckpt/ --engine llama.cpp                  # also run llama.cpp
      llmconv verify out.gguf -r ckpt/ --checksums                         # and the sha256 sidecar
    """
    check_json_path(json_path, force)
    from ..api import verify as run

    check_verify_arguments(file, reference, extra)
    # the other options' names are api.verify's parameters
    result = run(
        file,
        reference,
        text=read_text_file(text_file) if text_file is not None else None,
        checksums=checksums if checksums is not None else False,
        progress=True,
        **options,
    )
    # with --json -, stdout carries only the JSON, so the table goes to stderr
    click.echo(result.text(), err=json_path == "-")
    emit_json(json_path, result.report)
    if not result.passed:
        sys.exit(1)


def _kind(path: Path | None) -> str | None:
    """What a path names, as far as verify's argument order cares: a model file (GGUF or
    legacy ggml), a folder, another file, or nothing."""
    if path is None:
        return None
    if path.is_dir():
        return "folder"
    if not path.is_file():
        return "missing"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return "file"
    return "model" if magic in (b"GGUF", b"lmgg", b"fmgg", b"tjgg") else "file"


def check_verify_arguments(file: Path, reference: Path | None, extra: tuple[str, ...]) -> None:
    """The usual mistakes in verify's arguments (swapped, two GGUFs, the checkpoint as a second
    argument, no --reference), each refused in one line that says what to type instead."""
    from shlex import quote

    if len(extra) > 1 or (extra and reference is not None):
        raise LlmconvError(
            f"unexpected argument {extra[-1]!r}: verify takes one file, and the checkpoint as "
            f"--reference: llmconv verify MODEL.gguf --reference CKPT_DIR"
        )
    if extra:
        reference = Path(extra[0])
        first, second = (
            (reference, file) if _kind(file) == "folder" and _kind(reference) == "model" else (file, reference)
        )
        raise LlmconvError(
            f"the checkpoint goes after --reference: llmconv verify {quote(str(first))} "
            f"--reference {quote(str(second))}"
        )
    kind, ref_kind = _kind(file), _kind(reference)
    if kind in ("folder", "file") and ref_kind == "model":
        ckpt = file if kind == "folder" else file.parent
        raise LlmconvError(
            f"the arguments are swapped: the model file comes first, the checkpoint folder after "
            f"--reference: llmconv verify {quote(str(reference))} --reference {quote(str(ckpt))}"
        )
    if kind == "folder":
        ckpt = reference if ref_kind == "folder" else file
        raise LlmconvError(
            f"{file} is a folder: verify checks a GGUF file against the checkpoint it was converted "
            f"from: llmconv verify MODEL.gguf --reference {quote(str(ckpt))}"
        )
    if reference is None:
        raise LlmconvError(
            "no --reference: verify compares the file with the checkpoint it was converted from: "
            f"llmconv verify {quote(str(file))} --reference CKPT_DIR"
        )
    if ref_kind == "model":
        raise LlmconvError(
            f"--reference {reference} is a model file, not the checkpoint folder {file} was converted "
            f"from: llmconv verify {quote(str(file))} --reference CKPT_DIR (verify does not compare two GGUFs)"
        )
