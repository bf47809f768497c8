"""The tokenizer of a Hugging Face checkpoint: tokenizer.model, tokenizer.json or tekken.json, then
tokenizer_config.json's added tokens and special tokens, generation_config.json's stop ids and
the chat template."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFValueType as T
from gguf import Keys, TokenType

from ..errors import LlmconvError, load_json
from ..formats.gguf_writer import KV
from .tokenizer import Vocab, check_vocab_size, load_sentencepiece, load_sentencepiece_file

# Token texts that end a chat turn; when generation_config.json stops on one of them it is
# written as tokenizer.ggml.eot_token_id so llama.cpp ends the turn there.
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>", "<|eot|>")
END_OF_MESSAGE = ("<|eom_id|>", "<|eom|>")  # <|eot|>, <|eom|>: Llama 4


def _token_text(v) -> str | None:
    """tokenizer_config.json writes a special token as a string or as a serialized AddedToken."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def load_hf_vocab(
    model_dir: Path,
    tok_config: dict | None,
    n_embd_rows: int,
    warnings: list[str],
    pre: str | None = None,
    tok_file: Path | None = None,
) -> Vocab:
    """From `model_dir` (the checkpoint's or --tokenizer's folder), or from `tok_file` when
    --tokenizer names a file: a .json one is a tokenizer.json, anything else SentencePiece."""
    if tok_file is not None and tok_file.suffix == ".json":
        from .bpe import load_tokenizer_json

        vocab = load_tokenizer_json(tok_file, tok_config, pre)
    elif tok_file is not None:
        vocab = load_sentencepiece_file(tok_file)
        add_decoder_tokens(vocab, tok_config, model_dir / "tokenizer_config.json")
    elif (model_dir / "tokenizer.model").is_file():
        vocab = load_sentencepiece(model_dir)
        add_decoder_tokens(vocab, tok_config, model_dir / "tokenizer_config.json")
    elif (model_dir / "tokenizer.json").is_file():
        from .bpe import load_tokenizer_json  # byte-level BPE (LLaMA 3 and most newer models)

        vocab = load_tokenizer_json(model_dir / "tokenizer.json", tok_config, pre)
    elif (model_dir / "tekken.json").is_file():
        from .tekken import tekken_vocab  # Mistral's own tokenizer file, as llama.cpp reads it here too

        vocab = tekken_vocab(model_dir / "tekken.json")
        vocab.pre = pre or vocab.pre
    else:
        raise LlmconvError(
            "no tokenizer: expected tokenizer.model (SentencePiece), tokenizer.json or tekken.json", file=model_dir
        )
    if len(vocab) < n_embd_rows:
        # The embedding has rows no token maps to (vocabularies padded to a round size):
        # named placeholder tokens of type UNUSED, as llama.cpp's converter writes them.
        n = n_embd_rows - len(vocab)
        warnings.append(
            f"tokenizer has {len(vocab)} tokens, the embedding {n_embd_rows} rows: {n} unused [PAD] tokens added"
        )
        with_scores = len(vocab.scores) == len(vocab.tokens)
        for i in range(len(vocab), n_embd_rows):
            vocab.tokens.append(f"[PAD{i}]".encode())
            vocab.token_types.append(int(TokenType.UNUSED))
            if with_scores:
                vocab.scores.append(-1000.0)
    return vocab


def add_decoder_tokens(vocab: Vocab, tok_config: dict | None, file: Path) -> None:
    """tokenizer_config.json `added_tokens_decoder` {id: {content, special}} on a SentencePiece
    vocabulary: ids past its end are appended (control if special, else user-defined); ids
    inside it must name the same piece, and a special one becomes a control token."""
    decoder = (tok_config or {}).get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise LlmconvError("added_tokens_decoder is not an object", file=file)
    try:
        items = sorted((int(k), v) for k, v in decoder.items())
    except ValueError:
        raise LlmconvError("added_tokens_decoder keys must be token ids", file=file) from None
    for tid, tok in items:
        text = _token_text(tok)
        if text is None:
            raise LlmconvError(f"added token {tid} has no content", file=file)
        special = bool(tok.get("special", False)) if isinstance(tok, dict) else False
        ttype = int(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        if tid < len(vocab):
            have = _text(vocab.tokens[tid])
            if have != text:
                raise LlmconvError(f"added token {tid} is {text!r} but tokenizer.model has {have!r} there", file=file)
            if special and vocab.token_types[tid] == int(TokenType.NORMAL):
                vocab.token_types[tid] = ttype
        elif tid == len(vocab):
            vocab.tokens.append(text.encode())
            vocab.scores.append(-1000.0)
            vocab.token_types.append(ttype)
        else:
            raise LlmconvError(
                f"added token {text!r} has id {tid} but the vocabulary ends at {len(vocab) - 1}: ids would have a gap",
                file=file,
            )


def _text(token: bytes | str) -> str:
    return token.decode("utf-8", "replace") if isinstance(token, bytes) else token


@dataclass
class SpecialTokens:
    eom_id: int | None = None
    chat_templates: dict[str, str] | None = None  # name -> template; "default" is the main one
    add_space_prefix: bool | None = None  # tokenizer_config.json add_prefix_space
    fim_ids: dict[str, int] | None = None  # Code Llama's fill-in-the-middle tokens


# Code Llama's infilling tokens (vocabulary 32016: LLaMA 2's 32000 + 16), at the ids llama.cpp's
# converter gives them for any Hugging Face checkpoint with that vocabulary size.
CODE_LLAMA_VOCAB = 32016
CODE_LLAMA_FIM = {"prefix": 32007, "suffix": 32008, "middle": 32009, "eot": 32010}


def load_hf_tokenizer(
    model_dir: Path, tokenizer: Path | None, n_embd_rows: int, warnings: list[str], pre: str | None
) -> tuple[Vocab, list[KV]]:
    """The vocabulary (with its special ids set) and the extra tokenizer keys (chat templates,
    eom, FIM ids, add_prefix_space). `tokenizer` is --tokenizer: a folder or one file."""
    from .hf_files import read_json
    from .source import explicit_tokenizer

    tok_dir, tok_file = explicit_tokenizer(tokenizer) if tokenizer is not None else (model_dir, None)
    tok_config = read_json(tok_dir / "tokenizer_config.json", required=False)
    gen_config = read_json(model_dir / "generation_config.json", required=False)
    vocab = load_hf_vocab(tok_dir, tok_config, n_embd_rows, warnings, pre, tok_file)
    check_vocab_size(vocab, n_embd_rows, tok_file or tok_dir / "tokenizer.model", "model.embed_tokens.weight")
    return vocab, special_kvs(apply_special_tokens(vocab, tok_dir, tok_config, gen_config))


def apply_special_tokens(
    vocab: Vocab, model_dir: Path, tok_config: dict | None, gen_config: dict | None
) -> SpecialTokens:
    """Special token ids, add_bos/add_eos and the chat template, from tokenizer_config.json
    (the tokenizer's own settings) and then generation_config.json (ids the model stops on).
    A setting neither file gives keeps what the tokenizer itself says."""
    tc_file = model_dir / "tokenizer_config.json"
    tc = tok_config or {}
    gen_ids = _generation_ids(gen_config or {}, len(vocab), model_dir / "generation_config.json")
    _set_special_ids(vocab, tc, tc_file, gen_ids)

    out = SpecialTokens()
    stops = gen_ids("eos_token_id") + ([vocab.eos_id] if vocab.eos_id is not None else [])
    text_of = {i: _text(vocab.tokens[i]) for i in stops}
    if vocab.eot_id is None:
        vocab.eot_id = next((i for i in stops if text_of[i] in END_OF_TURN), None)
    out.eom_id = next((i for i in stops if text_of[i] in END_OF_MESSAGE), None)

    if isinstance(tc.get("add_prefix_space"), bool):
        out.add_space_prefix = tc["add_prefix_space"]
    if len(vocab) == CODE_LLAMA_VOCAB:
        out.fim_ids = {k: v for k, v in CODE_LLAMA_FIM.items() if k != "eot"}
        vocab.eot_id = CODE_LLAMA_FIM["eot"]
    out.chat_templates = _chat_templates(tc, model_dir, tc_file)
    return out


def _generation_ids(gc: dict, n_vocab: int, gc_file: Path):
    """A reader of generation_config.json's id lists (`eos_token_id` may be one id or a list)."""

    def gen_ids(key: str) -> list[int]:
        v = gc.get(key)
        ids = [v] if isinstance(v, int) else v if isinstance(v, list) else []
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n_vocab:
                raise LlmconvError(f"{key} {i!r} is not a token id of the vocabulary ({n_vocab} tokens)", file=gc_file)
        return ids

    return gen_ids


def _set_special_ids(vocab: Vocab, tc: dict, tc_file: Path, gen_ids) -> None:
    """bos/eos/unk/pad by text from tokenizer_config.json, else by id from generation_config.json;
    add_bos/add_eos when tokenizer_config.json states them."""
    by_text: dict[str, int] = {}
    for i, t in enumerate(vocab.tokens):
        by_text.setdefault(_text(t), i)

    def token_id(key: str) -> int | None:
        if tc.get(key) is None:
            return None
        text = _token_text(tc[key])
        if text is None or text not in by_text:
            raise LlmconvError(f"{key} {tc[key]!r} is not a token of the vocabulary", file=tc_file)
        return by_text[text]

    for field_name, key in (
        ("bos_id", "bos_token"),
        ("eos_id", "eos_token"),
        ("unk_id", "unk_token"),
        ("pad_id", "pad_token"),
    ):
        tid = token_id(key)
        if tid is None:
            ids = gen_ids(f"{key}_id") if key != "unk_token" else []
            tid = ids[0] if ids else None
        if tid is not None:
            setattr(vocab, field_name, tid)
    for flag in ("add_bos", "add_eos"):
        v = tc.get(f"{flag}_token")
        if isinstance(v, bool):
            setattr(vocab, flag, v)


def _chat_templates(tc: dict, model_dir: Path, tc_file: Path) -> dict[str, str] | None:
    """Where transformers keeps the template: tokenizer_config.json, else chat_template.jinja,
    else (the layout between the two) chat_template.json {"chat_template": ...}."""
    template = tc.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif template is None and (model_dir / "chat_template.json").is_file():
        doc = load_json(model_dir / "chat_template.json")
        template = doc.get("chat_template") if isinstance(doc, dict) else None
        if template is None:
            raise LlmconvError("no 'chat_template' key", file=model_dir / "chat_template.json")
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in named.items()):
            raise LlmconvError("chat_template list entries need a name and a template", file=tc_file)
        return named
    if template is not None:
        raise LlmconvError("chat_template is neither a string nor a list of named templates", file=tc_file)
    return None


def special_kvs(s: SpecialTokens) -> list[KV]:
    t = Keys.Tokenizer
    kvs = []
    if s.eom_id is not None:
        kvs.append(KV(t.EOM_ID, s.eom_id, T.UINT32))
    if s.add_space_prefix is not None:
        kvs.append(KV(t.ADD_PREFIX, s.add_space_prefix, T.BOOL))
    for kind, key in (("prefix", t.PREFIX_ID), ("suffix", t.SUFFIX_ID), ("middle", t.MIDDLE_ID)):
        if s.fim_ids and kind in s.fim_ids:
            kvs.append(KV(key, s.fim_ids[kind], T.UINT32))
    if s.chat_templates:
        templates = dict(s.chat_templates)
        default = templates.pop("default", None)
        if default is not None:
            kvs.append(KV(t.CHAT_TEMPLATE, default, T.STRING))
        for name, text in templates.items():
            kvs.append(KV(t.CHAT_TEMPLATE_N.format(name=name), text, T.STRING))
        if templates:
            kvs.append(KV(t.CHAT_TEMPLATES, list(templates), T.ARRAY, T.STRING))
    return kvs
