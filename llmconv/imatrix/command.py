"""`llmconv imatrix`: llama-imatrix's importance matrix, computed from the original checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from ..jsonout import emit_json, json_option


@click.command(context_settings={"max_content_width": 100})
@click.argument("ckpt_dir", type=click.Path(path_type=Path))
@click.option(
    "--text",
    default="builtin",
    show_default=True,
    metavar="FILE",
    help="UTF-8 calibration text. 'builtin': the bundled one (public-domain prose and code).",
)
@click.option(
    "--outfile",
    "-o",
    type=click.Path(path_type=Path),
    default=Path("imatrix.gguf"),
    show_default=True,
    help="Where to write the GGUF imatrix (llama.cpp's format: llama-quantize --imatrix reads it).",
)
@click.option(
    "--ctx",
    type=click.IntRange(1),
    default=512,
    show_default=True,
    metavar="N",
    help="Tokens per chunk; each chunk is evaluated on its own and starts with BOS (as llama-imatrix -c).",
)
@click.option("--chunks", type=click.IntRange(1), metavar="N", help="Use only the first N chunks (default: all).")
@click.option(
    "--threads",
    "-t",
    type=click.IntRange(1, 256),
    metavar="N",
    help="Threads for the forward pass (default: torch's, all cores).",
)
@click.option("--force", "-f", is_flag=True, help="Overwrite an existing output file.")
@json_option()
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def imatrix(ckpt_dir, text, outfile, ctx, chunks, threads, force, json_path, quiet):
    """Compute an importance matrix for CKPT_DIR (a Meta, Hugging Face or Mistral checkpoint).

    The statistic is llama-imatrix's (the sum of squared inputs of every blk.* projection over
    the tokens, and the token count; for a Mixtral's stacked experts one row and count per
    expert, over the tokens routed to it), from llmconv's float32 reference forward pass over
    the checkpoint's own weights, one layer at a time. convert/quantize --imatrix read the file,
    as does llama-quantize --imatrix.

    \b
    Examples:
      llmconv imatrix path/to/ckpt -o model.imatrix.gguf                  # the bundled calibration text
      llmconv imatrix path/to/ckpt --text calib.txt --ctx 512 --chunks 100 -o model.imatrix.gguf
      llmconv convert path/to/ckpt --outtype q4_K_M --imatrix model.imatrix.gguf
    """
    from ..api import imatrix as run

    result = run(ckpt_dir, outfile, text=text, ctx=ctx, chunks=chunks, threads=threads, force=force, progress=not quiet)
    im = result.imatrix
    # with --json -, stdout carries only the JSON
    click.echo(
        f"wrote {outfile}: {len(im.entries)} matrices, {im.chunk_count} chunks of {im.chunk_size} tokens "
        f"from {im.datasets[0]}",
        err=json_path == "-",
    )
    emit_json(json_path, {"checkpoint": str(ckpt_dir), **result.report()})
