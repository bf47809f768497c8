"""Issue 16, verify on Llama 4: the reference runs transformers' Llama 4 text model on the
checkpoint as stored (fused experts read one at a time, sigmoid-scaled expert inputs, shared
expert, QK-norm, the no-RoPE layer), the candidate llama.cpp's llama4 graph from the file. A
correct conversion passes; a file whose experts 1 and 2 of a layer trade places fails, and so
does one whose MoE layer step is wrong."""

from __future__ import annotations

import pytest

from llama4_synth import SMALL_VOCAB, llama4_state_dict, small_vocab_tokenizer, text_config, write_hf_llama4
import llmconv
from verify_util import swap_experts, verify


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 4-layer, 4-expert Llama 4 with a 260-token byte vocabulary, as f32, q8_0 and q4_K_M."""
    root = tmp_path_factory.mktemp("llama4-verify")
    cfg = text_config(vocab_size=SMALL_VOCAB)
    ck = write_hf_llama4(root / "ck", sd=llama4_state_dict(cfg, seed=6), tokenizer=False, vocab_size=SMALL_VOCAB)
    small_vocab_tokenizer(ck)
    out = root / "out"
    out.mkdir()
    llmconv.convert(ck, f"{out}/", outtype="f32,q8_0,q4_K_M")
    return ck, {t: next(out.glob(f"*-{t.upper()}.gguf")) for t in ("f32", "q8_0", "q4_K_M")}


@pytest.mark.parametrize("outtype", ["f32", "q8_0", "q4_K_M"])
def test_correct_llama4_passes(capsys, small, outtype):
    ck, files = small
    code, out = verify(capsys, files[outtype], ck)
    assert code == 0, out
    assert "PASS" in out and "byte-identical" in out


def test_two_experts_swapped_fail(capsys, small, tmp_path):
    ck, files = small
    bad = swap_experts(files["q8_0"], tmp_path / "swapped.gguf", layer=3, a=1, b=2)
    code, out = verify(capsys, bad, ck)
    assert code == 1, out
    assert "blk.3.ffn_" in out and "holds expert 2's weights" in out and "holds expert 1's weights" in out, out


def test_wrong_moe_layer_step_fails(capsys, small, tmp_path):
    """interleave_moe_layer_step 1 would make every layer a MoE layer: the file no longer fits its
    tensors, and the metadata differs from the checkpoint's."""
    ck, files = small
    bad = tmp_path / "step.gguf"
    llmconv.quantize(files["f32"], bad, outtype="f32", override_kv=["llama4.interleave_moe_layer_step=int:1"])
    code, out = verify(capsys, bad, ck)
    assert code == 1, out
    assert "llama4.interleave_moe_layer_step" in out, out
