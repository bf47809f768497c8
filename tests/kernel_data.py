"""Test data for the quantization kernels (test_quant_kernels.py, test_weighted_quant.py,
test_iq2.py, test_iq4.py): weights as checkpoints hold them, edge-case blocks, importances."""

from __future__ import annotations

import numpy as np

from llmconv.testing.llama_gguf_util import LLAMA_MATRIX_NAMES

ROW = 512  # weights per row: a multiple of 256, 16 blocks


def to_bf16_grid(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bf16 value (ties to even), kept as float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
    return u.view(np.float32)


def edge_blocks(rng: np.random.Generator) -> np.ndarray:
    """One 32-weight block per row of the result, each an edge case of the scale/rounding rules."""
    blocks = []

    def add(b):
        b = np.asarray(b, np.float32)
        assert b.shape == (32,)
        blocks.append(b)

    z = np.zeros(32, np.float32)
    add(z)  # all zero
    add(-z)  # all -0.0
    add(np.where(np.arange(32) % 3 == 0, -0.0, 0.0))  # mixed zeros
    add(np.r_[0.0, np.full(31, 0.25)])  # min is a leading +0
    add(np.r_[0.25, -0.0, np.full(30, 0.5)])  # min is a -0 after a positive
    add(np.r_[-0.0, 0.0, np.full(30, 3.0)])
    add(np.full(32, 1.5))  # constant blocks
    add(np.full(32, -7.25))
    for huge in (3.0e4, -3.0e4, 65504.0, -65504.0, 5.0e5, -6.5e4):  # no |min| >= 65520: q4_1 m
        b = rng.standard_normal(32).astype(np.float32) * 1e-3
        b[rng.integers(32)] = huge  # single huge value
        add(b)
    add(np.r_[65504.0, -65504.0, rng.uniform(-60000, 60000, 30)])  # fp16-max extremes, tied
    add(np.r_[-65504.0, 65504.0, rng.uniform(-60000, 60000, 30)])
    add(np.full(32, 65504.0))
    add(np.full(32, -65519.0))  # m rounds down to -65504, no overflow
    for first in (1.0, -1.0):  # equal-magnitude +/- maxima, both orders
        b = to_bf16_grid(rng.uniform(-0.9, 0.9, 32))
        i, j = sorted(rng.choice(32, 2, replace=False))
        b[i], b[j] = first * 1.0, -first * 1.0
        add(b)
        b = to_bf16_grid(rng.uniform(-0.9, 0.9, 32))
        b[[3, 19]] = [first * 0.5, -first * 0.5]  # same nibble byte, lo vs hi half
        b[[0, 31]] = [first * 0.5, -first * 0.5]
        add(b)
    # Rounding ties: grids where w*id (+ offset) lands exactly on .5 for each type's scale.
    halves = (np.arange(32) - 16) / 2.0  # -8 .. 7.5
    add(np.r_[-8.0, halves[1:]])  # q4_0: max -8 -> d = 1, id = 1
    add(np.r_[8.0, -halves[1:]])  # q4_0: max +8 -> d = -1
    add(np.r_[-16.0, (np.arange(31) - 15) + 0.5])  # q5_0: d = 1
    add(np.r_[127.0, (rng.integers(-127, 127, 31) + 0.5)])  # q8_0: d = 1, roundf ties
    add(np.r_[-127.0, (rng.integers(-127, 127, 31) + 0.5)])
    add(np.r_[0.0, 15.0, rng.integers(0, 15, 30) + 0.5])  # q4_1: min 0, d = 1
    add(np.r_[0.0, 31.0, rng.integers(0, 31, 30) + 0.5])  # q5_1: min 0, d = 1
    add(np.r_[-1.0, 14.0, rng.integers(-1, 14, 30) + 0.5])  # q4_1 with min != 0
    # Subnormals: d underflows to a subnormal (1/d may overflow to inf), or fp16(d) == 0.
    tiny = np.float32(1.4e-45)
    add(rng.integers(-50, 50, 32).astype(np.float32) * tiny)
    add(np.r_[np.float32(1e-40), np.zeros(31)])
    add(np.r_[np.float32(-3e-39), rng.uniform(-3e-39, 3e-39, 31)])
    add(np.r_[np.float32(2.5e-38), rng.uniform(-2e-38, 2e-38, 31)])  # d just above/below 2**-126
    add(np.r_[np.float32(1.2e-37), rng.uniform(-1e-37, 1e-37, 31)])
    add(np.r_[np.float32(5e-7), rng.uniform(-5e-7, 5e-7, 31)])  # fp16(d) subnormal
    add(np.r_[np.float32(1e-9), rng.uniform(-1e-9, 1e-9, 31)])  # fp16(d) == 0, id finite
    add(np.r_[np.float32(-1e-30), rng.uniform(0, 1e-30, 31)])
    return np.stack(blocks)


def datasets() -> dict[str, np.ndarray]:
    """name -> float32 [rows, ROW]; one GGUF tensor each."""
    rng = np.random.default_rng(1234)
    data = {}
    # bf16-grid weights, as real checkpoints hold them, with per-row scales like real layers
    scales = np.exp(rng.uniform(np.log(1e-3), np.log(1.0), (64, 1)))
    data["bf16"] = to_bf16_grid(rng.standard_normal((64, ROW)) * scales)
    data["bf16_heavy"] = to_bf16_grid(rng.standard_t(3, (32, ROW)) * 0.02)
    data["bf16_coarse"] = to_bf16_grid(rng.integers(-8, 9, (16, ROW)) * 0.125)  # many ties
    for s in (1e-3, 1.0, 1e3):
        data[f"normal_{s:g}"] = (rng.standard_normal((16, ROW)) * s).astype(np.float32)
    edges = edge_blocks(rng)
    pad = (-len(edges)) % (ROW // 32)
    filler = to_bf16_grid(rng.standard_normal((pad, 32)) * 0.1)
    data["edges"] = np.concatenate([edges, filler]).reshape(-1, ROW)
    # the same edge blocks again, permuted, so each sits at other positions in its row
    data["edges_shuffled"] = np.concatenate([edges, filler])[rng.permutation(len(edges) + pad)].reshape(-1, ROW)
    assert len(data) <= len(LLAMA_MATRIX_NAMES)
    return data


def importance_vectors(n: int, seed: int = 11) -> dict[str, np.ndarray]:
    """Column importances: what llama-imatrix produces (mean squared activations: skewed,
    a few outlier columns, some never activated) and degenerate ones."""
    rng = np.random.default_rng(seed)
    realistic = rng.gamma(0.5, 0.02, n)
    realistic[rng.choice(n, 4, replace=False)] *= 300.0
    realistic[rng.choice(n, 8, replace=False)] = 0.0
    return {
        "realistic": realistic,
        "ones": np.ones(n),
        "zeros": np.zeros(n),
        "sparse": np.where(rng.random(n) < 0.9, 0.0, rng.random(n) * 100),
        "tiny": rng.random(n) * 1e-30,
        "large": rng.random(n) * 1e20,
    }
