"""A file written at known offsets: the layout is fixed first, then each tensor's bytes go
to their place with pwrite, from any thread and in any order. GGUF and ggjt writers share it.

Tensor data bypasses the page cache where it can (O_DIRECT, `pwrite_direct`). A buffered
pwrite copies every byte into page-cache pages allocated for it, and on this kind of VM
(free page reporting: memory the guest frees goes back to the host) those fresh pages cost a
host fault each on first touch: writing 1 GiB into new page cache took 0.2 to 2.4 s of
system time, against 0.1 s through O_DIRECT, where the device reads our buffer itself.
For a cheap output type (q8_0, q4_0) that copy was most of the conversion's system time.
The header, and the few bytes of each piece that do not fill a whole aligned block, still go
through the page cache (a direct write must start and end on a block boundary); every block
is written by one path only, so the two never overlap. The fsync before the rename stays:
it also flushes the device's cache and the file's metadata.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import numpy as np

from .._libc import libc_function

# File offset and memory alignment of a direct write: 4 KiB covers 512-byte and 4 KiB
# sectors and the file system block. Smaller pieces are not worth a synchronous device write.
DIRECT_ALIGN = 4096
DIRECT_MIN = 64 << 10


def pwrite_all(fd: int, buf, pos: int) -> None:
    mv = memoryview(buf).cast("B")
    while mv.nbytes:
        n = os.pwrite(fd, mv, pos)
        mv = mv[n:]
        pos += n


def open_direct(fd: int) -> int:
    """A second descriptor of the file open on `fd` (the same inode, reopened through
    /proc, never by name) that writes past the page cache; -1 where O_DIRECT is unsupported."""
    if not hasattr(os, "O_DIRECT"):
        return -1
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return -1


def reserve(fd: int, nbytes: int) -> None:
    """Allocate the file's blocks up front (fallocate, no zeros written): a full disk fails
    here, before any conversion work, and on ext4 direct writes into reserved blocks inside
    the file's size run concurrently (a write that allocates or extends the file holds the
    inode lock for its whole device write, which serialized the workers). A file system
    without fallocate is left alone (glibc's posix_fallocate would write zeros instead)."""
    if _fallocate is None or nbytes <= 0:
        return
    if _fallocate(fd, 0, 0, nbytes) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(err, os.strerror(err))


_fallocate = libc_function("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])


def direct_span(pos: int, nbytes: int, addr: int) -> tuple[int, int]:
    """(start, length) within a piece of `nbytes` at file offset `pos`, held in memory at
    `addr`, of the whole aligned blocks a direct write can take; length 0 when there are too
    few or the memory is not aligned like the file offset."""
    head = -pos % DIRECT_ALIGN
    body = max(0, nbytes - head) // DIRECT_ALIGN * DIRECT_ALIGN
    if body < DIRECT_MIN or (addr + head) % DIRECT_ALIGN:
        return 0, 0
    return head, body


def buffer_address(mv: memoryview) -> int:
    return np.frombuffer(mv, np.uint8).ctypes.data if mv.nbytes else 0


def pwrite_direct(fd: int, direct_fd: int, buf, pos: int) -> int:
    """pwrite_all of `buf` at `pos`, its whole aligned blocks through `direct_fd` (from
    open_direct, or -1: all through `fd`). Returns the bytes that went direct. A file system
    that refuses the direct write (EINVAL) gets the bytes through `fd` instead."""
    mv = memoryview(buf).cast("B")
    head, body = direct_span(pos, mv.nbytes, buffer_address(mv)) if direct_fd >= 0 else (0, 0)
    done = 0
    while done < body:
        try:
            n = os.pwrite(direct_fd, mv[head + done : head + body], pos + head + done)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            break
        done += n
        if n == 0 or n % DIRECT_ALIGN:  # a short write off a block boundary: the rest buffered
            break
    if done:
        pwrite_all(fd, mv[:head], pos)
        pwrite_all(fd, mv[head + done :], pos + head + done)
    else:
        pwrite_all(fd, mv, pos)
    return done


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
        self.direct_fd = open_direct(self.fd)
        reserve(self.fd, layout.total_size)
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
        pwrite_direct(self.fd, self.direct_fd, buf, self.place(name))
        self.mark_written(name)

    def _close_direct(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1

    def close(self) -> None:
        self._close_direct()
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
        self._close_direct()
        if self.fd >= 0:
            if exc[0] is not None:
                os.close(self.fd)
                self.fd = -1
            else:
                self.close()
