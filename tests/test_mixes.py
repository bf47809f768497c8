"""K-quant mixes (Q2_K ... Q6_K, Q4_K_M, ...) against llama.cpp's own llama-quantize.

The oracle is `llama_cpp.llama_model_quantize` (no imatrix, one thread) on the same f32 GGUF
that `llmconv quantize --type <mix>` reads. For every mix the whole per-tensor type assignment,
the tensor bytes and general.file_type must be identical. The models:

  * the tiny-llama fixture (2 layers, GQA 4);
  * a 12-layer synthetic model with GQA 2 and an ffn of 800 (ffn_down rows do not split into
    256-blocks: the row-length fallbacks) and a 2-layer one of dim 288 (nothing splits:
    every fallback, output.weight as q8_0);
  * a sweep of tensor-only files (2-row matrices, cheap) over layer counts, head layouts,
    tied embeddings, the 80-layer "70B" rule and rows that fit no block: types only.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

import llmconv
from llmconv.cli import main
from llmconv.convert import mixes
from llmconv.convert.gguf_source import open_gguf_source
from llmconv.convert.pipeline import gguf_model_shape
from llmconv.convert.plan import TypePolicy, make_plan
from mix_util import FIXTURE, MIXES, SYNTH, assert_same_file, llama_quantize, read, write_tensor_only_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.llamacpp
@pytest.mark.parametrize("model", ["fixture", *SYNTH])
@pytest.mark.parametrize("mix", MIXES)
def test_mix_matches_llama_quantize(f32_mix_models, tmp_path, model, mix):
    src = f32_mix_models[model]
    theirs = llama_quantize(src, tmp_path / "theirs.gguf", mix)
    ours = tmp_path / "ours.gguf"
    llmconv.quantize(src, ours, outtype=mix.upper())
    assert_same_file(theirs, ours)
    # general.file_type is gguf's LlamaFileType of the same name
    assert read(ours)[0] == gguf.LlamaFileType[f"MOSTLY_{mix.upper()}"]


@pytest.mark.llamacpp
@pytest.mark.parametrize("mix", ["q3_k_m", "q5_k_s"])
def test_pure_mix_matches_llama_quantize(f32_mix_models, tmp_path, mix):
    """--pure: every matrix in the base type, still with the row-length fallbacks."""
    src = f32_mix_models["dim288"]
    theirs = llama_quantize(src, tmp_path / "theirs.gguf", mix, pure=True)
    ours = tmp_path / "ours.gguf"
    assert main(["quantize", str(src), str(ours), "--type", mix, "--pure", "-q"]) == 0
    assert_same_file(theirs, ours)


@pytest.mark.llamacpp
def test_convert_outtype_mix_is_the_same_file(f32_mix_models, tmp_path, capsys):
    """`convert --outtype q4_K_M` from the checkpoint == llama-quantize of the f32 conversion;
    `--dry-run` lists the same per-tensor types."""
    theirs = llama_quantize(f32_mix_models["fixture"], tmp_path / "theirs.gguf", "q4_k_m")
    ours = tmp_path / "ours.gguf"
    llmconv.convert(FIXTURE, ours, outtype="q4_K_M")
    assert_same_file(theirs, ours)

    capsys.readouterr()
    assert main(["convert", str(FIXTURE), "--outtype", "q4_K_M", "--dry-run", "-o", str(tmp_path / "x.gguf")]) == 0
    listed = {}
    for line in capsys.readouterr().out.splitlines():
        parts = line.split()
        if parts and parts[0].endswith(".weight"):
            listed[parts[0]] = parts[-2]
    _, t_theirs = read(theirs)
    assert listed == {n: t.lower() for n, (t, _) in t_theirs.items()}
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.llamacpp
def test_q4_k_m_loads_and_generates_in_llama_cpp(tmp_path):
    import llama_cpp
    import sentencepiece as spm

    from llmconv.verify.reference import reference_logits
    from llmconv.verify.run import LOGIT_BOUNDS

    out = tmp_path / "m.gguf"
    llmconv.convert(FIXTURE, out, outtype="q4_k_m")
    sp = spm.SentencePieceProcessor(model_file=str(FIXTURE / "tokenizer.model"))
    tokens = [sp.bos_id()] + sp.encode("The quick brown fox jumps over the lazy dog")
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, type_k=0, type_v=0, n_threads=1, verbose=False)
    llm.eval(tokens)
    got = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    ref = reference_logits(FIXTURE, tokens)
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert rel <= LOGIT_BOUNDS["q4_k"].max_rel_dlogit, rel
    llm.reset()
    generated = []
    for tok in llm.generate(tokens, temp=0.0):
        generated.append(tok)
        if len(generated) == 5:
            break
    assert len(generated) == 5 and all(0 <= t < llm.n_vocab() for t in generated)


# ---- the rule table over many model shapes, types only ------------------------------------

SHAPES = [  # (layers, heads, kv heads, tied embeddings, odd row lengths)
    (1, 8, 8, True, None),
    (3, 8, 2, False, None),
    (9, 4, 2, True, None),
    (12, 8, 4, False, {(0, "ffn_down"): 200, (1, "ffn_down"): 96, (5, "attn_v"): 288, (11, "ffn_down"): 288}),
    (17, 8, 8, False, None),
    (24, 8, 1, True, None),
    (33, 8, 4, False, None),
    (80, 8, 1, False, None),  # llama.cpp's "70B": attn_v bumped to q5_K
    (80, 8, 8, False, None),  # 80 layers without GQA ("65B"): no bump
]


@pytest.mark.llamacpp
@pytest.mark.parametrize(
    "shape",
    SHAPES,
    ids=lambda s: f"L{s[0]}-h{s[1]}-kv{s[2]}" + ("-tied" if s[3] else "") + ("-oddrows" if s[4] else ""),
)
def test_rule_table_matches_llama_quantize_types(tmp_path, shape):
    src_path = write_tensor_only_llama(tmp_path / "m.gguf", *shape)
    src = open_gguf_source(src_path)
    assert src.tied_embeddings == shape[3]
    model = gguf_model_shape(src)
    for mix in MIXES:
        _, theirs = read(llama_quantize(src_path, tmp_path / f"{mix}.gguf", mix))
        plan = make_plan(src.tensors, TypePolicy(mix, tied_embeddings=src.tied_embeddings, model=model))
        ours = {t.name: t.qtype.ggml_type.name for t in plan.tensors}
        diff = {n: (theirs[n][0], ours[n]) for n in theirs if theirs[n][0] != ours[n]}
        assert not diff, f"{mix}: (llama.cpp, llmconv) {diff}"


# ---- the table itself ---------------------------------------------------------------------


def test_aliases_and_file_types():
    # llama-quantize's names: Q4_K means Q4_K_M, etc.; case does not matter
    assert mixes.find_mix("Q4_K").name == "q4_k_m"
    assert mixes.find_mix("q3_K").name == "q3_k_m"
    assert mixes.find_mix("q5_k").name == "q5_k_m"
    assert mixes.find_mix("q4_0") is None
    for name, mix in mixes.MIXES.items():
        assert mix.file_type == gguf.LlamaFileType[f"MOSTLY_{name.upper()}"]
        # q4_k_m -> q4_k; iq4_xs itself; llama.cpp's IQ3_XS and IQ3_M files are mostly IQ3_S,
        # its IQ2_S file mostly IQ2_XS and its IQ2_M mostly IQ2_S
        other = {"iq3_xs": "iq3_s", "iq3_m": "iq3_s", "iq2_s": "iq2_xs", "iq2_m": "iq2_s"}
        assert mix.base == other.get(name, name if name.startswith("iq") else name[:4])


def test_every_rule_names_a_known_mix_kind_condition_and_type():
    from llmconv import quantize as q

    for names, kind, cond, t in mixes.RULES:
        assert set(names) <= set(mixes.MIXES)
        assert kind in ("output", "token_embd", *mixes._KINDS)
        assert cond in mixes.CONDITIONS
        assert t in q.TYPES
    for a, b in list(mixes.FALLBACK.items()) + list(mixes.LLAMA_70B_ATTN_V.items()):
        assert a in q.TYPES and b in q.TYPES


def test_more_bits_layers():
    """use_more_bits for 32 layers, written out from its definition: the first 4 and last 4
    layers, and every third layer starting at 4 + 2."""
    model = mixes.ModelShape(32, 32, 32)
    got = [
        i
        for i in range(32)
        if mixes.tensor_type("q4_k_m", f"blk.{i}.ffn_down.weight", (4096, 11008), model)[0] == "q6_k"
    ]
    want = sorted(set(range(4)) | set(range(28, 32)) | set(range(4 + 2, 28, 3)))
    assert got == want
