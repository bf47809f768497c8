"""Types and ranges of the GGUF metadata keys llmconv reads (quantize, verify, checksums).

The structural reader (gguf_reader.py) accepts any well-formed value of any type; this check
says, for the keys whose value is used, what the value must be: `general.architecture` a
string (it is pasted into key names), `block_count` an integer no larger than the layers a
file can hold (verify builds per-layer structures from it), token ids integers inside the
vocabulary, rope/eps floats finite and > 0 (a scale factor of 0 would divide by zero),
tokens an array of strings (verify turned an integer "token" n into bytes(n)).
`inspect` skips this check: it shows whatever a file holds.
"""

from __future__ import annotations

import math
import re

from gguf import GGUFValueType as V

_INTS = {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}
_FLOATS = {V.FLOAT32, V.FLOAT64}
MAX_LAYERS = 1 << 16
MAX_TOKENS = 1 << 22  # = convert/schema.py's MAX_TOKEN_ID


def _int(lo=0, hi=2**64 - 1, per_layer=False):
    return ("int", lo, hi, per_layer)


def _float():
    return ("float",)


# key (with {arch}) -> what its value must be
_KEYS = {
    "general.architecture": ("str",),
    "general.file_type": _int(),
    "general.quantization_version": _int(),
    "{arch}.block_count": _int(1, MAX_LAYERS),
    "{arch}.context_length": _int(1),
    "{arch}.embedding_length": _int(1),
    "{arch}.vocab_size": _int(1, MAX_TOKENS),
    "{arch}.feed_forward_length": _int(0, per_layer=True),
    "{arch}.attention.head_count": _int(1, per_layer=True),
    "{arch}.attention.head_count_kv": _int(0, per_layer=True),
    "{arch}.attention.key_length": _int(1),
    "{arch}.attention.value_length": _int(1),
    "{arch}.attention.layer_norm_rms_epsilon": _float(),
    "{arch}.rope.freq_base": _float(),
    "{arch}.rope.dimension_count": _int(1),
    "{arch}.rope.scaling.factor": _float(),
    "{arch}.rope.scaling.type": ("str",),
    "tokenizer.ggml.model": ("str",),
    "tokenizer.ggml.pre": ("str",),
    "tokenizer.chat_template": ("str",),
    "tokenizer.ggml.tokens": ("array", "str"),
    "tokenizer.ggml.merges": ("array", "str"),
    "tokenizer.ggml.scores": ("array", "float"),
    "tokenizer.ggml.token_type": ("array", "int"),
    "tokenizer.ggml.add_bos_token": ("bool",),
    "tokenizer.ggml.add_eos_token": ("bool",),
    "split.no": _int(),
    "split.count": _int(1, 99999),
    "split.tensors.count": _int(),
}
_TOKEN_ID = re.compile(r"tokenizer\.ggml\.[a-z]+_token_id")
_BLK = re.compile(r"blk\.(\d+)\.")


def check_metadata(g, fail) -> None:
    """`g` a GGUFFile; `fail(message, offset)` raises. Checks the keys above when present."""
    arch_t = g.kv_types.get("general.architecture")
    arch = g.kvs.get("general.architecture")
    for key_tpl, rule in _KEYS.items():
        if "{arch}" in key_tpl and not isinstance(arch, str):
            continue
        key = key_tpl.format(arch=arch)
        if key in g.kvs:
            _check(key, g.kvs[key], g.kv_types[key], rule, lambda m, k=key: fail(f"{k}: {m}", g.kv_offsets[k]))
    if arch_t is not None and not isinstance(arch, str):
        return
    tokens = g.kvs.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if tokens is not None else None
    for key, v in g.kvs.items():
        if _TOKEN_ID.fullmatch(key):
            _check(
                key,
                v,
                g.kv_types[key],
                _int(0, (n_tokens or MAX_TOKENS) - 1),
                lambda m, k=key: fail(f"{k}: {m}", g.kv_offsets[k]),
            )
    n_layers = g.kvs.get(f"{arch}.block_count")
    if isinstance(n_layers, int):
        for t in g.tensors:
            m = _BLK.match(t.name)
            if m and int(m.group(1)) >= n_layers:
                fail(f"tensor {t.name} is in layer {m.group(1)} but {arch}.block_count is {n_layers}", t.info_offset)


def _check(key, v, vt, rule, fail) -> None:
    kind = rule[0]
    if kind == "str":
        if vt.type != V.STRING or not isinstance(v, str):
            fail(f"must be a UTF-8 string, not {_tname(vt)}")
    elif kind == "bool":
        if vt.type != V.BOOL:
            fail(f"must be a BOOL, not {_tname(vt)}")
    elif kind == "float":
        if vt.type not in _FLOATS:
            fail(f"must be a FLOAT32 or FLOAT64, not {_tname(vt)}")
        if not (math.isfinite(v) and v > 0):
            fail(f"must be finite and > 0, not {v}")
    elif kind == "int":
        _, lo, hi, per_layer = rule
        if vt.type == V.ARRAY and per_layer and vt.element in _INTS:
            values = v
        elif vt.type in _INTS:
            values = [v]
        else:
            fail(f"must be an integer{' or an array of integers' if per_layer else ''}, not {_tname(vt)}")
        for x in values:
            if not lo <= x <= hi:
                fail(f"value {x} is outside [{lo}, {hi}]")
    elif kind == "array":
        want = {"str": {V.STRING}, "float": _FLOATS, "int": _INTS}[rule[1]]
        if vt.type != V.ARRAY or vt.element not in want:
            fail(f"must be an array of {rule[1]}, not {_tname(vt)}")
        if len(v) > MAX_TOKENS:
            fail(f"has {len(v)} items; at most {MAX_TOKENS}")


def _tname(vt) -> str:
    return f"ARRAY of {vt.element.name}" if vt.type == V.ARRAY and vt.element is not None else vt.type.name
