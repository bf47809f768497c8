"""Hooks into the reference forward passes (reference.py, reference_hf.py): replace a weight, or
observe or change the input of a matrix product, by the checkpoint's own tensor name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class ForwardHooks:
    """Optional callbacks into a reference forward pass, each given the checkpoint's own tensor
    name ("layers.0.attention.wq.weight", "model.layers.0.self_attn.q_proj.weight"):

      weight(name, w, rows) -> tensor   the float32 weight the pass uses instead of `w`; `rows`
                                        (a LongTensor) says which rows of the named tensor `w`
                                        holds (the embedding lookup), None for the whole tensor
      matmul_input(name, x) -> tensor   the activation used in x @ W[name].T (observe or round it)

    verify's expected pass uses both (quantize->dequantize each weight at the file's type, and
    round activations as llama.cpp's CPU backend does); an activation collector can use the second."""

    weight: Callable[[str, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
    matmul_input: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    def w(self, name: str, w: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return w if self.weight is None else self.weight(name, w, rows)

    def x(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x if self.matmul_input is None else self.matmul_input(name, x)


NO_HOOKS = ForwardHooks()


class LayerWeights(dict):
    """A layer's float32 weights by short name, with the prefix that makes their full names and
    the hooks; `mm(x, short)` is x @ W^T with the activation hook applied."""

    def __init__(self, tensors: dict, prefix: str = "", hooks: ForwardHooks = NO_HOOKS):
        super().__init__(tensors)
        self.prefix, self.hooks = prefix, hooks

    def mm(self, x: torch.Tensor, short: str) -> torch.Tensor:
        return self.hooks.x(self.prefix + short, x) @ self[short].T
