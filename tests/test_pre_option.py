"""--pre overrides the detected BPE pre-tokenizer; it is refused for SentencePiece."""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader

import llmconv
from llmconv.cli import main

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def _pre(path: Path) -> str:
    return GGUFReader(path).get_field("tokenizer.ggml.pre").contents()


def test_pre_override_for_meta_tiktoken(tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    llmconv.convert(FIX / "llama3-tiny", a, outtype="f16")
    llmconv.convert(FIX / "llama3-tiny", b, outtype="f16", pre="gpt-2")
    assert _pre(a) == "llama-bpe"
    assert _pre(b) == "gpt-2"


def test_pre_refused_for_sentencepiece(tmp_path, capsys):
    rc = main(["convert", str(FIX / "tiny-llama"), "-o", str(tmp_path / "x.gguf"), "-q", "--pre", "llama-bpe"])
    assert rc == 2
    assert "SentencePiece" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()
