"""The reference forward pass of each checkpoint layout, in the pieces `llmconv imatrix` runs
layer by layer, and which GGUF imatrix entry each matrix product's input belongs to.

The pieces are verify's float32 reference (verify/reference*.py, verify/moe.py), so the
statistic comes from the same pass that judges converted files:

  hf       Hugging Face LLaMA and Mixtral (config.json; rotate-half Q/K as stored), and Llama 4
           (verify/llama4.py: dense and MoE layers, a shared expert, top-k sigmoid routing)
  meta     Meta's consolidated.NN.pth (params.json; Meta's names and row order)
  mistral  Mistral's own consolidated*.safetensors (params.json; Meta's names and row order),
           dense or Mixtral (`moe` in params.json)

A matmul input is named by the checkpoint tensor it multiplies; `target` maps that name to
(GGUF tensor, expert): expert None for a dense projection (one row of in_sum2), the expert's
index for an expert matrix, whose stacked `ffn_{gate,up,down}_exps` tensor keeps a row
per expert (llama.cpp multiplies them with MUL_MAT_ID). The router (`ffn_gate_inp`) is an
ordinary projection (llama.cpp's MUL_MAT over every token), as is a Llama 4 shared expert.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gguf import MODEL_TENSOR

from ..convert.hf import HF_LAYER_NAMES
from ..convert.moe import HF_EXPERT_NAMES
from ..convert.plan import meta_to_gguf_name, tensor_name


@dataclass
class Runner:
    """One architecture's pieces of the reference forward pass."""

    n_layers: int
    hidden: int
    n_expert: int  # experts of a MoE layer (0: dense)
    embed: Callable  # int64 [T] -> float32 [T, hidden]
    rope: Callable  # T -> (cos, sin)
    layer_weights: Callable  # (i, hooks) -> weights
    # (i, xs, weights, cos, sin, hooks) -> xs: layer i on every chunk of a group (each its own sequence)
    block: Callable
    target: Callable  # checkpoint tensor name -> (GGUF name, expert or None), None: not collected


# The projections of an HF layer (convert's name map without the norms), plus Mixtral's router.
HF_PROJECTIONS = {k: v for k, v in HF_LAYER_NAMES.items() if k.startswith(("self_attn.", "mlp."))} | {
    "block_sparse_moe.gate": MODEL_TENSOR.FFN_GATE_INP,
}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
_META_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")
# a Mixtral expert matrix under a layout's MoE prefix: (expert, w1/w2/w3)
_EXPERT = re.compile(r"(?:block_sparse_moe|feed_forward)\.experts\.(\d+)\.(w[123])")


def _expert_target(layer: str, rest: str) -> tuple[str, int] | None:
    m = _EXPERT.fullmatch(rest)
    if m is None:
        return None
    return tensor_name(HF_EXPERT_NAMES[m.group(2)][0], int(layer)), int(m.group(1))


def hf_target(name: str) -> tuple[str, int | None] | None:
    m = _HF_LAYER.fullmatch(name)
    if m is None:
        return None
    kind = HF_PROJECTIONS.get(m.group(2))
    if kind is not None:
        return tensor_name(kind, int(m.group(1))), None
    return _expert_target(m.group(1), m.group(2))


def meta_target(name: str) -> tuple[str, int | None] | None:
    """Meta's and Mistral's names (`layers.N.attention.wq.weight`, `layers.N.feed_forward.gate.weight`)."""
    m = _META_LAYER.fullmatch(name)
    if m is None:
        return None
    if m.group(2) == "feed_forward.gate":
        return tensor_name(MODEL_TENSOR.FFN_GATE_INP, int(m.group(1))), None
    gguf = meta_to_gguf_name(name)
    if gguf is not None:
        return (gguf, None) if gguf.startswith("blk.") and not gguf.endswith("_norm.weight") else None
    return _expert_target(m.group(1), m.group(2))


def moe_layer_on_group(xs: list, attend: Callable, ffn_norm: Callable, moe: Callable) -> list:
    """A Mixtral layer on a group of chunks: attention chunk by chunk, then the MoE block once
    over all their rows (it treats rows independently), so each expert's weights are read once
    per group rather than once per chunk."""
    import torch

    xs = [x + attend(x) for x in xs]
    out = moe(torch.cat([ffn_norm(x) for x in xs])).split([x.shape[0] for x in xs])
    return [x + y for x, y in zip(xs, out)]


def runner(ckpt_dir: Path, source) -> Runner:
    """`source`: the checkpoint as convert.sources.open_source opened it (its kind says the layout)."""
    if source.kind == "hf":
        return _hf_runner(ckpt_dir)
    if source.kind == "mistral":
        return _mistral_runner(ckpt_dir)
    return _meta_runner(ckpt_dir)


def _hf_runner(ckpt_dir: Path) -> Runner:
    import torch

    from ..convert.hf_files import open_weights, read_json
    from ..convert.llama4_config import is_llama4
    from ..verify import reference_hf as R
    from ..verify.moe import hf_sparse_moe

    cfg = read_json(ckpt_dir / "config.json")
    if is_llama4(cfg):
        return _llama4_runner(ckpt_dir, cfg)
    c = R.HFConfig(cfg, ckpt_dir / "config.json")
    weights, _ = open_weights(ckpt_dir)
    emb = weights["model.embed_tokens.weight"]

    def block(i, xs, w, cos, sin, hooks):
        if c.moe is None:
            return [R.decoder_layer(x, w, c, cos, sin) for x in xs]
        return moe_layer_on_group(
            xs,
            lambda x: R.self_attention(R.llama_rms_norm(x, w["input_layernorm"], c.eps), w, c, cos, sin),
            lambda x: R.llama_rms_norm(x, w["post_attention_layernorm"], c.eps),
            lambda f: hf_sparse_moe(f, i, *c.moe, lambda n: R.f32(weights, n), hooks),
        )

    return Runner(
        c.n_layers,
        c.hidden,
        c.moe[0] if c.moe else 0,
        lambda ids: emb.get()[torch.as_tensor(ids)].to(torch.float32),
        lambda T: R.rotary_cos_sin(c, T),
        lambda i, hooks: R.decoder_layer_weights(weights, i, hooks, dense=c.moe is None),
        block,
        hf_target,
    )


def _meta_runner(ckpt_dir: Path) -> Runner:
    import torch

    from ..convert.meta import open_meta_checkpoint
    from ..verify import reference as R

    ckpt = open_meta_checkpoint(ckpt_dir)
    h = ckpt.hparams
    return Runner(
        h.n_layers,
        h.dim,
        0,
        lambda ids: ckpt.load("tok_embeddings.weight")[torch.as_tensor(ids)].to(torch.float32),
        lambda T: R.rope_tables(R.meta_head_dim(ckpt), T, h.rope_theta, R.llama3_scaling(ckpt.params)),
        lambda i, hooks: R.layer_weights(ckpt, i, hooks),
        lambda i, xs, w, cos, sin, hooks: [R.transformer_block(x, w, h, cos, sin) for x in xs],
        meta_target,
    )


def _mistral_runner(ckpt_dir: Path) -> Runner:
    import torch

    from ..verify import reference as R

    ckpt, h = R.open_mistral(ckpt_dir)

    def block(i, xs, w, cos, sin, hooks):
        if not h.n_expert:
            return [R.transformer_block(x, w, h, cos, sin) for x in xs]
        return moe_layer_on_group(
            xs,
            lambda x: R.mistral_attention(x, w, h, cos, sin),
            lambda x: R.rms_norm(x, w["ffn_norm.weight"], h.norm_eps),
            lambda f: R.mistral_moe(f, h, i, ckpt, hooks),
        )

    return Runner(
        h.n_layers,
        h.dim,
        h.n_expert,
        lambda ids: ckpt.load("tok_embeddings.weight")[torch.as_tensor(ids)].to(torch.float32),
        lambda T: R.rope_tables(h.head_dim, T, h.rope_theta),
        lambda i, hooks: R.layer_weights(ckpt, i, hooks, dense=not h.n_expert),
        block,
        meta_target,
    )


# the Llama 4 reference's names for expert e's slices of the fused tensors (verify/llama4.py)
_LLAMA4_EXPERT = re.compile(r".*layers\.(\d+)\.feed_forward\.experts\.(gate|up|down)\[(\d+)\]")


def _llama4_runner(ckpt_dir: Path, config: dict) -> Runner:
    """Llama 4: dense and MoE layers interleaved; a MoE layer's routed experts are MUL_MAT_ID
    (gate/up see the token scaled by its router sigmoid, as llama.cpp's weight-before-ffn graph
    feeds them), its shared expert and router ordinary projections."""
    import torch

    from ..convert.hf_files import open_weights
    from ..convert.llama4 import hf_to_gguf
    from ..convert.llama4_config import Llama4Config
    from ..verify import llama4 as R

    file = ckpt_dir / "config.json"
    cfg, names = R.RefConfig(config, file), Llama4Config(config, file)
    weights, _ = open_weights(ckpt_dir)
    emb = weights[cfg.prefix + "embed_tokens.weight"]

    def target(name: str):
        m = _LLAMA4_EXPERT.fullmatch(name)
        if m is not None:
            return f"blk.{m.group(1)}.{R.EXPERT_KINDS[m.group(2)]}.weight", int(m.group(3))
        gguf = hf_to_gguf(name, names)
        return (gguf, None) if gguf is not None and gguf.startswith("blk.") else None

    def block(i, xs, lw, cos, sin, hooks):
        def f32(name):
            return hooks.w(name, weights[name].get().to(torch.float32))

        return moe_layer_on_group(
            xs,
            lambda x: R.layer_attention(x, lw, cfg, i, cos, sin, hooks),
            lambda x: R.rms(x, lw["post_attention_layernorm"], cfg.eps),
            lambda f: R.layer_ffn(f, cfg, i, weights, hooks, f32),
        )

    return Runner(
        cfg.n_layers,
        names.dim,
        cfg.n_expert,
        lambda ids: emb.get()[torch.as_tensor(ids)].to(torch.float32),
        lambda T: R.rope_cos_sin(cfg, T),
        lambda i, hooks: R.layer_weights(cfg, i, lambda n: hooks.w(n, weights[n].get().to(torch.float32))),
        block,
        target,
    )
