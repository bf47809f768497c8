"""llmconv: LLaMA-family checkpoints -> GGUF / ggml files that llama.cpp loads.

The public API (llmconv/api.py), one function per command, each returning a result dataclass:

    llmconv.convert(src, out=None, outtype="q8_0", ...)     -> ConvertResult
    llmconv.quantize(src, out=None, outtype="q4_K_M", ...)  -> QuantizeResult
    llmconv.verify(file, reference, ...)                    -> VerifyResult (.passed, .report)
    llmconv.inspect(file)                                   -> InspectResult (.summary)
    llmconv.imatrix(src, out, text="builtin", ...)          -> ImatrixResult
    llmconv.convert_lora(adapter, base, out=None, ...)      -> ConvertLoraResult

`convert`, `quantize`, `verify` and `imatrix` are also the subpackages that hold the code, so
the name cannot simply be bound to a function (importing a subpackage rebinds its name on the
parent package, and `from .. import quantize as q` must keep giving the module): each of those
packages is a module you can call (_callable.py), and calling it runs the api function.
"""

__version__ = "0.1.0"

_CALLABLE_PACKAGES = ("convert", "quantize", "verify", "imatrix")


def __getattr__(name: str):
    """Loaded on first use, so `import llmconv` imports neither numpy nor torch."""
    import importlib

    if name in _CALLABLE_PACKAGES or name == "api":
        return importlib.import_module(f".{name}", __name__)
    if name in ("inspect", "convert_lora"):
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
