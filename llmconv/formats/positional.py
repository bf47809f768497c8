"""A file written at known offsets: the layout is fixed first, then each tensor's bytes go
to their place with pwrite, from any thread and in any order. GGUF and ggjt writers share it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def pwrite_all(fd: int, buf, pos: int) -> None:
    mv = memoryview(buf).cast("B")
    while mv.nbytes:
        n = os.pwrite(fd, mv, pos)
        mv = mv[n:]
        pos += n


def as_bytes(data: np.ndarray | bytes | memoryview) -> memoryview:
    if isinstance(data, np.ndarray):
        return memoryview(np.ascontiguousarray(data).view(np.uint8).reshape(-1))
    return memoryview(data)


class PositionalWriter:
    """Subclasses give `layout` a `header`, `tensors`, `index` and `total_size`, and say in
    `place(name)` where a tensor's data goes (writing any per-tensor record first). Data is
    written whole (`write_tensor`) or in pieces by whoever holds `fd` (the streaming engine
    pwrites chunks from its workers), then `mark_written(name)`."""

    def __init__(self, out, layout):
        """`out` is an open temp file from formats.atomic (its descriptor is used, never its
        name: see atomic.py), or a path, which is created or truncated."""
        self.layout = layout
        if hasattr(out, "fd"):
            self.path = Path(out.path)
            self.fd = os.dup(out.fd)
            os.ftruncate(self.fd, 0)
        else:
            self.path = Path(out)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.written: set[str] = set()
        pwrite_all(self.fd, layout.header, 0)

    def place(self, name: str) -> int:
        """Absolute file offset of tensor `name`'s data."""
        raise NotImplementedError

    def mark_written(self, name: str) -> None:
        self.written.add(name)

    def write_tensor(self, name: str, data: np.ndarray | bytes | memoryview) -> None:
        t = self.layout.tensors[self.layout.index[name]]
        buf = as_bytes(data)
        if buf.nbytes != t.nbytes:
            raise ValueError(f"{name}: {buf.nbytes} bytes given, layout says {t.nbytes}")
        pwrite_all(self.fd, buf, self.place(name))
        self.mark_written(name)

    def close(self) -> None:
        if self.fd >= 0:
            missing = [t.name for t in self.layout.tensors if t.name not in self.written]
            # size the file to the layout: no padding after the last tensor (ggjt loaders read
            # records until the end of the file, so trailing bytes would break them)
            os.ftruncate(self.fd, self.layout.total_size)
            os.close(self.fd)
            self.fd = -1
            if missing:
                raise RuntimeError(f"tensors never written: {missing[:5]}")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.fd >= 0:
            if exc[0] is not None:
                os.close(self.fd)
                self.fd = -1
            else:
                self.close()
