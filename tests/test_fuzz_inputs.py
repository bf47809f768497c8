"""Structure-aware fuzzing of a checkpoint's JSON files: config.json, params.json,
tokenizer.json and tokenizer_config.json, each inside a real checkpoint layout.

Each input is the real file with one to three changes drawn by hypothesis: a value replaced by
a hostile one (huge, negative, NaN/inf, the wrong type, a lone surrogate, control characters,
deep nesting) or by a plausible neighbour of the real one (n+1, 2n, n/2, a flipped bool,
another token's text: these get past the schema and reach the shape, vocabulary and metadata
checks behind it), a key deleted or added, a token id or merge made inconsistent, or the text
truncated. The consumer is the part of `convert --dry-run` that reads inputs, called in
process: `plan_conversion` (open the checkpoint, check names and shapes, build the plan and
every GGUF key) followed by encoding every key as the writer would and rendering the plan as
text and JSON. It must either succeed or raise an LlmconvError whose text is one line naming
the file, within TIMEOUT_S and without the process's peak RSS growing by MAX_GROWTH. Anything
else is a failure. A small sample also goes through the CLI (`llmconv convert --dry-run`).

The targets, mutations and checks live in llmconv/testing/fuzz_inputs.py. CI runs
EXAMPLES[target] inputs per target; `python bench/fuzz_inputs.py --examples N` runs more and
counts the outcomes.
"""

from __future__ import annotations

import pytest

from llmconv.testing.fuzz_inputs import (
    MAX_GROWTH,
    TARGETS,
    check_cli_input,
    check_input,
    checkpoint_copy,
    fuzz,
    peak_rss,
)

# inputs per target in CI (2-20 ms each; most are refused by the schema in well under 1 ms);
# bench/fuzz_inputs.py runs thousands per target.
EXAMPLES = {"config.json": 900, "params.json": 800, "tokenizer.json": 700, "tokenizer_config.json": 800}
CLI_EXAMPLES = 60  # of config.json and tokenizer.json, through `llmconv convert --dry-run`


# ---- the tests -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rss_at_start():
    start = peak_rss()
    yield
    assert peak_rss() - start < MAX_GROWTH, f"peak RSS grew by {(peak_rss() - start) >> 20} MiB"


@pytest.mark.parametrize("name", list(TARGETS))
def test_unmutated_files_are_accepted(tmp_path, name):
    d = checkpoint_copy(tmp_path, name)
    assert check_input(name, (d / name).read_text(encoding="utf-8"), d) == "accepted"
    assert check_cli_input(name, (d / name).read_text(encoding="utf-8"), d) == "accepted"


@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz(tmp_path, rss_at_start, name):
    fuzz(name, checkpoint_copy(tmp_path, name), EXAMPLES[name])


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json"])
def test_fuzz_through_the_cli(tmp_path, rss_at_start, name):
    fuzz(name, checkpoint_copy(tmp_path, name), CLI_EXAMPLES // 2, check=check_cli_input)
