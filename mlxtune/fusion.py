"""Merge a LoRA adapter into its base model and write a standalone Hugging Face-style model directory.

Every adapted layer becomes W' = W + (alpha / r) * (A @ B).T. Fusing is checked, not trusted:

- the adapter must belong to the base (module names, shapes, recorded base model), else `AdapterError`;
- a quantized base is either de-quantized (`de_quantize=True`, a float model for GGUF and other tools) or
  re-quantized with its own settings; re-quantizing can round a small update away, so each adapted layer's
  surviving share of the update is measured and a `RequantizationWarning` names the loss;
- `verify` compares fused logits with base+adapter logits in float64 before anything is written, each
  position against the float32 rounding noise of that position (an ill-conditioned position amplifies
  rounding, a wrong merge shows everywhere), and reloads the written directory to check it reproduces the
  fused model;
- the output is written to a temporary directory and renamed, so a failure leaves nothing half-written.

The one thing to know: the fused directory keeps mlx-lm's weight names, which equal the Hugging Face names
for the architectures LoRA is usually trained on (llama, mistral, qwen, gemma, phi3), so transformers, mlx-lm
and the GGUF writer all read a float output; a re-quantized output is in MLX's quantized layout, which
mlx-lm and the GGUF writer read but transformers does not.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import dequantize_model
from tqdm.auto import tqdm

from .adapters import AdapterConfig, align_to_model, check_fits, find_adapter_file, read_adapter
from .dequantized import compute_dequantized, dequantized_layers
from .display import fields_html, fields_text
from .errors import AdapterError, ConfigError, ExportError, MlxtuneWarning
from .files import atomic_dir
from .gguf import TYPES, to_gguf
from .gguf.sources import resolve_model
from .layers import LoRALinear, apply_lora, count_parameters, lora_modules
from .model_files import copy_tokenizer_files
from .models import load_model
from .weights import FLOAT_DTYPES, SHARD_BYTES, tensor_shapes, write_shards

# The parity check compares logits computed in float64 (MLX's fast kernels for norms, RoPE and attention still
# round to float32 inside). Its bound at each position is the float32 rounding noise measured at that same
# position (the computation's own conditioning) times NOISE_FACTOR, plus a floor. Measured on trained adapters
# of every test architecture: a correct merge differs by 0 to ~0.03x the noise; one weight moved by 1e-3 of the
# layer's largest weight moves logits by ~5x the noise.
NOISE_FACTOR = 1.0
PARITY_FLOOR = 1e-7  # relative to the largest logit
WARN_KEPT_BELOW = 0.5  # warn when less than half of the update survives re-quantization (mean over layers)
AUTO_VERIFY_MAX_PARAMS = 1_000_000_000  # verify needs a float64 copy of the model (8 GB at 1B): on up to 1B


class RequantizationWarning(MlxtuneWarning):
    """Storing the merged weights (re-quantized, or in a coarse dtype) erased most of the adapter's update."""


@dataclass
class LayerUpdate:
    """How much of one layer's update is in the fused weights (1.0 = all of it)."""

    module: str
    update_norm: float  # Frobenius norm of (alpha/r) B A
    kept: float  # 1 - |stored change - update| / |update|, clipped to [0, 1]


@dataclass
class FuseResult:
    path: Path
    adapter: AdapterConfig
    base_model: str
    quantized_base: bool
    de_quantized: bool
    dtype: str  # of the float tensors (for a re-quantized model: its scales, norms, ...)
    bits: int | None = None  # the re-quantized model's bits (None: float output)
    layers: list[LayerUpdate] = field(default_factory=list)
    parity: float | None = None  # max |fused - base+adapter| logits in float32 (None: not verified)
    reload_diff: float | None = None  # max |reloaded - fused| logits (None: not verified)
    gguf: Path | None = None

    def _rows(self) -> list[tuple[str, object]]:
        what = ("de-quantized" if self.de_quantized else f"re-quantized to {self.bits} bits" if self.requantized
                else "float")
        kept = self.mean_kept
        return [("saved to", self.path), ("base model", self.base_model),
                ("adapter", f"rank {self.adapter.rank}, alpha {self.adapter.alpha:g}, {len(self.adapter.modules)} layers"),
                ("weights", f"{what}, {self.dtype}"),
                ("update kept", None if kept is None else f"{kept:.1%} (mean over layers)"),
                ("parity", None if self.parity is None else f"{self.parity:.2e} (max |fused - base+adapter| logit)"),
                ("reload", None if self.reload_diff is None else f"{self.reload_diff:.2e} (max |reloaded - fused| logit)"),
                ("GGUF", self.gguf)]

    def __repr__(self) -> str:
        return fields_text("FuseResult", self._rows())

    def _repr_html_(self) -> str:
        return fields_html("mlxtune.fuse", self._rows())

    @property
    def requantized(self) -> bool:
        return self.quantized_base and not self.de_quantized

    @property
    def mean_kept(self) -> float | None:
        return float(np.mean([layer.kept for layer in self.layers])) if self.layers else None


def fuse(model: str | os.PathLike, adapter_file: str | os.PathLike, save_path: str | os.PathLike, *,
         de_quantize: bool = False, dtype: str | None = None, verify: bool | None = None,
         gguf: str | os.PathLike | None = None, gguf_type: str = "f16", force: bool = False,
         ignore_base_name: bool = False, max_shard_size: int = SHARD_BYTES, keep_adapter: bool = False,
         data: str | os.PathLike | None = None, log=print) -> FuseResult:
    """Merge `adapter_file` into `model` and write the fused model to `save_path`.

    model: base model directory or hub id. adapter_file: adapters.npz / adapters.safetensors / a PEFT
    directory (or a directory holding one of these). de_quantize: write a float model from a quantized
    base. dtype: float16 | bfloat16 | float32 (default: float16 when de-quantizing, else the base's dtype).
    verify: parity check (None = on for models up to 1B parameters; it needs a float64 copy). gguf/gguf_type:
    also write a GGUF file; keep_adapter: write it with fine-tune-aware quantization for this adapter,
    measuring activations on `data` (its training data). force: replace an existing `save_path` (and GGUF
    file). ignore_base_name: accept an adapter
    recorded for a differently named base (e.g. a converted copy); names and shapes are still checked.
    log: where the GGUF writer reports. Raises AdapterError when the adapter does not fit the base,
    ExportError when a check fails; in both cases nothing is written.
    """
    save_path = Path(save_path).expanduser()
    _check_flags(save_path, dtype, gguf, gguf_type, force)
    if keep_adapter and (gguf is None or data is None):
        raise ConfigError("--keep-adapter quantizes the GGUF for this adapter: pass --gguf FILE and --data (its training data)")
    adapter_path = find_adapter_file(adapter_file)
    base_dir = resolve_model(model)
    _check_not_inside(save_path, {"base model": base_dir, "adapter": adapter_path})
    adapter, weights = read_adapter(adapter_path)
    loaded = load_model(base_dir)
    net = loaded.model
    check_base_name(adapter, str(model), loaded.path, ignore=ignore_base_name)
    adapter, weights = align_to_model(adapter, weights, net)
    check_fits(net, adapter, weights, str(adapter_path))

    quantized_base = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in net.named_modules())
    de_quantize = de_quantize and quantized_base
    keep = _kept_dtypes(net)
    out_dtype = getattr(mx, dtype) if dtype else (mx.float16 if de_quantize else _float_dtype(net, keep))
    if verify is None:
        verify = count_parameters(net)[1] <= AUTO_VERIFY_MAX_PARAMS
    result = FuseResult(path=save_path, adapter=adapter, base_model=str(model), quantized_base=quantized_base,
                        de_quantized=de_quantize, dtype=_dtype_name(out_dtype))
    if result.requantized:
        result.bits = (loaded.config.get("quantization") or {}).get("bits")

    if de_quantize:
        dequantize_model(net)  # a float model from here on: the adapter is merged into the de-quantized weights
    apply_lora(net, rank=adapter.rank, alpha=adapter.alpha, dropout=0.0, modules=adapter.modules)
    net.load_weights(list(weights.items()), strict=False)
    net.eval()
    tokens = reference = None
    if verify:
        tokens = _probe_tokens(loaded.config)
        reference = _reference_logits(net, tokens, exact=not result.requantized)

    with mx.stream(mx.cpu) if verify else contextlib.nullcontext():  # float64 (the check's) runs on the CPU
        result.layers = merge_layers(net, de_quantize=de_quantize, dtype=out_dtype)
    _warn_if_lost(result)
    if verify:
        result.parity = _parity(net, tokens, reference)
    _cast(net, out_dtype, keep)
    mx.eval(net.parameters())

    with atomic_dir(save_path, force=force) as tmp:
        save_weights(tmp, net, max_shard_size=max_shard_size)
        config = fused_config(loaded.path, out_dtype, de_quantize)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer_files(loaded.path, tmp)
        if verify:
            result.reload_diff = _check_reload(tmp, net, tokens)
        else:
            check_saved(tmp, net)
        (tmp / "README.md").write_text(model_card(result, adapter_path, loaded.path))

    if gguf is not None:
        result.gguf = Path(to_gguf(save_path, gguf, gguf_type, force=force, log=log,
                                   keep_adapter=adapter_path if keep_adapter else None, data=data))
    return result


def _check_flags(save_path: Path, dtype, gguf, gguf_type, force: bool) -> None:
    """Refuse bad settings and existing outputs before any work is done."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {', '.join(FLOAT_DTYPES)}")
    if save_path.exists() and not force:
        raise ExportError(f"{save_path} already exists: choose another --save-path or pass --force to replace it")
    if gguf is not None:
        if str(gguf_type).lower() not in TYPES:
            raise ConfigError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(TYPES)}")
        if Path(gguf).expanduser().exists() and not force:
            raise ExportError(f"{gguf} already exists: choose another --gguf file or pass --force to replace it")


def _check_not_inside(save_path: Path, inputs: dict[str, Path]) -> None:
    """--save-path must not be (or contain) an input: replacing it, even with --force, would delete it."""
    out = save_path.resolve()
    for what, path in inputs.items():
        if path.resolve() == out or out in path.resolve().parents:
            raise ExportError(f"--save-path {save_path} would replace the {what} at {path}: "
                              "write the fused model to a new directory")


@dataclass
class _Reference:
    float32: mx.array  # base+adapter logits computed in float32
    float64: mx.array | None  # the same in float64 (None: a re-quantized fuse, only reported)


def _float64_logits(net: nn.Module, tokens: mx.array) -> mx.array:
    _cast(net, mx.float64)
    with mx.stream(mx.cpu):  # float64 runs on the CPU only (Metal has none)
        logits = net(tokens)
        mx.eval(logits)
    return logits


def _reference_logits(net: nn.Module, tokens: mx.array, *, exact: bool) -> _Reference:
    _cast(net, mx.float32)  # lossless for the base
    ref32 = net(tokens)
    mx.eval(ref32)
    return _Reference(ref32, _float64_logits(net, tokens) if exact else None)


def _parity(net: nn.Module, tokens: mx.array, reference: _Reference) -> float:
    """Max |fused - base+adapter| logit difference; for a float fuse, above its bound is an error.

    Both sides are computed in float64 with the merge done in float64, so the difference is what the merge
    changed. Each position may differ by NOISE_FACTOR times the float32 rounding noise measured at that
    position (|ref32 - ref64|), plus a floor: a position where the model is ill-conditioned amplifies
    rounding (the float32 kernels inside the float64 pass round too), while a wrong merge moves positions
    far beyond it.
    """
    if reference.float64 is None:  # re-quantized: rounding to the base's bits changes logits; report only
        _cast(net, mx.float32)
        return float(mx.abs(net(tokens) - reference.float32).max())
    fused = _float64_logits(net, tokens)
    with mx.stream(mx.cpu):
        diff = mx.abs(fused - reference.float64).max(-1)
        noise = mx.abs(reference.float32.astype(mx.float64) - reference.float64).max(-1)
        floor = PARITY_FLOOR * max(1.0, float(mx.abs(reference.float64).max()))
        excess = diff - (NOISE_FACTOR * noise + floor)
        worst = int(mx.argmax(excess.reshape(-1)).item())
        over = float(excess.reshape(-1)[worst])
        diff_w, noise_w = float(diff.reshape(-1)[worst]), float(noise.reshape(-1)[worst])
        largest = float(diff.max())
    if over > 0:
        b, t = divmod(worst, tokens.shape[1])
        raise ExportError(f"fused model differs from base+adapter by {diff_w:.3g} at probe {b} position {t} "
                          f"(float64 logits; float32 rounding alone moves that position by {noise_w:.2g}, allowed "
                          f"{NOISE_FACTOR:g}x that + {floor:.1g}): nothing was written; please report this with the "
                          "adapter's adapter_config.json")
    return largest


# --- checks -----------------------------------------------------------------------------------------------

def check_base_name(adapter: AdapterConfig, model: str, model_path: Path, *, ignore: bool = False) -> None:
    """The adapter's recorded base model must name this model (same id, same directory or same folder name)."""
    recorded = adapter.base_model
    if not recorded or ignore:
        return
    recorded_path = Path(recorded).expanduser()
    if recorded == model or recorded_path.name in (Path(model).name, model_path.name):
        return
    if recorded_path.exists() and recorded_path.resolve() == model_path.resolve():
        return
    raise AdapterError(f"the adapter was trained on {recorded!r} but --model is {model!r}: fuse it into its own base, "
                       "or pass --ignore-base-name if this is the same model under another name "
                       "(module names and shapes are still checked)")


# --- merging ----------------------------------------------------------------------------------------------

def merge_layers(model: nn.Module, *, de_quantize: bool, dtype: mx.Dtype) -> list[LayerUpdate]:
    """Replace every LoRALinear by its merged layer, in place, and measure what survives storage.

    A quantized base is re-quantized with its own group size, bits and mode unless `de_quantize`.
    `dtype` is the dtype the weights will be written in: the measurement rounds to it, because a
    bfloat16 (or 4-bit) weight can be too coarse to hold a small update.
    """
    updates, fused = [], []
    layers = lora_modules(model)
    for name, layer in tqdm(layers.items(), total=len(layers), desc="merge", unit="layer", leave=False):
        base = layer.linear
        merged = layer.fuse(dequantize=True)  # float weights W + delta (quantized bases are de-quantized)
        if isinstance(base, nn.QuantizedLinear) and not de_quantize:
            mode = getattr(base, "mode", "affine")
            merged = nn.QuantizedLinear.from_linear(merged, base.group_size, base.bits, mode=mode)
        updates.append(_kept(name, layer, merged, dtype))
        fused.append((name, merged))
    if fused:
        model.update_modules(tree_unflatten(fused))
    return updates


def _float_weight(layer: nn.Module, dtype: mx.Dtype | None = None) -> mx.array:
    """The layer's weight as float32, first rounded the way it will be stored in `dtype`."""
    if isinstance(layer, nn.QuantizedLinear):
        scales, biases = layer.scales, layer.get("biases")
        if dtype is not None:
            scales = scales.astype(dtype)
            biases = None if biases is None else biases.astype(dtype)
        w = mx.dequantize(layer.weight, scales, biases, layer.group_size, layer.bits,
                          mode=getattr(layer, "mode", "affine"))
    else:
        w = layer.weight if dtype is None else layer.weight.astype(dtype)
    return w.astype(mx.float32)


def _kept(name: str, layer: LoRALinear, merged: nn.Module, dtype: mx.Dtype) -> LayerUpdate:
    delta = layer.delta().astype(mx.float32)
    change = _float_weight(merged, dtype) - _float_weight(layer.linear)
    norm, err = mx.linalg.norm(delta), mx.linalg.norm(change - delta)
    mx.eval(norm, err)  # one layer at a time: keeps the measurement's memory small
    norm, err = float(norm), float(err)
    if norm == 0.0:
        return LayerUpdate(name, 0.0, 1.0)
    return LayerUpdate(name, norm, min(1.0, max(0.0, 1.0 - err / norm)))


def _warn_if_lost(result: FuseResult) -> None:
    if result.layers and all(layer.update_norm == 0.0 for layer in result.layers):
        warnings.warn("the adapter's update is zero in every layer (an untrained adapter?): the fused model is "
                      "the base model", RequantizationWarning, stacklevel=3)
        return
    kept = result.mean_kept
    if kept is None or kept >= WARN_KEPT_BELOW:
        return
    worst = min(result.layers, key=lambda layer: layer.kept)
    if result.requantized:
        how, fix = "re-quantizing the fused weights", "fuse with --de-quantize to keep the fine-tune"
    else:
        how, fix = f"storing the fused weights as {result.dtype}", "fuse with --dtype float32 to keep the fine-tune"
    warnings.warn(f"{how} keeps only {kept:.0%} of the adapter's update on average (worst: {worst.module} keeps "
                  f"{worst.kept:.0%}); the fused model will answer much like the base: {fix}",
                  RequantizationWarning, stacklevel=3)


# --- dtype and probes -------------------------------------------------------------------------------------

def _cast(model: nn.Module, dtype: mx.Dtype, keep: dict[str, mx.Dtype] | None = None) -> None:
    """Cast every floating-point parameter (not packed quantized weights) to `dtype`.

    `keep` maps parameter names the architecture wants in a dtype of their own (mlx-lm's
    `cast_predicate`, e.g. float32 router biases) to that dtype.
    """
    keep = keep or {}

    def cast(name, v):
        if not mx.issubdtype(v.dtype, mx.floating):
            return v
        want = keep.get(name, dtype)
        return v if v.dtype == want else v.astype(want)

    flat = [(k, cast(k, v)) for k, v in tree_flatten(model.parameters())]
    model.update(tree_unflatten(flat))


def _kept_dtypes(model: nn.Module) -> dict[str, mx.Dtype]:
    """Parameters that mlx-lm's `cast_predicate` says must keep their dtype, with that dtype."""
    predicate = getattr(model, "cast_predicate", None)
    if predicate is None:
        return {}
    return {k: v.dtype for k, v in tree_flatten(model.parameters())
            if mx.issubdtype(v.dtype, mx.floating) and not predicate(k)}


def _float_dtype(model: nn.Module, keep: dict) -> mx.Dtype:
    """The dtype holding most of the model's floating-point bytes (a float32 norm does not make it float32)."""
    size: dict = {}
    for k, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating) and k not in keep:
            size[v.dtype] = size.get(v.dtype, 0) + v.nbytes
    return max(size, key=size.get) if size else mx.float16


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).replace("mlx.core.", "")


def _probe_tokens(config: dict) -> mx.array:
    """A few fixed token sequences for the parity check."""
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or 256
    rng = np.random.default_rng(0)
    return mx.array(rng.integers(0, vocab, size=(2, 16)))


# --- writing ----------------------------------------------------------------------------------------------

def fused_config(base_dir: Path, dtype: mx.Dtype, de_quantized: bool) -> dict:
    """The base's own config.json with the dtype updated and, when de-quantized, no quantization fields."""
    config = json.loads((base_dir / "config.json").read_text())
    if de_quantized:
        for d in (config, config.get("text_config") or {}):
            d.pop("quantization", None)
            d.pop("quantization_config", None)
    name = _dtype_name(dtype)
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    for k in keys:
        config[k] = name
    return config


def save_weights(out: Path, model: nn.Module, *, max_shard_size: int = SHARD_BYTES) -> list[str]:
    """Write the model's parameters as safetensors shards plus model.safetensors.index.json (convert's layout)."""
    weights = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    with tqdm(total=sum(v.nbytes for _, v in weights), unit="B", unit_scale=True, desc="save", leave=False) as bar:
        return write_shards(out, weights, shard_bytes=max_shard_size, bar=bar)


def check_saved(out: Path, model: nn.Module) -> None:
    """Every parameter of the fused model is in the written shards with its shape (cheap: headers only)."""
    found = {}
    for f in out.glob("model*.safetensors"):
        found.update(tensor_shapes(f))
    for k, v in tree_flatten(model.parameters()):
        if found.get(k) != list(v.shape):
            raise ExportError(f"writing the fused model failed: {k} is missing or has the wrong shape in {out}")


def _check_reload(out: Path, model: nn.Module, tokens: mx.array) -> float:
    """Load the written directory as a user would and compare its logits with the in-memory fused model."""
    check_saved(out, model)
    reloaded = load_model(out).model
    # the same arithmetic on both sides: load_model computes quantized layers through float32 weights on the CPU
    # (mlxtune.dequantized), the in-memory model's re-quantized layers are plain QuantizedLinear
    compute_dequantized(model, enable=dequantized_layers(reloaded) > 0)
    diff = float(mx.abs(reloaded(tokens).astype(mx.float32) - model(tokens).astype(mx.float32)).max())
    if diff > 0.0 and not diff <= 1e-3:
        raise ExportError(f"the written fused model does not reproduce the fused weights (max logit difference "
                          f"{diff:.3g}): nothing was written")
    return diff


def _leaves(modules: list[str]) -> list[str]:
    return sorted({m.rsplit(".", 1)[-1] for m in modules})


def model_card(result: FuseResult, adapter_file: Path, base_dir: Path) -> str:
    a = result.adapter
    hub_id = not Path(result.base_model).expanduser().exists()  # the hub's base_model field wants an id
    lines = [
        "---", "library_name: mlx", "tags: [mlx, mlxtune, lora, fused]",
        *([f"base_model: {result.base_model}"] if hub_id else []), "---",
        "", "# Fused model", "",
        f"This model is `{result.base_model}` with the LoRA adapter `{adapter_file}` merged into its weights "
        "by `mlxtune fuse`.", "",
        "| setting | value |", "|---|---|",
        f"| base model | `{result.base_model}` (`{base_dir}`) |",
        f"| adapter | `{adapter_file}` |",
        f"| rank / alpha / scale | {a.rank} / {a.alpha:g} / {a.scale:g} |",
        f"| adapted layers | {len(a.modules)} modules ({', '.join(a.target_modules or _leaves(a.modules))}) |",
        f"| quantized base | {'yes' if result.quantized_base else 'no'} |",
        f"| de-quantized | {'yes' if result.de_quantized else 'no'} |",
        f"| dtype | {result.dtype} |",
    ]
    if result.parity is not None:
        lines.append(f"| parity (max logit difference vs base+adapter, float32) | {result.parity:.2e} |")
    if result.layers:
        lines.append(f"| share of the update kept after re-quantization (mean) | {result.mean_kept:.0%} |")
    lines += ["", "Load it with `mlxtune.load(\"<this directory>\")`, `mlx_lm.load` or transformers' "
              "`AutoModelForCausalLM.from_pretrained`.", ""]
    return "\n".join(lines)
