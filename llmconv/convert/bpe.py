"""Byte-level BPE tokenizers -> GGUF vocabulary (tokenizer.ggml.model = "gpt2").

Two sources hold the same kind of vocabulary:
  - Hugging Face `tokenizer.json` with a BPE model and a ByteLevel pre-tokenizer/decoder
    (LLaMA 3 on the hub, and most byte-level BPE models). Tokens are already written in
    GPT-2's printable-byte alphabet; merges are either "a b" strings or [a, b] pairs.
  - Meta's original LLaMA 3 `tokenizer.model`: tiktoken text, one `base64(token bytes) rank`
    per line, rank = token id. It has no merges: they are rebuilt from the ranks, and Meta's
    256 special tokens, which live in their Python code and not in the file, are appended.

llama.cpp stores every token in GPT-2's alphabet (each byte mapped to one printable
character, e.g. space -> "Ġ") and merges as "left right" strings, and picks its
pre-tokenizer regex from `tokenizer.ggml.pre`. Both sources end up as the same Vocab.
"""
from __future__ import annotations

import base64
import binascii
import gc
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from gguf import TokenType

from ..errors import LlmconvError, load_json
from .pretok import LLAMA3_PATTERN, _flatten, detect_pre
from .tokenizer import Vocab

__all__ = ["LLAMA3_PATTERN", "detect_pre"]     # re-exported: verify and the tests use them from here

# Meta's special tokens follow the 128000 (or, for small test vocabularies, n) ranks of the file.
N_META_SPECIAL = 256


def meta_special_tokens(version: str) -> list[str]:
    """The 256 names Meta's tokenizer.py gives ids n..n+255.
    LLaMA 3.0 (llama3 repo): begin/end of text, header ids and <|eot_id|>; everything else reserved_N.
    LLaMA 3.1+ (llama-models repo, also 3.2/3.3): adds <|finetune_right_pad_id|>, <|eom_id|> and
    <|python_tag|> in slots 3.0 had reserved, so the reserved numbering shifts."""
    if version == "3.0":
        head = ["<|begin_of_text|>", "<|end_of_text|>",
                "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                "<|start_header_id|>", "<|end_header_id|>",
                "<|reserved_special_token_4|>", "<|eot_id|>"]
        first_reserved = 5
    elif version == "3.1":
        head = ["<|begin_of_text|>", "<|end_of_text|>",
                "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                "<|start_header_id|>", "<|end_header_id|>",
                "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        first_reserved = 3
    else:
        raise ValueError(f"unknown LLaMA 3 special-token version {version!r}")
    rest = [f"<|reserved_special_token_{first_reserved + i}|>" for i in range(N_META_SPECIAL - len(head))]
    return head + rest


def meta_special_version(params: dict) -> str:
    """Which naming a Meta checkpoint uses. params.json does not name the release, but 3.1 and
    every later text model set `use_scaled_rope`, and 3.0 does not."""
    return "3.1" if params.get("use_scaled_rope") else "3.0"


# ---- GPT-2 byte alphabet ------------------------------------------------------------------

@lru_cache(maxsize=1)
def byte_to_char() -> tuple[str, ...]:
    """GPT-2's map from each byte to one printable character: printable Latin-1 bytes map to
    themselves, the other 68 to U+0100 onwards in byte order (space -> 'Ġ', newline -> 'Ċ')."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return tuple(out)


@lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in enumerate(byte_to_char())}


def bytes_to_token(data: bytes) -> str:
    table = byte_to_char()
    return "".join(table[b] for b in data)


def token_to_bytes(text: str) -> bytes | None:
    """Inverse of bytes_to_token; None if `text` has a character outside the alphabet."""
    table = char_to_byte()
    try:
        return bytes(table[c] for c in text)
    except KeyError:
        return None


# ---- Hugging Face tokenizer.json ----------------------------------------------------------

def load_tokenizer_json(path: str | Path, tokenizer_config: dict | None = None, pre: str | None = None) -> Vocab:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json contents) as a "gpt2" Vocab.

    `pre` overrides the detected tokenizer.ggml.pre (the --pre option). Special token ids and
    add_bos/add_eos come from tokenizer_config when it names them, else from the post-processor.
    """
    path = Path(path)
    tj = _read_json(path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise LlmconvError(f"tokenizer model type {model.get('type')!r} is not BPE", file=path)
    if not _is_byte_level(tj):
        raise LlmconvError("BPE tokenizer is not byte-level (no ByteLevel pre-tokenizer or decoder); "
                           "for SentencePiece-style models convert with tokenizer.model", file=path)
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise LlmconvError("model.vocab is missing or empty", file=path)

    added = tj.get("added_tokens") or []
    by_id: dict[int, tuple[str, int]] = {}
    for text, i in vocab.items():
        _check_id(i, path, text)
        by_id[i] = (text, int(TokenType.NORMAL))
    for tok in added:
        i, text = tok.get("id"), tok.get("content")
        _check_id(i, path, text)
        if not isinstance(text, str):
            raise LlmconvError(f"added token {i} has no content", file=path)
        if tok.get("special") or looks_special(text):
            by_id[i] = (text, int(TokenType.CONTROL))
        else:                           # llama.cpp's converter writes a user-defined "▁" as a space
            by_id[i] = (text.replace("\u2581", " "), int(TokenType.USER_DEFINED))
    n = max(by_id) + 1
    tokens, types = [], []
    for i in range(n):
        # ids the file skips become unused placeholders, as llama.cpp's converter writes them
        text, ttype = by_id.get(i, (f"[PAD{i}]", int(TokenType.UNUSED)))
        tokens.append(text.encode("utf-8"))
        types.append(ttype)

    merges = normalize_merges(model.get("merges") or [], path)
    pre_name = pre if pre is not None else detect_pre(tj, path)
    text_to_id = {t: i for i, (t, _) in by_id.items()}
    cfg = tokenizer_config or {}
    bos = _special_id(cfg.get("bos_token"), text_to_id, path, "bos_token")
    eos = _special_id(cfg.get("eos_token"), text_to_id, path, "eos_token")
    unk = _special_id(cfg.get("unk_token"), text_to_id, path, "unk_token")
    pad = _special_id(cfg.get("pad_token"), text_to_id, path, "pad_token")
    template = _post_processor_specials(tj.get("post_processor"), text_to_id)
    if bos is None and template["bos"] is not None:
        bos = template["bos"]
    add_bos = cfg.get("add_bos_token")
    add_bos = bool(add_bos) if add_bos is not None else template["bos"] is not None
    add_eos = cfg.get("add_eos_token")
    add_eos = bool(add_eos) if add_eos is not None else template["eos"] is not None
    eot = text_to_id.get("<|eot_id|>")
    return Vocab("gpt2", tokens, [], types, bos_id=bos, eos_id=eos, unk_id=unk, pad_id=pad,
                 add_bos=add_bos, add_eos=add_eos, merges=merges, pre=pre_name, eot_id=eot, source=path)


def looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter makes control tokens even when tokenizer.json does not
    mark them special (some models forget to): <|...|>, <｜...｜>, <unused...>, and a few names."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def normalize_merges(merges: list, path: Path | None = None) -> list[str]:
    """Merges as llama.cpp stores them, "left right", from either tokenizer.json format:
    the older "left right" strings or the newer [left, right] pairs."""
    out = []
    for k, m in enumerate(merges):
        if isinstance(m, str):
            parts = m.split(" ")
        elif isinstance(m, (list, tuple)):
            parts = list(m)
        else:
            raise LlmconvError(f"merge {k} is a {type(m).__name__}, expected a string or a pair", file=path)
        if len(parts) != 2 or not all(isinstance(p, str) and p and " " not in p for p in parts):
            # a byte-level token never holds a space (it is 'Ġ'), so "a b" is unambiguous
            raise LlmconvError(f"merge {k} ({m!r}) is not two tokens without spaces", file=path)
        out.append(f"{parts[0]} {parts[1]}")
    return out


def _is_byte_level(tj: dict) -> bool:
    pre_steps = _flatten(tj.get("pre_tokenizer"))
    decoder = tj.get("decoder") or {}
    dec_steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(s.get("type") == "ByteLevel" for s in pre_steps + dec_steps)


def _check_id(i, path: Path, text) -> None:
    if not isinstance(i, int) or isinstance(i, bool) or i < 0:
        raise LlmconvError(f"token {text!r} has invalid id {i!r}", file=path)


def _special_id(value, text_to_id: dict, path: Path, what: str) -> int | None:
    """tokenizer_config.json writes a special token as its text or as {"content": text}."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None:
        return None
    if not isinstance(value, str) or value not in text_to_id:
        raise LlmconvError(f"{what} {value!r} is not in the vocabulary", file=path)
    return text_to_id[value]


def _post_processor_specials(pp: dict | None, text_to_id: dict) -> dict:
    """bos/eos the TemplateProcessing post-processor puts around a single sequence."""
    found = {"bos": None, "eos": None}
    steps = (pp or {}).get("processors", [pp]) if (pp or {}).get("type") == "Sequence" else [pp]
    for p in steps:
        if not p or p.get("type") != "TemplateProcessing":
            continue
        single = p.get("single") or []
        seq_at = next((k for k, piece in enumerate(single) if "Sequence" in piece), None)
        if seq_at is None:
            continue
        for k, piece in enumerate(single):
            if "SpecialToken" in piece:
                text = piece["SpecialToken"].get("id")
                if text in text_to_id:
                    found["bos" if k < seq_at else "eos"] = text_to_id[text]
    return found


def _read_json(path: Path):
    if not path.is_file():
        raise LlmconvError("tokenizer.json is missing", file=path)
    return load_json(path)


# ---- Meta tiktoken tokenizer.model --------------------------------------------------------

def is_tiktoken_file(path: Path) -> bool:
    """True if the file's first line is `base64 rank` text (a SentencePiece model is protobuf)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return False
    parts = first.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Token bytes -> rank. Ranks must be exactly 0..n-1 and tokens unique: rank is the token id."""
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise LlmconvError(f"cannot read: {e}", file=path) from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (binascii.Error, ValueError):
            raise LlmconvError(f"line {lineno}: expected `base64 rank`", file=path) from None
        if token in ranks or rank in seen:
            raise LlmconvError(f"line {lineno}: duplicate token or rank {rank}", file=path)
        ranks[token] = rank
        seen.add(rank)
    if not ranks:
        raise LlmconvError("empty tiktoken file", file=path)
    if seen != set(range(len(ranks))):
        raise LlmconvError(f"ranks are not 0..{len(ranks) - 1} without gaps", file=path)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise LlmconvError(f"byte 0x{missing[0]:02x} has no token: not a byte-level BPE vocabulary", file=path)
    return ranks


# A vocabulary whose merge list would be larger than this is refused: llama.cpp keeps every merge
# in memory, and only a hostile file (thousands of long tokens with many splits each) gets near it.
MAX_MERGE_TEXT = 256 << 20


@contextmanager
def _gc_paused():
    """The merge builder allocates a few hundred thousand small lists; each allocation burst
    would start a cyclic-GC pass over every live object (a parsed 15 MB tekken.json is millions),
    which made it several times slower. Nothing here forms reference cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def token_prefixes(tokens: list[bytes]) -> list[list[int]]:
    """For each token, the ids of the other tokens that are proper prefixes of it, shortest first.

    Sorted byte strings put every string right after the strings that are its prefixes or share
    them; walking them in order with a stack of "open" prefixes gives each token its prefix chain
    in time linear in the total length (plus the sort), where testing every prefix of every
    token would be quadratic in the token length (and cubic for a file of long tokens)."""
    out: list[list[int]] = [[] for _ in tokens]
    stack: list[int] = []
    for i in sorted(range(len(tokens)), key=tokens.__getitem__):
        t = tokens[i]
        while stack and not t.startswith(tokens[stack[-1]]):
            stack.pop()
        out[i] = stack.copy()
        stack.append(i)
    return out


def merges_from_ranks(ranks: dict[bytes, int], path: Path | None = None, first_rank: int = 0) -> list[str]:
    """The merges Hugging Face's TikTokenConverter writes into tokenizer.json (and llama.cpp's
    converter for Mistral's Tekken files): for every multi-byte token, in rank order, each split
    (left, right) whose two parts are both tokens, ordered by (rank of left, rank of right).

    Ranks must be 0..n-1 (rank = token id). Tokens ranked below `first_rank` get no merges
    (llama.cpp starts Tekken's at 256, past the single bytes). A multi-byte token with no
    split at all cannot be produced by BPE and is refused."""
    with _gc_paused():
        return _merges_from_ranks(ranks, path, first_rank)


def _merges_from_ranks(ranks: dict[bytes, int], path: Path | None, first_rank: int) -> list[str]:
    by_rank = sorted(ranks, key=ranks.__getitem__)
    prefixes = token_prefixes(by_rank)
    suffixes = token_prefixes([t[::-1] for t in by_rank])
    splits_of: list[list[tuple[int, int]]] = [[] for _ in by_rank]
    text_size = 0
    for r in range(first_rank, len(by_rank)):
        n = len(by_rank[r])
        if n < 2:
            continue
        # split position -> id of the suffix starting there
        right_at = {n - len(by_rank[s]): s for s in suffixes[r]}
        pairs = sorted((p, right_at[len(by_rank[p])]) for p in prefixes[r] if len(by_rank[p]) in right_at)
        if not pairs:
            raise LlmconvError(f"token {by_rank[r]!r} (rank {r}) cannot be built by joining two "
                               "tokens: not a BPE vocabulary", file=path)
        splits_of[r] = pairs
        text_size += len(pairs) * (2 * n + 1)
        if text_size > MAX_MERGE_TEXT:
            raise LlmconvError(f"the merges up to token rank {r} already exceed {MAX_MERGE_TEXT >> 20} MiB: "
                               "too many long tokens that split many ways", file=path)
    names = [bytes_to_token(t) for t in by_rank]
    return [f"{names[a]} {names[b]}" for pairs in splits_of for a, b in pairs]


def load_meta_tiktoken(path: str | Path, params: dict | None = None, special_version: str | None = None) -> Vocab:
    """Meta's LLaMA 3 tokenizer.model (+ params.json contents) as a "gpt2" Vocab with Meta's
    256 special tokens appended. `special_version` ("3.0"/"3.1") overrides the choice from params."""
    path = Path(path)
    ranks = read_tiktoken_ranks(path)
    n = len(ranks)
    by_rank = sorted(ranks, key=ranks.__getitem__)
    version = special_version or meta_special_version(params or {})
    specials = meta_special_tokens(version)
    tokens = [bytes_to_token(t).encode("utf-8") for t in by_rank] + [s.encode("utf-8") for s in specials]
    types = [int(TokenType.NORMAL)] * n + [int(TokenType.CONTROL)] * len(specials)
    sid = {s: n + k for k, s in enumerate(specials)}
    return Vocab("gpt2", tokens, [], types, bos_id=sid["<|begin_of_text|>"], eos_id=sid["<|end_of_text|>"],
                 add_bos=True, add_eos=False, merges=merges_from_ranks(ranks, path), pre="llama-bpe",
                 eot_id=sid["<|eot_id|>"], source=path)
