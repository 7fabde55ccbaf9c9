"""Finding and loading models: local Hugging Face or MLX directories, or hub ids through the HF cache.

Architectures come from mlx-lm. The one thing to know: transformers 5 writes RoPE settings under
`rope_parameters` (possibly one entry per layer type), which mlx-lm does not read for several
architectures, silently falling back to a default base; `normalize_config` maps them back to the
transformers-4 keys so that logits match transformers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

# Files a model needs besides its weights; used when fetching from the hub.
TOKENIZER_PATTERNS = [
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
]
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    config: dict
    path: Path


def supported_architectures() -> list[str]:
    import pkgutil

    import mlx_lm.models

    skip = {"base", "cache", "rope_utils", "switch_layers", "activations", "pipeline", "ssm"}
    return sorted(m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__) if m.name not in skip)


def resolve_model_path(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as it is, or a hub id downloaded into (or found in) the Hugging Face cache."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file: --model takes a model directory or a hub id")
        return path
    text = str(path_or_id)
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelLoadError(f"model path {text} does not exist (give a model directory or a hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelLoadError(f"{text} is not a local directory and huggingface_hub is not installed") from None
    try:
        local = snapshot_download(text, revision=revision, allow_patterns=["*.safetensors", *TOKENIZER_PATTERNS])
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"model {text} is not a local directory, not in the local Hugging Face cache, and the hub cannot be reached "
            "(offline or HF_HUB_OFFLINE=1): download it once with network access, or pass a local directory"
        ) from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"model {text} is not a local directory and was not found on the Hugging Face hub "
                             "(check the path or id, or log in)") from None
    except Exception as e:  # network errors come in many types
        raise ModelLoadError(f"could not fetch {text} from the Hugging Face hub: {type(e).__name__}: {e}") from None
    return Path(local)


def read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"{path} has no config.json: it is not a Hugging Face or MLX model directory")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON (line {e.lineno}): {e.msg}") from None


def _rope_scaling_from(params: dict) -> dict | None:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return None
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    scaling["rope_type"] = kind
    scaling["type"] = kind
    return scaling


def _sliding_window_pattern(layer_types) -> int | None:
    """The period p of `layer_types` when every p-th layer is full attention and the rest sliding."""
    if not isinstance(layer_types, list) or "full_attention" not in layer_types:
        return None
    p = layer_types.index("full_attention") + 1
    expected = ["full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(len(layer_types))]
    return p if layer_types == expected else None


def normalize_config(config: dict) -> dict:
    """Return a copy whose RoPE settings use the transformers-4 keys mlx-lm reads.

    Handles both `rope_parameters` = {rope_theta, rope_type, ...} and the per-layer-type form
    {full_attention: {...}, sliding_attention: {...}} (Gemma 2/3). Existing legacy keys win, since
    they are what transformers itself wrote alongside.
    """
    config = dict(config)
    text = config.get("text_config")
    if isinstance(text, dict):
        config["text_config"] = normalize_config(text)
    pattern = _sliding_window_pattern(config.get("layer_types"))
    if pattern is not None:
        # transformers 5 describes the local/global interleave with `layer_types`; mlx-lm's gemma3
        # reads `sliding_window_pattern` (default 6), which would be wrong for any other interleave.
        config.setdefault("sliding_window_pattern", pattern)
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return config
    if any(k in params for k in LAYER_TYPES):
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        if "rope_theta" in local:
            config.setdefault("rope_local_base_freq", local["rope_theta"])
    else:
        full = params
    if "rope_theta" in full:
        config.setdefault("rope_theta", full["rope_theta"])
    if "partial_rotary_factor" in full:
        config.setdefault("partial_rotary_factor", full["partial_rotary_factor"])
    scaling = _rope_scaling_from(full)
    if scaling is not None and not config.get("rope_scaling"):
        config["rope_scaling"] = scaling
    return config


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """(header, byte offset where tensor data starts); a truncated or foreign file is a clear error."""
    import struct

    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000 or n > file.stat().st_size:
                raise ValueError("header length is larger than the file")
            return json.loads(f.read(n)), 8 + n
    except (OSError, ValueError, struct.error) as e:
        raise ModelLoadError(
            f"cannot read {file}: not a valid safetensors file ({e}); download or convert it again"
        ) from None


def check_safetensors_header(file: Path) -> dict:
    """Parse a safetensors header cheaply (see read_safetensors_header)."""
    return read_safetensors_header(file)[0]


def load_tokenizer(path: Path, config: dict | None = None):
    from mlx_lm.utils import load_tokenizer as _load_tokenizer

    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    if not has_tokenizer:
        raise ModelLoadError(
            f"{path} has no tokenizer (tokenizer.json or tokenizer.model): copy the tokenizer files of the base model into it"
        )
    try:
        return _load_tokenizer(path, eos_token_ids=(config or {}).get("eos_token_id"))
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from None


def use_tanh_gelu_for_gemma(model, config: dict) -> None:
    """Give Gemma 1 the tanh-approximated GELU that transformers and llama.cpp use.

    transformers runs Gemma 1 with gelu_pytorch_tanh whatever its config says; mlx-lm's gemma uses the
    exact GELU, which moves logits by ~1e-4. Swapping the MLP's class keeps mlx-lm's model file as it is.
    """
    if config.get("model_type") != "gemma":
        return
    import mlx.nn as nn
    from mlx_lm.models import gemma

    class TanhGeluMLP(gemma.MLP):
        def __call__(self, x):
            return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))

    for layer in getattr(model, "layers", []):
        if type(layer.mlp) is gemma.MLP:
            layer.mlp.__class__ = TanhGeluMLP


def load_model(path_or_id: str | os.PathLike, *, adapter_file: str | os.PathLike | None = None,
               lazy: bool = False, revision: str | None = None) -> LoadedModel:
    """Load model, tokenizer and normalized config; optionally apply a LoRA adapter (not fused)."""
    from mlx_lm.utils import _get_classes
    from mlx_lm.utils import load_model as _mlx_load_model

    path = resolve_model_path(path_or_id, revision)
    config = normalize_config(read_config(path))
    if "model_type" not in config:
        raise ModelLoadError(f"{path / 'config.json'} has no model_type: is this a language model?")
    try:
        _get_classes(config)
    except ValueError:
        raise ModelLoadError(
            f"architecture {config['model_type']!r} in {path / 'config.json'} is not supported by mlx-lm; "
            f"supported: {', '.join(supported_architectures())}"
        ) from None
    weights = sorted(path.glob("model*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{path} has no model*.safetensors weights (PyTorch .bin checkpoints: run mlxtune convert first)")
    for w in weights:
        check_safetensors_header(w)
    try:
        model, config = _mlx_load_model(path, lazy=lazy, model_config=config)
    except ValueError as e:
        raise ModelLoadError(f"the weights in {path} do not match its config.json: {e}") from None
    use_tanh_gelu_for_gemma(model, config)
    tokenizer = load_tokenizer(path, config)
    if adapter_file is not None:
        from .lora import load_adapter

        load_adapter(model, adapter_file)
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, path=path)


def load(path_or_id: str | os.PathLike, adapter_file: str | os.PathLike | None = None, **kwargs):
    """`model, tokenizer = mlxtune.load("org/name" or "path/")`, like mlx_lm.load."""
    loaded = load_model(path_or_id, adapter_file=adapter_file, **kwargs)
    return loaded.model, loaded.tokenizer
