"""A PEFT LoRA adapter directory, read and checked (lora.py binds it to a base checkpoint and
merges it): adapter_config.json (its options, alpha_pattern, rank_pattern, layers_to_transform,
target_modules), and adapter_model.safetensors or .bin (read with the safe torch loader), whose
tensors must each be a lora_A/lora_B half or the weight of a modules_to_save layer."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import LlmconvError
from .hf_files import read_json

CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_LINEAR_RE = re.compile(r"(.+)\.lora_([AB])\.weight")
_EMBED_RE = re.compile(r"(.+)\.lora_embedding_([AB])")
# config keys whose non-default value changes what the adapter computes in ways llmconv does not model
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "lora_bias": "lora_bias",
    "use_qalora": "QA-LoRA",
}


@dataclass
class LoraPair:
    """One adapted module: delta = scale * B @ A (linear) or scale * (B @ A)^T (embedding)."""

    module: str  # HF module name, e.g. "model.layers.0.self_attn.q_proj"
    a: Callable[[], torch.Tensor]
    b: Callable[[], torch.Tensor]
    a_shape: tuple[int, int]  # (r, in), or (r, vocab) for an embedding
    b_shape: tuple[int, int]  # (out, r), or (dim, r)
    alpha: float  # lora_alpha, or its alpha_pattern entry
    embedding: bool = False
    dtype: str = "f32"  # as stored: "f32", "f16", "bf16"

    @property
    def rank(self) -> int:
        return self.a_shape[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight this pair changes (HF/GGUF numpy order)."""
        if self.embedding:
            return self.a_shape[1], self.b_shape[0]
        return self.b_shape[0], self.a_shape[1]


@dataclass
class LoraAdapter:
    path: Path
    weights_file: Path
    config: dict
    rslora: bool
    pairs: dict[str, LoraPair]  # by HF module name
    saved: dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]] = field(default_factory=dict)

    def scale(self, pair: LoraPair) -> float:
        """PEFT's per-module scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
        return pair.alpha / (math.sqrt(pair.rank) if self.rslora else pair.rank)


def open_adapter(path: str | Path) -> LoraAdapter:
    path = Path(path)
    if not path.exists():
        raise LlmconvError(
            "no such file or directory (expected a PEFT adapter folder: adapter_config.json + "
            "adapter_model.safetensors)",
            file=path,
        )
    if not path.is_dir():
        raise LlmconvError(
            "not a directory (expected a PEFT adapter: adapter_config.json + adapter_model.safetensors)", file=path
        )
    cfg_file = path / CONFIG
    config = read_json(cfg_file)
    _check_config(config, cfg_file)
    weights_file = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights_file is None:
        raise LlmconvError(f"no adapter weights: expected {' or '.join(WEIGHT_FILES)}", file=path)
    entries = _weight_entries(weights_file)

    halves, saved = _sort_entries(entries, _modules_to_save(config, cfg_file), weights_file)
    pairs = {
        module: _pair(module, embedding, ab, config, cfg_file, weights_file)
        for (module, embedding), ab in halves.items()
    }
    if not pairs and not saved:
        raise LlmconvError("the adapter holds no LoRA matrices", file=weights_file)
    return LoraAdapter(path, weights_file, config, bool(config.get("use_rslora")), pairs, saved)


def _sort_entries(entries: dict, save_names: set[str], weights_file: Path) -> tuple[dict, dict]:
    """The weight file's tensors as LoRA halves, {(module, is_embedding): {"A"|"B": (shape, get,
    name, dtype)}}, and the whole weights of modules_to_save layers; anything else is refused."""
    halves: dict[tuple[str, bool], dict[str, tuple]] = {}
    saved = {}
    for name, (shape, get, dtype) in entries.items():
        stem = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
        m = _LINEAR_RE.fullmatch(stem) or _EMBED_RE.fullmatch(stem)
        if m:
            if len(shape) != 2:
                raise LlmconvError(f"LoRA matrix has shape {shape}, expected 2-D", file=weights_file, tensor=name)
            key = (m.group(1), m.re is _EMBED_RE)
            halves.setdefault(key, {})[m.group(2)] = (shape, get, name, dtype)
        elif stem.endswith(".weight") and stem[: -len(".weight")].rsplit(".", 1)[-1] in save_names:
            saved[stem] = (shape, get)
        elif "lora_magnitude_vector" in stem:
            raise LlmconvError("DoRA magnitude vector: DoRA adapters are not supported", file=weights_file, tensor=name)
        else:
            raise LlmconvError(
                "not a LoRA matrix (lora_A/lora_B) nor a weight of a modules_to_save layer",
                file=weights_file,
                tensor=name,
            )
    return halves, saved


def _pair(module: str, embedding: bool, ab: dict, config: dict, cfg_file: Path, weights_file: Path) -> LoraPair:
    """One module's A and B, both present and of one rank, for a layer and target the config allows."""
    for need in "AB":
        if need not in ab:
            other = ab["B" if need == "A" else "A"][2]
            raise LlmconvError(
                f"lora_{need} is missing for this lora_{'A' if need == 'B' else 'B'}", file=weights_file, tensor=other
            )
    (a_shape, a_get, a_name, dtype), (b_shape, b_get, _, _) = ab["A"], ab["B"]
    if a_shape[0] != b_shape[1]:
        raise LlmconvError(
            f"lora_A {a_shape} and lora_B {b_shape} disagree on the rank", file=weights_file, tensor=a_name
        )
    _check_layer(module, config, cfg_file)
    _check_target(module, config, cfg_file)
    return LoraPair(
        module,
        a_get,
        b_get,
        a_shape,
        b_shape,
        _module_alpha(module, a_shape[0], config, cfg_file, weights_file, a_name),
        embedding,
        dtype,
    )


def _check_config(config: dict, cfg_file: Path) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LlmconvError(f"peft_type {peft_type!r}: only LoRA adapters are supported", file=cfg_file)
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise LlmconvError(f"{what} is not supported", file=cfg_file)
    if config.get("bias", "none") != "none":
        raise LlmconvError(f"bias {config['bias']!r}: adapters that train biases are not supported", file=cfg_file)
    for key in ("r", "lora_alpha"):
        v = config.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise LlmconvError(f"{key} missing or not a positive number", file=cfg_file)
    pattern = config.get("layers_pattern")
    if pattern not in (None, "layers", ["layers"]):
        raise LlmconvError(f"layers_pattern {pattern!r}: a llama model's layers are 'layers'", file=cfg_file)


def _modules_to_save(config: dict, cfg_file: Path) -> set[str]:
    names = config.get("modules_to_save") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise LlmconvError("modules_to_save is not a list of module names", file=cfg_file)
    return set(names)


def _check_layer(module: str, config: dict, cfg_file: Path) -> None:
    """layers_to_transform: the layers the adapter was applied to; a module outside them is a contradiction."""
    layers = config.get("layers_to_transform")
    if layers is None:
        return
    layers = [layers] if isinstance(layers, int) else layers
    if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
        raise LlmconvError(f"layers_to_transform {layers!r} is not a layer index or a list of them", file=cfg_file)
    m = re.match(r"model\.layers\.(\d+)\.", module)
    if m is None or int(m.group(1)) not in layers:
        raise LlmconvError(f"module {module} is outside layers_to_transform {layers}", file=cfg_file)


def _check_target(module: str, config: dict, cfg_file: Path) -> None:
    """target_modules (a list of name suffixes, a regex, or 'all-linear') must cover every stored module."""
    targets = config.get("target_modules")
    if targets is None:
        return
    if targets == "all-linear":
        ok = module != "lm_head" and not module.endswith("embed_tokens")
    elif isinstance(targets, str):
        ok = re.fullmatch(targets, module) is not None
    elif isinstance(targets, list):
        ok = any(module == t or module.endswith("." + t) for t in targets)
    else:
        raise LlmconvError(f"target_modules {targets!r} is neither a list nor a regex", file=cfg_file)
    if not ok:
        raise LlmconvError(f"the weights adapt {module}, which target_modules {targets!r} does not name", file=cfg_file)


def _pattern_value(module: str, patterns: dict, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module_alpha(module, rank, config, cfg_file, weights_file, tensor) -> float:
    want_r = _pattern_value(module, config.get("rank_pattern"), config["r"])
    if rank != want_r:
        raise LlmconvError(
            f"rank {rank} but adapter_config.json says r={want_r} for {module}", file=weights_file, tensor=tensor
        )
    alpha = _pattern_value(module, config.get("alpha_pattern"), config["lora_alpha"])
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise LlmconvError(f"lora_alpha for {module} is not a positive number", file=cfg_file)
    return float(alpha)


def _weight_entries(path: Path) -> dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor], str]]:
    from .hf_files import _bin_entries, _safetensors_entries

    entries = _safetensors_entries(path) if path.suffix == ".safetensors" else _bin_entries(path)
    return {name: (tuple(e.shape), e.get, e.dtype) for name, e in entries}
