"""Issue 6: byte-level BPE vocabularies (HF tokenizer.json and Meta's tiktoken tokenizer.model)."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import pytest
import tiktoken
from gguf import TokenType
from tokenizers import Tokenizer, pre_tokenizers

from llmconv.convert import bpe, tiktoken_bpe
from llmconv.convert.metadata import vocab_kvs
from llmconv.errors import LlmconvError

ROOT = Path(__file__).resolve().parents[1]
HF_DIR = ROOT / "fixtures" / "llama3-bpe"
META_DIR = ROOT / "fixtures" / "llama3-tiny"
N_BPE = 1000  # regular tokens in the fixture vocabulary; Meta's 256 specials follow

TEXT = (
    "Hello, world! 3.14159 and 1234567 — naïve café, Ünïcödé; 東京タワー, Привет мир, مرحبا, नमस्ते "
    "🙂👍🏽 Ελληνικά\n\ndef f(x):\n    return x ** 2  # it's code\n\t\tdon't  stop   'LL 'Re I'M\r\n"
    '   trailing spaces   \n\n\n$100,000.00 (approx.) <tag attr="v"/> a_b-c.d'
)


def tokenizer_json() -> dict:
    return json.loads((HF_DIR / "tokenizer.json").read_text(encoding="utf-8"))


def tokenizer_config() -> dict:
    return json.loads((HF_DIR / "tokenizer_config.json").read_text())


def write_json(tmp_path: Path, tj: dict) -> Path:
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    return p


def read_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken's format read directly (what tiktoken.load.load_tiktoken_bpe does, minus the download)."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


# ---- GPT-2 byte alphabet ----------------------------------------------------------------------


def test_byte_alphabet_is_gpt2s():
    table = bpe.byte_to_char()
    assert set(table) == set(pre_tokenizers.ByteLevel.alphabet())  # the same 256 characters
    assert (table[ord(" ")], table[ord("\n")], table[ord("\t")], table[0]) == ("Ġ", "Ċ", "ĉ", "Ā")
    assert all(table[b] == chr(b) for b in range(ord("!"), ord("~") + 1))
    every = bytes(range(256))
    assert bpe.token_to_bytes(bpe.bytes_to_token(every)) == every
    assert bpe.token_to_bytes("a b") is None  # a raw space is not in the alphabet


def test_byte_alphabet_matches_tokenizers_encoding():
    """The `tokenizers` ByteLevel step (which encodes text as UTF-8) maps every byte as we do."""
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    text = "".join(chr(c) for c in range(128)) + "é東🙂\u00a0\u0100"
    ((got, _),) = bl.pre_tokenize_str(text)
    assert got == bpe.bytes_to_token(text.encode())


# ---- tokenizer.json ---------------------------------------------------------------------------


def test_tokenizer_json_vocab():
    tok = Tokenizer.from_file(str(HF_DIR / "tokenizer.json"))
    v = bpe.load_tokenizer_json(HF_DIR / "tokenizer.json", tokenizer_config())
    assert v.model == "gpt2" and v.pre == "llama-bpe"
    assert len(v) == tok.get_vocab_size(with_added_tokens=True) == N_BPE + 256
    assert [t.decode() for t in v.tokens] == [tok.id_to_token(i) for i in range(len(v))]
    added = {i: a for i, a in tok.get_added_tokens_decoder().items()}
    assert v.token_types == [int(TokenType.CONTROL) if i in added else int(TokenType.NORMAL) for i in range(len(v))]
    assert v.merges == [" ".join(m) for m in tokenizer_json()["model"]["merges"]]
    assert v.scores == []
    assert (v.bos_id, v.eos_id, v.eot_id) == tuple(
        tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")
    )
    assert (v.add_bos, v.add_eos) == (True, False)


def test_bos_from_post_processor_without_config():
    v = bpe.load_tokenizer_json(HF_DIR / "tokenizer.json", None)
    assert v.bos_id == N_BPE and v.add_bos and v.eos_id is None


def test_both_merge_formats_give_the_same_vocab(tmp_path):
    tj = tokenizer_json()
    assert all(isinstance(m, list) for m in tj["model"]["merges"])  # the fixture holds pairs
    as_strings = copy.deepcopy(tj)
    as_strings["model"]["merges"] = [" ".join(m) for m in tj["model"]["merges"]]
    p = write_json(tmp_path, as_strings)
    # `tokenizers` reads the string form as the same tokenizer
    assert (
        Tokenizer.from_file(str(p)).encode(TEXT).ids
        == Tokenizer.from_file(str(HF_DIR / "tokenizer.json")).encode(TEXT).ids
    )
    a = bpe.load_tokenizer_json(HF_DIR / "tokenizer.json", tokenizer_config())
    b = bpe.load_tokenizer_json(p, tokenizer_config())
    assert vocab_kvs(a) == vocab_kvs(b)


@pytest.mark.parametrize("bad", [["a", "b", "c"], ["a b", "c"], "a b c", 7, ["", "x"]])
def test_malformed_merge_refused(tmp_path, bad):
    tj = tokenizer_json()
    tj["model"]["merges"][3] = bad
    with pytest.raises(LlmconvError, match="merge 3"):
        bpe.load_tokenizer_json(write_json(tmp_path, tj))


# ---- pre-tokenizer detection --------------------------------------------------------------------


def _with_pre(pre_tokenizer, normalizer=None) -> dict:
    tj = tokenizer_json()
    tj["pre_tokenizer"] = pre_tokenizer
    tj["normalizer"] = normalizer
    return tj


def _split(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def test_pre_detected_from_structure():
    llama3 = _with_pre({"type": "Sequence", "pretokenizers": [_split(bpe.LLAMA3_PATTERN), BYTE_LEVEL]})
    assert bpe.detect_pre(llama3) == "llama-bpe"
    gpt2 = _with_pre({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True})
    assert bpe.detect_pre(gpt2) == "gpt-2"


@pytest.mark.parametrize(
    "pre,normalizer",
    [
        ({"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), BYTE_LEVEL]}, None),  # digits one by one
        ({"type": "Sequence", "pretokenizers": [{**_split(bpe.LLAMA3_PATTERN), "invert": True}, BYTE_LEVEL]}, None),
        (
            {
                "type": "Sequence",
                "pretokenizers": [_split(bpe.LLAMA3_PATTERN), {**BYTE_LEVEL, "add_prefix_space": True}],
            },
            None,
        ),
        ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}, None),
        ({"type": "Sequence", "pretokenizers": [_split(bpe.LLAMA3_PATTERN), BYTE_LEVEL]}, {"type": "NFC"}),
        (BYTE_LEVEL, None),  # no split at all
    ],
)
def test_unknown_pre_tokenizer_refused(tmp_path, pre, normalizer):
    p = write_json(tmp_path, _with_pre(pre, normalizer))
    with pytest.raises(LlmconvError, match="--pre") as e:
        bpe.load_tokenizer_json(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    # the user's --pre is taken as given
    assert bpe.load_tokenizer_json(p, pre="llama-bpe").pre == "llama-bpe"


def test_not_byte_level_bpe_refused(tmp_path):
    tj = _with_pre({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False})
    tj["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    with pytest.raises(LlmconvError, match="not byte-level"):
        bpe.load_tokenizer_json(write_json(tmp_path, tj))
    tj = tokenizer_json()
    tj["model"] = {"type": "WordPiece", "vocab": {"a": 0}}
    with pytest.raises(LlmconvError, match="not BPE"):
        bpe.load_tokenizer_json(write_json(tmp_path, tj))


# ---- Meta tiktoken ------------------------------------------------------------------------------


def test_tiktoken_and_tokenizer_json_give_identical_metadata():
    params = json.loads((META_DIR / "params.json").read_text())
    meta = tiktoken_bpe.load_meta_tiktoken(META_DIR / "tokenizer.model", params)
    hf = bpe.load_tokenizer_json(HF_DIR / "tokenizer.json", tokenizer_config())
    assert vocab_kvs(meta) == vocab_kvs(hf)
    # every split of a token into two tokens is a merge (as in LLaMA 3's official tokenizer.json)
    assert len(meta.merges) > N_BPE - 256


def test_tiktoken_detection():
    assert tiktoken_bpe.is_tiktoken_file(META_DIR / "tokenizer.model")
    assert not tiktoken_bpe.is_tiktoken_file(ROOT / "fixtures" / "tokenizer.model")  # SentencePiece protobuf


def test_merges_rebuilt_from_ranks_tokenize_like_tiktoken():
    """The rebuilt merges, applied by merge rank (as llama.cpp and `tokenizers` do), split text
    exactly as tiktoken's rank-based BPE does on the same file."""
    ranks = read_ranks(META_DIR / "tokenizer.model")
    enc = tiktoken.Encoding(name="fixture", pat_str=bpe.LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})
    tj = tokenizer_json()
    tj["model"]["merges"] = tiktoken_bpe.merges_from_ranks(ranks)
    tok = Tokenizer.from_str(json.dumps(tj))
    ids = enc.encode(TEXT)
    assert tok.encode(TEXT, add_special_tokens=False).ids == ids
    english = "The hacker culture is actually a loosely networked collection of subcultures."
    assert len(enc.encode(english)) < len(english) // 3  # merging happened
    assert enc.decode(ids) == TEXT


@pytest.mark.parametrize(
    "version,expected",
    [
        # Meta's published lists: llama3 repo tokenizer.py (3.0), llama-models llama3/tokenizer.py (3.1+)
        (
            "3.0",
            {
                0: "<|begin_of_text|>",
                1: "<|end_of_text|>",
                4: "<|reserved_special_token_2|>",
                6: "<|start_header_id|>",
                7: "<|end_header_id|>",
                8: "<|reserved_special_token_4|>",
                9: "<|eot_id|>",
                10: "<|reserved_special_token_5|>",
                255: "<|reserved_special_token_250|>",
            },
        ),
        (
            "3.1",
            {
                0: "<|begin_of_text|>",
                4: "<|finetune_right_pad_id|>",
                5: "<|reserved_special_token_2|>",
                8: "<|eom_id|>",
                9: "<|eot_id|>",
                10: "<|python_tag|>",
                11: "<|reserved_special_token_3|>",
                255: "<|reserved_special_token_247|>",
            },
        ),
    ],
)
def test_meta_special_token_names(version, expected):
    names = tiktoken_bpe.meta_special_tokens(version)
    assert len(names) == len(set(names)) == 256
    assert {k: names[k] for k in expected} == expected


def test_special_names_chosen_from_params(tmp_path):
    v30 = tiktoken_bpe.load_meta_tiktoken(META_DIR / "tokenizer.model", {"rope_theta": 500000.0})
    v31 = tiktoken_bpe.load_meta_tiktoken(
        META_DIR / "tokenizer.model", {"rope_theta": 500000.0, "use_scaled_rope": True}
    )
    assert v30.tokens[N_BPE + 4] == b"<|reserved_special_token_2|>"
    assert v31.tokens[N_BPE + 4] == b"<|finetune_right_pad_id|>"
    assert v30.eot_id == v31.eot_id == N_BPE + 9
    assert v30.token_types[N_BPE:] == [int(TokenType.CONTROL)] * 256
    assert v30.tokens[:N_BPE] == v31.tokens[:N_BPE]


def _tiktoken_lines(ranks: dict[bytes, int]) -> str:
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())


def test_bad_tiktoken_files_refused(tmp_path):
    ranks = read_ranks(META_DIR / "tokenizer.model")
    p = tmp_path / "tokenizer.model"
    cases = {
        "without gaps": {t: (r + 1 if r >= 500 else r) for t, r in ranks.items()},
        "has no token": {t: k for k, t in enumerate(t for t in sorted(ranks, key=ranks.get) if t != b"A")},
    }
    for message, bad in cases.items():
        p.write_text(_tiktoken_lines(bad))
        with pytest.raises(LlmconvError, match=message):
            tiktoken_bpe.read_tiktoken_ranks(p)
    p.write_text(_tiktoken_lines(ranks) + "not-base64! 12\n")
    with pytest.raises(LlmconvError, match=f"line {len(ranks) + 1}"):
        tiktoken_bpe.read_tiktoken_ranks(p)
    p.write_text(_tiktoken_lines(ranks) + f"{base64.b64encode(b'zz-unique').decode()} 3\n")
    with pytest.raises(LlmconvError, match="duplicate"):
        tiktoken_bpe.read_tiktoken_ranks(p)


def test_unreachable_token_refused(tmp_path):
    """A multi-byte token whose pieces are not lower-ranked tokens cannot come from BPE merges."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"xyz"] = 256  # neither "xy" nor "yz" exists
    with pytest.raises(LlmconvError, match="cannot be built"):
        tiktoken_bpe.merges_from_ranks(ranks)
    ranks = {bytes([b]): b for b in range(256)} | {b"xy": 256, b"xyz": 257}
    assert tiktoken_bpe.merges_from_ranks(ranks) == ["x y", "xy z"]
