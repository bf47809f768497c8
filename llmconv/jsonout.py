"""`--json` output shared by every command: a report to a file, or to stdout with `-`.

A report never replaces an existing file unless the command was given --force (a mistyped
`--json model.gguf` must not overwrite the model just written), is never written through a
symlink, and an unwritable path is one line, not a traceback.
"""

from __future__ import annotations

import json
import os

import click

from .errors import LlmconvError


def emit_json(path: str | None, obj: dict, text: str | None = None) -> None:
    """Write `obj` as JSON (or `text` as given) to `path`; '-' is stdout."""
    if not path:
        return
    text = json.dumps(obj, indent=2, default=str) if text is None else text
    if path == "-":
        click.echo(text)
        return
    params = getattr(click.get_current_context(silent=True), "params", {})
    flags = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_TRUNC if params.get("force") else os.O_EXCL
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise LlmconvError("--json: the file exists; pass --force to overwrite it", file=path) from None
    except OSError as e:
        raise LlmconvError(f"--json: cannot write: {e.strerror}", file=path) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError as e:
        raise LlmconvError(f"--json: cannot write: {e.strerror}", file=path) from None


def check_json_dir(ctx, param, path: str | None) -> str | None:  # noqa: ARG001 (a click callback)
    """Before the command runs (a conversion can take an hour): the report's folder must exist
    and be writable, so an unwritable `--json` path fails first, not after the model is written."""
    if path and path != "-":
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise LlmconvError("--json: the folder does not exist", file=path)
        if not os.access(folder, os.W_OK | os.X_OK):
            read_only = os.statvfs(folder).f_flag & os.ST_RDONLY
            raise LlmconvError(
                f"--json: cannot write here: {'Read-only file system' if read_only else 'Permission denied'}", file=path
            )
    return path


def check_json_path(path: str | None, force: bool) -> None:
    """Before the command runs, with its --force known: an existing `--json FILE` is refused
    unless --force (check_json_dir has checked the folder when the option was parsed)."""
    if path and path != "-" and os.path.lexists(path) and not force:
        raise LlmconvError("--json: the file exists; pass --force to overwrite it", file=path)


def json_option(what: str = "a machine-readable report"):
    """`--json` alone writes to stdout (as gguf-dump --json does); `--json FILE` to a file."""
    return click.option(
        "--json",
        "json_path",
        is_flag=False,
        flag_value="-",
        default=None,
        metavar="[FILE]",
        type=click.Path(dir_okay=False, allow_dash=True),
        callback=check_json_dir,
        help=f"Write {what} as JSON to FILE, or to stdout with no FILE or '-' (stdout then carries only the JSON).",
    )


def echo_written(res, plan, quiet: bool, json_path: str | None = None) -> None:
    """After convert/quantize/convert-lora: the plan's notes (unless -q), then the one-line
    summary: files, tensors, size, type, time, rate. With `--json -` stdout carries only the
    JSON, so the summary goes to stderr."""
    for n in [] if quiet else plan.notes:
        click.echo(f"note: {n}", err=True)
    click.echo(
        f"wrote {', '.join(map(str, res.paths))}: {res.n_tensors} tensors, {res.nbytes / 2**20:,.1f} MiB, "
        f"{plan.outtype}, in {res.seconds:.1f} s ({res.nbytes / 2**20 / max(res.seconds, 1e-9):,.0f} MiB/s)",
        err=json_path == "-",
    )
