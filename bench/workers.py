"""Why the streaming engine's workers are processes: one kernel, the same work, run by one
worker, two worker threads of one process, and two forked worker processes.

    python bench/workers.py                   # q4_0, 1M-weight chunks (the engine's size)
    python bench/workers.py --type q6_K --chunks 64

Each worker quantizes its own 1M-weight float32 chunk over and over (the engine's chunk size,
glibc's thresholds pinned as the CLI pins them). Printed per layout: wall, CPU ns per weight,
and throughput against one worker. On a shared machine compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmconv import quantize as q  # noqa: E402
from llmconv._malloc import pin_mmap_threshold  # noqa: E402

ROWS, COLS = 512, 2048  # 1M weights: convert/chunk_work.CHUNK_WEIGHTS


def _work(qt, chunks: int) -> None:
    x = np.random.default_rng(os.getpid() + threading.get_ident() % 1000).standard_normal((ROWS, COLS), np.float32)
    qt.quantize(x)  # warm: per-thread buffers
    for _ in range(chunks):
        qt.quantize(x)


def _cpu() -> float:
    ru, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime + ch.ru_utime + ch.ru_stime


def _threads(qt, n: int, chunks: int) -> None:
    pool = [threading.Thread(target=_work, args=(qt, chunks)) for _ in range(n)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def _processes(qt, n: int, chunks: int) -> None:
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                _work(qt, chunks)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--type", default="q4_0")
    ap.add_argument("--chunks", type=int, default=512, help="chunks each worker quantizes")
    args = ap.parse_args(argv)
    pin_mmap_threshold()
    qt = q.get(args.type)
    weights = ROWS * COLS * args.chunks
    print(f"{args.type}, {args.chunks} chunks of {ROWS * COLS:,} weights per worker, load {os.getloadavg()[0]:.1f}")
    base = None
    for label, run, n in (
        ("one worker thread", _threads, 1),
        ("two worker threads", _threads, 2),
        ("two worker processes", _processes, 2),
    ):
        c0, t0 = _cpu(), time.perf_counter()
        run(qt, n, args.chunks)
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        rate = n * weights / wall
        base = base or rate
        print(
            f"{label:22s} wall {wall:6.2f} s  CPU {cpu / (n * weights) * 1e9:5.2f} ns/weight  "
            f"throughput {rate / 1e6:7.0f} M weights/s = {rate / base:.2f}x one worker"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
