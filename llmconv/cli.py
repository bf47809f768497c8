"""The `llmconv` command line: convert, quantize, verify, inspect, imatrix, convert-lora.

Each command parses its options, calls the function of the same name in api.py and prints the
result. Errors take one path: an LlmconvError (bad input) is a click exception, which click
prints as one line (`llmconv: error: <file>: <tensor>: <what>`) with exit 2; the group below
turns the environment's errors (disk full, out of memory) into LlmconvErrors, Ctrl-C into exit
130 and anything else (a bug) into one line with exit 70. `--debug`, before or after the
subcommand, shows the traceback.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import click

from .clitypes import quantize_positionals
from .errors import LlmconvError, environment_error, is_library_panic, printable
from .jsonout import check_json_path, emit_json, json_option


def _threads_default() -> int:
    from .api import default_threads
    return default_threads()


def _print_version(ctx: click.Context, value: bool) -> None:
    """Versions from package metadata: reading them imports none of the heavy libraries."""
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    libs = ", ".join(f"{n} {ver(n)}" for n in ("numpy", "torch", "gguf", "safetensors", "sentencepiece",
                                                "tokenizers", "tiktoken", "llama-cpp-python"))
    click.echo(f"llmconv {__version__} (python {sys.version.split()[0]}; {libs})")
    ctx.exit()


class Interrupted(click.ClickException):
    exit_code = 130

    def show(self, file=None) -> None:
        click.echo("llmconv: interrupted", file=file, err=file is None)


class InternalError(click.ClickException):
    exit_code = 70                                      # EX_SOFTWARE

    def show(self, file=None) -> None:
        click.echo(f"llmconv: internal error: {self.message} (run with --debug for the traceback)",
                   file=file, err=file is None)


class LlmconvGroup(click.Group):
    """The one error path, around every subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--debug" in args:   # a global option, also accepted after the subcommand (`llmconv convert ... --debug`)
            args = ["--debug"] + [a for a in args if a != "--debug"]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        debug = ctx.params.get("debug", False)
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except (click.exceptions.Abort, KeyboardInterrupt):
            raise Interrupted("") from None
        except LlmconvError:
            if debug:
                traceback.print_exc()
            raise
        except click.ClickException:
            raise
        except (OSError, MemoryError, RecursionError) as e:   # the environment, not the input: still one line
            if debug:
                traceback.print_exc()
            raise LlmconvError(environment_error(e)) from None
        except BaseException as e:                            # a bug: one line, the traceback behind --debug
            if debug or not (isinstance(e, Exception) or is_library_panic(e)):   # (a Rust panic is a BaseException)
                raise
            raise InternalError(f"{printable(type(e).__name__)}: {printable(' '.join(str(e).split()))[:300]}") from None


@click.group(cls=LlmconvGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show a full traceback on errors.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=lambda c, p, v: _print_version(c, v),
              help="Show llmconv's version and those of the libraries it runs on, then exit.")
def cli(debug: bool) -> None:
    """Convert LLaMA-family checkpoints into GGUF files for llama.cpp, quantize them with
    numpy kernels whose bytes equal llama.cpp's quantizer's, and verify them against the original.

    \b
    llmconv convert CKPT_DIR --outtype q4_0          # Meta/HF checkpoint -> ./Name-7B-Q4_0.gguf
    llmconv quantize IN.gguf OUT.gguf q8_0           # requantize a float GGUF
    llmconv verify OUT.gguf --reference CKPT_DIR     # logits vs. a reference forward pass
    llmconv convert-lora ADAPTER --base CKPT_DIR     # PEFT LoRA adapter -> llama.cpp LoRA GGUF
    llmconv inspect FILE.gguf                        # what a GGUF/ggml file holds
    """
    # read by LlmconvGroup.invoke


_type_options = [
    click.option("--pure", is_flag=True, help="Every 2-D weight in the requested type (no higher-precision output tensor)."),
    click.option("--output-tensor-type", metavar="TYPE", help="Type for output.weight."),
    click.option("--token-embedding-type", metavar="TYPE", help="Type for token_embd.weight."),
    click.option("--tensor-type", metavar="RE=TYPE", multiple=True,
                 help="Type for tensors whose GGUF name matches the regex RE (repeatable; first match wins)."),
    click.option("--threads", "-t", type=click.IntRange(1, 256), default=_threads_default, show_default="all cores",
                 help="Threads for the quantization kernels. The output is the same for any count."),
    click.option("--split-max-size", metavar="SIZE", default="0",
                 help="Split the output into files of at most SIZE of tensor data (e.g. 4G, 500M), "
                      "named Name-00001-of-0000N.gguf, which llama.cpp loads from the first file."),
    click.option("--split-max-tensors", type=click.IntRange(0), default=0, metavar="N",
                 help="Split the output into files of at most N tensors."),
    click.option("--force", "-f", is_flag=True, help="Overwrite an existing output file."),
    click.option("--checksum", is_flag=True,
                 help="Also write OUT.sha256.json with the sha256 of every tensor's bytes (checked by verify --checksums)."),
    json_option(),
    click.option("--quiet", "-q", is_flag=True, help="No progress bar and no notes (warnings and errors still print)."),
    click.option("--verbose", "-v", is_flag=True, help="One line per tensor as it is written."),
]


_imatrix_option = click.option(
    "--imatrix", type=click.Path(path_type=Path), metavar="FILE",
    help="Importance matrix (llama-imatrix's GGUF or legacy .dat, or `llmconv imatrix`'s): "
         "quantize with llama.cpp's weighted searches and its imatrix type rules.")


def type_options(f):
    for opt in reversed(_type_options):
        f = opt(f)
    return f


def _echo_written(res, plan, quiet: bool, json_path: str | None = None) -> None:
    """After convert/quantize/convert-lora: the plan's notes (unless -q), then the one-line
    summary: files, tensors, size, type, time, rate. With `--json -` stdout carries only the
    JSON, so the summary goes to stderr."""
    for n in [] if quiet else plan.notes:
        click.echo(f"note: {n}", err=True)
    click.echo(f"wrote {', '.join(map(str, res.paths))}: {res.n_tensors} tensors, {res.nbytes / 2**20:,.1f} MiB, "
               f"{plan.outtype}, in {res.seconds:.1f} s ({res.nbytes / 2**20 / max(res.seconds, 1e-9):,.0f} MiB/s)",
               err=json_path == "-")


@cli.command()
@click.argument("ckpt_dir", type=click.Path(path_type=Path))
@click.option("--outtype", default="auto", show_default=True, metavar="TYPE[,TYPE...]",
              help="f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, or a K-quant mix: q2_k, q3_k_s/m/l, q4_k_s/m, "
                   "q5_k_s/m, q6_k (llama-quantize's per-tensor rules; q3_k/q4_k/q5_k mean the _m mix), iq4_nl, iq4_xs. "
                   "'auto' keeps the source precision. Several, comma-separated (q8_0,q6_k,q4_k_m): one file "
                   "each, all from one read of the checkpoint.")
@click.option("--outfile", "-o", type=click.Path(),   # a str: a trailing slash means a directory
              help="Output path, or a directory (DIR/) for the default names. Default: ./Name-Size-TYPE.gguf.")
@click.option("--ctx", type=click.IntRange(1, 2**32 - 1), help="Context length to record (default: by model family; see README).")
@click.option("--input-format", type=click.Choice(["auto", "meta", "hf", "mistral"]), default="auto", show_default=True,
              help="Checkpoint layout; 'auto' detects it: params.json + consolidated.NN.pth (Meta), params.json + "
                   "consolidated*.safetensors (Mistral), config.json (Hugging Face).")
@click.option("--tokenizer", type=click.Path(path_type=Path), metavar="PATH",
              help="Tokenizer file, or a folder holding it, to use instead of the checkpoint's own "
                   "(default: the checkpoint folder; for Meta also the folder above it).")
@click.option("--pre", metavar="NAME",
              help="tokenizer.ggml.pre for a BPE tokenizer (llama-bpe, smollm, tekken, gpt-2), overriding the detected one.")
@click.option("--lora", "lora", metavar="ADAPTER[:SCALE]", multiple=True,
              help="Merge a PEFT LoRA adapter directory into the weights while converting (scale * alpha/r * B A, "
                   "in float32, before quantization); repeatable, applied in order. SCALE defaults to 1.")
@click.option("--metadata", "metadata", type=click.Path(path_type=Path), metavar="FILE.json",
              help="general.* metadata over what the model card (README.md) and config give, as llama.cpp's "
                   "--metadata: keys like general.name, general.version, general.license, general.tags.")
@click.option("--override-kv", "override_kv", metavar="KEY=TYPE:VALUE", multiple=True,
              help="Set a metadata key (repeatable; llama-quantize's syntax, TYPE int, float, bool or str), "
                   "e.g. general.name=str:My-Model or llama.context_length=int:8192.")
@click.option("--dry-run", is_flag=True, help="Print the plan (every tensor, its shards, GGUF name, shape, type, bytes) and write nothing.")
@click.option("--format", "out_format", type=click.Choice(["gguf", "ggml"]), default="gguf", show_default=True,
              help="ggml: one legacy ggjt v3 .bin file for pre-GGUF runtimes (f32, f16, q4_0, q4_1, q8_0; implies --pure; "
                   "refuses models ggjt cannot describe, e.g. grouped-query attention or RoPE base != 10000).")
@_imatrix_option
@click.option("--imatrix-text", metavar="FILE",
              help="Compute the importance matrix from this calibration text first, as `llmconv imatrix` does "
                   "('builtin': the bundled text), and quantize with it.")
@click.option("--imatrix-ctx", type=click.IntRange(16), default=512, show_default=True, metavar="N",
              help="Tokens per chunk for --imatrix-text.")
@click.option("--imatrix-chunks", type=click.IntRange(1), metavar="N", help="At most N chunks for --imatrix-text.")
@type_options
def convert(ckpt_dir, outtype, outfile, ctx, input_format, tokenizer, pre, lora, metadata, override_kv, dry_run,
            out_format, imatrix, imatrix_text, imatrix_ctx, imatrix_chunks, pure, output_tensor_type,
            token_embedding_type, tensor_type,
            threads, split_max_size, split_max_tensors, force, checksum, json_path, quiet, verbose):
    """Convert a checkpoint directory into a GGUF file (or split parts, or a ggjt file).

    CKPT_DIR is a Meta checkpoint (params.json, consolidated.NN.pth, tokenizer.model), a Hugging Face one
    (config.json, *.safetensors, tokenizer files) or Mistral's own (params.json, consolidated*.safetensors,
    tekken.json or tokenizer.model.vN).
    Tensors are read one at a time from memory-mapped shards, converted, and streamed to disk.

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
    check_json_path(json_path, force)
    from . import api

    result = api.convert(ckpt_dir, outfile, outtype=outtype, format=out_format, dry_run=dry_run, ctx=ctx,
                         input_format=input_format, tokenizer=tokenizer, pre=pre, lora=lora, metadata=metadata,
                         override_kv=override_kv, imatrix=imatrix, imatrix_text=imatrix_text, imatrix_ctx=imatrix_ctx,
                         imatrix_chunks=imatrix_chunks, pure=pure, output_tensor_type=output_tensor_type,
                         token_embedding_type=token_embedding_type, tensor_types=tensor_type, threads=threads,
                         split_max_size=split_max_size, split_max_tensors=split_max_tensors, force=force,
                         checksum=checksum, progress=not quiet, verbose=verbose,
                         on_warning=lambda w: click.echo(f"warning: {w}", err=True))
    if dry_run:
        click.echo(result.describe(), err=json_path == "-")
    for conv, written in zip(result.conversions, result.written):
        _echo_written(written, conv.plan, quiet, json_path)
    emit_json(json_path, result.report())


@cli.command()
@click.argument("infile", type=click.Path(path_type=Path))
@click.argument("out_and_type", nargs=-1, metavar="[OUTFILE] [TYPE]")
@click.option("--type", "type_opt", metavar="TYPE[,TYPE...]",
              help="Target type (or give it after the file names, as llama-quantize takes it): q8_0, q4_0, q4_1, "
                   "q5_0, q5_1, f16, ... or a K-quant mix: q2_k, q3_k_s/m/l, q4_k_s/m, q5_k_s/m, q6_k, iq4_nl, iq4_xs. "
                   "Several, comma-separated, write one file each from one read of INFILE.")
@click.option("--outtype", "outtype_opt", metavar="TYPE[,TYPE...]", help="The same as --type (convert's name for it).")
@click.option("--allow-requantize", is_flag=True,
              help="Accept an input whose tensors are already quantized (with a warning: it can severely reduce quality).")
@click.option("--override-kv", "override_kv", metavar="KEY=TYPE:VALUE", multiple=True,
              help="Set a metadata key (repeatable; llama-quantize's syntax, TYPE int, float, bool or str), "
                   "e.g. general.name=str:My-Model or llama.context_length=int:8192.")
@_imatrix_option
@type_options
def quantize(infile, out_and_type, type_opt, outtype_opt, allow_requantize, override_kv, imatrix, pure,
             output_tensor_type, token_embedding_type, tensor_type,
             threads, split_max_size, split_max_tensors, force, checksum, json_path, quiet, verbose):
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
    check_json_path(json_path, force)
    from . import api
    from .convert.pipeline import split_types
    from .convert.plan import check_type_name

    outfile, qtype, where = quantize_positionals(out_and_type, type_opt, outtype_opt)
    for t in split_types(qtype):
        check_type_name(t, where)       # the message names the option the user typed
    result = api.quantize(infile, outfile, outtype=qtype, allow_requantize=allow_requantize, override_kv=override_kv,
                          imatrix=imatrix, pure=pure, output_tensor_type=output_tensor_type,
                          token_embedding_type=token_embedding_type, tensor_types=tensor_type, threads=threads,
                          split_max_size=split_max_size, split_max_tensors=split_max_tensors, force=force,
                          checksum=checksum, progress=not quiet, verbose=verbose,
                          on_warning=lambda w: click.echo(f"warning: {w}", err=True))
    for rq, written in zip(result.requantizations, result.written):
        _echo_written(written, rq.plan, quiet, json_path)
    emit_json(json_path, result.report())


@cli.command("convert-lora")
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@click.option("--base", "base_dir", required=True, type=click.Path(path_type=Path),
              help="The base checkpoint the adapter was trained on (Meta or Hugging Face): its shapes and head counts.")
@click.option("--outtype", default="f32", show_default=True, type=click.Choice(["f32", "f16", "bf16", "q8_0"], case_sensitive=False),
              help="Type of the LoRA matrices (q8_0 rows that do not fit its blocks are written f16).")
@click.option("--outfile", "-o", type=click.Path(path_type=Path), help="Output path. Default: ./ADAPTER-TYPE-LoRA.gguf.")
@click.option("--input-format", type=click.Choice(["auto", "meta", "hf"]), default="auto", show_default=True,
              help="Layout of the base checkpoint.")
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
    from . import api

    result = api.convert_lora(adapter_dir, base_dir, outfile, outtype=outtype, input_format=input_format, force=force,
                              progress=not quiet, verbose=verbose)
    _echo_written(result.written, result.conversion.plan, quiet, json_path)
    emit_json(json_path, result.report())


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@json_option("the same information")
@click.option("--force", "-f", is_flag=True, help="Let --json FILE overwrite an existing file.")
@click.option("--tensors", "tensor_filter", metavar="REGEX",
              help="Only tensors whose name matches REGEX (searched, as grep does), e.g. 'blk\\.0\\.'.")
def inspect(file: Path, json_path: str | None, tensor_filter: str | None, force: bool) -> None:
    """Show what a GGUF or ggml file holds: version, alignment, metadata with types, vocab size,
    the tensor table (name, type, shape, offset, bytes) and totals per type with bits per weight.

    Shapes are in numpy order (outermost first; the last number is the row length). Only the
    header is read, so this is quick on files of any size. A corrupt or truncated file gets a
    one-line error naming the byte offset.

    \b
    Examples:
      llmconv inspect model.gguf
      llmconv inspect model.gguf --tensors 'blk\\.0\\..*'    # a regex filter on tensor names
      llmconv inspect model.bin --json                     # a ggml/ggjt file, as JSON on stdout
    """
    import json

    check_json_path(json_path, force)
    from .api import inspect as run

    result = run(file, tensor_filter)
    if json_path is None:
        click.echo(result.text())
        return
    emit_json(json_path, result.summary, json.dumps(result.summary, indent=2, ensure_ascii=False))
    if json_path != "-":
        click.echo(result.text())


# Subcommands that live next to the code they drive (each module defines one click command).
def _register_subcommands() -> None:
    from .imatrix.command import imatrix
    from .verify.command import verify

    cli.add_command(verify)
    cli.add_command(imatrix)


_register_subcommands()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (click prints any error)."""
    from ._malloc import pin_mmap_threshold

    pin_mmap_threshold()    # freed tensor buffers go back to the OS (see _malloc.py)
    try:
        cli.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="llmconv")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
