"""The `llmconv` command line: convert, quantize, verify, inspect, imatrix, convert-lora.

Each command parses its options, calls the function of the same name in api.py and prints the
result; convert, quantize and convert-lora are in convert/command.py, verify and imatrix next to
their code, inspect here. Errors take one path: an LlmconvError (bad input) is a click exception, which click
prints as one line (`llmconv: error: <file>: <tensor>: <what>`) with exit 2; the group below
turns the environment's errors (disk full, out of memory) into LlmconvErrors, Ctrl-C into exit
130 and anything else (a bug) into one line with exit 70. `--debug`, before or after the
subcommand, shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

# Before numpy loads: its OpenBLAS starts a thread per core that busy-waits ~0.1 s of CPU at
# load (a third of a conversion's start-up). The commands that stream tensors want none of
# them: their GEMMs are kept single-threaded (quantize/iq_screen.py) and the engine's workers
# are the parallelism. verify's candidate forward pass does use them (numpy matmul).
STREAMING_COMMANDS = ("convert", "quantize", "convert-lora")


def _command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


if _command(sys.argv[1:]) in STREAMING_COMMANDS:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from pathlib import Path

import click

from .errors import LlmconvError, environment_error, is_library_panic, printable
from .jsonout import check_json_path, emit_json, json_option


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

    libs = ", ".join(
        f"{n} {ver(n)}"
        for n in (
            "numpy",
            "torch",
            "gguf",
            "safetensors",
            "sentencepiece",
            "tokenizers",
            "tiktoken",
            "llama-cpp-python",
        )
    )
    click.echo(f"llmconv {__version__} (python {sys.version.split()[0]}; {libs})")
    ctx.exit()


class Interrupted(click.ClickException):
    exit_code = 130

    def show(self, file=None) -> None:
        click.echo("llmconv: interrupted", file=file, err=file is None)


class InternalError(click.ClickException):
    exit_code = 70  # EX_SOFTWARE

    def show(self, file=None) -> None:
        click.echo(
            f"llmconv: internal error: {self.message} (run with --debug for the traceback)", file=file, err=file is None
        )


class LlmconvGroup(click.Group):
    """The one error path, around every subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--debug" in args:  # a global option, also accepted after the subcommand (`llmconv convert ... --debug`)
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
        except (OSError, MemoryError, RecursionError) as e:  # the environment, not the input: still one line
            if debug:
                traceback.print_exc()
            raise LlmconvError(environment_error(e)) from None
        except BaseException as e:  # a bug: one line, the traceback behind --debug
            if debug or not (isinstance(e, Exception) or is_library_panic(e)):  # (a Rust panic is a BaseException)
                raise
            raise InternalError(f"{printable(type(e).__name__)}: {printable(' '.join(str(e).split()))[:300]}") from None


@click.group(cls=LlmconvGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show a full traceback on errors.")
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda c, p, v: _print_version(c, v),
    help="Show llmconv's version and those of the libraries it runs on, then exit.",
)
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


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@json_option("the same information")
@click.option("--force", "-f", is_flag=True, help="Let --json FILE overwrite an existing file.")
@click.option(
    "--tensors",
    "tensor_filter",
    metavar="REGEX",
    help="Only tensors whose name matches REGEX (searched, as grep does), e.g. 'blk\\.0\\.'.",
)
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


# Subcommands that live next to the code they drive (convert/command.py: the three that write
# model files; verify/command.py, imatrix/command.py: one each).
def _register_subcommands() -> None:
    from .convert.command import convert, convert_lora, quantize
    from .imatrix.command import imatrix
    from .verify.command import verify

    for command in (convert, quantize, convert_lora, verify, imatrix):
        cli.add_command(command)


_register_subcommands()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (click prints any error)."""
    from ._malloc import pin_mmap_threshold

    pin_mmap_threshold()  # freed tensor buffers go back to the OS (see _malloc.py)
    try:
        cli.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="llmconv")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
