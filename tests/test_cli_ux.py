"""Command-line conventions a llama.cpp user expects (issue 19), each checked in a subprocess."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def _plan_for(n_layers: int, dim: int, ffn: int, outtype: str):
    import numpy as np

    from llmconv.convert import mixes
    from llmconv.convert.plan import SourceTensor, TypePolicy, make_plan

    def t(name, shape):
        return SourceTensor(name, shape, lambda: np.zeros(shape, np.float32), [])

    tensors = [t("token_embd.weight", (1000, dim)), t("output_norm.weight", (dim,)), t("output.weight", (1000, dim))]
    for i in range(n_layers):
        tensors += [t(f"blk.{i}.attn_q.weight", (dim, dim)), t(f"blk.{i}.attn_k.weight", (dim, dim)),
                    t(f"blk.{i}.attn_v.weight", (dim, dim)), t(f"blk.{i}.attn_output.weight", (dim, dim)),
                    t(f"blk.{i}.ffn_gate.weight", (ffn, dim)), t(f"blk.{i}.ffn_up.weight", (ffn, dim)),
                    t(f"blk.{i}.ffn_down.weight", (dim, ffn)), t(f"blk.{i}.attn_norm.weight", (dim,))]
    return make_plan(tensors, TypePolicy(outtype, model=mixes.ModelShape(n_layers, 9, 3)))


def test_notes_are_aggregated_not_one_per_tensor():
    # SmolLM2-135M's shape: rows of 576 do not split into 256-blocks, so most tensors fall back
    plan = _plan_for(30, 576, 1536, "q4_k_m")
    fallbacks = [t for t in plan.tensors if t.why.name == "FALLBACK"]
    assert len(fallbacks) >= 150
    assert len(plan.notes) <= 6, plan.notes
    joined = "\n".join(plan.notes)
    assert "attn_q" in joined and "ffn_up" in joined and "all 30 layers" in joined
    assert sum(int(n.split()[0]) if n.split()[0].isdigit() else 1 for n in plan.notes) == len(
        [t for t in plan.tensors if t.why.name in ("FALLBACK", "OUTPUT", "OVERRIDE")])


def test_quiet_means_no_notes(tmp_path):
    ckpt = ROOT / "fixtures" / "tiny-llama"
    res = run("convert", str(ckpt), "--outtype", "q4_0", "-o", str(tmp_path / "a.gguf"))
    assert res.returncode == 0, res.stderr
    assert "note:" in res.stderr                       # output.weight -> q6_K is a note
    res = run("convert", str(ckpt), "--outtype", "q4_0", "-o", str(tmp_path / "b.gguf"), "-q")
    assert res.returncode == 0, res.stderr
    assert "note:" not in res.stderr and res.stderr.strip() == ""


def test_progress_bar_writes_no_frames_into_a_log(tmp_path):
    res = run("convert", str(ROOT / "fixtures" / "tiny-llama"), "--outtype", "f16", "-o", str(tmp_path / "a.gguf"))
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr and "it/s" not in res.stderr and "B/s" not in res.stderr


def test_usual_mistakes_get_a_line_that_says_what_to_do(tmp_path):
    gguf_file = tmp_path / "m.gguf"
    res = run("convert", str(ROOT / "fixtures" / "tiny-llama"), "--outtype", "f16", "-o", str(gguf_file), "-q")
    assert res.returncode == 0, res.stderr
    cases = [
        (tmp_path / "nowhere", "no such file or directory"),
        (gguf_file, "llmconv quantize"),
        (ROOT / "fixtures" / "tiny-llama" / "params.json", "pass the folder"),
    ]
    for path, needle in cases:
        res = run("convert", str(path), "-o", str(tmp_path / "x.gguf"))
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        assert needle in lines[0] and str(path) in lines[0], lines[0]


def test_quantize_refuses_to_overwrite_its_input_and_takes_outtype(tmp_path):
    f16 = tmp_path / "m-f16.gguf"
    res = run("convert", str(ROOT / "fixtures" / "tiny-llama"), "--outtype", "f16", "-o", str(f16), "-q")
    assert res.returncode == 0, res.stderr
    before = f16.read_bytes()
    for other in (f16, tmp_path / "." / "m-f16.gguf"):
        res = run("quantize", str(f16), str(other), "--type", "q4_0", "-f", "-q")
        assert res.returncode == 2 and "the output is the input file" in res.stderr, res.stderr
    assert f16.read_bytes() == before
    res = run("quantize", str(f16), str(tmp_path / "q.gguf"), "--outtype", "q8_0", "-q")
    assert res.returncode == 0, res.stderr


def test_a_type_typo_gets_a_suggestion(tmp_path):
    res = run("convert", str(ROOT / "fixtures" / "tiny-llama"), "--outtype", "q4_km", "-o", str(tmp_path / "x.gguf"))
    assert res.returncode == 2, res.stderr
    assert "did you mean q4_K_M?" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra", [[], ["--dry-run"]])
def test_json_to_stdout_is_only_json(tmp_path, extra):
    import json

    res = run("convert", str(ROOT / "fixtures" / "tiny-llama"), "--outtype", "q4_0", "-o", str(tmp_path / "a.gguf"),
              "--json", "-", *extra)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)                    # nothing but the JSON document on stdout
    assert report["dry_run"] == bool(extra)
    assert ("wrote" in res.stderr) != bool(extra)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_works_before_or_after_the_subcommand(tmp_path, where):
    args = ["convert", str(tmp_path / "nowhere")]
    res = run(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert res.returncode == 2
    assert "Traceback" in res.stderr and "no such file or directory" in res.stderr


def test_json_without_a_file_goes_to_stdout(tmp_path):
    import json

    out = tmp_path / "a.gguf"
    res = run("convert", str(ROOT / "fixtures" / "tiny-llama"), "--outtype", "q8_0", "-o", str(out), "-q", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["dry_run"] is False
    res = run("inspect", str(out), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tensors"]
    # the next word is still a FILE when one is given
    res = run("inspect", str(out), "--json", str(tmp_path / "r.json"))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "r.json").read_text())["tensors"]


def test_every_command_has_help_with_examples():
    top = run("--help").stdout
    commands = re.findall(r"^  ([a-z][a-z-]+)\s", top.split("Commands:")[1], re.M)
    assert {"convert", "quantize", "verify", "inspect"} <= set(commands)
    for cmd in commands:
        res = run(cmd, "--help")
        assert res.returncode == 0, res.stderr
        assert "Examples:" in res.stdout and f"llmconv {cmd} " in res.stdout, cmd
