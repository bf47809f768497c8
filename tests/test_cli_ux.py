"""Command-line conventions a llama.cpp user expects (issue 19), each checked in a subprocess."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmconv", *args], capture_output=True, text=True, timeout=120)


def test_python_dash_m_llmconv_runs_the_cli():
    res = run("--help")
    assert res.returncode == 0, res.stderr
    for cmd in ("convert", "quantize", "verify", "inspect"):
        assert cmd in res.stdout


def test_version_names_the_libraries():
    from importlib.metadata import version

    import llmconv

    res = run("--version")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert line.startswith(f"llmconv {llmconv.__version__} ")
    for lib in ("numpy", "torch", "gguf"):
        assert f"{lib} {version(lib)}" in line


def test_license_matches_pyproject():
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
