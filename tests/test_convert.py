"""Issue 2: Meta checkpoint -> GGUF that reads back, merges shards, and that llama.cpp runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, Keys

import llmconv
from llmconv.cli import main

from synth import SENTENCES

ROOT = Path(__file__).resolve().parents[1]
ONE = ROOT / "fixtures" / "tiny-llama"
TWO = ROOT / "fixtures" / "tiny-llama-2shard"


def kv(reader: GGUFReader, key: str):
    f = reader.get_field(key)
    assert f is not None, key
    return f.contents(), f.types[0]


def test_metadata_keys_and_types(converted):
    r = GGUFReader(converted(ONE, "f16"))
    params = json.loads((ONE / "params.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(ONE / "tokenizer.model"))
    U32, F32, STR, ARR, BOOL = (
        GGUFValueType.UINT32,
        GGUFValueType.FLOAT32,
        GGUFValueType.STRING,
        GGUFValueType.ARRAY,
        GGUFValueType.BOOL,
    )
    dim, n_heads = params["dim"], params["n_heads"]
    expect = {
        Keys.General.ARCHITECTURE: ("llama", STR),
        Keys.General.NAME: ("tiny-llama", STR),
        Keys.General.FILE_TYPE: (1, U32),
        Keys.General.QUANTIZATION_VERSION: (2, U32),
        "llama.context_length": (4096, U32),
        "llama.embedding_length": (dim, U32),
        "llama.block_count": (params["n_layers"], U32),
        "llama.feed_forward_length": (768, U32),
        "llama.rope.dimension_count": (dim // n_heads, U32),
        "llama.attention.head_count": (n_heads, U32),
        "llama.attention.head_count_kv": (params["n_kv_heads"], U32),
        "llama.vocab_size": (sp.vocab_size(), U32),
        Keys.Tokenizer.MODEL: ("llama", STR),
        Keys.Tokenizer.BOS_ID: (sp.bos_id(), U32),
        Keys.Tokenizer.EOS_ID: (sp.eos_id(), U32),
        Keys.Tokenizer.UNK_ID: (sp.unk_id(), U32),
        Keys.Tokenizer.ADD_BOS: (True, BOOL),
        Keys.Tokenizer.ADD_EOS: (False, BOOL),
    }
    for key, (value, vtype) in expect.items():
        got, t = kv(r, key)
        assert t == vtype, key
        assert got == value, key
    eps, t = kv(r, "llama.attention.layer_norm_rms_epsilon")
    assert t == F32 and np.float32(eps) == np.float32(params["norm_eps"])
    theta, t = kv(r, "llama.rope.freq_base")
    assert t == F32 and theta == params.get("rope_theta", 10000.0)
    tokens, t = kv(r, Keys.Tokenizer.LIST)
    assert t == ARR and tokens == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    scores, _ = kv(r, Keys.Tokenizer.SCORES)
    assert np.allclose(scores, [sp.get_score(i) for i in range(sp.vocab_size())])
    types, _ = kv(r, Keys.Tokenizer.TOKEN_TYPE)
    assert types[sp.unk_id()] == 2 and types[sp.bos_id()] == 3 and types[sp.eos_id()] == 3
    byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
    assert len(byte_ids) == 256 and all(types[i] == 6 for i in byte_ids)


def test_tensor_names_shapes_types(converted):
    params = json.loads((ONE / "params.json").read_text())
    dim, L, H, KV = params["dim"], params["n_layers"], params["n_heads"], params["n_kv_heads"]
    hd, ffn, V = dim // H, 768, 512
    want = {"token_embd.weight": (V, dim), "output_norm.weight": (dim,), "output.weight": (V, dim)}
    for i in range(L):
        want.update(
            {
                f"blk.{i}.attn_q.weight": (H * hd, dim),
                f"blk.{i}.attn_k.weight": (KV * hd, dim),
                f"blk.{i}.attn_v.weight": (KV * hd, dim),
                f"blk.{i}.attn_output.weight": (dim, H * hd),
                f"blk.{i}.ffn_gate.weight": (ffn, dim),
                f"blk.{i}.ffn_up.weight": (ffn, dim),
                f"blk.{i}.ffn_down.weight": (dim, ffn),
                f"blk.{i}.attn_norm.weight": (dim,),
                f"blk.{i}.ffn_norm.weight": (dim,),
            }
        )
    for outtype, ggml in [
        ("f32", GGMLQuantizationType.F32),
        ("f16", GGMLQuantizationType.F16),
        ("bf16", GGMLQuantizationType.BF16),
    ]:
        r = GGUFReader(converted(ONE, outtype))
        got = {t.name: t for t in r.tensors}
        assert set(got) == set(want)
        for name, shape in want.items():
            t = got[name]
            assert tuple(reversed(t.shape.tolist())) == shape, name
            expect_type = GGMLQuantizationType.F32 if len(shape) == 1 else ggml
            assert t.tensor_type == expect_type, (outtype, name)
            assert t.data_offset % 32 == 0


def test_auto_keeps_source_precision(converted):
    r = GGUFReader(converted(ONE, "auto"))
    assert kv(r, Keys.General.FILE_TYPE)[0] == 32  # MOSTLY_BF16: the fixture is stored in bf16
    assert GGUFReader(converted(ONE, "auto")).get_tensor(0).tensor_type == GGMLQuantizationType.BF16


def test_bf16_passthrough_is_exact(converted):
    import torch

    sd = torch.load(ONE / "consolidated.00.pth", weights_only=True, mmap=True)
    r = GGUFReader(converted(ONE, "bf16"))
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_down.weight")
    src = sd["layers.1.feed_forward.w2.weight"].view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(np.asarray(t.data).view(np.uint16).reshape(src.shape), src)


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_two_shards_give_the_same_bytes(converted, outtype):
    a, b = GGUFReader(converted(ONE, outtype)), GGUFReader(converted(TWO, outtype))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for name in ta:
        assert np.asarray(ta[name].data).tobytes() == np.asarray(tb[name].data).tobytes(), name


def test_default_output_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    llmconv.convert(ONE, outtype="f16")
    files = list(tmp_path.glob("*.gguf"))
    assert len(files) == 1
    assert files[0].name.endswith("-F16.gguf") and files[0].name.lower().startswith("tiny-llama")


def test_dry_run_writes_nothing_and_lists_every_tensor(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["convert", str(TWO), "--outtype", "f16", "--dry-run", "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert not list(tmp_path.glob("*.gguf"))
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["dry_run"] is True and len(plan["tensors"]) == 2 * 9 + 3
    for t in plan["tensors"]:
        assert t["name"] in out
    emb = next(t for t in plan["tensors"] if t["name"] == "token_embd.weight")
    assert len(emb["files"]) == 2 and emb["type"] == "f16" and emb["bytes"] == 512 * 256 * 2
    assert sum(t["bytes"] for t in plan["tensors"]) == plan["nbytes"]


def test_ctx_override(converted):
    r = GGUFReader(converted(ONE, "f16", ctx=1234))
    assert kv(r, "llama.context_length")[0] == 1234


# ---- llama.cpp is the judge ----------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    import llama_cpp as lc

    return lc


def _open(lc, path, n_ctx=256):
    return lc.Llama(
        str(path), n_ctx=n_ctx, logits_all=True, type_k=0, type_v=0, n_threads=2, n_batch=n_ctx, verbose=False
    )


@pytest.mark.llamacpp
def test_llamacpp_tokenizes_like_sentencepiece(converted, llama_cpp):
    sp = spm.SentencePieceProcessor(model_file=str(ONE / "tokenizer.model"))
    llm = llama_cpp.Llama(str(converted(ONE, "f16")), vocab_only=True, verbose=False)
    for s in SENTENCES:
        assert llm.tokenize(s.encode(), add_bos=True) == [sp.bos_id()] + sp.encode(s), s


@pytest.mark.llamacpp
@pytest.mark.parametrize("outtype,bound", [("f32", 1e-4), ("f16", 1e-2), ("bf16", 1e-2)])
def test_llamacpp_logits_match_reference(converted, llama_cpp, outtype, bound):
    from llmconv.verify.reference import reference_logits

    sp = spm.SentencePieceProcessor(model_file=str(ONE / "tokenizer.model"))
    tokens = [sp.bos_id()] + sp.encode(" ".join(SENTENCES))[:100]
    ref = reference_logits(ONE, tokens)
    llm = _open(llama_cpp, converted(ONE, outtype))
    llm.eval(tokens)
    got = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= bound, (outtype, err)
