"""A package that is also the public function of the same name (see llmconv/__init__.py):
`llmconv.convert(...)` runs api.convert, while `llmconv.convert.plan` stays a module.

The function is looked up by name when the package is called, not imported here: api.py
imports these packages, so a static import back would be an import cycle.
"""

from __future__ import annotations

import importlib
import sys
import types


class CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        api = importlib.import_module("llmconv.api")
        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Called at the end of the package's __init__.py with its __name__."""
    sys.modules[module_name].__class__ = CallablePackage
