"""Start-up cost of the command line that is not llmconv's own work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COUNT_THREADS = "import os, llmconv.cli, numpy; print(len(os.listdir('/proc/self/task')))"


def _threads(*argv: str, **env_extra) -> int:
    """Threads of a process that imports the CLI as `llmconv ARGV...` would, then numpy."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env.update(PYTHONPATH=str(ROOT), **env_extra)
    cmd = [sys.executable, "-c", COUNT_THREADS, *argv]
    return int(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not Path("/proc/self/task").is_dir(), reason="needs 2 cores and /proc")
def test_streaming_commands_start_no_blas_threads_unless_asked():
    """numpy's OpenBLAS starts one thread per core at load, which busy-waits ~0.1 s of CPU;
    convert and quantize ask for none (their GEMMs are single-threaded anyway), verify keeps
    them for its numpy forward pass, and a user's own OPENBLAS_NUM_THREADS still wins."""
    assert _threads("--debug", "convert", "ckpt") == 1
    assert _threads("quantize", "in.gguf") == 1
    assert _threads("verify", "x.gguf", "ckpt") == 2
    assert _threads("convert", "ckpt", OPENBLAS_NUM_THREADS="2") == 2
