"""GGUF metadata (key/value pairs) for a llama-architecture model: general.* from the model card,
the rest from hparams + vocab; --override-kv on top."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from gguf import GGUFValueType as T
from gguf import GGML_QUANT_VERSION, GGUFWriter, Keys
from gguf.metadata import Metadata
from gguf.utility import naming_convention, size_label

from ..errors import LlmconvError, load_json
from ..formats.gguf_writer import KV
from .hparams import ARCH, LlamaHParams
from .tokenizer import Vocab


def load_model_metadata(
    model_dir: Path, n_params: int, override: Path | None = None, experts: tuple[int, int, int] | None = None
) -> Metadata:
    """general.* the way llama.cpp's converter fills them (gguf-py's Metadata.load): the model card's
    front matter (README.md), config.json, generation_config.json's sampling settings, the
    directory name's parts (name, finetune, version, size), then `override` (--metadata FILE.json,
    llama.cpp's key names) over all of them. When nothing but the directory names the model,
    general.name is the directory name itself, as llmconv always wrote it."""
    doc = {}
    if override is not None:
        if override.is_dir():
            raise LlmconvError("--metadata: is a directory, expected a JSON file of general.* keys", file=override)
        if not override.is_file():
            raise LlmconvError("--metadata: no such file", file=override)
        doc = load_json(override)  # Metadata.load would skip a missing or non-object file silently
        if not isinstance(doc, dict):
            raise LlmconvError("expected a JSON object of general.* keys", file=override)
    try:
        md = Metadata.load(override, model_dir, None, n_params)
        if Keys.General.LICENSE in doc:  # the one general.* key gguf-py's override leaves out
            md.license = doc[Keys.General.LICENSE]
        from_dir = Metadata.apply_metadata_heuristic(Metadata(), None, None, model_dir, n_params)
    except (ValueError, TypeError, AttributeError, KeyError, yaml.YAMLError) as e:
        raise LlmconvError(
            f"model card or metadata unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
            file=model_dir / "README.md",
        ) from None
    if md.name is None or md.name == from_dir.name:
        md.name = model_dir.resolve().name
    if md.size_label is None and n_params > 0:
        # `experts`: (shared, per-expert, expert count) parameters of a MoE model, for labels like 8x7B
        md.size_label = size_label(n_params, *(experts or (n_params, 0, 0)))
    return md


def default_file_name(md: Metadata, outtype: str) -> str:
    """llama.cpp's convention: Basename-Finetune-Version-Size-TYPE.gguf (Mistral-Nemo-Instruct-2407-12B-Q4_K_M)."""
    return naming_convention(md.name, md.basename, md.finetune, md.version, md.size_label, outtype.upper()) + ".gguf"


def general_kvs(md: Metadata, file_type: int, arch: str = ARCH) -> list[KV]:
    """general.architecture, then every key Metadata.set_gguf_meta_model writes (collected from a
    GGUFWriter that writes nothing), then file_type and quantization_version."""
    w = GGUFWriter(None, arch)
    md.set_gguf_meta_model(w)
    kvs = [KV(Keys.General.ARCHITECTURE, arch, T.STRING)]
    for key, v in w.kv_data[0].items():
        if key == Keys.General.ARCHITECTURE:
            continue
        sub = v.sub_type
        if v.type == T.ARRAY and sub is None:  # tags, languages: lists of strings
            sub = T.STRING
        kvs.append(KV(key, v.value, v.type, sub))
    kvs += [
        KV(Keys.General.FILE_TYPE, int(file_type), T.UINT32),
        KV(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION, T.UINT32),
    ]
    return kvs


# ---- --override-kv KEY=TYPE:VALUE (llama-quantize's syntax) ---------------------------------------

_INT_TYPES = {
    T.UINT8: (0, 2**8 - 1),
    T.INT8: (-(2**7), 2**7 - 1),
    T.UINT16: (0, 2**16 - 1),
    T.INT16: (-(2**15), 2**15 - 1),
    T.UINT32: (0, 2**32 - 1),
    T.INT32: (-(2**31), 2**31 - 1),
    T.UINT64: (0, 2**64 - 1),
    T.INT64: (-(2**63), 2**63 - 1),
}
# the type llama-quantize writes for each override kind when the key is new
_NEW_TYPE = {"int": T.UINT32, "float": T.FLOAT32, "bool": T.BOOL, "str": T.STRING}


@dataclass
class KVOverride:
    key: str
    kind: str  # int, float, bool, str
    value: object


def parse_override_kv(spec: str) -> KVOverride:
    key, eq, rest = spec.partition("=")
    kind, colon, text = rest.partition(":")
    if not eq or not key or not colon or kind not in _NEW_TYPE:
        raise LlmconvError(f"--override-kv {spec!r}: expected KEY=TYPE:VALUE with TYPE int, float, bool or str")
    try:
        value = {"int": int, "float": float, "str": str}.get(kind, lambda t: {"true": True, "false": False}[t])(text)
    except (ValueError, KeyError):
        raise LlmconvError(
            f"--override-kv {spec!r}: {text!r} is not a {kind}" + (" (true or false)" if kind == "bool" else "")
        ) from None
    return KVOverride(key, kind, value)


def apply_kv_overrides(kvs: list[KV], overrides: list[KVOverride]) -> list[KV]:
    """Set each key, in place when it exists. llama-quantize writes int as uint32 and float as float32
    whatever the key held; here an existing key keeps its integer or float type (a uint32 key that
    llama.cpp reads as uint32 stays loadable), a new key gets llama-quantize's type."""
    out = list(kvs)
    at = {kv.key: i for i, kv in enumerate(out)}
    for o in overrides:
        old = out[at[o.key]] if o.key in at else None
        vtype = _NEW_TYPE[o.kind]
        if old is not None and (
            (o.kind == "int" and old.type in _INT_TYPES) or (o.kind == "float" and old.type in (T.FLOAT32, T.FLOAT64))
        ):
            vtype = old.type
        if vtype in _INT_TYPES:
            lo, hi = _INT_TYPES[vtype]
            if not lo <= o.value <= hi:
                raise LlmconvError(f"--override-kv {o.key}: {o.value} does not fit {vtype.name}")
        kv = KV(o.key, o.value, vtype)
        if old is None:
            at[o.key] = len(out)
            out.append(kv)
        else:
            out[at[o.key]] = kv
    return out


def llama_kvs(h: LlamaHParams) -> list[KV]:
    k = Keys.LLM
    a = Keys.Attention
    r = Keys.Rope
    f = lambda key: key.format(arch=h.arch)  # noqa: E731
    # llama.cpp's converter writes key/value_length whenever the checkpoint states head_dim;
    # llama.cpp needs them when head_dim != dim / n_heads (it defaults to that quotient)
    head = (
        []
        if h.stated_head_dim is None
        else [KV(f(a.KEY_LENGTH), h.stated_head_dim, T.UINT32), KV(f(a.VALUE_LENGTH), h.stated_head_dim, T.UINT32)]
    )
    experts = (
        []
        if not h.n_expert
        else [KV(f(k.EXPERT_COUNT), h.n_expert, T.UINT32), KV(f(k.EXPERT_USED_COUNT), h.n_expert_used, T.UINT32)]
    )
    return [
        KV(f(k.VOCAB_SIZE), h.vocab_size, T.UINT32),
        KV(f(k.CONTEXT_LENGTH), h.context_length, T.UINT32),
        KV(f(k.EMBEDDING_LENGTH), h.dim, T.UINT32),
        KV(f(k.BLOCK_COUNT), h.n_layers, T.UINT32),
        KV(f(k.FEED_FORWARD_LENGTH), h.ffn_dim, T.UINT32),
        KV(f(r.DIMENSION_COUNT), h.rope_dim, T.UINT32),
        KV(f(a.HEAD_COUNT), h.n_heads, T.UINT32),
        KV(f(a.HEAD_COUNT_KV), h.n_kv_heads, T.UINT32),
        *head,
        KV(f(a.LAYERNORM_RMS_EPS), h.norm_eps, T.FLOAT32),
        KV(f(r.FREQ_BASE), h.rope_theta, T.FLOAT32),
        *experts,
    ]


def vocab_kvs(v: Vocab) -> list[KV]:
    t = Keys.Tokenizer
    kvs = [
        KV(t.MODEL, v.model, T.STRING),
    ]
    if v.pre is not None:
        kvs.append(KV(t.PRE, v.pre, T.STRING))
    kvs += [
        KV(t.LIST, v.tokens, T.ARRAY, T.STRING),
    ]
    if v.scores:  # BPE vocabularies have none (llama.cpp's gpt2 tokenizer does not read them)
        kvs.append(KV(t.SCORES, v.scores, T.ARRAY, T.FLOAT32))
    kvs += [
        KV(t.TOKEN_TYPE, v.token_types, T.ARRAY, T.INT32),
    ]
    if v.merges:
        kvs.append(KV(t.MERGES, v.merges, T.ARRAY, T.STRING))
    for key, value in (
        (t.BOS_ID, v.bos_id),
        (t.EOS_ID, v.eos_id),
        (t.UNK_ID, v.unk_id),
        (t.PAD_ID, v.pad_id),
        (t.EOT_ID, v.eot_id),
    ):
        if value is not None:
            kvs.append(KV(key, value, T.UINT32))
    kvs += [
        KV(t.ADD_BOS, v.add_bos, T.BOOL),
        KV(t.ADD_EOS, v.add_eos, T.BOOL),
    ]
    return kvs
