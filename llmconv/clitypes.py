"""Click parameter types and argument rules shared by the commands."""
from __future__ import annotations

import math

import click


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf: `--max-kld nan` would compare false with
    everything and silently turn the gate off."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


def quantize_positionals(words: tuple[str, ...], type_opt: str | None, outtype_opt: str | None
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
    given = [(w, t) for w, t in (("TYPE", positional), ("--type", type_opt), ("--outtype", outtype_opt)) if t is not None]
    if not given:
        raise LlmconvError("no output type: add it after the file names (llmconv quantize IN.gguf [OUT.gguf] q4_K_M) "
                           "or pass --type")
    if len({t.lower().replace(" ", "") for _, t in given}) > 1:
        raise LlmconvError(f"two different output types: {' and '.join(f'{w} {t}' for w, t in given)}; give one")
    where, text = given[0]
    return out, text, where
