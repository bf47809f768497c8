"""tiktoken-style byte-level BPE vocabularies, which list token bytes and ranks but no merges:
Meta's LLaMA 3 tokenizer.model (`base64(token bytes) rank` per line, rank = token id; Meta's 256
special tokens live in their Python code and are appended here) as a Vocab, and the merges
rebuilt from the ranks, as Hugging Face's TikTokenConverter and llama.cpp's converter do (also
for Mistral's Tekken files, tekken.py)."""

from __future__ import annotations

import base64
import binascii
import gc
from contextlib import contextmanager
from pathlib import Path

from gguf import TokenType

from ..errors import LlmconvError
from .bpe import bytes_to_token
from .tokenizer import Vocab

# Meta's special tokens follow the 128000 (or, for small test vocabularies, n) ranks of the file.
N_META_SPECIAL = 256


def meta_special_tokens(version: str) -> list[str]:
    """The 256 names Meta's tokenizer.py gives ids n..n+255.
    LLaMA 3.0 (llama3 repo): begin/end of text, header ids and <|eot_id|>; everything else reserved_N.
    LLaMA 3.1+ (llama-models repo, also 3.2/3.3): adds <|finetune_right_pad_id|>, <|eom_id|> and
    <|python_tag|> in slots 3.0 had reserved, so the reserved numbering shifts."""
    if version == "3.0":
        head = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|reserved_special_token_2|>",
            "<|reserved_special_token_3|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|reserved_special_token_4|>",
            "<|eot_id|>",
        ]
        first_reserved = 5
    elif version == "3.1":
        head = [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>",
            "<|finetune_right_pad_id|>",
            "<|reserved_special_token_2|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eom_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
        ]
        first_reserved = 3
    else:
        raise ValueError(f"unknown LLaMA 3 special-token version {version!r}")
    rest = [f"<|reserved_special_token_{first_reserved + i}|>" for i in range(N_META_SPECIAL - len(head))]
    return head + rest


def meta_special_version(params: dict) -> str:
    """Which naming a Meta checkpoint uses. params.json does not name the release, but 3.1 and
    every later text model set `use_scaled_rope`, and 3.0 does not."""
    return "3.1" if params.get("use_scaled_rope") else "3.0"


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
            raise LlmconvError(
                f"token {by_rank[r]!r} (rank {r}) cannot be built by joining two tokens: not a BPE vocabulary",
                file=path,
            )
        splits_of[r] = pairs
        text_size += len(pairs) * (2 * n + 1)
        if text_size > MAX_MERGE_TEXT:
            raise LlmconvError(
                f"the merges up to token rank {r} already exceed {MAX_MERGE_TEXT >> 20} MiB: "
                "too many long tokens that split many ways",
                file=path,
            )
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
    return Vocab(
        "gpt2",
        tokens,
        [],
        types,
        bos_id=sid["<|begin_of_text|>"],
        eos_id=sid["<|end_of_text|>"],
        add_bos=True,
        add_eos=False,
        merges=merges_from_ranks(ranks, path),
        pre="llama-bpe",
        eot_id=sid["<|eot_id|>"],
        source=path,
    )
