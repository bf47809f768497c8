"""GGUF metadata (key/value pairs) for a llama-architecture model, from hparams + vocab."""
from __future__ import annotations

from gguf import GGUFValueType as T
from gguf import Keys

from ..formats.gguf_writer import KV
from .hparams import LlamaHParams
from .tokenizer import Vocab

ARCH = "llama"
QUANTIZATION_VERSION = 2  # ggml's current legacy/K-quant block layouts


def general_kvs(name: str, file_type: int, size_label: str | None = None) -> list[KV]:
    kvs = [
        KV(Keys.General.ARCHITECTURE, ARCH, T.STRING),
        KV(Keys.General.NAME, name, T.STRING),
    ]
    if size_label:
        kvs.append(KV(Keys.General.SIZE_LABEL, size_label, T.STRING))
    kvs += [
        KV(Keys.General.FILE_TYPE, int(file_type), T.UINT32),
        KV(Keys.General.QUANTIZATION_VERSION, QUANTIZATION_VERSION, T.UINT32),
    ]
    return kvs


def llama_kvs(h: LlamaHParams) -> list[KV]:
    k = Keys.LLM
    a = Keys.Attention
    r = Keys.Rope
    f = lambda key: key.format(arch=ARCH)  # noqa: E731
    # llama.cpp's converter writes key/value_length whenever the checkpoint states head_dim;
    # llama.cpp needs them when head_dim != dim / n_heads (it defaults to that quotient)
    head = [] if h.stated_head_dim is None else [KV(f(a.KEY_LENGTH), h.stated_head_dim, T.UINT32),
                                                 KV(f(a.VALUE_LENGTH), h.stated_head_dim, T.UINT32)]
    experts = [] if not h.n_expert else [KV(f(k.EXPERT_COUNT), h.n_expert, T.UINT32),
                                         KV(f(k.EXPERT_USED_COUNT), h.n_expert_used, T.UINT32)]
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
    for key, value in ((t.BOS_ID, v.bos_id), (t.EOS_ID, v.eos_id), (t.UNK_ID, v.unk_id), (t.PAD_ID, v.pad_id),
                       (t.EOT_ID, v.eot_id)):
        if value is not None:
            kvs.append(KV(key, value, T.UINT32))
    kvs += [
        KV(t.ADD_BOS, v.add_bos, T.BOOL),
        KV(t.ADD_EOS, v.add_eos, T.BOOL),
    ]
    return kvs
