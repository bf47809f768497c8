"""System time of reading a cold file through the page cache against past it (O_DIRECT).

    python bench/read_paths.py FILE [MiB] [chunk KiB] [first GiB]

Reads MiB (default 1024) of FILE, a different stretch for each way so that every one starts
cold (each stretch is evicted with POSIX_FADV_DONTNEED first), in chunks (default 2048 KiB,
the streaming engine's bf16 chunk): buffered pread; O_DIRECT pread; buffered
`preadv(RWF_NOWAIT)` first and the rest O_DIRECT (the residency probe that does not work: a
miss starts readahead into the page cache); llmconv's SourceFile.read_into (cachestat, then
direct), into buffers placed like the file offset and, last, not so placed (bounce buffer).
Prints MiB/s and the system seconds of each; FILE needs (first GiB + 5 x MiB) bytes. (The host
may cache what the guest evicted: a stretch read again soon reads faster.)
"""

from __future__ import annotations

import mmap
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmconv.formats.rawread import SourceFile, raw_arena  # noqa: E402


def timed(name: str, total: int, read) -> None:
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    read()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    print(
        f"{name:34s} {total / (t1 - t0) / 2**20:6.0f} MiB/s  sys {r1.ru_stime - r0.ru_stime:5.2f} s  user {r1.ru_utime - r0.ru_utime:5.2f} s"
    )


def main() -> None:
    path = Path(sys.argv[1])
    total = int(sys.argv[2]) << 20 if len(sys.argv) > 2 else 1 << 30
    chunk = int(sys.argv[3]) << 10 if len(sys.argv) > 3 else 2 << 20
    first = int(sys.argv[4]) << 30 if len(sys.argv) > 4 else 0
    fd = os.open(path, os.O_RDONLY)
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT wants
    mv = memoryview(buf)
    src = SourceFile(path)

    def plain(start, nowait=False, direct=False):
        pos = start
        while pos < start + total:
            if direct:
                n = os.preadv(dfd, [mv], pos)
            elif nowait:
                try:
                    n = os.preadv(fd, [mv], pos, os.RWF_NOWAIT)
                except BlockingIOError:
                    n = 0
                if n < chunk:
                    n += os.preadv(dfd if n % 4096 == 0 else fd, [mv[n:]], pos + n)
            else:
                n = os.preadv(fd, [mv], pos)
            pos += n

    def llmconv_reads(start, skew):
        for pos in range(start + 100, start + total, chunk):
            src.read_into(pos, raw_arena(chunk, read_pos=pos + skew))

    ways = [
        ("buffered pread", lambda s: plain(s)),
        ("O_DIRECT pread", lambda s: plain(s, direct=True)),
        ("RWF_NOWAIT probe, then O_DIRECT", lambda s: plain(s, nowait=True)),
        ("SourceFile.read_into, placed", lambda s: llmconv_reads(s, 0)),
        ("SourceFile.read_into, bounced", lambda s: llmconv_reads(s, 8)),
    ]
    for k, (name, read) in enumerate(ways):
        start = first + k * (total + (8 << 20))
        os.posix_fadvise(fd, start, total + (8 << 20), os.POSIX_FADV_DONTNEED)
        timed(name, total, lambda: read(start))


if __name__ == "__main__":
    main()
