"""What verify holds a file to, and the figures it shows beside its measurements.

Fidelity (gated by default) compares the candidate, the file run in numpy, with the *expected*
pass: the checkpoint run in PyTorch with every weight replaced by its quantize->dequantize round
trip at the type the file stores it in (llmconv's bit-exact kernels), and activations rounded as
llama.cpp's CPU backend rounds them. For a correct file both passes multiply the same numbers, so
what is left is float summation order (and, rarely, an activation that rounds to the
neighbouring q8 code because of it). That does not depend on the model or the type, so one
bound serves every file; FIDELITY_BOUNDS below is set from the margin measured on the fixtures
(every type f32 ... q2_K and every mix; `python -m llmconv.verify.calibrate`).

Quality (informational by default) compares the candidate with the float reference, in
llama-perplexity's terms. It depends on the model, its size and the text, so no fixed bound can
tell a correct file from a broken one; verify shows it beside llama.cpp's published LLaMA-3-8B
figures for the same file type and gates it only on --max-kld / --min-top1 / --max-ppl-ratio /
--max-rel-dlogit.

Per tensor (by the tensor's own type): rel_rmse = rms(deq - src)/rms(src) and rel_max_err =
max|deq - src| / max|src| against the source weight. The max-error bounds follow from each
format's step size (half a step, or a whole step where the block's far side can clip), so they
hold for any model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType

from ..errors import LlmconvError


@dataclass(frozen=True)
class FidelityBounds:
    max_rel_dlogit: float  # max |candidate - expected| over max |expected|
    max_kld: float  # mean KL(expected || candidate), nats


# See the module docstring and README "verify: fidelity" for the measured margin.
FIDELITY_BOUNDS = FidelityBounds(max_rel_dlogit=2e-3, max_kld=1e-4)

# (rel_rmse, rel_max_err) per tensor type, against the source weight
TENSOR_BOUNDS: dict[str, tuple[float, float]] = {
    "f32": (1e-6, 1e-6),
    "f16": (1e-3, 1e-3),
    "bf16": (5e-3, 5e-3),
    "q8_0": (0.02, 0.01),
    "q5_1": (0.06, 0.05),
    "q5_0": (0.10, 0.08),
    "q4_1": (0.15, 0.10),
    "q4_0": (0.20, 0.15),
    "q6_k": (0.04, 0.04),
    "q5_k": (0.08, 0.08),
    "q4_k": (0.15, 0.15),
    "q3_k": (0.30, 0.35),
    "q2_k": (0.50, 0.60),
    # IQ4 grid steps reach 24/127 of the block scale: half a step ~0.1 (fixture worst: 0.093 rmse, 0.053 max)
    "iq4_nl": (0.20, 0.15),
    "iq4_xs": (0.20, 0.15),
    # IQ3 groups must land on a 256/512-point grid and an imatrix may zero a weight's importance,
    # so single weights can move by more than the tensor's max (measured up to 1.43x on uniform
    # data); heavy tails (Student t, 1.5 dof) reach 0.44 rms. Loose: the bytes are compared anyway.
    "iq3_s": (0.60, 2.0),
    "iq3_xxs": (0.60, 2.0),
}


@dataclass(frozen=True)
class LogitBounds:
    max_rel_dlogit: float
    max_kld: float
    min_top1: float


# The quality envelope of the 2-layer fixture (fixtures/tiny-llama) per main type: what a
# correct file of *that* model shows against the float reference, with headroom. Not a gate
# (quality depends on the model); tests use it as a tolerance for the fixture's files.
LOGIT_BOUNDS: dict[str, LogitBounds] = {
    "f32": LogitBounds(1e-4, 1e-6, 0.99),
    "f16": LogitBounds(0.005, 1e-4, 0.98),
    "bf16": LogitBounds(0.02, 1e-3, 0.97),
    "q8_0": LogitBounds(0.03, 4e-3, 0.95),
    "q6_k": LogitBounds(0.08, 0.01, 0.93),
    "q5_1": LogitBounds(0.15, 0.04, 0.88),
    "q5_0": LogitBounds(0.15, 0.04, 0.88),
    "q5_k": LogitBounds(0.15, 0.03, 0.88),
    "q4_1": LogitBounds(0.30, 0.12, 0.80),
    "q4_0": LogitBounds(0.30, 0.12, 0.80),
    "q4_k": LogitBounds(0.30, 0.08, 0.80),
    "q3_k": LogitBounds(0.40, 0.25, 0.68),
    "q2_k": LogitBounds(0.70, 0.70, 0.45),
    # ~4.5 bits like q4_K (fixture: max rel dlogit 0.14, KLD 0.0054, top-1 0.922 at 64 and 256 tokens)
    "iq4_nl": LogitBounds(0.30, 0.08, 0.80),
    "iq4_xs": LogitBounds(0.30, 0.08, 0.80),
    # fixture with an imatrix from the bundled text: iq3_s 0.138 / 0.016 / 0.922, iq3_xxs 0.171 / 0.021 / 0.859
    "iq3_s": LogitBounds(0.40, 0.10, 0.75),
    "iq3_xxs": LogitBounds(0.45, 0.15, 0.70),
}


@dataclass(frozen=True)
class Published:
    kld: float
    top1: float | None  # "Same top p", when published


# llama.cpp's published figures on LLaMA-3-8B (tools/perplexity/README.md, no imatrix), by file type
LLAMA3_8B: dict[str, Published] = {
    "MOSTLY_Q8_0": Published(0.0014, 0.977),
    "MOSTLY_Q6_K": Published(0.0055, 0.960),
    "MOSTLY_Q5_0": Published(0.022, None),
    "MOSTLY_Q4_K_M": Published(0.031, 0.919),
    "MOSTLY_Q4_0": Published(0.072, None),
    "MOSTLY_Q3_K_M": Published(0.10, None),
    "MOSTLY_Q2_K": Published(0.45, 0.711),
}


def published_figures(file_type: str | None) -> dict | None:
    """{"model", "file_type", "kld", "top1"} for the file's type, None when nothing is published."""
    p = LLAMA3_8B.get(file_type or "")
    return None if p is None else {"model": "LLaMA-3-8B", "file_type": file_type, "kld": p.kld, "top1": p.top1}


QUALITY_GATES = ("max_kld", "min_top1", "max_ppl_ratio", "max_rel_dlogit")


def quality_gates(options: dict | None) -> dict:
    """The quality bounds the user asked for (None: not gated)."""
    out = {k: None for k in QUALITY_GATES}
    for k, v in (options or {}).items():
        if k not in out:
            raise LlmconvError(f"unknown bound {k!r} ({', '.join(QUALITY_GATES)})")
        out[k] = None if v is None else float(v)
    return out


def type_name(t: QT | int) -> str:
    return QT(int(t)).name.lower()


def file_type_name(ft) -> str | None:
    if ft is None:
        return None
    try:
        return LlamaFileType(int(ft)).name
    except ValueError:
        return f"unknown ({ft})"


def dominant_type(tensors) -> str:
    """The type that holds most of the 2-D weights (output/embedding upgrades do not count more)."""
    count: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) == 2:
            count[type_name(t.ggml_type)] = count.get(type_name(t.ggml_type), 0) + int(np.prod(t.shape))
    return max(count, key=count.get) if count else "f32"
