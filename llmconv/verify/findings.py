"""What verify's numbers mean: the findings (report.Finding) that fidelity's logits, the quality
gates and each tensor's bytes and error give, with the cause named where the numbers show one."""

from __future__ import annotations

import numpy as np

from .bounds import FIDELITY_BOUNDS
from .expected import TensorCheck
from .model_file import ModelFile
from .report import Finding

MAX_EXPLAINED = 4  # tensors whose cause is searched (each search loads other source tensors)


def fidelity_logit_findings(m: dict, who: str, quiet_elsewhere: bool) -> list[Finding]:
    """Candidate (or llama.cpp) vs the expected pass. The position hint is given only when
    nothing else was found: then the weights and metadata are right and what differs is how
    positions interact."""
    b = FIDELITY_BOUNDS
    if not all(np.isfinite([m["max_rel_dlogit"], m["kld_mean"]])):
        return [
            Finding(
                "fidelity",
                "logits",
                f"{who}: logits are not finite (NaN or inf): a weight or scale in the "
                "file is NaN/inf, or the activations overflow",
            )
        ]
    if m["max_rel_dlogit"] <= b.max_rel_dlogit and m["kld_mean"] <= b.max_kld:
        return []
    msg = (
        f"{who} vs the expected pass: max relative logit error {m['max_rel_dlogit']:.3g} (bound "
        f"{b.max_rel_dlogit:g}), KL divergence {m['kld_mean']:.3g} (bound {b.max_kld:g}): the file does not "
        "compute what its weights and types imply"
    )
    if quiet_elsewhere and m["rel_dlogit_pos0"] <= b.max_rel_dlogit < m["rel_dlogit_rest"]:
        msg += (
            f"; position 0 agrees ({m['rel_dlogit_pos0']:.2g}) and later positions do not "
            f"({m['rel_dlogit_rest']:.2g}): at position 0 attention sees only the token itself, so the "
            "difference is in how positions interact (RoPE: rope.freq_base, rope.dimension_count, rope_freqs)"
        )
    return [Finding("fidelity", "logits", msg)]


def quality_findings(m: dict, gates: dict, who: str) -> list[Finding]:
    out = []
    checks = (
        ("max_kld", m["kld_mean"], "mean KL divergence", lambda v, g: v <= g),
        ("min_top1", m["top1"], "top-1 agreement", lambda v, g: v >= g),
        ("max_ppl_ratio", m["ppl_ratio"], "perplexity ratio", lambda v, g: v <= g),
        ("max_rel_dlogit", m["max_rel_dlogit"], "max relative logit error", lambda v, g: v <= g),
    )
    for key, value, what, ok in checks:
        g = gates.get(key)
        if g is not None and not (np.isfinite(value) and ok(value, g)):
            out.append(
                Finding(
                    "quality",
                    "quality",
                    f"{who}: {what} {value:.3g} vs the float reference "
                    f"{'<' if key == 'min_top1' else '>'} {g:g} (--{key.replace('_', '-')})",
                )
            )
    return out


def tensor_findings(checks: list[TensorCheck], mf: ModelFile, source) -> tuple[list[Finding], list[str]]:
    from .tensor_causes import explain

    findings, notes = [], []
    explained = 0
    for c in checks:
        bad_bytes = c.blocks_damaged > 0
        if not (bad_bytes or c.out_of_bounds):
            if c.blocks_differ:
                notes.append(
                    f"tensor {c.name} ({c.type}): {c.bytes_summary} from llmconv's quantization, each as "
                    "close to the source (a different rounding, e.g. another llama.cpp build): not a defect"
                )
            continue
        if c.note is None and explained < MAX_EXPLAINED:
            explained += 1
            c.note = explain(c, mf, source)
        parts = []
        if bad_bytes:
            r, b = c.worst_block
            parts.append(
                f"{c.blocks_damaged} of {c.blocks} blocks differ from llmconv's quantization of the source "
                f"and are further from it (e.g. row {r} block {b})"
            )
        if c.out_of_bounds:
            parts.append(
                f"rel RMSE {c.rel_rmse:.3g} (bound {c.bound_rel_rmse:g}), max error {c.rel_max_err:.3g} of "
                f"the tensor's max (bound {c.bound_rel_max_err:g}) against the source weight"
            )
        findings.append(
            Finding(
                "fidelity",
                "tensor",
                f"tensor {c.name} ({c.type}): " + "; ".join(parts) + (f"; {c.note}" if c.note else ""),
                subject=c.name,
                explained=c.note is not None,
            )
        )
    return findings, notes
