"""Issue 8 §4: fuzzing the GGUF reader with mutated valid files.

The seeds are small valid GGUF files: the fixture's hyperparameters (params.json) and the
first tokens of its SentencePiece vocabulary as a converter writes them, a key of every
value type, and five tensors of 1-4 dims in float and block types. `build_gguf` records
where every count, length, type, dimension and offset field is, so mutations can aim at
them: bit flips (anywhere, or near a field), bytes set near a field, truncations, byte
insertions and deletions, and overwriting a field with a huge, boundary or nearby value.

Every input must give either a correct parse or an LlmconvError (a one-line message naming
a byte offset inside the file) and nothing else: no other exception, no hang (a per-input
timer), and no allocation beyond the file's size plus a constant (tracemalloc's peak). A
parse is correct when gguf.GGUFReader reads the same file to the same keys, values, types
and tensors, and every tensor lies inside the file, aligned and not overlapping another.

The seeds, mutations and check live in llmconv/testing/fuzz_gguf.py; `bench/fuzz_gguf.py
--examples N` runs the same strategy and check for many more inputs.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from llmconv.formats.gguf_reader import read_gguf
from llmconv.testing.fuzz_gguf import SEED_KVS, SEEDS, apply_mutations, check_input, mutated_gguf, tracing

EXAMPLES = 1500  # 7 s on a quiet 2-core machine, 12 s on a busy one (bench/fuzz_gguf.py: 20000)


# ---- the test -------------------------------------------------------------------------------------


def test_seeds_are_valid(tmp_path):
    for i, seed in enumerate(SEEDS):
        p = tmp_path / f"seed{i}.gguf"
        with tracing():
            assert check_input(seed.data, p) == "parsed"
        assert len(read_gguf(p).kvs["tokenizer.ggml.tokens"]) == 16
    assert {"count", "length", "type", "ndims", "dim", "offset", "bool"} <= set(SEEDS[0].marks)


def test_mutations_hit_the_fields():
    """The u64/u32 mutations write where the builder put counts and lengths: a huge n_kv is
    rejected as a count, a huge string length as a length."""
    s = SEEDS[0]
    assert int.from_bytes(s.data[s.at["n_kv"] : s.at["n_kv"] + 8], "little") == len(SEED_KVS)
    huge = apply_mutations(s.data, [("u64", s.at["n_kv"], 2**64 - 1)])
    assert huge[s.at["n_kv"] : s.at["n_kv"] + 8] == b"\xff" * 8
    assert s.at["n_kv"] in s.marks["count"] and s.at["kv:general.name"] in s.marks["length"]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "input.gguf"


@settings(
    max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
@given(data=mutated_gguf())
def test_mutated_files_parse_or_fail_cleanly(scratch, data):
    with tracing():
        outcome = check_input(data, scratch)
    assert outcome == "parsed" or outcome.startswith("error: ")
    assert not outcome.startswith("error: other"), outcome  # every message is one the reader writes
