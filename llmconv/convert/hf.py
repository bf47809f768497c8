"""Hugging Face checkpoints: config.json + model*.safetensors (or pytorch_model*.bin) + tokenizer.

What differs from a Meta checkpoint, and how it is undone here:
  - names: `model.layers.N.self_attn.q_proj.weight` instead of `layers.N.attention.wq.weight`;
  - Q and K rows: HF's conversion script reorders each head's rows so that rotary embedding
    pairs (x[i], x[i + head_dim/2]) ("rotate half") instead of Meta's adjacent (x[2i], x[2i+1]).
    llama.cpp's llama architecture rotates adjacent pairs, so the rows are put back in Meta
    order: per head, HF row p * head_dim/2 + j holds Meta row 2j + p. Q has n_head heads,
    K has n_head_kv; a bias is reordered like its weight's rows;
  - weights are one file, or shards listed by an index file, and are read one tensor at a time
    (safetensors `safe_open` maps the file; `get_tensor` copies only the tensor asked for);
  - the embedding may be tied to the output (no lm_head): then there is no `output.weight`
    and llama.cpp uses `token_embd.weight` for both.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGUFValueType as T
from gguf import Keys, MODEL_TENSOR, TokenType

from ..errors import LlmconvError, load_json
from ..formats.gguf_writer import KV
from . import moe
from .guards import check_layer_count
from .hparams import LlamaHParams
from .meta import expected_shapes, safe_torch_load, stated_head_dim
from .plan import SourceTensor, meta_to_gguf_name, tensor_name
from .tokenizer import Vocab, check_vocab_size, load_sentencepiece, load_sentencepiece_file

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")

# HF name (layer prefix and .weight/.bias stripped) -> GGUF tensor kind.
HF_LAYER_NAMES = {
    "self_attn.q_proj": MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj": MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj": MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
    "mlp.gate_proj": MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj": MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
    "input_layernorm": MODEL_TENSOR.ATTN_NORM,
    "post_attention_layernorm": MODEL_TENSOR.FFN_NORM,
}
HF_GLOBAL_NAMES = {
    "model.embed_tokens": MODEL_TENSOR.TOKEN_EMBD,
    "model.norm": MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": MODEL_TENSOR.OUTPUT,
}
# llama.cpp's llama architecture has optional biases on the attention and feed-forward projections
# (attention_bias / mlp_bias in config.json), none on norms or embeddings.
_MAY_HAVE_BIAS = {k for k in HF_LAYER_NAMES if k.startswith(("self_attn.", "mlp."))}
# Older transformers saved each layer's RoPE inverse frequencies; llama.cpp computes its own.
_DROPPED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# Order of a layer's tensors in the output (the order of a Meta checkpoint).
_LAYER_ORDER = [MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_V, MODEL_TENSOR.ATTN_OUT,
                MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_DOWN, MODEL_TENSOR.FFN_UP, *moe.LAYER_ORDER,
                MODEL_TENSOR.ATTN_NORM, MODEL_TENSOR.FFN_NORM]

_ST_DTYPES = {"BF16": "bf16", "F16": "f16", "F32": "f32"}
_TORCH_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}

# Token texts that end a chat turn; when generation_config.json stops on one of them it is
# written as tokenizer.ggml.eot_token_id so llama.cpp ends the turn there.
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")
END_OF_MESSAGE = ("<|eom_id|>",)


def hf_name_to_gguf(name: str) -> str | None:
    stem, dot, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if stem in HF_GLOBAL_NAMES:
        return tensor_name(HF_GLOBAL_NAMES[stem], suffix=suffix) if suffix == "weight" else None
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if not m or m.group(2) not in HF_LAYER_NAMES:
        return None
    if suffix == "bias" and m.group(2) not in _MAY_HAVE_BIAS:
        return None
    return tensor_name(HF_LAYER_NAMES[m.group(2)], int(m.group(1)), suffix)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half row order -> Meta interleaved, for a [n_heads * head_dim, ...] weight or
    a [n_heads * head_dim] bias. Within a head, HF row (p, j) = p * head_dim/2 + j is Meta row
    2j + p: view the rows as (head, p, j), swap to (head, j, p), flatten."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of an even size")
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- config.json ---------------------------------------------------------------------------

def read_json(path: Path, required: bool = True) -> dict | None:
    if not path.is_file():
        if required:
            raise LlmconvError(f"{path.name} is missing", file=path.parent)
        return None
    obj = load_json(path)
    if not isinstance(obj, dict):
        raise LlmconvError("expected a JSON object", file=path)
    return obj


def _int(config: dict, key: str, file: Path, default: int | None = None) -> int:
    v = config.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise LlmconvError(f"key {key!r} missing or not a positive integer", file=file)
    return v


def check_architecture(config: dict, file: Path, warnings: list[str]) -> str:
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise LlmconvError("no 'architectures' list: cannot tell which model this is", file=file)
    unsupported = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if unsupported:
        raise LlmconvError(f"architecture {unsupported[0]!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})", file=file)
    if config.get("auto_map"):
        warnings.append(f"{file.name}: auto_map (custom model code) ignored; converted as {archs[0]}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise LlmconvError(f"hidden_act {act!r}: the llama architecture computes SwiGLU with silu", file=file)
    return archs[0]


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None). transformers 5 moved both into `rope_parameters`."""
    params = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    theta = float(config.get("rope_theta", params.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling") or None
    if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def hf_family(arch: str, vocab: int, theta: float, scaling: dict | None) -> str:
    if arch == "MistralForCausalLM":
        return "mistral"
    if arch == "MixtralForCausalLM":
        return "mixtral"
    if vocab >= 128000:
        return "llama-3.1" if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3" else "llama-3"
    if theta == 1e6:
        return "code-llama"
    return "llama-2"


# ---- weight files --------------------------------------------------------------------------

@dataclass
class WeightEntry:
    file: Path
    shape: tuple[int, ...]
    dtype: str                                  # "bf16", "f16", "f32"
    get: Callable[[], torch.Tensor]


# File layouts: "safetensors" and "bin" are Hugging Face's, "consolidated" is Mistral's own
# (consolidated.safetensors, or consolidated-0000k-of-0000N.safetensors: split by tensor, not model-parallel).
_SHARD_RE = {"safetensors": re.compile(r"model-(\d+)-of-(\d+)\.safetensors"),
             "bin": re.compile(r"pytorch_model-(\d+)-of-(\d+)\.bin"),
             "consolidated": re.compile(r"consolidated-(\d+)-of-(\d+)\.safetensors")}
_SINGLE = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin", "consolidated": "consolidated.safetensors"}
_INDEX = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json",
          "consolidated": "consolidated.safetensors.index.json"}


def _shards_on_disk(model_dir: Path, kind: str) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if _SHARD_RE[kind].fullmatch(p.name))


def find_weight_files(model_dir: Path, kinds: tuple[str, ...] = ("safetensors", "bin")
                      ) -> tuple[str, list[Path], dict[str, str] | None, Path | None]:
    """(kind, files, weight_map or None, index path or None). safetensors first, like transformers."""
    for kind in kinds:
        index = model_dir / _INDEX[kind]
        if index.is_file():
            doc = read_json(index)
            wmap = doc.get("weight_map")
            if not isinstance(wmap, dict) or not wmap or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
                raise LlmconvError("no 'weight_map' of tensor name -> file name", file=index)
            names = list(dict.fromkeys(wmap.values()))
            for fname in names:
                if "/" in fname or "\\" in fname or fname in ("", ".", ".."):
                    raise LlmconvError(f"weight_map names file {fname!r} outside the checkpoint directory", file=index)
                if not (model_dir / fname).is_file():
                    raise LlmconvError(f"{index.name} lists {fname} but that file is missing", file=model_dir / fname)
            for p in _shards_on_disk(model_dir, kind):
                if p.name not in names:
                    raise LlmconvError(f"shard is not listed in {index.name}: its tensors would be dropped", file=p)
            return kind, sorted((model_dir / f for f in names), key=_shard_key), wmap, index
        single = model_dir / _SINGLE[kind]
        if single.is_file():
            return kind, [single], None, None
        shards = _shards_on_disk(model_dir, kind)
        if shards:
            # no index: the -0000k-of-0000N names are all there is to check against
            numbers = [_SHARD_RE[kind].fullmatch(p.name).groups() for p in shards]
            counts = {int(n) for _, n in numbers}
            if len(counts) != 1:
                raise LlmconvError(f"shards disagree on how many there are ({sorted(counts)})", file=shards[0])
            n = counts.pop()
            missing = sorted(set(range(1, n + 1)) - {int(k) for k, _ in numbers})
            if missing:
                k_digits, n_text = len(numbers[0][0]), numbers[0][1]
                want = _SINGLE[kind].replace(".", f"-{missing[0]:0{k_digits}d}-of-{n_text}.", 1)
                raise LlmconvError(f"shard {missing[0]} of {n} is missing", file=model_dir / want)
            return kind, sorted(shards, key=_shard_key), None, None
    if kinds == ("consolidated",):
        raise LlmconvError("no weights found: expected consolidated.safetensors or "
                           "consolidated-0000k-of-0000N.safetensors", file=model_dir)
    raise LlmconvError("no weights found: expected model.safetensors, model-0000k-of-0000N.safetensors "
                       "(+ model.safetensors.index.json) or pytorch_model*.bin", file=model_dir)


def _shard_key(p: Path):
    m = re.search(r"-(\d+)-of-\d+\.", p.name)
    return (int(m.group(1)) if m else 0, p.name)


def open_weights(model_dir: Path, kinds: tuple[str, ...] = ("safetensors", "bin")
                 ) -> tuple[dict[str, WeightEntry], list[Path]]:
    """name -> WeightEntry for every tensor in the checkpoint, in file order; nothing is read yet."""
    kind, files, wmap, index = find_weight_files(model_dir, kinds)
    entries: dict[str, WeightEntry] = {}
    for path in files:
        for name, entry in (_bin_entries(path) if kind == "bin" else _safetensors_entries(path)):
            if name in entries:
                raise LlmconvError(f"tensor is stored twice, also in {entries[name].file.name}", file=path, tensor=name)
            if wmap is not None and wmap.get(name) != path.name:
                where = f"listed under {wmap[name]}" if name in wmap else "not listed"
                raise LlmconvError(f"tensor in {path.name} is {where} in {index.name}", file=path, tensor=name)
            entries[name] = entry
    if wmap is not None:
        for name, fname in wmap.items():
            if name not in entries:
                raise LlmconvError(f"{index.name} lists the tensor in {fname} but it is not there",
                                   file=model_dir / fname, tensor=name)
    return entries, files


def _safetensors_entries(path: Path):
    from safetensors import SafetensorError, safe_open
    try:
        handle = safe_open(str(path), framework="pt")
        names = list(handle.keys())
        meta = [(n, handle.get_slice(n)) for n in names]
    except (SafetensorError, OSError, ValueError) as e:
        raise LlmconvError(f"not a readable safetensors file: {_first_line(e)}", file=path) from None
    for name, sl in meta:
        dtype = _ST_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise LlmconvError(f"unsupported dtype {sl.get_dtype()} (bf16, f16, f32)", file=path, tensor=name)
        yield name, WeightEntry(path, tuple(sl.get_shape()), dtype, lambda h=handle, n=name: h.get_tensor(n))


def _bin_entries(path: Path):
    sd = safe_torch_load(path)
    for name, t in sd.items():
        dtype = _TORCH_DTYPES.get(t.dtype)
        if dtype is None:
            raise LlmconvError(f"unsupported dtype {t.dtype} (bf16, f16, f32)", file=path, tensor=name)
        yield name, WeightEntry(path, tuple(t.shape), dtype, lambda t=t: t)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---- tokenizer -------------------------------------------------------------------------------

def _token_text(v) -> str | None:
    """tokenizer_config.json writes a special token as a string or as a serialized AddedToken."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def load_hf_vocab(model_dir: Path, tok_config: dict | None, n_embd_rows: int, warnings: list[str],
                  pre: str | None = None, tok_file: Path | None = None) -> Vocab:
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
        from .bpe import load_tokenizer_json   # byte-level BPE (LLaMA 3 and most newer models)
        vocab = load_tokenizer_json(model_dir / "tokenizer.json", tok_config, pre)
    elif (model_dir / "tekken.json").is_file():
        from .tekken import tekken_vocab       # Mistral's own tokenizer file, as llama.cpp reads it here too
        vocab = tekken_vocab(model_dir / "tekken.json")
        vocab.pre = pre or vocab.pre
    else:
        raise LlmconvError("no tokenizer: expected tokenizer.model (SentencePiece), tokenizer.json or tekken.json",
                           file=model_dir)
    if len(vocab) < n_embd_rows:
        # The embedding has rows no token maps to (vocabularies padded to a round size):
        # named placeholder tokens of type UNUSED, as llama.cpp's converter writes them.
        n = n_embd_rows - len(vocab)
        warnings.append(f"tokenizer has {len(vocab)} tokens, the embedding {n_embd_rows} rows: "
                        f"{n} unused [PAD] tokens added")
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
            raise LlmconvError(f"added token {text!r} has id {tid} but the vocabulary ends at {len(vocab) - 1}: "
                               f"ids would have a gap", file=file)


def _text(token: bytes | str) -> str:
    return token.decode("utf-8", "replace") if isinstance(token, bytes) else token


@dataclass
class SpecialTokens:
    eom_id: int | None = None
    chat_templates: dict[str, str] | None = None   # name -> template; "default" is the main one
    add_space_prefix: bool | None = None           # tokenizer_config.json add_prefix_space
    fim_ids: dict[str, int] | None = None          # Code Llama's fill-in-the-middle tokens


# Code Llama's infilling tokens (vocabulary 32016: LLaMA 2's 32000 + 16), at the ids llama.cpp's
# converter gives them for any Hugging Face checkpoint with that vocabulary size.
CODE_LLAMA_VOCAB = 32016
CODE_LLAMA_FIM = {"prefix": 32007, "suffix": 32008, "middle": 32009, "eot": 32010}


def apply_special_tokens(vocab: Vocab, model_dir: Path, tok_config: dict | None, gen_config: dict | None) -> SpecialTokens:
    """Special token ids, add_bos/add_eos and the chat template, from tokenizer_config.json
    (the tokenizer's own settings) and then generation_config.json (ids the model stops on).
    A setting neither file gives keeps what the tokenizer itself says."""
    tc_file = model_dir / "tokenizer_config.json"
    gc_file = model_dir / "generation_config.json"
    tc, gc = tok_config or {}, gen_config or {}
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

    def gen_ids(key: str) -> list[int]:
        v = gc.get(key)
        ids = [v] if isinstance(v, int) else v if isinstance(v, list) else []
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(vocab):
                raise LlmconvError(f"{key} {i!r} is not a token id of the vocabulary ({len(vocab)} tokens)", file=gc_file)
        return ids

    for field_name, key in (("bos_id", "bos_token"), ("eos_id", "eos_token"), ("unk_id", "unk_token"),
                            ("pad_id", "pad_token")):
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

    # where transformers keeps the template: tokenizer_config.json, else chat_template.jinja,
    # else (the layout between the two) chat_template.json {"chat_template": ...}
    template = tc.get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif template is None and (model_dir / "chat_template.json").is_file():
        doc = load_json(model_dir / "chat_template.json")
        template = doc.get("chat_template") if isinstance(doc, dict) else None
        if template is None:
            raise LlmconvError("no 'chat_template' key", file=model_dir / "chat_template.json")
    if isinstance(template, str):
        out.chat_templates = {"default": template}
    elif isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in named.items()):
            raise LlmconvError("chat_template list entries need a name and a template", file=tc_file)
        out.chat_templates = named
    elif template is not None:
        raise LlmconvError("chat_template is neither a string nor a list of named templates", file=tc_file)
    return out


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


# ---- the source ------------------------------------------------------------------------------

def open_hf_source(model_dir: Path, ctx: int | None = None, pre: str | None = None, tokenizer: Path | None = None):
    """`pre` overrides the detected tokenizer.ggml.pre of a tokenizer.json BPE vocabulary;
    `tokenizer` (--tokenizer) is a folder holding the tokenizer files, or one tokenizer file."""
    from .source import Source, explicit_tokenizer

    model_dir = Path(model_dir)
    cfg_file = model_dir / "config.json"
    config = read_json(cfg_file)
    warnings: list[str] = []
    arch = check_architecture(config, cfg_file, warnings)

    dim = _int(config, "hidden_size", cfg_file)
    n_layers = _int(config, "num_hidden_layers", cfg_file)
    n_heads = _int(config, "num_attention_heads", cfg_file)
    n_kv = _int(config, "num_key_value_heads", cfg_file, default=n_heads)
    ffn = _int(config, "intermediate_size", cfg_file)
    stated = stated_head_dim(config, cfg_file)      # Mistral Nemo / Small 3: not hidden_size / heads
    if (stated is None and (dim % n_heads or (dim // n_heads) % 2)) or n_heads % n_kv:
        raise LlmconvError(f"hidden_size {dim}, num_attention_heads {n_heads}, num_key_value_heads {n_kv} "
                           f"do not divide into even-sized heads", file=cfg_file)
    head_dim = stated or dim // n_heads
    theta, scaling = rope_settings(config)
    if config.get("sliding_window") is not None:
        # llama.cpp's llama architecture reads no sliding-window key (its own converter writes none
        # for MistralForCausalLM either): attention is full over the whole context.
        warnings.append(f"sliding_window {config['sliding_window']} dropped: llama.cpp's llama architecture "
                        f"has no sliding-window attention; it attends over the whole context")
    ctx_len = ctx or config.get("max_position_embeddings")
    if ctx_len is None:
        ctx_len = 2048
        warnings.append("config.json has no max_position_embeddings: context length 2048 (transformers' default)")
    elif not isinstance(ctx_len, int) or ctx_len <= 0:
        raise LlmconvError("max_position_embeddings is not a positive integer", file=cfg_file)

    entries, files = open_weights(model_dir)
    if "model.embed_tokens.weight" not in entries:
        raise LlmconvError("checkpoint has no model.embed_tokens.weight", file=files[0], tensor="model.embed_tokens.weight")
    emb_rows, emb_cols = entries["model.embed_tokens.weight"].shape
    vocab_size = config.get("vocab_size", emb_rows)
    if vocab_size != emb_rows:
        raise LlmconvError(f"vocab_size {vocab_size} != embedding rows {emb_rows}", file=cfg_file,
                           tensor="model.embed_tokens.weight")
    tie = config.get("tie_word_embeddings")
    if tie and "lm_head.weight" in entries:
        warnings.append("lm_head.weight ignored: tie_word_embeddings is set, so the output reuses the embedding")
        del entries["lm_head.weight"]
    elif "lm_head.weight" not in entries:
        if tie is False:
            warnings.append("config.json says tie_word_embeddings false but there is no lm_head.weight: "
                            "the output reuses the embedding")
    tied = "lm_head.weight" not in entries

    check_layer_count(n_layers, entries, cfg_file, "num_hidden_layers")
    expected = {meta_to_gguf_name(k): v
                for k, v in expected_shapes(dim, n_layers, n_heads, n_kv, ffn, vocab_size, head_dim).items()}
    tensors: dict[str, SourceTensor] = {}
    moe_config = moe.hf_moe_config(config, cfg_file)
    if moe_config is not None:      # Mixtral: routers and stacked experts instead of the dense ffn
        tensors.update(moe.stack_experts(entries, moe_config, dim=dim, ffn=ffn, n_layers=n_layers,
                                            cfg_file=cfg_file, expert_loader=lambda e: _loader(e.get, None)))
        dense_ffn = moe.dense_ffn_names(n_layers)
        expected = {k: v for k, v in expected.items() if k not in dense_ffn}
    for name, e in entries.items():
        if _DROPPED.fullmatch(name):
            continue
        gguf_name = hf_name_to_gguf(name)
        if gguf_name is None:
            raise LlmconvError("unknown tensor name: no GGUF mapping for it", file=e.file, tensor=name)
        if gguf_name in tensors:
            raise LlmconvError(f"both {tensors[gguf_name].source_name} and {name} map to {gguf_name}", file=e.file, tensor=name)
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= n_layers:
            raise LlmconvError(f"config.json says {n_layers} layers but the checkpoint has more", file=e.file, tensor=name)
        want = expected.get(gguf_name) if gguf_name.endswith(".weight") else \
            (expected[gguf_name[:-len("bias")] + "weight"][0],)
        if tuple(e.shape) != want:
            raise LlmconvError(f"shape {tuple(e.shape)} but config.json (hidden_size={dim}, heads={n_heads}, "
                               f"head_dim={head_dim}, "
                               f"kv_heads={n_kv}, intermediate_size={ffn}, vocab_size={vocab_size}) implies {want}",
                               file=e.file, tensor=name)
        heads = n_heads if ".self_attn.q_proj." in name else n_kv if ".self_attn.k_proj." in name else None
        tensors[gguf_name] = SourceTensor(name=gguf_name, shape=tuple(e.shape), load=_loader(e.get, heads),
                                          files=[e.file], source_name=name, source_dtype=e.dtype)
    for key, want in expected.items():
        if key not in tensors and not (tied and key == tensor_name(MODEL_TENSOR.OUTPUT)):
            raise LlmconvError("tensor missing from the checkpoint", file=model_dir, tensor=key)

    ordered = ordered_tensors(tensors, n_layers)
    extra = _rope_scaling_kvs(scaling, cfg_file)
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "llama3":
        # first, where llama.cpp's converter (and the Meta path) puts it
        ordered.insert(0, _rope_freqs_tensor(scaling, head_dim, theta, cfg_file))

    tok_dir, tok_file = explicit_tokenizer(tokenizer) if tokenizer is not None else (model_dir, None)
    tok_config = read_json(tok_dir / "tokenizer_config.json", required=False)
    gen_config = read_json(model_dir / "generation_config.json", required=False)
    vocab = load_hf_vocab(tok_dir, tok_config, emb_rows, warnings, pre, tok_file)
    check_vocab_size(vocab, emb_rows, tok_file or tok_dir / "tokenizer.model", "model.embed_tokens.weight")
    specials = apply_special_tokens(vocab, tok_dir, tok_config, gen_config)

    h = LlamaHParams(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab_size,
                     ffn_dim=ffn, norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                     context_length=int(ctx_len), family=hf_family(arch, vocab_size, theta, scaling),
                     tied_embeddings=tied, stated_head_dim=stated,
                     n_expert=moe_config.n_expert if moe_config else 0,
                     n_expert_used=moe_config.n_expert_used if moe_config else 0)
    return Source("hf", model_dir, h, vocab, ordered, extra_kvs=extra + special_kvs(specials), warnings=warnings)


def _loader(get: Callable[[], torch.Tensor], heads: int | None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        a = get().to(torch.float32).numpy()
        return np.ascontiguousarray(unpermute_rows(a, heads)) if heads else a
    return load


def ordered_tensors(tensors: dict[str, SourceTensor], n_layers: int) -> list[SourceTensor]:
    """token_embd, then each layer in Meta's order (weights, then biases), then the output."""
    keys = [tensor_name(MODEL_TENSOR.TOKEN_EMBD)]
    for i in range(n_layers):
        keys += [tensor_name(k, i) for k in _LAYER_ORDER] + [tensor_name(k, i, "bias") for k in _LAYER_ORDER]
    keys += [tensor_name(MODEL_TENSOR.OUTPUT_NORM), tensor_name(MODEL_TENSOR.OUTPUT)]
    return [tensors[k] for k in keys if k in tensors]


def _rope_freqs_tensor(scaling: dict, head_dim: int, theta: float, cfg_file: Path) -> SourceTensor:
    from .rope import llama3_rope_factors_from_config
    factors = llama3_rope_factors_from_config(scaling, head_dim, theta, file=cfg_file)
    return SourceTensor(name=tensor_name(MODEL_TENSOR.ROPE_FREQS), shape=tuple(factors.shape),
                        load=lambda: factors.copy(), files=[cfg_file], source_name="rope_scaling (config.json)",
                        source_dtype="f32")


def _rope_scaling_kvs(scaling: dict | None, cfg_file: Path) -> list[KV]:
    if scaling is None:
        return []
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        return []                       # carried by the rope_freqs.weight tensor
    if kind == "linear":
        factor = scaling.get("factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise LlmconvError("rope_scaling linear needs a positive factor", file=cfg_file)
        r = Keys.Rope
        return [KV(r.SCALING_TYPE.format(arch="llama"), "linear", T.STRING),
                KV(r.SCALING_FACTOR.format(arch="llama"), float(factor), T.FLOAT32)]
    raise LlmconvError(f"rope_scaling type {kind!r} is not supported (llama3, linear)", file=cfg_file)
