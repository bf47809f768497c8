"""The commands that write model files: `llmconv convert`, `quantize` and `convert-lora`, the
command line over api.convert, api.quantize and api.convert_lora (parse the options, call, print
what was written)."""

from __future__ import annotations

from pathlib import Path

import click

from ..clitypes import imatrix_option, quantize_positionals, type_options
from ..jsonout import check_json_path, echo_written, emit_json, json_option


@click.command(context_settings={"max_content_width": 100})
@click.argument("ckpt_dir", type=click.Path(path_type=Path))
@click.option(
    "--outtype",
    default="auto",
    show_default=True,
    metavar="TYPE[,TYPE...]",
    help="f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, or a K-quant mix: q2_k, q3_k_s/m/l, q4_k_s/m, "
    "q5_k_s/m, q6_k (llama-quantize's per-tensor rules; q3_k/q4_k/q5_k mean the _m mix), iq4_nl, iq4_xs. "
    "'auto' keeps the source precision. Several, comma-separated (q8_0,q6_k,q4_k_m): one file "
    "each, all from one read of the checkpoint.",
)
@click.option(
    "--outfile",
    "-o",
    type=click.Path(),  # a str: a trailing slash means a directory
    help="Output path, or a directory (DIR/) for the default names. Default: ./Name-Size-TYPE.gguf.",
)
@click.option(
    "--ctx", type=click.IntRange(1, 2**32 - 1), help="Context length to record (default: by model family; see README)."
)
@click.option(
    "--input-format",
    type=click.Choice(["auto", "meta", "hf", "mistral"]),
    default="auto",
    show_default=True,
    help="Checkpoint layout; 'auto' detects it: params.json + consolidated.NN.pth (Meta), params.json + "
    "consolidated*.safetensors (Mistral), config.json (Hugging Face).",
)
@click.option(
    "--tokenizer",
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="Tokenizer file, or a folder holding it, to use instead of the checkpoint's own "
    "(default: the checkpoint folder; for Meta also the folder above it).",
)
@click.option(
    "--pre",
    metavar="NAME",
    help="tokenizer.ggml.pre for a BPE tokenizer (llama-bpe, smollm, tekken, gpt-2), overriding the detected one.",
)
@click.option(
    "--lora",
    "lora",
    metavar="ADAPTER[:SCALE]",
    multiple=True,
    help="Merge a PEFT LoRA adapter directory into the weights while converting (scale * alpha/r * B A, "
    "in float32, before quantization); repeatable, applied in order. SCALE defaults to 1.",
)
@click.option(
    "--metadata",
    "metadata",
    type=click.Path(path_type=Path),
    metavar="FILE.json",
    help="general.* metadata over what the model card (README.md) and config give, as llama.cpp's "
    "--metadata: keys like general.name, general.version, general.license, general.tags.",
)
@click.option(
    "--override-kv",
    "override_kv",
    metavar="KEY=TYPE:VALUE",
    multiple=True,
    help="Set a metadata key (repeatable; llama-quantize's syntax, TYPE int, float, bool or str), "
    "e.g. general.name=str:My-Model or llama.context_length=int:8192.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the plan (every tensor, its shards, GGUF name, shape, type, bytes) and write nothing.",
)
@click.option(
    "--format",
    "format",
    type=click.Choice(["gguf", "ggml"]),
    default="gguf",
    show_default=True,
    help="ggml: one legacy ggjt v3 .bin file for pre-GGUF runtimes (f32, f16, q4_0, q4_1, q8_0; implies --pure; "
    "refuses models ggjt cannot describe, e.g. grouped-query attention or RoPE base != 10000).",
)
@imatrix_option
@click.option(
    "--imatrix-text",
    metavar="FILE",
    help="Compute the importance matrix from this calibration text first, as `llmconv imatrix` does "
    "('builtin': the bundled text), and quantize with it.",
)
@click.option(
    "--imatrix-ctx",
    type=click.IntRange(16),
    default=512,
    show_default=True,
    metavar="N",
    help="Tokens per chunk for --imatrix-text.",
)
@click.option("--imatrix-chunks", type=click.IntRange(1), metavar="N", help="At most N chunks for --imatrix-text.")
@type_options
def convert(ckpt_dir, outfile, dry_run, json_path, quiet, **options):
    """Convert a checkpoint directory into a GGUF file (or split parts, or a ggjt file).

    CKPT_DIR is a Meta checkpoint (params.json, consolidated.NN.pth, tokenizer.model), a Hugging Face one
    (config.json, *.safetensors, tokenizer files) or Mistral's own (params.json, consolidated*.safetensors,
    tekken.json or tokenizer.model.vN).
    Tensors are read one at a time (positional reads, past the page cache when the shard is not
    cached), converted, and streamed to disk; peak memory stays at about one tensor.

    \b
    Examples:
      llmconv convert path/to/llama-2-7b --outtype f16                # ./Llama-2-7B-F16.gguf
      llmconv convert path/to/Mistral-7B-v0.1 --outtype q4_K_M -o out.gguf
      llmconv convert path/to/ckpt --dry-run                          # the plan, nothing written
      llmconv convert path/to/ckpt --outtype f16 --split-max-size 4G  # Name-00001-of-0000N.gguf
      llmconv convert path/to/base --lora path/to/adapter --outtype q8_0   # merged while converting
      llmconv convert path/to/ckpt --outtype iq4_xs --imatrix-text builtin   # imatrix computed first
      llmconv convert path/to/ckpt --outtype q8_0,q6_K,q4_K_M -o out/ # three files, one read
    """
    check_json_path(json_path, options["force"])
    from .. import api

    # the options' names are api.convert's parameters
    result = api.convert(
        ckpt_dir,
        outfile,
        dry_run=dry_run,
        progress=not quiet,
        **options,
        on_warning=lambda w: click.echo(f"warning: {w}", err=True),
    )
    if dry_run:
        click.echo(result.describe(), err=json_path == "-")
    for conv, written in zip(result.conversions, result.written):
        echo_written(written, conv.plan, quiet, json_path)
    emit_json(json_path, result.report())


@click.command(context_settings={"max_content_width": 100})
@click.argument("infile", type=click.Path(path_type=Path))
@click.argument("out_and_type", nargs=-1, metavar="[OUTFILE] [TYPE]")
@click.option(
    "--type",
    "type_opt",
    metavar="TYPE[,TYPE...]",
    help="Target type (or give it after the file names, as llama-quantize takes it): q8_0, q4_0, q4_1, "
    "q5_0, q5_1, f16, ... or a K-quant mix: q2_k, q3_k_s/m/l, q4_k_s/m, q5_k_s/m, q6_k, iq4_nl, iq4_xs. "
    "Several, comma-separated, write one file each from one read of INFILE.",
)
@click.option("--outtype", "outtype_opt", metavar="TYPE[,TYPE...]", help="The same as --type (convert's name for it).")
@click.option(
    "--allow-requantize",
    is_flag=True,
    help="Accept an input whose tensors are already quantized (with a warning: it can severely reduce quality).",
)
@click.option(
    "--override-kv",
    "override_kv",
    metavar="KEY=TYPE:VALUE",
    multiple=True,
    help="Set a metadata key (repeatable; llama-quantize's syntax, TYPE int, float, bool or str), "
    "e.g. general.name=str:My-Model or llama.context_length=int:8192.",
)
@imatrix_option
@type_options
def quantize(infile, out_and_type, type_opt, outtype_opt, json_path, quiet, **options):
    """Requantize a GGUF file (f32/f16/bf16 in) to another type.

    Follows llama-quantize's per-tensor choices by default: 1-D tensors stay F32 and
    output.weight gets a higher-precision type; --pure puts every 2-D weight in TYPE.
    Metadata passes through; general.file_type is updated. Without OUTFILE the output goes
    next to INFILE (where llama-quantize puts it), named as convert names files, from INFILE's
    general.name/size_label (Name-7B-Q4_K_M.gguf) or, without them, from INFILE's name with
    the type label replaced; with several types OUTFILE may be a directory (DIR/).

    \b
    Examples:
      llmconv quantize model-F16.gguf model-Q8_0.gguf q8_0
      llmconv quantize model-F16.gguf q4_K_M                         # -> Name-Size-Q4_K_M.gguf beside it
      llmconv quantize model-F16.gguf out.gguf --type q4_0 --pure --output-tensor-type q8_0
      llmconv quantize model-F16.gguf model-Q3_K_M.gguf --type q3_K_M --imatrix model.imatrix.gguf
      llmconv quantize model-F16.gguf out/ --type q4_K_M,q5_K_M      # two files, one read
    """
    check_json_path(json_path, options["force"])
    from .. import api
    from ..convert.pipeline import split_types
    from ..convert.plan import check_type_name

    outfile, qtype, where = quantize_positionals(out_and_type, type_opt, outtype_opt)
    for t in split_types(qtype):
        check_type_name(t, where)  # the message names the option the user typed
    # the options' names are api.quantize's parameters
    result = api.quantize(
        infile,
        outfile,
        outtype=qtype,
        progress=not quiet,
        **options,
        on_warning=lambda w: click.echo(f"warning: {w}", err=True),
    )
    for rq, written in zip(result.requantizations, result.written):
        echo_written(written, rq.plan, quiet, json_path)
    emit_json(json_path, result.report())


@click.command("convert-lora", context_settings={"max_content_width": 100})
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@click.option(
    "--base",
    "base_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="The base checkpoint the adapter was trained on (Meta or Hugging Face): its shapes and head counts.",
)
@click.option(
    "--outtype",
    default="f32",
    show_default=True,
    type=click.Choice(["f32", "f16", "bf16", "q8_0"], case_sensitive=False),
    help="Type of the LoRA matrices (q8_0 rows that do not fit its blocks are written f16).",
)
@click.option(
    "--outfile", "-o", type=click.Path(path_type=Path), help="Output path. Default: ./ADAPTER-TYPE-LoRA.gguf."
)
@click.option(
    "--input-format",
    type=click.Choice(["auto", "meta", "hf"]),
    default="auto",
    show_default=True,
    help="Layout of the base checkpoint.",
)
@click.option("--force", "-f", is_flag=True, help="Overwrite an existing output file.")
@json_option()
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--verbose", "-v", is_flag=True, help="One line per tensor as it is written.")
def convert_lora(adapter_dir, base_dir, outtype, outfile, input_format, force, json_path, quiet, verbose):
    """Convert a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into
    llama.cpp's LoRA GGUF, which `llama-cli -m BASE.gguf --lora ADAPTER.gguf` applies at load time.

    \b
    Examples:
      llmconv convert-lora path/to/adapter --base path/to/base -o adapter.gguf
      llmconv convert-lora path/to/adapter --base path/to/base --outtype q8_0
    """
    check_json_path(json_path, force)
    from .. import api

    result = api.convert_lora(
        adapter_dir,
        base_dir,
        outfile,
        outtype=outtype,
        input_format=input_format,
        force=force,
        progress=not quiet,
        verbose=verbose,
    )
    echo_written(result.written, result.conversion.plan, quiet, json_path)
    emit_json(json_path, result.report())
