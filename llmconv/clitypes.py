"""Click parameter types, the options several commands share, and argument rules."""

from __future__ import annotations

import math
from pathlib import Path

import click

from .jsonout import json_option


def threads_default() -> int:
    from .api import default_threads

    return default_threads()


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf: `--max-kld nan` would compare false with
    everything and silently turn the gate off."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


def quantize_positionals(
    words: tuple[str, ...], type_opt: str | None, outtype_opt: str | None
) -> tuple[str | None, str, str]:
    """`quantize IN [OUT] [TYPE]` as llama-quantize reads it (a word that names a type is the
    TYPE, so `IN q4_K_M` has no OUT), merged with --type/--outtype. Returns (OUT or None, the
    type text, how the user gave it, for error messages)."""
    from .convert.plan import is_type_name
    from .errors import LlmconvError

    if len(words) > 2:
        raise LlmconvError(f"too many arguments after INFILE: {' '.join(words)} (expected [OUTFILE] [TYPE])")
    out, positional = None, None
    if len(words) == 2:
        out, positional = words
    elif len(words) == 1:
        w = words[0]
        names_types = w.strip(",") and all(is_type_name(t.strip()) for t in w.split(",") if t.strip())
        # a misspelt type (q4_km) with no type given otherwise: the type check says "did you mean"
        looks_like_type = "." not in w and "/" not in w and type_opt is None and outtype_opt is None
        out, positional = (None, w) if names_types or looks_like_type else (w, None)
    given = [
        (w, t) for w, t in (("TYPE", positional), ("--type", type_opt), ("--outtype", outtype_opt)) if t is not None
    ]
    if not given:
        raise LlmconvError(
            "no output type: add it after the file names (llmconv quantize IN.gguf [OUT.gguf] q4_K_M) or pass --type"
        )
    if len({t.lower().replace(" ", "") for _, t in given}) > 1:
        raise LlmconvError(f"two different output types: {' and '.join(f'{w} {t}' for w, t in given)}; give one")
    where, text = given[0]
    return out, text, where


_TYPE_OPTIONS = [
    click.option(
        "--pure", is_flag=True, help="Every 2-D weight in the requested type (no higher-precision output tensor)."
    ),
    click.option("--output-tensor-type", metavar="TYPE", help="Type for output.weight."),
    click.option("--token-embedding-type", metavar="TYPE", help="Type for token_embd.weight."),
    click.option(
        "--tensor-type",
        "tensor_types",
        metavar="RE=TYPE",
        multiple=True,
        help="Type for tensors whose GGUF name matches the regex RE (repeatable; first match wins).",
    ),
    click.option(
        "--threads",
        "-t",
        type=click.IntRange(1, 256),
        default=threads_default,
        show_default="all cores",
        help="Workers that read, quantize and write (on Linux, forked processes from 2 up when "
        "quantizing; LLMCONV_WORKERS=threads keeps threads). The output is the same for any count.",
    ),
    click.option(
        "--split-max-size",
        metavar="SIZE",
        default="0",
        help="Split the output into files of at most SIZE of tensor data (e.g. 4G, 500M), "
        "named Name-00001-of-0000N.gguf, which llama.cpp loads from the first file.",
    ),
    click.option(
        "--split-max-tensors",
        type=click.IntRange(0),
        default=0,
        metavar="N",
        help="Split the output into files of at most N tensors.",
    ),
    click.option("--force", "-f", is_flag=True, help="Overwrite an existing output file."),
    click.option(
        "--checksum",
        is_flag=True,
        help="Also write OUT.sha256.json with the sha256 of every tensor's bytes (checked by verify --checksums).",
    ),
    json_option(),
    click.option("--quiet", "-q", is_flag=True, help="No progress bar and no notes (warnings and errors still print)."),
    click.option("--verbose", "-v", is_flag=True, help="One line per tensor as it is written."),
]


imatrix_option = click.option(
    "--imatrix",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Importance matrix (llama-imatrix's GGUF or legacy .dat, or `llmconv imatrix`'s): "
    "quantize with llama.cpp's weighted searches and its imatrix type rules.",
)


def type_options(f):
    for opt in reversed(_TYPE_OPTIONS):
        f = opt(f)
    return f
