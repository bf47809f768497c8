"""PEFT LoRA adapters: bind them to a base checkpoint, merge or re-express them (lora_adapter.py
reads them).

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (or
`adapter_model.bin`, read with the safe torch loader). For every adapted linear layer it stores
`<module>.lora_A.weight` [r, in] and `<module>.lora_B.weight` [out, r]; the layer computes
W x + s * B (A x) with s = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)). An adapted embedding
stores `lora_embedding_A` [r, vocab] and `lora_embedding_B` [dim, r]; its rows change by
s * (B A)^T. `modules_to_save` layers (a retrained lm_head or embed_tokens) are stored whole and
replace the base's. Module names carry PEFT's `base_model.model.` prefix.

Adapters are trained on Hugging Face models, so B of q_proj/k_proj is in HF's rotate-half row
order; llmconv's sources give base weights in Meta's order, so B's rows are un-permuted the same
way as the base (hf.unpermute_rows). A has the input side, which no permutation touches.

Nothing here reads more than one base tensor at a time; A and B are small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import MODEL_TENSOR

from ..errors import LlmconvError
from .hf import hf_name_to_gguf, unpermute_rows
from .lora_adapter import LoraAdapter, LoraPair, open_adapter
from .plan import tensor_name


# ---- binding to a base model -----------------------------------------------------------------


@dataclass
class Binding:
    """Where an adapter's modules land in a base Source, with the facts the maths needs."""

    adapter: LoraAdapter
    targets: dict[str, LoraPair]  # GGUF tensor name -> pair
    qk_heads: dict[str, int]  # GGUF name -> heads, for attn_q/attn_k (B rows un-permuted)
    replaced: dict[str, str]  # GGUF name -> adapter weight name (modules_to_save)


def gguf_weight_name(hf_module: str) -> str | None:
    return hf_name_to_gguf(hf_module + ".weight")


def bind(adapter: LoraAdapter, source) -> Binding:
    """Map every module of `adapter` onto a tensor of `source` (a convert.sources.Source) and
    check the shapes agree, so a base model the adapter was not made for is refused up front."""
    base = {t.name: t for t in source.tensors}
    h = source.hparams
    wf = adapter.weights_file
    targets, heads, replaced = {}, {}, {}
    for module, pair in adapter.pairs.items():
        name = _base_tensor(module, base, h, wf, f"{module}.lora_A")
        if pair.weight_shape != tuple(base[name].shape):
            raise LlmconvError(
                f"the adapter changes a {pair.weight_shape} weight but the base's {name} is "
                f"{tuple(base[name].shape)}: made for another base model "
                f"({adapter.config.get('base_model_name_or_path')!r})",
                file=wf,
                tensor=f"{module}.lora_A",
            )
        if pair.embedding != (name == tensor_name(MODEL_TENSOR.TOKEN_EMBD)):
            raise LlmconvError(
                "embedding LoRA matrices on a layer that is not the embedding (or the reverse)", file=wf, tensor=module
            )
        targets[name] = pair
        if name.endswith((".attn_q.weight", ".attn_k.weight")):
            heads[name] = h.n_heads if ".attn_q." in name else h.n_kv_heads
    for wname, (shape, _) in adapter.saved.items():
        name = _base_tensor(wname[: -len(".weight")], base, h, wf, wname)
        if name in targets:
            raise LlmconvError("layer is both adapted (LoRA) and saved whole (modules_to_save)", file=wf, tensor=wname)
        if tuple(shape) != tuple(base[name].shape):
            raise LlmconvError(
                f"shape {tuple(shape)} but the base's {name} is {tuple(base[name].shape)}", file=wf, tensor=wname
            )
        replaced[name] = wname
    return Binding(adapter, targets, heads, replaced)


def _base_tensor(module: str, base: dict, h, wf: Path, tensor: str) -> str:
    name = gguf_weight_name(module)
    if name is None:
        raise LlmconvError("no llama tensor corresponds to this module", file=wf, tensor=tensor)
    if name not in base:
        if name == tensor_name(MODEL_TENSOR.OUTPUT) and h.tied_embeddings:
            raise LlmconvError(
                "the adapter changes lm_head but the base model ties it to the embedding "
                "(there is no separate output matrix to change)",
                file=wf,
                tensor=tensor,
            )
        raise LlmconvError(f"the base model has no {name} (made for another base model?)", file=wf, tensor=tensor)
    if name == tensor_name(MODEL_TENSOR.TOKEN_EMBD) and h.tied_embeddings:
        raise LlmconvError(
            "the adapter changes embed_tokens but the base model ties it to the output: changing one would change both",
            file=wf,
            tensor=tensor,
        )
    return name


def lora_b_meta(binding: Binding, name: str, meta_rows: bool = True) -> torch.Tensor:
    """B as float32, its rows in Meta order for attn_q/attn_k (as stored, HF's order, if not meta_rows)."""
    b = binding.targets[name].b().to(torch.float32)
    heads = binding.qk_heads.get(name) if meta_rows else None
    return torch.from_numpy(np.ascontiguousarray(unpermute_rows(b.numpy(), heads))) if heads else b


def delta(binding: Binding, name: str, user_scale: float, meta_rows: bool = True) -> torch.Tensor:
    """user_scale * s * B A for GGUF tensor `name`, float32, in Meta's layout (llmconv's sources,
    Meta checkpoints) or, with meta_rows=False, in HF's as stored."""
    pair = binding.targets[name]
    a = pair.a().to(torch.float32)
    d = lora_b_meta(binding, name, meta_rows) @ a
    d = d.T.contiguous() if pair.embedding else d
    return d.mul_(np.float32(user_scale * binding.adapter.scale(pair)))


# ---- merging while converting ----------------------------------------------------------------


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """'path' or 'path:scale' (a path may itself hold ':'; only a trailing number is a scale)."""
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(spec), 1.0


def apply_adapters(source, specs) -> AdapterPatch:
    """Wrap the lazy loaders of `source` so each target tensor comes out with every adapter merged:
    W + sum(scale_i * s_i * B_i A_i) in float32, modules_to_save replacing the base weight.
    Adapters apply in the order given. Peak memory: the base tensor plus one delta. The adapter
    files join each changed tensor's `files` (its source_name stays the checkpoint's: verify maps by it)."""
    patch = open_patch(source, specs)
    for t in source.tensors:
        used = [b.adapter for b, _ in patch.steps if t.name in b.targets or t.name in b.replaced]
        if used:
            t.load = _merged_loader(patch, t.name, t.load)
            t.read_rows = None  # the merged weight exists only whole: the engine must use load()
            t.files = list(t.files) + [a.weights_file for a in used]
    return patch


def _merged_loader(patch: AdapterPatch, name: str, base_load: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    # the result is a new array (the delta): the base array may be a read-only or shared mmap view
    return lambda: patch.apply(name, lambda: torch.from_numpy(base_load()), meta_rows=True).numpy()


# ---- a reference forward pass with the adapters applied (verify --lora) -------------------------


@dataclass
class AdapterPatch:
    """Adapters bound to one base checkpoint, applied to weights as a reference pass loads them."""

    steps: list[tuple[Binding, float]]

    def apply(
        self, gguf_name: str | None, load: Callable[[], torch.Tensor], meta_rows: bool, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The weight `load()` gives (float32, in the caller's layout: Meta rows or HF's), with every
        adapter that changes `gguf_name` applied. `rows`: `load()` gives only these rows (an embedding
        lookup). A replaced weight's base is never loaded."""

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None else t[rows]

        w = None
        for binding, scale in self.steps:
            if gguf_name in binding.replaced:
                w = pick(binding.adapter.saved[binding.replaced[gguf_name]][1]().to(torch.float32))
            if gguf_name in binding.targets:
                w = pick(delta(binding, gguf_name, scale, meta_rows)).add_(load() if w is None else w)
        return load() if w is None else w


def open_patch(source, specs) -> AdapterPatch | None:
    """`specs`: (adapter dir, scale) pairs; None when there are none."""
    if not specs:
        return None
    return AdapterPatch([(bind(open_adapter(path), source), scale) for path, scale in specs])


def checkpoint_weight_hook(patch: AdapterPatch) -> Callable[[str, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """A reference pass's weight hook (name, w, rows) -> w: `name` is the checkpoint's own ("layers.0.attention.wq.weight"
    in Meta's layout, "model.layers.0.self_attn.q_proj.weight" in HF's); `rows` the embedding rows `w` holds, or None."""
    from .plan import meta_to_gguf_name

    def hook(name: str, w: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        meta = meta_to_gguf_name(name)
        gguf_name = meta or hf_name_to_gguf(name)
        if gguf_name is None:
            return w
        return patch.apply(gguf_name, lambda: w, meta_rows=meta is not None, rows=rows)

    return hook
