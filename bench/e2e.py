"""End-to-end benchmark: one-pass `llmconv convert` against llama.cpp's two-step path.

    python bench/e2e.py --size 7b                  # writes bench/data/llama-7b first if missing
    python bench/e2e.py --size 1b --types q4_0     # a quick run

On one synthetic bf16 Meta checkpoint (bench/synth.py), in one run:

* copy   `dd bs=64M conv=fsync` of the checkpoint to the output directory: the disk-to-disk limit for
         the same bytes (read the checkpoint, write as many bytes as an f16 file holds).
* (a)    `llmconv convert --outtype T` for T in --types (default q4_0, q8_0, f16).
* (b)    the llama.cpp way to a q4_0 file: `llmconv convert --outtype f16` (llama.cpp's own
         converter does the same job at best as fast), then llama.cpp's C quantizer
         `llama_model_quantize` (llama-cpp-python, what `llama-quantize` runs) f16 -> q4_0
         with the same default per-tensor rules (output.weight q6_K).

Each step runs in its own process; we report wall time, peak RssAnon (anonymous memory, not
the page cache or mmapped files) polled every 5 ms, and bytes written. Threads: all cores for
every tool. The checkpoint is read through the page cache; with 24 GB of RAM a 13.5 GB 7B
checkpoint is mostly cached after the first step, for every step alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from llmconv.testing.procstat import run_peak_rss_anon  # noqa: E402
from pipeline import LLAMA_QUANTIZE, ensure, into_page_cache  # noqa: E402  (shared with the pipeline bench)
from pipeline import llmconv as convert_command  # noqa: E402


@dataclass
class Step:
    name: str
    seconds: float
    peak_rss_anon: int  # bytes, the max over the step's processes
    bytes_written: int


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Run `cmd`; return (wall seconds, peak RssAnon bytes)."""
    sec, peak, code, err = run_peak_rss_anon(cmd)
    if code != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err}")
    return sec, peak


def llmconv(ckpt: Path, outtype: str, out: Path, threads: int) -> Step:
    sec, peak = run_measured(convert_command(ckpt, outtype, out, threads))
    return Step(f"llmconv convert --outtype {outtype}", sec, peak, out.stat().st_size)


def llama_quantize(src: Path, dst: Path, ftype: int, threads: int) -> Step:
    sec, peak = run_measured([sys.executable, "-c", LLAMA_QUANTIZE, str(src), str(dst), str(ftype), str(threads)])
    return Step("llama.cpp llama_model_quantize f16 -> q4_0", sec, peak, dst.stat().st_size)


def copy_limit(ckpt: Path, out_dir: Path) -> Step:
    """`dd bs=64M conv=fsync` of the checkpoint's shards: what the disk does with the same bytes
    (read the checkpoint, write as much; dd with big blocks beats cp/shutil here by ~1.6x)."""
    shards = sorted(ckpt.glob("consolidated.*.pth"))
    start = time.perf_counter()
    total = 0
    for s in shards:
        dst = out_dir / f"copy-{s.name}"
        subprocess.run(["dd", f"if={s}", f"of={dst}", "bs=64M", "conv=fsync", "status=none"], check=True)
        total += dst.stat().st_size
        dst.unlink()
    return Step("copy (dd bs=64M conv=fsync) of the checkpoint", time.perf_counter() - start, 0, total)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="7b", help="bench/synth.py size: 1b, 7b, 13b")
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "data")
    ap.add_argument("--types", default="q4_0,q8_0,f16")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    import llama_cpp
    from gguf import LlamaFileType

    args.data.mkdir(parents=True, exist_ok=True)
    ckpt = ensure(args.size, args.data, cold=True)  # made if missing, not read in: the copy step reads it first
    out = args.data / "out"
    out.mkdir(exist_ok=True)
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.glob("consolidated.*.pth"))
    print(
        f"checkpoint {ckpt} ({gib(ckpt_bytes)}), {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"llama-cpp-python {llama_cpp.__version__}",
        flush=True,
    )

    steps: dict[str, Step] = {}
    steps["copy"] = copy_limit(ckpt, out)
    print(f"  {steps['copy'].name}: {steps['copy'].seconds:.1f} s", flush=True)
    for t in args.types.split(","):
        path = out / f"a-{t}.gguf"
        steps[t] = llmconv(ckpt, t, path, args.threads)
        print(f"  {steps[t].name}: {steps[t].seconds:.1f} s", flush=True)
        path.unlink()
    # (b): f16 first, then llama.cpp's quantizer on it
    f16 = out / "b-f16.gguf"
    steps["b_f16"] = llmconv(ckpt, "f16", f16, args.threads)
    print(f"  (b) {steps['b_f16'].name}: {steps['b_f16'].seconds:.1f} s", flush=True)
    q = out / "b-q4_0.gguf"
    into_page_cache(f16)  # llmconv writes past the page cache; a buffered converter's f16 would be cached
    steps["b_q4_0"] = llama_quantize(f16, q, int(LlamaFileType.MOSTLY_Q4_0), args.threads)
    print(f"  (b) {steps['b_q4_0'].name}: {steps['b_q4_0'].seconds:.1f} s", flush=True)
    f16.unlink()
    q.unlink()

    two_step = steps["b_f16"].seconds + steps["b_q4_0"].seconds
    two_step_peak = max(steps["b_f16"].peak_rss_anon, steps["b_q4_0"].peak_rss_anon)
    print()
    print(f"{'path':48s} {'wall s':>8s} {'peak RssAnon':>13s} {'written':>11s} {'vs copy':>8s}")
    for key, s in steps.items():
        vs_copy = f"{steps['copy'].seconds / s.seconds:7.0%}" if key not in ("copy", "b_q4_0") else ""
        label = ("(b) " if key.startswith("b_") else "(a) " if key != "copy" else "") + s.name
        print(
            f"{label:48s} {s.seconds:8.1f} {gib(s.peak_rss_anon) if s.peak_rss_anon else '':>13s} "
            f"{gib(s.bytes_written):>11s} {vs_copy:>8s}"
        )
    print(f"{'(b) two-step total f16 -> q4_0':48s} {two_step:8.1f} {gib(two_step_peak):>13s}")
    if "q4_0" in steps:
        print(
            f"\nq4_0: one pass (a) / two-step (b) = {steps['q4_0'].seconds / two_step:.2f} x the time, "
            f"{steps['q4_0'].peak_rss_anon / two_step_peak:.2f} x the peak RssAnon"
        )
    if "f16" in steps:
        print(
            f"f16 conversion ran at {steps['copy'].seconds / steps['f16'].seconds:.0%} of the copy rate "
            f"(copy {ckpt_bytes / steps['copy'].seconds / 2**20:.0f} MiB/s read+write, "
            f"convert {ckpt_bytes / steps['f16'].seconds / 2**20:.0f} MiB/s of checkpoint)"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "size": args.size,
                    "threads": args.threads,
                    "checkpoint_bytes": ckpt_bytes,
                    "steps": {k: asdict(v) for k, v in steps.items()},
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
