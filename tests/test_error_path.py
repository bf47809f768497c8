"""One error path: an LlmconvError is a click exception (one line, exit 2), including the three
cases that used to end in a traceback or after the work was done: verify --engine llama.cpp
without a working llama-cpp-python, --json to a path that cannot be written, and
`python -m llmconv.verify.calibrate` outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

from llmconv.cli import main
from llmconv.errors import LlmconvError

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "fixtures" / "tiny-llama"


def run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("llmconv: error: "), err
    for w in words:
        assert w in err, err


def test_llmconv_error_is_a_click_exception():
    e = LlmconvError("bad value", file="x.json", tensor="blk.0.attn_q.weight")
    assert isinstance(e, click.ClickException) and e.exit_code == 2
    assert str(e) == e.format_message() == "x.json: tensor blk.0.attn_q.weight: bad value"


def test_verify_engine_without_llama_cpp_python(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not installed
    code, err = run(["verify", tmp_path / "x.gguf", "-r", META, "--engine", "llama.cpp"], capsys)
    one_line(code, err, "needs llama-cpp-python")


def test_verify_engine_with_a_broken_llama_cpp_python(tmp_path, capsys, monkeypatch):
    (tmp_path / "llama_cpp").mkdir()
    (tmp_path / "llama_cpp" / "__init__.py").write_text(
        "raise RuntimeError('Failed to load shared library libllama.so: undefined symbol')\n"
    )
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = run(["verify", tmp_path / "x.gguf", "-r", META, "--engine", "llama.cpp"], capsys)
    one_line(code, err, "does not load", "RuntimeError", "libllama.so")


def test_json_to_an_unwritable_path_is_refused_before_converting(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    code, err = run(
        ["convert", META, "-o", out, "--outtype", "q8_0", "-q", "--json", tmp_path / "no" / "r.json"], capsys
    )
    one_line(code, err, "r.json", "folder does not exist")
    assert not out.exists()
    (tmp_path / "r.json").write_text("{}")
    code, err = run(["convert", META, "-o", out, "--outtype", "q8_0", "-q", "--json", tmp_path / "r.json"], capsys)
    one_line(code, err, "r.json", "--force")
    assert not out.exists()
    code, err = run(["quantize", tmp_path / "in.gguf", out, "--type", "q8_0", "--json", tmp_path / "r.json"], capsys)
    one_line(code, err, "r.json", "--force")
    code, err = run(
        ["convert", META, "-o", out, "--outtype", "q8_0", "-q", "--json", tmp_path / "r.json", "-f"], capsys
    )
    assert code == 0 and out.exists() and (tmp_path / "r.json").read_text().startswith("{\n"), err


def test_debug_before_or_after_the_subcommand_shows_the_traceback(tmp_path, capsys):
    for argv in (["--debug", "inspect", tmp_path / "x.gguf"], ["inspect", tmp_path / "x.gguf", "--debug"]):
        code, err = run(argv, capsys)
        assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("llmconv: error: "), err
    code, err = run(["inspect", tmp_path / "x.gguf"], capsys)
    one_line(code, err, "x.gguf")


def test_calibrate_outside_the_source_tree(tmp_path):
    shutil.copytree(ROOT / "llmconv", tmp_path / "llmconv", ignore=shutil.ignore_patterns("__pycache__"))
    res = subprocess.run(
        [sys.executable, "-m", "llmconv.verify.calibrate", "--types", "q8_0", "--tokens", "16"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "ships with llmconv's source tree" in res.stderr and "give" not in res.stdout
    res = subprocess.run(
        [sys.executable, "-m", "llmconv.verify.calibrate", str(tmp_path / "nope"), "--types", "q8_0"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("llmconv: error: ") and "nope" in res.stderr, res.stderr
