"""Run a command and sample its peak anonymous memory (RssAnon: not the page cache, not
mmapped files), summed over the process and its descendants (the streaming engine's worker
processes). Shared by tests/test_scale.py, bench/e2e.py and bench/pipeline.py."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """pid and its live descendants (/proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split())
        except OSError:
            continue
    return out


def rss_anon(pids: list[int]) -> int:
    """RssAnon summed over the processes, in bytes. Pages a forked worker still shares with its
    parent count once per process: an upper bound."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def run_peak_rss_anon(cmd: list[str], timeout: float | None = None) -> tuple[float, int, int, str]:
    """Run `cmd`, sampling its process tree's RssAnon every 5 ms; return (wall seconds, peak
    RssAnon bytes, exit code, stderr). Past `timeout` seconds the process is killed and
    TimeoutError raised."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        if timeout is not None and time.perf_counter() - start > timeout:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"{cmd[:3]} did not finish in {timeout} s")
        peak = max(peak, rss_anon(process_tree(proc.pid)))
        time.sleep(0.005)
    err = proc.stderr.read().decode()
    code = proc.wait()
    return time.perf_counter() - start, peak, code, err
