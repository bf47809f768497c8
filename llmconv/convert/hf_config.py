"""config.json of a Hugging Face checkpoint -> the numbers the llama architecture needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFValueType as T
from gguf import Keys, MODEL_TENSOR

from ..errors import LlmconvError
from ..formats.gguf_writer import KV
from .hf_files import read_json
from .meta_params import stated_head_dim
from .plan import SourceTensor, tensor_name

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")


@dataclass
class HFConfig:
    """config.json, checked: the model's sizes, RoPE settings and context length."""

    file: Path
    raw: dict  # the whole document (MoE keys, vocab_size, tie_word_embeddings)
    arch: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv: int
    ffn: int
    stated_head_dim: int | None  # Mistral Nemo / Small 3: not hidden_size / heads
    head_dim: int
    theta: float
    scaling: dict | None
    ctx_len: int
    norm_eps: float

    def family(self, vocab_size: int) -> str:
        return hf_family(self.arch, vocab_size, self.theta, self.scaling)


def read_hf_config(cfg_file: Path, ctx: int | None, warnings: list[str]) -> HFConfig:
    """`ctx` (--ctx) overrides max_position_embeddings."""
    config = read_json(cfg_file)
    arch = check_architecture(config, cfg_file, warnings)
    dim = _int(config, "hidden_size", cfg_file)
    n_layers = _int(config, "num_hidden_layers", cfg_file)
    n_heads = _int(config, "num_attention_heads", cfg_file)
    n_kv = _int(config, "num_key_value_heads", cfg_file, default=n_heads)
    ffn = _int(config, "intermediate_size", cfg_file)
    stated = stated_head_dim(config, cfg_file)
    if (stated is None and (dim % n_heads or (dim // n_heads) % 2)) or n_heads % n_kv:
        raise LlmconvError(
            f"hidden_size {dim}, num_attention_heads {n_heads}, num_key_value_heads {n_kv} "
            f"do not divide into even-sized heads",
            file=cfg_file,
        )
    theta, scaling = rope_settings(config)
    if config.get("sliding_window") is not None:
        # llama.cpp's llama architecture reads no sliding-window key (its own converter writes none
        # for MistralForCausalLM either): attention is full over the whole context.
        warnings.append(
            f"sliding_window {config['sliding_window']} dropped: llama.cpp's llama architecture "
            f"has no sliding-window attention; it attends over the whole context"
        )
    ctx_len = ctx or config.get("max_position_embeddings")
    if ctx_len is None:
        ctx_len = 2048
        warnings.append("config.json has no max_position_embeddings: context length 2048 (transformers' default)")
    elif not isinstance(ctx_len, int) or ctx_len <= 0:
        raise LlmconvError("max_position_embeddings is not a positive integer", file=cfg_file)
    return HFConfig(
        cfg_file,
        config,
        arch,
        dim,
        n_layers,
        n_heads,
        n_kv,
        ffn,
        stated,
        stated or dim // n_heads,
        theta,
        scaling,
        int(ctx_len),
        float(config.get("rms_norm_eps", 1e-6)),
    )


def _int(config: dict, key: str, file: Path, default: int | None = None) -> int:
    v = config.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise LlmconvError(f"key {key!r} missing or not a positive integer", file=file)
    return v


def check_architecture(config: dict, file: Path, warnings: list[str]) -> str:
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise LlmconvError("no 'architectures' list: cannot tell which model this is", file=file)
    unsupported = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if unsupported:
        raise LlmconvError(
            f"architecture {unsupported[0]!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
            file=file,
        )
    if config.get("auto_map"):
        warnings.append(f"{file.name}: auto_map (custom model code) ignored; converted as {archs[0]}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise LlmconvError(f"hidden_act {act!r}: the llama architecture computes SwiGLU with silu", file=file)
    return archs[0]


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None). transformers 5 moved both into `rope_parameters`."""
    params = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    theta = float(config.get("rope_theta", params.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling") or None
    if scaling is None and params.get("rope_type", params.get("type", "default")) != "default":
        scaling = params
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def hf_family(arch: str, vocab: int, theta: float, scaling: dict | None) -> str:
    if arch == "MistralForCausalLM":
        return "mistral"
    if arch == "MixtralForCausalLM":
        return "mixtral"
    if vocab >= 128000:
        return "llama-3.1" if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3" else "llama-3"
    if theta == 1e6:
        return "code-llama"
    return "llama-2"


def rope_freqs_tensor(scaling: dict, head_dim: int, theta: float, cfg_file: Path) -> SourceTensor:
    from .rope import llama3_rope_factors_from_config

    factors = llama3_rope_factors_from_config(scaling, head_dim, theta, file=cfg_file)
    return SourceTensor(
        name=tensor_name(MODEL_TENSOR.ROPE_FREQS),
        shape=tuple(factors.shape),
        load=lambda: factors.copy(),
        files=[cfg_file],
        source_name="rope_scaling (config.json)",
        source_dtype="f32",
    )


def rope_scaling_kvs(scaling: dict | None, cfg_file: Path) -> list[KV]:
    if scaling is None:
        return []
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        return []  # carried by the rope_freqs.weight tensor
    if kind == "linear":
        factor = scaling.get("factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise LlmconvError("rope_scaling linear needs a positive factor", file=cfg_file)
        r = Keys.Rope
        return [
            KV(r.SCALING_TYPE.format(arch="llama"), "linear", T.STRING),
            KV(r.SCALING_FACTOR.format(arch="llama"), float(factor), T.FLOAT32),
        ]
    raise LlmconvError(f"rope_scaling type {kind!r} is not supported (llama3, linear)", file=cfg_file)
