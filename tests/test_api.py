"""The public API and the command line write the same bytes, and the same bytes as the tree did
before the API existed.

Each case is one command: run through `llmconv.convert(...)` (or quantize, convert_lora), through
`llmconv ...` (cli.main), and through cli.main of commit BEFORE (the last commit before
llmconv/api.py; unpacked with `git archive`, run in a subprocess). Every file each run writes
(GGUF, ggjt, sidecars) must be byte-identical across the three.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmconv
from llmconv.cli import main

from synth import write_meta_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
BEFORE = "360032fed5203167a32eda9b377778b90c79c764"  # main before llmconv/api.py (and the hf/candidate splits)


def mha_checkpoint(path: Path) -> Path:
    """tiny-llama with every KV head repeated (ggjt cannot hold grouped-query attention)."""
    sd = torch.load(FIX / "tiny-llama" / "consolidated.00.pth", weights_only=True)
    params = json.loads((FIX / "tiny-llama" / "params.json").read_text())
    group = params["n_heads"] // params["n_kv_heads"]
    for k in list(sd):
        if k.endswith(("attention.wk.weight", "attention.wv.weight")):
            heads = sd[k].reshape(params["n_kv_heads"], -1, sd[k].shape[1])
            sd[k] = heads.repeat_interleave(group, dim=0).reshape(-1, sd[k].shape[1]).clone()
    return write_meta_checkpoint(
        path,
        sd,
        n_heads=params["n_heads"],
        params={"norm_eps": 5e-6, "rope_theta": 10000.0, "multiple_of": params["multiple_of"]},
    )


def cases(inputs: Path) -> dict[str, tuple[list[str], object]]:
    """name -> (the CLI arguments with {out} for the output directory, the same call through the API)."""
    meta, hf, l3 = str(FIX / "tiny-llama"), str(FIX / "hf-tiny-llama"), str(FIX / "llama3-tiny")
    lora, mha, f16 = str(FIX / "lora-tiny-llama"), str(inputs / "tiny-mha"), str(inputs / "in-F16.gguf")
    return {
        "meta-three-types": (
            ["convert", meta, "--outtype", "q8_0,q4_K_M,f16", "-o", "{out}/", "--checksum"],
            lambda out: llmconv.convert(meta, f"{out}/", outtype="q8_0,q4_K_M,f16", checksum=True),
        ),
        "two-shards-split": (
            [
                "convert",
                str(FIX / "tiny-llama-2shard"),
                "--outtype",
                "q5_K_S",
                "-o",
                "{out}/m.gguf",
                "--split-max-tensors",
                "9",
            ],
            lambda out: llmconv.convert(
                FIX / "tiny-llama-2shard", f"{out}/m.gguf", outtype="q5_K_S", split_max_tensors=9
            ),
        ),
        "hf-lora-merged": (
            [
                "convert",
                hf,
                "--outtype",
                "q4_0",
                "--lora",
                lora,
                "-o",
                "{out}/m.gguf",
                "--tensor-type",
                "ffn_down=q8_0",
            ],
            lambda out: llmconv.convert(
                hf, f"{out}/m.gguf", outtype="q4_0", lora=[lora], tensor_types=["ffn_down=q8_0"]
            ),
        ),
        "llama3": (
            ["convert", l3, "--outtype", "q6_K", "-o", "{out}/", "--override-kv", "llama.context_length=int:64"],
            lambda out: llmconv.convert(l3, f"{out}/", outtype="q6_K", override_kv=["llama.context_length=int:64"]),
        ),
        "ggml": (
            ["convert", mha, "--format", "ggml", "--outtype", "q4_1", "-o", "{out}/m.bin"],
            lambda out: llmconv.convert(mha, f"{out}/m.bin", outtype="q4_1", format="ggml"),
        ),
        "quantize": (
            ["quantize", f16, "{out}/", "--type", "q3_K_M,iq4_nl", "--pure"],
            lambda out: llmconv.quantize(f16, f"{out}/", outtype="q3_K_M,iq4_nl", pure=True),
        ),
        "convert-lora": (
            ["convert-lora", lora, "--base", meta, "--outtype", "q8_0", "-o", "{out}/a.gguf"],
            lambda out: llmconv.convert_lora(lora, meta, f"{out}/a.gguf", outtype="q8_0"),
        ),
    }


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    mha_checkpoint(d / "tiny-mha")
    assert main(["convert", str(FIX / "tiny-llama"), "--outtype", "f16", "-o", str(d / "in-F16.gguf"), "-q"]) == 0
    return d


@pytest.fixture(scope="module")
def outputs(inputs, tmp_path_factory) -> dict[str, dict[str, dict[str, str]]]:
    """case -> {"api": digests, "cli": digests}"""
    out = {}
    for name, (argv, call) in cases(inputs).items():
        api_dir, cli_dir = tmp_path_factory.mktemp(f"api-{name}"), tmp_path_factory.mktemp(f"cli-{name}")
        result = call(api_dir)
        assert sorted(map(str, result.paths)) == sorted(
            str(p) for p in api_dir.iterdir() if not p.name.endswith(".json")
        )
        assert main([a.replace("{out}", str(cli_dir)) for a in argv] + ["-q"]) == 0
        out[name] = {"api": digests(api_dir), "cli": digests(cli_dir)}
    return out


def test_api_and_cli_write_the_same_bytes(outputs):
    for name, d in outputs.items():
        assert d["api"], name
        assert d["api"] == d["cli"], name


def test_the_same_bytes_as_before_the_api(outputs, inputs, tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{BEFORE}^{{commit}}"], capture_output=True
    ).returncode:
        pytest.skip(f"commit {BEFORE[:10]} is not in this clone (a shallow clone?)")
    old = tmp_path / "before"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", BEFORE, "llmconv"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    runs = {
        name: [a.replace("{out}", str(tmp_path / name)) for a in argv] + ["-q"]
        for name, (argv, _) in cases(inputs).items()
    }
    driver = (
        "import json, os, sys\nfrom llmconv.cli import main\nassert main.__code__.co_filename.startswith(sys.argv[1])\n"
        "for name, argv in json.loads(sys.argv[2]).items():\n"
        "    os.makedirs(os.path.join(sys.argv[3], name))\n    assert main(argv) == 0, name\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", driver, str(old), json.dumps(runs), str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(old)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for name in runs:
        before, now = digests(tmp_path / name), outputs[name]["cli"]
        if name == "quantize":  # default names are convert's since (quantize IN [OUT] TYPE); the bytes are not
            before, now = sorted(before.values()), sorted(now.values())
        assert before == now, name
