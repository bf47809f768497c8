"""Shared machinery for the 32-weight block types (q8_0, q4_0, q4_1, q5_0, q5_1).

Speed comes from one layout change. A block's 32 weights sit in one 128-byte row, and numpy
reduces short rows slowly (one inner-loop call per block). So each chunk is first transposed
in 16-byte units (complex128, numpy's widest plain copy) into "lanes":

    lanes[r, 4*b + k] = weight 4*r + k of block b          shape [8, 4*B]

Per-block max/min become 8-row elementwise reductions, per-block scales broadcast along
contiguous rows, and the nibble pairs q4/q5 pack together (weights j and j+16) are whole
rows r and r+4. Results go back to [B, type_size] with one strided copy per field.

Every float operation is float32, one rounding per C operation, in the C order, so the
results are bit-identical to ggml's reference quantizers (see each type's module).
"""

from __future__ import annotations

import math
import threading
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0][0]  # 32 weights per block of every legacy type
CHUNK_BLOCKS = 32768  # 1M weights = 4 MB of float32 per chunk: amortizes numpy's per-call cost


class NonFiniteError(ValueError):
    """Input holds NaN/inf (or a scale overflows fp16). `row` is the first bad row."""

    def __init__(self, row: int, what: str = "NaN or inf"):
        self.row = row
        self.what = what
        super().__init__(f"{what} in row {row}")


class ImatrixRequired(ValueError):
    """A type whose kernel only exists with an importance matrix (ggml asserts one) got none."""


class BadBlock(Exception):
    """Raised by a chunk kernel: block `index` of the chunk cannot be stored."""

    def __init__(self, index: int, what: str):
        self.index = index
        self.what = what


_scratch = threading.local()


def scratch(name: str, shape: tuple, dtype) -> np.ndarray:
    """A reusable per-thread buffer: fresh multi-MB temporaries cost page faults every chunk."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize  # not np.prod: a numpy reduction per call, under the GIL
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(name)
    if buf is None or buf.nbytes < nbytes:
        buf = bufs[name] = np.empty(max(nbytes, 16), np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


LANES_PIECE = 4096  # blocks per transpose call: the strided source reads then hit the L2 cache


def to_lanes(xb: np.ndarray) -> np.ndarray:
    """float32 [B, 32] -> float32 [8, 4B] (see module docstring). Transposed LANES_PIECE blocks
    at a time: the source is read with a 128-byte stride, 8 times over, and a 512 KB piece
    stays in the L2 cache between those reads (~15 % faster than one call per chunk)."""
    B = xb.shape[0]
    t = scratch("lanes", (8, B), np.complex128)
    src = xb.view(np.complex128)
    for s in range(0, B, LANES_PIECE):
        np.copyto(t[:, s : s + LANES_PIECE], src[s : s + LANES_PIECE].T)
    return t.view(np.float32)


def _last4(m: np.ndarray, op, out: np.ndarray | None = None) -> np.ndarray:
    """Finish a per-block reduction: [4B] lane results -> [B]."""
    m = m.reshape(-1, 4)
    a = op(m[:, 0], m[:, 1], out=out)
    op(a, m[:, 2], out=a)
    return op(a, m[:, 3], out=a)


def block_max(lanes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return _last4(
        np.maximum.reduce(lanes, axis=0, out=scratch("lane_max", lanes.shape[1:], lanes.dtype)), np.maximum, out
    )


def block_min(lanes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return _last4(
        np.minimum.reduce(lanes, axis=0, out=scratch("lane_min", lanes.shape[1:], lanes.dtype)), np.minimum, out
    )


def per_lane(v: np.ndarray) -> np.ndarray:
    """Per-block values [B] -> [4B] (or [k, B] -> [k, 4B]), to broadcast against lanes.
    Four strided copies into a per-thread scratch buffer (half the time of np.repeat): the
    result is valid until the thread's next per_lane call."""
    out = scratch("per_lane", (*v.shape, 4), v.dtype)
    for k in range(4):
        out[..., k] = v
    return out.reshape(*v.shape[:-1], -1)


def reciprocal(d: np.ndarray) -> np.ndarray:
    """ggml's `id = d ? 1.0f/d : 0.0f` in float32 (inf where d is a tiny subnormal)."""
    inv = np.zeros_like(d)
    np.divide(np.float32(1.0), d, out=inv, where=d != 0)
    return inv


FP16_OVERFLOW = np.float32(65520.0)  # float32 values >= this round (to nearest even) to fp16 inf


def check(mx: np.ndarray, mn: np.ndarray, *scales: np.ndarray) -> None:
    """Raise BadBlock for the first block with NaN/inf input or a scale that overflows fp16.

    `scales` are the float32 values about to be stored as fp16.
    """
    ok = np.isfinite(mx - mn).all()  # NaN/inf in, or (rarely) a max - min overflow
    for s in scales:
        ok = ok and bool((np.abs(s) < FP16_OVERFLOW).all())
    if ok:
        return
    bad_input = ~(np.isfinite(mx) & np.isfinite(mn))
    bad_scale = np.zeros_like(bad_input)
    for s in scales:
        bad_scale |= ~(np.abs(s) < FP16_OVERFLOW)
    bad = bad_input | bad_scale
    if bad.any():
        i = int(np.argmax(bad))
        raise BadBlock(i, "NaN or inf" if bad_input[i] else "scale overflows fp16")


def first_signed(xb: np.ndarray, idx: np.ndarray, target: np.ndarray) -> np.ndarray:
    """For blocks `idx`: the first weight whose |w| == target (ggml's strict-`<` scan order)."""
    sub = xb[idx]
    j = np.argmax(np.abs(sub) == target[:, None], axis=1)
    return sub[np.arange(len(idx)), j]


def first_equal(xb: np.ndarray, idx: np.ndarray, target: np.ndarray) -> np.ndarray:
    """For blocks `idx`: the first weight == target (keeps the sign of a zero)."""
    sub = xb[idx]
    j = np.argmax(sub == target[:, None], axis=1)
    return sub[np.arange(len(idx)), j]


def wide_bytes(codes: np.ndarray):
    """View uint8 [8, 4B] as uint64 words when B is even, else uint32: byte-wise shifts and
    masks then run 4-8 bytes per element (numpy's uint8 shifts are not vectorized)."""
    w = np.uint64 if codes.shape[1] % 8 == 0 else np.uint32
    return codes.view(w), w


def repeat_byte(w, byte: int):
    """The byte repeated over an integer of type w: repeat_byte(np.uint32, 0x0F) == 0x0F0F0F0F."""
    return w(int.from_bytes(bytes([byte]) * np.dtype(w).itemsize, "little"))


def pack_nibbles(codes: np.ndarray, mask: bool) -> np.ndarray:
    """uint8 codes [8, 4B] (lanes) -> uint32 [4, B]: byte j of a block = code j | code j+16 << 4.

    Works on uint64 words (8 codes at once; numpy's uint8 shifts are not vectorized).
    Without `mask`, codes must be <= 15, so a code shifted left by 4 stays inside its byte.
    With `mask`, codes may have bit 4 set (q5 types keep it in qh): only the low nibbles are kept.
    """
    c, w = wide_bytes(codes)  # [8, B/2] or [8, B]
    packed = scratch("packed", (4, c.shape[1]), w)
    np.left_shift(c[4:], w(4), out=packed)
    if mask:
        lo = scratch("lo", (4, c.shape[1]), w)
        np.bitwise_and(packed, repeat_byte(w, 0xF0), out=packed)
        np.bitwise_and(c[:4], repeat_byte(w, 0x0F), out=lo)
        packed |= lo
    else:
        packed |= c[:4]
    return packed.view(np.uint32)


def select(mask: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32 np.where(mask, a, b) by bit operations. np.where and copyto(where=) branch per
    element: with a mask that is true about half the time ("is the max negative?") they run
    ~5x slower than these four passes."""
    m = np.ascontiguousarray(mask).view(np.uint8).astype(np.uint32)
    np.negative(m, out=m)  # 0 or 0xFFFFFFFF
    bi = np.ascontiguousarray(b, dtype=np.float32).view(np.uint32)
    r = np.bitwise_xor(np.ascontiguousarray(a, dtype=np.float32).view(np.uint32), bi)
    r &= m
    r ^= bi
    return r.view(np.float32)


def high_bits(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [8, 4B] -> uint32 [B]: bit j = bit 4 of code j (q5's qh)."""
    # bit 4 of every byte, on uint64 words (numpy's uint8 shifts are not vectorized); the mask
    # drops the low nibble of the next byte that the shift brings in.
    c, w = wide_bytes(codes)
    h = np.right_shift(c, w(4))
    h &= repeat_byte(w, 0x01)
    h = h.view(np.uint32)  # [8, B]; byte k = bit of weight 4r+k
    # Gather the bits at byte positions 0, 8, 16, 24 into bits 21..24 with one multiply
    # (shifts 0, 7, 14, 21 never collide, so no carries), then to bits 4r..4r+3.
    h = h * np.uint32(0x00204081)
    h >>= np.uint32(21)
    h &= np.uint32(0xF)
    h <<= np.arange(0, 32, 4, dtype=np.uint32)[:, None]
    return np.bitwise_or.reduce(h, axis=0)


F32_ABS = np.uint32(0x7FFFFFFF)
F32_EXP = np.uint32(0x7F800000)  # also the bits of +inf: larger magnitudes are NaN
FP16_NORMAL_EXP = np.uint32(113 << 23)  # float32 bits of 2**-14, fp16's smallest normal
FP16_ROUNDS_TO_INF = np.uint32(0x477FF000)  # float32 bits of 65520 (FP16_OVERFLOW)
_F32_65536 = 0x47800000


def fp16_bits32(v: np.ndarray) -> np.ndarray:
    """float32 array -> uint32 array of the same shape holding the fp16 bits, rounded to nearest
    even like numpy's cast and ggml's GGML_FP32_TO_FP16. NaN goes through numpy's cast.
    tests/test_k_quants.py compares it with numpy's cast on every class of float32."""
    f = np.ascontiguousarray(v, dtype=np.float32)
    u = f.view(np.uint32)
    a = u & F32_ABS
    lo, hi = (a.min(), a.max()) if a.size else (F32_EXP, 0)
    if hi > F32_EXP:  # NaN
        return f.astype(np.float16).view(np.uint16).astype(np.uint32)
    h = fp16_magnitude_bits(a, lo, hi)
    sign = np.right_shift(u, np.uint32(16), out=a)
    sign &= np.uint32(0x8000)
    h |= sign
    return h


def fp16_magnitude_bits(a: np.ndarray, lo, hi) -> np.ndarray:
    """fp16 bits (uint32) of |v|, from a = |v|'s float32 bits (no NaN) and their min/max.

    numpy's float16 cast costs ~1.5 ns a value here (~40 ns where the result is an fp16
    subnormal), most of a legacy block type's per-block work; this is 5-9 array operations.
    All results normal (lo >= 2**-14, hi < 65520): round the mantissa to 10 bits with ggml's
    add-0xFFF-plus-the-kept-lowest-bit rule on the bits and rebias the exponent (127 -> 15).
    Otherwise: adding M = 2**(e + 13), e = max(exponent of |v|, -14), rounds |v| to fp16's step
    in its binade, 2**(e - 10), and leaves |v| / 2**(e - 10) in the sum's low mantissa bits;
    adding (e + 14) << 10 gives the fp16 bits, carries into the next binade and subnormals
    (e = -14: exponent field 0) included. |v| >= 65536 is clamped to 65536, which gives inf.
    """
    if lo >= FP16_NORMAL_EXP and hi < FP16_ROUNDS_TO_INF:
        h = np.right_shift(a, np.uint32(13))
        h &= np.uint32(1)  # the kept mantissa's lowest bit: ties go to even
        h += a
        h += np.uint32(0xFFF - (112 << 23) & 0xFFFFFFFF)  # round half up; exponent bias 127 -> 15
        h >>= np.uint32(13)
        return h
    if hi >= FP16_ROUNDS_TO_INF:
        a = np.minimum(a, filled(a.shape, np.uint32, _F32_65536))
    e = np.bitwise_and(a, F32_EXP)
    np.maximum(e, filled(e.shape, np.uint32, int(FP16_NORMAL_EXP)), out=e)
    h = np.add(e, np.uint32(13 << 23))
    hf = h.view(np.float32)
    np.add(a.view(np.float32), hf, out=hf)
    h &= np.uint32(0x7FFFFF)
    e -= FP16_NORMAL_EXP
    e >>= np.uint32(13)
    h += e
    return h


def put_u16(out: np.ndarray, offset: int, v: np.ndarray) -> None:
    """Write uint16/float16 [B] at byte `offset` of every block of out [B, type_size]."""
    field = np.ndarray((out.shape[0],), np.uint16, buffer=out, offset=offset, strides=(out.shape[1],))
    field[...] = v.view(np.uint16)


def put_words(out: np.ndarray, offset: int, words: np.ndarray) -> None:
    """Write uint32 [k, B] (word i of every block) at byte `offset` of out [B, type_size].

    The field may be only 2-byte aligned (q4_0's qs at offset 2); numpy's unaligned copy
    loop is fine. One 1-D copy per word: 2.5x faster than one [k, B] copy, which numpy
    runs with an inner loop of k.
    """
    for i, w in enumerate(words):
        field = np.ndarray((out.shape[0],), np.uint32, buffer=out, offset=offset + 4 * i, strides=(out.shape[1],))
        field[...] = w


def filled(shape: tuple, dtype, value) -> np.ndarray:
    """A cached per-thread array of `value`s: numpy's minimum/maximum with a scalar operand
    are not vectorized (~5-17x slower than with an array operand of the same shape)."""
    dtype = np.dtype(dtype)
    name = f"filled-{dtype.str}-{value!r}"
    buf = scratch(name, shape, dtype)
    if getattr(_scratch, name + "_n", None) != buf.size:
        buf.fill(value)
        setattr(_scratch, name + "_n", buf.size)
    return buf


def clamp_codes(codes: np.ndarray, top: int) -> None:
    """codes = MIN(top, codes) in place (with an array bound: see `filled`)."""
    np.minimum(codes, filled(codes.shape, np.uint8, top), out=codes)


def quantize_rows(
    x: np.ndarray, type_size: int, kernel: Callable[[np.ndarray, np.ndarray], None], out: np.ndarray | None = None
) -> np.ndarray:
    """Run `kernel(xb [B, 32] float32, out [B, type_size] uint8)` over cache-sized chunks.

    x: float [rows, n] (or [..., n]); returns uint8 [..., n // 32 * type_size], written into
    `out` (any contiguous uint8 buffer of that many bytes) when given.
    """
    x = np.asarray(x)
    shape = x.shape
    n = shape[-1]
    if n % QK:
        raise ValueError(f"row length {n} is not a multiple of {QK}")
    xb = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK)
    if xb.ctypes.data % 16:  # the complex128 view wants 16-byte alignment to be fast
        xb = xb.copy()
    nb = xb.shape[0]
    out = output_blocks(out, nb, type_size)
    # inf/NaN from 1/d of a tiny subnormal d, and from NaN input, are expected and handled.
    with np.errstate(all="ignore"):
        for s in range(0, nb, CHUNK_BLOCKS):
            try:
                kernel(xb[s : s + CHUNK_BLOCKS], out[s : s + CHUNK_BLOCKS])
            except BadBlock as e:
                raise NonFiniteError((s + e.index) // (n // QK), e.what) from None
    return out.reshape(*shape[:-1], n // QK * type_size)


def output_blocks(out: np.ndarray | None, nblocks: int, type_size: int) -> np.ndarray:
    """uint8 [nblocks, type_size]: a fresh array, or a view of the caller's contiguous buffer."""
    if out is None:
        return np.empty((nblocks, type_size), np.uint8)
    if out.nbytes != nblocks * type_size or not out.flags.c_contiguous:
        raise ValueError(f"output buffer of {out.nbytes} bytes, need {nblocks * type_size} contiguous")
    return out.view(np.uint8).reshape(nblocks, type_size)


def dequantize_rows(b: np.ndarray, type_size: int, kernel: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """uint8 [..., nbytes] -> float32 [..., nbytes // type_size * 32]; kernel: [B, ts] -> [B, 32]."""
    b = np.ascontiguousarray(b).view(np.uint8)
    shape = b.shape
    nbytes = shape[-1]
    if nbytes % type_size:
        raise ValueError(f"row of {nbytes} bytes is not a whole number of {type_size}-byte blocks")
    blocks = b.reshape(-1, type_size)
    y = kernel(blocks)
    return y.reshape(*shape[:-1], nbytes // type_size * QK)
