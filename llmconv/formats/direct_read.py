"""Reading input that is not in the page cache past it (O_DIRECT), and what is cached through it.

A buffered pread of cold data makes the kernel allocate page-cache pages, fill them from the
device and copy them into our buffer; on this kind of VM every page new to the guest also costs
a host fault (see positional.py). `python bench/read_paths.py` (1 GiB of a cold checkpoint in
2 MiB pieces): buffered ~1.7 s of system time, direct ~0.05 s, and faster. But a direct read of
data that *is* cached goes to the device again, so each piece is asked first: `cachestat`
(Linux >= 6.5) counts the cached pages of a byte range without touching or mapping them.
(`preadv(..., RWF_NOWAIT)` cannot tell: on a miss it starts the kernel's readahead into the page
cache before it returns EAGAIN, which is the very cost this avoids.) Where `cachestat` is
missing, or the file system refuses O_DIRECT, reads stay buffered, as they always were.

A direct read must start, end and land on 4 KiB boundaries. The bytes of a piece that lie in
whole blocks go straight into the caller's buffer when it is placed like the file offset
(rawread.raw_arena does that); the partial blocks at its ends, or the whole piece when the
buffer is not so placed, go through a per-thread aligned bounce buffer.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from .._libc import libc_function
from .positional import DIRECT_ALIGN, DIRECT_MIN, buffer_address

# Residency is judged per segment of this many bytes: a piece partly in the page cache reads
# its cached segments buffered and the rest direct.
SEGMENT = 256 << 10
_NR_CACHESTAT = 451  # the same number on every architecture (it postdates the unified table)
_bounce = threading.local()


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint64) for n in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


_syscall = libc_function("syscall", restype=ctypes.c_long) if os.uname().sysname == "Linux" else None


def cached_pages(fd: int, offset: int, nbytes: int) -> int | None:
    """Pages of [offset, offset + nbytes) of `fd` in the page cache; None where unknown."""
    if _syscall is None:
        return None
    r, s = _Range(offset, nbytes), _Stat()
    if _syscall(ctypes.c_long(_NR_CACHESTAT), ctypes.c_int(fd), ctypes.byref(r), ctypes.byref(s), ctypes.c_uint(0)):
        return None
    return int(s.nr_cache)


def open_direct_read(fd: int) -> int:
    """A second descriptor of the file open on `fd` (reopened through /proc, never by name)
    that reads past the page cache; -1 where that, or knowing what is cached, is unsupported."""
    if not hasattr(os, "O_DIRECT") or cached_pages(fd, 0, DIRECT_ALIGN) is None:
        return -1
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return -1


def read_cold(fd: int, direct_fd: int, offset: int, view: memoryview) -> int:
    """Fill a prefix of `view` (bytes) with the file's bytes from `offset`: segments in the page
    cache through `fd`, the others through `direct_fd`. Returns the bytes filled; fewer than
    asked at the end of the file, on a refused direct read (the caller then reads the rest
    buffered, which also reports a short file), or 0 when the piece is all cached or small."""
    n = view.nbytes
    if direct_fd < 0 or n < DIRECT_MIN:
        return 0
    pages = -(-(offset % DIRECT_ALIGN + n) // DIRECT_ALIGN)
    cached = cached_pages(fd, offset, n)
    if cached is None or cached >= pages:
        return 0
    if cached == 0:
        return _read_direct(direct_fd, offset, view)
    done = 0
    for start, end, warm in _runs(fd, offset, n):
        if warm:
            got = os.preadv(fd, [view[start:end]], offset + start)
        else:
            got = _read_direct(direct_fd, offset + start, view[start:end])
        done += got
        if got < end - start:
            break
    return done


def _runs(fd: int, offset: int, n: int):
    """(start, end, cached) of the piece's runs of whole-segment residency (segments aligned
    to file offsets; one partly cached counts as not cached)."""
    runs: list[list] = []
    start = 0
    while start < n:
        end = min(n, (offset + start) // SEGMENT * SEGMENT + SEGMENT - offset)
        pages = -(-((offset + start) % DIRECT_ALIGN + end - start) // DIRECT_ALIGN)
        warm = cached_pages(fd, offset + start, end - start) == pages
        if runs and runs[-1][2] == warm:
            runs[-1][1] = end
        else:
            runs.append([start, end, warm])
        start = end
    return runs


def _read_direct(direct_fd: int, pos: int, view: memoryview) -> int:
    """Bytes of `view` filled from `pos` by direct reads (short at the end of the file; 0 when
    the file system refuses them)."""
    head = -pos % DIRECT_ALIGN
    body = max(0, view.nbytes - head) // DIRECT_ALIGN * DIRECT_ALIGN
    if body and (buffer_address(view) + head) % DIRECT_ALIGN == 0:
        done = _bounced(direct_fd, pos, view[:head]) if head else 0
        if done < head:
            return done
        got = _pread_aligned(direct_fd, view[head : head + body], pos + head)
        if got < body:
            return head + got
        return head + body + _bounced(direct_fd, pos + head + body, view[head + body :])
    return _bounced(direct_fd, pos, view)


def _bounced(direct_fd: int, pos: int, view: memoryview) -> int:
    """A direct read of the blocks around [pos, pos + len(view)) into this thread's aligned
    bounce buffer, copied out."""
    if not view.nbytes:
        return 0
    start = pos - pos % DIRECT_ALIGN
    span = -(-(pos + view.nbytes - start) // DIRECT_ALIGN) * DIRECT_ALIGN
    buf = getattr(_bounce, "buf", None)
    if buf is None or buf.nbytes < span + DIRECT_ALIGN:
        buf = _bounce.buf = np.empty(max(span, 1 << 20) + DIRECT_ALIGN, np.uint8)
    lead = -buf.ctypes.data % DIRECT_ALIGN
    block = memoryview(buf[lead : lead + span])
    got = max(0, min(_pread_aligned(direct_fd, block, start) - (pos - start), view.nbytes))
    view[:got] = block[pos - start : pos - start + got]
    return got


def _pread_aligned(direct_fd: int, view: memoryview, pos: int) -> int:
    done = 0
    while done < view.nbytes:
        try:
            n = os.preadv(direct_fd, [view[done:]], pos + done)
        except OSError:  # EINVAL: refused here; anything else the buffered read reports
            return done
        done += n
        if n == 0 or n % DIRECT_ALIGN:  # the end of the file
            break
    return done
