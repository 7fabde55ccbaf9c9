"""mlxtune: fine-tune LLMs with MLX and hand the result to LM Studio, Ollama and llama.cpp.

The public API is a handful of functions, one per CLI verb; they are imported on first use so that
`import mlxtune` stays fast and a missing optional piece never breaks the others.
"""

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "load": "models",
    "load_model": "models",
    "generate": "generate",
    "chat": "generate",
    "evaluate": "evaluate",
    "lora": "train",
    "convert": "convert",
    "fuse": "fuse",
    "to_gguf": "gguf",
    "export_ollama": "export",
    "export_lmstudio": "export",
    "export_chat": "export",
    "MlxtuneError": "errors",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'mlxtune' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


class _Package(type(__import__("sys"))):
    # Importing a submodule sets it as an attribute of the package. For modules named like a public
    # function (generate, evaluate, convert, fuse, and lora.py vs train.lora) that would turn
    # `mlxtune.generate` into a module after any `from mlxtune.generate import ...`; keep the function
    # reachable instead (as mlx_lm does). `from mlxtune.generate import x` is unaffected.
    def __setattr__(self, name, value):
        if name in _API and type(value) is type(self).__mro__[1]:
            self.__dict__.pop(name, None)
            return
        super().__setattr__(name, value)


__import__("sys").modules[__name__].__class__ = _Package
