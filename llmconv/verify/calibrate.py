"""Measure what `llmconv verify` sees on correct conversions: the margin of its fidelity bounds.

    python -m llmconv.verify.calibrate                     # fixtures/tiny-llama, every type and mix, 64 and 256 tokens
    python -m llmconv.verify.calibrate CKPT_DIR --tokens 128 --types q4_0,q8_0 --text FILE

Converts the checkpoint to every registered type and K-quant mix (llmconv's default
per-tensor choices, as `llmconv convert --outtype TYPE` makes them), verifies each file at each
token count and prints, per type, the fidelity figures (candidate vs the expected pass: what
FIDELITY_BOUNDS gates) with their headroom, whether every tensor was byte-identical, and the
quality figures (candidate vs the float reference: informational). Rerun it after changing a
kernel, the forward passes or a bound.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .. import quantize as q
from ..api import convert as convert_checkpoint
from ..convert.mixes import ALL as MIXES
from ..convert.mixes import outtype_needs_imatrix
from ..errors import LlmconvError, read_text_file
from .bounds import FIDELITY_BOUNDS
from .run import run_verify

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "tiny-llama"
# the order of the table: best to worst precision, then the mixes
ORDER = ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_1", "q5_0", "q5_k", "q4_1", "q4_0", "q4_k", "q3_k", "q2_k"]


def convert(ckpt: Path, outtype: str, out: Path) -> Path:
    convert_checkpoint(ckpt, out, outtype=outtype, force=True)
    return out


def calibrate(
    ckpt: Path, types: list[str], token_counts: list[int], workdir: Path, text: str | None = None
) -> list[dict]:
    rows = []
    for t in types:
        path = convert(ckpt, t, workdir / f"{t}.gguf")
        reports = [run_verify(path, ckpt, text=text, tokens=n) for n in token_counts]
        fid = [r["fidelity"]["metrics"] for r in reports]
        qual = [r["quality"]["metrics"] for r in reports]
        rows.append(
            {
                "type": t,
                "fid_dlogit": max(m["max_rel_dlogit"] for m in fid),
                "fid_kld": max(m["kld_mean"] for m in fid),
                "identical": all(r["fidelity"]["tensors_differ"] == 0 for r in reports),
                "kld": max(m["kld_mean"] for m in qual),
                "top1": min(m["top1"] for m in qual),
                "passed": all(r["passed"] for r in reports),
            }
        )
    return rows


def headroom(row: dict) -> float:
    """How many times the measured fidelity figures fit in their bounds, for the tighter one."""
    return min(
        FIDELITY_BOUNDS.max_rel_dlogit / max(row["fid_dlogit"], 1e-30),
        FIDELITY_BOUNDS.max_kld / max(row["fid_kld"], 1e-30),
    )


def format_table(rows: list[dict], ckpt: Path, token_counts: list[int]) -> str:
    b = FIDELITY_BOUNDS
    out = [
        f"checkpoint {ckpt}, tokens {', '.join(map(str, token_counts))}; worst over the runs",
        f"fidelity bounds: max rel dlogit {b.max_rel_dlogit:g}, KLD {b.max_kld:g}",
        "",
        "    type     fidelity: max rel dlogit  KLD        headroom  bytes      | quality: KLD     top-1",
    ]
    for r in rows:
        out.append(
            f"    {r['type']:8s}           {r['fid_dlogit']:8.2e}  {r['fid_kld']:8.2e}  {headroom(r):8.0f}x  "
            f"{'identical' if r['identical'] else 'DIFFER':9s}  |        {r['kld']:8.2e}  {r['top1']:5.3f}"
            + ("" if r["passed"] else "   FAILS")
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmconv.verify.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", nargs="?", type=Path, default=FIXTURE, help="checkpoint directory (default: the fixture)")
    ap.add_argument("--tokens", default="64,256", help="comma-separated token counts (default 64,256)")
    ap.add_argument(
        "--types",
        default=",".join([t for t in ORDER if t in q.TYPES] + [m for m in MIXES if not outtype_needs_imatrix(m)]),
        help="comma-separated output types (default: every registered type and mix that needs no imatrix)",
    )
    ap.add_argument("--text", type=Path, help="UTF-8 text to evaluate on (default: verify's bundled text)")
    a = ap.parse_args(argv)
    types = [t.strip() for t in a.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in q.TYPES and t not in MIXES]
    if unknown:
        ap.error(f"unknown type(s) {', '.join(unknown)}; registered: {', '.join(list(q.TYPES) + list(MIXES))}")
    if a.ckpt == FIXTURE and not FIXTURE.is_dir():
        ap.error(
            f"no CKPT_DIR given, and the default {FIXTURE} is not here: it ships with llmconv's source "
            "tree, not with an installed package"
        )
    try:
        counts = [int(n) for n in a.tokens.split(",")]
    except ValueError:
        ap.error(f"--tokens {a.tokens!r}: expected comma-separated numbers")
    try:
        with tempfile.TemporaryDirectory(prefix="llmconv-calibrate-") as tmp:
            text = read_text_file(a.text) if a.text else None
            rows = calibrate(a.ckpt, types, counts, Path(tmp), text)
    except LlmconvError as e:
        e.show()
        return e.exit_code
    print(format_table(rows, a.ckpt, counts))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
