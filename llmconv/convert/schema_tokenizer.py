"""The schema of a Hugging Face tokenizer.json (see schema.py for the other files).

Beyond types, the BPE model must be consistent the way the `tokenizers` library requires:
ids unique and mostly dense (each id the file skips becomes a placeholder token), every merge
naming two tokens of the vocabulary whose concatenation is one too, and an added token that
reuses a vocabulary id must be that token.
"""

from __future__ import annotations

from pathlib import Path

from .schema import (
    MAX_TOKEN_ID,
    SchemaError,
    _at,
    _Bad,
    _fail,
    _Key,
    _object,
    boolean,
    check_strings,
    nullable,
    obj,
    string,
    token_id,
)

MAX_COMPONENT_DEPTH = 8  # Sequence inside Sequence: real files nest one or two levels


def _component(children: str) -> "callable":
    """A normalizer / pre-tokenizer / decoder / post-processor object: a `type` string and,
    for a Sequence, a list of the same under `children`."""

    def check(v, key, depth=0):
        if depth > MAX_COMPONENT_DEPTH:
            raise _Bad(f"nested more than {MAX_COMPONENT_DEPTH} levels deep")
        _object(
            v,
            key,
            {
                "type": string,
                "pattern": obj({"Regex": string, "String": string}),
                "behavior": string,
                "invert": boolean,
                "add_prefix_space": boolean,
                "use_regex": boolean,
                "single": _template,
                "pair": _template,
            },
        )
        if "single" in v or "pair" in v:
            _check_template_specials(v, key)
        items = v.get(children)
        if items is None:
            return
        if not isinstance(items, list):
            raise _Key(f"{key}.{children}", f"expected a list, found {type(items).__name__}")
        for i, item in enumerate(items):
            try:
                check(item, f"{key}.{children}[{i}]", depth + 1)
            except _Bad as e:
                raise _Key(f"{key}.{children}[{i}]", str(e)) from None

    return check


def _template(v, key):
    if not isinstance(v, list):
        _fail("a list of template pieces", v)
    for i, piece in enumerate(v):
        _at(obj({"SpecialToken": obj({"id": string}), "Sequence": obj({})}), piece, f"{key}[{i}]")


def _check_template_specials(v: dict, key: str) -> None:
    """A TemplateProcessing's pieces may name only its own special_tokens, each with as many
    ids as tokens (the `tokenizers` library panics on a missing one when it encodes)."""
    specials = v.get("special_tokens", {})
    if not isinstance(specials, dict):
        raise _Key(f"{key}.special_tokens", f"expected an object, found {type(specials).__name__}")
    for name, entry in specials.items():
        _at(
            obj(
                {"id": string, "ids": _list_of(token_id), "tokens": _list_of(string)}, required=("id", "ids", "tokens")
            ),
            entry,
            f"{key}.special_tokens.{name}",
        )
        if len(entry["ids"]) != len(entry["tokens"]):
            raise _Key(f"{key}.special_tokens.{name}", f"{len(entry['ids'])} ids but {len(entry['tokens'])} tokens")
    for part in ("single", "pair"):
        for i, piece in enumerate(v.get(part) or []):
            name = (piece.get("SpecialToken") or {}).get("id")
            if name is not None and name not in specials:
                raise _Key(f"{key}.{part}[{i}]", f"special token {name!r:.60} is not in {key}.special_tokens")


def _list_of(check):
    def check_list(v, key):
        if not isinstance(v, list):
            _fail("a list", v)
        for i, item in enumerate(v):
            _at(check, item, f"{key}[{i}]")

    return check_list


_ADDED = obj({"id": token_id, "content": string, "special": boolean}, required=("id", "content"))


def validate_tokenizer_json(doc, path: Path | None = None) -> None:
    """Raises SchemaError naming the key."""
    check_strings(doc)
    try:
        if not isinstance(doc, dict):
            _fail("a JSON object", doc)
        _object(
            doc,
            "",
            {
                "model": obj({"type": string}),
                "added_tokens": nullable(_list_of_added),
                "normalizer": nullable(_component("normalizers")),
                "pre_tokenizer": nullable(_component("pretokenizers")),
                "decoder": nullable(_component("decoders")),
                "post_processor": nullable(_component("processors")),
            },
            required=("model",),
        )
        if doc["model"].get("type") == "BPE":
            _check_bpe(doc["model"], doc.get("added_tokens") or [])
    except _Bad as e:
        raise SchemaError(str(e)) from None
    except _Key as e:
        raise SchemaError(f"{e.key}: {e.message}") from None


def _list_of_added(v, key):
    if not isinstance(v, list):
        _fail("a list", v)
    for i, tok in enumerate(v):
        _at(_ADDED, tok, f"{key}[{i}]")


def _check_bpe(model: dict, added: list) -> None:
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise _Key("model.vocab", f"expected an object of token -> id, found {type(vocab).__name__}")
    by_id: dict[int, str] = {}
    for text, i in vocab.items():
        _at(token_id, i, f"model.vocab.{text}")
        if i in by_id:
            raise _Key(f"model.vocab.{text}", f"id {i} is also the id of {by_id[i]!r}")
        by_id[i] = text
    for k, tok in enumerate(added):
        i, text = tok["id"], tok["content"]
        if i in by_id and by_id[i] != text:
            raise _Key(f"added_tokens[{k}]", f"id {i} is {text!r} but model.vocab has {by_id[i]!r} there")
        by_id.setdefault(i, text)
    if by_id:
        top = max(by_id)
        if top + 1 > 2 * len(by_id) + 1024:
            raise _Key(
                "model.vocab",
                f"ids go up to {top} but only {len(by_id)} are defined: "
                f"a vocabulary that is mostly gaps is not plausible",
            )
    merges = model.get("merges")
    if merges is None:
        return
    if not isinstance(merges, list) or len(merges) > MAX_TOKEN_ID:
        raise _Key("model.merges", "expected a list of merges")
    prefix = model.get("continuing_subword_prefix") or ""
    for k, m in enumerate(merges):
        parts = m.split(" ") if isinstance(m, str) else m
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise _Key(
                "model.merges", f'merge {k} ({m!r:.60}) is not two tokens: expected "left right" or [left, right]'
            )
        joined = parts[0] + (parts[1][len(prefix) :] if prefix and parts[1].startswith(prefix) else parts[1])
        for p in (parts[0], parts[1], joined):
            if p not in vocab:
                raise _Key("model.merges", f"merge {k} names {p!r:.60}, which is not in model.vocab")
