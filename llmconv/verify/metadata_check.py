"""Every metadata key that changes how llama.cpp runs or tokenizes, compared with what the
checkpoint's own config says (read by llmconv's checkpoint readers: params.json / config.json,
tokenizer_config.json, generation_config.json, the tokenizer model).

A value that differs is a failure. A key the checkpoint implies but the file lacks is a failure
for the tokenizer's behaviour (special ids, add_bos/add_eos, the chat template, the
pre-tokenizer) and the context length, where llama.cpp's default is a different behaviour; an
absent hyperparameter takes llama.cpp's default, and the forward passes show whether that
matters. `tokenizer.ggml.pre` must also be a name llama.cpp knows: an unknown one makes
llama.cpp refuse the file (recent builds) or fall back to its default split (older ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import Keys

from .model_file import ModelFile

# tokenizer.ggml.pre values llama.cpp's llama-vocab.cpp recognises (a data table carried over
# from llama.cpp; names added there since are accepted with a note, see check_pre)
LLAMA_CPP_PRE = frozenset(
    """
default llama3 llama-v3 llama-bpe falcon3 deepseek-llm deepseek-coder deepseek-v3 falcon mpt
starcoder gpt-2 phi-2 jina-es jina-de gigachat jina-v1-en jina-v2-es jina-v2-de jina-v2-code
roberta-bpe refact command-r qwen2 stablelm2 olmo dbrx smaug-bpe poro-chat chatglm-bpe glm4 viking
jais tekken smollm codeshell bloom gpt3-finnish exaone exaone4 chameleon minerva-7b megrez gpt-4o
superbpe trillion bailingmoe seed-coder hunyuan kimi-k2 grok-2 pixtral deepseek-r1-qwen llama4
""".split()
)


@dataclass
class MetadataDifference:
    key: str
    file: Any  # None: absent from the file
    source: Any  # None: the checkpoint implies no value
    failure: bool  # False: worth a note, not a different behaviour

    def as_dict(self) -> dict:
        return {"key": self.key, "file": _plain(self.file), "source": _plain(self.source), "failure": self.failure}

    def message(self) -> str:
        if self.source is None:
            return f"metadata {self.key} = {_short(self.file)} in the file; the checkpoint implies none"
        if self.file is None:
            return f"metadata {self.key} is missing from the file; the checkpoint has {_short(self.source)}"
        return f"metadata {self.key} = {_short(self.file)} in the file, but the checkpoint has {_short(self.source)}"


def _plain(v):
    if isinstance(v, list) and len(v) > 8:
        return f"[{len(v)} items]"
    return v


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.7g}"  # float32 keys read back as 9.999999747378752e-06: say 1e-05
    if isinstance(v, str) and len(v) > 60:
        return repr(v[:57] + "...")
    if isinstance(v, list):
        return f"[{len(v)} items]"
    return repr(v) if isinstance(v, str) else str(v)


def _arch(key: str, arch: str = "llama") -> str:
    return key.format(arch=arch)


# hyperparameters: compared when both sides have them ({arch}: the file's general.architecture)
HPARAM_TEMPLATES = (
    Keys.LLM.VOCAB_SIZE,
    Keys.LLM.EMBEDDING_LENGTH,
    Keys.LLM.BLOCK_COUNT,
    Keys.LLM.FEED_FORWARD_LENGTH,
    Keys.Attention.HEAD_COUNT,
    Keys.Attention.HEAD_COUNT_KV,
    Keys.Attention.KEY_LENGTH,
    Keys.Attention.VALUE_LENGTH,
    Keys.Attention.LAYERNORM_RMS_EPS,
    Keys.Rope.FREQ_BASE,
    Keys.Rope.DIMENSION_COUNT,
    Keys.Rope.SCALING_TYPE,
    Keys.Rope.SCALING_FACTOR,
    Keys.Rope.SCALING_ORIG_CTX_LEN,
    Keys.LLM.EXPERT_COUNT,
    Keys.LLM.EXPERT_USED_COUNT,
    Keys.LLM.INTERLEAVE_MOE_LAYER_STEP,
    Keys.LLM.EXPERT_FEED_FORWARD_LENGTH,
)
HPARAM_KEYS = [_arch(k) for k in HPARAM_TEMPLATES]
# behaviour keys that must be present when the checkpoint implies them
T = Keys.Tokenizer
TOKENIZER_KEYS = [
    T.MODEL,
    T.PRE,
    T.BOS_ID,
    T.EOS_ID,
    T.EOT_ID,
    T.EOM_ID,
    T.UNK_ID,
    T.PAD_ID,
    T.ADD_BOS,
    T.ADD_EOS,
    T.CHAT_TEMPLATE,
]
REQUIRED_KEYS = [_arch(Keys.LLM.CONTEXT_LENGTH)] + TOKENIZER_KEYS
# tokenizer tables (the token texts are compared id by id elsewhere)
TABLE_KEYS = [T.MERGES, T.TOKEN_TYPE, T.SCORES]


def expected_kvs(source) -> dict[str, Any]:
    """The metadata a faithful conversion of `source` carries (llmconv's reading of its config)."""
    from ..convert.metadata import llama_kvs, vocab_kvs

    out = {kv.key: kv.value for kv in llama_kvs(source.hparams) + list(source.extra_kvs) + vocab_kvs(source.vocab)}
    out.pop(T.LIST, None)
    return out


def same(a, b) -> bool:
    if isinstance(b, bool) or isinstance(a, bool):
        return bool(a) == bool(b) and isinstance(a, bool) == isinstance(b, bool)
    if isinstance(b, float) or isinstance(a, float):
        try:
            return bool(np.isclose(float(a), float(b), rtol=1e-6, atol=0))
        except (TypeError, ValueError):
            return False
    if isinstance(b, list) and isinstance(a, list):
        if len(a) != len(b):
            return False
        if b and isinstance(b[0], float):
            return bool(np.allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-6, atol=1e-7))
        return [_text(x) for x in a] == [_text(x) for x in b]
    return _text(a) == _text(b)


def _text(v):
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def metadata_differences(mf: ModelFile, source) -> list[MetadataDifference]:
    want = expected_kvs(source)
    out = []
    arch = mf.get("general.architecture") or "llama"
    if arch != source.hparams.arch:
        out.append(MetadataDifference("general.architecture", arch, source.hparams.arch, True))
    required = [_arch(Keys.LLM.CONTEXT_LENGTH, arch)] + TOKENIZER_KEYS
    # legacy ggml files carry neither tokenizer metadata nor a context length
    for key in [_arch(k, arch) for k in HPARAM_TEMPLATES] + (required + TABLE_KEYS if mf.kind == "gguf" else []):
        got, src = mf.get(key), want.get(key)
        if key == _arch(Keys.Attention.KEY_LENGTH, arch) and src is None and got is not None:
            src = source.hparams.head_dim  # stated explicitly: still must match
        if key == _arch(Keys.Attention.VALUE_LENGTH, arch) and src is None and got is not None:
            src = source.hparams.head_dim
        if got is None and src is None:
            continue
        if got is not None and src is not None:
            if not same(got, src):
                out.append(MetadataDifference(key, got, src, True))
        elif got is None:
            if key in required:
                out.append(MetadataDifference(key, None, src, True))
        else:
            out.append(MetadataDifference(key, got, None, False))
    for key in mf.kvs:  # named chat templates (tokenizer.chat_template.NAME)
        if key.startswith(T.CHAT_TEMPLATE + ".") and not same(mf.kvs[key], want.get(key)):
            out.append(MetadataDifference(key, mf.kvs[key], want.get(key), want.get(key) is not None))
    return out


def unknown_pre(mf: ModelFile) -> str | None:
    pre = mf.get(T.PRE)
    if pre is None or mf.get(T.MODEL) != "gpt2" or pre in LLAMA_CPP_PRE:
        return None
    return (
        f"metadata {T.PRE} = {pre!r} is not a pre-tokenizer llama.cpp knows: llama.cpp refuses the file "
        "or splits text with its default regex"
    )
