"""Shared test plumbing: the skip hook below; the `converted`, `f32_mix_models` and `base` fixtures.

Tests that need an outside oracle (llama-cpp-python, ctransformers, the real-tokenizer
packages) import it where they use it. Where it is not installed, such a test is skipped with
a reason instead of failing; CI installs every oracle, so there they all run."""

from __future__ import annotations

from pathlib import Path

import pytest

OUTSIDE_ORACLES = {"llama_cpp", "ctransformers"}


def _missing_oracle(excinfo) -> str | None:
    if excinfo is None or not issubclass(excinfo[0], ModuleNotFoundError):
        return None
    name = (excinfo[1].name or "").split(".")[0]
    return name if name in OUTSIDE_ORACLES else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    outcome = yield
    _skip_if_oracle_missing(outcome)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    outcome = yield
    _skip_if_oracle_missing(outcome)


def _skip_if_oracle_missing(outcome) -> None:
    name = _missing_oracle(outcome.excinfo)
    if name:
        outcome.force_exception(
            pytest.skip.Exception(
                f"needs {name}, an outside oracle from the test extra: pip install -e '.[test]'",
                _use_item_location=True,
            )
        )


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """`converted(checkpoint_dir, outtype, **options)`: the checkpoint converted through
    llmconv.convert, once per session for each (checkpoint, type, options); the path of the
    file. The files are read-only: a test that damages one works on its own copy."""
    import llmconv

    out = tmp_path_factory.mktemp("converted")
    cache: dict[tuple, Path] = {}

    def get(src: Path, outtype: str, **options) -> Path:
        key = (Path(src).resolve(), outtype, tuple(sorted(options.items())))
        if key not in cache:
            path = out / f"{len(cache)}-{Path(src).name}-{outtype}.gguf"
            llmconv.convert(src, path, outtype=outtype, **options)
            path.chmod(0o444)
            cache[key] = path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def f32_mix_models(tmp_path_factory):
    """The models the mix tests compare on, as f32 GGUFs (llmconv.convert --outtype f32): the
    fixture, 12 layers with ffn 800 (fallback rows), dim 288 (everything falls back)."""
    import llmconv
    from mix_util import FIXTURE, SYNTH
    from synth import write_meta_checkpoint

    root = tmp_path_factory.mktemp("mix-models")
    out = {}
    for name, ckpt in [("fixture", FIXTURE)] + [(n, write_meta_checkpoint(root / n, **kw)) for n, kw in SYNTH.items()]:
        out[name] = root / f"{name}-f32.gguf"
        llmconv.convert(ckpt, out[name], outtype="f32")
        out[name].chmod(0o444)
    return out


@pytest.fixture(scope="session")
def base(converted):
    """The HF fixture converted to f32 with its checksum sidecar (the hostile-GGUF tests rewrite
    copies of it)."""
    return converted(Path(__file__).resolve().parents[1] / "fixtures" / "hf-tiny-llama", "f32", checksum=True)
