"""Fuzz llmconv's GGUF reader with many mutated files and count what happens.

    python bench/fuzz_gguf.py --examples 20000 [--seed S] [--save-failures DIR] [--json out.json]

The strategy and the check are tests/fuzzer.py's (the CI test runs a few hundred inputs):
small valid GGUF seeds built from the fixture's hyperparameters and vocabulary, mutated by
bit flips, truncations, byte insertions/deletions and huge, boundary or nearby values written
over count, length, type, dimension and offset fields. Each input must give a correct parse
(the same as gguf.GGUFReader's) or a one-line LlmconvError naming an offset in the file,
within a time limit and without allocating more than the file size plus a constant.

Prints how many inputs were tried (and how many were distinct), the outcomes by kind, and
every failure (also saved to --save-failures). Exit status 1 if anything failed.
Without --seed the run is deterministic (hypothesis' derandomize).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings  # noqa: E402

from llmconv.testing import fuzz_gguf as fuzzer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=20000, help="inputs to generate (default 20000)")
    ap.add_argument("--seed", type=int, help="random seed (default: deterministic run)")
    ap.add_argument("--save-failures", type=Path, metavar="DIR", help="write each failing input here")
    ap.add_argument("--json", type=Path, help="also write the counts here")
    args = ap.parse_args()

    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[tuple[str, bytes]] = []
    seen: set[bytes] = set()
    sizes = [len(s.data) for s in fuzzer.SEEDS]

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / "input.gguf"

        def one(data: bytes) -> None:
            seen.add(hashlib.sha1(data).digest())
            try:
                outcome = fuzzer.check_input(data, scratch)
                if outcome.startswith("error: other"):
                    raise AssertionError(f"unexpected error message: {outcome}")
            except Exception as e:  # noqa: BLE001 -- count everything, stop at nothing
                outcome = f"FAILED: {type(e).__name__}"
                failures.append((f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}", data))
            outcomes[outcome] += 1

        run = settings(
            max_examples=args.examples,
            derandomize=args.seed is None,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(given(data=fuzzer.mutated_gguf())(one))
        if args.seed is not None:
            run = hypothesis_seed(args.seed)(run)
        start = time.perf_counter()
        with fuzzer.tracing():
            run()
        seconds = time.perf_counter() - start

    tried = sum(outcomes.values())
    parsed = outcomes["parsed"]
    errors = sum(n for k, n in outcomes.items() if k.startswith("error: "))
    print(f"seeds: {len(sizes)} valid GGUF files of {', '.join(map(str, sizes))} bytes")
    print(f"inputs tried: {tried} ({len(seen)} distinct) in {seconds:.0f} s")
    print(f"  parsed, and identical to gguf.GGUFReader's reading: {parsed}")
    print(f"  rejected with a one-line LlmconvError:              {errors}")
    for k, n in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        if k.startswith("error: "):
            print(f"    {n:7d}  {k[7:]}")
    print(f"  anything else (other exception, hang, over-allocation, wrong parse): {len(failures)}")
    for i, (why, data) in enumerate(failures[:10]):
        print(f"--- failure {i}: {why}")
    if args.save_failures and failures:
        args.save_failures.mkdir(parents=True, exist_ok=True)
        for i, (why, data) in enumerate(failures):
            (args.save_failures / f"failure-{i}.gguf").write_bytes(data)
            (args.save_failures / f"failure-{i}.txt").write_text(why)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "examples_requested": args.examples,
                    "tried": tried,
                    "distinct": len(seen),
                    "seconds": seconds,
                    "outcomes": dict(outcomes),
                    "failures": len(failures),
                },
                indent=1,
            )
            + "\n"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
