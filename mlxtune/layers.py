"""LoRA layers: wrap a model's linear layers with a trainable low-rank update, in place.

A LoRA layer wraps a frozen `nn.Linear` or `nn.QuantizedLinear` (QLoRA) and adds a low-rank update:

    y = W x + (alpha / r) * (dropout(x) @ A) @ B        A: (in, r), B: (r, out)

A starts small and random, B at zero, so an untrained adapter leaves the model exactly as it was. A is
drawn with numpy from (seed, module path) by `initial_lora_a`, so the MLX and torch backends start from
the same weights. `LoRALinear.fuse()` gives back a plain layer with W' = W + (alpha / r) * (A @ B).T.

The one thing to know: this module knows no file format. The layers carry everything an adapter file
records (rank, scale, dropout, module paths); `mlxtune.adapters` reads and writes the files.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .errors import AdapterError, ConfigError

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")


def initial_lora_a(in_dims: int, rank: int, seed: int = 0, path: str = "") -> np.ndarray:
    """The starting A (in, r) of the LoRA layer at module `path`: uniform in +-1/sqrt(in), float32.

    A function of (seed, path) only, drawn with numpy: every backend starts from the same adapter, and
    the order in which layers are wrapped does not matter.
    """
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    bound = 1.0 / math.sqrt(in_dims)
    return rng.uniform(-bound, bound, (in_dims, rank)).astype(np.float32)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (see the module docstring)."""

    @staticmethod
    def from_base(linear: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, *,
                  seed: int = 0, path: str = "") -> LoRALinear:
        out_dims, in_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            in_dims = in_dims * 32 // linear.bits
        layer = LoRALinear(in_dims, out_dims, rank, alpha, dropout, seed=seed, path=path)
        layer.linear = linear
        return layer

    def __init__(self, in_dims: int, out_dims: int, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, *,
                 seed: int = 0, path: str = ""):
        super().__init__()
        if rank <= 0:
            raise ConfigError(f"--rank must be a positive integer, got {rank}")
        self.linear = nn.Linear(in_dims, out_dims, bias=False)
        self.dropout = nn.Dropout(p=dropout)
        self.dropout_p = float(dropout)
        self.alpha = float(alpha)
        self.scale = alpha / rank
        self.lora_a = mx.array(initial_lora_a(in_dims, rank, seed, path))
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x):
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(y.dtype)

    def delta(self, dtype: mx.Dtype | None = None) -> mx.array:
        """The dense update (out, in) that fusing adds to the base weight, computed in `dtype` if given."""
        a, b = (self.lora_a, self.lora_b) if dtype is None else (self.lora_a.astype(dtype), self.lora_b.astype(dtype))
        return self.scale * (a @ b).T

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain layer with the update merged; a quantized base is re-quantized unless `dequantize`."""
        linear = self.linear
        quantized = isinstance(linear, nn.QuantizedLinear)
        if quantized:
            weight = mx.dequantize(linear.weight, linear.scales, linear.get("biases"), linear.group_size,
                                   linear.bits, mode=getattr(linear, "mode", "affine"))
            dtype = linear.scales.dtype
        else:
            weight = linear.weight
            dtype = weight.dtype
        # at least float32 for the sum (a float64 model, as fuse's parity check uses, stays float64)
        acc = mx.float64 if dtype == mx.float64 else mx.float32
        weight = (weight.astype(acc) + self.delta(acc)).astype(dtype)
        out_dims, in_dims = weight.shape
        has_bias = "bias" in linear
        fused = nn.Linear(in_dims, out_dims, bias=has_bias)
        fused.weight = weight
        if has_bias:
            fused.bias = linear.bias
        if quantized and not dequantize:
            fused = nn.QuantizedLinear.from_linear(fused, linear.group_size, linear.bits,
                                                   mode=getattr(linear, "mode", "affine"))
        return fused


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__module__} exposes no .layers: LoRA needs a transformer block list")
    return list(layers)


def resolve_targets(target_modules: str | list[str] | tuple[str, ...] | None) -> list[str] | None:
    """`None`/'attention' -> attention projections, 'all-linear' -> None (every linear), or a list."""
    if target_modules is None or target_modules == "attention":
        return list(ATTENTION_MODULES)
    if target_modules == "all-linear":
        return None
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    return list(target_modules)


def select_layers(n_blocks: int, lora_layers: int | None, explicit: bool = True) -> list[int]:
    """The indices of the last `lora_layers` blocks (-1 = all).

    An implicit default larger than the model is clamped; an explicit one is an error.
    """
    if lora_layers is None or lora_layers == -1:
        return list(range(n_blocks))
    if lora_layers <= 0:
        raise ConfigError(f"--lora-layers must be a positive number of blocks or -1 for all, got {lora_layers}")
    if lora_layers > n_blocks:
        if explicit:
            raise ConfigError(f"--lora-layers {lora_layers} is larger than the model's {n_blocks} transformer blocks: "
                              f"use at most {n_blocks} (or -1 for all)")
        lora_layers = n_blocks
    return list(range(n_blocks - lora_layers, n_blocks))


def _is_linear(m) -> bool:
    return isinstance(m, (nn.Linear, nn.QuantizedLinear))


def apply_lora(model: nn.Module, *, lora_layers: int | None = 16, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, target_modules=None, modules: list[str] | None = None,
               explicit_layers: bool = True, seed: int = 0) -> list[str]:
    """Freeze `model` and wrap the chosen linear layers in `LoRALinear`, in place.

    `modules`, if given, is the exact list of module paths (used when re-applying a saved adapter);
    otherwise blocks come from `lora_layers` and names from `target_modules`. `seed` draws the initial A.
    Returns the module paths now carrying a LoRA layer.
    """
    if rank <= 0:
        raise ConfigError(f"--rank must be a positive integer, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {dropout}")
    model.freeze()
    blocks = transformer_blocks(model)
    block_prefix = _block_prefix(model)
    targets = resolve_targets(target_modules)
    chosen: list[str] = []
    if modules is not None:
        named = dict(model.named_modules())
        missing = [m for m in modules if m not in named or not _is_linear(named[m])]
        if missing:
            raise AdapterError(f"the adapter targets modules this model does not have: {', '.join(missing[:4])}"
                               f"{' ...' if len(missing) > 4 else ''} (was it trained on another base model?)")
        for path in modules:
            _replace(model, path, LoRALinear.from_base(named[path], rank, alpha, dropout, seed=seed, path=path))
        chosen = list(modules)
    else:
        layer_ids = select_layers(len(blocks), lora_layers, explicit_layers)
        seen = set()
        for i in layer_ids:
            for name, m in blocks[i].named_modules():
                leaf = name.split(".")[-1]
                if not _is_linear(m) or (targets is not None and leaf not in targets):
                    continue
                seen.add(leaf)
                path = f"{block_prefix}{i}.{name}"
                out_dims, in_dims = m.weight.shape
                in_dims = in_dims * 32 // m.bits if isinstance(m, nn.QuantizedLinear) else in_dims
                if rank > min(in_dims, out_dims):
                    raise ConfigError(f"--rank {rank} is larger than {path} ({out_dims} x {in_dims}): a LoRA update "
                                      f"of that layer has at most rank {min(in_dims, out_dims)}; use --rank "
                                      f"{min(in_dims, out_dims)} or less, or leave the layer out with --target-modules")
                _replace(model, path, LoRALinear.from_base(m, rank, alpha, dropout, seed=seed, path=path))
                chosen.append(path)
        if targets is not None:
            unknown = [t for t in targets if t not in seen and t not in ATTENTION_MODULES + MLP_MODULES]
            if unknown or not chosen:
                names = sorted({n.split(".")[-1] for i in layer_ids for n, m in blocks[i].named_modules() if _is_linear(m)})
                bad = unknown or targets
                raise ConfigError(f"--target-modules {','.join(bad)}: no such linear layer in the model's blocks; "
                                  f"available: {', '.join(names)} (or all-linear)")
    return chosen


def base_dtype(model: nn.Module) -> str:
    """The dtype name of the model's first linear weight (scales, for a quantized one)."""
    dtype = next(iter(_linear_weights(model)), mx.float32)
    return str(dtype).replace("mlx.core.", "")


def _linear_weights(model):
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            yield m.scales.dtype
        elif isinstance(m, nn.Linear):
            yield m.weight.dtype


def _block_prefix(model: nn.Module) -> str:
    """The module-path prefix of the transformer blocks, e.g. 'model.layers.'."""
    first = transformer_blocks(model)[0]
    for name, m in model.named_modules():
        if m is first:
            return name.rsplit(".", 1)[0] + "."
    raise ConfigError("cannot locate the transformer blocks in the model")


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = dict(model.named_modules())[parent_path] if parent_path else model
    if isinstance(parent, list):  # pragma: no cover - named_modules yields modules, not lists
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def remove_lora(model: nn.Module) -> list[str]:
    """Put every LoRA layer's base layer back in its place (the adapter is dropped, not merged); returns the paths."""
    found = lora_modules(model)
    for path, layer in found.items():
        _replace(model, path, layer.linear)
    return list(found)


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run `model` as its base for a while: every LoRA layer's update is scaled by zero, then restored."""
    layers = list(lora_modules(model).values())
    scales = [layer.scale for layer in layers]
    try:
        for layer in layers:
            layer.scale = 0.0
        yield model
    finally:
        for layer, scale in zip(layers, scales):
            layer.scale = scale


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_a"] = m.lora_a
        out[f"{name}.lora_b"] = m.lora_b
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. Quantized weights count as their unpacked size, their scales
    and biases not at all; LoRA tensors are not part of the total (a share of the base is reported)."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            total += m.weight.size * 32 // m.bits + (m.bias.size if "bias" in m else 0)
        elif not isinstance(m, LoRALinear):
            total += sum(v.size for v in m.values() if isinstance(v, mx.array))
    return trainable, total
