"""Which engine runs `lora`, `generate` and `eval`: `--backend auto|mlx|torch`, decided here and only here.

`auto` takes MLX when MLX has a GPU (Apple Silicon's Metal, or an MLX CUDA build), else torch when torch is
installed and sees CUDA, else MLX on the CPU. Every run prints `Backend.line()`: `Backend: mlx (cpu)`,
`Backend: torch (cuda:0)`, ... The one thing to know: torch and transformers are optional. Nothing here
imports them unless the torch backend is asked about; `torch_module(name)` is the one door to mlxtune's torch
code, and a missing torch is one line naming the extra to install.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from types import ModuleType

import mlx.core as mx

from .errors import ConfigError
from .settings import BACKENDS

INSTALL_HINT = 'pip install "mlxtune[torch]"'


@dataclass
class Backend:
    name: str  # "mlx" or "torch"
    device: str  # mlx: "gpu" / "cpu"; torch: "cuda:0" / "cpu"
    reason: str  # why: what auto saw, or that it was asked for

    def line(self) -> str:
        return f"Backend: {self.name} ({self.device})"


def mlx_has_gpu() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(mx.metal.is_available() or (cuda is not None and cuda.is_available()))


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


def torch_cuda() -> bool:
    """True when torch is installed and sees a CUDA device (imports torch only if it is installed)."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch  # optional and heavy: only when installed

    return bool(torch.cuda.is_available())


def select_backend(name: str | None = "auto") -> Backend:
    """The backend for `--backend name`; `auto` says in `reason` what it saw."""
    name = name or "auto"
    if name not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {name}")
    if name == "mlx":
        return Backend("mlx", "gpu" if mlx_has_gpu() else "cpu", "asked for with --backend mlx")
    if name == "torch":
        torch = torch_module("torch_models").torch
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        return Backend("torch", device, "asked for with --backend torch")
    if mlx_has_gpu():
        return Backend("mlx", "gpu", "MLX has a GPU")
    if torch_installed() and torch_cuda():
        return Backend("torch", "cuda:0", "MLX has no GPU and torch sees CUDA")
    why = "torch sees no CUDA" if torch_installed() else "torch is not installed"
    return Backend("mlx", "cpu", f"MLX has no GPU and {why}")


def is_torch_model(model) -> bool:
    """True for a torch module (a transformers model); never imports torch itself."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def torch_module(name: str) -> ModuleType:
    """One of mlxtune's torch modules (torch_models, torch_engine, torch_generation), or one ConfigError when
    torch or transformers is missing."""
    try:
        return importlib.import_module(f"mlxtune.{name}")
    except ImportError as e:
        missing = getattr(e, "name", None) or "torch"
        if missing.split(".")[0] not in ("torch", "transformers"):
            raise
        raise ConfigError(f"--backend torch needs torch and transformers ({missing} is not installed): "
                          f"{INSTALL_HINT}") from None
