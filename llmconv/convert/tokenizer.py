"""Tokenizers -> the vocabulary fields GGUF stores (tokenizer.ggml.*).

SentencePiece (LLaMA 1/2, Code Llama, Mistral): the token walk is gguf-py's
SentencePieceVocab (it also reads added_tokens.json); the special ids and
add_bos/add_eos come from the model itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gguf import TokenType
from gguf.vocab import SentencePieceVocab

from ..errors import LlmconvError


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[bytes]
    scores: list[float]
    token_types: list[int]
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    eot_id: int | None = None  # end of turn (LLaMA 3 instruct: <|eot_id|>)
    add_bos: bool = True
    add_eos: bool = False
    merges: list[str] = field(default_factory=list)
    pre: str | None = None  # tokenizer.ggml.pre for BPE
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.tokens)


def _sentencepiece_vocab(sp, tokens: list, scores: list, types: list, path: Path) -> Vocab:
    """The Vocab of a SentencePiece model: its special ids (-1: none), BOS added, EOS not."""

    def special(i: int) -> int | None:
        return i if i >= 0 else None

    return Vocab(
        "llama",
        tokens,
        scores,
        types,
        bos_id=special(sp.bos_id()),
        eos_id=special(sp.eos_id()),
        unk_id=special(sp.unk_id()),
        pad_id=special(sp.pad_id()),
        add_bos=True,
        add_eos=False,
        source=path,
    )


def load_sentencepiece(model_dir: Path) -> Vocab:
    path = model_dir / "tokenizer.model"
    if not path.is_file():
        raise LlmconvError("tokenizer.model is missing", file=model_dir)
    try:
        spv = SentencePieceVocab(model_dir)
    except (OSError, RuntimeError) as e:
        raise LlmconvError(
            f"not a SentencePiece model: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=path
        ) from None
    except ValueError as e:
        raise LlmconvError(str(e), file=model_dir / "added_tokens.json") from None
    tokens, scores, types = [], [], []
    for text, score, ttype in spv.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(ttype))
    sp = spv.sentencepiece_tokenizer

    return _sentencepiece_vocab(sp, tokens, scores, types, path)


def load_sentencepiece_file(path: Path) -> Vocab:
    """A SentencePiece model under any file name (Mistral's tokenizer.model.v3, --tokenizer FILE).
    Token types as gguf's SentencePieceVocab and llama.cpp's MistralVocab assign them."""
    import sentencepiece as spm

    if not path.is_file():
        raise LlmconvError("tokenizer file is missing", file=path)
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise LlmconvError(
            f"not a SentencePiece model: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=path
        ) from None
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        ttype = TokenType.NORMAL
        if sp.IsUnknown(i):
            ttype = TokenType.UNKNOWN
        if sp.IsControl(i):
            ttype = TokenType.CONTROL
        if sp.IsUnused(i):
            ttype = TokenType.UNUSED
        if sp.IsByte(i):
            ttype = TokenType.BYTE
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(float(sp.GetScore(i)))
        types.append(int(ttype))

    return _sentencepiece_vocab(sp, tokens, scores, types, path)


def check_vocab_size(vocab: Vocab, n_embd_rows: int, file: Path, tensor: str) -> None:
    """The embedding must have exactly one row per token: llama.cpp refuses a mismatch at
    load time, so it is an error here, before anything is written."""
    n = len(vocab)
    if n > n_embd_rows:
        raise LlmconvError(
            f"tokenizer has {n} tokens but the embedding has only {n_embd_rows} rows",
            file=vocab.source or file,
            tensor=tensor,
        )
    if n < n_embd_rows:
        raise LlmconvError(
            f"tokenizer has {n} tokens but the embedding has {n_embd_rows} rows "
            f"(add the missing tokens with added_tokens.json)",
            file=vocab.source or file,
            tensor=tensor,
        )


__all__ = ["Vocab", "load_sentencepiece", "load_sentencepiece_file", "check_vocab_size", "TokenType"]
