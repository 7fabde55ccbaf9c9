"""mlxtune: fine-tune LLMs with MLX and hand the result to LM Studio, Ollama and llama.cpp.

The public API is a handful of functions, one per CLI verb. They are imported on first use so that
`import mlxtune` stays fast and a missing optional piece never breaks the others. No module is named
like a public function (the function `fuse` lives in `fusion`, `lora` in `train`, ...), so
`mlxtune.fuse` is always the function, whatever has been imported.
"""

import os

__version__ = "0.1.0"

# torch (which mlx-lm's tokenizer code imports through transformers) runs OpenMP threads that spin while
# they wait; on a CPU shared with other busy processes that made a tiny model's torch training step ~100x
# slower (1.2 s instead of 12 ms on 2 cores at load 6). Sleeping waits cost little when the cores are free.
# It takes effect only if torch is not imported yet, hence here; the user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# name -> module that defines it
_API = {
    "load": "models",
    "load_model": "models",
    "generate": "generation",
    "chat": "generation",
    "evaluate": "evaluation",
    "compare": "comparison",
    "lora": "train",
    "plan": "memory_plan",
    "convert": "conversion",
    "fuse": "fusion",
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
