"""verify's findings, its verdict, the printed table and the JSON report.

Report schema (all plain JSON types)
------------------------------------

Numbers that are not finite are written as null, so the report is strict JSON (json.dumps
would write Infinity/NaN, which strict parsers refuse): a tensor's rel_rmse/rel_max_err is null
when it cannot be compared (shape differs from the source, or the file holds inf/NaN), a tensor
bound is null for a type without one, and a logit metric is null when the logits are not finite.

    file              str    the verified file (the first part of a split model)
    file_kind         str    "gguf", or the legacy magic ("ggjt", ...)
    reference         str    the checkpoint directory
    file_type         str|None  general.file_type by name ("MOSTLY_Q4_0"), None if absent
    dominant_type     str    type holding most 2-D weights ("q4_0")
    activations       str    "ggml" (llama.cpp's CPU activation rounding) or "f32"
    n_tokens          int    tokens evaluated (bos + text, cut to `tokens`)
    tokens_match      bool   the file's vocabulary equals the source tokenizer's, id by id
    first_token_diff  int|None  first id where they differ (or the shorter length)
    metadata          list   [{key, file, source, failure}] behaviour keys that differ from the checkpoint's
    structure_error   str|None  why the file cannot be run as a LLaMA model (then no forward pass)
    tensors           list   [{name, type, bytes, blocks, blocks_differ, blocks_damaged, worst_block, exact,
                             rel_rmse, rel_max_err, bound_rel_rmse, bound_rel_max_err, note}], worst rel_rmse
                             first; bytes is "identical", "N of M blocks differ" or "not compared"
    fidelity          dict   is the file the checkpoint at the types it declares (gated):
        passed                            bool
        bounds                            dict   {max_rel_dlogit, max_kld}
        metrics                           dict|None  candidate vs the expected pass (logit keys below)
        engine                            dict|None  llama.cpp vs the expected pass (same keys)
        tensors_identical, tensors_differ  int  tensors whose bytes equal / differ from llmconv's quantization
    quality           dict   what the quantization costs (informational unless gated):
        gates                             dict   {max_kld, min_top1, max_ppl_ratio, max_rel_dlogit}: null = not gated
        passed                            bool   every requested gate holds (true when none is)
        metrics                           dict|None  candidate vs the float reference (logit keys below)
        engine                            dict|None  llama.cpp vs the float reference (same keys)
        published                         dict|None  {model, file_type, kld, top1}: llama.cpp's figures for this type
    engine            dict|None  with --engine: {name, version} or {name, version, error}
    findings          list   [{part, check, subject, message, failure}] in verdict order ("fidelity"/"quality"/...)
    verdict           str    "PASS", or the first failure: its cause
    passed            bool   no failures
    failures          list[str]  one message per failure, the cause first
    notes             list[str]  things worth knowing that are not failures
    seconds           float  wall time

Logit keys (each metrics dict):
        max_rel_dlogit, mean_rel_dlogit   float  |b - a| max / mean, over max|a|
        kld_mean, kld_median, kld_p99     float  KL(a || b) per position, nats
        top1                              float  fraction of positions with the same argmax
        ppl_ref, ppl_cand, ppl_ratio      float  next-token perplexity of a and b, b/a
        rel_dlogit_pos0, rel_dlogit_rest  float  max rel |dlogit| at position 0 / at positions >= 1
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# the order causes are named in: what the file is made of first, the forward pass after
CHECK_ORDER = (
    "vocabulary",
    "metadata",
    "structure",
    "missing_tensor",
    "tensor",
    "logits",
    "engine",
    "quality",
    "checksum",
)


@dataclass
class Finding:
    part: str  # "fidelity", "quality" or "integrity" (checksums)
    check: str  # one of CHECK_ORDER
    message: str
    subject: str | None = None  # the tensor or metadata key it is about
    failure: bool = True
    explained: bool = False  # the message names a cause (ranks before unexplained findings of its check)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("explained")
        return d


def ordered(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (CHECK_ORDER.index(f.check), not f.explained))


def finite_or_none(obj):
    """The report with every inf/NaN float replaced by None (JSON null), recursively."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def _g(v, spec: str) -> str:
    """A report number for the table; null (not finite) prints as "n/a" in the same width."""
    if v is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return f"{'n/a':>{width}s}" if width else "n/a"
    return format(v, spec)


def _logit_row(who: str, m: dict) -> str:
    return (
        f"  {who:11s} {_g(m['max_rel_dlogit'], '14.3g')} {_g(m['kld_mean'], '10.3g')} "
        f"{_g(m['kld_p99'], '10.3g')} {_g(m['top1'], '7.3f')} {_g(m['ppl_ratio'], '10.4f')}"
    )


def format_fidelity(r: dict) -> list[str]:
    f = r["fidelity"]
    b = f["bounds"]
    lines = ["fidelity (gated): is this file the checkpoint, at the types it declares?"]
    n = len(r["tensors"])
    differ = [t for t in r["tensors"] if t["blocks_differ"]]
    lines.append(
        f"  tensors: {f['tensors_identical']} of {n} byte-identical to llmconv's quantization of the source"
        + (f"; {', '.join(t['name'] + ': ' + t['bytes'] for t in differ[:3])}" if differ else "")
    )
    lines.append(
        f"  metadata: {'matches the checkpoint' if not any(d['failure'] for d in r['metadata']) else 'DIFFERS'}"
        f"; vocabulary: {'matches' if r['tokens_match'] else 'DIFFERS'}"
    )
    m = f["metrics"]
    if m:
        lines.append(
            f"  logits vs expected pass: max rel dlogit {_g(m['max_rel_dlogit'], '.3g')} (bound "
            f"{b['max_rel_dlogit']:g}), KLD {_g(m['kld_mean'], '.3g')} (bound {b['max_kld']:g})"
        )
    e = f.get("engine")
    if e:
        lines.append(
            f"  llama.cpp vs expected pass: max rel dlogit {_g(e['max_rel_dlogit'], '.3g')}, "
            f"KLD {_g(e['kld_mean'], '.3g')}"
        )
    return lines


def format_quality(r: dict) -> list[str]:
    qd = r["quality"]
    gated = [k for k, v in qd["gates"].items() if v is not None]
    how = "gated: " + ", ".join(f"{k} {qd['gates'][k]:g}" for k in gated) if gated else "informational"
    lines = [f"quality ({how}): what does this quantization cost against the float reference?"]
    if qd["metrics"]:
        lines.append(
            f"  {'':11s} {'max rel dlogit':>14s} {'KLD mean':>10s} {'KLD p99':>10s} {'top-1':>7s} {'PPL ratio':>10s}"
        )
        lines.append(_logit_row("candidate", qd["metrics"]))
        if qd.get("engine"):
            lines.append(_logit_row("llama.cpp", qd["engine"]))
        lines.append(
            f"  perplexity: reference {_g(qd['metrics']['ppl_ref'], '.3f')}, "
            f"candidate {_g(qd['metrics']['ppl_cand'], '.3f')}"
        )
    p = qd.get("published")
    if p:
        top = f", top-1 {p['top1']:.1%}" if p.get("top1") is not None else ""
        lines.append(
            f"  for comparison, {p['file_type']} on {p['model']} (llama.cpp's published figures): KLD {p['kld']:g}{top}"
        )
    return lines


def format_report(r: dict) -> str:
    """The table `llmconv verify` prints."""
    kind = r["file_type"] or r["dominant_type"]
    lines = [f"{r['file']}  ({kind}, {r['n_tokens']} tokens)  vs  {r['reference']}"]
    lines += format_fidelity(r) + format_quality(r)
    worst = r["tensors"][:3]
    if worst:
        lines.append(
            "worst tensors (dequantized vs source): "
            + ", ".join(f"{t['name']} {t['type']} {_g(t['rel_rmse'], '.3g')}" for t in worst)
        )
    lines += [f"note: {n}" for n in r["notes"]]
    lines += [f"FAIL: {f}" for f in r["failures"]]
    lines.append("PASS" if r["passed"] else f"FAILED ({len(r['failures'])} check(s)): {r['verdict']}")
    return "\n".join(lines)


def default_sidecar(path: Path) -> Path:
    """`convert --checksum` writes one sidecar for all parts of a split model, named after the
    unsplit output (X.gguf.sha256.json for X-00001-of-0000N.gguf)."""
    from ..formats.checksums import sidecar_path
    from .model_file import SPLIT_NAME

    m = SPLIT_NAME.match(path.name)
    return sidecar_path(path.with_name(m["stem"] + ".gguf") if m else path)


def add_checksums(report: dict, file: Path, sidecar: Path | None) -> None:
    from ..formats.checksums import check_sidecar

    problems = check_sidecar(file, sidecar or default_sidecar(file))
    report["checksums"] = {"checked": True, "problems": problems}
    report["failures"] += [f"checksum: {p}" for p in problems]
    report["findings"] += [
        {"part": "integrity", "check": "checksum", "subject": None, "message": f"checksum: {p}", "failure": True}
        for p in problems
    ]
    if problems and report["passed"]:
        report["verdict"] = report["failures"][0]
    report["passed"] = report["passed"] and not problems
