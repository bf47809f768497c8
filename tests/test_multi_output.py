"""Issue 18: several output types from one read of the source (convert and quantize). Each
file must be byte-identical to the one its own single-type run writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmconv
from llmconv.cli import main
from llmconv.formats.checksums import check_sidecar

ROOT = Path(__file__).resolve().parents[1]
ONE = ROOT / "fixtures" / "tiny-llama"
TWO = ROOT / "fixtures" / "tiny-llama-2shard"
TYPES = ["q8_0", "q6_K", "q4_K_M", "q2_K"]
NAMES = [
    "tiny-llama-1.8M-Q8_0.gguf",
    "tiny-llama-1.8M-Q6_K.gguf",
    "tiny-llama-1.8M-Q4_K_M.gguf",
    "tiny-llama-1.8M-Q2_K.gguf",
]


def test_convert_several_types_equal_single_runs(tmp_path, monkeypatch):
    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir()
    single.mkdir()
    llmconv.convert(ONE, f"{multi}/", outtype=",".join(TYPES), threads=2, checksum=True)
    assert sorted(p.name for p in multi.glob("*.gguf")) == sorted(NAMES)
    monkeypatch.chdir(single)  # single runs with the default name in the cwd
    for t in TYPES:
        llmconv.convert(ONE, outtype=t, threads=1)
    for name in NAMES:
        assert (multi / name).read_bytes() == (single / name).read_bytes(), name
        assert check_sidecar(multi / name) == []  # each output has its own checksums
    assert not list(multi.glob(".*"))  # no temp file left behind


def test_quantize_several_types_equal_single_runs(tmp_path, monkeypatch):
    src = tmp_path / "model-F16.gguf"
    llmconv.convert(TWO, src, outtype="f16")
    monkeypatch.chdir(tmp_path)
    assert main(["convert", str(TWO), "--outtype", "q4_K_M,q5_K_M,q4_0", "--dry-run", "--json", "plan.json"]) == 0
    convert_names = [Path(o["output"]).name for o in json.loads((tmp_path / "plan.json").read_text())["outputs"]]
    assert main(["quantize", str(src), "--type", "q4_K_M,q5_K_M,q4_0", "-q", "--json", "r.json"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    # no OUT: the names convert gives the model (from the input's general.* keys), not model-Q4_K_M.gguf
    assert [Path(o["output"]).name for o in report["outputs"]] == convert_names
    for t, name in zip(("q4_K_M", "q5_K_M", "q4_0"), convert_names):
        one = tmp_path / f"one-{t}.gguf"
        llmconv.quantize(src, one, outtype=t, threads=1)
        assert (tmp_path / name).read_bytes() == one.read_bytes(), t


def test_directory_with_a_slash_need_not_exist_yet_to_be_named(tmp_path, capsys):
    """`-o DIR/` names a directory even before it exists: the error says it is missing
    instead of treating DIR as a file name."""
    assert main(["convert", str(ONE), "--outtype", "q8_0,q4_0", "-o", f"{tmp_path}/new/", "-q"]) == 2
    err = capsys.readouterr().err
    assert "output directory does not exist" in err and "-o must be a directory" not in err


def test_several_types_need_a_directory(tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main(["convert", str(ONE), "--outtype", "q8_0,q4_0", "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "-o must be a directory" in err and "Traceback" not in err
    assert not out.exists()


def test_same_file_twice_is_refused(tmp_path, capsys):
    # q4_k is q4_k_m: both would be written to ...-Q4_K_M.gguf
    assert main(["convert", str(ONE), "--outtype", "q4_k_m,q4_k", "-o", f"{tmp_path}/", "-q"]) == 2
    assert "would both write this file" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_failure_in_one_output_leaves_no_file(tmp_path, monkeypatch):
    """Outputs of one run appear together: an error while writing leaves none of them."""
    from llmconv.convert import stream

    real = stream._convert_chunk
    calls = {"n": 0}

    def failing(job, a, b, turn):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(28, "No space left on device")
        return real(job, a, b, turn)

    monkeypatch.setattr(stream, "_convert_chunk", failing)
    assert main(["convert", str(ONE), "--outtype", "q8_0,q4_0", "-o", f"{tmp_path}/", "-q", "-t", "1"]) == 2
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("outtype", ["q8_0,q4_0"])
def test_dry_run_lists_every_output(tmp_path, capsys, outtype):
    assert main(["convert", str(ONE), "--outtype", outtype, "-o", f"{tmp_path}/", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama-1.8M-Q8_0.gguf" in out and "tiny-llama-1.8M-Q4_0.gguf" in out
    assert not list(tmp_path.iterdir())
