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
from gguf import GGUFReader

from llmconv.convert.execute import write_gguf
from llmconv.convert.pipeline import plan_conversion
from llmconv.errors import LlmconvError
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
    conv = plan_conversion(src, outtype=outtype, outfile=out, **kw)
    write_gguf(out, conv.kvs, conv.plan, progress=False)
    return out


def fields(path: Path) -> dict:
    r = GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: np.array(t.data).tobytes() for t in GGUFReader(str(path)).tensors}


def sp_tokens(n: int, model: Path = TOKENIZER) -> list[int]:
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return ([sp.bos_id()] + sp.encode(" ".join(SENTENCES)))[:n]


def llamacpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    import llama_cpp
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_batch=128, logits_all=True, type_k=0, type_v=0, n_threads=1,
                          verbose=False)
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
    sd = meta_state_dict(dim=c["dim"], n_heads=c["n_heads"], n_kv_heads=c["n_kv_heads"], head_dim=c["head_dim"],
                         ffn=c["ffn"], seed=5, dtype=torch.float32)
    params = {"n_heads": c["n_heads"], "n_kv_heads": c["n_kv_heads"], "head_dim": c["head_dim"], "vocab_size": 512}
    meta = write_meta_checkpoint(tmp / "meta", sd, params=params)
    full = json.loads((meta / "params.json").read_text())
    hf = mk.write_hf_checkpoint(tmp / "hf", sd, full, config={"head_dim": c["head_dim"],
                                                            "max_position_embeddings": 4096})
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
    ref = meta_logits(sd, tokens, n_heads=4, n_kv_heads=2, head_dim=32, norm_eps=params["norm_eps"],
                      rope_theta=params["rope_theta"])
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
        elif k.endswith(("attention.wo.weight", "feed_forward.w2.weight")) or \
                (k == "tok_embeddings.weight" and not vocab_axis_embedding):
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
    sd = meta_state_dict(seed=3)               # dim 64, ffn 192, vocab 512
    src = write_meta_checkpoint(tmp / "one", sd)
    params = json.loads((src / "params.json").read_text())
    return sd, params, tensor_bytes(convert(src, tmp / "one.gguf", "f16")), tmp


@pytest.mark.parametrize("n,vocab_axis", [(3, False), (3, True), (5, True)])
def test_uneven_shards_join_to_the_same_tensors(single_shard, tmp_path, n, vocab_axis):
    sd, params, want, _ = single_shard
    shards = tensor_split_shards(sd, n, vocab_axis)
    sizes = [s["tok_embeddings.weight"].shape for s in shards]
    assert len(set(sizes)) > 1, sizes                   # really uneven (512 rows / 64 columns over n)
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
    with pytest.raises(LlmconvError, match=r"tok_embeddings.weight.*join to 511 along dim 0 but params.json implies 512"):
        plan_conversion(src)


def test_uneven_shards_replicated_norms_must_be_equal(single_shard, tmp_path):
    sd, params, _, _ = single_shard
    shards = tensor_split_shards(sd, 3)
    shards[1]["layers.1.ffn_norm.weight"] = shards[1]["layers.1.ffn_norm.weight"] * 2
    src = write_shards(tmp_path / "norm", shards, params)
    with pytest.raises(LlmconvError, match=r"consolidated.01.pth.*layers.1.ffn_norm.weight.*replicated tensor differs"):
        plan_conversion(src)
