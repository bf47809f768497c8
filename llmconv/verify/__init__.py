"""The code behind `llmconv.verify(...)` (api.verify); calling this package runs it."""

from .._callable import make_callable

make_callable(__name__)
