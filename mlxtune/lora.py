"""LoRA layers and adapter files.

A LoRA layer wraps a frozen `nn.Linear` or `nn.QuantizedLinear` (QLoRA) and adds a low-rank update:

    y = W x + (alpha / r) * (dropout(x) @ A) @ B        A: (in, r), B: (r, out)

A starts small and random, B at zero, so an untrained adapter leaves the model exactly as it was.
`LoRALinear.fuse()` gives back a plain layer with W' = W + (alpha / r) * (A @ B).T.

Adapter files: `adapters.npz` holds only the LoRA tensors keyed by module path
(`model.layers.3.self_attn.q_proj.lora_a`), beside an `adapter_config.json` with everything needed to
re-apply them. This is the layout of the MLX LoRA example and of mlx-lm (whose `adapters.safetensors`
uses the same keys and orientation), so both read directly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import AdapterError, ConfigError
from .files import atomic_file, write_text_atomic

FORMAT_VERSION = 1
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
ADAPTER_NAMES = ("adapters.npz", "adapters.safetensors", "adapter_model.safetensors")
CONFIG_NAME = "adapter_config.json"


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (see the module docstring)."""

    @staticmethod
    def from_base(linear: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> "LoRALinear":
        out_dims, in_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            in_dims = in_dims * 32 // linear.bits
        layer = LoRALinear(in_dims, out_dims, rank, alpha, dropout)
        layer.linear = linear
        return layer

    def __init__(self, in_dims: int, out_dims: int, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ConfigError(f"--rank must be a positive integer, got {rank}")
        self.linear = nn.Linear(in_dims, out_dims, bias=False)
        self.dropout = nn.Dropout(p=dropout)
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def __call__(self, x):
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(y.dtype)

    def delta(self) -> mx.array:
        """The dense update (out, in) that fusing adds to the base weight."""
        return self.scale * (self.lora_a @ self.lora_b).T

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
        weight = (weight.astype(mx.float32) + self.delta().astype(mx.float32)).astype(dtype)
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


@dataclass
class AdapterConfig:
    """What adapter_config.json records: enough to re-apply the adapter to its base model."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    lora_layers: int = 16
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    modules: list[str] = field(default_factory=list)  # full module paths that carry an adapter
    base_model: str | None = None
    dtype: str = "float32"
    mlxtune_version: str = ""
    format: str = "mlxtune-lora"
    format_version: int = FORMAT_VERSION

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict:
        d = asdict(self)
        # Keys mlx-lm reads, so its tools can use our adapters as they are.
        d["fine_tune_type"] = "lora"
        d["num_layers"] = self.lora_layers
        d["lora_parameters"] = {"rank": self.rank, "scale": self.scale, "dropout": self.dropout,
                                "keys": sorted({".".join(m.split(".")[-2:]) for m in self.modules})}
        return d

    @classmethod
    def from_json(cls, d: dict, source: str = "adapter_config.json") -> "AdapterConfig":
        if d.get("format") == "mlxtune-lora":
            names = {f.name for f in cls.__dataclass_fields__.values()}
            return cls(**{k: v for k, v in d.items() if k in names})
        if "lora_parameters" in d:  # mlx-lm
            p = d["lora_parameters"]
            if d.get("fine_tune_type", "lora") != "lora":
                raise AdapterError(f"{source}: fine_tune_type {d['fine_tune_type']!r} is not supported (only lora)")
            rank = int(p.get("rank", 8))
            keys = p.get("keys") or []
            return cls(rank=rank, alpha=float(p.get("scale", 20.0)) * rank, dropout=float(p.get("dropout", 0.0)),
                       lora_layers=int(d.get("num_layers", 16)), target_modules=[k.split(".")[-1] for k in keys],
                       base_model=d.get("model"), format="mlx-lm")
        raise AdapterError(f"{source} is not an mlxtune or mlx-lm adapter config (no 'format' or 'lora_parameters')")


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
               explicit_layers: bool = True) -> AdapterConfig:
    """Freeze `model` and wrap the chosen linear layers in `LoRALinear`, in place.

    `modules`, if given, is the exact list of module paths (used when re-applying a saved adapter);
    otherwise blocks come from `lora_layers` and names from `target_modules`.
    Returns the AdapterConfig describing what was done.
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
            _replace(model, path, LoRALinear.from_base(named[path], rank, alpha, dropout))
        chosen = list(modules)
        layer_ids = sorted({int(p[len(block_prefix):].split(".")[0]) for p in chosen if p.startswith(block_prefix)})
        n_layers = len(layer_ids)
    else:
        layer_ids = select_layers(len(blocks), lora_layers, explicit_layers)
        n_layers = len(layer_ids)
        seen = set()
        for i in layer_ids:
            for name, m in blocks[i].named_modules():
                leaf = name.split(".")[-1]
                if not _is_linear(m) or (targets is not None and leaf not in targets):
                    continue
                seen.add(leaf)
                path = f"{block_prefix}{i}.{name}"
                _replace(model, path, LoRALinear.from_base(m, rank, alpha, dropout))
                chosen.append(path)
        if targets is not None:
            unknown = [t for t in targets if t not in seen and t not in ATTENTION_MODULES + MLP_MODULES]
            if unknown or not chosen:
                names = sorted({n.split(".")[-1] for i in layer_ids for n, m in blocks[i].named_modules() if _is_linear(m)})
                bad = unknown or targets
                raise ConfigError(f"--target-modules {','.join(bad)}: no such linear layer in the model's blocks; "
                                  f"available: {', '.join(names)} (or all-linear)")
    from . import __version__

    dtype = str(next(iter(_linear_weights(model)), mx.float32)).replace("mlx.core.", "")
    return AdapterConfig(rank=rank, alpha=float(alpha), dropout=dropout, lora_layers=n_layers,
                         target_modules=sorted({p.split(".")[-1] for p in chosen}), modules=chosen,
                         dtype=dtype, mlxtune_version=__version__)


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


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_a"] = m.lora_a
        out[f"{name}.lora_b"] = m.lora_b
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; quantized weights count as their unpacked size."""
    from mlx.utils import tree_flatten

    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = 0
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            total += m.weight.size * 32 // m.bits + (m.bias.size if "bias" in m else 0)
        elif isinstance(m, LoRALinear):
            continue
        else:
            total += sum(v.size for k, v in m.items() if isinstance(v, mx.array) and k not in ("scales", "biases"))
    return trainable, total


def save_adapter(model: nn.Module, path: str | os.PathLike, config: AdapterConfig, *, write_config: bool = True) -> Path:
    """Write adapters.npz (LoRA tensors only) and adapter_config.json beside it, atomically."""
    path = Path(path)
    weights = {k: np.array(v.astype(mx.float32)) for k, v in adapter_weights(model).items()}
    if not weights:
        raise AdapterError("the model carries no LoRA layers: nothing to save")
    bad = [k for k, v in weights.items() if not np.isfinite(v).all()]
    if bad:
        raise AdapterError(f"refusing to save a non-finite adapter ({bad[0]} has NaN/inf); the previous file is kept")
    return write_adapter_files(path, weights, config if write_config else None)


def write_adapter_files(path: Path, weights: dict[str, np.ndarray], config: AdapterConfig | None) -> Path:
    """The adapter tensors (.npz, or .safetensors by suffix) and, if given, adapter_config.json beside them."""
    if path.suffix == ".safetensors":
        with atomic_file(path) as tmp:
            mx.save_safetensors(str(tmp), {k: mx.array(v) for k, v in weights.items()})
    else:
        with atomic_file(path, suffix=".npz") as tmp:
            np.savez(tmp, **weights)
    if config is not None:
        write_text_atomic(path.parent / CONFIG_NAME, json.dumps(config.to_json(), indent=2) + "\n")
    return path


def find_adapter_file(path: str | os.PathLike) -> Path:
    """Accept an adapter file or a directory holding one."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ADAPTER_NAMES:
            if (path / name).exists():
                return path / name
        raise AdapterError(f"{path} holds no adapter ({', '.join(ADAPTER_NAMES)})")
    if not path.exists():
        raise AdapterError(f"adapter file {path} does not exist (train one with mlxtune lora, or check --adapter-file)")
    return path


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, mx.array]]:
    """Read an adapter in any supported layout as (config, weights keyed `<module>.lora_a/b`)."""
    file = find_adapter_file(path)
    if file.name == "adapter_model.safetensors":
        from .adapters import read_peft  # PEFT layout: names and orientation differ

        return read_peft(file.parent)
    cfg_file = file.parent / CONFIG_NAME
    if not cfg_file.exists():
        raise AdapterError(f"{file.parent} has no {CONFIG_NAME} beside {file.name}: copy it from the training output directory")
    try:
        config = AdapterConfig.from_json(json.loads(cfg_file.read_text()), str(cfg_file))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file} is not valid JSON (line {e.lineno}): {e.msg}") from None
    try:
        if file.suffix == ".npz":
            with np.load(file) as data:
                weights = {k: mx.array(data[k]) for k in data.files}
        else:
            weights = mx.load(str(file))
    except Exception as e:
        raise AdapterError(f"cannot read {file}: {e}") from None
    if not config.modules:
        config.modules = sorted({k.rsplit(".", 1)[0] for k in weights})
    return config, weights


def load_adapter(model: nn.Module, path: str | os.PathLike) -> AdapterConfig:
    """Wrap `model` with LoRA layers as recorded for the adapter at `path` and load its weights."""
    config, weights = read_adapter(path)
    apply_lora(model, rank=config.rank, alpha=config.alpha, dropout=config.dropout, modules=config.modules)
    expected = adapter_weights(model)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise AdapterError(f"{path}: adapter tensors do not match the model ({(missing or extra)[0]} ...)")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise AdapterError(f"{path}: {k} has shape {tuple(v.shape)} but the model needs {tuple(expected[k].shape)} "
                               "(was the adapter trained on another base model?)")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return config
