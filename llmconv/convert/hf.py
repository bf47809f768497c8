"""Hugging Face checkpoints: config.json + model*.safetensors (or pytorch_model*.bin) + tokenizer.

What differs from a Meta checkpoint, and how it is undone here:
  - names: `model.layers.N.self_attn.q_proj.weight` instead of `layers.N.attention.wq.weight`;
  - Q and K rows: HF's conversion script reorders each head's rows so that rotary embedding
    pairs (x[i], x[i + head_dim/2]) ("rotate half") instead of Meta's adjacent (x[2i], x[2i+1]).
    llama.cpp's llama architecture rotates adjacent pairs, so the rows are put back in Meta
    order: per head, HF row p * head_dim/2 + j holds Meta row 2j + p. Q has n_head heads,
    K has n_head_kv; a bias is reordered like its weight's rows;
  - weights are one file, or shards listed by an index file (hf_files.py), read in rows with pread;
  - the embedding may be tied to the output (no lm_head): then there is no `output.weight`
    and llama.cpp uses `token_embd.weight` for both.
config.json is read in hf_config.py and the tokenizer files in hf_tokenizer.py; this module maps
the tensors and puts the Source together.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import MODEL_TENSOR

from ..errors import LlmconvError
from ..formats.rawread import read_rows_unpermuted
from . import moe
from .guards import check_layer_count
from .hf_config import HFConfig, read_hf_config, rope_freqs_tensor, rope_scaling_kvs
from .hf_files import WeightEntry, open_weights
from .hf_tokenizer import load_hf_tokenizer
from .hparams import LlamaHParams
from .meta_params import expected_shapes
from .plan import SourceTensor, meta_to_gguf_name, tensor_name

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
_LAYER_ORDER = [
    MODEL_TENSOR.ATTN_Q,
    MODEL_TENSOR.ATTN_K,
    MODEL_TENSOR.ATTN_V,
    MODEL_TENSOR.ATTN_OUT,
    MODEL_TENSOR.FFN_GATE,
    MODEL_TENSOR.FFN_DOWN,
    MODEL_TENSOR.FFN_UP,
    *moe.LAYER_ORDER,
    MODEL_TENSOR.ATTN_NORM,
    MODEL_TENSOR.FFN_NORM,
]


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


# ---- the source ------------------------------------------------------------------------------


def open_hf_source(model_dir: Path, ctx: int | None = None, pre: str | None = None, tokenizer: Path | None = None):
    """`pre` overrides the detected tokenizer.ggml.pre of a tokenizer.json BPE vocabulary;
    `tokenizer` (--tokenizer) is a folder holding the tokenizer files, or one tokenizer file."""
    from .source import Source

    model_dir = Path(model_dir)
    warnings: list[str] = []
    cfg = read_hf_config(model_dir / "config.json", ctx, warnings)
    entries, files = open_weights(model_dir)
    emb_rows, vocab_size = _embedding_rows(entries, files, cfg)
    tied = _drop_tied_output(entries, cfg, warnings)
    check_layer_count(cfg.n_layers, entries, cfg.file, "num_hidden_layers")
    moe_config = moe.hf_moe_config(cfg.raw, cfg.file)
    tensors = _map_tensors(entries, cfg, vocab_size, moe_config)
    for key in _expected(cfg, vocab_size, moe_config):
        if key not in tensors and not (tied and key == tensor_name(MODEL_TENSOR.OUTPUT)):
            raise LlmconvError("tensor missing from the checkpoint", file=model_dir, tensor=key)

    ordered = ordered_tensors(tensors, cfg.n_layers)
    extra = rope_scaling_kvs(cfg.scaling, cfg.file)
    if cfg.scaling is not None and cfg.scaling.get("rope_type", cfg.scaling.get("type")) == "llama3":
        # first, where llama.cpp's converter (and the Meta path) puts it
        ordered.insert(0, rope_freqs_tensor(cfg.scaling, cfg.head_dim, cfg.theta, cfg.file))
    vocab, special = load_hf_tokenizer(model_dir, tokenizer, emb_rows, warnings, pre)

    h = LlamaHParams(
        dim=cfg.dim,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv,
        vocab_size=vocab_size,
        ffn_dim=cfg.ffn,
        norm_eps=cfg.norm_eps,
        rope_theta=cfg.theta,
        context_length=cfg.ctx_len,
        family=cfg.family(vocab_size),
        tied_embeddings=tied,
        stated_head_dim=cfg.stated_head_dim,
        n_expert=moe_config.n_expert if moe_config else 0,
        n_expert_used=moe_config.n_expert_used if moe_config else 0,
    )
    return Source("hf", model_dir, h, vocab, ordered, extra_kvs=extra + special, warnings=warnings)


def _embedding_rows(entries: dict[str, WeightEntry], files: list[Path], cfg: HFConfig) -> tuple[int, int]:
    """(embedding rows, vocab_size): config.json's vocab_size must be the embedding's row count."""
    if "model.embed_tokens.weight" not in entries:
        raise LlmconvError(
            "checkpoint has no model.embed_tokens.weight", file=files[0], tensor="model.embed_tokens.weight"
        )
    emb_rows = entries["model.embed_tokens.weight"].shape[0]
    vocab_size = cfg.raw.get("vocab_size", emb_rows)
    if vocab_size != emb_rows:
        raise LlmconvError(
            f"vocab_size {vocab_size} != embedding rows {emb_rows}", file=cfg.file, tensor="model.embed_tokens.weight"
        )
    return emb_rows, vocab_size


def _drop_tied_output(entries: dict[str, WeightEntry], cfg: HFConfig, warnings: list[str]) -> bool:
    """Whether the output reuses the embedding (then no lm_head.weight is left in `entries`)."""
    tie = cfg.raw.get("tie_word_embeddings")
    if tie and "lm_head.weight" in entries:
        warnings.append("lm_head.weight ignored: tie_word_embeddings is set, so the output reuses the embedding")
        del entries["lm_head.weight"]
    elif "lm_head.weight" not in entries and tie is False:
        warnings.append(
            "config.json says tie_word_embeddings false but there is no lm_head.weight: the output reuses the embedding"
        )
    return "lm_head.weight" not in entries


def _expected(cfg: HFConfig, vocab_size: int, moe_config) -> dict[str, tuple[int, ...]]:
    """GGUF name -> the shape config.json implies (a MoE model's dense ffn tensors are not expected)."""
    expected = {
        meta_to_gguf_name(k): v
        for k, v in expected_shapes(
            cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv, cfg.ffn, vocab_size, cfg.head_dim
        ).items()
    }
    if moe_config is not None:
        dense_ffn = moe.dense_ffn_names(cfg.n_layers)
        expected = {k: v for k, v in expected.items() if k not in dense_ffn}
    return expected


def _map_tensors(
    entries: dict[str, WeightEntry], cfg: HFConfig, vocab_size: int, moe_config
) -> dict[str, SourceTensor]:
    """GGUF name -> SourceTensor for every stored tensor, each checked against its expected shape."""
    expected = _expected(cfg, vocab_size, moe_config)
    tensors: dict[str, SourceTensor] = {}
    if moe_config is not None:  # Mixtral: routers and stacked experts instead of the dense ffn
        tensors.update(
            moe.stack_experts(
                entries,
                moe_config,
                dim=cfg.dim,
                ffn=cfg.ffn,
                n_layers=cfg.n_layers,
                cfg_file=cfg.file,
                expert_loader=lambda e: weight_loader(e, None),
            )
        )
    for name, e in entries.items():
        if _DROPPED.fullmatch(name):
            continue
        gguf_name = hf_name_to_gguf(name)
        if gguf_name is None:
            raise LlmconvError("unknown tensor name: no GGUF mapping for it", file=e.file, tensor=name)
        if gguf_name in tensors:
            raise LlmconvError(
                f"both {tensors[gguf_name].source_name} and {name} map to {gguf_name}", file=e.file, tensor=name
            )
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= cfg.n_layers:
            raise LlmconvError(
                f"config.json says {cfg.n_layers} layers but the checkpoint has more", file=e.file, tensor=name
            )
        want = (
            expected.get(gguf_name)
            if gguf_name.endswith(".weight")
            else (expected[gguf_name[: -len("bias")] + "weight"][0],)
        )
        if tuple(e.shape) != want:
            raise LlmconvError(
                f"shape {tuple(e.shape)} but config.json (hidden_size={cfg.dim}, heads={cfg.n_heads}, "
                f"head_dim={cfg.head_dim}, kv_heads={cfg.n_kv}, intermediate_size={cfg.ffn}, "
                f"vocab_size={vocab_size}) implies {want}",
                file=e.file,
                tensor=name,
            )
        heads = cfg.n_heads if ".self_attn.q_proj." in name else cfg.n_kv if ".self_attn.k_proj." in name else None
        tensors[gguf_name] = entry_tensor(gguf_name, e, name, heads)
    return tensors


def entry_tensor(gguf_name: str, e: WeightEntry, source_name: str, heads: int | None = None) -> SourceTensor:
    """The SourceTensor of a checkpoint entry (HF, Mistral, Llama 4): read by pread where the
    entry's bytes are placed, Q/K rows unpermuted when `heads` is given."""
    return SourceTensor(
        name=gguf_name,
        shape=tuple(e.shape),
        load=weight_loader(e, heads),
        files=[e.file],
        source_name=source_name,
        source_dtype=e.dtype,
        read_rows=weight_rows(e, heads),
        prefetch=e.raw.prefetch if e.raw is not None else None,
    )


def weight_loader(e: WeightEntry, heads: int | None) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        if e.raw is not None:
            a = e.raw.load()
        else:
            import torch  # only for a tensor pread cannot place

            a = e.get().to(torch.float32).numpy()
        return np.ascontiguousarray(unpermute_rows(a, heads)) if heads else a

    return load


def weight_rows(e: WeightEntry, heads: int | None):
    """The streaming engine's read_rows for a weight (None: the engine loads it whole)."""
    if e.raw is None or (heads and len(e.shape) != 2):
        return None
    if heads:
        return lambda a, b, out, raw=e.raw: read_rows_unpermuted(raw, heads, a, b, out)
    return e.raw.read_rows


def ordered_tensors(tensors: dict[str, SourceTensor], n_layers: int) -> list[SourceTensor]:
    """token_embd, then each layer in Meta's order (weights, then biases), then the output."""
    keys = [tensor_name(MODEL_TENSOR.TOKEN_EMBD)]
    for i in range(n_layers):
        keys += [tensor_name(k, i) for k in _LAYER_ORDER] + [tensor_name(k, i, "bias") for k in _LAYER_ORDER]
    keys += [tensor_name(MODEL_TENSOR.OUTPUT_NORM), tensor_name(MODEL_TENSOR.OUTPUT)]
    return [tensors[k] for k in keys if k in tensors]
