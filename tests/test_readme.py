"""The README's quick start does what it says: its first command's llmconv steps, run as
written in a fresh directory, give a file that llama.cpp loads and generates from."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start_steps() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)\n```", text, re.S).group(1)
    steps = [shlex.split(part) for part in first_block.split("&&")]
    return [s for s in steps if s and s[0] == "llmconv"]


def test_quick_start_converts_verifies_and_runs_in_llama_cpp(tmp_path):
    steps = quick_start_steps()
    assert [s[1] for s in steps] == ["convert", "verify"]
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    for step in steps:
        res = subprocess.run(
            [sys.executable, "-m", "llmconv", *step[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, (step, res.stdout, res.stderr)
    verify_out = res.stdout
    assert "PASS" in verify_out, verify_out
    llama_cpp = pytest.importorskip("llama_cpp")
    written = tmp_path / steps[1][2]
    llm = llama_cpp.Llama(model_path=str(written), n_ctx=128, verbose=False, seed=0)
    out = llm("Once upon a time", max_tokens=16, temperature=0.0)
    assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["text"].strip()
