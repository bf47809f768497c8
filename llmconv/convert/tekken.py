"""Mistral's Tekken tokenizer (`tekken.json`: Mistral Nemo, Ministral, Mistral Small 3, ...) ->
a byte-level BPE Vocab (tokenizer.ggml.model "gpt2", pre "tekken"), as llama.cpp's converter
writes it for Mistral-format checkpoints (gguf-py's MistralVocab).

The file holds tiktoken-style ranks (`vocab`: rank, base64 token bytes) and a config. Token ids
are: the special tokens first (`default_num_special_tokens` of them: the file's `special_tokens`
list, or for files up to v7 the fixed list mistral-common uses, then `<SPECIAL_i>` fillers), then
the first `default_vocab_size - default_num_special_tokens` ranks, each shifted by the number of
specials. Merges are rebuilt from the ranks as for LLaMA 3's tiktoken file (every split into two
tokens, by rank), starting past the 256 single bytes.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from gguf import TokenType

from ..errors import LlmconvError, load_json
from .bpe import bytes_to_token
from .tiktoken_bpe import merges_from_ranks
from .pretok import TEKKEN_PATTERN
from .tokenizer import Vocab

# mistral-common's special tokens for Tekken files that do not list their own (versions up to v7).
LEGACY_SPECIALS = (
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)


def is_tekken_file(path: Path) -> bool:
    return path.name.startswith("tekken") and path.suffix == ".json" and path.is_file()


def _config_int(config: dict, key: str, path: Path) -> int:
    v = config.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise LlmconvError(f"config.{key} missing or not a positive integer", file=path)
    return v


def _version(config: dict) -> int:
    v = config.get("version")
    return int(v[1:]) if isinstance(v, str) and v[:1] == "v" and v[1:].isdigit() else 0


def special_token_names(doc: dict, n_special: int, path: Path) -> list[str]:
    listed = doc.get("special_tokens")
    if listed is None:
        if _version(doc["config"]) > 7:
            raise LlmconvError("no special_tokens: Tekken files after v7 must list them", file=path)
        names = list(LEGACY_SPECIALS)
    else:
        if not isinstance(listed, list):
            raise LlmconvError("special_tokens is not a list", file=path)
        names = []
        for k, t in enumerate(listed):
            if not isinstance(t, dict) or t.get("rank") != k or not isinstance(t.get("token_str"), str):
                raise LlmconvError(f"special_tokens[{k}] is not {{rank: {k}, token_str: ...}}", file=path)
            names.append(t["token_str"])
    if len(names) > n_special or len(set(names)) != len(names):
        raise LlmconvError(
            f"{len(names)} special tokens (duplicates or more than default_num_special_tokens = {n_special})", file=path
        )
    return names + [f"<SPECIAL_{i}>" for i in range(len(names), n_special)]


def tekken_ranks(vocab: list, n_regular: int, path: Path) -> dict[bytes, int]:
    """The first n_regular ranks (mistral-common cuts the file's vocabulary to that size)."""
    if not isinstance(vocab, list) or len(vocab) < n_regular:
        raise LlmconvError(
            f"vocab has {len(vocab) if isinstance(vocab, list) else 'no'} entries, "
            f"fewer than the {n_regular} regular tokens the config asks for",
            file=path,
        )
    ranks: dict[bytes, int] = {}
    for i, entry in enumerate(vocab[:n_regular]):
        try:
            if entry["rank"] != i:
                raise ValueError
            token = base64.b64decode(entry["token_bytes"], validate=True)
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise LlmconvError(f"vocab[{i}] is not {{rank: {i}, token_bytes: base64}}", file=path) from None
        if (i < 256 and token != bytes([i])) or (i >= 256 and len(token) < 2) or token in ranks:
            raise LlmconvError(
                f"vocab[{i}] = {token!r}: ranks 0-255 must be the single bytes in order, and tokens unique", file=path
            )
        ranks[token] = i
    return ranks


def tekken_vocab(path: str | Path) -> Vocab:
    """A tekken.json as the GGUF vocabulary llama.cpp's converter writes for it: specials (control),
    then the regular tokens in GPT-2's byte alphabet (normal), scores 0, merges, pre "tekken",
    bos <s>, eos </s>, unk <unk>, pad <pad> (eos when there is none), add_bos, no add_eos."""
    path = Path(path)
    doc = load_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
        raise LlmconvError("not a Tekken tokenizer: no config object", file=path)
    config = doc["config"]
    pattern = config.get("pattern")
    if pattern != TEKKEN_PATTERN:
        raise LlmconvError(
            f"split pattern {pattern!r} is not the one llama.cpp's tekken pre-tokenizer implements", file=path
        )
    n_special = _config_int(config, "default_num_special_tokens", path)
    n_total = _config_int(config, "default_vocab_size", path)
    if n_total <= n_special + 256:
        raise LlmconvError(
            f"default_vocab_size {n_total} leaves no room past {n_special} special tokens and 256 bytes", file=path
        )
    specials = special_token_names(doc, n_special, path)
    ranks = tekken_ranks(doc.get("vocab"), n_total - n_special, path)
    del doc, config  # ~1M parsed JSON objects, not needed past here
    by_rank = sorted(ranks, key=ranks.__getitem__)
    tokens = [s.encode("utf-8") for s in specials] + [bytes_to_token(t).encode("utf-8") for t in by_rank]
    types = [int(TokenType.CONTROL)] * n_special + [int(TokenType.NORMAL)] * len(by_rank)
    sid = {s: i for i, s in enumerate(specials)}
    for needed in ("<s>", "</s>", "<unk>"):
        if needed not in sid:
            raise LlmconvError(f"special token {needed} is missing", file=path)
    return Vocab(
        "gpt2",
        tokens,
        [0.0] * len(tokens),
        types,
        bos_id=sid["<s>"],
        eos_id=sid["</s>"],
        unk_id=sid["<unk>"],
        pad_id=sid.get("<pad>", sid["</s>"]),
        add_bos=True,
        add_eos=False,
        merges=merges_from_ranks(ranks, path, first_rank=256),
        pre="tekken",
        source=path,
    )
