"""Issue 14: checkpoint layouts people download today. Each test builds a checkpoint of the real
layout with tiny deterministic weights and lets llama.cpp judge the converted file: its logits
against an independent float64 forward pass (tests/torch_reference.py) and its tokenization
against the source tokenizer."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import llmconv
from llmconv.convert.execute import write_gguf
from llmconv.convert.pipeline import plan_conversion
from llmconv.errors import LlmconvError
from llmconv.formats.gguf_reader import read_gguf
from synth import TOKENIZER, meta_state_dict, write_meta_checkpoint
from torch_reference import meta_logits

ROOT = Path(__file__).resolve().parents[1]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé, naïve café, 東京, and an emoji 🙂 fall back to bytes.",
    "def f(x):\n    return x * 2  # code\n\tTabbed line",
]


def _hf_generator():
    spec = importlib.util.spec_from_file_location("make_hf_fixtures", ROOT / "fixtures" / "make_hf_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_hf_fixtures", mod)
    spec.loader.exec_module(mod)
    return mod


mk = _hf_generator()


def convert(src: Path, out: Path, outtype: str = "f32", **kw) -> Path:
    llmconv.convert(src, out, outtype=outtype, **kw)
    return out


def fields(path: Path) -> dict:
    """Metadata (llmconv's GGUF reader: gguf-py's takes seconds over a 32768-token vocabulary)."""
    return read_gguf(path).kvs


def tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: bytes(t.data) for t in read_gguf(path).tensors}


def sp_tokens(n: int, model: Path = TOKENIZER) -> list[int]:
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return ([sp.bos_id()] + sp.encode(" ".join(SENTENCES)))[:n]


def llamacpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path), n_ctx=128, n_batch=128, logits_all=True, type_k=0, type_v=0, n_threads=1, verbose=False
    )
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


# ---- 1. head_dim != dim / n_heads -------------------------------------------------------------

# Mistral Nemo's attention shape, scaled down: dim 5120, 32 heads of 128 (not 160), 8 kv heads
NEMO_LIKE = dict(dim=80, n_heads=4, n_kv_heads=2, head_dim=32, ffn=96)


@pytest.fixture(scope="module")
def head_dim_twins(tmp_path_factory):
    """The same weights as a Meta checkpoint (params.json head_dim) and an HF one (config.json head_dim)."""
    tmp = tmp_path_factory.mktemp("head_dim")
    c = NEMO_LIKE
    sd = meta_state_dict(
        dim=c["dim"],
        n_heads=c["n_heads"],
        n_kv_heads=c["n_kv_heads"],
        head_dim=c["head_dim"],
        ffn=c["ffn"],
        seed=5,
        dtype=torch.float32,
    )
    params = {"n_heads": c["n_heads"], "n_kv_heads": c["n_kv_heads"], "head_dim": c["head_dim"], "vocab_size": 512}
    meta = write_meta_checkpoint(tmp / "meta", sd, params=params)
    full = json.loads((meta / "params.json").read_text())
    hf = mk.write_hf_checkpoint(
        tmp / "hf", sd, full, config={"head_dim": c["head_dim"], "max_position_embeddings": 4096}
    )
    return sd, full, meta, hf, tmp


def test_head_dim_keys_and_identical_twins(head_dim_twins):
    sd, params, meta, hf, tmp = head_dim_twins
    a, b = convert(meta, tmp / "meta.gguf"), convert(hf, tmp / "hf.gguf")
    fa, fb = fields(a), fields(b)
    for key in ("llama.attention.key_length", "llama.attention.value_length", "llama.rope.dimension_count"):
        assert fa[key] == fb[key] == 32, key
    assert fa["llama.embedding_length"] == 80 and fa["llama.attention.head_count"] == 4
    # the HF twin's Q/K rows, un-permuted with 32-row heads, are the Meta original's bytes
    assert tensor_bytes(a) == tensor_bytes(b)


def test_no_head_dim_key_when_the_checkpoint_states_none(tmp_path):
    sd = meta_state_dict(seed=1)
    src = write_meta_checkpoint(tmp_path / "m", sd)
    f = fields(convert(src, tmp_path / "m.gguf"))
    assert "llama.attention.key_length" not in f and f["llama.rope.dimension_count"] == 16


@pytest.mark.llamacpp
@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_llamacpp_logits_with_head_dim_match_the_reference(head_dim_twins, layout):
    sd, params, meta, hf, tmp = head_dim_twins
    out = convert(meta if layout == "meta" else hf, tmp / f"{layout}-logits.gguf")
    tokens = sp_tokens(40)
    ref = meta_logits(
        sd, tokens, n_heads=4, n_kv_heads=2, head_dim=32, norm_eps=params["norm_eps"], rope_theta=params["rope_theta"]
    )
    err = rel_err(llamacpp_logits(out, tokens), ref)
    assert err < 1e-5, err


def test_head_dim_must_be_even_and_fit_the_weights(head_dim_twins, tmp_path):
    sd, params, meta, hf, tmp = head_dim_twins
    bad = dict(params, head_dim=33)
    d = write_meta_checkpoint(tmp_path / "odd", sd, params=bad)
    with pytest.raises(LlmconvError, match="head_dim 33 is not a positive even integer"):
        plan_conversion(d)
    d = write_meta_checkpoint(tmp_path / "wrong", sd, params=dict(params, head_dim=16))
    with pytest.raises(LlmconvError, match=r"head_dim=16"):
        plan_conversion(d)


def test_head_dim_cannot_go_to_ggjt(head_dim_twins):
    from llmconv.convert.ggml_out import plan_ggml_conversion

    sd, params, meta, hf, tmp = head_dim_twins
    with pytest.raises(LlmconvError, match="head size 32 != dim / n_heads = 20"):
        plan_ggml_conversion(meta, outtype="f32")


# ---- 4. uneven model-parallel shards ----------------------------------------------------------


def tensor_split_shards(sd: dict, n: int, vocab_axis_embedding: bool = False) -> list[dict]:
    """Re-shard as torch.tensor_split does: parts differ by one row or column. Meta's axes: wo, w2
    and (LLaMA 1/2) the embedding by columns, every other matrix by rows; norms replicated."""
    shards = [{} for _ in range(n)]
    for k, t in sd.items():
        if t.dim() == 1:
            parts = [t.clone() for _ in range(n)]
        elif k.endswith(("attention.wo.weight", "feed_forward.w2.weight")) or (
            k == "tok_embeddings.weight" and not vocab_axis_embedding
        ):
            parts = [c.clone() for c in torch.tensor_split(t, n, dim=1)]
        else:
            parts = [c.clone() for c in torch.tensor_split(t, n, dim=0)]
        for s, p in zip(shards, parts):
            s[k] = p
    return shards


def write_shards(path: Path, shards: list[dict], params: dict) -> Path:
    path.mkdir(parents=True)
    (path / "params.json").write_text(json.dumps(params))
    for i, s in enumerate(shards):
        torch.save(s, path / f"consolidated.{i:02d}.pth")
    (path / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
    return path


@pytest.fixture(scope="module")
def single_shard(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uneven")
    sd = meta_state_dict(seed=3)  # dim 64, ffn 192, vocab 512
    src = write_meta_checkpoint(tmp / "one", sd)
    params = json.loads((src / "params.json").read_text())
    return sd, params, tensor_bytes(convert(src, tmp / "one.gguf", "f16")), tmp


@pytest.mark.parametrize("n,vocab_axis", [(3, False), (3, True), (5, True)])
def test_uneven_shards_join_to_the_same_tensors(single_shard, tmp_path, n, vocab_axis):
    sd, params, want, _ = single_shard
    shards = tensor_split_shards(sd, n, vocab_axis)
    sizes = [s["tok_embeddings.weight"].shape for s in shards]
    assert len(set(sizes)) > 1, sizes  # really uneven (512 rows / 64 columns over n)
    src = write_shards(tmp_path / "split", shards, params)
    conv = plan_conversion(src, outtype="f16", outfile=tmp_path / "s.gguf")
    assert conv.source.n_files == n
    assert tensor_bytes(convert(src, tmp_path / "s.gguf", "f16")) == want


def test_even_split_without_vocab_size_in_params(single_shard, tmp_path):
    """LLaMA 1's params.json says vocab_size -1: the embedding's split is still unambiguous."""
    sd, params, want, _ = single_shard
    src = write_shards(tmp_path / "v1", tensor_split_shards(sd, 2), dict(params, vocab_size=-1))
    assert tensor_bytes(convert(src, tmp_path / "v1.gguf", "f16")) == want


def test_uneven_shards_must_add_up_to_params(single_shard, tmp_path):
    sd, params, _, _ = single_shard
    shards = tensor_split_shards(sd, 3, vocab_axis_embedding=True)
    shards[2]["tok_embeddings.weight"] = shards[2]["tok_embeddings.weight"][:-1].clone()
    src = write_shards(tmp_path / "short", shards, params)
    with pytest.raises(
        LlmconvError, match=r"tok_embeddings.weight.*join to 511 along dim 0 but params.json implies 512"
    ):
        plan_conversion(src)


def test_uneven_shards_replicated_norms_must_be_equal(single_shard, tmp_path):
    sd, params, _, _ = single_shard
    shards = tensor_split_shards(sd, 3)
    shards[1]["layers.1.ffn_norm.weight"] = shards[1]["layers.1.ffn_norm.weight"] * 2
    src = write_shards(tmp_path / "norm", shards, params)
    with pytest.raises(LlmconvError, match=r"consolidated.01.pth.*layers.1.ffn_norm.weight.*replicated tensor differs"):
        plan_conversion(src)


# ---- 2. Mistral's own format ---------------------------------------------------------------------


def mistral_data(name: str) -> Path:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "mistral-common is not installed (pip install --no-deps mistral-common): it ships the real "
            "Mistral tokenizer files"
        )
    return Path(spec.submodule_search_locations[0]) / "data" / name


MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog.",
    "Le cœur a ses raisons que la raison ne connaît point.",
    "Größenwahn und Übermut: ÄÖÜ äöü ß.",
    "東京は日本の首都です。我想在apple工作。",
    "Привет, как дела? Ελληνικά! עברית العربية",
    "emoji 🙂🚀 and numbers 3.14159 1,000,000 2024-11-24",
    "  leading spaces\n\ttabs\n\nnewlines  ",
    "def f(x):\n    return [x ** 2 for x in range(10)]",
]


def write_mistral_checkpoint(path: Path, sd: dict, params: dict, tokenizer: Path, files: int = 1) -> Path:
    """params.json + consolidated.safetensors (or consolidated-0000k-of-0000N) + the tokenizer file,
    under its own name, as Mistral's repositories hold them."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    (path / "params.json").write_text(json.dumps(params, indent=2))
    names = list(sd)
    for k in range(files):
        part = {n: sd[n].contiguous() for n in names[k * len(names) // files : (k + 1) * len(names) // files]}
        fname = "consolidated.safetensors" if files == 1 else f"consolidated-{k + 1:05d}-of-{files:05d}.safetensors"
        save_file(part, str(path / fname), metadata={"format": "pt"})
    target = (
        "tekken.json"
        if tokenizer.suffix == ".json"
        else tokenizer.name
        if tokenizer.name == "tokenizer.model"
        else "tokenizer.model." + tokenizer.name.rsplit(".", 1)[-1]
    )
    (path / target).write_bytes(tokenizer.read_bytes())
    return path


# Mistral 7B v0.3's params.json, scaled down (dim 4096, 32 layers, 32 heads of 128, 8 kv heads,
# hidden_dim 14336, vocab 32768 with tokenizer.model.v3)
MISTRAL_V03 = {
    "dim": 64,
    "n_layers": 2,
    "head_dim": 16,
    "hidden_dim": 96,
    "n_heads": 4,
    "n_kv_heads": 2,
    "norm_eps": 1e-05,
    "vocab_size": 32768,
    "rope_theta": 1000000.0,
}


@pytest.fixture(scope="module")
def mistral_v3(tmp_path_factory):
    tok = mistral_data("mistral_instruct_tokenizer_240323.model.v3")
    tmp = tmp_path_factory.mktemp("mistral_v3")
    p = MISTRAL_V03
    sd = meta_state_dict(
        dim=p["dim"],
        n_heads=p["n_heads"],
        n_kv_heads=p["n_kv_heads"],
        ffn=p["hidden_dim"],
        vocab=p["vocab_size"],
        seed=7,
    )
    src = write_mistral_checkpoint(tmp / "Mistral-7B-Instruct-v0.3", sd, p, tok)
    out = convert(src, tmp / "m.gguf")
    return sd, src, out, tok, tmp


def test_mistral_format_is_detected_and_written_like_llamacpp(mistral_v3):
    sd, src, out, tok, tmp = mistral_v3
    conv = plan_conversion(src, outtype="f32")
    assert conv.source.kind == "mistral" and conv.hparams.family == "mistral"
    assert any("no context length" in w for w in conv.warnings)
    f = fields(out)
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    assert f["tokenizer.ggml.model"] == "llama" and len(f["tokenizer.ggml.tokens"]) == sp.vocab_size() == 32768
    assert f["tokenizer.ggml.tokens"][3] == "[INST]" and f["tokenizer.ggml.token_type"][3] == 3  # control
    assert (
        f["tokenizer.ggml.bos_token_id"],
        f["tokenizer.ggml.eos_token_id"],
        f["tokenizer.ggml.padding_token_id"],
    ) == (1, 2, 2)  # no pad piece: padded with eos, as llama.cpp's MistralVocab does
    assert f["tokenizer.chat_template"] == "mistral-v3"
    assert f["llama.attention.key_length"] == 16 and f["llama.rope.freq_base"] == 1e6
    # Meta's names and Q/K order: the tensors are the state dict's, in Meta's order
    names = [t.name for t in read_gguf(out).tensors]
    assert names[0] == "token_embd.weight" and names[1].startswith("blk.0.") and names[-1] == "output.weight"
    q = np.frombuffer(tensor_bytes(out)["blk.1.attn_q.weight"], dtype=np.float32)
    assert np.array_equal(q, sd["layers.1.attention.wq.weight"].float().numpy().ravel())


@pytest.mark.llamacpp
def test_llamacpp_tokenizes_like_the_v3_sentencepiece_model(mistral_v3):
    import llama_cpp

    sd, src, out, tok, tmp = mistral_v3
    sp = spm.SentencePieceProcessor(model_file=str(tok))  # what mistral-common's SentencePieceTokenizer runs
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    for s in MULTILINGUAL:
        assert llm.tokenize(s.encode(), add_bos=True) == [sp.bos_id()] + sp.encode(s), s
    # control tokens parse as one token when special tokens are on (mistral-common's [INST] ... [/INST])
    assert llm.tokenize(b"[INST]", add_bos=False, special=True) == [3]


@pytest.mark.llamacpp
def test_llamacpp_logits_of_mistral_format_match_the_reference(mistral_v3):
    sd, src, out, tok, tmp = mistral_v3
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    tokens = ([sp.bos_id()] + sp.encode(" ".join(MULTILINGUAL)))[:48]
    p = MISTRAL_V03
    ref = meta_logits(
        sd,
        tokens,
        n_heads=p["n_heads"],
        n_kv_heads=p["n_kv_heads"],
        head_dim=p["head_dim"],
        norm_eps=p["norm_eps"],
        rope_theta=p["rope_theta"],
    )
    err = rel_err(llamacpp_logits(out, tokens), ref)
    assert err < 1e-5, err


@pytest.mark.llamacpp
def test_imatrix_of_mistral_format_equals_llama_cpp(mistral_v3):
    """`llmconv imatrix` on Mistral's own layout (Meta's names and Q/K order in safetensors,
    tokenizer.model.v3): llama-imatrix's statistic from llama.cpp on the f32 conversion."""
    from llama_imatrix_oracle import llama_cpp_imatrix

    from llmconv.imatrix.collect import calibration_chunks, compute_imatrix

    sd, src, out, tok, tmp = mistral_v3
    cal = calibration_chunks(src, "builtin", 32, 2)
    theirs, counts = llama_cpp_imatrix(out, cal.chunks)
    ours = compute_imatrix(src, "builtin", ctx=32, chunks=2, progress=False, threads=1)
    assert sorted(ours.entries) == sorted(theirs) and len(theirs) == 14
    for name, e in ours.entries.items():
        assert e.counts.tolist() == counts[name].tolist() == [64], name
        np.testing.assert_allclose(e.sums, theirs[name], rtol=2e-5, atol=1e-7 * theirs[name].max(), err_msg=name)


def test_verify_takes_mistral_format_as_the_reference(mistral_v3, capsys):
    """verify's reference pass runs on Mistral's own layout (Meta's pass on the safetensors, the
    tokenizer.model.v3 text): the f32 conversion passes, token for token."""
    from llmconv.cli import main

    sd, src, out, tok, tmp = mistral_v3
    capsys.readouterr()
    code = main(["verify", str(out), "-r", str(src), "--tokens", "32"])
    text = capsys.readouterr().out
    assert code == 0 and "PASS" in text and "vocabulary: matches" in text, text


def test_mistral_files_split_by_tensor_give_the_same_gguf(mistral_v3, tmp_path):
    sd, src, out, tok, tmp = mistral_v3
    split = write_mistral_checkpoint(tmp_path / "split", sd, MISTRAL_V03, tok, files=3)
    assert tensor_bytes(convert(split, tmp_path / "s.gguf")) == tensor_bytes(out)
    (split / "consolidated-00002-of-00003.safetensors").unlink()
    with pytest.raises(LlmconvError, match="shard 2 of 3 is missing"):
        plan_conversion(split)


def test_mistral_refuses_what_the_llama_architecture_cannot_hold(mistral_v3, tmp_path):
    sd, src, out, tok, tmp = mistral_v3
    moe = write_mistral_checkpoint(
        tmp_path / "moe",
        {"tok_embeddings.weight": sd["tok_embeddings.weight"]},
        dict(MISTRAL_V03, moe={"num_experts": 8, "num_experts_per_tok": 2, "num_shared_experts": 1}),
        tok,
    )
    # Mixtral's moe section converts (tests/test_moe.py); later kinds of MoE do not fit the llama architecture
    with pytest.raises(LlmconvError, match="params.json.*'moe': a mixture of experts with num_shared_experts"):
        plan_conversion(moe)


# ---- 3. Meta's download tree and --tokenizer --------------------------------------------------------


def test_meta_download_tree_takes_the_tokenizer_from_the_folder_above(single_shard, tmp_path, capsys):
    """llama/tokenizer.model beside llama/llama-2-7b/{params.json, consolidated.00.pth}."""
    from llmconv.cli import main

    sd, params, want, _ = single_shard
    model = write_meta_checkpoint(tmp_path / "llama" / "llama-2-7b", sd)
    (model / "tokenizer.model").rename(tmp_path / "llama" / "tokenizer.model")
    out = tmp_path / "tree.gguf"
    assert main(["convert", str(model), "--outtype", "f16", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: tokenizer.model is not in the checkpoint folder" in err and str(tmp_path / "llama") in err
    assert tensor_bytes(out) == want
    assert (
        fields(out)["tokenizer.ggml.tokens"]
        == fields(convert(write_meta_checkpoint(tmp_path / "std", sd), tmp_path / "std.gguf", "f16"))[
            "tokenizer.ggml.tokens"
        ]
    )


def test_meta_without_any_tokenizer_says_where_it_looked(single_shard, tmp_path):
    sd, *_ = single_shard
    model = write_meta_checkpoint(tmp_path / "llama" / "llama-2-7b", sd)
    (model / "tokenizer.model").unlink()
    with pytest.raises(LlmconvError, match=r"tokenizer.model is missing \(here and in the folder above; --tokenizer"):
        plan_conversion(model)


@pytest.mark.parametrize("as_folder", [False, True])
def test_tokenizer_option_for_meta(single_shard, tmp_path, as_folder):
    sd, *_ = single_shard
    model = write_meta_checkpoint(tmp_path / "m", sd)
    std = fields(convert(model, tmp_path / "std.gguf", "f16"))
    elsewhere = tmp_path / "tok"
    elsewhere.mkdir()
    name = "tokenizer.model" if as_folder else "spm-32k.model"
    (model / "tokenizer.model").rename(elsewhere / name)
    got = fields(convert(model, tmp_path / "t.gguf", "f16", tokenizer=elsewhere if as_folder else elsewhere / name))
    assert got["tokenizer.ggml.tokens"] == std["tokenizer.ggml.tokens"]
    assert got["tokenizer.ggml.token_type"] == std["tokenizer.ggml.token_type"]
    assert got["tokenizer.ggml.scores"] == std["tokenizer.ggml.scores"]


@pytest.mark.parametrize("as_folder", [False, True])
def test_tokenizer_option_for_hf(head_dim_twins, tmp_path, as_folder):
    import shutil

    sd, params, meta, hf, tmp = head_dim_twins
    std = fields(convert(hf, tmp_path / "std.gguf"))
    bare = tmp_path / "bare"
    shutil.copytree(hf, bare)
    tok = tmp_path / "tok"
    tok.mkdir()
    for n in ("tokenizer.model", "tokenizer_config.json"):
        (bare / n).rename(tok / n)
    with pytest.raises(LlmconvError, match="no tokenizer"):
        plan_conversion(bare)
    got = fields(convert(bare, tmp_path / "t.gguf", tokenizer=tok if as_folder else tok / "tokenizer.model"))
    del std["general.name"], got["general.name"]
    assert got == std


def test_tokenizer_option_for_mistral(mistral_v3, tmp_path):
    sd, src, out, tok, tmp = mistral_v3
    v1 = mistral_data("tokenizer.model.v1")  # 32000 pieces: the 32768-row embedding refuses it
    with pytest.raises(LlmconvError, match="tokenizer has 32000 tokens but the embedding has 32768 rows"):
        plan_conversion(src, tokenizer=v1)
    f = fields(convert(src, tmp_path / "t.gguf", tokenizer=tok))
    assert f["tokenizer.chat_template"] == "mistral-v3"


# ---- 2b. Mistral's own format with a Tekken tokenizer: Mistral Nemo's real shape, scaled down ----------

# Mistral Nemo's params.json (dim 5120, 40 layers, 32 heads of 128 -- not 160 --, 8 kv heads,
# hidden_dim 14336, vocab 131072, rope_theta 1e6) with the real tekken_240718.json
NEMO = {
    "dim": 48,
    "n_layers": 2,
    "head_dim": 32,
    "hidden_dim": 64,
    "n_heads": 2,
    "n_kv_heads": 1,
    "norm_eps": 1e-05,
    "vocab_size": 131072,
    "rope_theta": 1000000.0,
}


@pytest.fixture(scope="module")
def nemo(tmp_path_factory):
    tok = mistral_data("tekken_240718.json")
    tmp = tmp_path_factory.mktemp("nemo")
    p = NEMO
    sd = meta_state_dict(
        dim=p["dim"],
        n_heads=p["n_heads"],
        n_kv_heads=p["n_kv_heads"],
        head_dim=p["head_dim"],
        ffn=p["hidden_dim"],
        vocab=p["vocab_size"],
        seed=9,
    )
    src = write_mistral_checkpoint(tmp / "Mistral-Nemo-Instruct-2407", sd, p, tok)
    return sd, src, convert(src, tmp / "nemo.gguf"), tok


@pytest.mark.slow
@pytest.mark.llamacpp
def test_tekken_checkpoint_for_imatrix_and_verify(nemo, tmp_path, capsys):
    """`llmconv imatrix` on Mistral's layout with tekken.json: the calibration chunks are the
    text as llama.cpp tokenizes it from the converted file (BOS first, each chunk's first token
    replaced by BOS); the forward pass is the Mistral one test_imatrix_of_mistral_format_... checks.
    And verify takes the checkpoint as its reference."""
    import llama_cpp

    from llmconv.cli import main
    from llmconv.imatrix.collect import calibration_chunks

    sd, src, out, tok = nemo
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(MULTILINGUAL) + (ROOT / "fixtures" / "corpus.txt").read_text(encoding="utf-8")[:6000])
    cal = calibration_chunks(src, text, 32, None)
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    ids = llm.tokenize(text.read_text(encoding="utf-8").encode(), add_bos=True, special=False)
    n = len(ids) // 32
    want = np.array(ids[: n * 32]).reshape(n, 32)
    want[:, 0] = 1
    assert n > 20 and np.array_equal(cal.chunks, want)
    # verify takes the same checkpoint as its reference (its vocabulary and text through tekken.json)
    capsys.readouterr()
    code = main(["verify", str(out), "-r", str(src), "--tokens", "32"])
    report = capsys.readouterr().out
    assert code == 0 and "PASS" in report and "vocabulary: matches" in report, report


@pytest.mark.slow
@pytest.mark.llamacpp
def test_nemo_tekken_format_tokenizes_like_tiktoken_and_matches_the_reference(nemo):
    import base64

    import tiktoken

    sd, src, out, tok = nemo
    f = fields(out)
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"], f["tokenizer.chat_template"]) == (
        "gpt2",
        "tekken",
        "mistral-v3-tekken",
    )
    assert f["llama.attention.key_length"] == 32 and f["llama.embedding_length"] == 48
    # mistral-common's Tekken tokenizer is tiktoken on the file's ranks and regex, ids past the specials
    doc = json.loads(tok.read_text(encoding="utf-8"))
    n_special = doc["config"]["default_num_special_tokens"]
    ranks = {
        base64.b64decode(e["token_bytes"]): e["rank"]
        for e in doc["vocab"][: doc["config"]["default_vocab_size"] - n_special]
    }
    enc = tiktoken.Encoding(name="nemo", pat_str=doc["config"]["pattern"], mergeable_ranks=ranks, special_tokens={})
    import llama_cpp

    llm = llama_cpp.Llama(
        str(out), n_ctx=128, n_batch=128, logits_all=True, type_k=0, type_v=0, n_threads=1, verbose=False
    )
    for s in MULTILINGUAL:
        assert llm.tokenize(s.encode(), add_bos=True) == [1] + [n_special + i for i in enc.encode_ordinary(s)], s
    tokens = ([1] + [n_special + i for i in enc.encode_ordinary(" ".join(MULTILINGUAL))])[:48]
    p = NEMO
    ref = meta_logits(
        sd,
        tokens,
        n_heads=p["n_heads"],
        n_kv_heads=p["n_kv_heads"],
        head_dim=p["head_dim"],
        norm_eps=p["norm_eps"],
        rope_theta=p["rope_theta"],
    )
    llm.eval(tokens)
    err = rel_err(np.array(llm.scores[: len(tokens)], dtype=np.float64), ref)
    assert err < 1e-5, err


# ---- 5. model cards, --metadata, --override-kv -----------------------------------------------------

NEMO_CARD = """---
language:
- en
- fr
- de
license: apache-2.0
base_model: mistralai/Mistral-Nemo-Base-2407
tags:
- mistral
- instruct
datasets:
- some-org/some-dataset
---

# Model Card for Mistral-Nemo-Instruct-2407
"""


@pytest.fixture(scope="module")
def carded(tmp_path_factory):
    """A checkpoint named and carded like Mistral's repository (tiny weights, the fixture tokenizer)."""
    tmp = tmp_path_factory.mktemp("card")
    src = write_meta_checkpoint(tmp / "Mistral-Nemo-Instruct-2407", meta_state_dict(seed=2))
    (src / "README.md").write_text(NEMO_CARD)
    return src, tmp


def llama_metadata(path: Path) -> dict:
    """The metadata as llama.cpp read it (llama-cpp-python's Llama.metadata: every key as a string)."""
    import llama_cpp

    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False).metadata


def test_fixture_name_is_unchanged_without_a_model_card():
    conv = plan_conversion(ROOT / "fixtures" / "tiny-llama", outtype="q8_0")
    assert conv.out_path.name == "tiny-llama-1.8M-Q8_0.gguf" and conv.name == "tiny-llama"


@pytest.mark.llamacpp
def test_model_card_fills_general_keys_and_the_file_name(carded, tmp_path, monkeypatch):
    src, _ = carded
    monkeypatch.chdir(tmp_path)
    from gguf.utility import size_label

    conv = plan_conversion(src, outtype="f16")
    label = size_label(conv.plan.n_params, conv.plan.n_params, 0, 0)  # llama.cpp's rounding: "164K"
    # llama.cpp's naming convention: Basename-Size-Finetune-Version-TYPE
    assert conv.out_path == tmp_path / f"Mistral-Nemo-{label}-Instruct-2407-F16.gguf"
    write_gguf(conv.out_path, conv.kvs, conv.plan, progress=False)
    md = llama_metadata(conv.out_path)
    assert md["general.name"] == "Mistral-Nemo-Instruct-2407"  # the card names none: the folder's name
    assert (md["general.basename"], md["general.finetune"], md["general.version"], md["general.size_label"]) == (
        "Mistral-Nemo",
        "Instruct",
        "2407",
        label,
    )
    assert md["general.license"] == "apache-2.0"
    assert md["general.base_model.count"] == "1" and md["general.base_model.0.name"] == "Mistral Nemo Base 2407"
    assert md["general.base_model.0.organization"] == "Mistralai"
    assert md["general.dataset.count"] == "1" and md["general.dataset.0.repo_url"].endswith("some-org/some-dataset")
    tags = read_gguf(conv.out_path).kvs
    assert tags["general.tags"] == ["mistral", "instruct"] and tags["general.languages"] == ["en", "fr", "de"]


def test_metadata_file_overrides_the_card_and_names_the_output(carded, tmp_path, monkeypatch):
    src, _ = carded
    monkeypatch.chdir(tmp_path)
    override = tmp_path / "meta.json"
    override.write_text(
        json.dumps({"general.size_label": "12B", "general.author": "Mistral AI", "general.license": "mit"})
    )
    conv = plan_conversion(src, outtype="q4_K_M", metadata=override)
    assert conv.out_path.name == "Mistral-Nemo-12B-Instruct-2407-Q4_K_M.gguf"
    kv = {k.key: k.value for k in conv.kvs}
    assert (kv["general.author"], kv["general.license"], kv["general.size_label"]) == ("Mistral AI", "mit", "12B")
    override.write_text("[1, 2]")
    with pytest.raises(LlmconvError, match="meta.json: expected a JSON object"):
        plan_conversion(src, metadata=override)
    with pytest.raises(LlmconvError, match="nope.json"):
        plan_conversion(src, metadata=tmp_path / "nope.json")


@pytest.mark.llamacpp
def test_override_kv_in_convert_and_quantize(single_shard, tmp_path, capsys):
    import llama_cpp
    from llmconv.cli import main

    sd, params, _, _ = single_shard
    src = write_meta_checkpoint(tmp_path / "m", sd)
    f32 = tmp_path / "m.gguf"
    llmconv.convert(
        src,
        f32,
        outtype="f32",
        override_kv=[
            "llama.context_length=int:8192",
            "general.name=str:Renamed",
            "test.flag=bool:true",
            "test.scale=float:0.25",
        ],
    )
    types = read_gguf(f32).kv_types
    assert types["llama.context_length"].type.name == "UINT32"
    assert (types["test.flag"].type.name, types["test.scale"].type.name) == ("BOOL", "FLOAT32")
    llm = llama_cpp.Llama(str(f32), n_ctx=64, verbose=False)
    assert llama_cpp.llama_model_n_ctx_train(llm.model) == 8192
    assert (llm.metadata["general.name"], llm.metadata["test.flag"]) == ("Renamed", "true")
    q8 = tmp_path / "q8.gguf"
    llmconv.quantize(f32, q8, outtype="q8_0", override_kv=["general.name=str:Quantized"])
    assert llama_metadata(q8)["general.name"] == "Quantized"
    capsys.readouterr()
    assert main(["convert", str(src), "--override-kv", "llama.context_length=8192"]) == 2
    assert "expected KEY=TYPE:VALUE" in capsys.readouterr().err
    assert main(["convert", str(src), "--override-kv", "llama.context_length=int:-1"]) == 2
    assert "does not fit UINT32" in capsys.readouterr().err


def test_override_keeps_an_existing_keys_number_type():
    from gguf import GGUFValueType as T

    from llmconv.convert.metadata import apply_kv_overrides, parse_override_kv
    from llmconv.formats.gguf_writer import KV

    kvs = [KV("split.tensors.count", 5, T.INT32), KV("x.f64", 0.5, T.FLOAT64)]
    out = apply_kv_overrides(
        kvs, [parse_override_kv(s) for s in ("split.tensors.count=int:-3", "x.f64=float:2.5", "x.new=int:7")]
    )
    assert [(k.key, k.value, k.type) for k in out] == [
        ("split.tensors.count", -3, T.INT32),
        ("x.f64", 2.5, T.FLOAT64),
        ("x.new", 7, T.UINT32),
    ]  # new keys: llama-quantize's types


def test_folder_with_both_mistral_and_hf_layouts(head_dim_twins, tmp_path):
    """Mistral's repositories ship both: the HF one is read by default (with a note), the other with
    --input-format mistral, and both give the same tensors (HF's Q/K un-permuted, Mistral's as stored)."""
    import shutil

    sd, params, meta, hf, tmp = head_dim_twins
    both = tmp_path / "both"
    shutil.copytree(hf, both)
    c = NEMO_LIKE
    mistral_params = {
        "dim": c["dim"],
        "n_layers": 2,
        "head_dim": c["head_dim"],
        "hidden_dim": c["ffn"],
        "n_heads": c["n_heads"],
        "n_kv_heads": c["n_kv_heads"],
        "norm_eps": params["norm_eps"],
        "vocab_size": 512,
        "rope_theta": params["rope_theta"],
    }
    write_mistral_checkpoint(tmp_path / "m", sd, mistral_params, TOKENIZER)
    for f in (tmp_path / "m").iterdir():
        shutil.copy(f, both / f.name)
    as_hf = plan_conversion(both, outtype="f32", outfile=tmp_path / "hf.gguf")
    assert as_hf.source.kind == "hf" and any("--input-format mistral" in n for n in as_hf.plan.notes)
    as_mistral = plan_conversion(both, outtype="f32", outfile=tmp_path / "mi.gguf", input_format="mistral", ctx=4096)
    assert as_mistral.source.kind == "mistral"
    for conv in (as_hf, as_mistral):
        write_gguf(conv.out_path, conv.kvs, conv.plan, progress=False)
    assert tensor_bytes(as_hf.out_path) == tensor_bytes(as_mistral.out_path)
