"""Issue 21: an input truncated while convert (or quantize) runs is one line naming the file
and the tensor, exit 2, no traceback and no output left behind, not a SIGBUS.

The run happens in a child process (a SIGBUS there fails the test instead of killing pytest);
a hook in the child shrinks the input to half its size right after the first rows are read,
so every later tensor whose bytes lay in the second half is read from a file that ends early.
Also: the pread readers place every tensor where the mapped loaders see it (torch zips,
safetensors, Hugging Face Q/K rows put back in Meta order for any range of rows)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import llmconv
from llmconv.convert.hf import unpermute_rows
from llmconv.convert.meta import open_meta_checkpoint
from llmconv.formats.rawread import RawTensor, SourceFile, read_rows_unpermuted
from synth import meta_state_dict, split_state_dict, write_meta_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# Child: shrink argv[1] to half its size right after the first tensor's first rows are read
# (inside the worker, so every later read sees the shorter file), then run the CLI.
HOOK = """
import os, sys
import llmconv.convert.stream as stream
victim = sys.argv[1]
real_run = stream.run

def run(jobs, *a, **k):
    src = jobs[0].src
    read = src.read_rows
    def read_then_shrink(first, end, out):
        read(first, end, out)
        if os.path.getsize(victim) > 0 and not getattr(src, "shrunk", False):
            src.shrunk = True
            os.truncate(victim, os.path.getsize(victim) // 2)
    src.read_rows = read_then_shrink
    return real_run(jobs, *a, **k)

stream.run = run
from llmconv.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_truncating(victim: Path, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", HOOK, str(victim), *argv], capture_output=True, text=True, env=env, timeout=300
    )


def assert_truncation_reported(proc: subprocess.CompletedProcess, victim: Path, out_dir: Path) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(victim) in lines[0] and ": tensor " in lines[0] and "truncated" in lines[0], lines[0]
    assert list(out_dir.iterdir()) == [], "a partial output was left behind"


@pytest.mark.parametrize(
    "fixture,weights,threads", [("tiny-llama", "consolidated.00.pth", 1), ("hf-tiny-llama", "model.safetensors", 2)]
)
def test_checkpoint_truncated_during_convert(tmp_path, fixture, weights, threads):
    ckpt = shutil.copytree(ROOT / "fixtures" / fixture, tmp_path / "ckpt")
    out = tmp_path / "out"
    out.mkdir()
    proc = run_truncating(
        ckpt / weights, ["convert", str(ckpt), "--outtype", "q8_0", "-o", str(out / "m.gguf"), "-t", str(threads), "-q"]
    )
    assert_truncation_reported(proc, ckpt / weights, out)


def test_gguf_truncated_during_quantize(tmp_path):
    src = tmp_path / "src.gguf"
    llmconv.convert(ROOT / "fixtures" / "tiny-llama", src, outtype="f16")
    out = tmp_path / "out"
    out.mkdir()
    proc = run_truncating(src, ["quantize", str(src), str(out / "q.gguf"), "--type", "q4_0", "-q"])
    assert_truncation_reported(proc, src, out)


def test_pth_tensors_are_placed_in_every_shard(tmp_path):
    """Each tensor's pread bytes equal torch's mapped tensor, in every model-parallel shard."""
    sd = meta_state_dict(dim=64, n_layers=2, seed=5)
    d = write_meta_checkpoint(tmp_path / "ck", sd)
    for i, shard in enumerate(split_state_dict(sd, 2)):
        torch.save(shard, d / f"consolidated.{i:02d}.pth")
    ckpt = open_meta_checkpoint(d)
    assert len(ckpt.raw) == 2 and all(r is not None for r in ckpt.raw)
    for shard, raw in zip(ckpt.shards, ckpt.raw):
        for name, t in shard.items():
            assert np.array_equal(raw[name].load(), t.float().numpy()), name


@pytest.mark.parametrize("span", [(0, 64), (16, 48), (5, 37), (0, 3), (60, 64), (31, 33)])
def test_hf_rows_in_meta_order_for_any_span(tmp_path, span):
    """read_rows_unpermuted of any row range equals the same rows of the whole unpermuted tensor."""
    heads, rows, cols = 4, 64, 24
    w = np.random.default_rng(1).standard_normal((rows, cols)).astype(np.float32)
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 40 + w.tobytes())
    raw = RawTensor(SourceFile(path), 40, "f32", (rows, cols), "w")
    a, b = span
    out = np.full((b - a, cols), np.nan, np.float32)
    read_rows_unpermuted(raw, heads, a, b, out)
    assert np.array_equal(out, unpermute_rows(w, heads)[a:b])
