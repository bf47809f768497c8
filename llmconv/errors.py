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
