"""Shared by the hostile-input tests (test_hostile*.py): the fixture paths, running the CLI
in-process, checking that a refusal is one line, and editing copies of a fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llmconv.cli import main

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "fixtures" / "tiny-llama"
HF = ROOT / "fixtures" / "hf-tiny-llama"
BPE = ROOT / "fixtures" / "llama3-bpe"


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(err: str, *needles: str):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("llmconv: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def refused(argv, capsys, *needles):
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert_one_line_error(err, *needles)
    return err


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc = change(doc) or doc
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")


def with_tokenizer_json(tmp_path: Path, change=None) -> Path:
    """The HF fixture with LLaMA 3's real byte-level BPE tokenizer.json in place of
    tokenizer.model (the vocabulary sizes differ; every attack below is refused before that)."""
    d = copy_of(HF, tmp_path / "hf")
    (d / "tokenizer.model").unlink()
    shutil.copy(BPE / "tokenizer.json", d / "tokenizer.json")
    shutil.copy(BPE / "tokenizer_config.json", d / "tokenizer_config.json")
    if change:
        edit_json(d / "tokenizer.json", change)
    return d
