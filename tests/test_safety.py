"""Issue 8: bad input never runs code, never crashes with a traceback, never leaves a broken file."""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader

from llmconv.cli import main
from llmconv.formats.atomic import PARTIAL_TAG
from synth import meta_state_dict, split_state_dict, write_meta_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(err: str, *needles: str):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("llmconv: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture()
def ckpt(tmp_path):
    return write_meta_checkpoint(tmp_path / "model")


# ---- 1. No code execution -------------------------------------------------------------------


class _RunsShell:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class _ImportsModule:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.sentinel)],))


class _Nested:
    def __init__(self, sentinel):
        self.inner = [_RunsShell(sentinel)]

    def __reduce__(self):
        return (dict, ([("x", torch.zeros(2)), ("y", self.inner)],))


@pytest.mark.parametrize("payload", [_RunsShell, _ImportsModule, _Nested], ids=["os.system", "import", "nested"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, ckpt, payload, capsys):
    sentinel = tmp_path / "pwned"
    sd = {k: v for k, v in torch.load(ckpt / "consolidated.00.pth", weights_only=True).items()}
    sd["layers.0.attention.wq.weight"] = payload(sentinel)
    torch.save(sd, ckpt / "consolidated.00.pth")
    # the payload really is live: a plain pickle load would run it
    code, _, err = run(["convert", ckpt, "-o", tmp_path / "out.gguf"], capsys)
    assert code == 2
    assert_one_line_error(err, "consolidated.00.pth", "refused")
    assert not sentinel.exists()
    assert not (tmp_path / "out.gguf").exists()


def test_payload_is_live_without_weights_only(tmp_path):
    """Guards the test above: the same file does run code when loaded unsafely."""
    sentinel = tmp_path / "pwned"
    torch.save({"w": _RunsShell(sentinel)}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert sentinel.exists()


def test_legacy_plain_pickle_is_never_unpickled(tmp_path, ckpt, capsys):
    sentinel = tmp_path / "pwned"
    with open(ckpt / "consolidated.00.pth", "wb") as f:
        pickle.dump({"tok_embeddings.weight": _RunsShell(sentinel)}, f)
    code, _, err = run(["convert", ckpt, "-o", tmp_path / "out.gguf"], capsys)
    assert code == 2
    assert_one_line_error(err, "consolidated.00.pth", "not a zip")
    assert not sentinel.exists()


def test_no_plain_pickle_load_in_the_package():
    for p in (ROOT / "llmconv").rglob("*.py"):
        text = p.read_text()
        assert "pickle.load(" not in text and "pickle.loads(" not in text, p
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line and "mmap=True" in line, (p, line)


# ---- 2. Clear errors, exit code 2, no traceback ---------------------------------------------


def test_missing_params_json(ckpt, tmp_path, capsys):
    (ckpt / "params.json").unlink()
    code, _, err = run(["convert", ckpt, "-o", tmp_path / "o.gguf"], capsys)
    assert code == 2
    assert_one_line_error(err, str(ckpt), "params.json")


def test_missing_tokenizer(ckpt, tmp_path, capsys):
    (ckpt / "tokenizer.model").unlink()
    code, _, err = run(["convert", ckpt, "-o", tmp_path / "o.gguf"], capsys)
    assert code == 2
    assert_one_line_error(err, "tokenizer.model is missing")


def test_debug_shows_traceback(ckpt, tmp_path, capsys):
    (ckpt / "tokenizer.model").unlink()
    code, _, err = run(["--debug", "convert", ckpt, "-o", tmp_path / "o.gguf"], capsys)
    assert code == 2
    assert "Traceback" in err


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_shard(ckpt, tmp_path, keep, capsys):
    p = ckpt / "consolidated.00.pth"
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])
    code, _, err = run(["convert", ckpt, "-o", tmp_path / "o.gguf"], capsys)
    assert code == 2
    assert_one_line_error(err, "consolidated.00.pth")
    assert not (tmp_path / "o.gguf").exists()


def test_shard_not_a_zip(ckpt, tmp_path, capsys):
    (ckpt / "consolidated.00.pth").write_bytes(b"hello, I am not a checkpoint" * 100)
    code, _, err = run(["convert", ckpt, "-o", tmp_path / "o.gguf"], capsys)
    assert code == 2
    assert_one_line_error(err, "consolidated.00.pth", "not a zip")


def test_zip_member_pointing_past_end(ckpt, tmp_path, capsys):
    """A central directory that claims data beyond the end of the file (would SIGBUS under mmap)."""
    p = ckpt / "consolidated.00.pth"
    data = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as zf:
        info = max(zf.infolist(), key=lambda i: i.compress_size)
    # find this member's central directory record and inflate its compressed size
    cd_sig = b"PK\x01\x02"
    pos = 0
    while True:
        pos = data.index(cd_sig, pos)
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46 : pos + 46 + name_len].decode() == info.filename:
            break
        pos += 4
    struct.pack_into("<II", data, pos + 20, info.compress_size + 10**9, info.file_size + 10**9)
    p.write_bytes(bytes(data))
    code, _, err = run(["convert", ckpt, "-o", tmp_path / "o.gguf"], capsys)
    assert code == 2
    assert_one_line_error(err, "consolidated.00.pth")


def _two_shards(tmp_path, mutate):
    sd = meta_state_dict()
    d = write_meta_checkpoint(tmp_path / "two", sd)
    shards = split_state_dict(sd, 2)
    mutate(shards)
    (d / "consolidated.00.pth").unlink()
    for i, s in enumerate(shards):
        torch.save(s, d / f"consolidated.0{i}.pth")
    return d


def test_shard_missing_a_tensor(tmp_path, capsys):
    d = _two_shards(tmp_path, lambda s: s[1].pop("layers.1.feed_forward.w3.weight"))
    code, _, err = run(["convert", d, "-o", tmp_path / "o.gguf"], capsys)
    assert code == 2
    assert_one_line_error(err, "consolidated.01.pth", "layers.1.feed_forward.w3.weight")


def test_shapes_disagree_between_shards(tmp_path, capsys):
    def mutate(s):
        s[1]["layers.0.feed_forward.w1.weight"] = s[1]["layers.0.feed_forward.w1.weight"][:-1]

    d = _two_shards(tmp_path, mutate)
    code, _, err = run(["convert", d, "-o", tmp_path / "o.gguf"], capsys)
    assert code == 2
    assert_one_line_error(err, "layers.0.feed_forward.w1.weight")


def test_replicated_norm_differs(tmp_path, capsys):
    def mutate(s):
        s[1]["norm.weight"] = s[1]["norm.weight"] + 1

    d = _two_shards(tmp_path, mutate)
    code, _, err = run(["convert", d, "-o", tmp_path / "o.gguf"], capsys)
    assert code == 2
    assert_one_line_error(err, "consolidated.01.pth", "norm.weight", "differs")


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("dim", 128, "tok_embeddings.weight"),
        ("n_heads", 8, "n_heads=8"),
        ("n_kv_heads", 4, "attention.wk.weight"),
        ("vocab_size", 500, "vocab_size"),
        ("n_layers", 3, "layers.2"),
    ],
)
def test_params_disagree_with_shapes(ckpt, tmp_path, key, value, needle, capsys):
    params = json.loads((ckpt / "params.json").read_text())
    params[key] = value
    (ckpt / "params.json").write_text(json.dumps(params))
    code, _, err = run(["convert", ckpt, "-o", tmp_path / "o.gguf"], capsys)
    assert code == 2
    assert_one_line_error(err, needle)


@pytest.mark.parametrize("rows", [500, 520])
def test_vocab_differs_from_embedding(tmp_path, rows, capsys):
    sd = meta_state_dict(vocab=rows)
    d = write_meta_checkpoint(tmp_path / "m", sd)
    code, _, err = run(["convert", d, "-o", tmp_path / "o.gguf"], capsys)
    assert code == 2
    assert_one_line_error(err, "tokenizer", "512 tokens", f"{rows} rows")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weight_names_tensor_and_row(tmp_path, bad, capsys):
    sd = meta_state_dict()
    sd["layers.1.feed_forward.w2.weight"][37, 5] = bad
    d = write_meta_checkpoint(tmp_path / "m", sd)
    code, _, err = run(["convert", d, "--outtype", "f16", "-o", tmp_path / "o.gguf", "-q"], capsys)
    assert code == 2
    assert_one_line_error(err, "consolidated.00.pth", "layers.1.feed_forward.w2.weight", "row 37")
    assert not (tmp_path / "o.gguf").exists()
    assert not list(tmp_path.glob(f"*{PARTIAL_TAG}*"))


def test_outtype_row_length_impossible(tmp_path, capsys):
    sd = meta_state_dict(dim=48, n_heads=4, n_kv_heads=2, ffn=96)
    d = write_meta_checkpoint(tmp_path / "m", sd, params={"multiple_of": 32})
    code, _, err = run(["convert", d, "--outtype", "q8_0", "--pure", "-o", tmp_path / "o.gguf"], capsys)
    assert code == 2
    assert_one_line_error(err, "row length 48", "q8_0")


def test_unknown_outtype(ckpt, tmp_path, capsys):
    code, _, err = run(["convert", ckpt, "--outtype", "q9_9", "-o", tmp_path / "o.gguf"], capsys)
    assert code == 2
    assert_one_line_error(err, "q9_9")


def test_unknown_tensor_name(tmp_path, capsys):
    sd = meta_state_dict()
    sd["layers.0.attention.mystery.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    d = write_meta_checkpoint(tmp_path / "m", sd)
    code, _, err = run(["convert", d, "-o", tmp_path / "o.gguf"], capsys)
    assert code == 2
    assert_one_line_error(err, "layers.0.attention.mystery.weight", "unknown tensor")


def test_disk_full_is_a_clean_error(ckpt, tmp_path, capsys, monkeypatch):
    import errno
    import llmconv.formats.positional as gw

    calls = {"n": 0}
    real = os.pwrite

    def full(fd, data, pos):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, pos)

    monkeypatch.setattr(gw.os, "pwrite", full)
    out = tmp_path / "o.gguf"
    code, _, err = run(["convert", ckpt, "-o", out, "-q"], capsys)
    assert code == 2
    assert_one_line_error(err, str(out), "No space left")
    assert not out.exists()
    assert not list(tmp_path.glob(f"*{PARTIAL_TAG}*"))


def test_existing_output_needs_force(ckpt, tmp_path, capsys):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    code, _, err = run(["convert", ckpt, "-o", out], capsys)
    assert code == 2
    assert_one_line_error(err, str(out), "--force")
    assert out.read_bytes() == b"precious"
    code, _, _ = run(["convert", ckpt, "-o", out, "--force", "-q"], capsys)
    assert code == 0
    assert GGUFReader(out).tensors


# ---- 3. Never a broken output file ----------------------------------------------------------


@pytest.fixture(scope="module")
def medium_ckpt(tmp_path_factory):
    """Big enough (~100M parameters) that a conversion takes a few seconds."""
    d = tmp_path_factory.mktemp("medium") / "m"
    sd = meta_state_dict(dim=1024, n_layers=8, n_heads=8, n_kv_heads=8, ffn=3072, seed=1)
    return write_meta_checkpoint(d, sd, params={"n_heads": 8, "n_kv_heads": 8, "multiple_of": 256})


def _start_convert(ckpt, out, *extra):
    # q4_K_M at one thread: its kernels take seconds on this checkpoint, so the signal lands
    # mid-write (q4_0 ends a fraction of a second after the first MiB is written).
    # SIGINT back to its default in the child: a test runner started in the background
    # (nohup, `cmd &` without job control) ignores SIGINT, the child would inherit that and
    # Python would install no Ctrl-C handler, so the run would finish with exit 0.
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmconv.cli",
            "convert",
            str(ckpt),
            "-o",
            str(out),
            "--outtype",
            "q4_K_M",
            "-t",
            "1",
            "-q",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_partial(out: Path, proc, min_bytes=1 << 20, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        parts = list(out.parent.glob(f".{out.name}{PARTIAL_TAG}*"))
        if parts and parts[0].stat().st_blocks * 512 >= min_bytes:
            return parts[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("no partial file appeared")


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGKILL"])
def test_kill_mid_write_leaves_old_file_intact(medium_ckpt, tmp_path, sig):
    import signal

    out = tmp_path / "model.gguf"
    out.write_bytes(b"the old, complete file")
    proc = _start_convert(medium_ckpt, out, "--force")
    partial = _wait_for_partial(out, proc)
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=30)
    assert out.read_bytes() == b"the old, complete file"
    if sig != "SIGKILL":
        assert proc.returncode != 0
        assert not partial.exists(), f"{sig} must remove the temp file"
    else:
        assert partial.exists()  # SIGKILL cannot be caught ...
        # ... and the next run for the same target removes it
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "llmconv.cli",
                "convert",
                str(medium_ckpt),
                "-o",
                str(out),
                "--outtype",
                "f16",
                "--force",
                "-q",
            ],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, res.stderr
        assert not partial.exists()
        assert GGUFReader(out).tensors


@pytest.mark.slow
def test_kill_mid_write_new_target_absent(medium_ckpt, tmp_path):
    import signal

    out = tmp_path / "model.gguf"
    proc = _start_convert(medium_ckpt, out)
    _wait_for_partial(out, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err.decode()[-2000:]  # the one-line error says what else happened
    assert not out.exists()
    assert not list(tmp_path.glob(f"*{PARTIAL_TAG}*"))
