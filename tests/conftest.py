"""Shared test plumbing.

Tests that need an outside oracle (llama-cpp-python, ctransformers, the real-tokenizer
packages) import it where they use it. Where it is not installed, such a test is skipped with
a reason instead of failing; CI installs every oracle, so there they all run."""
from __future__ import annotations

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
        outcome.force_exception(pytest.skip.Exception(
            f"needs {name}, an outside oracle from the test extra: pip install -e '.[test]'", _use_item_location=True))
