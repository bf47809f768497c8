"""`llmconv convert-lora`: a PEFT adapter -> llama.cpp's LoRA GGUF (what `--lora FILE` loads).

The file, as llama.cpp's adapter loader (llama-adapter.cpp) reads it:
  - keys general.architecture = llama, general.type = adapter, adapter.type = lora,
    adapter.lora.alpha (float32);
  - per adapted weight W: `W.lora_a` and `W.lora_b`. For a linear layer lora_a is A as stored,
    numpy [r, in], lora_b is B [out, r]: llama.cpp adds scale * B (A x) to W x. For token_embd the
    two are flipped: lora_a is A^T [vocab, r], lora_b is B [dim, r] (llama.cpp gathers rows of lora_a);
  - the scale llama.cpp applies is adapter.lora.alpha / rank, rank being lora_b's row length.

PEFT scales by alpha / r, rsLoRA by alpha / sqrt(r): the written alpha is lora_alpha * sqrt(r) then
(llama.cpp's own converter ignores use_rslora). A module whose own alpha or rank gives another scale
(alpha_pattern, rank_pattern with rsLoRA) has the ratio folded into its lora_b.

modules_to_save layers have no A/B: the replacement is written as a full-rank LoRA, delta = new - base,
with an identity on one side (rank = dim), so llama.cpp adds exactly the difference at scale 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGUFType, Keys
from gguf import GGUFValueType as T

from .. import quantize as q
from ..errors import LlmconvError
from ..formats.gguf_writer import KV
from .lora import Binding, bind, lora_b_meta
from .lora_adapter import LoraAdapter, open_adapter
from .hparams import ARCH
from .plan import Plan, PlannedTensor, SourceTensor, Why, plan_notes
from .sources import Source, open_source

ADAPTER_TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class AdapterConversion:
    adapter: LoraAdapter
    base: Source
    alpha: float  # adapter.lora.alpha as written
    kvs: list[KV]
    plan: Plan
    out_path: Path


def written_alpha(adapter: LoraAdapter) -> float:
    """The alpha llama.cpp must see so that alpha / r is PEFT's scale for the config's r."""
    alpha, r = float(adapter.config["lora_alpha"]), adapter.config["r"]
    return alpha * math.sqrt(r) if adapter.rslora else alpha


def plan_adapter(
    adapter_dir: str | Path,
    base_dir: str | Path,
    *,
    outtype: str = "f32",
    outfile: str | Path | None = None,
    input_format: str = "auto",
) -> AdapterConversion:
    outtype = outtype.lower()
    if outtype not in ADAPTER_TYPES:
        raise LlmconvError(f"--outtype {outtype!r}: a LoRA adapter can be {', '.join(ADAPTER_TYPES)}")
    adapter = open_adapter(adapter_dir)
    base = open_source(base_dir, input_format)
    binding = bind(adapter, base)
    alpha = written_alpha(adapter)
    sources = []
    for t in base.tensors:  # the base's tensor order
        if t.name in binding.targets:
            sources += _pair_tensors(binding, t, alpha)
        elif t.name in binding.replaced:
            sources += _replacement_tensors(binding, t, alpha)
    want = q.get(outtype)
    tensors = []
    for s in sources:
        if want.can_hold_row(s.shape[-1]):
            tensors.append(PlannedTensor(s, want))
        else:  # as llama.cpp's converter does: a row q8_0 cannot block (lora_b's, r long) is written f16
            tensors.append(
                PlannedTensor(
                    s, q.get("f16"), f"row length {s.shape[-1]} does not fit {want.name} blocks", Why.FALLBACK
                )
            )
    plan = Plan(tensors, int(want.file_type), want.name, plan_notes(tensors))
    name = Path(adapter_dir).resolve().name
    out_path = Path(outfile) if outfile else Path.cwd() / f"{name}-{want.name.upper()}-LoRA.gguf"
    kvs = [
        KV(Keys.General.ARCHITECTURE, ARCH, T.STRING),
        KV(Keys.General.TYPE, GGUFType.ADAPTER, T.STRING),
        KV(Keys.General.NAME, name, T.STRING),
        KV(Keys.General.FILE_TYPE, int(want.file_type), T.UINT32),
        KV(Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION, T.UINT32),
        KV(Keys.Adapter.TYPE, "lora", T.STRING),
        KV(Keys.Adapter.LORA_ALPHA, alpha, T.FLOAT32),
    ]
    return AdapterConversion(adapter, base, alpha, kvs, plan, out_path)


def _fold(adapter: LoraAdapter, pair, alpha_written: float) -> float:
    """Factor for lora_b so that llama.cpp's alpha_written / rank equals this module's PEFT scale."""
    if pair.alpha == float(adapter.config["lora_alpha"]) and pair.rank == adapter.config["r"]:
        return 1.0
    return adapter.scale(pair) * pair.rank / alpha_written


def _pair_tensors(binding: Binding, base: SourceTensor, alpha: float) -> list[SourceTensor]:
    pair = binding.targets[base.name]
    f = _fold(binding.adapter, pair, alpha)
    files = [binding.adapter.weights_file]

    def load_a() -> np.ndarray:
        a = pair.a().to(torch.float32)
        return np.ascontiguousarray((a.T if pair.embedding else a).numpy())

    def load_b() -> np.ndarray:
        b = lora_b_meta(binding, base.name)
        return (b * np.float32(f) if f != 1.0 else b).numpy()

    a_shape = pair.a_shape[::-1] if pair.embedding else pair.a_shape
    dtype = pair.dtype
    return [
        SourceTensor(base.name + ".lora_a", tuple(a_shape), load_a, files, f"{pair.module}.lora_A", dtype),
        SourceTensor(base.name + ".lora_b", tuple(pair.b_shape), load_b, files, f"{pair.module}.lora_B", dtype),
    ]


def _replacement_tensors(binding: Binding, base: SourceTensor, alpha: float) -> list[SourceTensor]:
    """new - base as lora_b (linear) or lora_a (embedding), an identity of size dim on the other side."""
    wname = binding.replaced[base.name]
    shape, get = binding.adapter.saved[wname]
    rows, dim = shape
    embedding = base.name.startswith("token_embd.")
    f = np.float32(dim / alpha)  # llama.cpp scales by alpha / rank, rank = dim
    files = [binding.adapter.weights_file] + list(base.files)

    def load_delta() -> np.ndarray:
        d = get().to(torch.float32).numpy() - base.load()
        d *= f
        return d

    def load_identity() -> np.ndarray:
        return np.eye(dim, dtype=np.float32)

    delta = (base.name + (".lora_a" if embedding else ".lora_b"), (rows, dim), load_delta)
    ident = (base.name + (".lora_b" if embedding else ".lora_a"), (dim, dim), load_identity)
    first, second = (delta, ident) if embedding else (ident, delta)
    return [
        SourceTensor(n, s, load, files, f"{wname} (modules_to_save) - base", "f32") for n, s, load in (first, second)
    ]
