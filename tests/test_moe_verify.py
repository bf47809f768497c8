"""Issue 16, verify: `llmconv verify` on Mixtral files. The reference routes in the checkpoint's
own layout (Hugging Face's sparse MoE block: softmax router, top-k, renormalised), the candidate
from the file (router, stacked expert slices); a correct conversion passes, a file whose
experts 1 and 2 trade places (all three of their matrices, in one layer) fails. The same with
the checkpoint in Mistral's own layout (Meta names and Q/K order, consolidated.safetensors) as
the reference."""

from __future__ import annotations

import re

import pytest

import llmconv
from llmconv.testing.moe_synth import FIXTURE_TOKENIZER, write_hf_mixtral, write_mistral_mixtral
from verify_util import swap_experts, verify


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtral-verify")
    ckpt = write_hf_mixtral(
        root / "ck", tokenizer=FIXTURE_TOKENIZER, n_expert=4, dim=64, ffn=64, n_heads=4, n_kv_heads=2, shards=2, seed=2
    )
    files = {}
    for t in ("f32", "q8_0"):
        files[t] = root / f"m-{t}.gguf"
        llmconv.convert(ckpt, files[t], outtype=t)
    files["mistral"] = root / "m-mistral-q8_0.gguf"
    mistral = write_mistral_mixtral(ckpt, root / "mistral")
    llmconv.convert(mistral, files["mistral"], outtype="q8_0")
    return ckpt, files, mistral


@pytest.mark.parametrize("outtype", ["f32", "q8_0", "mistral"])
def test_correct_mixtral_passes(capsys, mixtral, outtype):
    """ "mistral": the q8_0 conversion of the Mistral-layout twin, verified against that twin."""
    ckpt, files, mistral = mixtral
    code, out = verify(capsys, files[outtype], mistral if outtype == "mistral" else ckpt)
    assert code == 0, out
    assert "PASS" in out
    same = re.search(r"tensors: (\d+) of (\d+) byte-identical", out)
    assert same and same.group(1) == same.group(2), out  # every expert slice too


@pytest.mark.parametrize("layout", ["hf", "mistral"])
def test_two_experts_swapped_fail(capsys, mixtral, tmp_path, layout):
    ckpt, files, mistral = mixtral
    ref, file = (ckpt, files["q8_0"]) if layout == "hf" else (mistral, files["mistral"])
    bad = swap_experts(file, tmp_path / "swapped.gguf", layer=1, a=1, b=2)
    code, out = verify(capsys, bad, ref)
    assert code == 1, out
    assert "blk.1.ffn_" in out and "_exps" in out, out
    assert "holds expert 2's weights" in out and "holds expert 1's weights" in out, out
