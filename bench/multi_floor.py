"""The floor of a several-types run: CPU seconds of the quantization kernels alone.

    python bench/multi_floor.py bench/data/llama-0.2b q8_0,q6_K,q4_K_M,q2_K

Plans the conversion to every type over one opened checkpoint (as `convert --outtype A,B,...`
does), then quantizes every distinct (tensor, type) pair once, single-threaded, timing each
kernel call with the thread's CPU clock: the engine shares a pair between outputs the same way
(q4_K_M's q6_K tensors are the q6_K file's). Reading and widening are timed apart. One run of
several types cannot cost less CPU than this sum; four separate runs cost at least each file's
own kernels.
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np

from llmconv.convert.pipeline import plan_conversions


def main(argv: list[str]) -> int:
    ckpt, types = argv[0], argv[1].split(",")
    convs = plan_conversions(ckpt, types, outfile=tempfile.gettempdir() + "/")
    first_needed_by = {t: 0.0 for t in types}
    own = {t: 0.0 for t in types}
    by_kernel: dict[str, list[float]] = {}  # tensor type -> [weights, CPU s], over all pairs
    read = 0.0
    for i, t in enumerate(convs[0].plan.tensors):
        start = time.thread_time()
        x = np.ascontiguousarray(t.src.load(), dtype=np.float32).reshape(-1, t.shape[-1])
        read += time.thread_time() - start
        cost: dict[str, float] = {}
        for typ, conv in zip(types, convs):
            qt = conv.plan.tensors[i].qtype
            if qt.name not in cost:
                start = time.thread_time()
                qt.quantize(x)
                cost[qt.name] = time.thread_time() - start
                k = by_kernel.setdefault(qt.name, [0, 0.0])
                k[0] += x.size
                k[1] += cost[qt.name]
                first_needed_by[typ] += cost[qt.name]
            own[typ] += cost[qt.name]
    print(f"read and widen once: {read:.2f} s")
    for typ in types:
        print(f"{typ}: kernels first needed by this file {first_needed_by[typ]:.2f} s, all of its own {own[typ]:.2f} s")
    for name, (n, sec) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name} tensors: {n / 1e6:,.0f} M weights, {sec:.2f} s ({n / max(sec, 1e-9) / 1e6:,.0f} M weights/s)")
    one, separate = sum(first_needed_by.values()), sum(own.values())
    print(f"kernels of one run: {one:.2f} s; of separate runs: {separate:.2f} s; floor ratio {one / separate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
