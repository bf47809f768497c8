"""One error type for everything a user can cause with bad input.

The CLI turns an LlmconvError into a single line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

from pathlib import Path


class LlmconvError(Exception):
    """Bad input or an impossible request. `file` and `tensor` say where."""

    def __init__(self, message: str, *, file: str | Path | None = None, tensor: str | None = None):
        self.message = message
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.tensor:
            where.append(f"tensor {self.tensor}")
        prefix = ": ".join(where)
        text = " ".join(self.message.split())  # always one line
        return f"{prefix}: {text}" if prefix else text


def load_json(path: str | Path):
    """A JSON file's contents; undecodable or invalid JSON is an LlmconvError naming the file.
    Callers check for a missing file and for the shape they expect."""
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlmconvError(f"invalid JSON: {e}", file=path) from None
