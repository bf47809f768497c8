"""`llmconv imatrix` (the statistic from the PyTorch reference over the checkpoint) against
llama.cpp's own computation of it (llama-imatrix's eval callback, run through llama-cpp-python
on the f32 conversion of the same checkpoint: see llama_imatrix_oracle.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmconv.cli import main
from llmconv.imatrix import read_imatrix
from llmconv.imatrix.collect import calibration_chunks, compute_imatrix

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "tiny-llama"
HF_FIXTURE = ROOT / "fixtures" / "hf-tiny-llama"
CTX, CHUNKS = 64, 3


@pytest.mark.llamacpp
@pytest.mark.parametrize("ckpt", [FIXTURE, HF_FIXTURE], ids=["meta", "hf"])
def test_statistic_equals_llama_cpp(ckpt, converted):
    from llama_imatrix_oracle import llama_cpp_imatrix

    f32 = converted(ckpt, "f32")
    cal = calibration_chunks(ckpt, "builtin", CTX, CHUNKS)
    theirs, their_counts = llama_cpp_imatrix(f32, cal.chunks)
    ours = compute_imatrix(ckpt, "builtin", ctx=CTX, chunks=CHUNKS, progress=False, threads=1)
    assert sorted(ours.entries) == sorted(theirs)
    assert len(theirs) == 7 * 2  # 7 projections x 2 layers
    for name, e in ours.entries.items():
        assert e.counts.tolist() == their_counts[name].tolist() == [CTX * CHUNKS], name
        np.testing.assert_allclose(e.sums, theirs[name], rtol=2e-5, atol=1e-7 * theirs[name].max(), err_msg=name)
    assert ours.chunk_count == CHUNKS and ours.chunk_size == CTX


def test_chunks_start_with_bos_and_follow_the_text():
    """llama-imatrix's chunking: the text (BOS first) cut into ctx-token pieces, whose first token
    is then replaced by BOS. Checked against the tokenizer directly."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(FIXTURE / "tokenizer.model"))
    text = (ROOT / "llmconv" / "imatrix" / "calibration.txt").read_text(encoding="utf-8")
    ids = [sp.bos_id()] + sp.encode(text)
    cal = calibration_chunks(FIXTURE, "builtin", 32, None)
    assert cal.chunks.shape == (len(ids) // 32, 32)
    assert (cal.chunks[:, 0] == sp.bos_id()).all()
    flat = np.array(ids[: cal.chunks.size]).reshape(-1, 32)
    assert np.array_equal(cal.chunks[:, 1:], flat[:, 1:])
    assert calibration_chunks(FIXTURE, "builtin", 32, 5).chunks.shape == (5, 32)


def test_bos_changes_the_statistic(monkeypatch):
    """Why the BOS rule matters: the same tokens without a BOS at each chunk start give other sums."""
    import llmconv.imatrix.collect as C

    with_bos = compute_imatrix(FIXTURE, "builtin", ctx=32, chunks=2, progress=False, threads=1)
    real = C.calibration_chunks

    def no_bos(*a, **k):
        cal = real(*a, **k)
        cal.chunks[:, 0] = cal.chunks[:, 1]
        return cal

    monkeypatch.setattr(C, "calibration_chunks", no_bos)
    without = compute_imatrix(FIXTURE, "builtin", ctx=32, chunks=2, progress=False, threads=1)
    a = with_bos.entries["blk.1.attn_output.weight"].sums
    b = without.entries["blk.1.attn_output.weight"].sums
    assert not np.allclose(a, b, rtol=0.05)


def test_cli_imatrix_then_convert(tmp_path, capsys):
    im_path = tmp_path / "tiny.imatrix.gguf"
    text = tmp_path / "calib.txt"
    text.write_text((ROOT / "fixtures" / "corpus.txt").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    assert (
        main(
            [
                "imatrix",
                str(FIXTURE),
                "--text",
                str(text),
                "--ctx",
                "32",
                "--chunks",
                "4",
                "-t",
                "1",
                "-o",
                str(im_path),
                "-q",
            ]
        )
        == 0
    )
    im = read_imatrix(im_path)
    assert im.datasets == [str(text)] and im.chunk_count == 4 and im.chunk_size == 32
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert main(["convert", str(FIXTURE), "--outtype", "q4_K_M", "--imatrix", str(im_path), "-o", str(a), "-q"]) == 0
    assert (
        main(
            [
                "convert",
                str(FIXTURE),
                "--outtype",
                "q4_K_M",
                "--imatrix-text",
                str(text),
                "--imatrix-ctx",
                "32",
                "--imatrix-chunks",
                "4",
                "-t",
                "1",
                "-o",
                str(b),
                "-q",
            ]
        )
        == 0
    )
    assert a.read_bytes() == b.read_bytes()
    # verify's expected pass quantizes as the file was quantized: with the imatrix given
    assert main(["verify", str(a), "-r", str(FIXTURE), "--tokens", "32", "--imatrix", str(im_path)]) == 0
    assert main(["verify", str(a), "-r", str(FIXTURE), "--tokens", "32"]) == 1
    capsys.readouterr()
    assert main(["imatrix", str(FIXTURE), "--text", str(text), "-o", str(im_path), "-q"]) == 2  # exists
    assert main(["imatrix", str(FIXTURE), "--ctx", "8", "-o", str(tmp_path / "x"), "-q"]) == 2
    assert main(["imatrix", str(FIXTURE), "--text", str(tmp_path / "none.txt"), "-o", str(tmp_path / "y"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "exists" in err[0] and "16" in err[1] and "none.txt" in err[2]
