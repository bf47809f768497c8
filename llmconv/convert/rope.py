"""LLaMA 3.1/3.2 scaled RoPE: the per-frequency factors llama.cpp reads from `rope_freqs.weight`.

LLaMA 3.1 stretches the rotary wavelengths that are longer than the 8192-token context it was
first trained on. With base frequencies f_i = theta^(-2i/head_dim) and wavelength w_i = 2*pi/f_i:

    w_i < original_context / high_freq_factor   ->  f_i unchanged            (factor 1)
    w_i > original_context / low_freq_factor    ->  f_i / factor              (factor `factor`)
    otherwise, with s = (original_context / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor):
                                                     f_i * ((1 - s) / factor + s)

llama.cpp divides each rotation frequency by the stored value, so the tensor holds the inverse
of the multiplier: 1, `factor`, or 1 / ((1 - s) / factor + s).

The arithmetic is float32 throughout, in the same order as llama.cpp's convert_hf_to_gguf.py,
so the tensor is bit-identical to what that converter writes for a Hugging Face checkpoint.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import LlmconvError

# Meta's params.json says only `use_scaled_rope: true`; their reference code fixes the rest.
META_DEFAULTS = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llama3_rope_factors(
    head_dim: int,
    rope_theta: float,
    factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_context: int = 8192,
    file=None,
) -> np.ndarray:
    """float32 [head_dim // 2]: the `rope_freqs.weight` tensor for LLaMA-3 scaled RoPE. `file`
    (config.json, params.json) is what an error names."""
    if head_dim <= 0 or head_dim % 2:
        raise LlmconvError(f"scaled RoPE needs an even head dimension, got {head_dim}", file=file)
    if factor <= 0:
        raise LlmconvError(f"rope_scaling: factor must be positive, got {factor}", file=file)
    import torch  # here, not at the top: only LLaMA 3 checkpoints pay for importing it

    freqs = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    wavelen = 2 * math.pi / freqs
    high_freq_wavelen = original_context / high_freq_factor
    low_freq_wavelen = original_context / low_freq_factor
    if low_freq_factor == high_freq_factor:
        # Llama 4 Scout (both 1): no band between the two wavelengths is blended, unless a
        # wavelength falls exactly on it (then the blend divides by zero, in llama.cpp's converter too)
        if bool((wavelen == low_freq_wavelen).any()):
            raise LlmconvError(
                f"rope_scaling: low_freq_factor and high_freq_factor are both {low_freq_factor} "
                f"and a wavelength is exactly {low_freq_wavelen}",
                file=file,
            )
        return (
            torch.where(wavelen < high_freq_wavelen, torch.ones_like(freqs), torch.full_like(freqs, factor))
            .numpy()
            .astype(np.float32)
        )
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(
        wavelen < high_freq_wavelen,
        torch.ones_like(freqs),
        torch.where(wavelen > low_freq_wavelen, torch.full_like(freqs, factor), blended),
    )
    return out.numpy().astype(np.float32)


def llama3_rope_factors_from_config(rope_scaling: dict, head_dim: int, rope_theta: float, file=None) -> np.ndarray:
    """From a Hugging Face config.json `rope_scaling` block whose rope_type (or type) is "llama3".
    Missing fields take the values llama.cpp's converter assumes."""
    kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
    if kind != "llama3":
        raise LlmconvError(f"rope_scaling type {kind!r} is not llama3", file=file)
    try:
        return llama3_rope_factors(
            head_dim,
            rope_theta,
            factor=float(rope_scaling.get("factor", META_DEFAULTS["factor"])),
            low_freq_factor=float(rope_scaling.get("low_freq_factor", META_DEFAULTS["low_freq_factor"])),
            high_freq_factor=float(rope_scaling.get("high_freq_factor", META_DEFAULTS["high_freq_factor"])),
            original_context=int(
                rope_scaling.get("original_max_position_embeddings", META_DEFAULTS["original_max_position_embeddings"])
            ),
            file=file,
        )
    except (TypeError, ValueError) as e:
        raise LlmconvError(f"rope_scaling: {e}", file=file) from None


def llama3_rope_factors_from_params(params: dict, head_dim: int, file=None) -> np.ndarray | None:
    """From Meta's params.json: None unless `use_scaled_rope` is set. Meta's reference code
    (llama-models) takes the scale factor from `rope_scaling_factor` when present (LLaMA 3.2
    1B/3B use 32) and 8 otherwise; low/high frequency factors 1 and 4, original context 8192."""
    if not params.get("use_scaled_rope"):
        return None
    try:
        return llama3_rope_factors(
            head_dim,
            float(params.get("rope_theta", 10000.0)),
            factor=float(params.get("rope_scaling_factor") or META_DEFAULTS["factor"]),
            low_freq_factor=META_DEFAULTS["low_freq_factor"],
            high_freq_factor=float(params.get("high_freq_factor") or META_DEFAULTS["high_freq_factor"]),
            original_context=META_DEFAULTS["original_max_position_embeddings"],
            file=file,
        )
    except (TypeError, ValueError) as e:
        raise LlmconvError(f"scaled RoPE parameters: {e}", file=file) from None
