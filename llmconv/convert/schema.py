"""One typed schema for the JSON files of a checkpoint, checked when a file is loaded.

config.json, params.json, tokenizer_config.json, generation_config.json, added_tokens.json,
tokenizer.json and the safetensors/bin index: every value the converter or verify reads has a
type and a range here, so a wrong value is one line naming the file and the key
(`rms_norm_eps: expected a finite number > 0, found "x"`) instead of a traceback later, and a
value that would overflow its GGUF field (a context length >= 2**32 in a u32, an eps beyond
float32) is refused before anything is written. Keys nobody reads are not checked.

Token ids are plausibility-checked too: nothing downstream may allocate in proportion to an
id from a 4 KB file, so ids stay below MAX_TOKEN_ID, and a tokenizer.json's ids must be mostly
dense (a placeholder is written for every id it skips).

`validate(doc, path)` picks the schema from the file name; errors.load_json calls it and turns a
SchemaError into a one-line LlmconvError naming the file. (This module imports nothing of
llmconv's, so errors.py can use it without an import cycle.)
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable


U32_MAX = 2**32 - 1
I32_MAX = 2**31 - 1
F32_MAX = 3.4028234663852886e38
MAX_TOKEN_ID = 1 << 22  # 4M; the largest real vocabularies have ~260k tokens
MAX_TEMPLATE_BYTES = 64 << 20  # = the GGUF reader's cap on one string (formats/gguf_reader.py)

Check = Callable[[Any, str], None]  # raises _Bad(message) for a wrong value


class SchemaError(ValueError):
    """A document that does not fit its schema; the message names the key."""


class _Bad(Exception):
    pass


def _show(v) -> str:
    text = repr(v) if not isinstance(v, (dict, list)) else type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _fail(want: str, v) -> None:
    raise _Bad(f"expected {want}, found {_show(v)}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---- value checks ------------------------------------------------------------------------------


def integer(lo: int = 1, hi: int = I32_MAX) -> Check:
    def check(v, key):
        if not _is_int(v) or not lo <= v <= hi:
            _fail(f"an integer in [{lo}, {hi}]", v)

    return check


def number(lo: float = 0.0, hi: float = F32_MAX, lo_open: bool = True) -> Check:
    """A finite JSON number in range; `lo_open` excludes lo itself (eps, theta and factors > 0)."""

    def check(v, key):
        if not _is_num(v) or not math.isfinite(float(v)) or not lo <= v <= hi or (lo_open and v == lo):
            _fail(f"a finite number {'>' if lo_open else '>='} {lo:g} and <= {hi:.4g}", v)

    return check


def boolean(v, key):
    if not isinstance(v, bool):
        _fail("true or false", v)


def string(v, key):
    if not isinstance(v, str):
        _fail("a string", v)


def template_text(v, key):
    string(v, key)
    if len(v) > MAX_TEMPLATE_BYTES // 4 and len(v.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE_BYTES:
        raise _Bad(
            f"is {len(v.encode('utf-8', 'surrogatepass'))} bytes; GGUF readers accept at most {MAX_TEMPLATE_BYTES}"
        )


def token_id(v, key):
    if not _is_int(v) or not 0 <= v < MAX_TOKEN_ID:
        _fail(f"a token id in [0, {MAX_TOKEN_ID})", v)


def token_text(v, key):
    """tokenizer_config.json writes a special token as its text or as {"content": text, ...}."""
    if isinstance(v, dict):
        _object(
            v,
            key,
            {
                "content": string,
                "special": boolean,
                "lstrip": boolean,
                "rstrip": boolean,
                "normalized": boolean,
                "single_word": boolean,
            },
            required=("content",),
        )
    elif not isinstance(v, str):
        _fail("a token (a string or an object with a content string)", v)


def one_of(*checks: Check, want: str) -> Check:
    def check(v, key):
        for c in checks:
            try:
                c(v, key)
                return
            except (_Bad, _Key):
                pass
        _fail(want, v)

    return check


def list_of(item: Check, max_items: int = MAX_TOKEN_ID) -> Check:
    def check(v, key):
        if not isinstance(v, list):
            _fail("a list", v)
        if len(v) > max_items:
            raise _Bad(f"has {len(v)} items; at most {max_items}")
        for i, x in enumerate(v):
            _at(item, x, f"{key}[{i}]")

    return check


def obj(fields: dict[str, Check], required: tuple = ()) -> Check:
    def check(v, key):
        _object(v, key, fields, required)

    return check


def nullable(c: Check) -> Check:
    def check(v, key):
        if v is not None:
            c(v, key)

    return check


def _object(v, key: str, fields: dict[str, Check], required: tuple = ()) -> None:
    if not isinstance(v, dict):
        _fail("an object", v)
    for k in required:
        if k not in v:
            raise _Key(f"{key}.{k}" if key else k, "missing")
    for k, c in fields.items():
        if k in v:
            _at(c, v[k], f"{key}.{k}" if key else k)


class _Key(Exception):
    """A failure at a known key path."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message


def _at(c: Check, v, key: str) -> None:
    try:
        c(v, key)
    except _Bad as e:
        raise _Key(key, str(e)) from None


# ---- the files -----------------------------------------------------------------------------------

_ROPE_SCALING = obj(
    {
        "rope_type": string,
        "type": string,
        "factor": number(),
        "low_freq_factor": number(),
        "high_freq_factor": number(),
        "original_max_position_embeddings": integer(1, U32_MAX),
        "rope_theta": number(),
    }
)
_IDS = nullable(one_of(token_id, list_of(token_id, 1024), want="a token id or a list of token ids"))

CONFIG = {
    "architectures": list_of(string, 16),
    "model_type": string,
    "hidden_act": string,
    "hidden_size": integer(),
    "num_hidden_layers": integer(),
    "num_attention_heads": integer(),
    "num_key_value_heads": nullable(integer()),
    "intermediate_size": integer(),
    "vocab_size": integer(1, MAX_TOKEN_ID),
    "head_dim": nullable(integer()),
    "max_position_embeddings": nullable(integer(1, U32_MAX)),
    "rms_norm_eps": number(),
    "rope_theta": number(),
    "rope_scaling": nullable(_ROPE_SCALING),
    "rope_parameters": nullable(_ROPE_SCALING),
    "tie_word_embeddings": boolean,
    "sliding_window": nullable(integer(1, U32_MAX)),
    "attention_bias": boolean,
    "mlp_bias": boolean,
    "bos_token_id": _IDS,
    "eos_token_id": _IDS,
    "pad_token_id": _IDS,
    "auto_map": obj({}),
}
PARAMS = {
    "dim": integer(),
    "n_layers": integer(),
    "n_heads": integer(),
    "n_kv_heads": nullable(integer()),
    "vocab_size": integer(-1, MAX_TOKEN_ID),
    "multiple_of": nullable(integer()),
    "ffn_dim_multiplier": nullable(number(hi=1e6)),
    "norm_eps": number(),
    "rope_theta": number(),
    "use_scaled_rope": boolean,
    "rope_scaling_factor": nullable(number()),
    "high_freq_factor": nullable(number()),
    "max_seq_len": integer(1, U32_MAX),
    "head_dim": nullable(integer()),
    "hidden_dim": nullable(integer()),
}


def _added_tokens_decoder(v, key):
    if not isinstance(v, dict):
        _fail("an object of token id -> token", v)
    for k, tok in v.items():
        if not re.fullmatch(r"[0-9]{1,9}", k) or int(k) >= MAX_TOKEN_ID:
            raise _Key(f"{key}.{k}", f"key is not a token id in [0, {MAX_TOKEN_ID})")
        _at(token_text, tok, f"{key}.{k}")


_TEMPLATES = one_of(
    template_text,
    list_of(obj({"name": string, "template": template_text}, required=("name", "template")), 256),
    want="a template string or a list of {name, template}",
)
TOKENIZER_CONFIG = {
    "bos_token": nullable(token_text),
    "eos_token": nullable(token_text),
    "unk_token": nullable(token_text),
    "pad_token": nullable(token_text),
    "add_bos_token": nullable(boolean),
    "add_eos_token": nullable(boolean),
    "chat_template": nullable(_TEMPLATES),
    "added_tokens_decoder": nullable(_added_tokens_decoder),
}
GENERATION_CONFIG = {"bos_token_id": _IDS, "eos_token_id": _IDS, "pad_token_id": _IDS}


def _added_tokens_json(doc, key):
    if not isinstance(doc, dict):
        _fail("an object of token text -> id", doc)
    for text, i in doc.items():
        _at(token_id, i, text)


def _index_json(doc, key):
    _object(doc, key, {"weight_map": obj({})}, required=("weight_map",))
    for name, fname in doc["weight_map"].items():
        _at(string, fname, f"weight_map.{name}")


def _flat(doc) -> None:
    """An object at the top, as every checkpoint JSON file has."""
    if not isinstance(doc, dict):
        _fail("a JSON object", doc)


SCHEMAS: dict[str, Callable[[Any], None]] = {
    "config.json": lambda d: _object(d, "", CONFIG),
    "params.json": lambda d: _object(d, "", PARAMS),
    "tokenizer_config.json": lambda d: _object(d, "", TOKENIZER_CONFIG),
    "generation_config.json": lambda d: _object(d, "", GENERATION_CONFIG),
    "added_tokens.json": lambda d: _added_tokens_json(d, ""),
    "model.safetensors.index.json": lambda d: _index_json(d, ""),
    "pytorch_model.bin.index.json": lambda d: _index_json(d, ""),
}


def validate(doc, path: str | Path) -> None:
    """Check a loaded JSON document against the schema its file name selects (no-op for
    other names; tokenizer.json is schema_tokenizer's). Raises SchemaError naming the key."""
    check_strings(doc)
    schema = SCHEMAS.get(Path(path).name)
    if schema is None:
        return
    try:
        _flat(doc)
        schema(doc)
    except _Bad as e:
        raise SchemaError(str(e)) from None
    except _Key as e:
        raise SchemaError(f"{e.key}: {e.message}") from None


def check_strings(doc) -> None:
    """No lone surrogates (JSON allows "\\ud800"; UTF-8 and every tokenizer do not), walked
    without recursion so nesting depth costs nothing."""
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            _check_text(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                _check_text(k)
                if not isinstance(x, (int, float, bool)) and x is not None:
                    stack.append(x)
        elif isinstance(v, list):
            stack.extend(x for x in v if not isinstance(x, (int, float, bool)) and x is not None)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(s: str) -> None:
    if s.isascii():
        return
    m = _SURROGATE.search(s)
    if m:
        raise SchemaError(
            f"string {s[max(0, m.start() - 20) : m.start()]!r}... holds a lone surrogate "
            f"(U+{ord(m.group()):04X}): not valid Unicode text"
        )
