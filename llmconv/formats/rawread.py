"""Tensor bytes read with pread into reused buffers, not through a memory map.

Why not mmap: touching a mapped page is a page fault (tens of thousands per gigabyte even
with the kernel's fault-around), the faults of all threads serialize on the process's mmap
lock, and a file that shrinks while it is mapped kills the process with SIGBUS: no message,
no cleanup. A pread copies the bytes from the page cache into a buffer this thread already
owns, releases the GIL while it does, and a file that ends early is a short read that
becomes one line naming the file and the tensor.

`SourceFile` is one open input file; `RawTensor` is one dense tensor in it (a byte offset,
the storage dtype, the shape), which the readers of every format (Meta .pth and HF .bin
zips, safetensors, GGUF) describe and the streaming engine reads rows of.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._libc import libc_function
from ..errors import LlmconvError
from .direct_read import open_direct_read, read_cold
from .positional import DIRECT_ALIGN

# storage dtype name -> how its bytes are viewed before widening (bf16 as its uint16 bits)
RAW_DTYPES = {"bf16": np.dtype(np.uint16), "f16": np.dtype(np.float16), "f32": np.dtype(np.float32)}

_raw = threading.local()


def raw_arena(nbytes: int, file_pos: int | None = None, slot: str = "read", read_pos: int | None = None) -> np.ndarray:
    """This thread's buffer `slot` for raw source bytes, grown on demand and then reused. With
    `file_pos`, placed so that the bytes can be written to that offset of an output file past
    the page cache (an output in the stored type is these very bytes; see positional.py). The
    streaming engine keeps those in their own slots while they are written behind. Otherwise,
    with `read_pos`, placed like that offset of the input, so that a direct read lands in it
    (direct_read.py)."""
    bufs = _raw.__dict__.setdefault("bufs", {})
    buf = bufs.get(slot)
    if buf is None or buf.nbytes < nbytes + DIRECT_ALIGN:
        buf = bufs[slot] = np.empty(max(nbytes, 4 << 20) + DIRECT_ALIGN, np.uint8)
    place = file_pos if file_pos is not None else read_pos
    start = 0 if place is None else (place - buf.ctypes.data) % DIRECT_ALIGN
    return buf[start : start + nbytes]


class SourceFile:
    """An input file opened once for reading; closed when the last reader drops it. Pieces not
    in the page cache are read past it (direct_read.py)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise LlmconvError(f"cannot open: {e.strerror}", file=self.path) from None
        weakref.finalize(self, os.close, self.fd)
        self.direct_fd = open_direct_read(self.fd)
        if self.direct_fd >= 0:
            weakref.finalize(self, os.close, self.direct_fd)

    def read_into(self, offset: int, buf: np.ndarray, tensor: str | None = None) -> None:
        """Fill `buf` (contiguous) with the bytes at `offset`. A file that ends first (it was
        truncated, or replaced by a shorter one) or a failing read is an LlmconvError."""
        view = memoryview(buf).cast("B")
        want, pos = view.nbytes, offset
        done = read_cold(self.fd, self.direct_fd, offset, view)
        view, pos = view[done:], pos + done
        while view.nbytes:
            try:
                n = os.preadv(self.fd, [view], pos)
            except OSError as e:
                raise LlmconvError(
                    f"cannot read tensor data at byte {pos}: {e.strerror}", file=self.path, tensor=tensor
                ) from None
            if n == 0:
                size = os.fstat(self.fd).st_size
                raise LlmconvError(
                    f"the file ends at byte {size}, inside the tensor's data (bytes {offset}.."
                    f"{offset + want}): it was truncated or replaced while being read",
                    file=self.path,
                    tensor=tensor,
                )
            view, pos = view[n:], pos + n

    def will_need(self, offset: int, nbytes: int) -> None:
        """Start reading these bytes from disk now (a hint; the page cache serves them later).
        Not where reads can go past the page cache: the hint would fill it with what a direct
        read takes without it."""
        if hasattr(os, "posix_fadvise") and nbytes > 0 and self.direct_fd < 0:
            try:
                os.posix_fadvise(self.fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass


@dataclass
class RawTensor:
    """A dense tensor stored at `offset` of `file`, row-major, in `dtype` ("bf16", "f16", "f32")."""

    file: SourceFile
    offset: int
    dtype: str
    shape: tuple[int, ...]
    label: str  # the tensor's name in the source, for messages

    @property
    def cols(self) -> int:
        return int(self.shape[-1]) if self.shape else 1

    @property
    def row_nbytes(self) -> int:
        return self.cols * RAW_DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * RAW_DTYPES[self.dtype].itemsize

    def raw_rows(self, a: int, b: int, file_pos: int | None = None, slot: str = "read") -> np.ndarray:
        """Rows [a, b) in their storage dtype, in this thread's raw arena `slot` (valid until
        its next read), placed for a direct write to `file_pos` if given."""
        at = self.offset + a * self.row_nbytes
        buf = raw_arena((b - a) * self.row_nbytes, file_pos, slot, read_pos=at)
        self.file.read_into(at, buf, self.label)
        return buf.view(RAW_DTYPES[self.dtype]).reshape(b - a, self.cols)

    def read_rows(self, a: int, b: int, out: np.ndarray) -> None:
        """Rows [a, b) as float32 into out[b - a, cols] (any strides: a band of columns works)."""
        from ..quantize.floats import widen_into

        widen_into(self.raw_rows(a, b), out)

    def load(self) -> np.ndarray:
        """The whole tensor as a new float32 array."""
        from ..quantize.floats import widen_into

        raw = np.empty(self.nbytes, np.uint8)
        self.file.read_into(self.offset, raw, self.label)
        out = np.empty(self.shape, np.float32)
        widen_into(raw.view(RAW_DTYPES[self.dtype]).reshape(self.shape), out)
        return out

    def prefetch(self) -> None:
        self.file.will_need(self.offset, self.nbytes)


def read_rows_unpermuted(t: RawTensor, n_heads: int, a: int, b: int, out: np.ndarray) -> None:
    """Rows [a, b) of a Hugging Face Q/K weight put back in Meta's row order (hf.unpermute_rows):
    within a head of hd rows, Meta row 2j + p is HF row p * hd/2 + j. When [a, b) holds whole
    heads (the engine's chunks do), that is a strided view of the rows read, widened straight
    into `out`; otherwise the heads around [a, b) are read and gathered."""
    from ..quantize.floats import widen_into

    hd = t.shape[0] // n_heads
    h0, h1 = a // hd, -(-b // hd)
    raw = t.raw_rows(h0 * hd, h1 * hd)
    k, cols = h1 - h0, t.cols
    meta = raw.reshape(k, 2, hd // 2, cols).swapaxes(1, 2)  # (head, j, p, col)
    if a == h0 * hd and b == h1 * hd:
        widen_into(meta, out.reshape(k, hd // 2, 2, cols))
    else:
        widen_into(meta.reshape(k * hd, cols)[a - h0 * hd : b - h0 * hd], out)


_MADV_WILLNEED = 3
_PAGE = mmap.PAGESIZE
_madvise = libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])


def will_need(addr: int, nbytes: int) -> None:
    """madvise(MADV_WILLNEED) over [addr, addr + nbytes), page-aligned; a hint, errors ignored."""
    if _madvise is None:
        return
    start = addr - addr % _PAGE
    _madvise(start, nbytes + (addr - start), _MADV_WILLNEED)
