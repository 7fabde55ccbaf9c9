"""Adapter files, every format: mlxtune's adapters.npz, mlx-lm's adapters.safetensors and PEFT directories.

An adapter is a set of LoRA tensors keyed by module path (`model.layers.3.self_attn.q_proj.lora_a`,
(in, r), and `.lora_b`, (r, out), scale = alpha / r) plus an `adapter_config.json` with everything needed to
re-apply them. mlxtune writes `adapters.npz` (the MLX LoRA example's layout) and, beside it, the same tensors
as `adapters.safetensors`, so mlx-lm's own tools load the folder too; the config carries both mlxtune's
keys and mlx-lm's.

PEFT stores `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r) with scale =
lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA), per-module ranks and alphas allowed. The one thing to
know: module paths are mlx-lm's, which equal the Hugging Face names except for the prefixes in `PREFIXES`;
per-module ranks are zero-padded to the largest rank and per-module scales are folded into lora_b, so any
PEFT LoRA becomes one exact mlxtune adapter.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import __version__
from .errors import AdapterError
from .files import atomic_dir, atomic_file, write_text_atomic
from .layers import LoRALinear, adapter_weights, apply_lora, base_dtype, lora_modules

FORMAT_VERSION = 1
ADAPTER_NAMES = ("adapters.npz", "adapters.safetensors", "adapter_model.safetensors")
CONFIG_NAME = "adapter_config.json"
DEFAULT_STEM = "adapters"  # adapters.npz / adapters.safetensors + adapter_config.json: the layout mlx-lm loads
_CHECKPOINT_PREFIX = re.compile(r"^\d{7}_")
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# (Hugging Face prefix, mlx-lm prefix) where the two name the same module differently: transformers 5
# puts a multimodal model's text stack under model.language_model, mlx-lm under language_model.model.
PREFIXES = [("model.language_model.", "language_model.model.")]
# Architectures whose mlx-lm module paths are not transformers' (e.g. mlx-lm's gpt2 has model.h.*, transformers
# transformer.h.* with Conv1D layers): a PEFT adapter written with our names would not load there.
UNMAPPED_ARCHS = {"gpt2", "gpt_neox", "olmo"}
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


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
    def from_json(cls, d: dict, source: str = CONFIG_NAME) -> AdapterConfig:
        if not isinstance(d, dict):
            raise AdapterError(f"{source} is not a JSON object: copy adapter_config.json from the training output")
        if d.get("format") == "mlxtune-lora":
            names = {f.name for f in cls.__dataclass_fields__.values()}
            return cls(**{k: v for k, v in d.items() if k in names})._checked(source)
        if "lora_parameters" in d:  # mlx-lm
            p = d["lora_parameters"]
            if not isinstance(p, dict):
                raise AdapterError(f"{source}: lora_parameters must be an object, not {p!r}")
            if d.get("fine_tune_type", "lora") != "lora":
                raise AdapterError(f"{source}: fine_tune_type {d['fine_tune_type']!r} is not supported (only lora)")
            _check_types(source, {"rank": p.get("rank", 8), "scale": p.get("scale", 20.0),
                                  "dropout": p.get("dropout", 0.0), "num_layers": d.get("num_layers", 16)},
                         {"rank": int, "scale": float, "dropout": float, "num_layers": int})
            rank = int(p.get("rank", 8))
            keys = p.get("keys") or []
            if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
                raise AdapterError(f"{source}: lora_parameters.keys must be a list of module names, not {keys!r}")
            return cls(rank=rank, alpha=float(p.get("scale", 20.0)) * rank, dropout=float(p.get("dropout", 0.0)),
                       lora_layers=int(d.get("num_layers", 16)), target_modules=[k.split(".")[-1] for k in keys],
                       base_model=d.get("model"), format="mlx-lm")
        raise AdapterError(f"{source} is not an mlxtune or mlx-lm adapter config (no 'format' or 'lora_parameters')")

    def _checked(self, source: str) -> AdapterConfig:
        """Self, once every field has its type: a hand-edited config fails here, naming the key."""
        _check_types(source, {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                              "lora_layers": self.lora_layers, "format_version": self.format_version},
                     {"rank": int, "alpha": float, "dropout": float, "lora_layers": int, "format_version": int})
        for key in ("target_modules", "modules"):
            value = getattr(self, key)
            if not (isinstance(value, list) and all(isinstance(m, str) for m in value)):
                raise AdapterError(f"{source}: {key} must be a list of module names, not {value!r}")
        for key in ("base_model", "dtype", "mlxtune_version"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise AdapterError(f"{source}: {key} must be text, not {value!r}")
        if self.rank < 1:
            raise AdapterError(f"{source}: rank must be at least 1, not {self.rank}")
        return self

    @classmethod
    def of_model(cls, model: nn.Module, base_model: str | None = None) -> AdapterConfig:
        """The config describing the LoRA layers `model` carries now."""
        layers = lora_modules(model)
        if not layers:
            raise AdapterError("the model carries no LoRA layers: nothing to describe")
        first = next(iter(layers.values()))
        return cls.of_modules(list(layers), rank=int(first.lora_a.shape[1]), alpha=first.alpha, dropout=first.dropout_p,
                              base_model=base_model, dtype=base_dtype(model))

    @classmethod
    def of_modules(cls, modules: list[str], *, rank: int, alpha: float, dropout: float, base_model: str | None,
                   dtype: str) -> AdapterConfig:
        """The config of LoRA layers at `modules` (mlx-lm paths), whichever backend carries them."""
        return cls(rank=int(rank), alpha=alpha, dropout=dropout, lora_layers=len(_layer_ids(modules)),
                   target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}), modules=list(modules),
                   base_model=base_model, dtype=dtype, mlxtune_version=__version__)


def _check_types(source: str, values: dict, types: dict) -> None:
    """Each value is a number of its kind (an int where `types` says int; a float may be an int)."""
    for key, value in values.items():
        ok = isinstance(value, (int, float)) if types[key] is float else isinstance(value, int)
        if isinstance(value, bool) or not ok:
            kind = "a whole number" if types[key] is int else "a number"
            raise AdapterError(f"{source}: {key} must be {kind}, not {value!r}")


# --- reading and writing ----------------------------------------------------------------------------------

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


def run_stem(file: Path) -> str:
    """The name an adapter's files share: `run2` for run2.npz and for its checkpoints 0000100_run2.npz."""
    return _CHECKPOINT_PREFIX.sub("", file.stem)


def config_path(adapter_file: Path) -> Path:
    """Where an adapter's config is: adapter_config.json for adapters.npz / .safetensors (mlx-lm's layout),
    `NAME.adapter_config.json` for any other name, so that several adapters can share a folder."""
    stem = run_stem(adapter_file)
    return adapter_file.parent / (CONFIG_NAME if stem == DEFAULT_STEM else f"{stem}.{CONFIG_NAME}")


def read_weights(file: Path) -> dict[str, mx.array]:
    """The tensors of an .npz or .safetensors adapter (or checkpoint) file."""
    try:
        if file.suffix == ".npz":
            with np.load(file) as data:
                return {k: mx.array(data[k]) for k in data.files}
        return mx.load(str(file))
    except (OSError, ValueError, RuntimeError, zipfile.BadZipFile, EOFError) as e:
        raise AdapterError(f"cannot read {file}: {e}") from None


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, mx.array]]:
    """Read an adapter in any supported layout as (config, weights keyed `<module>.lora_a/b`)."""
    file = find_adapter_file(path)
    if file.name == PEFT_WEIGHTS:
        return read_peft(file.parent)  # PEFT layout: names and orientation differ
    cfg_file = config_path(file)
    if not cfg_file.exists() and (file.parent / CONFIG_NAME).exists():
        cfg_file = file.parent / CONFIG_NAME  # a renamed adapter file beside the folder's one config
    if not cfg_file.exists():
        raise AdapterError(f"{file.parent} has no {cfg_file.name} beside {file.name}: copy it from the training output directory")
    try:
        config = AdapterConfig.from_json(json.loads(cfg_file.read_text()), str(cfg_file))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file} is not valid JSON (line {e.lineno}): {e.msg}") from None
    weights = read_weights(file)
    if not config.modules:
        config.modules = sorted({k.rsplit(".", 1)[0] for k in weights})
    return config, weights


def write_adapter_files(path: Path, weights: dict[str, np.ndarray], config: AdapterConfig | None) -> Path:
    """The adapter tensors (.npz, or .safetensors by suffix) and, with a config, the config beside them.

    With a config (a finished adapter, not a checkpoint) an .npz also gets its .safetensors twin with the
    same tensors, so that mlx-lm's own tools (`mlx_lm.generate --adapter-path`, `mlx_lm.fuse`) load the folder.
    """
    _write_tensors(path, weights)
    if config is not None:
        if path.suffix == ".npz":
            _write_tensors(path.with_suffix(".safetensors"), weights)
        write_text_atomic(config_path(path), json.dumps(config.to_json(), indent=2) + "\n")
    return path


def _write_tensors(path: Path, weights: dict[str, np.ndarray]) -> None:
    if path.suffix == ".safetensors":
        with atomic_file(path) as tmp:
            mx.save_safetensors(str(tmp), {k: mx.array(v) for k, v in weights.items()})
    else:
        with atomic_file(path, suffix=".npz") as tmp:
            np.savez(tmp, **weights)


def model_adapter_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's LoRA tensors as float32 numpy arrays; a non-finite one is an error."""
    return checked_arrays({k: np.array(v.astype(mx.float32)) for k, v in adapter_weights(model).items()})


def checked_arrays(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`weights` as they are, or an AdapterError when there are none or one is non-finite (any backend)."""
    if not weights:
        raise AdapterError("the model carries no LoRA layers: nothing to save")
    bad = [k for k, v in weights.items() if not np.isfinite(v).all()]
    if bad:
        raise AdapterError(f"refusing to save a non-finite adapter ({bad[0]} has NaN/inf); the previous file is kept")
    return weights


def save_adapter(model: nn.Module, path: str | os.PathLike, config: AdapterConfig | None = None, *,
                 base_model: str | None = None) -> Path:
    """Write the model's LoRA tensors to `path` and adapter_config.json beside it, atomically.

    `config` defaults to what the model's LoRA layers say (`AdapterConfig.of_model`) with `base_model`.
    """
    weights = model_adapter_arrays(model)
    return write_adapter_files(Path(path), weights, config or AdapterConfig.of_model(model, base_model=base_model))


# --- applying to a model ----------------------------------------------------------------------------------

def check_fits(model: nn.Module, config: AdapterConfig, weights: dict, source: str) -> None:
    """Every adapter tensor must name a linear layer of `model` with matching shapes; else one AdapterError.

    The one check of "does this adapter belong to this model", used by load, resume, fuse and export.
    """
    named = dict(model.named_modules())
    expected = {f"{m}.lora_{ab}" for m in config.modules for ab in "ab"}
    extra = sorted(set(weights) - expected)
    missing = sorted(expected - set(weights))
    if extra or missing:
        what = f"tensor {extra[0]} is not listed in its adapter_config.json" if extra else f"tensor {missing[0]} is missing"
        raise AdapterError(f"{source}: {what}; the adapter file and its config do not belong together")
    problems = []
    for path in config.modules:
        layer = named.get(path)
        if isinstance(layer, LoRALinear):
            layer = layer.linear
        if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
            problems.append(f"{path} is not a linear layer of this model")
            continue
        out_dims, in_dims = layer.weight.shape
        if isinstance(layer, nn.QuantizedLinear):
            in_dims = in_dims * 32 // layer.bits
        a, b = weights[f"{path}.lora_a"].shape, weights[f"{path}.lora_b"].shape
        if len(a) != 2 or len(b) != 2 or a != (in_dims, config.rank) or b != (config.rank, out_dims):
            problems.append(f"{path} has lora_a {tuple(a)} and lora_b {tuple(b)} but the model needs "
                            f"({in_dims}, {config.rank}) and ({config.rank}, {out_dims})")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AdapterError(f"{source} does not fit this model: {problems[0]}{more}; was it trained on another model?")


def load_adapter(model: nn.Module, path: str | os.PathLike, *, dropout: float | None = None) -> AdapterConfig:
    """Wrap `model` with LoRA layers as recorded for the adapter at `path` and load its weights.

    `dropout` overrides the recorded one (0 for inference; training keeps its own setting).
    """
    config, weights = read_adapter(path)
    config, weights = align_to_model(config, weights, model)
    check_fits(model, config, weights, str(path))
    apply_lora(model, rank=config.rank, alpha=config.alpha, dropout=config.dropout if dropout is None else dropout,
               modules=config.modules)
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return config


def hf_name(module: str) -> str:
    """mlx-lm module path -> Hugging Face module name."""
    for hf, mlx in PREFIXES:
        if module.startswith(mlx):
            return hf + module[len(mlx):]
    return module


def mlx_name(module: str) -> str:
    """Hugging Face module name -> mlx-lm module path."""
    for hf, mlx in PREFIXES:
        if module.startswith(hf):
            return mlx + module[len(hf):]
    return module


def align_to_model(config: AdapterConfig, weights: dict, model) -> tuple[AdapterConfig, dict]:
    """Rename modules the model lacks to the other spelling of their prefix, where the model has that one.

    `mlx_name` guesses mlx-lm's prefix without seeing the model; most multimodal mlx-lm models use
    language_model.model.*, but a few keep transformers' model.language_model.*. Unknown names are left
    for the caller's check to report.
    """
    return align_names(config, weights, set(dict(model.named_modules())))


def align_names(config: AdapterConfig, weights: dict, named: set[str]) -> tuple[AdapterConfig, dict]:
    """`align_to_model` against a set of module paths (what a torch model has, in mlx-lm spelling)."""
    renames = {}
    for module in config.modules:
        if module in named:
            continue
        for candidate in (hf_name(module), mlx_name(module)):
            if candidate in named:
                renames[module] = candidate
                break
    if not renames:
        return config, weights
    config.modules = [renames.get(m, m) for m in config.modules]
    weights = {renames.get(k.rsplit(".", 1)[0], k.rsplit(".", 1)[0]) + "." + k.rsplit(".", 1)[1]: v
               for k, v in weights.items()}
    return config, weights


def _layer_ids(modules) -> list[int]:
    return sorted({int(m.group(1)) for m in (_LAYER.search(f".{x}.") for x in modules) if m})


# --- PEFT -> mlxtune --------------------------------------------------------------------------------------

def _read_peft_config(peft_dir: Path) -> dict:
    cfg_file = peft_dir / CONFIG_NAME
    if not cfg_file.exists():
        raise AdapterError(f"{peft_dir} has {PEFT_WEIGHTS} but no {CONFIG_NAME}: copy the whole PEFT adapter directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file} is not valid JSON (line {e.lineno}): {e.msg}") from None
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type {kind!r} is not supported (only LORA adapters)")
    if cfg.get("use_dora"):
        raise AdapterError(f"{cfg_file}: DoRA adapters (use_dora) are not supported; train a plain LoRA adapter")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_file}: bias={cfg['bias']!r} adds trained biases mlxtune adapters cannot hold; "
                           "only bias='none' is supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{cfg_file}: modules_to_save {cfg['modules_to_save']} stores full copies of layers, "
                           "which mlxtune adapters cannot hold; merge it with PEFT instead")
    return cfg


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a regex key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_peft(peft_dir: str | os.PathLike) -> tuple[AdapterConfig, dict[str, mx.array]]:
    """Read a PEFT LoRA directory as (AdapterConfig, weights keyed `<mlx module>.lora_a/b`), exactly."""
    peft_dir = Path(peft_dir).expanduser()
    cfg = _read_peft_config(peft_dir)
    file = peft_dir / PEFT_WEIGHTS
    try:
        tensors = mx.load(str(file))
    except Exception as e:
        raise AdapterError(f"cannot read {file}: {e}") from None
    pairs: dict[str, dict[str, mx.array]] = {}
    for key, value in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise AdapterError(f"{file}: tensor {key} is not a LoRA A/B weight (embedding LoRA, DoRA or saved "
                               "modules are not supported)")
        pairs.setdefault(m["module"], {})[m["ab"]] = value.astype(mx.float32)
    if not pairs:
        raise AdapterError(f"{file} holds no LoRA tensors")
    broken = [k for k, v in pairs.items() if set(v) != {"A", "B"}]
    if broken:
        raise AdapterError(f"{file}: {broken[0]} has only lora_{next(iter(pairs[broken[0]]))}; the file is incomplete")

    rslora = bool(cfg.get("use_rslora"))
    alpha0, r0 = float(cfg.get("lora_alpha", 8)), int(cfg.get("r", 8))
    scales, ranks = {}, {}
    for module, ab in pairs.items():
        a, b = ab["A"], ab["B"]  # (r, in), (out, r)
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r:
            raise AdapterError(f"{file}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, "
                               "which do not form a LoRA pair")
        if r != _pattern_value(cfg.get("rank_pattern"), module, r0):
            raise AdapterError(f"{file}: {module} has rank {r} but {CONFIG_NAME} says "
                               f"{_pattern_value(cfg.get('rank_pattern'), module, r0)}")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha0))
        ranks[module] = r
        scales[module] = alpha / (math.sqrt(r) if rslora else r)

    rank = max(ranks.values())
    scale = Counter(scales.values()).most_common(1)[0][0]
    weights = {}
    for module, ab in pairs.items():
        r, path = ranks[module], mlx_name(module)
        a = ab["A"].T  # (in, r)
        b = ab["B"].T * (scales[module] / scale)  # (r, out); a module-specific scale is folded in here
        if r < rank:  # zero rows/columns add nothing to B A
            a = mx.concatenate([a, mx.zeros((a.shape[0], rank - r))], axis=1)
            b = mx.concatenate([b, mx.zeros((rank - r, b.shape[1]))], axis=0)
        weights[f"{path}.lora_a"], weights[f"{path}.lora_b"] = a, b
    modules = sorted({k.rsplit(".", 1)[0] for k in weights})
    config = AdapterConfig(rank=rank, alpha=scale * rank, dropout=float(cfg.get("lora_dropout") or 0.0),
                           lora_layers=len(_layer_ids(modules)),
                           target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}), modules=modules,
                           base_model=cfg.get("base_model_name_or_path"), format="peft")
    return config, weights


def import_peft(peft_dir: str | os.PathLike, out_file: str | os.PathLike, *, force: bool = False) -> Path:
    """Convert a PEFT LoRA directory into `out_file` (adapters.npz or .safetensors) + adapter_config.json."""
    peft_dir = Path(peft_dir).expanduser()
    if not (peft_dir / PEFT_WEIGHTS).exists():
        raise AdapterError(f"{peft_dir} is not a PEFT adapter directory (no {PEFT_WEIGHTS})")
    out_file = Path(out_file).expanduser()
    if out_file.suffix not in (".npz", ".safetensors"):
        raise AdapterError(f"--to {out_file}: name the output adapters.npz or adapters.safetensors")
    cfg_out = config_path(out_file)
    if out_file.parent.resolve() == peft_dir.resolve():
        raise AdapterError(f"--to {out_file} is inside the PEFT directory, whose {CONFIG_NAME} it would replace: "
                           "write it to another directory")
    for existing in (out_file, cfg_out):
        if existing.exists() and not force:
            raise AdapterError(f"{existing} already exists: choose another --to or pass --force to replace it")
    config, weights = read_peft(peft_dir)
    config.format, config.mlxtune_version = "mlxtune-lora", __version__
    arrays = {k: np.array(v.astype(mx.float32)) for k, v in weights.items()}
    return write_adapter_files(out_file, arrays, config)


# --- mlxtune -> PEFT --------------------------------------------------------------------------------------

def peft_config(config: AdapterConfig, base_model: str | None = None) -> dict:
    """PEFT's adapter_config.json for `config`, targeting exactly the adapted modules."""
    modules = [hf_name(m) for m in config.modules]
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    layers = _layer_ids(modules)
    # Leaf names + layers_to_transform is the usual PEFT form; it is exact only when every chosen layer
    # carries the same leaves. Otherwise list the full module names (PEFT matches those exactly too).
    uniform = layers and len(modules) == len(leaves) * len(layers) and all(_LAYER.search(f".{m}.") for m in modules)
    target = leaves if uniform else sorted(modules)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or config.base_model,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": target,
        "layers_to_transform": layers if uniform else None,
        "layers_pattern": "layers" if uniform else None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
        "inference_mode": True, "revision": None,
    }


def _check_peft_arch(base_model: str | None) -> None:
    """Refuse architectures whose module names PEFT would not find (when the base is a local directory)."""
    if not base_model or not (Path(base_model).expanduser() / "config.json").is_file():
        return
    try:
        model_type = json.loads((Path(base_model).expanduser() / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        return
    if model_type in UNMAPPED_ARCHS:
        raise AdapterError(f"PEFT export does not support {model_type} models: mlx-lm and transformers name its "
                           "layers differently; fuse the adapter instead (mlxtune fuse)")


def export_peft(adapter_file: str | os.PathLike, out_dir: str | os.PathLike, *, base_model: str | None = None,
                force: bool = False) -> Path:
    """Write `adapter_file` as a PEFT directory (adapter_model.safetensors + adapter_config.json)."""
    source = find_adapter_file(adapter_file).resolve()
    out_dir = Path(out_dir).expanduser()
    if out_dir.resolve() in source.parents:
        raise AdapterError(f"{out_dir} holds the adapter being exported; replacing it would delete the adapter: "
                           "write the PEFT adapter to a new directory")
    config, weights = read_adapter(source)
    _check_peft_arch(base_model or config.base_model)
    tensors = {}
    for module in config.modules:
        name = PEFT_PREFIX + hf_name(module)
        tensors[f"{name}.lora_A.weight"] = weights[f"{module}.lora_a"].astype(mx.float32).T  # (r, in)
        tensors[f"{name}.lora_B.weight"] = weights[f"{module}.lora_b"].astype(mx.float32).T  # (out, r)
    with atomic_dir(out_dir, force=force) as tmp:
        mx.save_safetensors(str(tmp / PEFT_WEIGHTS), {k: mx.contiguous(v) for k, v in tensors.items()},
                            metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config(config, base_model), indent=2) + "\n")
    return out_dir


# --- summary ----------------------------------------------------------------------------------------------

@dataclass
class AdapterInfo:
    file: Path
    format: str  # mlxtune-lora, mlx-lm or peft
    rank: int
    alpha: float
    scale: float
    layers: list[int]  # transformer block indices that carry an adapter
    target_modules: list[str]  # leaf names, e.g. q_proj
    n_modules: int
    parameters: int
    base_model: str | None
    dtype: str

    def summary(self) -> str:
        layers = _ranges(self.layers) if self.layers else "-"
        return "\n".join([
            f"file:        {self.file}",
            f"format:      {self.format}",
            f"rank:        {self.rank}",
            f"alpha:       {self.alpha:g} (scale {self.scale:g})",
            f"layers:      {layers} ({len(self.layers)} blocks)",
            f"modules:     {', '.join(self.target_modules)} ({self.n_modules} in all)",
            f"parameters:  {self.parameters:,}",
            f"base model:  {self.base_model or 'not recorded'}",
            f"dtype:       {self.dtype}",
        ])


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def adapter_info(path: str | os.PathLike) -> AdapterInfo:
    """Rank, alpha, layers, modules, parameter count and base model of any supported adapter."""
    file = find_adapter_file(path)
    config, weights = read_adapter(file)
    dtypes = {str(v.dtype).replace("mlx.core.", "") for v in weights.values()}
    return AdapterInfo(file=file, format=config.format, rank=config.rank, alpha=config.alpha, scale=config.scale,
                       layers=_layer_ids(config.modules),
                       target_modules=sorted({m.rsplit(".", 1)[-1] for m in config.modules}),
                       n_modules=len(config.modules), parameters=sum(v.size for v in weights.values()),
                       base_model=config.base_model, dtype=", ".join(sorted(dtypes)))
