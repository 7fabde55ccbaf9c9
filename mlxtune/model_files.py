"""A model directory: finding it (a local folder or a hub id in the Hugging Face cache) and reading its config.

Nothing here loads weights or imports mlx-lm or transformers, so light commands (the GGUF writer, exports)
stay light. The one thing to know: transformers 5 writes RoPE settings under `rope_parameters` (possibly one
entry per layer type), which mlx-lm does not read for several architectures, silently falling back to a
default base; `normalize_config` maps them back to the transformers-4 keys so that logits match transformers.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

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
    first = Path(text.split("/")[0]).expanduser()
    if first.is_dir():  # "models/qwen" with a local models/ folder is a path, not a hub id
        have = ", ".join(sorted(p.name for p in first.iterdir() if p.is_dir())[:8]) or "no folders"
        raise ModelLoadError(f"no such local path {text} ({first}/ has: {have}); a hub id would be org/name")
    missing = f"no such local path {text}, and as a hub id it"
    try:
        local = snapshot_download(text, revision=revision, allow_patterns=["*.safetensors", *TOKENIZER_PATTERNS])
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{missing} is not in the local Hugging Face cache and the hub cannot be reached (offline or "
            "HF_HUB_OFFLINE=1): download it once with network access, or pass a local directory") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{missing} was not found on the Hugging Face hub (check the path or id, or log in)") from None
    except (HfHubHTTPError, HFValidationError, OSError) as e:  # network and hub errors
        raise ModelLoadError(f"{missing} could not be fetched from the Hugging Face hub: {type(e).__name__}: {e}") from None
    return Path(local)


def read_json(path: Path):
    """A model directory's JSON file (tokenizer_config.json, ...), or None when it does not exist."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}): restore it from the base model") from None


def read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"{path} has no config.json: it is not a Hugging Face or MLX model directory")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not valid JSON (line {e.lineno}): {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"{cfg_file} is not UTF-8 text (byte {e.start})") from None
    _check_config(cfg_file, config)
    return config


# Sizes every architecture reads as whole numbers: a string or a float there fails deep inside otherwise.
WHOLE_NUMBER_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings")


def _check_config(cfg_file: Path, config) -> None:
    if not isinstance(config, dict):
        raise ModelLoadError(f"{cfg_file} is not a JSON object of model settings")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    if not isinstance(config.get("model_type", text.get("model_type")), str):
        raise ModelLoadError(f"{cfg_file} has no model_type (say which architecture, e.g. \"llama\"): "
                             "download or convert the model again")
    for where, d in ((cfg_file, config), (f"{cfg_file} text_config", text)):
        for key in WHOLE_NUMBER_KEYS:
            value = d.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ModelLoadError(f"{where}: {key} must be a whole number, not {value!r}")


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


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer files, chat template and generation config, byte for byte."""
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name == "config.json" or f.name.endswith(".index.json"):
            continue
        if any(fnmatch.fnmatch(f.name, pat) for pat in TOKENIZER_PATTERNS):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied
