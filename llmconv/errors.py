"""One error type for everything a user can cause with bad input.

An LlmconvError is a click exception: click prints it as one line on stderr
(`llmconv: error: <file>: tensor <name>: <what>`) and exits 2. Anything else is a bug: cli.py
prints it as one line with exit 70, its traceback behind --debug.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import click

# Control characters (C0, DEL, C1), line/paragraph separators and bidirectional overrides:
# a file name or tensor name holding them could clear the screen, forge a second message
# line or reorder what the user reads.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` with every control or bidi character shown as an escape (\\n, \\x1b, \\u202e)."""

    def esc(m: re.Match) -> str:
        c = m.group()
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (
            f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
        )

    return _UNPRINTABLE.sub(esc, text)


class LlmconvError(click.ClickException):
    """Bad input or an impossible request. `file` and `tensor` say where."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | Path | None = None, tensor: str | None = None):
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        super().__init__(message)
        self.args = (self.one_line(),)

    def __str__(self) -> str:
        return self.one_line()

    def format_message(self) -> str:
        return self.one_line()

    def show(self, file=None) -> None:
        click.echo(f"llmconv: error: {self.one_line()}", file=file, err=file is None)

    def one_line(self) -> str:
        where = []
        if self.file:
            where.append(printable(self.file))
        if self.tensor:
            where.append(f"tensor {printable(self.tensor)}")
        prefix = ": ".join(where)
        text = printable(" ".join(self.message.split()))  # always one line
        return f"{prefix}: {text}" if prefix else text


def environment_error(e: BaseException) -> str:
    """One line for an error the environment caused (disk full, read-only file system, a name
    too long, a directory where a file was expected, out of memory, nesting too deep)."""
    if isinstance(e, MemoryError):
        return "out of memory"
    if isinstance(e, RecursionError):
        return "input nested too deeply"
    if isinstance(e, OSError):
        where = ": ".join(printable(str(f)) for f in (e.filename, e.filename2) if f is not None)
        what = e.strerror or " ".join(str(e).split()) or type(e).__name__
        return f"{where}: {printable(what)}" if where else printable(what)
    return printable(" ".join(str(e).split()))


def is_library_panic(e: BaseException) -> bool:
    """A Rust library (tokenizers, safetensors) panicked: pyo3 raises PanicException, which
    derives from BaseException, so `except Exception` does not catch it."""
    return type(e).__name__ == "PanicException"


def read_text_file(path: Path) -> str:
    """A UTF-8 text file (verify --text, imatrix --text), every failure one line naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LlmconvError("no such file", file=path) from None
    except IsADirectoryError:
        raise LlmconvError("is a directory, expected a text file", file=path) from None
    except UnicodeDecodeError as e:
        raise LlmconvError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=path) from None
    except OSError as e:
        raise LlmconvError(f"cannot read: {e.strerror}", file=path) from None


MAX_JSON_BYTES = 256 << 20  # Llama 3's tokenizer.json is 9 MB; a config is a few KB


def read_regular_file(path: str | Path, max_bytes: int) -> bytes:
    """A file's bytes, refusing anything but a regular file (a FIFO would block, /dev/zero
    would never end) and anything over `max_bytes`. Missing files raise FileNotFoundError."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LlmconvError("not a regular file; refusing to read it", file=path)
        if st.st_size > max_bytes:
            raise LlmconvError(f"is {st.st_size} bytes; the limit for this file is {max_bytes}", file=path)
        chunks, left = [], st.st_size
        while left > 0:
            b = os.read(fd, min(left, 1 << 24))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def load_json(path: str | Path):
    """A JSON file's contents, checked against the schema its name selects (convert/schema.py:
    config.json, params.json, tokenizer*.json, ...). Invalid JSON, a wrong value, a lone
    surrogate or nesting too deep is an LlmconvError naming the file (and the key).
    Callers check for a missing file."""
    import json

    from .convert.schema import SchemaError, validate
    from .convert.schema_tokenizer import validate_tokenizer_json

    try:
        text = read_regular_file(path, MAX_JSON_BYTES).decode("utf-8")
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LlmconvError(f"invalid JSON: {e}", file=path) from None
    except RecursionError:
        raise LlmconvError("invalid JSON: nested too deeply", file=path) from None
    except OSError as e:
        raise LlmconvError(f"cannot read: {e.strerror or e}", file=path) from None
    try:
        (validate_tokenizer_json if Path(path).name == "tokenizer.json" else validate)(doc, path)
    except SchemaError as e:
        raise LlmconvError(str(e), file=path) from None
    return doc
