"""GGUF export: `mlxtune.to_gguf(model_dir, "model.gguf", type="q4_k_m")` writes a file llama.cpp,
Ollama and LM Studio load.

The writer is pure Python (the `gguf` package plus numpy encoders for the K-quants) and streams row
chunks, so memory does not grow with the model. `verify=True` reads the file back and checks it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError, ExportError
from .quants import FileType
from .sources import resolve_model
from .writer import write_gguf

TYPES = [t.value for t in FileType]


def to_gguf(model: str | os.PathLike, outfile: str | os.PathLike, type: str = "f16", *,
            pre_tokenizer: str | None = None, verify: bool = True, force: bool = False,
            keep_adapter: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
            progress: bool = True, log=print) -> Path:
    """Write the fused float (or MLX-quantized) model directory `model` as a GGUF file.

    type: f32, f16, bf16, q8_0, q4_0, q4_k_m or q6_k. pre_tokenizer: llama.cpp pre-tokenizer name for a
    byte-level BPE tokenizer (detected when None). keep_adapter: the adapter fused into `model`, for
    fine-tune-aware quantization (the tensors it changed most stay at a higher type, and the scale search
    weighs columns by activations on `data`, its training data: a folder with train.jsonl or a file).
    Refuses an existing `outfile` unless `force`; the file appears only when complete. Returns the path.
    """
    try:
        ftype = FileType(str(type).lower())
    except ValueError:
        raise ConfigError(f"--type {type!r} is not a GGUF type mlxtune writes; choose one of {', '.join(TYPES)}") from None
    model_dir = resolve_model(model)
    out = Path(outfile).expanduser()
    if out.is_dir():
        raise ExportError(f"--outfile {out} is a directory: give a file name like {out / 'model.gguf'}")
    if out.exists() and not force:
        raise ExportError(f"{out} already exists: choose another --outfile or pass --force to replace it")
    if keep_adapter is not None:
        if ftype in (FileType.F32, FileType.F16, FileType.BF16):
            raise ConfigError(f"--keep-adapter changes how weights are quantized; --type {ftype.value} is not "
                              "quantized: drop --keep-adapter or choose q4_k_m, q4_0, q6_k or q8_0")
        if data is None:
            raise ConfigError("--keep-adapter needs the adapter's training data: pass --data DIR (or FILE.jsonl)")
    write_gguf(model_dir, out, ftype, pre_tokenizer=pre_tokenizer, progress=progress, verify=verify,
               keep_adapter=keep_adapter, data=data, log=log)
    return out


__all__ = ["to_gguf", "TYPES"]
