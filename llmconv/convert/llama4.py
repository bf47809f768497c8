"""Llama 4 (text): Hugging Face `Llama4ForConditionalGeneration` / `Llama4ForCausalLM` -> llama.cpp's
`llama4` architecture, as llama.cpp's converter (`Llama4Model`) writes it.

config.json: Llama4ForConditionalGeneration keeps the text model's settings in `text_config` (and
the vision tower's in `vision_config`); Llama4ForCausalLM has them at the top. Tensors, per layer N
(`language_model.model.` in front for the multimodal class, `model.` for the text-only one):

    self_attn.{q,k,v,o}_proj.weight           Q/K rows in Meta's order (Llama 4 rotates adjacent
                                              pairs, like llama.cpp: nothing is un-permuted)
    input_layernorm / post_attention_layernorm
  a dense layer:
    feed_forward.{gate,up,down}_proj.weight   intermediate_size_mlp wide
  a MoE layer (every interleave_moe_layer_step-th):
    feed_forward.router.weight                [n_expert, dim]                -> ffn_gate_inp (f32)
    feed_forward.experts.gate_up_proj         [n_expert, dim, 2 * ffn]       x @ W: gate columns, then up
    feed_forward.experts.down_proj            [n_expert, ffn, dim]           x @ W
    feed_forward.shared_expert.{gate,up,down}_proj.weight  (ffn wide)        -> ffn_*_shexp

The fused experts are stored transposed (the input is multiplied from the left), so each
expert's slice is transposed into llama.cpp's [rows, cols]: ffn_gate_exps[e] = gate_up[e][:, :ffn]^T,
ffn_up_exps[e] = gate_up[e][:, ffn:]^T, ffn_down_exps[e] = down[e]^T. One expert is read at a
time (a safetensors slice), so a stacked tensor is never whole in memory.

llama.cpp's llama4 graph fixes several of Llama 4's settings instead of reading them: no RoPE
(and full instead of chunked attention, with temperature tuning) on every 4th layer, chunked
attention over 8192 tokens, temperature tuning with floor 8192 and scale 0.1, and the L2 QK-norm
on RoPE layers unless the model has 128 experts. A checkpoint that says otherwise would run
differently in llama.cpp: it is refused, naming the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import MODEL_TENSOR

from ..errors import LlmconvError
from .llama4_config import Llama4Config, is_moe_layer
from .moe import stacked_tensor, _named
from .plan import SourceTensor, tensor_name

# HF name inside a layer -> GGUF kind
_LAYER_NAMES = {
    "self_attn.q_proj.weight": MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj.weight": MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj.weight": MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj.weight": MODEL_TENSOR.ATTN_OUT,
    "input_layernorm.weight": MODEL_TENSOR.ATTN_NORM,
    "post_attention_layernorm.weight": MODEL_TENSOR.FFN_NORM,
}
_DENSE_NAMES = {
    "feed_forward.gate_proj.weight": MODEL_TENSOR.FFN_GATE,
    "feed_forward.down_proj.weight": MODEL_TENSOR.FFN_DOWN,
    "feed_forward.up_proj.weight": MODEL_TENSOR.FFN_UP,
}
_MOE_NAMES = {
    "feed_forward.router.weight": MODEL_TENSOR.FFN_GATE_INP,
    "feed_forward.shared_expert.gate_proj.weight": MODEL_TENSOR.FFN_GATE_SHEXP,
    "feed_forward.shared_expert.down_proj.weight": MODEL_TENSOR.FFN_DOWN_SHEXP,
    "feed_forward.shared_expert.up_proj.weight": MODEL_TENSOR.FFN_UP_SHEXP,
}
GATE_UP, DOWN = "feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"
# the output order of a layer's tensors
_LAYER_ORDER = [
    MODEL_TENSOR.ATTN_Q,
    MODEL_TENSOR.ATTN_K,
    MODEL_TENSOR.ATTN_V,
    MODEL_TENSOR.ATTN_OUT,
    MODEL_TENSOR.FFN_GATE,
    MODEL_TENSOR.FFN_DOWN,
    MODEL_TENSOR.FFN_UP,
    MODEL_TENSOR.FFN_GATE_INP,
    MODEL_TENSOR.FFN_GATE_EXP,
    MODEL_TENSOR.FFN_DOWN_EXP,
    MODEL_TENSOR.FFN_UP_EXP,
    MODEL_TENSOR.FFN_GATE_SHEXP,
    MODEL_TENSOR.FFN_DOWN_SHEXP,
    MODEL_TENSOR.FFN_UP_SHEXP,
    MODEL_TENSOR.ATTN_NORM,
    MODEL_TENSOR.FFN_NORM,
]
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


def hf_to_gguf(name: str, cfg: Llama4Config) -> str | None:
    """The GGUF name of a non-expert tensor, None when it is not one of the text model's."""
    if name == cfg.prefix + "embed_tokens.weight":
        return tensor_name(MODEL_TENSOR.TOKEN_EMBD)
    if name == cfg.prefix + "norm.weight":
        return tensor_name(MODEL_TENSOR.OUTPUT_NORM)
    if name == cfg.lm_head:
        return tensor_name(MODEL_TENSOR.OUTPUT)
    m = re.fullmatch(re.escape(cfg.prefix) + r"layers\.(\d+)\.(.+)", name)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    kinds = {**_LAYER_NAMES, **(_MOE_NAMES if is_moe_layer(layer, cfg.moe_step) else _DENSE_NAMES)}
    return tensor_name(kinds[rest], layer) if rest in kinds else None


def _unmapped(name: str, cfg: Llama4Config) -> str:
    m = re.fullmatch(re.escape(cfg.prefix) + r"layers\.(\d+)\.(.+)", name)
    if m and (m.group(2) in _MOE_NAMES or m.group(2).startswith("feed_forward.experts.")):
        return f"a MoE tensor in layer {m.group(1)}, which interleave_moe_layer_step {cfg.moe_step} makes a dense layer"
    if m and m.group(2) in _DENSE_NAMES:
        return (
            f"a dense feed-forward tensor in layer {m.group(1)}, which interleave_moe_layer_step "
            f"{cfg.moe_step} makes a MoE layer"
        )
    return "unknown tensor name: no llama4 GGUF mapping for it"


def expert_tensors(entries: dict, cfg: Llama4Config, layer: int, loader: Callable) -> dict[str, SourceTensor]:
    """The three stacked expert tensors of a MoE layer, each expert's slice transposed from the
    fused HF tensors. `loader(entry, expert, cols)` reads expert `expert`'s [dim, cols] slice
    (cols a slice of the last axis) as float32, transposed."""
    p = f"{cfg.prefix}layers.{layer}."
    E, f, d = cfg.n_expert, cfg.ffn_moe, cfg.dim
    out = {}
    for hf_name, want in ((GATE_UP, (E, d, 2 * f)), (DOWN, (E, f, d))):
        e = entries.get(p + hf_name)
        if e is None:
            raise LlmconvError("tensor missing from the checkpoint", file=cfg.file.parent, tensor=p + hf_name)
        if tuple(e.shape) != want:
            raise LlmconvError(
                f"shape {tuple(e.shape)} but {cfg.file.name} (hidden_size {d}, intermediate_size {f}, "
                f"{E} experts) implies {want}",
                file=e.file,
                tensor=p + hf_name,
            )
    gate_up, down = entries[p + GATE_UP], entries[p + DOWN]
    for kind, entry, cols, what in (
        (MODEL_TENSOR.FFN_GATE_EXP, gate_up, slice(0, f), "[:, :ffn]"),
        (MODEL_TENSOR.FFN_DOWN_EXP, down, slice(None), ""),
        (MODEL_TENSOR.FFN_UP_EXP, gate_up, slice(f, 2 * f), "[:, ffn:]"),
    ):
        name = tensor_name(kind, layer)
        hf_name = p + (GATE_UP if entry is gate_up else DOWN)
        parts = [_named(loader(entry, x, cols), entry.file, f"{hf_name}[{x}]{what}") for x in range(E)]
        rows_cols = (d, f) if kind == MODEL_TENSOR.FFN_DOWN_EXP else (f, d)
        out[name] = stacked_tensor(
            name, parts, rows_cols, files=[entry.file], dtype=entry.dtype, source_name=f"{hf_name}{what} (transposed)"
        )
    return out


def expert_slice_loader(entry, expert: int, cols: slice) -> Callable[[], np.ndarray]:
    """Expert `expert` of a fused [n_expert, in, out] tensor, columns `cols`, transposed to
    [out, in] float32: only that expert's bytes are read (a safetensors slice)."""
    import torch

    def load() -> np.ndarray:
        part = entry.get_expert(expert) if entry.get_expert is not None else entry.get()[expert]
        return np.ascontiguousarray(part[:, cols].to(torch.float32).numpy().T)

    return load


def ordered(tensors: dict[str, SourceTensor], n_layers: int) -> list[SourceTensor]:
    keys = [tensor_name(MODEL_TENSOR.TOKEN_EMBD)]
    for i in range(n_layers):
        keys += [tensor_name(k, i) for k in _LAYER_ORDER]
    keys += [tensor_name(MODEL_TENSOR.OUTPUT_NORM), tensor_name(MODEL_TENSOR.OUTPUT)]
    return [tensors[k] for k in keys if k in tensors]


def open_llama4_source(model_dir: Path, ctx: int | None = None, pre: str | None = None, tokenizer: Path | None = None):
    """A Llama 4 Hugging Face checkpoint as a Source of llama4 tensors and keys."""
    from .guards import check_layer_count
    from .hf_config import rope_freqs_tensor, rope_settings
    from .hf_files import open_weights, read_json
    from .hf_tokenizer import load_hf_tokenizer
    from .source import Source

    cfg_file = model_dir / "config.json"
    config = read_json(cfg_file)
    cfg = Llama4Config(config, cfg_file)
    warnings: list[str] = []
    notes: list[str] = []
    if config.get("auto_map"):
        warnings.append(f"{cfg_file.name}: auto_map (custom model code) ignored")
    theta, scaling = rope_settings(cfg.text)
    ctx_len = ctx or cfg.text.get("max_position_embeddings")
    if not isinstance(ctx_len, int) or isinstance(ctx_len, bool) or ctx_len <= 0:
        raise LlmconvError("max_position_embeddings missing or not a positive integer", file=cfg_file)

    entries, files = open_weights(model_dir)
    vision = [n for n in entries if n.startswith(VISION_PREFIXES)]
    for n in vision:
        del entries[n]
    if vision:
        notes.append(
            f"vision tower skipped: {len(vision)} tensors (vision_model.*, multi_modal_projector.*); "
            f"the text model is converted (llama.cpp reads the vision tower from a separate mmproj file)"
        )
    embd = cfg.prefix + "embed_tokens.weight"
    if embd not in entries:
        raise LlmconvError("checkpoint has no text embedding", file=files[0], tensor=embd)
    tied = bool(cfg.text.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    if tied and cfg.lm_head in entries:
        warnings.append(f"{cfg.lm_head} ignored: tie_word_embeddings is set, so the output reuses the embedding")
        del entries[cfg.lm_head]
    tied = cfg.lm_head not in entries
    check_layer_count(cfg.n_layers, [n.removeprefix("language_model.") for n in entries], cfg_file, "num_hidden_layers")

    tensors = _map_tensors(entries, cfg, model_dir, tied)
    out = ordered(tensors, cfg.n_layers)
    extra = list(cfg.extra_kvs())
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise LlmconvError(f"rope_scaling type {kind!r}: Llama 4 uses llama3 scaling (or none)", file=cfg_file)
        out.insert(0, rope_freqs_tensor(scaling, cfg.head_dim, theta, cfg_file))

    vocab, special = load_hf_tokenizer(model_dir, tokenizer, entries[embd].shape[0], warnings, pre)
    h = cfg.hparams(int(ctx_len), theta, tied)
    return Source("hf", model_dir, h, vocab, out, extra_kvs=extra + special, warnings=warnings, notes=notes)


def _map_tensors(entries: dict, cfg: Llama4Config, model_dir: Path, tied: bool) -> dict[str, SourceTensor]:
    """GGUF name -> SourceTensor: each MoE layer's fused experts split per expert, every other
    tensor mapped and checked against the shape config.json implies."""
    from .hf import entry_tensor

    cfg_file = model_dir / "config.json"
    expected = cfg.expected_shapes()
    tensors: dict[str, SourceTensor] = {}
    for i in range(cfg.n_layers):
        if is_moe_layer(i, cfg.moe_step):
            tensors.update(expert_tensors(entries, cfg, i, expert_slice_loader))
            for n in (GATE_UP, DOWN):
                del entries[f"{cfg.prefix}layers.{i}.{n}"]
    for name, e in entries.items():
        gguf_name = hf_to_gguf(name, cfg)
        if gguf_name is None:
            raise LlmconvError(_unmapped(name, cfg), file=e.file, tensor=name)
        if tuple(e.shape) != expected.get(gguf_name):
            raise LlmconvError(
                f"shape {tuple(e.shape)} but {cfg_file.name} implies {expected.get(gguf_name)}",
                file=e.file,
                tensor=name,
            )
        tensors[gguf_name] = entry_tensor(gguf_name, e, name)
    for key in expected:
        if key not in tensors and not (tied and key == tensor_name(MODEL_TENSOR.OUTPUT)):
            raise LlmconvError("tensor missing from the checkpoint", file=model_dir, tensor=key)
    return tensors
