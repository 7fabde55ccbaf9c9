"""Where a GGUF model comes from, and the cache of its MLX imports.

`--model` accepts a GGUF file (`model.gguf`), a model in LM Studio's folder (`lmstudio:PUBLISHER/NAME`,
found under `~/.lmstudio/models/PUBLISHER/NAME/`, or $LMSTUDIO_MODELS) or in Ollama's store
(`ollama:NAME[:TAG]`: the manifest under `~/.ollama/models/manifests/`, or $OLLAMA_MODELS, names the
model layer's blob). The one thing to know: the file is imported once into
`~/.cache/mlxtune/gguf/<content hash>` ($MLXTUNE_CACHE/gguf) and reused afterwards; the hash of a
file is remembered with its size and modification time, so an unchanged file is not read again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import ModelLoadError
from ..files import write_text_atomic
from ..model_files import resolve_model_path
from .importer import import_gguf

LMSTUDIO_PREFIX = "lmstudio:"
OLLAMA_PREFIX = "ollama:"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
_HASH_CHUNK = 16 << 20


def resolve_model(reference, revision: str | None = None) -> Path:
    """The model directory for any `--model`: a GGUF reference's cached import, else a folder or hub id.

    This sits above `model_files.resolve_model_path` (which knows no GGUF) so that `mlxtune.gguf`,
    which the import needs, never has to be imported by `model_files`.
    """
    if is_gguf_reference(reference):
        return gguf_model_dir(reference)
    return resolve_model_path(reference, revision)


def is_gguf_reference(model) -> bool:
    text = str(model)
    return text.lower().endswith(".gguf") or text.startswith((LMSTUDIO_PREFIX, OLLAMA_PREFIX))


def lmstudio_dir() -> Path:
    return Path(os.environ.get("LMSTUDIO_MODELS", Path.home() / ".lmstudio" / "models")).expanduser()


def ollama_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS", Path.home() / ".ollama" / "models")).expanduser()


def cache_dir() -> Path:
    return Path(os.environ.get("MLXTUNE_CACHE", Path.home() / ".cache" / "mlxtune")).expanduser() / "gguf"


def find_lmstudio(name: str, models_dir: Path | None = None) -> Path:
    """PUBLISHER/NAME (or PUBLISHER/NAME/FILE.gguf) in LM Studio's models folder."""
    root = models_dir or lmstudio_dir()
    folder = root / name
    if folder.is_file() and folder.suffix.lower() == ".gguf":
        return folder
    if name.count("/") != 1 or not folder.is_dir():
        raise ModelLoadError(f"lmstudio:{name}: no folder {folder} (give lmstudio:PUBLISHER/NAME as LM Studio "
                             f"lists it; models folder {root}, set LMSTUDIO_MODELS to change it)")
    # vision projector files sit beside the model in the same folder; they are not the language model
    files = sorted(f for f in folder.glob("*.gguf") if not f.name.lower().startswith("mmproj"))
    if len(files) != 1:
        listed = ", ".join(f.name for f in files) or "none"
        raise ModelLoadError(f"lmstudio:{name}: {folder} holds {len(files)} model GGUF files ({listed}): "
                             f"name one, e.g. lmstudio:{name}/{files[0].name if files else 'FILE.gguf'}")
    return files[0]


def find_ollama(name: str, models_dir: Path | None = None) -> Path:
    """NAME[:TAG] in Ollama's store: manifest -> the blob of its model layer."""
    root = models_dir or ollama_dir()
    model, _, tag = name.partition(":")
    tag = tag or "latest"
    parts = model.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    manifest = root / "manifests" / Path(*parts) / tag
    if not manifest.is_file():
        raise ModelLoadError(f"ollama:{name}: no manifest {manifest} (is the model pulled? `ollama list` shows "
                             f"the names; store {root}, set OLLAMA_MODELS to change it)")
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_LAYER)
    except (json.JSONDecodeError, KeyError, TypeError, StopIteration):
        raise ModelLoadError(f"ollama:{name}: {manifest} names no model layer ({OLLAMA_MODEL_LAYER})") from None
    blob = root / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise ModelLoadError(f"ollama:{name}: the model layer {blob} is missing from the store: pull the model again")
    return blob


def find_gguf(model) -> Path:
    """The GGUF file a `--model` reference names."""
    text = str(model)
    if text.startswith(LMSTUDIO_PREFIX):
        return find_lmstudio(text[len(LMSTUDIO_PREFIX):])
    if text.startswith(OLLAMA_PREFIX):
        return find_ollama(text[len(OLLAMA_PREFIX):])
    path = Path(text).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    return path


def content_hash(path: Path, memo: Path | None = None) -> str:
    """sha256 of the file; remembered in `memo` by (path, size, mtime) so an unchanged file is hashed once."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    known = {}
    if memo is not None and memo.exists():
        try:
            known = json.loads(memo.read_text())
        except json.JSONDecodeError:
            known = {}
        if key in known:
            return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        known[key] = digest
        write_text_atomic(memo, json.dumps(known, indent=1))
    return digest


def gguf_model_dir(model, log=print, progress: bool = True) -> Path:
    """The MLX model directory for a GGUF reference: imported into the cache the first time, then reused."""
    path = find_gguf(model)
    root = cache_dir()
    digest = content_hash(path, root / "hashes.json")
    out = root / digest[:32]
    if (out / "config.json").exists():
        log(f"{model}: using its MLX import in {out}")
        return out
    log(f"{model}: importing {path} once into {out}")
    result = import_gguf(path, out, force=True, progress=progress)
    log(f"imported {result.summary()}")
    return out
