"""Loading models and tokenizers for MLX: `mlxtune.load(...)` and `load_model(...)`.

Architectures come from mlx-lm (never rewritten here); finding the directory and normalizing its config is
`mlxtune.model_files`. The one thing to know: loading never applies an adapter by itself;
`mlxtune.load(path, adapter_file=...)` does it explicitly through `mlxtune.adapters.load_adapter`.
"""

from __future__ import annotations

import json
import os
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn
import mlx_lm.models
from mlx_lm.models import gemma
from mlx_lm.utils import _get_classes
from mlx_lm.utils import load_model as _mlx_load_model
from mlx_lm.utils import load_tokenizer as _load_tokenizer

from .adapters import load_adapter
from .cpu_memory import keep_freed_memory
from .dequantized import compute_dequantized, on_cpu
from .errors import ModelLoadError
from .gguf.sources import resolve_model
from .model_files import normalize_config, read_config
from .weights import read_header, weight_files


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    config: dict
    path: Path


def supported_architectures() -> list[str]:
    skip = {"base", "cache", "rope_utils", "switch_layers", "activations", "pipeline", "ssm"}
    return sorted(m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__) if m.name not in skip)


def load_tokenizer(path: Path, config: dict | None = None):
    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    if not has_tokenizer:
        raise ModelLoadError(
            f"{path} has no tokenizer (tokenizer.json or tokenizer.model): copy the tokenizer files of the base model into it"
        )
    try:
        return _load_tokenizer(path, eos_token_ids=(config or {}).get("eos_token_id"))
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {_tokenizer_file_problem(path) or ''}"
                             f"{type(e).__name__}: {str(e)[:200]}") from None


def _tokenizer_file_problem(path: Path) -> str | None:
    """Why tokenizer.json is unreadable ('tokenizer.json is not valid JSON (line 3): ...; '), when it is."""
    file = path / "tokenizer.json"
    if not file.exists():
        return None
    try:
        data = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"tokenizer.json is not valid JSON ({e}); "
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return "tokenizer.json is not a tokenizers file (no \"model\" object); "
    return "tokenizer.json: "


def use_tanh_gelu_for_gemma(model, config: dict) -> None:
    """Give Gemma 1 the tanh-approximated GELU that transformers and llama.cpp use.

    transformers runs Gemma 1 with gelu_pytorch_tanh whatever its config says; mlx-lm's gemma uses the
    exact GELU, which moves logits by ~1e-4. Swapping the MLP's class keeps mlx-lm's model file as it is.
    """
    if config.get("model_type") != "gemma":
        return
    class TanhGeluMLP(gemma.MLP):
        def __call__(self, x):
            return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))

    for layer in getattr(model, "layers", []):
        if type(layer.mlp) is gemma.MLP:
            layer.mlp.__class__ = TanhGeluMLP


def model_classes(config: dict, cfg_file: Path):
    """mlx-lm's (Model, ModelArgs) classes for `config`; an unknown architecture is one clear error."""
    if "model_type" not in config:
        raise ModelLoadError(f"{cfg_file} has no model_type: is this a language model?")
    try:
        return _get_classes(config)
    except ValueError:
        raise ModelLoadError(
            f"architecture {config['model_type']!r} in {cfg_file} is not supported by mlx-lm; "
            f"supported: {', '.join(supported_architectures())}") from None


def load_model(path_or_id: str | os.PathLike, *, lazy: bool = False, revision: str | None = None) -> LoadedModel:
    """Load model, tokenizer and normalized config (no adapter: see `mlxtune.adapters.load_adapter`)."""
    path = resolve_model(path_or_id, revision)
    config = normalize_config(read_config(path))
    model_classes(config, path / "config.json")
    weights = weight_files(path)
    if not weights:
        raise ModelLoadError(f"{path} has no model*.safetensors weights (PyTorch .bin checkpoints: run mlxtune convert first)")
    for w in weights:
        read_header(w)
    try:
        model, config = _mlx_load_model(path, lazy=lazy, model_config=config)
    except ValueError as e:
        raise ModelLoadError(f"the weights in {path} do not match its config.json: {e}") from None
    use_tanh_gelu_for_gemma(model, config)
    if on_cpu():  # MLX's quantized matmul is slow on the CPU: see mlxtune.dequantized
        compute_dequantized(model)
        keep_freed_memory()  # and its allocator refaults every freed page: see mlxtune.cpu_memory
    tokenizer = load_tokenizer(path, config)
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, path=path)


def load(path_or_id: str | os.PathLike, adapter_file: str | os.PathLike | None = None, **kwargs):
    """`model, tokenizer = mlxtune.load("org/name" or "path/", adapter_file=None)`, like mlx_lm.load."""
    loaded = load_model(path_or_id, **kwargs)
    if adapter_file is not None:
        load_adapter(loaded.model, adapter_file, dropout=0.0)
    return loaded.model, loaded.tokenizer
