"""Run a command and sample its peak anonymous memory (RssAnon: not the page cache, not
mmapped files). Shared by tests/test_scale.py and bench/e2e.py."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def run_peak_rss_anon(cmd: list[str], timeout: float | None = None) -> tuple[float, int, int, str]:
    """Run `cmd`, reading /proc/PID/status every 5 ms; return (wall seconds, peak RssAnon
    bytes, exit code, stderr). Past `timeout` seconds the process is killed and TimeoutError raised."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    status = Path(f"/proc/{proc.pid}/status")
    peak = 0
    while proc.poll() is None:
        if timeout is not None and time.perf_counter() - start > timeout:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"{cmd[:3]} did not finish in {timeout} s")
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.005)
    err = proc.stderr.read().decode()
    code = proc.wait()
    return time.perf_counter() - start, peak, code, err
