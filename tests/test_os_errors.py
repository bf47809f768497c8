"""Issue 21: real OS errors while writing, not simulated ones. A small tmpfs is mounted for each
test (we run as root in CI; without the right to mount, the tests skip with the reason): a
read-only file system, and a disk that fills up while the model, a split part or the checksum
sidecar is written. Each run must end in one line naming the output, exit 2, no traceback,
no temporary or partial file left on the small disk, files already there untouched, and
nothing changed outside it. The sizes come from the same conversion written to an ordinary
folder first, so "the disk fills up while the sidecar is written" is arranged, not guessed."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
from pathlib import Path

import pytest

from synth import meta_state_dict, write_meta_checkpoint
from hostile_util import HF, META, assert_one_line_error, run

ROOT = Path(__file__).resolve().parents[1]
LORA = ROOT / "fixtures" / "lora-tiny-llama"
PAGE = os.sysconf("SC_PAGE_SIZE")


def pages(nbytes: int) -> int:
    """Bytes a tmpfs charges for a file of `nbytes`: whole pages."""
    return -(-nbytes // PAGE) * PAGE


@contextlib.contextmanager
def tmpfs(path: Path, size: int, read_only: bool = False, keep: bytes = b"already here\n"):
    """Mount a tmpfs of `size` bytes at `path` holding one file, `keep` (which must survive),
    then remount it read-only if asked."""
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        (path / "keep.txt").write_bytes(keep)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def snapshot(*roots: Path, skip: Path | None = None) -> dict:
    """Every file under `roots` (except under `skip`) with its size, mtime and mode."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if skip is not None and (p == skip or skip in p.parents):
                continue
            st = p.lstat()
            out[p] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def refused_cleanly(argv, capsys, disk: Path, outside: list[Path], *needles: str) -> str:
    """Run `argv`; it must fail with one line (holding `needles`), exit 2, leave on `disk` only
    what was there, and change nothing under `outside` (except `disk` itself)."""
    before = snapshot(*outside, skip=disk)
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert_one_line_error("".join(line for line in err.splitlines(True) if not line.startswith("warning: ")), *needles)
    assert sorted(p.name for p in disk.iterdir()) == ["keep.txt"], list(disk.iterdir())
    assert (disk / "keep.txt").read_bytes() == b"already here\n"
    assert snapshot(*outside, skip=disk) == before
    return err


# ---- a read-only file system ----------------------------------------------------------------------


@pytest.fixture
def read_only(tmp_path):
    with tmpfs(tmp_path / "ro", 1 << 20, read_only=True) as d:
        yield d


@pytest.mark.parametrize("command", ["convert", "split+checksum", "ggml", "quantize", "convert-lora", "imatrix"])
def test_read_only_file_system(tmp_path, read_only, capsys, monkeypatch, command):
    f16 = tmp_path / "m.gguf"
    if command == "quantize":
        assert run(["convert", META, "-o", f16, "--outtype", "f16", "-q"], capsys)[0] == 0
    mha = tmp_path / "mha"  # ggjt holds only n_kv_heads == n_heads
    if command == "ggml":
        write_meta_checkpoint(mha, meta_state_dict(n_heads=4, n_kv_heads=4))
    if command == "imatrix":  # minutes on a real model: the output folder is checked first
        import llmconv.imatrix.collect as collect

        monkeypatch.setattr(collect, "compute_imatrix", lambda *a, **k: pytest.fail("computed before checking -o"))
    argv = {
        "convert": ["convert", META, "-o", read_only / "o.gguf", "-q"],
        "split+checksum": ["convert", META, "-o", read_only / "o.gguf", "--split-max-size", "700K", "--checksum", "-q"],
        "ggml": ["convert", mha, "-o", read_only / "o.bin", "--format", "ggml", "-q"],
        "quantize": ["quantize", f16, read_only / "o.gguf", "--type", "q4_0", "-q"],
        "convert-lora": ["convert-lora", LORA, "--base", HF, "-o", read_only / "o.gguf", "-q"],
        "imatrix": ["imatrix", META, "-o", read_only / "o.gguf", "-q"],
    }[command]
    refused_cleanly(argv, capsys, read_only, [tmp_path, META, HF], "Read-only file system", str(read_only))


def test_json_report_on_a_read_only_file_system_fails_before_converting(tmp_path, read_only, capsys):
    out = tmp_path / "m.gguf"
    refused_cleanly(
        ["convert", META, "-o", out, "-q", "--json", read_only / "r.json"],
        capsys,
        read_only,
        [tmp_path, META],
        "r.json",
        "Read-only file system",
    )
    assert not out.exists()  # refused up front, not after an hour of converting


# ---- a disk that fills up ---------------------------------------------------------------------------


def reference_sizes(tmp_path: Path, capsys, argv_tail: list) -> dict[str, int]:
    """The files the same conversion writes to an ordinary folder, by name, with their sizes."""
    ref = tmp_path / "ref"
    ref.mkdir()
    code, _, err = run(["convert", META, "-o", ref / "o.gguf", "-q", *argv_tail], capsys)
    assert code == 0, err
    return {p.name: p.stat().st_size for p in ref.iterdir()}


def test_disk_full_while_writing_the_model(tmp_path, capsys):
    sizes = reference_sizes(tmp_path, capsys, ["--outtype", "q8_0"])
    with tmpfs(tmp_path / "small", pages(sizes["o.gguf"]) // 2) as disk:
        refused_cleanly(
            ["convert", META, "-o", disk / "o.gguf", "--outtype", "q8_0", "-q"],
            capsys,
            disk,
            [tmp_path, META],
            "o.gguf",
            "No space left on device",
        )


def test_disk_full_keeps_the_existing_target(tmp_path, capsys):
    """--force over an existing file, and the disk fills up: the old file is still there, whole."""
    sizes = reference_sizes(tmp_path, capsys, ["--outtype", "q8_0"])
    old = b"an older conversion\n"
    with tmpfs(tmp_path / "small", pages(sizes["o.gguf"]), keep=old) as disk:
        before = snapshot(tmp_path, META, skip=disk)
        code, _, err = run(["convert", META, "-o", disk / "keep.txt", "--outtype", "q8_0", "-q", "--force"], capsys)
        assert code == 2, err
        assert_one_line_error(err, "keep.txt", "No space left on device")
        assert [p.name for p in disk.iterdir()] == ["keep.txt"] and (disk / "keep.txt").read_bytes() == old
        assert snapshot(tmp_path, META, skip=disk) == before


def test_disk_full_while_writing_the_checksum_sidecar(tmp_path, capsys):
    """Room for the model, to the page, and not one page more: the sidecar is what fails, and the
    complete model is removed with it (the set appears whole or not at all)."""
    sizes = reference_sizes(tmp_path, capsys, ["--outtype", "q8_0", "--checksum"])
    assert set(sizes) == {"o.gguf", "o.gguf.sha256.json"}
    with tmpfs(tmp_path / "small", pages(sizes["o.gguf"]) + PAGE) as disk:  # + keep.txt's page
        refused_cleanly(
            ["convert", META, "-o", disk / "o.gguf", "--outtype", "q8_0", "--checksum", "-q"],
            capsys,
            disk,
            [tmp_path, META],
            "o.gguf.sha256.json",
            "No space left on device",
        )


@pytest.mark.parametrize("fails_in", ["a part", "the sidecar"])
def test_disk_full_while_writing_split_parts(tmp_path, capsys, fails_in):
    tail = ["--outtype", "q8_0", "--split-max-size", "700K", "--checksum"]
    sizes = reference_sizes(tmp_path, capsys, tail)
    parts = sorted(n for n in sizes if n.endswith(".gguf"))
    assert len(parts) >= 3
    room = sum(pages(sizes[p]) for p in parts) + PAGE  # + keep.txt's page
    if fails_in == "a part":
        room -= pages(sizes[parts[-1]]) // 2
    with tmpfs(tmp_path / "small", room) as disk:
        refused_cleanly(
            ["convert", META, "-o", disk / "o.gguf", "-q", *tail],
            capsys,
            disk,
            [tmp_path, META],
            "o.gguf",
            "No space left on device",
        )


def test_file_size_limit_is_one_line(tmp_path, capsys):
    """RLIMIT_FSIZE (a quota-like limit; Python ignores SIGXFSZ, so the write fails with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    out = tmp_path / "o.gguf"
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        code, _, err = run(["convert", META, "-o", out, "--outtype", "q8_0", "-q"], capsys)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2, err
    assert_one_line_error(err, "o.gguf", "too large")
    assert list(tmp_path.iterdir()) == []
