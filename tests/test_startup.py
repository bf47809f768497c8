"""Start-up cost of the command line that is not llmconv's own work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COUNT_THREADS = "import os, llmconv.cli, numpy; print(len(os.listdir('/proc/self/task')))"


def _threads(**env_extra) -> int:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env.update(PYTHONPATH=str(ROOT), **env_extra)
    out = subprocess.run([sys.executable, "-c", COUNT_THREADS], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not Path("/proc/self/task").is_dir(), reason="needs 2 cores and /proc")
def test_the_cli_starts_no_blas_threads_unless_asked():
    """numpy's OpenBLAS starts one thread per core at load, which busy-waits ~0.1 s of CPU;
    the CLI asks for none (its GEMMs are single-threaded anyway), and a user's own
    OPENBLAS_NUM_THREADS still wins."""
    assert _threads() == 1
    assert _threads(OPENBLAS_NUM_THREADS="2") == 2
