"""The torch side of a model: load through transformers, wrap linear layers with LoRA, and score a batch.

What the MLX side spreads over `models`, `layers`, `adapters` and `loss`, for the optional torch backend:
`load_torch_model` (AutoModelForCausalLM: SDPA attention where the architecture has it, bfloat16 on CUDA,
float32 on the CPU, NF4 with bitsandbytes for `quantize` on CUDA), `apply_lora` (the same module choice,
initial weights and math as `mlxtune.layers`), adapter tensors in mlxtune's layout (keys are mlx-lm module
paths, `lora_a` (in, r), `lora_b` (r, out)), and `token_loss` / `evaluate_loss` on the numpy arrays of
`mlxtune.loss.batch_arrays`. The one thing to know: everything the two backends share (batches, masks,
initial adapter, files) comes from the framework-free modules, so only the arithmetic lives here; packed
rows get block-diagonal attention from a 4-D mask (or one per layer type), checked numerically once per
model exactly as the MLX side checks its own. torch and transformers are imported at module level: this
module is only imported through `mlxtune.backends.torch_module`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoModelForCausalLM

from .adapters import UNMAPPED_ARCHS, AdapterConfig, align_names, checked_arrays, hf_name, mlx_name, read_adapter
from .data import evaluation_batches
from .errors import AdapterError, ConfigError, DataError, ModelLoadError
from .layers import ATTENTION_MODULES, MLP_MODULES, initial_lora_a, resolve_targets, select_layers
from .loss import batch_arrays
from .model_files import normalize_config, read_config, resolve_model_path
from .models import load_tokenizer


@dataclass
class TorchModel:
    model: Any  # a transformers PreTrainedModel
    tokenizer: Any  # the same tokenizer wrapper the MLX side uses (mlxtune.models.load_tokenizer)
    config: dict
    path: Path
    device: str
    quantized: bool = False


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def load_torch_model(path_or_id: str | os.PathLike, *, device: str | None = None, quantize: bool = False,
                     say: Callable[[str], None] = print, dtype: torch.dtype | None = None) -> TorchModel:
    """A Hugging Face directory or hub id as a transformers model (frozen, eval mode) and its tokenizer.

    `dtype` overrides the device's (bfloat16 on CUDA, float32 on the CPU): --fsdp loads a CUDA run's model
    on the CPU in bfloat16, and sharding moves each rank's share to its GPU."""
    path = resolve_model_path(path_or_id)
    config = read_config(path)
    if "quantization" in config:
        raise ModelLoadError(f"{path} was quantized by MLX, which only the mlx backend reads: give the torch backend the "
                             "original Hugging Face directory, or `mlxtune fuse --de-quantize` output")
    if config.get("model_type") in UNMAPPED_ARCHS:
        raise ModelLoadError(f"the torch backend does not support {config['model_type']} models: mlx-lm and transformers "
                             "name their layers differently, so the adapter would not fit the other verbs; use --backend mlx")
    device = device or default_device()
    cuda = device.startswith("cuda")
    kwargs: dict[str, Any] = {"dtype": dtype or (torch.bfloat16 if cuda else torch.float32)}
    quantized = False
    if quantize:
        if not cuda:
            say("note: --quantize: the torch backend quantizes only on CUDA (bitsandbytes NF4); training the float32 "
                "base on the CPU")
        else:
            try:
                import bitsandbytes  # noqa: F401  (optional: QLoRA on CUDA)
            except ImportError:
                raise ConfigError("--quantize with the torch backend needs bitsandbytes: pip install bitsandbytes "
                                  "(or drop --quantize)") from None
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True)
            kwargs["device_map"] = {"": device}
            quantized = True
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"transformers cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not quantized:
        model = model.to(device)
    model.requires_grad_(False)
    model.eval()
    tokenizer = load_tokenizer(path, normalize_config(config))
    return TorchModel(model, tokenizer, config, path, device, quantized)


# --- LoRA layers ------------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """A frozen linear layer plus y += (alpha / r) * (dropout(x) @ A) @ B, as `mlxtune.layers.LoRALinear`.

    A (in, r) and B (r, out) are float32 parameters whatever the base dtype (bfloat16, NF4), in mlxtune's
    orientation, so they are saved as they are.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float, lora_a: np.ndarray):
        super().__init__()
        self.base = base
        self.alpha, self.dropout_p, self.scale = float(alpha), float(dropout), alpha / rank
        self.dropout = nn.Dropout(dropout)
        device = next(base.parameters()).device
        self.lora_a = nn.Parameter(torch.tensor(lora_a, dtype=torch.float32, device=device))
        self.lora_b = nn.Parameter(torch.zeros(rank, base.out_features, dtype=torch.float32, device=device))

    def forward(self, x):
        y = self.base(x)
        z = (self.dropout(x) @ self.lora_a.to(x.dtype)) @ self.lora_b.to(x.dtype)
        return y + (self.scale * z).to(y.dtype)


def transformer_blocks(model) -> tuple[str, list[nn.Module]]:
    """(module-path prefix, transformer blocks) of a transformers causal LM."""
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks") and len(m):
            return name + ".", list(m)
    raise ConfigError(f"{type(model).__name__} has no list of transformer blocks: LoRA needs one")


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)


def lora_layers(model) -> dict[str, LoRALinear]:
    """The model's LoRA layers keyed by mlx-lm module path (the adapter file's names)."""
    return {mlx_name(name): m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model, *, lora_layers: int | None = 16, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules=None, modules: list[str] | None = None, explicit_layers: bool = True,
               seed: int = 0) -> list[str]:
    """Freeze `model` and wrap the chosen linear layers in `LoRALinear`, in place; the mlx-lm paths chosen.

    The same choice as `mlxtune.layers.apply_lora` (last `lora_layers` blocks, `target_modules` leaves, or
    the exact `modules` of a saved adapter) and the same initial A (`initial_lora_a(seed, path)`).
    """
    if rank <= 0:
        raise ConfigError(f"--rank must be a positive integer, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {dropout}")
    model.requires_grad_(False)
    named = dict(model.named_modules())
    if modules is not None:
        chosen = list(modules)
        missing = [m for m in chosen if not _is_linear(named.get(hf_name(m)))]
        if missing:
            raise AdapterError(f"the adapter targets modules this model does not have: {', '.join(missing[:4])}"
                               f"{' ...' if len(missing) > 4 else ''} (was it trained on another base model?)")
    else:
        prefix, blocks = transformer_blocks(model)
        targets = resolve_targets(target_modules)
        layer_ids = select_layers(len(blocks), lora_layers, explicit_layers)
        chosen, seen = [], set()
        for i in layer_ids:
            for name, m in blocks[i].named_modules():
                leaf = name.split(".")[-1]
                if _is_linear(m) and (targets is None or leaf in targets):
                    seen.add(leaf)
                    path = mlx_name(f"{prefix}{i}.{name}")
                    if rank > min(m.in_features, m.out_features):  # as mlxtune.layers.apply_lora says it
                        raise ConfigError(f"--rank {rank} is larger than {path} ({m.out_features} x {m.in_features}): a "
                                          f"LoRA update of that layer has at most rank {min(m.in_features, m.out_features)}; "
                                          f"use --rank {min(m.in_features, m.out_features)} or less, or leave the layer "
                                          "out with --target-modules")
                    chosen.append(path)
        if targets is not None:
            unknown = [t for t in targets if t not in seen and t not in ATTENTION_MODULES + MLP_MODULES]
            if unknown or not chosen:
                names = sorted({n.split(".")[-1] for i in layer_ids for n, m in blocks[i].named_modules() if _is_linear(m)})
                raise ConfigError(f"--target-modules {','.join(unknown or targets)}: no such linear layer in the model's "
                                  f"blocks; available: {', '.join(names)} (or all-linear)")
    for path in chosen:
        base = named[hf_name(path)]
        layer = LoRALinear(base, rank, alpha, dropout, initial_lora_a(base.in_features, rank, seed, path))
        parent, _, leaf = hf_name(path).rpartition(".")
        setattr(named[parent] if parent else model, leaf, layer)
    return chosen


def adapter_config(model, base_model: str | None = None) -> AdapterConfig:
    """What adapter_config.json records for the LoRA layers `model` carries (as `AdapterConfig.of_model`)."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model carries no LoRA layers: nothing to describe")
    first = next(iter(layers.values()))
    dtype = str(_dtype(model)).replace("torch.", "")  # the compute dtype (an NF4 weight is stored as uint8)
    return AdapterConfig.of_modules(list(layers), rank=first.lora_a.shape[1], alpha=first.alpha, dropout=first.dropout_p,
                                    base_model=base_model, dtype=dtype)


def adapter_arrays(model) -> dict[str, np.ndarray]:
    """The LoRA tensors as float32 numpy arrays under mlxtune's keys; a non-finite one is an error."""
    out = {}
    for path, m in lora_layers(model).items():
        out[f"{path}.lora_a"] = m.lora_a.detach().float().cpu().numpy()
        out[f"{path}.lora_b"] = m.lora_b.detach().float().cpu().numpy()
    return checked_arrays(out)


def load_adapter_arrays(model, weights: dict, source: str) -> None:
    """Copy adapter tensors (numpy or MLX arrays, mlxtune keys) into the model's LoRA layers, shapes checked."""
    layers = lora_layers(model)
    ours = {f"{p}.lora_{ab}": getattr(m, f"lora_{ab}") for p, m in layers.items() for ab in "ab"}
    bad = sorted(set(weights) ^ set(ours)) or [k for k in weights if tuple(np.shape(weights[k])) != tuple(ours[k].shape)]
    if bad:
        raise AdapterError(f"{source} does not fit this model's LoRA layers ({bad[0]}): was it trained on another model, "
                           "or with another rank, --lora-layers or --target-modules?")
    with torch.no_grad():
        for k, v in weights.items():
            ours[k].copy_(torch.from_numpy(np.array(v, dtype=np.float32)))


def load_adapter(model, path: str | os.PathLike, *, dropout: float | None = 0.0) -> AdapterConfig:
    """Wrap `model` with the LoRA layers recorded for the adapter at `path` (any supported format) and load it."""
    config, weights = read_adapter(path)
    config, weights = align_names(config, weights, {mlx_name(n) for n, _ in model.named_modules()})
    apply_lora(model, rank=config.rank, alpha=config.alpha, dropout=config.dropout if dropout is None else dropout,
               modules=config.modules)
    load_adapter_arrays(model, weights, str(path))
    return config


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) as `mlxtune.layers.count_parameters`: LoRA tensors are not part of the total."""
    trainable = total = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
        elif ".lora_" not in name:
            shape = getattr(getattr(p, "quant_state", None), "shape", None)  # NF4 packs two weights per byte
            total += math.prod(shape) if shape is not None else p.numel()
    return trainable, total


# --- the loss ---------------------------------------------------------------------------------------------

@dataclass
class Parts:
    """Body (ids, mask -> hidden states) + head (hidden -> logits), and whether packed rows score exactly."""

    body: Callable | None  # None: no split found, use the full logits
    head: Callable | None
    packing: bool = True


def attention_masks(config, segments: torch.Tensor, dtype: torch.dtype):
    """Causal AND same-segment additive masks (B, 1, L, L); one per layer type for models that mix them.

    Like `mlxtune.loss._segment_mask`: positions keep counting across a packed row (RoPE is relative), and
    a sliding window counts positions within the row.
    """
    L = segments.shape[1]
    pos = torch.arange(L, device=segments.device)
    same = (pos[:, None] >= pos[None]) & (segments[:, :, None] == segments[:, None, :])

    def additive(window):
        allowed = same & (pos[:, None] < pos[None] + window) if window else same
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]

    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:
        return additive(window if getattr(config, "use_sliding_window", True) else None)
    return {kind: additive(window if kind == "sliding_attention" else None) for kind in set(layer_types)}


def _dtype(model) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def _find_parts(model) -> Parts:
    inner, proj = model.get_decoder(), model.get_output_embeddings()
    if inner is None or proj is None:
        return Parts(None, None)
    cap = getattr(model.config, "final_logit_softcapping", None)

    def body(inputs, mask=None):
        return inner(input_ids=inputs, attention_mask=mask, use_cache=False).last_hidden_state

    def head(h):
        logits = proj(h)
        return torch.tanh(logits / cap) * cap if cap else logits

    return Parts(body, head)


def model_parts(model) -> Parts:
    """Find (and check numerically, once per model) the body/head split and packed-attention support."""
    parts = getattr(model, "_mlxtune_parts", None)
    if parts is not None:
        return parts
    parts = _find_parts(model)
    was_training = model.training
    model.eval()
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([[3, 7, 1, 9, 4, 2, 8, 5], [6, 2, 9, 3, 1, 7, 4, 2]], device=device) % model.config.vocab_size
    # bfloat16 (CUDA) rounds logits to ~3 significant digits; a broken mask moves them by whole units
    loose = dict(rtol=5e-2, atol=1e-1) if _dtype(model) != torch.float32 else dict(rtol=1e-3, atol=1e-3)
    try:
        with torch.no_grad():
            if parts.body is not None:
                full = model(ids, use_cache=False).logits.float()
                split = parts.head(parts.body(ids)).float()
                if split.shape != full.shape or not torch.allclose(full, split, **loose):
                    parts.body = parts.head = None
            # Two rows of two examples each must score as the examples do alone (as mlxtune.loss checks).
            a, b = ids[:1, :5], ids[1:, :3]
            seg = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 2, 2, 2, 2, 2]], device=device)
            rows = torch.cat([torch.cat([a, b], 1), torch.cat([b, a], 1)])
            packed = _logits(model, parts, rows, seg)
            la, lb = _logits(model, parts, a, None), _logits(model, parts, b, None)
            alone = torch.cat([torch.cat([la, lb], 1), torch.cat([lb, la], 1)])
            parts.packing = bool(torch.allclose(packed, alone, **loose))
    except (RuntimeError, ValueError, TypeError, KeyError):  # attention code that rejects our mask: train unpacked
        parts.packing = False
    finally:
        model.train(was_training)
    model._mlxtune_parts = parts
    return parts


def _logits(model, parts: Parts, inputs, segments):
    mask = None if segments is None else attention_masks(model.config, segments, _dtype(model))
    if parts.body is None:
        return model(inputs, attention_mask=mask, use_cache=False).logits.float()
    return parts.head(parts.body(inputs, mask)).float()


def to_tensors(arrays: list[np.ndarray], device) -> list[torch.Tensor]:
    return [torch.from_numpy(a).to(device=device, dtype=torch.long if a.dtype.kind == "i" else torch.float32)
            for a in arrays]


def token_loss(model, parts: Parts, arrays: list[torch.Tensor], gather: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of target tokens) for the tensors of `batch_arrays`, as `mlxtune.loss`."""
    if gather:
        inputs, targets, weights, index, *rest = arrays
    else:
        (inputs, targets, weights, *rest), index = arrays, None
    mask = attention_masks(model.config, rest[0], _dtype(model)) if rest else None
    if parts.body is not None:
        h = parts.body(inputs, mask)
        h, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        if index is not None:
            h, t = h[index], t[index]
        logits = parts.head(h)
    else:
        logits = model(inputs, attention_mask=mask, use_cache=False).logits
        logits, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        if index is not None:
            logits, t = logits[index], t[index]
    ce = F.cross_entropy(logits.float(), t, reduction="none") * weights
    return ce.sum(), weights.sum()


def evaluate_sums(model, records, batch_size: int, max_seq_length: int, num_batches: int = -1, *,
                  share: tuple[int, int] = (0, 1)) -> tuple[float, float]:
    """(sum of token losses, target tokens) over the first `num_batches` batches of `records` (-1 = all),
    unpacked, in order. `share=(rank, size)`: only rows rank::size of each batch (a rank's part of the sums)."""
    parts = model_parts(model)
    gather = parts.body is not None
    device = model.get_input_embeddings().weight.device
    batches = evaluation_batches(records, batch_size, max_seq_length, num_batches, share=share, every_rank_runs=True)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    try:
        with torch.no_grad():
            for batch in batches:
                s, n = token_loss(model, parts, to_tensors(batch_arrays(batch, gather, bucket=False), device), gather)
                total, count = total + s.item(), count + n.item()
    finally:
        model.train(was_training)
    return total, count


def evaluate_loss(model, records, batch_size: int, max_seq_length: int, num_batches: int = -1) -> float:
    """Mean loss per target token over `records` (the first `num_batches` batches; -1 = all), unpacked, in order."""
    total, count = evaluate_sums(model, records, batch_size, max_seq_length, num_batches)
    if count == 0:
        raise DataError("the evaluation records carry no target tokens (is every completion empty or truncated?)")
    return total / count


def describe(loaded: TorchModel) -> str:
    """One line on how the model runs: dtype, attention kernel, quantization."""
    attn = getattr(loaded.model.config, "_attn_implementation", None) or "default"
    dtype = str(_dtype(loaded.model)).replace("torch.", "")
    nf4 = ", NF4 (bitsandbytes)" if loaded.quantized else ""
    return f"Model: transformers {transformers.__version__}, {dtype}, {attn} attention{nf4}"

