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
