"""Issue 12, around the tokenizer: Code Llama's fill-in-the-middle tokens for Hugging Face
checkpoints, and chat_template.json (the newer HF layout) carried over."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import llama_cpp
import pytest
from gguf import Keys

import llmconv
from llmconv.formats.gguf_reader import read_gguf
from realtok import _hf_generator, package_path, tiny_params, tiny_state_dict

ROOT = Path(__file__).resolve().parents[1]
# Code Llama's vocabulary: LLaMA 2's 32,000 SentencePiece pieces and 16 more, among them the
# infilling tokens at 32007-32010 (names as in Code Llama's tokenizer; the rest are placeholders).
CODE_LLAMA_ADDED = {32007: "▁<PRE>", 32008: "▁<SUF>", 32009: "▁<MID>", 32010: "▁<EOT>"}


def write_code_llama_hf(path: Path, n_added: int = 16) -> Path:
    """A tiny HF checkpoint with a real 32,000-piece SentencePiece model (Mistral's v1, the same
    size and format as LLaMA 2's) and `n_added` tokens after it in tokenizer_config.json."""
    mk = _hf_generator()
    vocab = 32000 + n_added
    added = {i: (CODE_LLAMA_ADDED.get(i, f"<unused_{i}>"), False) for i in range(32000, vocab)}
    params = tiny_params(vocab, rope_theta=1e6)
    return mk.write_hf_checkpoint(
        path,
        tiny_state_dict(vocab),
        params,
        tokenizer_config=mk.sp_tokenizer_config(added),
        tokenizer=package_path("mistral_common", "data", "tokenizer.model.v1"),
        config={"rope_theta": 1e6, "torch_dtype": "float16"},
    )


def convert(ckpt: Path, out: Path) -> dict:
    llmconv.convert(ckpt, out, outtype="f16")
    return read_gguf(out).kvs


def test_code_llama_fim_tokens(tmp_path):
    t = Keys.Tokenizer
    kv = convert(write_code_llama_hf(tmp_path / "codellama"), tmp_path / "cl.gguf")
    assert [kv.get(k) for k in (t.PREFIX_ID, t.SUFFIX_ID, t.MIDDLE_ID, t.EOT_ID)] == [32007, 32008, 32009, 32010]
    assert [kv[t.LIST][i] for i in range(32007, 32011)] == list(CODE_LLAMA_ADDED.values())
    # llama.cpp reads them as its infilling and end-of-turn tokens
    llm = llama_cpp.Llama(str(tmp_path / "cl.gguf"), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    assert [
        llama_cpp.llama_vocab_fim_pre(vocab),
        llama_cpp.llama_vocab_fim_suf(vocab),
        llama_cpp.llama_vocab_fim_mid(vocab),
        llama_cpp.llama_vocab_eot(vocab),
    ] == [32007, 32008, 32009, 32010]


def test_no_fim_tokens_for_other_vocabulary_sizes(tmp_path):
    t = Keys.Tokenizer
    kv = convert(write_code_llama_hf(tmp_path / "other", n_added=17), tmp_path / "o.gguf")
    assert not {t.PREFIX_ID, t.SUFFIX_ID, t.MIDDLE_ID, t.EOT_ID} & set(kv)


@pytest.mark.parametrize("in_config", [False, True])
def test_chat_template_json(tmp_path, in_config):
    """chat_template.json {"chat_template": ...} beside tokenizer_config.json is used when the
    latter has none; a template in tokenizer_config.json still wins (as in transformers)."""
    ckpt = tmp_path / "hf"
    shutil.copytree(ROOT / "fixtures" / "hf-tiny-llama", ckpt)
    from_json = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (ckpt / "chat_template.json").write_text(json.dumps({"chat_template": from_json}))
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    if in_config:
        cfg["chat_template"] = "{{ messages[0]['content'] }}"
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    kv = convert(ckpt, tmp_path / "out.gguf")
    assert kv[Keys.Tokenizer.CHAT_TEMPLATE] == (cfg["chat_template"] if in_config else from_json)


def test_added_tokens_typed_as_llamacpps_converter_does(tmp_path):
    """An added token not marked special but named like one (<|...|>) is a control token; a
    user-defined one has SentencePiece's "▁" written as a space."""
    from gguf import TokenType

    from llmconv.convert.bpe import load_tokenizer_json

    src = ROOT / "fixtures" / "llama3-bpe" / "tokenizer.json"
    tj = json.loads(src.read_text(encoding="utf-8"))
    n = max(t["id"] for t in tj["added_tokens"]) + 1
    extra = {n: "<|tool_start|>", n + 1: "▁<FILL>", n + 2: "plain"}
    tj["added_tokens"] += [
        {
            "id": i,
            "content": c,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": False,
        }
        for i, c in extra.items()
    ]
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    v = load_tokenizer_json(p)
    assert v.tokens[n:] == [b"<|tool_start|>", b" <FILL>", b"plain"]
    assert v.token_types[n:] == [int(TokenType.CONTROL), int(TokenType.USER_DEFINED), int(TokenType.USER_DEFINED)]
