"""Expert models quantized with an importance matrix (issues 15 and 16).

llama-imatrix keeps one row of in_sum2 (and one count) per expert of a stacked
`ffn_{gate,up,down}_exps` tensor, and llama-quantize weights expert e's rows by row e
(`imatrix + (row / nrows_per_expert) * n_per_row`). Oracle: `llama_model_quantize` with the
same imatrix, on tensor-only MoE files (8 experts: Mixtral's rules; 4: the dense ones) for the
IQ mixes that need an imatrix and K-quant mixes: every tensor's type and bytes. Then verify on
a Mixtral checkpoint converted with an imatrix: it re-quantizes each expert slice with its row.
"""

from __future__ import annotations

import pytest

import llmconv
from llmconv.cli import main
from llmconv.imatrix import write_imatrix_gguf
from llmconv.testing.moe_synth import FIXTURE_TOKENIZER, write_hf_mixtral
from mix_util import assert_same_file, llama_quantize_with_imatrix, read, synthetic_imatrix, write_tensor_only_moe

MIXES = ["iq2_xs", "iq2_m", "iq3_xxs", "iq3_m", "q2_k", "q3_k_m"]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """n_expert -> (f32 GGUF, its imatrix, the imatrix file): 8 layers x 8 experts (the
    n_layer/8 bands fire on layer 0) and 12 layers x 4 experts, 3 rows per expert."""
    root = tmp_path_factory.mktemp("moe-imatrix")
    out = {}
    for n_layers, n_expert in ((8, 8), (12, 4)):
        src = write_tensor_only_moe(root / f"e{n_expert}.gguf", n_layers, n_expert, expert_rows=3)
        im = synthetic_imatrix(src, seed=n_expert)
        write_imatrix_gguf(root / f"e{n_expert}.imatrix.gguf", im)
        out[n_expert] = (src, im, root / f"e{n_expert}.imatrix.gguf")
    return out


@pytest.mark.llamacpp
@pytest.mark.parametrize("n_expert", [8, 4])
@pytest.mark.parametrize("mix", MIXES)
def test_moe_with_imatrix_equals_llama_quantize(moe_models, tmp_path, mix, n_expert):
    src, im, im_path = moe_models[n_expert]
    theirs = llama_quantize_with_imatrix(src, tmp_path / "theirs.gguf", mix, im)
    ours = tmp_path / "ours.gguf"
    llmconv.quantize(src, ours, outtype=mix, imatrix=im_path)
    assert_same_file(theirs, ours)


@pytest.mark.llamacpp
def test_expert_slices_are_not_interchangeable(moe_models, tmp_path):
    """The comparison above can tell the slices apart: llama.cpp's bytes change when the
    experts' imatrix rows are rotated (so weighting every expert by one row would fail it)."""
    src, im, _ = moe_models[8]
    name = "blk.1.ffn_up_exps.weight"
    a = read(llama_quantize_with_imatrix(src, tmp_path / "a.gguf", "q2_k", im))[1][name]
    e = im.entries[name]
    e.sums[:], e.counts[:] = e.sums[[*range(1, len(e.counts)), 0]], e.counts[[*range(1, len(e.counts)), 0]]
    b = read(llama_quantize_with_imatrix(src, tmp_path / "b.gguf", "q2_k", im))[1][name]
    assert a[0] == b[0] == "Q2_K" and a[1] != b[1]


def test_expert_imatrix_of_the_wrong_size_is_one_line(moe_models, tmp_path, capsys):
    """llama-quantize refuses an imatrix whose size is not row * n_expert; so does llmconv,
    naming the tensor and the expert count."""
    src, im, _ = moe_models[4]
    name = "blk.0.ffn_down_exps.weight"
    e = im.entries[name]
    e.sums, e.counts = e.sums[:1], e.counts[:1]  # one row for 4 experts
    write_imatrix_gguf(tmp_path / "bad.gguf", im)
    assert (
        main(
            [
                "quantize",
                str(src),
                str(tmp_path / "o.gguf"),
                "--type",
                "q2_k",
                "--imatrix",
                str(tmp_path / "bad.gguf"),
                "-q",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and name in err and "4 experts" in err


def test_verify_reweights_each_expert_slice(tmp_path):
    """A Mixtral converted with an imatrix verifies bit-exact with it (verify re-quantizes
    expert slice `name[e]` with row e) and not without it."""
    ckpt = write_hf_mixtral(tmp_path / "ck", tokenizer=FIXTURE_TOKENIZER, n_expert=4, dim=64, ffn=64, seed=5)
    f32, q = tmp_path / "f32.gguf", tmp_path / "q.gguf"
    llmconv.convert(ckpt, f32, outtype="f32")
    write_imatrix_gguf(tmp_path / "im.gguf", synthetic_imatrix(f32, seed=9))
    llmconv.convert(ckpt, q, outtype="q4_0", imatrix=tmp_path / "im.gguf")

    def differing_expert_blocks(imatrix) -> int:
        report = llmconv.verify(q, ckpt, tokens=16, imatrix=imatrix).report
        return sum(t["blocks_differ"] for t in report["tensors"] if "_exps" in t["name"])

    assert differing_expert_blocks(tmp_path / "im.gguf") == 0
    assert differing_expert_blocks(None) > 0
