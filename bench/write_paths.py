"""System time of writing a file through the page cache against past it (O_DIRECT).

    python bench/write_paths.py DIR [MiB] [chunk KiB]

Writes MiB (default 1024) into DIR four ways, in chunks (default 4096 KiB), then fsyncs:
a new file through the page cache (twice: the second one gets the pages the first one's
deletion freed), the same file again (its pages already cached), and a new file with
O_DIRECT. Prints wall and system seconds of the writes and of the fsync. On a VM whose
memory the host takes back when the guest frees it (free page reporting), page-cache pages
new to the guest cost a host fault each on first touch: the first buffered write shows it.
"""

from __future__ import annotations

import mmap
import os
import resource
import sys
import time
from pathlib import Path


def write(path: Path, total: int, chunk: int, direct: bool, fresh: bool) -> str:
    if fresh and path.exists():
        path.unlink()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0), 0o644)
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT wants
    buf.write(os.urandom(chunk))
    try:
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        pos = 0
        while pos < total:
            pos += os.pwrite(fd, buf, pos)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        os.fsync(fd)
        r2, t2 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    finally:
        os.close(fd)
    return (
        f"write {t1 - t0:5.2f} s wall {r1.ru_stime - r0.ru_stime:5.2f} s sys   "
        f"fsync {t2 - t1:5.2f} s wall {r2.ru_stime - r1.ru_stime:5.2f} s sys"
    )


def main(argv: list[str]) -> int:
    d = Path(argv[0])
    total = (int(argv[1]) if len(argv) > 1 else 1024) << 20
    chunk = (int(argv[2]) if len(argv) > 2 else 4096) << 10
    path = d / "write_paths.bin"
    try:
        for label, direct, fresh in (
            ("new file, page cache", False, True),
            ("new file, page cache again", False, True),
            ("same file, pages cached", False, False),
            ("new file, O_DIRECT", True, True),
        ):
            print(f"{label:28s} {write(path, total, chunk, direct, fresh)}", flush=True)
    finally:
        path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
