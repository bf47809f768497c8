"""Mixture-of-experts feed-forward for verify's two forward passes (Mixtral).

Both sides route the same way, each written from its own side's definition:

  reference (PyTorch, Hugging Face's MixtralSparseMoeBlock, checkpoint names and layout):
      p = softmax(x Wgate^T) over the experts (float32); the top-k experts by p, weights
      p_top / sum(p_top); out = sum over chosen e of weight_e * w2_e(silu(w1_e x) * w3_e x)
  candidate (numpy, llama.cpp's build_moe_ffn as the llama graph calls it: softmax gating,
      top-k, weights renormalised): the router `ffn_gate_inp`, the experts as slices of the
      stacked `ffn_{gate,up,down}_exps` tensors of the file.

Experts are read one at a time on both sides.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch


# ---- reference (checkpoint) ----------------------------------------------------------------


def hf_moe_settings(cfg: dict) -> tuple[int, int] | None:
    """(num_local_experts, num_experts_per_tok) of a Mixtral config.json, None when dense."""
    if "num_local_experts" not in cfg:
        return None
    return int(cfg["num_local_experts"]), int(cfg["num_experts_per_tok"])


HF_MOE_PREFIX = "model.layers.{i}.block_sparse_moe."  # Hugging Face MixtralForCausalLM
MISTRAL_MOE_PREFIX = "layers.{i}.feed_forward."  # Mistral's own consolidated layout (Meta names)


def hf_sparse_moe(x: torch.Tensor, layer: int, n_expert: int, top_k: int, load, hooks) -> torch.Tensor:
    """Mixtral's sparse MoE block on x [T, dim] in Hugging Face's names (sparse_moe)."""
    return sparse_moe(x, HF_MOE_PREFIX.format(i=layer), n_expert, top_k, load, hooks)


def sparse_moe(x: torch.Tensor, prefix: str, n_expert: int, top_k: int, load, hooks) -> torch.Tensor:
    """Mixtral's sparse MoE block on x [T, dim]: the router `{prefix}gate.weight`, the experts
    `{prefix}experts.E.w1/w2/w3.weight` (both layouts name them so under their own prefix).
    `load(name)` gives a checkpoint tensor as float32; `hooks` (ForwardHooks) see each weight
    and matmul input by its checkpoint name: expert E's w1/w3 input is the rows routed to E
    (one tensor for both), its w2 input those rows' silu(w1 x) * w3 x."""
    p = prefix

    def mm(v: torch.Tensor, name: str) -> torch.Tensor:
        return hooks.x(name, v) @ hooks.w(name, load(name)).T

    probs = torch.softmax(mm(x, p + "gate.weight").to(torch.float32), dim=-1)
    top_p, top_e = torch.topk(probs, top_k, dim=-1)
    top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(n_expert):
        rows, slot = torch.where(top_e == e)
        names = [f"{p}experts.{e}.{w}.weight" for w in ("w1", "w2", "w3")]
        if not len(rows):
            for n in names:  # unused here, but the hooks still see (and check) the weight
                hooks.w(n, load(n))
            continue
        xe = x[rows]
        y = mm(torch.nn.functional.silu(mm(xe, names[0])) * mm(xe, names[2]), names[1])
        out.index_add_(0, rows, y * top_p[rows, slot, None])
    return out


# ---- candidate (file) ----------------------------------------------------------------------


def expert_count(mf) -> tuple[int, int]:
    """({arch}.expert_count, {arch}.expert_used_count); (0, 0) for a dense model."""
    return int(mf.get(mf.arch_key("expert_count"), 0) or 0), int(mf.get(mf.arch_key("expert_used_count"), 0) or 0)


def expert_slice(t, e: int):
    """Expert e of a stacked [n_expert, rows, cols] FileTensor, as a 2-D one named `name[e]`."""
    return dataclasses.replace(t, name=f"{t.name}[{e}]", shape=tuple(t.shape[1:]), raw=t.raw[e])


_SLICE = re.compile(r"(.+)\[(\d+)\]")


def is_expert_slice(name: str) -> bool:
    return _SLICE.fullmatch(name) is not None


def split_expert_slice(name: str) -> tuple[str, int] | None:
    """`name[e]` (an expert_slice) -> (the stacked tensor's name, e); None for other names."""
    m = _SLICE.fullmatch(name)
    return (m.group(1), int(m.group(2))) if m else None


def explain_expert(check, mf, source) -> str | None:
    """For an expert slice far from its source: which other expert of the layer it holds."""
    m = _SLICE.fullmatch(check.name)
    st = next((t for t in source.tensors if m and t.name == m.group(1)), None)
    if st is None or st.parts is None or m.group(1) not in mf.tensors:
        return None
    e = int(m.group(2))
    deq = expert_slice(mf.tensors[m.group(1)], e).array()
    for j, load in enumerate(st.parts):
        if j == e:
            continue
        src = load().reshape(deq.shape)
        err = float(
            np.sqrt(
                np.mean(np.square(deq - src, dtype=np.float64)) / max(np.mean(np.square(src, dtype=np.float64)), 1e-30)
            )
        )
        if err <= check.bound_rel_rmse:
            return f"it holds expert {j}'s weights (experts swapped or stacked out of order)"
    return None


def expected_moe_shapes(layer: int, n_embd: int, n_ff: int, n_expert: int) -> dict[str, tuple[int, ...]]:
    b = f"blk.{layer}."
    return {
        b + "ffn_gate_inp.weight": (n_expert, n_embd),
        b + "ffn_gate_exps.weight": (n_expert, n_ff, n_embd),
        b + "ffn_up_exps.weight": (n_expert, n_ff, n_embd),
        b + "ffn_down_exps.weight": (n_expert, n_embd, n_ff),
    }


def candidate_moe_ffn(h: np.ndarray, W: dict, layer: int, n_expert: int, top_k: int, modes, matmul_t) -> np.ndarray:
    """The MoE feed-forward on h [S*T, dim] (S activation streams stacked, as candidate.py
    keeps them). Each expert runs on every row and its output is kept for the rows that chose
    it: the activation rounding of `matmul_t` splits x into its streams, so rows are not subset."""
    b = f"blk.{layer}."
    logits = matmul_t(h, W[b + "ffn_gate_inp.weight"], modes)
    logits = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=-1, keepdims=True)
    top_e = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    top_p = np.take_along_axis(probs, top_e, axis=-1)
    top_p /= top_p.sum(axis=-1, keepdims=True)
    out = np.zeros_like(h)
    for e in range(n_expert):
        rows, slot = np.nonzero(top_e == e)
        if not len(rows):
            continue
        gate = matmul_t(h, expert_slice(W[b + "ffn_gate_exps.weight"], e), modes)
        up = matmul_t(h, expert_slice(W[b + "ffn_up_exps.weight"], e), modes)
        act = (gate / (1.0 + np.exp(-gate)) * up).astype(np.float32)
        y = matmul_t(act, expert_slice(W[b + "ffn_down_exps.weight"], e), modes)
        out[rows] += y[rows] * top_p[rows, slot, None]
    return out


def hf_expert_names(source) -> dict[str, tuple[str, int]]:
    """Checkpoint expert weight -> (stacked GGUF tensor, expert index), for the expected pass
    (a Mixtral in Hugging Face's or Mistral's own layout)."""
    kinds = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}
    n_layers, n_expert = source.hparams.n_layers, source.hparams.n_expert
    prefix = {"hf": HF_MOE_PREFIX, "mistral": MISTRAL_MOE_PREFIX}.get(source.kind)
    if prefix is None or not n_expert or source.hparams.arch != "llama":
        return {}
    return {
        f"{prefix.format(i=i)}experts.{e}.{w}.weight": (f"blk.{i}.{k}.weight", e)
        for i in range(n_layers)
        for e in range(n_expert)
        for w, k in kinds.items()
    }
