"""Measure what `llmconv verify` sees on correct conversions, to set and check its bounds.

    python -m llmconv.verify.calibrate                      # fixtures/tiny-llama, every type, 64 and 256 tokens
    python -m llmconv.verify.calibrate CKPT_DIR --tokens 128 --types q4_0,q8_0 --text FILE --engine

Converts the checkpoint to every registered type (llmconv's default per-tensor choices, as
`llmconv convert --outtype TYPE` makes them), verifies each file over the bundled default text
at each token count, and prints, per type, the worst figures over the runs next to the bounds
in run.py. That table is the one in run.py's docstring; rerun this after changing a kernel, the
fixture or a bound, and paste it there.

A second table gives, per tensor type, the worst per-tensor dequantization error over all the
files next to TENSOR_BOUNDS. A bound is healthy when the measured figure sits well inside it
(the "headroom" column: bound / measured, for the figure closest to its bound).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .. import quantize as q
from ..convert.execute import write_gguf
from ..convert.pipeline import plan_conversion
from .run import LOGIT_BOUNDS, TENSOR_BOUNDS, run_verify

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "tiny-llama"
# the order of the table: best to worst precision
ORDER = ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_1", "q5_0", "q5_k", "q4_1", "q4_0", "q4_k", "q3_k", "q2_k"]


def convert(ckpt: Path, outtype: str, out: Path) -> Path:
    conv = plan_conversion(ckpt, outtype=outtype, outfile=out)
    write_gguf(conv.out_path, conv.kvs, conv.plan, progress=False, force=True)
    return out


def worst(reports: list[dict], key: str, who: str = "candidate") -> float:
    """The worst value of metric `key` over the runs (top-1: the lowest)."""
    vals = [(r["metrics"] if who == "candidate" else r["engine"]["metrics"])[key] for r in reports]
    return min(vals) if key == "top1" else max(vals)


def headroom(measured: dict, b) -> float:
    """How many times the measured figures fit in their bounds, for the tightest one."""
    ratios = [b.max_rel_dlogit / max(measured["max_rel_dlogit"], 1e-30), b.max_kld / max(measured["kld_mean"], 1e-30)]
    # top-1 counts as the margin of disagreement: (1 - bound) / (1 - measured)
    ratios.append((1 - b.min_top1) / max(1 - measured["top1"], 1e-30))
    return min(ratios)


def calibrate(ckpt: Path, types: list[str], token_counts: list[int], engine: bool, workdir: Path,
              text: str | None = None) -> tuple[list, dict]:
    rows = []
    tensor_worst: dict[str, list[float]] = {}
    for t in types:
        path = convert(ckpt, t, workdir / f"{t}.gguf")
        reports = [run_verify(path, ckpt, text=text, tokens=n, engine="llama.cpp" if engine else None) for n in token_counts]
        m = {k: worst(reports, k) for k in ("max_rel_dlogit", "kld_mean", "top1")}
        e = {k: worst(reports, k, "engine") for k in ("kld_mean", "top1")} if engine else None
        rows.append((t, reports[0]["dominant_type"], m, e, all(r["passed"] for r in reports)))
        for r in reports[:1]:            # the tensors do not depend on the token count
            for row in r["tensors"]:
                w = tensor_worst.setdefault(row["type"], [0.0, 0.0])
                w[0] = max(w[0], row["rel_rmse"])
                w[1] = max(w[1], row["rel_max_err"])
    return rows, tensor_worst


def format_tables(rows, tensor_worst, ckpt: Path, token_counts: list[int]) -> str:
    out = [f"checkpoint {ckpt}, tokens {', '.join(map(str, token_counts))}; measured = worst over the runs",
           "",
           "    type   measured: max rel dlogit  KLD mean   top-1  | bound: max rel dlogit  max KLD   min top-1"]
    for t, dom, m, e, passed in rows:
        b = LOGIT_BOUNDS[dom]
        line = (f"    {t:6s}            {m['max_rel_dlogit']:7.1e}        {m['kld_mean']:7.1e}   {m['top1']:5.3f}"
                f"   |          {b.max_rel_dlogit:<8g}      {b.max_kld:<8g}  {b.min_top1:.2f}")
        line += f"    headroom {headroom(m, b):6.1f}x"
        if e is not None:
            line += f"   llama.cpp KLD {e['kld_mean']:7.1e} top-1 {e['top1']:5.3f}"
        if dom != t:
            line += f"   (bounds of {dom}, its dominant type)"
        if not passed:
            line += "   FAILS"
        out.append(line)
    out += ["", "    tensor type   worst rel_rmse  worst rel_max_err  | bound rel_rmse  bound rel_max_err"]
    for t in sorted(tensor_worst, key=lambda k: ORDER.index(k) if k in ORDER else len(ORDER)):
        rm, mx = tensor_worst[t]
        b_rmse, b_max = TENSOR_BOUNDS.get(t, (float("nan"), float("nan")))
        out.append(f"    {t:12s}  {rm:9.2e}       {mx:9.2e}          |  {b_rmse:<12g}  {b_max:g}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmconv.verify.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", nargs="?", type=Path, default=FIXTURE, help="Meta checkpoint directory (default: the fixture)")
    ap.add_argument("--tokens", default="64,256", help="comma-separated token counts (default 64,256)")
    ap.add_argument("--types", default=",".join(t for t in ORDER if t in q.TYPES),
                    help="comma-separated output types (default: every registered type)")
    ap.add_argument("--text", type=Path, help="UTF-8 text to evaluate on (default: verify's bundled text)")
    ap.add_argument("--engine", action="store_true", help="also run llama.cpp on each file and show its figures")
    a = ap.parse_args(argv)
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in q.TYPES]
    if unknown:
        ap.error(f"unknown type(s) {', '.join(unknown)}; registered: {', '.join(q.TYPES)}")
    counts = [int(n) for n in a.tokens.split(",")]
    with tempfile.TemporaryDirectory(prefix="llmconv-calibrate-") as tmp:
        text = a.text.read_text(encoding="utf-8") if a.text else None
        rows, tensor_worst = calibrate(a.ckpt, types, counts, a.engine, Path(tmp), text)
    print(format_tables(rows, tensor_worst, a.ckpt, counts))
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
