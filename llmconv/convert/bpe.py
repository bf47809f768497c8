"""Byte-level BPE tokenizers -> GGUF vocabulary (tokenizer.ggml.model = "gpt2").

Two sources hold the same kind of vocabulary:
  - Hugging Face `tokenizer.json` with a BPE model and a ByteLevel pre-tokenizer/decoder
    (LLaMA 3 on the hub, and most byte-level BPE models). Tokens are already written in
    GPT-2's printable-byte alphabet; merges are either "a b" strings or [a, b] pairs.
  - Meta's original LLaMA 3 `tokenizer.model`: tiktoken text, one `base64(token bytes) rank`
    per line, rank = token id. It has no merges: they are rebuilt from the ranks, and Meta's
    256 special tokens, which live in their Python code and not in the file, are appended
    (tiktoken_bpe.py; this module has GPT-2's byte alphabet both use, and tokenizer.json).

llama.cpp stores every token in GPT-2's alphabet (each byte mapped to one printable
character, e.g. space -> "Ġ") and merges as "left right" strings, and picks its
pre-tokenizer regex from `tokenizer.ggml.pre`. Both sources end up as the same Vocab.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from gguf import TokenType

from ..errors import LlmconvError, load_json
from .pretok import LLAMA3_PATTERN, _flatten, detect_pre
from .tokenizer import Vocab

__all__ = ["LLAMA3_PATTERN", "detect_pre"]  # re-exported: verify and the tests use them from here

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
        raise LlmconvError(
            "BPE tokenizer is not byte-level (no ByteLevel pre-tokenizer or decoder); "
            "for SentencePiece-style models convert with tokenizer.model",
            file=path,
        )
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise LlmconvError("model.vocab is missing or empty", file=path)

    by_id = _tokens_by_id(vocab, tj.get("added_tokens") or [], path)
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
    specials = _special_ids(tokenizer_config or {}, tj.get("post_processor"), text_to_id, path)
    return Vocab(
        "gpt2",
        tokens,
        [],
        types,
        **specials,
        merges=merges,
        pre=pre_name,
        eot_id=text_to_id.get("<|eot_id|>"),
        source=path,
    )


def _tokens_by_id(vocab: dict, added: list, path: Path) -> dict[int, tuple[str, int]]:
    """id -> (text, token type) for the model's vocabulary and the added tokens."""
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
        else:  # llama.cpp's converter writes a user-defined "▁" as a space
            by_id[i] = (text.replace("\u2581", " "), int(TokenType.USER_DEFINED))
    return by_id


def _special_ids(cfg: dict, post_processor: dict | None, text_to_id: dict, path: Path) -> dict:
    """bos/eos/unk/pad ids and add_bos/add_eos: tokenizer_config's where it names them, else the
    post-processor's template."""
    bos = _special_id(cfg.get("bos_token"), text_to_id, path, "bos_token")
    eos = _special_id(cfg.get("eos_token"), text_to_id, path, "eos_token")
    unk = _special_id(cfg.get("unk_token"), text_to_id, path, "unk_token")
    pad = _special_id(cfg.get("pad_token"), text_to_id, path, "pad_token")
    template = _post_processor_specials(post_processor, text_to_id)
    if bos is None and template["bos"] is not None:
        bos = template["bos"]
    add_bos = cfg.get("add_bos_token")
    add_bos = bool(add_bos) if add_bos is not None else template["bos"] is not None
    add_eos = cfg.get("add_eos_token")
    add_eos = bool(add_eos) if add_eos is not None else template["eos"] is not None
    return dict(bos_id=bos, eos_id=eos, unk_id=unk, pad_id=pad, add_bos=add_bos, add_eos=add_eos)


def looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter makes control tokens even when tokenizer.json does not
    mark them special (some models forget to): <|...|>, <｜...｜>, <unused...>, and a few names."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


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
