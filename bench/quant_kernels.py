"""Benchmark llmconv's quantization kernels against gguf-py and llama.cpp's C quantizer.

    python bench/quant_kernels.py [--quick] [--types q8_0,q4_0] [--repeat 3] [--json out.json]
    python bench/quant_kernels.py --imatrix [--types q4_k,iq4_xs]   # the importance-weighted kernels
    python bench/quant_kernels.py --types q4_0,q3_k --no-gguf-py --no-file   # llmconv vs C only

Data: bf16-grid float32 matrices (what real checkpoints hold) of 4096x4096 and 11008x4096
(--quick: 1024x4096 and 2752x1024). Every type is run on the same matrices, in one process:

* llmconv: `quantize_tensor(x, type, threads=1)` and `threads=<all cores>`; best of --repeat.
* gguf-py: `gguf.quants.quantize(x, type)` (numpy, single-threaded); one run (it is slow).
* llama.cpp C kernel ("C"): `ggml_quantize_chunk` from llama-cpp-python's libggml-base.so,
  called through ctypes on the same numpy arrays -- the exact function llama_model_quantize
  calls per chunk of rows, so this is the C quantizer's time with no file I/O at all. For
  N threads the rows are split into N ranges, each quantized by one Python thread (ctypes
  drops the GIL), as llama.cpp's own worker threads do. Best of --repeat.
* llama.cpp end to end ("file"): `llama_model_quantize` (what `llama-quantize` runs) on an f32
  llama GGUF holding the same matrices, pure=True, nthread=1 and nthread=<all cores>. That
  call also reads the f32 file and writes the output, so the same call with ftype=ALL_F32 (a
  plain copy) is timed too and subtracted: speed = weights / (quantize - copy), best of
  --repeat each. The copy writes 4 bytes per weight where a quantized file writes 0.3-1.1,
  so this over-subtracts and, if anything, flatters llama.cpp; on a busy machine the
  difference is noisy (shown as n/a when not positive). The "C" column is the reliable one.

The process's malloc is set as llmconv's CLI sets it (`llmconv._malloc.pin_mmap_threshold`).
Speeds are millions of weights per second; ratios are llmconv / other (> 1: llmconv faster).
"CPU-time 1t" is the same 1-thread comparison by CPU seconds (time.process_time) instead of
wall-clock: on a machine shared with other work that ratio is the steadier one.
The types are every block type registered in llmconv.quantize for which llama.cpp has a file
type (K-quants too, added by registering them); --types picks a subset. Types that exist only
with an importance matrix (iq2_xxs, iq2_xs) run with --imatrix.

--imatrix: every kernel gets an importance vector per row length (gamma-distributed, as mean
squared activations are, with a few outlier and dead columns), llmconv's weighted kernels and
`ggml_quantize_chunk(..., imatrix)` alike; the types are those with a weighted kernel, and the
gguf-py and file columns are skipped (neither takes an imatrix here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import gguf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import llmconv.quantize as Q  # noqa: E402
from llmconv.testing.llama_gguf_util import write_f32_llama_gguf  # noqa: E402


def bf16_grid(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    u = (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).view(np.uint32)
    u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
    return u.view(np.float32)


def llama_has_ftype(qt: Q.QuantType) -> bool:
    import llama_cpp

    values = {getattr(llama_cpp, n) for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_")}
    return int(qt.file_type) in values


def default_types() -> list[str]:
    return [name for name, qt in Q.TYPES.items() if qt.block_size > 1 and llama_has_ftype(qt)]


def best_time(fn, repeat: int) -> float:
    return best_times(fn, repeat)[0]


def best_times(fn, repeat: int) -> tuple[float, float]:
    """(best wall-clock seconds, best CPU seconds of this process) over `repeat` runs. On a
    shared machine the CPU time of a 1-thread run is the steadier number."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def ggml_chunk_fn():
    """ctypes handle on ggml_quantize_chunk in the libggml-base llama-cpp-python loaded."""
    import ctypes
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return fn, lib.ggml_quantize_init


def importance(rng: np.random.Generator, n: int) -> np.ndarray:
    qw = rng.gamma(0.5, 0.02, n)
    qw[rng.choice(n, 4, replace=False)] *= 300.0
    qw[rng.choice(n, 8, replace=False)] = 0.0
    return qw.astype(np.float32)


def c_quantize(fn, qt: Q.QuantType, m: np.ndarray, out: np.ndarray, threads: int, qw=None) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rows, n = m.shape
    bounds = np.linspace(0, rows, threads + 1).astype(int)

    def part(i):
        s, e = int(bounds[i]), int(bounds[i + 1])
        fn(int(qt.ggml_type), m.ctypes.data, out.ctypes.data, s * n, e - s, n, None if qw is None else qw.ctypes.data)

    if threads == 1:
        part(0)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(part, range(threads)))


def llama_quantize_seconds(src: Path, dst: Path, ftype: int, nthread: int) -> float:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = True
    params.nthread = nthread
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    dt = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize ftype={ftype} failed ({rc})")
    return dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small matrices")
    ap.add_argument("--types", default=None, help="comma-separated, default: all with a llama.cpp ftype")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--no-gguf-py", action="store_true")
    ap.add_argument("--no-llama", action="store_true", help="skip both llama.cpp columns (C and file)")
    ap.add_argument("--no-file", action="store_true", help="skip only the slow end-to-end file column")
    ap.add_argument("--imatrix", action="store_true", help="the importance-weighted kernels (see above)")
    args = ap.parse_args(argv)
    # glibc malloc as llmconv's CLI and converter set it: quantize_tensor returns a fresh output
    # array per call, whose pages would otherwise be mapped and faulted in anew every repeat
    # (~0.1 ns a weight for q4_0), while the C column writes into buffers allocated once.
    from llmconv._malloc import pin_mmap_threshold

    pin_mmap_threshold()
    if args.imatrix:
        args.no_gguf_py = True

    import llama_cpp
    import llama_cpp._logger

    llama_cpp._logger.set_verbose(False)
    cores = os.cpu_count() or 1
    types = args.types.split(",") if args.types else default_types()
    if args.imatrix:
        types = [t for t in types if Q.get(t).quantize_weighted is not None]
    elif not args.types:
        types = [t for t in types if not Q.get(t).requires_imatrix]  # iq2_xxs/iq2_xs: --imatrix only
    shapes = [(1024, 4096), (2752, 1024)] if args.quick else [(4096, 4096), (11008, 4096)]
    rng = np.random.default_rng(0)
    mats = [bf16_grid(rng, s, 0.02) for s in shapes]
    qws = [importance(rng, s[1]) if args.imatrix else None for s in shapes]
    nweights = sum(m.size for m in mats)
    print(
        f"matrices {shapes}, {nweights / 1e6:.1f} M weights, bf16 grid; {cores} cores; "
        f"numpy {np.__version__}, gguf {gguf.__version__ if hasattr(gguf, '__version__') else '?'}, "
        f"llama-cpp-python {llama_cpp.__version__}"
    )

    results = {"shapes": shapes, "cores": cores, "types": {}}
    with tempfile.TemporaryDirectory(prefix="qbench") as tmp:
        tmp = Path(tmp)
        src = None
        if not (args.no_llama or args.no_file):
            names = ["token_embd.weight", "blk.0.ffn_up.weight"]
            src = write_f32_llama_gguf(tmp / "f32.gguf", dict(zip(names, mats)), n_embd=4096)
        for t in types:
            qt = Q.get(t)
            r: dict[str, float] = {}
            for th in sorted({1, cores}):
                secs, cpu = best_times(
                    lambda: [Q.quantize_tensor(m, qt, threads=th, imatrix=w) for m, w in zip(mats, qws)], args.repeat
                )
                r[f"llmconv_t{th}"] = nweights / secs / 1e6
                if th == 1:
                    r["llmconv_t1_cpu"] = nweights / cpu / 1e6
            if not args.no_gguf_py:
                try:
                    secs = best_time(lambda: [gguf.quants.quantize(m, qt.ggml_type) for m in mats], 1)
                    r["gguf_py"] = nweights / secs / 1e6
                except NotImplementedError:  # gguf-py lacks some quantizers (several K-quants)
                    pass
            if not args.no_llama:
                fn, init = ggml_chunk_fn()
                init(int(qt.ggml_type))
                outs = [np.empty((m.shape[0], qt.row_nbytes(m.shape[1])), np.uint8) for m in mats]
                for th in sorted({1, cores}):
                    secs, cpu = best_times(
                        lambda: [c_quantize(fn, qt, m, o, th, w) for m, o, w in zip(mats, outs, qws)], args.repeat
                    )
                    r[f"c_t{th}"] = nweights / secs / 1e6
                    if th == 1:
                        r["c_t1_cpu"] = nweights / cpu / 1e6
                same = all(np.array_equal(o, Q.quantize_tensor(m, qt, imatrix=w)) for m, o, w in zip(mats, outs, qws))
                r["bytes_equal_c"] = bool(same)
            if src is not None and llama_has_ftype(qt) and not args.imatrix:
                for th in sorted({1, cores}):
                    copy = min(
                        llama_quantize_seconds(src, tmp / "copy.gguf", llama_cpp.LLAMA_FTYPE_ALL_F32, th)
                        for _ in range(args.repeat)
                    )
                    quant = min(
                        llama_quantize_seconds(src, tmp / "q.gguf", int(qt.file_type), th) for _ in range(args.repeat)
                    )
                    r[f"llama_t{th}"] = nweights / (quant - copy) / 1e6 if quant > copy else float("nan")
                    r[f"llama_t{th}_raw_s"] = quant
                    r[f"llama_t{th}_copy_s"] = copy
            results["types"][t] = r
            line = f"{t:7s} llmconv 1t {r['llmconv_t1']:6.1f}"
            if cores > 1:
                line += f"  {cores}t {r[f'llmconv_t{cores}']:6.1f}"
            if "gguf_py" in r:
                line += f" | gguf-py {r['gguf_py']:5.0f} (x{r['llmconv_t1'] / r['gguf_py']:.2f})"
            for key, label in (("c", "C"), ("llama", "file")):
                if f"{key}_t1" in r:
                    line += f" | {label} 1t {r[f'{key}_t1']:5.1f} (x{r['llmconv_t1'] / r[f'{key}_t1']:.2f})"
                    if cores > 1:
                        line += (
                            f" {cores}t {r[f'{key}_t{cores}']:5.1f}"
                            f" (x{r[f'llmconv_t{cores}'] / r[f'{key}_t{cores}']:.2f})"
                        )
            if "c_t1_cpu" in r:
                line += (
                    f" | CPU-time 1t: llmconv {r['llmconv_t1_cpu']:.2f}, C {r['c_t1_cpu']:.2f} "
                    f"(x{r['llmconv_t1_cpu'] / r['c_t1_cpu']:.2f})"
                )
            if "bytes_equal_c" in r:
                line += f" | bytes==C: {r['bytes_equal_c']}"
            print(line + "   [M weights/s]", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
