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

from llmconv.cli import main
from llmconv.convert import mixes
from llmconv.convert.gguf_source import open_gguf_source
from llmconv.convert.pipeline import gguf_model_shape
from llmconv.convert.plan import TypePolicy, make_plan
from synth import write_meta_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "tiny-llama"
MIXES = ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]
SYNTH = {
    "gqa2-ffn800": dict(dim=256, n_layers=12, n_heads=8, n_kv_heads=4, ffn=800, seed=3),
    "dim288": dict(dim=288, n_layers=2, n_heads=4, n_kv_heads=4, ffn=768, seed=4),
}


def llama_quantize(src: Path, dst: Path, mix: str, pure: bool = False) -> Path:
    import llama_cpp
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix.upper()}")
    params.nthread = 1
    params.pure = pure
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    assert rc == 0, f"llama_model_quantize({src.name}, {mix}) returned {rc}"
    return dst


def read(path: Path) -> tuple[int, dict[str, tuple[str, bytes]]]:
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: (gguf.GGMLQuantizationType(t.tensor_type).name, np.asarray(t.data).tobytes())
               for t in r.tensors}
    return int(r.get_field("general.file_type").contents()), tensors


@pytest.fixture(scope="module")
def f32_models(tmp_path_factory):
    """name -> f32 GGUF written by `llmconv convert --outtype f32`."""
    root = tmp_path_factory.mktemp("mixes")
    out = {}
    for name, ckpt in [("fixture", FIXTURE)] + [(n, write_meta_checkpoint(root / n, **kw)) for n, kw in SYNTH.items()]:
        out[name] = root / f"{name}-f32.gguf"
        assert main(["convert", str(ckpt), "--outtype", "f32", "-o", str(out[name]), "-q"]) == 0
    return out


def assert_same_file(theirs: Path, ours: Path) -> None:
    ft_theirs, t_theirs = read(theirs)
    ft_ours, t_ours = read(ours)
    assert t_ours.keys() == t_theirs.keys()
    types = {n: (t_theirs[n][0], t_ours[n][0]) for n in t_theirs if t_theirs[n][0] != t_ours[n][0]}
    assert not types, f"types differ (llama.cpp, llmconv): {types}"
    data = [n for n in t_theirs if t_theirs[n][1] != t_ours[n][1]]
    assert not data, f"tensor bytes differ: {data}"
    assert ft_ours == ft_theirs


@pytest.mark.llamacpp
@pytest.mark.parametrize("model", ["fixture", *SYNTH])
@pytest.mark.parametrize("mix", MIXES)
def test_mix_matches_llama_quantize(f32_models, tmp_path, model, mix):
    src = f32_models[model]
    theirs = llama_quantize(src, tmp_path / "theirs.gguf", mix)
    ours = tmp_path / "ours.gguf"
    assert main(["quantize", str(src), str(ours), "--type", mix.upper(), "-q"]) == 0
    assert_same_file(theirs, ours)
    # general.file_type is gguf's LlamaFileType of the same name
    assert read(ours)[0] == gguf.LlamaFileType[f"MOSTLY_{mix.upper()}"]


@pytest.mark.llamacpp
@pytest.mark.parametrize("mix", ["q3_k_m", "q5_k_s"])
def test_pure_mix_matches_llama_quantize(f32_models, tmp_path, mix):
    """--pure: every matrix in the base type, still with the row-length fallbacks."""
    src = f32_models["dim288"]
    theirs = llama_quantize(src, tmp_path / "theirs.gguf", mix, pure=True)
    ours = tmp_path / "ours.gguf"
    assert main(["quantize", str(src), str(ours), "--type", mix, "--pure", "-q"]) == 0
    assert_same_file(theirs, ours)


@pytest.mark.llamacpp
def test_convert_outtype_mix_is_the_same_file(f32_models, tmp_path, capsys):
    """`convert --outtype q4_K_M` from the checkpoint == llama-quantize of the f32 conversion;
    `--dry-run` lists the same per-tensor types."""
    theirs = llama_quantize(f32_models["fixture"], tmp_path / "theirs.gguf", "q4_k_m")
    ours = tmp_path / "ours.gguf"
    assert main(["convert", str(FIXTURE), "--outtype", "q4_K_M", "-o", str(ours), "-q"]) == 0
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
    assert main(["convert", str(FIXTURE), "--outtype", "q4_k_m", "-o", str(out), "-q"]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(FIXTURE / "tokenizer.model"))
    tokens = [sp.bos_id()] + sp.encode("The quick brown fox jumps over the lazy dog")
    llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, type_k=0, type_v=0, n_threads=1,
                          verbose=False)
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

LAYER_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def write_tensor_only_llama(path: Path, n_layers: int, n_heads: int, n_kv: int, tied: bool,
                            rows: dict[tuple[int, str], int] | None = None, kinds=LAYER_KINDS) -> Path:
    """A llama GGUF whose matrices are 2 x 256 (row lengths overridable per tensor): llama-quantize
    reads the hparams for its rules but never checks shapes (nor that every layer tensor is
    there: `kinds`), so every rule runs on a few bytes."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(256)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(256)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(256 // n_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(8)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(5)])
    w.add_token_scores([0.0] * 8)
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.NORMAL] * 5)
    rng = np.random.default_rng(n_layers)
    mat = lambda n=256: rng.standard_normal((2, n)).astype(np.float32)
    w.add_tensor("token_embd.weight", mat())
    for i in range(n_layers):
        for kind in kinds:
            w.add_tensor(f"blk.{i}.{kind}.weight", mat((rows or {}).get((i, kind), 256)))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(256, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(256, np.float32))
    w.add_tensor("output_norm.weight", np.ones(256, np.float32))
    if not tied:
        w.add_tensor("output.weight", mat())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SHAPES = [   # (layers, heads, kv heads, tied embeddings, odd row lengths)
    (1, 8, 8, True, None),
    (3, 8, 2, False, None),
    (9, 4, 2, True, None),
    (12, 8, 4, False, {(0, "ffn_down"): 200, (1, "ffn_down"): 96, (5, "attn_v"): 288, (11, "ffn_down"): 288}),
    (17, 8, 8, False, None),
    (24, 8, 1, True, None),
    (33, 8, 4, False, None),
    (80, 8, 1, False, None),      # llama.cpp's "70B": attn_v bumped to q5_K
    (80, 8, 8, False, None),      # 80 layers without GQA ("65B"): no bump
]


@pytest.mark.llamacpp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s[0]}-h{s[1]}-kv{s[2]}" + ("-tied" if s[3] else "")
                         + ("-oddrows" if s[4] else ""))
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
        # q4_k_m -> q4_k; iq4_xs itself; llama.cpp's IQ3_XS and IQ3_M files are mostly IQ3_S
        assert mix.base == {"iq3_xs": "iq3_s", "iq3_m": "iq3_s"}.get(name, name if name.startswith("iq") else name[:4])


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
    got = [i for i in range(32)
           if mixes.tensor_type("q4_k_m", f"blk.{i}.ffn_down.weight", (4096, 11008), model)[0] == "q6_k"]
    want = sorted(set(range(4)) | set(range(28, 32)) | set(range(4 + 2, 28, 3)))
    assert got == want
