"""A LoRA adapter as a llama.cpp LoRA GGUF (`llama-cli --lora`, Ollama `ADAPTER`), without fusing.

The one thing to know: llama.cpp computes `W x + (alpha / r) * B (A x)` with `<base tensor>.lora_a` of shape
(r, in) and `.lora_b` of shape (out, r) in numpy order. Our adapters store A (in, r) and B (r, out) and apply
`scale`, so we write A.T, B.T and alpha = scale * r. On the `llama` architecture llama.cpp's q/k weights are
row-permuted for its interleaved RoPE, so the rows of q/k `lora_b` get the same permutation.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

from ..adapters import read_adapter
from ..errors import AdapterError, ExportError
from ..files import atomic_file
from ..model_files import normalize_config, read_config
from .arch import qk_permutation, resolve_arch, tensor_namer, text_tensor_name
from .sources import resolve_model


def adapter_tensors(adapter_file: str | os.PathLike, base_dir: Path, arch, cfg: dict
                    ) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(scale, {GGUF base tensor name: (A.T (r, in), B.T (out, r))}) of an adapter, in HF row order (q/k unpermuted)."""
    name_of = tensor_namer(arch, cfg["num_hidden_layers"])
    adapter, weights = read_adapter(adapter_file)
    if not weights:
        raise AdapterError(f"{adapter_file}: the adapter holds no LoRA tensors")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module in sorted({k.rsplit(".", 1)[0] for k in weights}):
        a, b = weights.get(f"{module}.lora_a"), weights.get(f"{module}.lora_b")
        if a is None or b is None:
            raise AdapterError(f"{adapter_file}: {module} has only one of lora_a / lora_b")
        a = np.array(a.astype(mx.float32))  # (in, r)
        b = np.array(b.astype(mx.float32))  # (r, out)
        hf = text_tensor_name(f"{module}.weight")
        if hf is None:
            raise AdapterError(f"{adapter_file}: {module} is not part of the language model; llama.cpp cannot load it")
        try:
            base_name = name_of(hf)
        except ExportError:
            raise AdapterError(f"{adapter_file}: {module} does not match a {arch.name} tensor in llama.cpp "
                               f"(was the adapter trained on {base_dir}?)") from None
        out[base_name] = (np.ascontiguousarray(a.T), np.ascontiguousarray(b.T))
    return float(adapter.scale), out


def write_lora_gguf(adapter_file: str | os.PathLike, base_model_dir: str | os.PathLike,
                    outfile: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the adapter at `adapter_file` (npz/safetensors/PEFT) for the base model `base_model_dir` to `outfile`.

    The base model supplies the architecture, layer count and tensor names; the GGUF of that same base model
    (from `mlxtune gguf`) is what the LoRA file is loaded on top of. Refuses an existing `outfile` unless
    `force`. Returns the path written.
    """
    out = Path(outfile).expanduser()
    if out.is_dir():
        raise ExportError(f"--outfile {out} is a directory: give a file name like {out / 'adapter.gguf'}")
    if out.exists() and not force:
        raise ExportError(f"{out} already exists: choose another --outfile or pass --force to replace it")
    base_dir = resolve_model(base_model_dir)  # a GGUF base too: the LoRA file then goes on top of that very GGUF
    config = normalize_config(read_config(base_dir))
    arch, cfg = resolve_arch(config, str(base_dir / "config.json"))
    scale, updates = adapter_tensors(adapter_file, base_dir, arch, cfg)
    tensors: dict[str, np.ndarray] = {}
    for base_name, (lora_a, lora_b) in updates.items():
        if arch.permute_qk and base_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg["num_attention_heads"] if base_name.endswith("attn_q.weight") else (
                cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
            lora_b = lora_b[qk_permutation(lora_b.shape[0], heads)]
        tensors[f"{base_name}.lora_a"] = np.ascontiguousarray(lora_a)
        tensors[f"{base_name}.lora_b"] = np.ascontiguousarray(lora_b)

    alpha = float(scale * lora_a.shape[0])
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch.name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(f"{base_dir.name} LoRA")
        for name, data in tensors.items():
            writer.add_tensor(name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out

