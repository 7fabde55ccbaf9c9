"""Hugging Face -> MLX conversion, optionally quantized (or de-quantized), one tensor at a time.

The one thing to know: nothing is loaded whole. Source tensors are lazy `mx.load` arrays; names,
shapes, dtypes and shard boundaries are planned from lazy shapes alone; then each output safetensors
header is written first and every tensor is evaluated, appended and dropped. Peak memory is about the
largest tensor (plus its quantized form), not the model, and not a whole output shard.

The model class comes from mlx-lm and is only instantiated lazily (its random init is never
evaluated): it supplies `sanitize` (HF names -> MLX names), the expected shapes, and which layers
can be quantized.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tqdm.auto import tqdm

from .errors import ConfigError, MlxtuneError, ModelLoadError
from .files import atomic_dir
from .gguf.importer import ImportResult, import_gguf
from .gguf.sources import find_gguf, is_gguf_reference
from .model_files import copy_tokenizer_files, normalize_config, read_config, resolve_model_path
from .models import model_classes
from .weights import FLOAT_DTYPES, SHARD_BYTES, read_header, weight_files, write_shards

Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
# Named --keep-modules recipes: module-name patterns kept in float when quantizing.
KEEP_RECIPES = {
    "embeddings": ["embed_tokens", "lm_head", "wte", "embed_out", "output"],
}
@dataclass
class ConvertResult:
    """What `convert` wrote. `float_layers` maps each quantizable layer left in float to why."""

    path: Path
    num_parameters: int
    bits_per_weight: float
    dtype: str
    quantization: dict | None
    float_layers: dict[str, str] = field(default_factory=dict)
    shards: list[str] = field(default_factory=list)
    total_bytes: int = 0

    def summary(self) -> str:
        q = (f"{self.quantization['bits']}-bit, group size {self.quantization['group_size']}"
             if self.quantization else "not quantized")
        return (f"{self.path}: {self.num_parameters / 1e6:.2f}M parameters, {self.dtype}, {q}, "
                f"{self.bits_per_weight:.2f} bits per weight, {len(self.shards)} shard(s), "
                f"{self.total_bytes / 1e6:.1f} MB")


# ---------------------------------------------------------------- reading the source


def _weight_files(src: Path, allow_bin: bool) -> tuple[list[Path], bool]:
    """The checkpoint's weight files (safetensors preferred) and whether they are torch pickles."""
    files = weight_files(src)
    if files:
        return files, False
    bins = sorted(src.glob("pytorch_model*.bin"))
    if bins:
        if not allow_bin:
            raise ModelLoadError(
                f"{src} has only PyTorch .bin weights: pass --allow-bin to read them with torch's "
                "weights-only loader (arbitrary pickles are never run)")
        return bins, True
    raise ModelLoadError(f"{src} has no model*.safetensors (or pytorch_model*.bin) weights")


def _load_safetensors(files: list[Path]) -> tuple[dict, dict]:
    weights, origin = {}, {}
    for f in files:
        read_header(f)
        try:
            part = mx.load(str(f))  # lazy: a tensor's bytes are read only when it is evaluated
        except Exception as e:
            raise ModelLoadError(f"cannot read {f}: {e}; download or convert it again") from None
        weights.update(part)
        origin.update(dict.fromkeys(part, f.name))
    return weights, origin


def _load_bin(files: list[Path]) -> tuple[dict, dict]:
    """PyTorch pickles through `torch.load(weights_only=True)`: tensors only, never arbitrary code."""
    import torch  # optional and heavy: only for .bin checkpoints

    weights, origin = {}, {}
    for f in files:
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ModelLoadError(f"cannot read {f} with torch's weights-only loader: {e}") from None
        for k, t in state.items():
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the bits
                weights[k] = mx.array(t.contiguous().view(torch.int16).numpy()).view(mx.bfloat16)
            else:
                weights[k] = mx.array(t.contiguous().numpy())
            origin[k] = f.name
        del state
    return weights, origin


def _dequantize_lazy(weights: dict, qcfg: dict, src: Path) -> dict:
    """Replace every (weight, scales, biases) triple by its float weight (still lazy)."""
    out = dict(weights)
    for key in [k for k in weights if k.endswith(".scales")]:
        p = key[: -len(".scales")]
        params = qcfg.get(p) if isinstance(qcfg.get(p), dict) else qcfg
        mode = params.get("mode", "affine")
        if mode != "affine":
            raise ModelLoadError(f"{src}: layer {p} uses {mode} quantization; only affine can be de-quantized")
        w, scales, biases = out.pop(f"{p}.weight"), out.pop(key), out.pop(f"{p}.biases", None)
        out[f"{p}.weight"] = mx.dequantize(w, scales, biases, group_size=params["group_size"],
                                           bits=params["bits"], mode=mode)
    return out


# ---------------------------------------------------------------- writing


def _readme(source: str, result: ConvertResult, copied: list[str]) -> str:
    lines = [
        f"# {Path(source).name} (MLX)",
        "",
        f"Converted from `{source}` with `mlxtune convert` on "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        f"- dtype: {result.dtype}",
        "- quantization: " + (f"affine, {result.quantization['bits']} bits, group size "
                               f"{result.quantization['group_size']}" if result.quantization else "none"),
        f"- parameters: {result.num_parameters:,}",
        f"- bits per weight: {result.bits_per_weight:.3f}",
        f"- shards: {', '.join(result.shards)}",
        f"- files copied unchanged: {', '.join(copied) or 'none'}",
    ]
    if result.float_layers:
        lines += ["", "Layers kept in float:", ""]
        lines += [f"- `{p}`: {why}" for p, why in sorted(result.float_layers.items())]
    lines += ["", "Load it with `mlxtune.load(path)` or `mlx_lm.load(path)`.", ""]
    return "\n".join(lines)


def _keep_patterns(keep_modules) -> list[str]:
    if isinstance(keep_modules, str):
        keep_modules = [k for k in keep_modules.split(",")]
    patterns = []
    for k in keep_modules or ():
        k = k.strip()
        if k:
            patterns += KEEP_RECIPES.get(k, [k])
    return patterns


def _is_kept(path: str, patterns: list[str]) -> bool:
    """A pattern matches the whole module path, or its last component(s), with shell wildcards."""
    parts = path.split(".")
    tails = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(t, pat) for pat in patterns for t in tails)


# ---------------------------------------------------------------- the verb


def convert(hf_path: str | os.PathLike | None = None, mlx_path: str | os.PathLike = "mlx_model", *,
            gguf: str | os.PathLike | None = None,
            quantize: bool = False, q_bits: int = 4, q_group_size: int = 64, dtype: str | None = None,
            keep_modules=(), dequantize: bool = False, force: bool = False, allow_bin: bool = False,
            revision: str | None = None, shard_bytes: int = SHARD_BYTES, progress: bool = True
            ) -> ConvertResult | ImportResult:
    """Convert a Hugging Face checkpoint (or an MLX directory, or a GGUF file) into an MLX model directory.

    gguf: a GGUF file (or `lmstudio:PUBLISHER/NAME`, `ollama:NAME[:TAG]`) instead of `hf_path`; see
        `mlxtune.gguf.importer.import_gguf`: types MLX holds exactly stay quantized unless `dequantize`,
        `quantize` re-quantizes with `q_bits`/`q_group_size`. Returns an ImportResult then.

    quantize: affine-quantize every Linear/Embedding whose input dim divides `q_group_size` to
        `q_bits`; the others stay float and are listed in the result and README.
    dtype: float16 / bfloat16 / float32 for the float tensors; default: the checkpoint's own.
    keep_modules: module names or wildcards (or the recipe "embeddings") kept in float.
    dequantize: turn a quantized MLX directory back into float weights (`--de-quantize`).
    allow_bin: read `pytorch_model*.bin` with `torch.load(weights_only=True)`.
    Raises ModelLoadError for unreadable input, ConfigError for bad settings, MlxtuneError when the
    output exists (without `force`) or cannot be written.
    """
    if hf_path is not None and gguf is None and is_gguf_reference(hf_path):
        hf_path, gguf = None, hf_path
    if (hf_path is None) == (gguf is None):
        raise ConfigError("give either --hf-path (a Hugging Face or MLX model) or --gguf (a GGUF file), not both"
                          if gguf is not None else "give --hf-path (a Hugging Face or MLX model) or --gguf (a GGUF file)")
    if quantize and dequantize:
        raise ConfigError("choose either --quantize or --de-quantize, not both")
    if quantize and q_bits not in Q_BITS:
        raise ConfigError(f"--q-bits {q_bits} is not supported; choose one of {', '.join(map(str, Q_BITS))}")
    if quantize and q_group_size not in Q_GROUP_SIZES:
        raise ConfigError(f"--q-group-size {q_group_size} is not supported; choose 32, 64 or 128")
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ConfigError(f"--dtype {dtype} is not supported; choose one of {', '.join(FLOAT_DTYPES)}")
    keep = _keep_patterns(keep_modules)
    if keep and not quantize:
        raise ConfigError("--keep-modules only applies when quantizing: add -q")
    if gguf is not None:
        if keep or allow_bin or revision:
            raise ConfigError("--keep-modules, --allow-bin and --revision do not apply to --gguf")
        return import_gguf(find_gguf(gguf), mlx_path, dtype=dtype, dequantize=dequantize, quantize=quantize,
                           q_bits=q_bits, q_group_size=q_group_size, force=force, shard_bytes=shard_bytes,
                           progress=progress)
    src = resolve_model_path(hf_path, revision)
    out = Path(mlx_path).expanduser()
    if out.resolve() == src.resolve():
        raise ConfigError(f"--mlx-path {out} is the input model: choose another output directory")
    if out.exists() and not force:
        raise MlxtuneError(f"{out} already exists: choose another --mlx-path or pass --force to replace it")

    config = normalize_config(read_config(src))
    model_cls, args_cls = model_classes(config, src / "config.json")
    if not any((src / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ModelLoadError(f"{src} has no tokenizer (tokenizer.json or tokenizer.model): the output could not be used")

    files, is_bin = _weight_files(src, allow_bin)
    weights, origin = (_load_bin if is_bin else _load_safetensors)(files)

    src_quant = config.pop("quantization", None) or config.get("quantization_config")
    is_quantized = any(k.endswith(".scales") for k in weights)
    if is_quantized:
        if not (dequantize or quantize):
            raise ConfigError(f"{src} is already quantized: pass --de-quantize for float weights, "
                              "or -q to quantize again with new settings")
        if not isinstance(src_quant, dict) or "bits" not in src_quant:
            raise ModelLoadError(f"{src / 'config.json'} has no quantization settings for its quantized weights")
        weights = _dequantize_lazy(weights, src_quant, src)
        config.pop("quantization_config", None)

    try:
        model = model_cls(args_cls.from_dict(config))  # lazy: its random init is never evaluated
    except Exception as e:
        raise ModelLoadError(f"{src / 'config.json'} does not describe a valid {config['model_type']} model: "
                             f"{type(e).__name__}: {e}") from None
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    modules = dict(model.named_modules())
    _check_names_and_shapes(weights, expected, origin, src)

    if dtype is None:
        dtype = config.get("torch_dtype") or config.get("dtype")
        if dtype not in FLOAT_DTYPES:
            floats = [str(v.dtype).split(".")[-1] for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)]
            dtype = floats[0] if floats and floats[0] in FLOAT_DTYPES else "float16"
    target = getattr(mx, dtype)
    cast_ok = getattr(model, "cast_predicate", lambda _: True)
    predicate = getattr(model, "quant_predicate", None) if quantize else None

    quant = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"} if quantize else None
    float_layers: dict[str, str] = {}
    outputs: list[tuple[str, object]] = []
    num_parameters = 0
    for name in sorted(weights):
        a = weights.pop(name)
        num_parameters += a.size
        if mx.issubdtype(a.dtype, mx.floating) and cast_ok(name):
            a = a.astype(target)
        path = name[: -len(".weight")] if name.endswith(".weight") else None
        module = modules.get(path) if path else None
        if quantize and module is not None and hasattr(module, "to_quantized"):
            params, why = _quant_params(path, module, a, quant, keep, predicate)
            if params is None:
                float_layers[path] = why
            else:
                if params != quant:
                    quant[path] = params
                wq, scales, biases = mx.quantize(a, group_size=params["group_size"], bits=params["bits"])
                outputs += [(f"{path}.biases", biases), (f"{path}.scales", scales), (name, wq)]
                continue
        outputs.append((name, a))
    del weights, model, modules

    total_bytes = sum(a.nbytes for _, a in outputs)
    result = ConvertResult(path=out, num_parameters=num_parameters, dtype=dtype,
                           bits_per_weight=8 * total_bytes / max(num_parameters, 1),
                           quantization={k: v for k, v in quant.items() if not isinstance(v, dict)} if quant else None,
                           float_layers=float_layers, total_bytes=total_bytes)
    config = _output_config(config, quant, dtype)

    try:
        with atomic_dir(out, force=force, flag="--force") as tmp:
            with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
                result.shards = write_shards(tmp, outputs, shard_bytes=shard_bytes, bar=bar,
                                             metadata={"total_parameters": num_parameters})
            (tmp / "config.json").write_text(json.dumps(config, indent=4))
            copied = copy_tokenizer_files(src, tmp)
            (tmp / "README.md").write_text(_readme(str(hf_path), result, copied))
    except OSError as e:
        raise MlxtuneError(f"cannot write {out}: {e.strerror or e}") from None
    return result


def dequantize_model_dir(mlx_path: str | os.PathLike, out_path: str | os.PathLike, *, dtype: str | None = None,
                         force: bool = False, progress: bool = True) -> ConvertResult:
    """Write float weights for a quantized MLX directory (the inverse of `convert(..., quantize=True)`)."""
    return convert(mlx_path, out_path, dequantize=True, dtype=dtype, force=force, progress=progress)


def _check_names_and_shapes(weights: dict, expected: dict, origin: dict, src: Path) -> None:
    def where(k):
        return f"{src / origin[k]}" if k in origin else str(src)

    for k, shape in expected.items():
        if k in weights and tuple(weights[k].shape) != tuple(shape):
            raise ModelLoadError(
                f"tensor {k} in {where(k)} has shape {tuple(weights[k].shape)} but config.json implies "
                f"{tuple(shape)}: the weights and config.json do not belong together")
    missing = sorted(set(expected) - set(weights))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ModelLoadError(f"{src} is missing tensors {', '.join(missing[:3])}{more}: the checkpoint is "
                             "incomplete or does not match config.json")
    extra = sorted(set(weights) - set(expected))
    if extra:
        more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
        raise ModelLoadError(f"{where(extra[0])} has tensors the {src / 'config.json'} model does not use: "
                             f"{', '.join(extra[:3])}{more}")


def _quant_params(path, module, w, quant, keep, predicate):
    """(params, None) to quantize this layer, or (None, reason) to leave it float."""
    if _is_kept(path, keep):
        return None, "kept by --keep-modules"
    gs = quant["group_size"]
    if w.shape[-1] % gs:
        return None, f"input dim {w.shape[-1]} is not divisible by group size {gs}"
    params = dict(group_size=gs, bits=quant["bits"], mode="affine")
    if predicate is not None:
        choice = predicate(path, module)
        if choice is False:
            return None, "the architecture keeps it in float"
        if isinstance(choice, dict):
            params.update(choice)
            if w.shape[-1] % params["group_size"]:
                return None, f"input dim {w.shape[-1]} is not divisible by group size {params['group_size']}"
    return params, None


def _output_config(config: dict, quant: dict | None, dtype: str) -> dict:
    config = {k: v for k, v in config.items() if k != "_name_or_path"}
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = dtype
    if quant:
        # mlx-lm reads `quantization`; the HF-style copy keeps hub tooling happy, as mlx-lm does.
        config["quantization"] = quant
        config["quantization_config"] = quant
    return dict(sorted(config.items()))
