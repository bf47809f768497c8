"""Fuzz the checkpoint JSON readers (config.json, tokenizer_config.json, params.json,
tokenizer.json) with many structure-aware mutations of the real files and count what happens.

    python bench/fuzz_inputs.py --examples 2500 [--files config.json,params.json] [--seed S] [--json out.json]

The strategy and the check are llmconv/testing/fuzz_inputs.py's (tests/test_fuzz_inputs.py runs ~800 per file in CI):
each input must be accepted or refused with a one-line LlmconvError naming the file, within
a time limit, and no single input may raise the process's peak RSS by MAX_GROWTH (the growth
over the whole run is reported too).
Prints, per file, how many inputs were tried (and distinct), the outcomes by kind, and every
failure. Exit status 1 if anything failed. Without --seed the run is deterministic.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmconv.testing import fuzz_inputs as F  # noqa: E402


def fuzz_file(name: str, n: int, seed: int | None, tmp: Path) -> dict:
    d = F.checkpoint_copy(tmp, name)
    outcomes: collections.Counter = collections.Counter()
    failures: list[str] = []
    seen: set[int] = set()
    peak = {"last": F.peak_rss(), "largest_jump": 0}
    slowest = {"seconds": 0.0, "input": "", "at": time.perf_counter()}

    def record(text, outcome):
        seen.add(hash(text))
        now = time.perf_counter()  # this input's generation and check
        if now - slowest["at"] > slowest["seconds"]:
            slowest.update(seconds=now - slowest["at"], input=text[:120])
        slowest["at"] = now
        now = F.peak_rss()  # how far this input pushed the process's peak RSS
        peak["largest_jump"] = max(peak["largest_jump"], now - peak["last"])
        peak["last"] = now
        if isinstance(outcome, BaseException):
            failures.append(
                f"{type(outcome).__name__}: {str(outcome)[:300]}\n  input: {text[:200]!r}\n"
                + "".join(traceback.format_exception(outcome)[-3:])
            )
            outcome = "FAILURE"
        outcomes[
            outcome if outcome in ("accepted", "FAILURE") else "error: " + outcome.split(": ", 1)[1].split(" ")[0]
        ] += 1

    start, rss = time.perf_counter(), F.peak_rss()
    F.fuzz(name, d, n, seed=seed, record=record)
    return {
        "file": name,
        "checkpoint": F.TARGETS[name],
        "inputs": sum(outcomes.values()),
        "distinct": len(seen),
        "accepted": outcomes["accepted"],
        "refused": sum(v for k, v in outcomes.items() if k.startswith("error")),
        "failures": len(failures),
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_growth_mib": round((F.peak_rss() - rss) / 2**20),
        "largest_single_input_jump_mib": round(peak["largest_jump"] / 2**20, 1),
        "slowest_input_seconds": round(slowest["seconds"], 2),
        "slowest_input": slowest["input"],
        "by_kind": dict(outcomes.most_common()),
        "failure_details": failures[:20],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=2500, help="inputs per file (default 2500)")
    ap.add_argument("--files", default=",".join(F.TARGETS), help="comma-separated file names")
    ap.add_argument("--seed", type=int, help="random seed (default: deterministic run)")
    ap.add_argument("--json", help="write the counts here")
    args = ap.parse_args()
    start_rss = F.peak_rss()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.files.split(","):
            r = fuzz_file(name, args.examples, args.seed, Path(tmp))
            results.append(r)
            print(
                f"{name} ({r['checkpoint']}): {r['inputs']:,} inputs ({r['distinct']:,} distinct): {r['accepted']:,} accepted, "
                f"{r['refused']:,} refused with one line, {r['failures']} other, {r['seconds']} s, "
                f"peak RSS +{r['peak_rss_growth_mib']} MiB (one input: at most +{r['largest_single_input_jump_mib']} MiB), "
                f"slowest input {r['slowest_input_seconds']} s",
                flush=True,
            )
            for f in r["failure_details"]:
                print("  " + f.replace("\n", "\n  "))
    growth = F.peak_rss() - start_rss
    total = sum(r["inputs"] for r in results)
    bad = sum(r["failures"] for r in results)
    jump = max(r["largest_single_input_jump_mib"] for r in results)
    # The bound is per input: over tens of thousands of inputs the peak also grows with
    # hypothesis's own record of what it generated (the consumer alone does not grow).
    print(
        f"total: {total:,} inputs, {bad} failures; peak RSS grew by {growth / 2**20:.0f} MiB over the run, "
        f"by at most {jump} MiB for one input (bound {F.MAX_GROWTH >> 20} MiB)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "rss_growth": growth}, indent=1))
    return 1 if bad or jump * 2**20 >= F.MAX_GROWTH else 0


if __name__ == "__main__":
    sys.exit(main())
