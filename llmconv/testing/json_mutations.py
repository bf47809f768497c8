"""Structure-aware mutations of a checkpoint's JSON files for the input fuzzer (fuzz_inputs.py):
hostile values (huge, negative, NaN/inf, the wrong type, lone surrogates, control characters,
deep nesting), plausible neighbours of the real value, keys deleted or added, token ids and
merges made inconsistent, and truncated text."""

from __future__ import annotations

import json
import math

from hypothesis import strategies as st

# target file -> the keys its schema knows, which the mutator also adds
KNOWN_KEYS = {
    "config.json": [
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "tie_word_embeddings",
        "head_dim",
        "sliding_window",
        "architectures",
        "hidden_act",
        "auto_map",
        "attention_bias",
        "bos_token_id",
        "eos_token_id",
        "num_local_experts",
        "num_experts_per_tok",
        "torch_dtype",
        "model_type",
    ],
    "tokenizer_config.json": [
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
        "add_bos_token",
        "add_eos_token",
        "chat_template",
        "added_tokens_decoder",
        "model_max_length",
    ],
    "params.json": [
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "vocab_size",
        "multiple_of",
        "ffn_dim_multiplier",
        "norm_eps",
        "rope_theta",
        "use_scaled_rope",
        "rope_scaling_factor",
        "head_dim",
        "max_seq_len",
        "moe",
    ],
    "tokenizer.json": ["model", "added_tokens", "normalizer", "pre_tokenizer", "decoder", "post_processor"],
}


# ---- hostile and plausible values ----------------------------------------------------------------

_ints = (
    st.sampled_from(
        [
            0,
            1,
            -1,
            2,
            3,
            7,
            8,
            64,
            255,
            256,
            511,
            512,
            513,
            2**16,
            2**31 - 1,
            2**31,
            2**32,
            2**32 - 1,
            2**53 + 1,
            2**63,
            2**64,
            10**9,
            10**100,
            -(2**63),
        ]
    )
    | st.integers()
)
_floats = (
    st.sampled_from(
        [
            0.0,
            -0.0,
            1e-6,
            1e-5,
            0.5,
            1.0,
            1e4,
            5e5,
            1e6,
            3.5e38,
            1e39,
            1e308,
            5e-324,
            float("nan"),
            float("inf"),
            float("-inf"),
            -1.0,
        ]
    )
    | st.floats()
)
_texts = st.sampled_from(
    [
        "",
        "x",
        "8",
        "1e5",
        "silu",
        "llama3",
        "linear",
        "dynamic",
        "yarn",
        "<s>",
        "</s>",
        "<unk>",
        "<|begin_of_text|>",
        "<|eot_id|>",
        "\ud800",
        "a\udfffb",
        "\x00",
        "\n\x1b[2J",
        "\u202e",
        "Ġ",
        "ĠĠ",
        "{{ x }}",
        "{% for %}",
        "a" * 10_000,
    ]
) | st.text(max_size=20)
_leaf = st.none() | st.booleans() | _ints | _floats | _texts
_values = st.recursive(
    _leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_texts, inner, max_size=4), max_leaves=8
)

_DEEP = "@@deep@@"  # a marker the serializer replaces by nesting that deep (as text: the
_hostile = _values | st.sampled_from([50, 500, 5000, 50_000]).map(lambda n: f"{_DEEP}{n}")  # fuzzer stays flat


def _neighbours(v) -> list:
    """Replacements for a real value of its own type: near it, or at the edge of what its GGUF
    field holds (u32/i32, float32)."""
    if isinstance(v, bool):
        return [not v]
    if isinstance(v, int):
        return [v + 1, v - 1, v * 2, v // 2, v * 3 // 2, 0, 1, -1, 2**31, 2**32, 2**63]
    if isinstance(v, float):
        near = [v * 2, v / 2, v * 10, -v, 0.0, float(int(v) + 1)] if math.isfinite(v) else [1.0]
        return near + [3.5e38, 1e39, float("inf"), float("nan"), 5e-324]
    if isinstance(v, str) and not v.startswith(_DEEP):
        return [v + "x", v[:-1], v.upper(), "", "<|end_of_text|>", "</s>", "<s>"]
    return [None, 0, ""]


def _to_text(doc) -> str:
    text = json.dumps(doc, ensure_ascii=True, allow_nan=True)  # a lone surrogate as \\udXXX, as JSON allows
    while _DEEP in text:
        at = text.index('"' + _DEEP)
        end = text.index('"', at + 1)
        n = int(text[at + 1 + len(_DEEP) : end])
        text = text[:at] + "[" * n + "1" + "]" * n + text[end + 1 :]
    return text


# ---- structure-aware mutation ---------------------------------------------------------------------


def _containers(doc, path=(), out=None, limit=2000):
    """(path, container) for the document's dicts and lists (at most `limit`, for big files)."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    if isinstance(doc, (dict, list)) and (not isinstance(doc, list) or doc):
        out.append((path, doc))
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        if isinstance(v, (dict, list)) and not (isinstance(v, dict) and len(v) > 5000):
            _containers(v, path + (k,), out, limit)
    return out


_OPS = ["replace", "tweak", "tweak", "delete", "add-known", "truncate"]
_TOKENIZER_OPS = ["token", "token", "token", "replace", "tweak", "delete", "add-known", "truncate"]


@st.composite
def mutated(draw, name: str, base: dict):
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(_TOKENIZER_OPS if name == "tokenizer.json" else _OPS))
        if op == "truncate":
            text = _to_text(doc)
            return text[: draw(st.integers(0, max(0, len(text) - 1)))]
        if op == "add-known":
            doc[draw(st.sampled_from(KNOWN_KEYS[name]))] = draw(_hostile)
            continue
        if op == "token":
            _token_mutation(draw, doc)
            continue
        conts = _containers(doc)
        path, cont = draw(st.sampled_from(conts))
        keys = list(cont) if isinstance(cont, dict) else list(range(len(cont)))
        if not keys:
            continue
        k = draw(st.sampled_from(keys[:500]))
        if op == "delete":
            del cont[k]
        elif op == "tweak":
            cont[k] = draw(st.sampled_from(_neighbours(cont[k])))
        else:
            cont[k] = draw(_hostile)
    return _to_text(doc)


def _token_mutation(draw, tj: dict) -> None:
    """The inconsistencies a BPE vocabulary can have: duplicate or huge ids, merges naming
    unknown tokens, added tokens clashing with the vocabulary."""
    model = tj.get("model") if isinstance(tj.get("model"), dict) else None
    vocab = model.get("vocab") if model and isinstance(model.get("vocab"), dict) else None
    if not vocab:
        return
    token = draw(st.sampled_from(sorted(vocab)[:1000]))
    kind = draw(st.sampled_from(["dup-id", "huge-id", "merge", "added", "odd-text", "swap"]))
    if kind == "odd-text":  # a new token whose text no UTF-8 file can hold, or that controls a terminal
        ids = [i for i in vocab.values() if isinstance(i, int)]
        ids += [
            t.get("id") for t in tj.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)
        ]
        vocab[draw(st.sampled_from(["\ud800", "a\udfffb", "\x00", "\n\x1b[2J", "\u202e"]))] = max(ids, default=0) + 1
    elif kind == "dup-id":
        vocab[draw(_texts)] = vocab[token]
    elif kind == "huge-id":
        vocab[token] = draw(st.sampled_from([10**8, 2**31, 2**22, len(vocab) * 3, len(vocab), -5]))
    elif kind == "swap":  # two tokens trade ids: a consistent vocabulary, a different tokenizer
        other = draw(st.sampled_from(sorted(vocab)[:1000]))
        vocab[token], vocab[other] = vocab[other], vocab[token]
    elif kind == "merge" and isinstance(model.get("merges"), list):
        model["merges"].append(
            draw(st.sampled_from([f"{token} zzz", f"{token} {token}", "a b c", "", [token, token], [token], 7]))
        )
    elif isinstance(tj.get("added_tokens"), list):
        tj["added_tokens"].append({"id": draw(_ints), "content": draw(_texts), "special": draw(st.booleans())})
