"""`--json` output shared by every command: a report to a file, or to stdout with `-`."""
from __future__ import annotations

import json
from pathlib import Path

import click


def emit_json(path: str | None, obj: dict) -> None:
    if not path:
        return
    text = json.dumps(obj, indent=2, default=str)
    if path == "-":
        click.echo(text)
    else:
        Path(path).write_text(text + "\n")


def json_option(what: str = "a machine-readable report"):
    """`--json` alone writes to stdout (as gguf-dump --json does); `--json FILE` to a file."""
    return click.option("--json", "json_path", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
                        type=click.Path(dir_okay=False, allow_dash=True),
                        help=f"Write {what} as JSON to FILE, or to stdout with no FILE or '-' "
                             "(stdout then carries only the JSON).")
