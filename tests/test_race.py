"""The temp-file race of issue 21: a second local user who can write to the output directory
(a sticky, world-writable one such as /tmp) must not be able to make a conversion run by root
write through a symlink, or replace its temp file.

The attacker is a real second user (`runuser -u nobody`) running a tight loop that plants
symlinks to a root-owned 0600 file under every temp name it can predict, in a directory
filled with thousands of files to widen any window between a check and an open."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from gguf import GGUFReader

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "tiny-llama"
SYSTEM_PYTHON = "/usr/bin/python3"

needs_second_user = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("runuser") is None or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root, runuser and /usr/bin/python3 to run an attacker as a second user",
)

# The attacker: fill the directory, then keep planting symlinks to the victim under the names
# it can guess (the writer's pid-based name and, once seen, any partial name) until told to stop.
ATTACKER = r"""
import os, sys, time
d, victim, pidfile, ready, stop, n_fill = sys.argv[1:7]
for i in range(int(n_fill)):
    open(os.path.join(d, f"fill{i:06d}"), "w").close()
open(ready, "w").close()
while not os.path.exists(pidfile):
    time.sleep(0.001)
pid = open(pidfile).read().strip()
while not pid:
    pid = open(pidfile).read().strip()
guesses = [os.path.join(d, f".out.gguf.llmconv-partial-{pid}")]
seen_scan = 0.0
while not os.path.exists(stop):
    for g in guesses:
        try:
            os.symlink(victim, g)
        except OSError:
            pass
    now = time.monotonic()
    if now - seen_scan > 0.05:   # now and then look for a partial with a name it could not guess
        seen_scan = now
        for e in os.scandir(d):
            if ".llmconv-partial-" in e.name and e.path not in guesses:
                guesses.append(e.path)
                try:
                    os.unlink(e.path)      # fails in a sticky dir for root's file, as it must
                except OSError:
                    pass
"""


@pytest.fixture
def shared_dir():
    base = Path(tempfile.mkdtemp(prefix="llmconv-race-", dir="/tmp"))
    shared = base / "shared"
    shared.mkdir()
    os.chmod(base, 0o755)
    os.chmod(shared, 0o1777)  # world-writable and sticky, like /tmp
    secret_dir = base / "secret"
    secret_dir.mkdir(mode=0o700)
    victim = secret_dir / "victim"
    victim.write_bytes(b"root's secret, not a model\n")
    os.chmod(victim, 0o600)
    yield base, shared, victim
    shutil.rmtree(base, ignore_errors=True)


def _run_attack(base: Path, shared: Path, victim: Path, extra: list[str], n_fill: int = 20000):
    ctl = base / "ctl"
    ctl.mkdir(mode=0o777)
    os.chmod(ctl, 0o777)
    pidfile, ready, stop = ctl / "pid", ctl / "ready", ctl / "stop"
    attacker = subprocess.Popen(
        [
            "runuser",
            "-u",
            "nobody",
            "--",
            SYSTEM_PYTHON,
            "-c",
            ATTACKER,
            str(shared),
            str(victim),
            str(pidfile),
            str(ready),
            str(stop),
            str(n_fill),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        t0 = time.time()
        while not ready.exists():
            assert attacker.poll() is None, attacker.communicate()
            assert time.time() - t0 < 120, "attacker did not get ready"
            time.sleep(0.02)
        out = shared / "out.gguf"
        # The shell writes its pid (which the exec'd converter keeps) before the converter starts,
        # so the attacker knows the pid-based temp name in advance.
        script = f'echo $$ > "{pidfile}"; sleep 0.3; exec "$@"'
        res = subprocess.run(
            [
                "sh",
                "-c",
                script,
                "sh",
                sys.executable,
                "-m",
                "llmconv.cli",
                "convert",
                str(FIXTURE),
                "-o",
                str(out),
                "--outtype",
                "f16",
                "-q",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        stop.touch()
        attacker.wait(timeout=60)
    return res, out


@needs_second_user
def test_symlink_planted_under_temp_names_is_never_followed(shared_dir):
    base, shared, victim = shared_dir
    before = victim.read_bytes()
    res, out = _run_attack(base, shared, victim, [])
    assert victim.read_bytes() == before, "the conversion wrote through the attacker's symlink"
    assert res.returncode == 0, res.stderr
    assert out.is_file() and not out.is_symlink()
    assert GGUFReader(out).tensors
    assert not [p for p in shared.iterdir() if ".llmconv-partial-" in p.name and not p.is_symlink()]


@needs_second_user
def test_symlink_at_target_is_refused_not_followed(shared_dir):
    base, shared, victim = shared_dir
    before = victim.read_bytes()
    out = shared / "out.gguf"
    subprocess.run(["runuser", "-u", "nobody", "--", "ln", "-s", str(victim), str(out)], check=True)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmconv.cli",
            "convert",
            str(FIXTURE),
            "-o",
            str(out),
            "--outtype",
            "f16",
            "-q",
            "--force",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert victim.read_bytes() == before
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "not a regular file" in res.stderr


# ---- the rules behind it, one at a time ------------------------------------------------------

from llmconv.errors import LlmconvError  # noqa: E402
from llmconv.formats.atomic import PARTIAL_TAG, atomic_output, atomic_outputs, clean_stale_partials  # noqa: E402


def test_temp_names_are_unpredictable_and_exclusive(tmp_path):
    target = tmp_path / "m.gguf"
    with atomic_output(target) as a:
        with atomic_output(tmp_path / "n.gguf") as b:
            assert a.path.name.startswith(f".m.gguf{PARTIAL_TAG}")
            assert a.path != b.path
        a.write_bytes(b"x")
    assert target.read_bytes() == b"x"


def test_a_live_partial_is_not_removed_but_a_dead_one_is(tmp_path):
    target = tmp_path / "m.gguf"
    dead = tmp_path / f".m.gguf{PARTIAL_TAG}12345"  # a SIGKILLed run's leftover: no lock
    dead.write_bytes(b"old")
    link = tmp_path / f".m.gguf{PARTIAL_TAG}link"  # not a regular file: never touched
    link.symlink_to(tmp_path / "elsewhere")
    with atomic_output(target) as live:
        assert not dead.exists()  # cleaned when this run started
        dead.write_bytes(b"old")
        assert clean_stale_partials(target) == [dead]  # a second run's view
        assert live.path.exists()  # the live one is locked: kept
        live.write_bytes(b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"


def test_no_clobber_when_the_target_appears_meanwhile(tmp_path):
    target = tmp_path / "m.gguf"
    with pytest.raises(LlmconvError, match="appeared"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"mine")
            target.write_bytes(b"the other run's finished file")
    assert target.read_bytes() == b"the other run's finished file"
    assert not list(tmp_path.glob(f"*{PARTIAL_TAG}*"))


def test_a_group_appears_together_or_not_at_all(tmp_path):
    parts = [tmp_path / f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with pytest.raises(RuntimeError):
        with atomic_outputs(parts) as tmps:
            for t in tmps:
                t.write_bytes(b"part")
            raise RuntimeError("the writer failed")
    assert not any(p.exists() for p in parts)
    # the last rename fails (a directory took its name meanwhile): the first two are taken back
    with pytest.raises(LlmconvError):
        with atomic_outputs(parts) as tmps:
            for t in tmps:
                t.write_bytes(b"part")
            parts[2].mkdir()
    assert not parts[0].exists() and not parts[1].exists()
    assert not list(tmp_path.glob(f"*{PARTIAL_TAG}*"))


@pytest.mark.parametrize("kind", ["dir", "fifo", "symlink"])
def test_non_regular_targets_are_refused(tmp_path, kind):
    target = tmp_path / "m.gguf"
    if kind == "dir":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to(tmp_path / "real")
    with pytest.raises(LlmconvError, match="not a regular file"):
        with atomic_output(target, force=True):
            pass
