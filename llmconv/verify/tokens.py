"""The text verify evaluates, tokenized by the checkpoint's own tokenizer library (never by
llmconv's converter), and the id-by-id comparison of the file's vocabulary with that tokenizer's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import LlmconvError, load_json


@dataclass
class SourceTokenizer:
    """The checkpoint's own tokenizer, through its own library (never llmconv's converter).

    tokens: the source vocabulary id by id, written as a GGUF file stores it (SentencePiece
    pieces; byte-level BPE tokens in GPT-2's printable-byte alphabet, as bpe.py writes them);
    None where the source defines no token (ids an embedding pads past the tokenizer)."""

    kind: str  # "sentencepiece", "tokenizer.json" or "tiktoken"
    path: Path
    bos_id: int | None
    encode: Callable[[str], list[int]]  # text -> ids, no BOS/EOS
    tokens: list[bytes | None]


def load_source_tokenizer(ckpt_dir: Path) -> SourceTokenizer:
    """tokenizer.model (SentencePiece, or Meta's LLaMA 3 tiktoken text) first, as the converter
    reads it, else a Hugging Face tokenizer.json."""
    from ..convert.tiktoken_bpe import is_tiktoken_file

    from ..convert.sources import detect_format

    if (ckpt_dir / "params.json").is_file() and detect_format(ckpt_dir) == "mistral":
        return mistral_tokenizer(ckpt_dir)
    model = ckpt_dir / "tokenizer.model"
    if model.is_file():
        return tiktoken_tokenizer(ckpt_dir) if is_tiktoken_file(model) else sentencepiece_tokenizer(ckpt_dir)
    if (ckpt_dir / "tokenizer.json").is_file():
        return tokenizer_json_tokenizer(ckpt_dir)
    raise LlmconvError(
        "no tokenizer: the text is tokenized with the checkpoint's tokenizer.model or tokenizer.json", file=ckpt_dir
    )


def _optional_import(module: str, what: str):
    """tokenizers and tiktoken are dependencies, but a hand-made environment may lack them."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LlmconvError(f"verifying against {what} needs the {module} package: pip install {module}") from None


def mistral_tokenizer(ckpt_dir: Path) -> SourceTokenizer:
    """Mistral's own layout: tekken.json or tokenizer.model.vN, found as the converter finds it."""
    from ..convert.mistral import find_mistral_tokenizer

    path = find_mistral_tokenizer(ckpt_dir, None)
    return tekken_tokenizer(path) if path.suffix == ".json" else sentencepiece_tokenizer(ckpt_dir, path)


def tekken_tokenizer(path: Path) -> SourceTokenizer:
    """A tekken.json as mistral-common encodes with it: tiktoken on the file's first
    default_vocab_size - default_num_special_tokens ranks with its split pattern, every id
    shifted past the special tokens (which come first, by rank)."""
    from ..convert.bpe import bytes_to_token
    from ..convert.tekken import special_token_names, tekken_ranks

    tiktoken = _optional_import("tiktoken", "a Tekken tokenizer (tekken.json)")
    doc = load_json(path)
    config = doc.get("config") if isinstance(doc, dict) else None
    if not isinstance(config, dict):
        raise LlmconvError("not a Tekken tokenizer: no config object", file=path)
    n_special = config.get("default_num_special_tokens")
    n_total = config.get("default_vocab_size")
    if not (isinstance(n_special, int) and isinstance(n_total, int) and 0 < n_special < n_total):
        raise LlmconvError("config.default_num_special_tokens / default_vocab_size are not usable", file=path)
    ranks = tekken_ranks(doc.get("vocab"), n_total - n_special, path)
    specials = special_token_names(doc, n_special, path)
    enc = tiktoken.Encoding(
        name="llmconv-tekken", pat_str=config.get("pattern"), mergeable_ranks=ranks, special_tokens={}
    )
    by_rank = sorted(ranks, key=ranks.__getitem__)
    tokens = [t.encode("utf-8") for t in specials] + [bytes_to_token(b).encode("utf-8") for b in by_rank]
    bos = specials.index("<s>") if "<s>" in specials else None
    return SourceTokenizer(
        "tiktoken", path, bos, lambda text: [n_special + t for t in enc.encode_ordinary(text)], tokens
    )


def sentencepiece_tokenizer(ckpt_dir: Path, path: Path | None = None) -> SourceTokenizer:
    """`path`: the model file (default tokenizer.model; Mistral's are tokenizer.model.vN)."""
    import sentencepiece as spm

    path = path or ckpt_dir / "tokenizer.model"
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise LlmconvError(f"not a SentencePiece model: {str(e).splitlines()[0] if str(e) else e}", file=path) from None
    bos = sp.bos_id()
    return SourceTokenizer(
        "sentencepiece", path, bos if bos >= 0 else None, lambda text: sp.encode(text), source_pieces(sp, ckpt_dir)
    )


def source_pieces(sp, ckpt_dir: Path) -> list[bytes | None]:
    """The source vocabulary id by id: SentencePiece pieces, then added tokens past its end by id:
    added_tokens.json (Meta, old HF), or tokenizer_config.json's added_tokens_decoder (HF)."""
    pieces: list[bytes | None] = [sp.id_to_piece(i).encode("utf-8") for i in range(sp.get_piece_size())]
    added: dict[int, str] = {}
    extra_file = ckpt_dir / "added_tokens.json"
    if extra_file.is_file():
        added.update({i: piece for piece, i in _json(extra_file).items() if isinstance(i, int)})
    config_file = ckpt_dir / "tokenizer_config.json"
    if config_file.is_file():
        decoder = _json(config_file).get("added_tokens_decoder") or {}
        for i, tok in decoder.items() if isinstance(decoder, dict) else ():
            text = tok.get("content") if isinstance(tok, dict) else tok
            if str(i).isdigit() and isinstance(text, str):
                added[int(i)] = text
    for i in sorted(added):
        if i >= len(pieces):
            pieces += [None] * (i - len(pieces)) + [added[i].encode("utf-8")]
    return pieces


def tiktoken_tokenizer(ckpt_dir: Path) -> SourceTokenizer:
    """Meta's LLaMA 3 tokenizer.model, built into a tiktoken Encoding from the file's own ranks
    (tiktoken is never asked to download anything), with Meta's split regex and its 256
    special tokens after the ranks, named as that release names them."""
    from ..convert.bpe import LLAMA3_PATTERN, bytes_to_token
    from ..convert.tiktoken_bpe import meta_special_tokens, meta_special_version, read_tiktoken_ranks
    from ..convert.meta_params import read_params

    tiktoken = _optional_import("tiktoken", "a LLaMA 3 tiktoken tokenizer.model")
    path = ckpt_dir / "tokenizer.model"
    ranks = read_tiktoken_ranks(path)
    specials = meta_special_tokens(meta_special_version(read_params(ckpt_dir)))
    n = len(ranks)
    enc = tiktoken.Encoding(
        name=f"llmconv-verify-{n}",
        pat_str=LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={s: n + k for k, s in enumerate(specials)},
    )
    by_rank = sorted(ranks, key=ranks.__getitem__)
    tokens = [bytes_to_token(b).encode("utf-8") for b in by_rank] + [s.encode("utf-8") for s in specials]
    # special-token text in the input is encoded as plain text, as Meta's tokenizer does by default
    return SourceTokenizer(
        "tiktoken",
        path,
        n + specials.index("<|begin_of_text|>"),
        lambda text: enc.encode(text, allowed_special=set(), disallowed_special=()),
        tokens,
    )


def tokenizer_json_tokenizer(ckpt_dir: Path) -> SourceTokenizer:
    """A Hugging Face tokenizer.json through the `tokenizers` library. BOS is tokenizer_config's
    bos_token, else what the post-processor puts in front of a sequence."""
    tokenizers = _optional_import("tokenizers", "a tokenizer.json")
    path = ckpt_dir / "tokenizer.json"
    load_json(path)  # the schema first: it refuses what makes the library panic
    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises its own Exception subclass for any bad file
        raise LlmconvError(
            f"tokenizers cannot read it: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=path
        ) from None
    config_file = ckpt_dir / "tokenizer_config.json"
    bos_text = _json(config_file).get("bos_token") if config_file.is_file() else None
    bos_text = bos_text.get("content") if isinstance(bos_text, dict) else bos_text
    bos = tok.token_to_id(bos_text) if isinstance(bos_text, str) else None
    if bos is None:
        with_specials = tok.encode("x", add_special_tokens=True).ids
        plain = tok.encode("x", add_special_tokens=False).ids
        bos = (
            with_specials[0] if len(with_specials) > len(plain) and with_specials[1 : 1 + len(plain)] == plain else None
        )
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    tokens = [by_id[i].encode("utf-8") if i in by_id else None for i in range(max(by_id) + 1)]
    return SourceTokenizer(
        "tokenizer.json", path, bos, lambda text: tok.encode(text, add_special_tokens=False).ids, tokens
    )


def _json(path: Path) -> dict:
    obj = load_json(path)
    return obj if isinstance(obj, dict) else {}


def tokenize(tok: SourceTokenizer, text: str, n: int) -> list[int]:
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + list(tok.encode(text))
    return ids[:n]


def first_vocab_difference(
    file_tokens: list[bytes] | None, source: list[bytes | None]
) -> tuple[int | None, str | None]:
    """The first id where the file's token differs from the source's (None in `source`: any token)."""
    if file_tokens is None:
        return 0, "the file has no tokenizer.ggml.tokens list"
    for i, (a, b) in enumerate(zip(file_tokens, source)):
        if b is not None and a != b:
            return i, (
                f"vocabulary differs at id {i}: the file has {a!r}{_as_bytes(a)}, "
                f"the source tokenizer has {b!r}{_as_bytes(b)}"
            )
    if len(file_tokens) != len(source):
        n = min(len(file_tokens), len(source))
        return n, f"vocabulary sizes differ: the file has {len(file_tokens)} tokens, the source tokenizer {len(source)}"
    return None, None


def _as_bytes(token: bytes) -> str:
    """For a GPT-2-alphabet token, the bytes it stands for (" (bytes b' the')"), else ""."""
    from ..convert.bpe import token_to_bytes

    try:
        raw = token_to_bytes(token.decode("utf-8"))
    except UnicodeDecodeError:
        return ""
    return f" (bytes {raw!r})" if raw is not None and raw != token else ""
