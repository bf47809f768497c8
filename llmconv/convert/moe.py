"""Mixture-of-experts feed-forward layers (Mixtral): the router and the stacked experts.

Hugging Face's MixtralForCausalLM stores, per layer N,

    model.layers.N.block_sparse_moe.gate.weight              [n_expert, dim]   the router
    model.layers.N.block_sparse_moe.experts.E.w1.weight      [ffn, dim]        gate_proj of expert E
    model.layers.N.block_sparse_moe.experts.E.w2.weight      [dim, ffn]        down_proj
    model.layers.N.block_sparse_moe.experts.E.w3.weight      [ffn, dim]        up_proj

llama.cpp's converter writes them as the llama architecture with

    blk.N.ffn_gate_inp.weight    [n_expert, dim]        (always f32: llama-quantize never touches it)
    blk.N.ffn_gate_exps.weight   [n_expert, ffn, dim]   w1 of every expert, stacked on a new first axis
    blk.N.ffn_down_exps.weight   [n_expert, dim, ffn]   w2
    blk.N.ffn_up_exps.weight     [n_expert, ffn, dim]   w3
    llama.expert_count, llama.expert_used_count

A stacked tensor is assembled from n_expert source tensors, each possibly in another shard.
Its SourceTensor carries one loader per expert (`parts`): the streaming engine (stream.py)
loads one expert's slice at a time and converts it chunk by chunk, so at most two experts'
float32 slices are in memory; `load()` (for verify and tests) stacks them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import MODEL_TENSOR

from ..errors import LlmconvError
from .plan import SourceTensor, tensor_name

# HF expert weight -> GGUF stacked kind, and which of (ffn, dim) its rows and columns are
HF_EXPERT_NAMES = {
    "w1": (MODEL_TENSOR.FFN_GATE_EXP, "ffn", "dim"),
    "w2": (MODEL_TENSOR.FFN_DOWN_EXP, "dim", "ffn"),
    "w3": (MODEL_TENSOR.FFN_UP_EXP, "ffn", "dim"),
}
# Where a layer's router and experts live: `{prefix}.gate.weight`, `{prefix}.experts.E.wK.weight`.
HF_PREFIX = "model.layers.{i}.block_sparse_moe"  # Hugging Face MixtralForCausalLM
MISTRAL_PREFIX = "layers.{i}.feed_forward"  # Mistral's own consolidated layout


def _moe_pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix).replace(r"\{i\}", r"(\d+)") + r"\.(?:gate|experts\.(\d+)\.(w[123]))\.weight")


# A layer's tensors in the output: the router, then the experts in llama.cpp's converter's order.
LAYER_ORDER = [MODEL_TENSOR.FFN_GATE_INP, MODEL_TENSOR.FFN_GATE_EXP, MODEL_TENSOR.FFN_DOWN_EXP, MODEL_TENSOR.FFN_UP_EXP]
# The dense feed-forward a MoE layer does not have.
DENSE_FFN = (MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_DOWN, MODEL_TENSOR.FFN_UP)


@dataclass(frozen=True)
class MoEConfig:
    n_expert: int
    n_expert_used: int


def hf_moe_config(config: dict, file: Path) -> MoEConfig | None:
    """num_local_experts / num_experts_per_tok of config.json, or None for a dense model."""
    if "num_local_experts" not in config:
        return None
    vals = {}
    for key in ("num_local_experts", "num_experts_per_tok"):
        v = config.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise LlmconvError(f"key {key!r} missing or not a positive integer", file=file)
        vals[key] = v
    n, used = vals["num_local_experts"], vals["num_experts_per_tok"]
    if used > n:
        raise LlmconvError(f"num_experts_per_tok {used} > num_local_experts {n}", file=file)
    return MoEConfig(n, used)


def is_router(gguf_name: str) -> bool:
    """The router stays f32 in every output type (llama.cpp's converter and llama-quantize)."""
    return gguf_name.endswith(".ffn_gate_inp.weight")


def dense_ffn_names(n_layers: int) -> set[str]:
    return {tensor_name(k, i) for i in range(n_layers) for k in DENSE_FFN}


def mistral_moe_config(params: dict, file: Path) -> MoEConfig | None:
    """params.json's `moe` section of Mistral's own Mixtral release (num_experts,
    num_experts_per_tok), None when there is none. Later Mistral MoE models add shared experts,
    dense first layers and the like, which llama.cpp runs as another architecture: refused."""
    moe = params.get("moe")
    if not moe:
        return None
    if not isinstance(moe, dict):
        raise LlmconvError("'moe' is not an object", file=file)
    extra = sorted(set(moe) - {"num_experts", "num_experts_per_tok"})
    if extra:
        raise LlmconvError(
            f"'moe': a mixture of experts with {', '.join(extra)} is not supported by llmconv's "
            "llama-architecture conversion (Mixtral's num_experts and num_experts_per_tok are)",
            file=file,
        )
    vals = []
    for key in ("num_experts", "num_experts_per_tok"):
        v = moe.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise LlmconvError(f"'moe': {key!r} missing or not a positive integer", file=file)
        vals.append(v)
    if vals[1] > vals[0]:
        raise LlmconvError(f"'moe': num_experts_per_tok {vals[1]} > num_experts {vals[0]}", file=file)
    return MoEConfig(*vals)


def stack_experts(
    entries: dict,
    moe: MoEConfig,
    *,
    dim: int,
    ffn: int,
    n_layers: int,
    cfg_file: Path,
    expert_loader: Callable,
    prefix: str = HF_PREFIX,
) -> dict[str, SourceTensor]:
    """Take the router and expert tensors out of `entries` (HF name -> WeightEntry) and return
    GGUF name -> SourceTensor for the routers and the stacked experts, shapes checked.
    `expert_loader(entry)` turns one entry into a float32 loader."""
    routers, found = _take_moe_entries(
        entries, moe, dim=dim, ffn=ffn, n_layers=n_layers, cfg_file=cfg_file, prefix=prefix
    )
    out: dict[str, SourceTensor] = {}
    for layer in range(n_layers):
        hf_prefix = prefix.format(i=layer)
        if layer not in routers:
            raise LlmconvError(
                "router missing from the checkpoint", file=cfg_file.parent, tensor=f"{hf_prefix}.gate.weight"
            )
        r = routers[layer]
        out[tensor_name(MODEL_TENSOR.FFN_GATE_INP, layer)] = SourceTensor(
            name=tensor_name(MODEL_TENSOR.FFN_GATE_INP, layer),
            shape=tuple(r.shape),
            load=expert_loader(r),
            files=[r.file],
            source_name=f"{hf_prefix}.gate.weight",
            source_dtype=r.dtype,
        )
        for w, (kind, _, _) in HF_EXPERT_NAMES.items():
            have = found.get((layer, w), {})
            missing = [x for x in range(moe.n_expert) if x not in have]
            if missing:
                raise LlmconvError(
                    "expert missing from the checkpoint",
                    file=cfg_file.parent,
                    tensor=f"{hf_prefix}.experts.{missing[0]}.{w}.weight",
                )
            parts = [have[x] for x in range(moe.n_expert)]
            gguf_name = tensor_name(kind, layer)
            loaders = [
                _named(expert_loader(p), p.file, f"{hf_prefix}.experts.{x}.{w}.weight") for x, p in enumerate(parts)
            ]
            out[gguf_name] = stacked_tensor(
                gguf_name,
                loaders,
                tuple(parts[0].shape),
                files=[p.file for p in parts],
                dtype=parts[0].dtype,
                source_name=f"{hf_prefix}.experts.{{0..{moe.n_expert - 1}}}.{w}.weight",
            )
    return out


def _take_moe_entries(
    entries: dict, moe: MoEConfig, *, dim: int, ffn: int, n_layers: int, cfg_file: Path, prefix: str
) -> tuple[dict[int, object], dict[tuple[int, str], dict[int, object]]]:
    """Pop the routers (layer -> entry) and experts ((layer, w1/w2/w3) -> {expert: entry}) out of
    `entries`, each shape checked and each index within the config's counts."""
    found: dict[tuple[int, str], dict[int, object]] = {}
    routers: dict[int, object] = {}
    pattern = _moe_pattern(prefix)
    for name in [n for n in entries if pattern.fullmatch(n)]:
        e = entries.pop(name)
        layer, expert, w = pattern.fullmatch(name).groups()
        layer = int(layer)
        if layer >= n_layers:
            raise LlmconvError(
                f"{cfg_file.name} says {n_layers} layers but the checkpoint has more", file=e.file, tensor=name
            )
        if expert is None:
            _check_shape(e, name, (moe.n_expert, dim), f"{moe.n_expert} experts, width {dim}", cfg_file)
            routers[layer] = e
            continue
        if int(expert) >= moe.n_expert:
            raise LlmconvError(
                f"expert {expert} but {cfg_file.name} says {moe.n_expert} experts", file=e.file, tensor=name
            )
        sizes = {"ffn": ffn, "dim": dim}
        _, rows, cols = HF_EXPERT_NAMES[w]
        _check_shape(e, name, (sizes[rows], sizes[cols]), f"width {dim}, expert feed-forward {ffn}", cfg_file)
        found.setdefault((layer, w), {})[int(expert)] = e
    return routers, found


def _named(load: Callable[[], np.ndarray], file: Path, name: str) -> Callable[[], np.ndarray]:
    """`load`, with a read error naming the expert's own shard and tensor (the stacked
    tensor's name stands for n_expert of them)."""

    def run() -> np.ndarray:
        try:
            return load()
        except (RuntimeError, OSError, ValueError) as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise LlmconvError(f"cannot read tensor data: {text}", file=file, tensor=name) from None

    return run


def _check_shape(e, name: str, want: tuple[int, ...], what: str, cfg_file: Path) -> None:
    if tuple(e.shape) != want:
        raise LlmconvError(
            f"shape {tuple(e.shape)} but {cfg_file.name} ({what}) implies {want}", file=e.file, tensor=name
        )


def stacked_tensor(
    name: str,
    parts: list[Callable[[], np.ndarray]],
    part_shape: tuple[int, ...],
    *,
    files: list[Path],
    dtype: str,
    source_name: str,
) -> SourceTensor:
    """A 3-D tensor [len(parts), *part_shape] whose slices come from separate loaders."""

    def load() -> np.ndarray:
        out = np.empty((len(parts), *part_shape), np.float32)
        for i, part in enumerate(parts):
            out[i] = part()
        return out

    return SourceTensor(
        name=name,
        shape=(len(parts), *part_shape),
        load=load,
        files=list(dict.fromkeys(files)),
        source_name=source_name,
        source_dtype=dtype,
        parts=parts,
    )


def expert_params(tensors) -> tuple[int, int, int] | None:
    """(shared parameters, parameters of one expert over all layers, expert count) for the size
    label, counted as llama.cpp's converter counts them; None for a dense model."""
    experts = [t for t in tensors if "_exps." in t.name and len(t.shape) == 3]
    if not experts:
        return None
    n = experts[0].shape[0]
    per_expert = sum(int(np.prod(t.shape, dtype=np.int64)) // t.shape[0] for t in experts)
    shared = sum(int(np.prod(t.shape, dtype=np.int64)) for t in tensors) - per_expert * n
    return shared, per_expert, n
