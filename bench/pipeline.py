"""Pipeline benchmark: every figure of issue 18 from one run, as ratios (the machine is shared).

    python bench/pipeline.py                          # 1.1B bf16 (TinyLlama shapes), all sections
    python bench/pipeline.py --size 7b --sections copy,q4_0,f16,two-step
    python bench/pipeline.py --sections scaling,multi --small-size 0.2b --scaling-types q8_0,q4_0,q6_k

On a synthetic bf16 Meta checkpoint (bench/synth.py, made first if missing, in the page cache):

* copy      `cp` of the checkpoint then `sync` of the copy (read + write + flush: the I/O limit);
            also `dd bs=64M conv=fsync`, which is faster than cp for big files.
* f16       `llmconv convert --outtype f16` (fsyncs its output like the copies).
* q4_0      one pass, at -t 1 and -t 2.
* two-step  the llama.cpp way to q4_0: `llmconv convert --outtype f16`, then llama.cpp's C quantizer
            `llama_model_quantize` (what `llama-quantize` runs) f16 -> q4_0, 2 threads.
* scaling   -t 1 vs -t 2 for each of --scaling-types (on --small-size's checkpoint).
* engines   f16 and q4_0 at -t 2 with the engine's worker threads, then its worker processes (the default
            on Linux; LLMCONV_WORKERS=threads picks threads).
* multi     `--outtype q8_0,q6_K,q4_K_M,q2_K` in one run vs the four single-type runs (--small-size).
* hf        f16 and q4_0 from a Hugging Face twin of the checkpoint (model.safetensors, same bytes):
            the safetensors reader against the .pth one.

For every process: wall, user and system CPU seconds and minor page faults (wait4's rusage,
children included), peak RssAnon (polled from /proc every 5 ms, summed over the engine's worker
processes), bytes written; and for the engine's workers (threads, or processes at -t 2 and up,
named llmconv-work), from /proc/PID/task/TID/schedstat: seconds on a CPU, seconds runnable but
waiting for a CPU, and the rest of their lives, blocked (on the GIL, a lock, I/O). On a shared
machine the wall and the wait grow with the load, but blocked time
does not: it is what the engine itself serializes, and the measure of thread scaling there.
"""

from __future__ import annotations

import argparse
import compileall
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from llmconv.testing.procstat import process_tree, rss_anon  # noqa: E402

ALL = "copy,f16,q4_0,two-step,scaling,engines,multi,hf"
MULTI = "q8_0,q6_K,q4_K_M,q2_K"


@dataclass
class Run:
    name: str
    wall: float
    user: float
    sys: float
    faults: int
    peak_anon: int
    written: int = 0
    # the engine's worker threads (named llmconv-work), summed: seconds on a CPU, seconds
    # runnable but waiting for one (the machine is busy), seconds blocked (GIL, locks, I/O)
    work_cpu: float = 0.0
    work_wait: float = 0.0
    work_blocked: float = 0.0


def _worker_tasks(pids: list[int]) -> list[str]:
    """/proc paths of the worker threads or processes (named llmconv-work) of these processes."""
    out = []
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                if Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() == "llmconv-work":
                    out.append(f"/proc/{pid}/task/{tid}")
            except OSError:
                continue
    return out


def _worker_stats(tasks: list[str], seen: dict[str, list[float]]) -> None:
    """Sample the workers' schedstat: seen[task] = [first seen, last seen, cpu s, run-queue wait
    s] (a worker's last sample is within one poll of its exit)."""
    now = time.perf_counter()
    for task in tasks:
        try:
            cpu, wait, _ = (int(x) for x in Path(f"{task}/schedstat").read_text().split())
        except (OSError, ValueError):
            continue
        rec = seen.setdefault(task, [now, now, 0.0, 0.0])
        rec[1:] = [now, cpu / 1e9, wait / 1e9]


REPEAT = 1  # --repeat: llmconv steps run this many times; the run of median wall is kept


def measure(name: str, cmd: list[str], written: list[Path] = (), env: dict | None = None) -> Run:
    """measure_once REPEAT times for an llmconv command (once for anything else): the run
    with the median wall, so one stall of the shared machine does not decide a ratio."""
    n = REPEAT if any("llmconv" in str(c) for c in cmd[:3]) else 1
    runs = sorted((measure_once(name, cmd, written, env) for _ in range(n)), key=lambda r: r.wall)
    if n > 1:
        runs[n // 2].name += f" (median of {n})"
    return runs[n // 2]


def measure_once(name: str, cmd: list[str], written: list[Path] = (), env: dict | None = None) -> Run:
    """Run cmd; wall time, rusage (user, sys, minor faults), peak RssAnon of the process and
    where its worker threads spent their lives (on a CPU, waiting for one, blocked)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=None if env is None else {**os.environ, **env}
    )
    peak = 0
    workers: dict[str, list[float]] = {}
    polls = 0
    while True:
        if polls % 10 == 0:  # the process tree and its workers, every 50 ms: polling is not free
            pids = process_tree(proc.pid)  # (0.2 s of CPU in a 2.2 s run when done every 5 ms)
            tasks = _worker_tasks(pids)
        polls += 1
        peak = max(peak, rss_anon(pids))
        _worker_stats(tasks, workers)
        pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.005)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(st) != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{err}")
    size = sum(p.stat().st_size for p in written if p.exists())
    cpu = sum(w[2] for w in workers.values())
    wait = sum(w[3] for w in workers.values())
    life = sum(w[1] - w[0] for w in workers.values())
    return Run(name, wall, ru.ru_utime, ru.ru_stime, ru.ru_minflt, peak, size, cpu, wait, max(0.0, life - cpu - wait))


def llmconv(ckpt: Path, outtype: str, out: Path | str, threads: int, extra=()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "llmconv.cli",
        "convert",
        str(ckpt),
        "--outtype",
        outtype,
        "-o",
        str(out),
        "-q",
        "-f",
        "-t",
        str(threads),
        *extra,
    ]


LLAMA_QUANTIZE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3]); p.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))
"""


def ensure(size: str, data: Path, cold: bool = False) -> Path:
    ckpt = data / f"llama-{size}"
    if not (ckpt / "params.json").exists():
        from synth import make

        print(f"writing synthetic checkpoint {ckpt} ...", flush=True)
        make(size, ckpt)
    if not cold:
        into_page_cache(*ckpt.glob("consolidated.*.pth"))
    return ckpt


def into_page_cache(*paths: Path) -> None:
    for path in paths:
        subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def evict(paths) -> None:
    """Drop these files' clean pages from the page cache (the next read comes from disk)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def table(runs: list[Run]) -> str:
    lines = [
        f"{'step':58s} {'wall s':>7s} {'user s':>7s} {'sys s':>6s} {'sys/user':>8s} {'faults':>9s} "
        f"{'peak anon':>10s} {'written':>10s}  workers: {'cpu s':>6s} {'wait s':>6s} {'blocked s':>9s}"
    ]
    for r in runs:
        su = f"{r.sys / r.user:8.0%}" if r.user > 0.05 else ""
        work = f"  {'':8s} {r.work_cpu:6.2f} {r.work_wait:6.2f} {r.work_blocked:9.2f}" if r.work_cpu else ""
        lines.append(
            f"{r.name:58s} {r.wall:7.2f} {r.user:7.2f} {r.sys:6.2f} {su:>8s} {r.faults:9,d} "
            f"{r.peak_anon / 2**20:7.0f} MiB {r.written / 2**30:6.2f} GiB{work}"
        )
    return "\n".join(lines)


def _blocked_share(r: Run) -> float:
    """Of the time the worker threads were not waiting for a CPU, the share they were blocked."""
    return r.work_blocked / max(r.work_cpu + r.work_blocked, 1e-9)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.1b", help="bench/synth.py size (1.1b, 7b, 13b, ...)")
    ap.add_argument("--data", type=Path, default=ROOT / "bench" / "data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sections", default=ALL, help=f"comma-separated subset of {ALL}")
    ap.add_argument(
        "--small-size", default=None, help="checkpoint for the scaling and multi sections (default: --size)"
    )
    ap.add_argument("--scaling-types", default="q8_0,q4_0,q4_1,q5_0,q5_1,q6_k,q5_k_m,q4_k_m,q3_k_m,q2_k")
    ap.add_argument("--multi-types", default=MULTI)
    ap.add_argument("--repeat", type=int, default=1, help="run each llmconv step N times, keep the median wall")
    ap.add_argument(
        "--cold",
        action="store_true",
        help="evict the checkpoint from the page cache before every step (reads come from disk)",
    )
    args = ap.parse_args(argv)
    global REPEAT
    REPEAT = max(1, args.repeat)
    sections = set(args.sections.split(","))
    T = args.threads

    # llmconv's bytecode, as pip compiles it at install: where PYTHONDONTWRITEBYTECODE is set (as
    # on the machines this was built on) every run would otherwise compile ~60 modules at start-up
    # (~0.05-0.1 s of a 2 s run), which an installed llmconv never does
    compileall.compile_dir(ROOT / "llmconv", quiet=1)
    args.data.mkdir(parents=True, exist_ok=True)
    ckpt = ensure(args.size, args.data, args.cold)
    out = args.data / f"out-{args.size}"  # one per size: runs for two sizes may overlap
    out.mkdir(exist_ok=True)
    shards = sorted(ckpt.glob("consolidated.*.pth"))
    ckpt_bytes = sum(p.stat().st_size for p in shards)
    if args.cold:
        evict(shards)
    print(
        f"checkpoint {ckpt} ({ckpt_bytes / 2**30:.2f} GiB bf16), {T} threads, "
        f"load average {os.getloadavg()[0]:.1f} at start{', checkpoint not in the page cache' if args.cold else ''}",
        flush=True,
    )
    runs: dict[str, Run] = {}

    def step(key: str, run: Run) -> Run:
        if args.cold:
            evict(shards)  # for the next step
        runs[key] = run
        print(table([run]).splitlines()[1], flush=True)
        return run

    def clean(*paths: Path) -> None:
        for p in paths:
            p.unlink(missing_ok=True)

    if "copy" in sections:
        dst = [out / f"copy-{s.name}" for s in shards]
        step(
            "cp",
            measure(
                "cp + sync of the checkpoint",
                ["sh", "-c", " && ".join(f"cp {s} {d} && sync {d}" for s, d in zip(shards, dst))],
                dst,
            ),
        )
        clean(*dst)
        step(
            "dd",
            measure(
                "dd bs=64M conv=fsync of the checkpoint",
                [
                    "sh",
                    "-c",
                    " && ".join(f"dd if={s} of={d} bs=64M conv=fsync status=none" for s, d in zip(shards, dst)),
                ],
                dst,
            ),
        )
        clean(*dst)
    if "f16" in sections or "two-step" in sections:
        f16 = out / "b-f16.gguf"
        step("f16", measure(f"llmconv convert --outtype f16 -t {T}", llmconv(ckpt, "f16", f16, T), [f16]))
        if "two-step" in sections:
            from gguf import LlamaFileType

            q = out / "b-q4_0.gguf"
            # llmconv writes past the page cache; a two-step user's f16 file, written by a buffered
            # converter, would still be cached, as the checkpoint is here: read it in first.
            into_page_cache(f16)
            step(
                "llama_q",
                measure(
                    f"  then llama.cpp llama_model_quantize f16 -> q4_0 ({T} threads)",
                    [
                        sys.executable,
                        "-c",
                        LLAMA_QUANTIZE,
                        str(f16),
                        str(q),
                        str(int(LlamaFileType.MOSTLY_Q4_0)),
                        str(T),
                    ],
                    [q],
                ),
            )
            clean(q)
        clean(f16)
    if "q4_0" in sections or "two-step" in sections:
        q = out / "a-q4_0.gguf"
        for t in (1, T) if T > 1 else (1,):
            step(f"q4_0_t{t}", measure(f"llmconv convert --outtype q4_0 -t {t}", llmconv(ckpt, "q4_0", q, t), [q]))
        clean(q)
    if "scaling" in sections:
        sckpt = ensure(args.small_size, args.data) if args.small_size else ckpt
        for typ in args.scaling_types.split(","):
            q = out / f"s-{typ}.gguf"
            for t in (1, T):
                step(f"s_{typ}_t{t}", measure(f"[{sckpt.name}] --outtype {typ} -t {t}", llmconv(sckpt, typ, q, t), [q]))
            clean(q)
    if "engines" in sections and T > 1:
        # the same -t T conversions with the engine's worker threads and its forked worker processes
        for typ in ("f16", "q4_0"):
            q = out / f"e-{typ}.gguf"
            for eng in ("threads", "processes"):
                cmd = llmconv(ckpt, typ, q, T)
                env = {"LLMCONV_WORKERS": eng}
                step(f"eng_{typ}_{eng}", measure(f"--outtype {typ} -t {T}, worker {eng}", cmd, [q], env))
            clean(q)
    if "multi" in sections:
        mckpt = ensure(args.small_size, args.data) if args.small_size else ckpt
        types = args.multi_types.split(",")
        d = out / "multi"
        d.mkdir(exist_ok=True)
        files = list(d.iterdir())
        clean(*files)
        step(
            "multi",
            measure(
                f"[{mckpt.name}] --outtype {','.join(types)} -t {T}", llmconv(mckpt, ",".join(types), f"{d}/", T), []
            ),
        )
        runs["multi"].written = sum(p.stat().st_size for p in d.iterdir())
        clean(*d.iterdir())
        for typ in types:
            q = out / f"m-{typ}.gguf"
            step(f"m_{typ}", measure(f"  separately: --outtype {typ} -t {T}", llmconv(mckpt, typ, q, T), [q]))
            clean(q)

    if "hf" in sections:
        hf = args.data / f"hf-{args.size}"
        if not (hf / "config.json").exists():
            from synth import make_hf

            make_hf(ckpt, hf)
        if not args.cold:
            subprocess.run(["cat", str(hf / "model.safetensors")], stdout=subprocess.DEVNULL, check=True)
        for typ in ("f16", "q4_0"):
            q = out / f"h-{typ}.gguf"
            step(f"hf_{typ}", measure(f"[{hf.name} safetensors] --outtype {typ} -t {T}", llmconv(hf, typ, q, T), [q]))
            clean(q)

    print("\n" + table(list(runs.values())) + "\n")
    r = runs
    if "two-step" in sections:
        two = r["f16"].wall + r["llama_q"].wall
        print(
            f"q4_0 one pass (-t {T}) / two-step (f16 + llama.cpp quantize) = "
            f"{r[f'q4_0_t{T}'].wall:.2f} / {two:.2f} s = {r[f'q4_0_t{T}'].wall / two:.2f}x   (goal <= 0.35x)"
        )
    if "copy" in sections and f"q4_0_t{T}" in r:
        print(f"q4_0 one pass / cp = {r[f'q4_0_t{T}'].wall / r['cp'].wall:.2f}x   (goal <= 3x)")
    if "copy" in sections and "f16" in r:
        print(
            f"f16 rate / cp rate = {r['cp'].wall / r['f16'].wall:.0%}   (goal >= 70 %); "
            f"/ dd rate = {r['dd'].wall / r['f16'].wall:.0%}; f16 {ckpt_bytes / r['f16'].wall / 2**20:.0f} MiB/s, "
            f"cp {ckpt_bytes / r['cp'].wall / 2**20:.0f} MiB/s"
        )
    pairs = [("q4_0_t1", f"q4_0_t{T}", "q4_0")] if "q4_0_t1" in r and T > 1 else []
    pairs += [(f"s_{t}_t1", f"s_{t}_t{T}", t) for t in args.scaling_types.split(",") if f"s_{t}_t1" in r]
    for a, b, typ in pairs:
        print(
            f"{typ:7s} -t {T} / -t 1 wall = {r[b].wall / r[a].wall:.2f}x; sys/user at -t {T} = "
            f"{r[b].sys / max(r[b].user, 1e-9):.0%}; workers blocked {_blocked_share(r[a]):.0%} of their "
            f"non-waiting time at -t 1, {_blocked_share(r[b]):.0%} at -t {T}"
        )
    for typ in ("f16", "q4_0"):
        if f"eng_{typ}_threads" in r:
            a, b = r[f"eng_{typ}_threads"], r[f"eng_{typ}_processes"]
            print(
                f"{typ} -t {T}, worker processes / worker threads: wall {b.wall / a.wall:.2f}x, "
                f"CPU {(b.user + b.sys) / (a.user + a.sys):.2f}x"
            )
    if "multi" in r:
        sep = sum(r[f"m_{t}"].wall for t in args.multi_types.split(","))
        print(
            f"{len(args.multi_types.split(','))} types in one run / separate runs = {r['multi'].wall:.1f} / {sep:.1f} s "
            f"= {r['multi'].wall / sep:.2f}x   (goal <= 0.5x); CPU "
            f"{r['multi'].user + r['multi'].sys:.1f} / "
            f"{sum(r[f'm_{t}'].user + r[f'm_{t}'].sys for t in args.multi_types.split(',')):.1f} s"
        )
    print(
        f"peak RssAnon over all llmconv runs: "
        f"{max(x.peak_anon for k, x in r.items() if k not in ('cp', 'dd', 'llama_q')) / 2**20:.0f} MiB; "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
