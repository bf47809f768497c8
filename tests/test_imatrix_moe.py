"""`llmconv imatrix` on Mixtral checkpoints against llama.cpp's own statistic.

llama.cpp multiplies the stacked experts with MUL_MAT_ID; llama-imatrix keeps, per expert, the
sum of x**2 over exactly the tokens routed to it and their count (ffn_down_exps sees each
token's gated activation). The oracle is llama-imatrix's eval callback run through
llama-cpp-python on the f32 conversion (llama_imatrix_oracle.py). Then end to end: the file
`llmconv imatrix` writes, given to `llmconv convert --outtype iq2_xs`, gives llama_model_quantize's
bytes; `--imatrix-text` gives the same file. Mistral's own layout gives its HF twin's statistic.
Llama 4 (top-1, sigmoid router whose score scales the expert's input, a shared expert, dense
layers between) against llama.cpp too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import llmconv
from llmconv.cli import main
from llmconv.imatrix import read_imatrix
from llmconv.imatrix.collect import calibration_chunks, compute_imatrix
from llmconv.testing.moe_synth import (
    FIXTURE_TOKENIZER,
    mistral_tokenizer,
    mixtral_state_dict,
    vocab_size,
    write_hf_mixtral,
    write_mistral_mixtral,
)
from llama4_synth import SMALL_VOCAB, small_vocab_tokenizer, write_hf_llama4
from mix_util import assert_same_file, llama_quantize_with_imatrix

CTX, CHUNKS, N_EXPERT, TOP_K = 64, 3, 8, 2
DEAD = 7  # layer 0's expert that no token can choose (see mixtral)
EXPS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    """2 layers x 8 experts, top-2, with Mixtral's own 32000-token tokenizer when mistral-common
    is installed (else the fixture's). Layer 0's router makes expert 7 unreachable: rows 1 and 3
    are rows 0 and 2 negated and row 7 is zero, so every token has two logits above expert 7's
    (|x.r0| and |x.r2|), and top-2 never reaches it; llama-imatrix then writes a zero row with
    count 0 for it."""
    tok = mistral_tokenizer() or FIXTURE_TOKENIZER
    sd = mixtral_state_dict(dim=64, ffn=64, n_expert=N_EXPERT, vocab=vocab_size(tok), seed=3)
    router = sd["model.layers.0.block_sparse_moe.gate.weight"]
    router[1], router[3], router[DEAD] = -router[0], -router[2], 0
    return write_hf_mixtral(tmp_path_factory.mktemp("imatrix-moe") / "ck", tokenizer=tok, sd=sd, dim=64, ffn=64)


@pytest.mark.llamacpp
def test_expert_statistic_equals_llama_cpp(mixtral, tmp_path):
    from llama_imatrix_oracle import llama_cpp_imatrix

    f32 = tmp_path / "f32.gguf"
    llmconv.convert(mixtral, f32, outtype="f32")
    cal = calibration_chunks(mixtral, "builtin", CTX, CHUNKS)
    theirs, their_counts = llama_cpp_imatrix(f32, cal.chunks)
    ours = compute_imatrix(mixtral, "builtin", ctx=CTX, chunks=CHUNKS, progress=False, threads=1)
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp") + EXPS
    assert sorted(ours.entries) == sorted(theirs) == sorted(f"blk.{i}.{k}.weight" for i in range(2) for k in kinds)
    tokens = CTX * CHUNKS
    for name, e in ours.entries.items():
        assert e.counts.tolist() == their_counts[name].tolist(), name
        np.testing.assert_allclose(e.sums, theirs[name], rtol=5e-5, atol=1e-6 * theirs[name].max(), err_msg=name)
        if "_exps" in name:  # a row per expert; each token in the rows of its top-2
            assert e.sums.shape[0] == N_EXPERT and e.counts.sum() == TOP_K * tokens, name
        else:
            assert e.counts.tolist() == [tokens], name
    for kind in EXPS:  # the unreachable expert: a zero row, count 0 (as llama-imatrix writes it)
        e = ours.entries[f"blk.0.{kind}.weight"]
        assert e.counts[DEAD] == 0 and not e.sums[DEAD].any() and (np.delete(e.counts, DEAD) > 0).all()
    assert ours.chunk_count == CHUNKS and ours.chunk_size == CTX


@pytest.mark.llamacpp
def test_llama4_statistic_equals_llama_cpp(tmp_path):
    """4 layers: dense 0 and 2; MoE 1 and 3 (4 experts, top-1, shared expert; 3 without RoPE).
    llama.cpp feeds a routed expert's gate/up the token times its router sigmoid (weight before
    the ffn), the shared expert and router the token itself. The fixture's 260-token byte-level
    vocabulary keeps the embedding small (test_llama4.py covers Llama 4's real tokenizer)."""
    from llama_imatrix_oracle import llama_cpp_imatrix

    ckpt = write_hf_llama4(tmp_path / "ck", seed=2, tokenizer=False, vocab_size=SMALL_VOCAB)
    small_vocab_tokenizer(ckpt)
    f32 = tmp_path / "f32.gguf"
    llmconv.convert(ckpt, f32, outtype="f32")
    cal = calibration_chunks(ckpt, "builtin", CTX, CHUNKS)
    theirs, their_counts = llama_cpp_imatrix(f32, cal.chunks)
    ours = compute_imatrix(ckpt, "builtin", ctx=CTX, chunks=CHUNKS, progress=False, threads=1)
    assert sorted(ours.entries) == sorted(theirs)
    moe = {f"blk.{i}.{k}.weight" for i in (1, 3) for k in (*EXPS, "ffn_gate_inp", "ffn_gate_shexp", "ffn_up_shexp")}
    assert moe <= set(theirs) and "blk.2.ffn_down.weight" in theirs
    for name, e in ours.entries.items():
        assert e.counts.tolist() == their_counts[name].tolist(), name
        np.testing.assert_allclose(e.sums, theirs[name], rtol=5e-5, atol=1e-6 * theirs[name].max(), err_msg=name)
        if "_exps" in name:  # top-1: every token in exactly one expert's row
            assert e.counts.shape == (4,) and e.counts.sum() == CTX * CHUNKS, name
    # the routed experts' input is scaled by the router: it differs from the shared expert's
    assert not np.allclose(
        ours.entries["blk.1.ffn_gate_exps.weight"].sums.sum(0), theirs["blk.1.ffn_gate_shexp.weight"][0]
    )


def test_mistral_layout_gives_the_hf_statistic(mixtral, tmp_path):
    """Mistral's consolidated twin (Meta names and Q/K order, tokenizer.model.v1) routes the same
    tokens to the same experts: the same counts, the same sums to float rounding."""
    twin = write_mistral_mixtral(mixtral, tmp_path / "mistral")
    hf = compute_imatrix(mixtral, "builtin", ctx=CTX, chunks=2, progress=False, threads=1)
    ms = compute_imatrix(twin, "builtin", ctx=CTX, chunks=2, progress=False, threads=1)
    assert sorted(ms.entries) == sorted(hf.entries)
    for name, e in hf.entries.items():
        assert ms.entries[name].counts.tolist() == e.counts.tolist(), name
        np.testing.assert_allclose(ms.entries[name].sums, e.sums, rtol=1e-5, atol=1e-7 * e.sums.max(), err_msg=name)


@pytest.mark.llamacpp
def test_cli_imatrix_then_iq2_xs_equals_llama_quantize(tmp_path):
    """Rows of 256 so the experts are IQ2_XS blocks (4 experts, the fixture's small tokenizer
    to keep the embedding cheap)."""
    ckpt = write_hf_mixtral(
        tmp_path / "ck", tokenizer=FIXTURE_TOKENIZER, n_expert=4, n_layers=1, dim=256, ffn=256, seed=4
    )
    im_path, f32 = tmp_path / "im.gguf", tmp_path / "f32.gguf"
    calib = ["--ctx", "32", "--chunks", "4"]
    assert main(["imatrix", str(ckpt), *calib, "-t", "1", "-o", str(im_path), "-q"]) == 0
    im = read_imatrix(im_path)
    assert im.entries["blk.0.ffn_down_exps.weight"].sums.shape == (4, 256)
    ours = tmp_path / "ours.gguf"
    assert main(["convert", str(ckpt), "--outtype", "iq2_xs", "--imatrix", str(im_path), "-o", str(ours), "-q"]) == 0
    llmconv.convert(ckpt, f32, outtype="f32")
    assert_same_file(llama_quantize_with_imatrix(f32, tmp_path / "theirs.gguf", "iq2_xs", im), ours)
    from_text = tmp_path / "from-text.gguf"
    text_args = ["--imatrix-text", "builtin", "--imatrix-ctx", "32", "--imatrix-chunks", "4", "-t", "1"]
    assert main(["convert", str(ckpt), "--outtype", "iq2_xs", *text_args, "-o", str(from_text), "-q"]) == 0
    assert from_text.read_bytes() == ours.read_bytes()
