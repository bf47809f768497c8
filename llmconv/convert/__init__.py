"""The code behind `llmconv.convert(...)` (api.convert); calling this package runs it."""

from .._callable import make_callable

make_callable(__name__)
