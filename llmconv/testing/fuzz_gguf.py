"""The GGUF reader fuzzer that tests/test_fuzz.py runs a few hundred inputs of and
bench/fuzz_gguf.py many thousands: small valid seed files whose every count, length, type,
dimension and offset field is known (gguf_build), mutations aimed at those fields, and the
check of one input (a correct parse, or one LlmconvError naming a byte offset; no hang, no
allocation beyond the file's size plus a constant). tests/test_fuzz.py says why each part is so.
"""

from __future__ import annotations

import contextlib
import json
import tracemalloc
from pathlib import Path

import sentencepiece as spm
from hypothesis import strategies as st
from gguf import GGUFValueType as VT

from llmconv.errors import LlmconvError
from llmconv.formats.gguf_reader import GGUFFormatError, read_gguf

from . import FIXTURES
from .fuzz_util import Hang, time_limit
from .gguf_build import GOOD_KVS, GOOD_TENSORS, build_gguf, compare_with_gguf_reader

FIXTURE = FIXTURES / "tiny-llama"

TIMEOUT_S = 2.0  # per input; a header of a few KB parses in about a millisecond
ALLOC_SLACK = 1 << 20  # tracemalloc peak may exceed the file size by this much (Python objects)


# ---- seeds ----------------------------------------------------------------------------------------


def fixture_kvs(n_tokens: int = 16) -> list[tuple]:
    p = json.loads((FIXTURE / "params.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(FIXTURE / "tokenizer.model"))
    d, h = p["dim"], p["n_heads"]
    return [
        ("general.architecture", VT.STRING, "llama"),
        ("general.name", VT.STRING, "tiny-llama"),
        ("llama.context_length", VT.UINT32, 4096),
        ("llama.embedding_length", VT.UINT32, d),
        ("llama.block_count", VT.UINT32, p["n_layers"]),
        ("llama.attention.head_count", VT.UINT32, h),
        ("llama.attention.head_count_kv", VT.UINT32, p["n_kv_heads"]),
        ("llama.rope.dimension_count", VT.UINT32, d // h),
        ("llama.attention.layer_norm_rms_epsilon", VT.FLOAT32, p["norm_eps"]),
        ("llama.rope.freq_base", VT.FLOAT32, p["rope_theta"]),
        ("tokenizer.ggml.model", VT.STRING, "llama"),
        ("tokenizer.ggml.tokens", VT.ARRAY, [sp.id_to_piece(i) for i in range(n_tokens)], VT.STRING),
        ("tokenizer.ggml.scores", VT.ARRAY, [sp.get_score(i) for i in range(n_tokens)], VT.FLOAT32),
        ("tokenizer.ggml.token_type", VT.ARRAY, [2, 3, 3] + [6] * (n_tokens - 3), VT.INT32),
        ("tokenizer.ggml.add_bos_token", VT.BOOL, 1),
    ]


SEED_KVS = fixture_kvs() + [kv for kv in GOOD_KVS if kv[0].startswith("test.")]  # every value type
# Two small valid files: v3 with the default alignment, v2 with general.alignment = 64.
SEEDS = [
    build_gguf(SEED_KVS, GOOD_TENSORS, fill=1),
    build_gguf([("general.alignment", VT.UINT32, 64)] + SEED_KVS, GOOD_TENSORS, version=2, alignment=64, fill=2),
]

# ---- mutations ------------------------------------------------------------------------------------

U64_EDGES = [
    0,
    1,
    2,
    7,
    8,
    31,
    32,
    63,
    64,
    255,
    256,
    2**16,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**32 + 1,
    2**48,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 33,
    2**64 - 32,
    2**64 - 1,
]
U32_EDGES = [0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 14, 31, 39, 40, 41, 255, 2**16, 2**31, 2**32 - 1]
U64_FIELDS = ("count", "length", "dim", "offset")
U32_FIELDS = ("type", "ndims")


_U64_VALUES = st.one_of(
    st.sampled_from(U64_EDGES),
    st.integers(0, 2**64 - 1),
    st.integers(-8, 8).map(lambda d: ("delta", d)),  # off-by-a-few lengths
    st.integers(0, 1 << 13).map(lambda n: ("abs", n)),
)  # plausible sizes
_U32_VALUES = st.one_of(
    st.sampled_from(U32_EDGES), st.integers(0, 2**32 - 1), st.integers(-2, 2).map(lambda d: ("delta", d))
)


def mutations(seed) -> st.SearchStrategy:
    """One mutation of `seed` (strategies are built once per seed: hypothesis validates each)."""
    size = len(seed.data)

    def at(*kinds):
        return st.sampled_from(sorted({p for k in kinds for p in seed.marks[k]}))

    flip = st.tuples(st.just("flip"), st.integers(0, size * 8 - 1))
    any_field = st.one_of(*(at(k) for k in sorted(seed.marks)))  # each kind of field equally often
    flip_field = st.builds(
        lambda p, d, bit: ("flip", (p + d) * 8 + bit), any_field, st.integers(0, 7), st.integers(0, 7)
    )
    byte = st.builds(lambda p, d, v: ("byte", p + d, v), any_field, st.integers(0, 7), st.integers(0, 255))
    u64 = st.tuples(st.just("u64"), st.one_of(*(at(k) for k in U64_FIELDS)), _U64_VALUES)
    u32 = st.tuples(st.just("u32"), st.one_of(*(at(k) for k in U32_FIELDS)), _U32_VALUES)
    pos = st.integers(4, size - 1)  # (flips cover the magic; don't spend splices on it)
    truncate = st.tuples(st.just("truncate"), pos)
    insert = st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16))
    delete = st.tuples(st.just("delete"), pos, st.integers(1, 16))
    return st.one_of(flip, flip_field, byte, u64, u64, u64, u32, u32, truncate, insert, delete)


def apply_mutations(data: bytes, muts) -> bytes:
    b = bytearray(data)
    for m in muts:
        if m[0] == "flip":
            if m[1] // 8 < len(b):
                b[m[1] // 8] ^= 1 << (m[1] % 8)
        elif m[0] == "byte":
            if m[1] < len(b):
                b[m[1]] = m[2]
        elif m[0] in ("u64", "u32"):
            fmt_size, limit = (8, 2**64) if m[0] == "u64" else (4, 2**32)
            pos, value = m[1], m[2]
            if pos + fmt_size > len(b):
                continue
            old = int.from_bytes(b[pos : pos + fmt_size], "little")
            if isinstance(value, tuple):
                value = old + value[1] if value[0] == "delta" else value[1]
            b[pos : pos + fmt_size] = (value % limit).to_bytes(fmt_size, "little")
        elif m[0] == "truncate":
            del b[m[1] :]
        elif m[0] == "insert":
            b[m[1] : m[1]] = m[2]
        elif m[0] == "delete":
            del b[m[1] : m[1] + m[2]]
    return bytes(b)


def _mutated(seed) -> st.SearchStrategy:
    return st.lists(mutations(seed), min_size=1, max_size=4).map(lambda muts: apply_mutations(seed.data, muts))


MUTATED_GGUF = st.one_of(*(_mutated(seed) for seed in SEEDS))


def mutated_gguf() -> st.SearchStrategy:
    """Bytes of a mutated seed file."""
    return MUTATED_GGUF


# ---- the check ------------------------------------------------------------------------------------


def check_input(data: bytes, path: Path) -> str:
    """Read `data` as a GGUF file; return "parsed" or "error: <kind>", or raise AssertionError
    (a wrong parse, a bad error, too much memory, a hang) or whatever unexpected exception
    the reader raised. tracemalloc must be tracing."""
    path.write_bytes(data)
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    error = None
    try:
        with time_limit(TIMEOUT_S):
            g = read_gguf(path)
    except Hang:
        raise AssertionError(f"read_gguf did not finish within {TIMEOUT_S} s") from None
    except LlmconvError as e:
        error = e
    peak = tracemalloc.get_traced_memory()[1] - before
    assert peak < len(data) + ALLOC_SLACK, f"allocated {peak} bytes for a {len(data)}-byte file"
    if error is not None:
        text = str(error)
        assert "\n" not in text and str(path) in text, text
        assert isinstance(error, GGUFFormatError), text
        assert 0 <= error.offset <= len(data), text
        return "error: " + _error_kind(error.message)
    check_parse(g, path, len(data))
    return "parsed"


def _error_kind(message: str) -> str:
    """The message without its offset and numbers: a category for counting."""
    words = message.split(": ", 1)[-1]
    for marker in (
        "file ends inside",
        "not a GGUF file",
        "is not supported",
        "cannot fit",
        "bytes long; the limit",
        "items; the limit",
        "needs at least",
        "unknown value type",
        "unknown array element type",
        "arrays of arrays",
        "bool value",
        "is empty",
        "duplicate metadata key",
        "is not UTF-8",
        "is not a power of two",
        "must be a UINT32",
        "dimensions (must be",
        "must be >= 1",
        "more than 2^63",
        "unknown tensor type",
        "block size",
        "not a multiple of the alignment",
        "runs past the end",
        "overlaps tensor",
        "duplicate tensor name",
        # known keys' types and ranges (gguf_metadata.py), count caps
        "must be a UTF-8 string",
        "must be an integer",
        "must be a FLOAT",
        "must be finite",
        "must be an array of",
        "must be a BOOL",
        "is outside [",
        "is in layer",
        "; the limit is",
    ):
        if marker in words:
            return marker
    return "other: " + words[:60]


def check_parse(g, path: Path, size: int) -> None:
    compare_with_gguf_reader(g, path)  # gguf-py reads the same from what we accepted
    spans = sorted((t.offset, t.offset + t.nbytes) for t in g.tensors)
    assert all(start % g.alignment == 0 and end <= size for start, end in spans)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


@contextlib.contextmanager
def tracing():
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()
