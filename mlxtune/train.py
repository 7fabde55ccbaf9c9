"""LoRA / QLoRA fine-tuning: `mlxtune.lora(...)` and the `mlxtune lora` verb.

Read it top to bottom: settings (TrainingArgs) -> loss -> one compiled step -> the loop -> checkpoints
-> the public `lora()` function. The one thing to know: each iteration is ONE graph (forward, loss,
backward, clipping, optimizer update) built lazily, compiled with `mx.compile` over the model, optimizer
and RNG state, and evaluated once. Loss is taken only on target tokens, and the vocabulary projection is
applied only to those positions (hidden states are gathered first), which is where most of the speed and
memory saving over a plain `model(inputs)` comes from.

Resume is exact: a checkpoint holds the adapter, the optimizer state (step count included, so the
learning-rate schedule continues), and the iteration; the data order and the dropout RNG are functions of
(seed, iteration), so an interrupted-and-resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .errors import ConfigError, DataError, MlxtuneError, TrainingError
from .files import atomic_file, write_text_atomic

CHECKPOINT_RE = re.compile(r"^(\d{7})_adapters\.(npz|safetensors)$")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "linear")
ALIASES = {"num_layers": "lora_layers", "adapter_path": "adapter_file", "steps_per_save": "save_every",
           "grad_accumulation_steps": "grad_accumulation", "lr": "learning_rate"}


# --------------------------------------------------------------------------------------------- settings
@dataclass
class TrainingArgs:
    """Every knob of a LoRA run. YAML keys, Python keyword arguments and CLI flags (`-` -> `_`) are these names."""

    model: str | None = field(default=None, metadata={"help": "Base model: a local MLX/HF directory or a hub id."})
    data: str | None = field(default=None, metadata={"help": "Dataset: a directory with train/valid/test.jsonl, or one .jsonl file."})
    adapter_file: str = field(default="adapters/adapters.npz", metadata={
        "help": "Where the adapter goes; checkpoints, metrics.jsonl and loss.png are written beside it."})
    lora_layers: int = field(default=16, metadata={"help": "Adapt the last N transformer blocks (-1 = all). Alias --num-layers."})
    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: str = field(default="attention", metadata={
        "help": "attention (q,k,v,o projections), all-linear (adds the MLP), or a comma list like q_proj,v_proj."})
    batch_size: int = field(default=4, metadata={"help": "Examples (or packed rows) per micro-batch."})
    iters: int = field(default=1000, metadata={"help": "Optimizer steps to train for."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (1e-4 suits LoRA; try 2e-4 for small ranks)."})
    lr_schedule: str = field(default="constant", metadata={"help": "constant, cosine or linear decay to 0 after warmup."})
    warmup: int = field(default=0, metadata={"help": "Steps of linear warmup from 0 to the learning rate."})
    optimizer: str = field(default="adamw", metadata={"help": "adamw, adam or sgd."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (adamw, sgd)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this (0 = no clipping)."})
    grad_accumulation: int = field(default=1, metadata={
        "help": "Micro-batches per optimizer step; equals a batch of batch-size x N."})
    grad_checkpoint: bool = field(default=False, metadata={"help": "Recompute block activations in the backward pass: less memory, ~30% slower."})
    max_seq_length: int = field(default=2048, metadata={"help": "Longer examples are truncated to this many tokens."})
    pack: bool = field(default=False, metadata={
        "help": "Pack several examples into each row of up to --max-seq-length tokens (block-diagonal "
                "attention, same loss as unpacked); --batch-size then counts rows."})
    train_on_inputs: bool = field(default=False, metadata={"help": "Also learn the prompt/user tokens, not only the completions."})
    valid_split: float = field(default=0.1, metadata={"help": "Fraction held out for validation from a single-file dataset, or from train.jsonl when a data directory has no valid.jsonl."})
    test_split: float = field(default=0.0, metadata={"help": "Fraction of a single-file dataset held out for --test."})
    seed: int = field(default=0, metadata={"help": "Seed for LoRA init, data order and dropout."})
    steps_per_report: int = field(default=10, metadata={"help": "Steps between training-loss reports."})
    steps_per_eval: int = field(default=200, metadata={"help": "Steps between validation-loss reports (0 = only at the end)."})
    val_batches: int = field(default=25, metadata={"help": "Validation batches per evaluation (-1 = the whole set)."})
    save_every: int = field(default=100, metadata={"help": "Steps between checkpoints (0000100_adapters.npz)."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest checkpoint beside --adapter-file."})
    force: bool = field(default=False, metadata={"help": "Replace an existing adapter (and its checkpoints) in --adapter-file's folder."})
    test: bool = field(default=False, metadata={
        "help": "Report test loss and perplexity after training (or, with an existing --adapter-file and no --iters, instead of training)."})
    test_batches: int = field(default=-1, metadata={"help": "Test batches for --test (-1 = the whole set)."})
    plot: bool = field(default=True, metadata={"help": "Write loss.png beside the adapter."})
    chat_template: str | None = field(default=None, metadata={"help": "A Jinja chat template file to use instead of the tokenizer's."})
    prompt_key: str | None = field(default=None, metadata={"help": "Field holding the prompt, when your records name it differently."})
    completion_key: str | None = field(default=None, metadata={"help": "Field holding the completion/answer."})
    text_key: str | None = field(default=None, metadata={"help": "Field holding plain text records."})
    messages_key: str | None = field(default=None, metadata={"help": "Field holding a chat's message list."})
    report_to: str = field(default="none", metadata={"help": "none, or wandb to also log the reports to Weights & Biases (needs `pip install wandb`)."})

    def validate(self) -> "TrainingArgs":
        def need(ok: bool, flag: str, what: str, value):
            if not ok:
                raise ConfigError(f"--{flag.replace('_', '-')} {what}, got {value}")

        need(self.rank > 0, "rank", "must be a positive integer", self.rank)
        need(self.batch_size > 0, "batch_size", "must be a positive integer", self.batch_size)
        need(self.iters >= 0, "iters", "must be 0 or more", self.iters)
        need(self.learning_rate > 0, "learning_rate", "must be positive", self.learning_rate)
        need(self.lr_schedule in SCHEDULES, "lr_schedule", f"must be one of {', '.join(SCHEDULES)}", self.lr_schedule)
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}", self.optimizer)
        need(self.warmup >= 0, "warmup", "must be 0 or more", self.warmup)
        need(self.grad_accumulation >= 1, "grad_accumulation", "must be at least 1", self.grad_accumulation)
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be 0 (off) or positive", self.max_grad_norm)
        need(self.weight_decay >= 0, "weight_decay", "must be 0 or more", self.weight_decay)
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)", self.dropout)
        need(self.max_seq_length >= 2, "max_seq_length", "must be at least 2", self.max_seq_length)
        need(self.steps_per_report > 0, "steps_per_report", "must be positive", self.steps_per_report)
        need(self.steps_per_eval >= 0, "steps_per_eval", "must be 0 or more", self.steps_per_eval)
        need(self.save_every >= 0, "save_every", "must be 0 (only the final adapter) or more", self.save_every)
        need(self.report_to in ("none", "wandb"), "report_to", "must be none or wandb", self.report_to)
        need(self.lora_layers == -1 or self.lora_layers > 0, "lora_layers", "must be a positive number of blocks or -1 for all", self.lora_layers)
        suffix = Path(self.adapter_file).suffix
        need(suffix in (".npz", ".safetensors"), "adapter_file", "must end in .npz or .safetensors", self.adapter_file)
        return self


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainingArgs)}


def _normalize_keys(values: dict, source: str) -> dict:
    out = {}
    names = _field_names()
    for key, value in values.items():
        k = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if k not in names:
            close = [n for n in names if n.split("_")[0] == k.split("_")[0]]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown setting {key!r}{hint}; see `mlxtune lora --help` for the valid names")
        out[k] = value
    return out


def read_config_file(path: str | os.PathLike) -> dict:
    """A YAML file of TrainingArgs names -> values (mlx-lm's lora config keys are accepted too)."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist (check --config)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise ConfigError(f"{path}{f' line {line + 1}' if line is not None else ''}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of setting: value, got a {type(values).__name__}")
    if "lora_parameters" in values:  # mlx-lm layout: rank/scale/dropout/keys nested
        p = values.pop("lora_parameters") or {}
        values.setdefault("rank", p.get("rank", 8))
        if "scale" in p:
            values.setdefault("alpha", float(p["scale"]) * values["rank"])
        if "dropout" in p:
            values.setdefault("dropout", p["dropout"])
        if p.get("keys"):
            values.setdefault("target_modules", ",".join(k.split(".")[-1] for k in p["keys"]))
    for ignored in ("fine_tune_type", "train", "lr_schedule_config"):
        values.pop(ignored, None)
    return _normalize_keys(values, str(path))


def training_args(config: str | os.PathLike | None = None, base: dict | None = None, **overrides) -> TrainingArgs:
    """Merge settings: dataclass defaults < `base` < the YAML `config` file < `overrides` (e.g. CLI flags)."""
    values: dict[str, Any] = {}
    if base:
        values.update(_normalize_keys(base, "settings"))
    if config is not None:
        values.update(read_config_file(config))
    values.update(_normalize_keys({k: v for k, v in overrides.items() if v is not None}, "argument"))
    fields = {f.name: f for f in dataclasses.fields(TrainingArgs)}
    for k, v in list(values.items()):  # YAML gives strings for "1e-4" and lists for target modules
        kind = type(fields[k].default)
        try:
            if kind is bool and not isinstance(v, bool):
                v = str(v).lower() in ("1", "true", "yes", "on")
            elif kind in (int, float) and v is not None:
                v = kind(float(v)) if kind is int and float(v).is_integer() else kind(v)
            elif k == "target_modules" and isinstance(v, (list, tuple)):
                v = ",".join(v)
        except (TypeError, ValueError):
            raise ConfigError(f"{k}: expected a {kind.__name__}, got {v!r}") from None
        values[k] = v
    return TrainingArgs(**values).validate()


# ------------------------------------------------------------------------------------ model plumbing
@dataclass
class ModelParts:
    """How to run a model as body (tokens -> hidden states) + head (hidden -> logits), and where its mask comes from."""

    body: Callable | None  # None: no split found, use model(inputs) and weight every position
    head: Callable | None
    mask_modules: list  # the python modules whose `create_attention_mask` the model calls
    packing: bool = True  # verified: a packed row gives the same loss as its examples one by one


def _find_parts(model: nn.Module) -> ModelParts:
    inner = model.get("model") if isinstance(model, dict) else None
    mods = {sys.modules[type(m).__module__] for _, m in model.named_modules()}
    mask_modules = [m for m in mods if hasattr(m, "create_attention_mask")]
    if not isinstance(inner, nn.Module):
        return ModelParts(None, None, mask_modules)
    if "lm_head" in model and not getattr(model, "tie_word_embeddings", False):
        proj = model.lm_head
    elif hasattr(inner, "embed_tokens") and hasattr(inner.embed_tokens, "as_linear"):
        proj = inner.embed_tokens.as_linear
    else:
        return ModelParts(None, None, mask_modules)
    args = getattr(model, "args", None)
    cap = getattr(model, "final_logit_softcapping", None) or getattr(args, "final_logit_softcapping", None)

    def head(h):
        logits = proj(h)
        return mx.tanh(logits / cap) * cap if cap else logits

    return ModelParts(lambda inputs: inner(inputs), head, mask_modules)


def model_parts(model: nn.Module) -> ModelParts:
    """Find (and check numerically, once per model) the body/head split and packed-attention support."""
    parts = model.__dict__.get("_mlxtune_parts")
    if parts is not None:
        return parts
    parts = _find_parts(model)
    was_training = model.training
    model.eval()
    ids = mx.array([[3, 7, 1, 9, 4, 2, 8, 5], [6, 2, 9, 3, 1, 7, 4, 2]]) % _vocab_size(model)
    try:
        if parts.body is not None:
            full = model(ids).astype(mx.float32)
            try:
                split = parts.head(parts.body(ids)).astype(mx.float32)
                same = split.shape == full.shape and mx.allclose(full, split, rtol=1e-3, atol=1e-3).item()
            except Exception:  # an inner model with another calling convention
                same = False
            if not same:
                parts.body = parts.head = None
        # Packing check: two rows, each holding two examples, must score as the examples do alone.
        # (Two rows with different layouts catch attention code that broadcasts a per-row mask wrongly.)
        a, b = ids[:1, :5], ids[1:, :3]
        seg = mx.array([[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 2, 2, 2, 2, 2]])
        rows = mx.concatenate([mx.concatenate([a, b], 1), mx.concatenate([b, a], 1)])
        packed = _logits(model, parts, rows, seg)
        la, lb = _logits(model, parts, a, None), _logits(model, parts, b, None)
        alone = mx.concatenate([mx.concatenate([la, lb], 1), mx.concatenate([lb, la], 1)])
        parts.packing = bool(mx.allclose(packed, alone, rtol=1e-3, atol=1e-3).item())
    except Exception:  # an architecture whose attention rejects a per-row mask: train unpacked
        parts.packing = False
    finally:
        model.train(was_training)
    object.__setattr__(model, "_mlxtune_parts", parts)
    return parts


def _vocab_size(model) -> int:
    args = getattr(model, "args", None)
    return int(getattr(args, "vocab_size", 0) or 0) or 16


def _segment_mask(segments: mx.array):
    """A create_attention_mask replacement: causal AND same segment, (B, 1, L, L) booleans."""

    def create_attention_mask(h, cache=None, window_size=None, return_array=False, **_):
        pos = mx.arange(segments.shape[1])
        mask = (pos[:, None] >= pos[None]) & (segments[:, :, None] == segments[:, None, :])
        if window_size:
            mask = mask & (pos[:, None] < pos[None] + window_size)
        return mask[:, None]

    return create_attention_mask


@contextlib.contextmanager
def _attention_segments(parts: ModelParts, segments):
    # mlx-lm models build their causal mask with the create_attention_mask they import; swapping that
    # name while the graph is traced gives every architecture block-diagonal attention without touching
    # model code. Positions keep counting across a packed row; RoPE is relative so that changes nothing.
    if segments is None:
        yield
        return
    fn = _segment_mask(segments)
    saved = [(m, m.create_attention_mask) for m in parts.mask_modules]
    try:
        for m, _ in saved:
            m.create_attention_mask = fn
        yield
    finally:
        for m, old in saved:
            m.create_attention_mask = old


def _logits(model, parts, inputs, segments):
    with _attention_segments(parts, segments):
        if parts.body is None:
            return model(inputs)
        return parts.head(parts.body(inputs))


def _loss_sums(model, parts: ModelParts, inputs, targets, weights, index=None, segments=None):
    """(sum of token losses, number of loss tokens). With `index`, only those flat positions reach the head."""
    with _attention_segments(parts, segments):
        if parts.body is not None:
            h = parts.body(inputs)
            h = h.reshape(-1, h.shape[-1])
            t = targets.reshape(-1)
            if index is not None:
                h, t = h[index], t[index]
            logits = parts.head(h)
        else:
            logits = model(inputs)
            logits, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
            if index is not None:
                logits, t = logits[index], t[index]
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), t) * weights
    return ce.sum(), weights.sum()


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _bucket(n: int) -> int:
    # Gathered lengths are rounded up (<= 12.5% waste) so mx.compile sees few distinct shapes.
    return max(64, _round_up(n, 1 << max(6, n.bit_length() - 3)))


def prepare_batch(batch, gather: bool = True) -> tuple[list[mx.array], int]:
    """Batch -> the arrays the loss takes ([inputs, targets, weights, index, segments?]) and its real tokens.

    Trailing columns with no loss in any row are dropped: attention is causal, so they cannot change the
    loss of earlier positions.
    """
    inputs = np.asarray(batch.inputs, np.int32)
    targets = np.asarray(batch.targets, np.int32)
    mask = np.asarray(batch.loss_mask, np.float32)
    segments = None if batch.segments is None else np.asarray(batch.segments, np.int32)
    used = np.flatnonzero(mask.any(0))
    length = min(inputs.shape[1], _round_up(int(used[-1]) + 1 if len(used) else 1, 32))
    inputs, targets, mask = inputs[:, :length], targets[:, :length], mask[:, :length]
    if segments is not None:
        segments = segments[:, :length]
    if gather:
        flat = np.flatnonzero(mask.reshape(-1))
        size = _bucket(len(flat))
        index = np.zeros(size, np.int32)
        index[: len(flat)] = flat
        weights = np.zeros(size, np.float32)
        weights[: len(flat)] = mask.reshape(-1)[flat]
        arrays = [inputs, targets, weights, index]
    else:
        arrays = [inputs, targets, mask.reshape(-1)]
    if segments is not None:
        arrays.append(segments)
    return [mx.array(a) for a in arrays], int(getattr(batch, "n_real", 0) or 0)


def _call_loss(model, parts, arrays, gather: bool):
    if gather:
        inputs, targets, weights, index, *rest = arrays
    else:
        (inputs, targets, weights, *rest), index = arrays, None
    return _loss_sums(model, parts, inputs, targets, weights, index, rest[0] if rest else None)


def loss_fn(model: nn.Module, batch) -> tuple[mx.array, mx.array]:
    """(mean loss per target token, number of target tokens) for one `mlxtune.data.Batch`."""
    parts = model_parts(model)
    gather = parts.body is not None
    if batch.segments is not None and not parts.packing:
        raise ConfigError("this architecture does not support packed batches: iterate with pack=False")
    arrays, _ = prepare_batch(batch, gather)
    total, n = _call_loss(model, parts, arrays, gather)
    return total / mx.maximum(n, 1), n


def evaluate_loss(model: nn.Module, records, batch_size: int, max_seq_length: int, num_batches: int = -1) -> float:
    """Mean loss per target token over `records` (the first `num_batches` batches; -1 = all), unpacked, in order."""
    from .data import iterate_batches

    if not records:
        raise DataError("no records to evaluate (the split is empty)")
    parts = model_parts(model)
    gather = parts.body is not None
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    batches = iterate_batches(records, min(batch_size, len(records)), max_seq_length=max_seq_length, seed=0,
                              start_step=0, loop=False, shuffle=False, pack=False)
    try:
        for i, batch in enumerate(batches):
            if num_batches != -1 and i >= num_batches:
                break
            arrays, _ = prepare_batch(batch, gather)
            s, n = _call_loss(model, parts, arrays, gather)
            total, count = total + s, count + n
            mx.eval(total, count)
    finally:
        model.train(was_training)
    if count.item() == 0:
        raise DataError("the evaluation records carry no target tokens (is every completion empty or truncated?)")
    return (total / count).item()


def _checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing: each transformer block recomputes its activations in the backward pass.

    Done per instance (a subclass swapped in), so other models of the same class are not affected.
    """
    from .lora import transformer_blocks

    made: dict[type, type] = {}
    for block in transformer_blocks(model):
        cls = type(block)
        if getattr(cls, "_mlxtune_checkpointed", False):
            continue
        if cls not in made:
            call = cls.__call__

            def checkpointed(self, *args, __call=call, **kwargs):
                def inner(params, *args, **kwargs):
                    self.update(params)
                    return __call(self, *args, **kwargs)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

            made[cls] = type(cls.__name__, (cls,), {"__call__": checkpointed, "_mlxtune_checkpointed": True})
        block.__class__ = made[cls]


# ------------------------------------------------------------------------------------ optimizer
def make_optimizer(args: TrainingArgs) -> optim.Optimizer:
    lr = args.learning_rate
    decay_steps = max(1, args.iters - args.warmup)
    if args.lr_schedule == "cosine":
        schedule = optim.cosine_decay(lr, decay_steps, 0.0)
    elif args.lr_schedule == "linear":
        schedule = optim.linear_schedule(lr, 0.0, decay_steps)
    else:
        schedule = lambda step: mx.array(lr, mx.float32)  # noqa: E731 - a schedule is a function of step
    if args.warmup > 0:
        schedule = optim.join_schedules([optim.linear_schedule(0.0, lr, args.warmup), schedule], [args.warmup])
    if args.optimizer == "adamw":
        return optim.AdamW(learning_rate=schedule, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return optim.Adam(learning_rate=schedule)
    return optim.SGD(learning_rate=schedule, weight_decay=args.weight_decay)


# ------------------------------------------------------------------------------------ checkpoints
def _settings_fingerprint(args: TrainingArgs, adapter_modules: list[str], base: str | None) -> dict:
    keys = ["rank", "alpha", "dropout", "target_modules", "batch_size", "grad_accumulation", "learning_rate",
            "lr_schedule", "warmup", "optimizer", "weight_decay", "max_grad_norm", "max_seq_length", "pack",
            "train_on_inputs", "seed"]
    if args.lr_schedule != "constant":
        keys.append("iters")  # the decay length depends on it
    fp = {k: getattr(args, k) for k in keys}
    fp["modules"] = sorted(adapter_modules)
    fp["base_model"] = base
    return fp


def find_checkpoints(folder: Path) -> list[tuple[int, Path, Path]]:
    """(iteration, adapter, state) for every complete checkpoint in `folder`, oldest first."""
    out = []
    if folder.is_dir():
        for f in folder.iterdir():
            m = CHECKPOINT_RE.match(f.name)
            state = folder / f"{m.group(1)}_state.npz" if m else None
            if m and state.exists():
                out.append((int(m.group(1)), f, state))
    return sorted(out)


def save_checkpoint(model, optimizer, folder: Path, it: int, meta: dict, config, suffix: str) -> Path:
    """State first, adapter second: a checkpoint counts only once both files are complete."""
    from .lora import save_adapter

    state = {f"opt.{k}": np.array(v) for k, v in tree_flatten(optimizer.state)}
    state["meta"] = np.array(json.dumps(meta))
    with atomic_file(folder / f"{it:07d}_state.npz", suffix=".npz") as tmp:
        np.savez(tmp, **state)
    return save_adapter(model, folder / f"{it:07d}_adapters{suffix}", config, write_config=False)


def _warm_start(model, adapter_file: Path) -> None:
    from .lora import adapter_weights, read_adapter

    _, weights = read_adapter(adapter_file)
    expected = adapter_weights(model)
    bad = sorted(set(weights) ^ set(expected)) or [k for k in weights if weights[k].shape != expected[k].shape]
    if bad:
        raise ConfigError(f"--resume: {adapter_file} does not fit this run's LoRA layers ({bad[0]}): use the "
                          "rank, --lora-layers and --target-modules it was trained with")
    model.load_weights(list(weights.items()), strict=False)


def _set_path(tree, path: list[str], value) -> None:
    for k in path[:-1]:
        tree = tree[int(k)] if isinstance(tree, list) else tree[k]
    last = path[-1]
    if isinstance(tree, list):
        tree[int(last)] = value
    else:
        tree[last] = value


def _read_weights(file: Path) -> dict[str, mx.array]:
    if file.suffix == ".npz":
        with np.load(file) as data:
            return {k: mx.array(data[k]) for k in data.files}
    return mx.load(str(file))


def load_checkpoint(model, optimizer, adapter: Path, state_file: Path) -> dict:
    from .lora import adapter_weights

    with np.load(state_file) as data:
        meta = json.loads(str(data["meta"]))
        opt = {k[4:]: mx.array(data[k]) for k in data.files if k.startswith("opt.")}
    weights = _read_weights(adapter)
    if set(weights) != set(adapter_weights(model)):
        raise ConfigError(f"--resume: {adapter} does not match this run's LoRA layers; use the same settings or start a new --adapter-file")
    model.load_weights(list(weights.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    state = optimizer.state
    for k, v in opt.items():
        _set_path(state, k.split("."), v.astype(mx.uint64) if k == "step" else v)
    mx.eval(model.parameters(), optimizer.state)
    return meta


# ------------------------------------------------------------------------------------ the loop
@dataclass
class TrainResult:
    """What `mlxtune.lora` returns: where the adapter is and how the loss went."""

    adapter_file: Path | None
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    test_loss: float | None = None
    test_perplexity: float | None = None
    iterations: int = 0
    trained_tokens: int = 0
    stopped_early: bool = False
    metrics_file: Path | None = None
    plot_file: Path | None = None


def _fmt_count(n: int) -> str:
    m = n / 1e6
    return f"{m:.0f}M" if m >= 100 else f"{m:.1f}M" if m >= 1 else f"{m:.3f}M"


def _wants_stop(callbacks, report: dict) -> bool:
    stop = False
    for cb in callbacks:
        if hasattr(cb, "on_train_loss_report") or hasattr(cb, "on_val_loss_report"):  # mlx-lm style
            method = getattr(cb, "on_val_loss_report" if "val_loss" in report else "on_train_loss_report", None)
            result = method(report) if method else None
        else:
            result = cb(report)
        stop = stop or result is True
    return stop


class _Log:
    """Report lines go through tqdm.write so the progress bar stays intact."""

    def __init__(self, verbose: bool, metrics: Path | None):
        self.verbose, self.metrics, self.bar = verbose, metrics, None

    def line(self, text: str) -> None:
        if not self.verbose:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def record(self, entry: dict) -> None:
        if self.metrics is not None:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(entry) + "\n")


def train(model: nn.Module, optimizer: optim.Optimizer, train_records, valid_records, args: TrainingArgs, *,
          adapter_config, callbacks: Iterable[Callable] = (), verbose: bool = True, base_model: str | None = None
          ) -> TrainResult:
    """Run the loop: the model must already carry LoRA layers (see `mlxtune.lora.apply_lora`)."""
    from .data import iterate_batches
    from .lora import lora_modules, save_adapter
    from .plot import write_loss_png

    adapter_file = Path(args.adapter_file)
    folder = adapter_file.parent
    folder.mkdir(parents=True, exist_ok=True)
    suffix = adapter_file.suffix
    metrics_file, plot_file = folder / "metrics.jsonl", folder / "loss.png"
    parts = model_parts(model)
    gather = parts.body is not None
    pack = args.pack and parts.packing
    if args.pack and not parts.packing and verbose:
        print("note: this architecture's attention cannot take a packed mask; training unpacked", flush=True)
    fingerprint = _settings_fingerprint(args, sorted(lora_modules(model)), base_model)
    result = TrainResult(adapter_file=adapter_file, metrics_file=metrics_file, plot_file=plot_file if args.plot else None)

    start, found = 0, []
    if args.resume:
        found = find_checkpoints(folder)
        if not found and adapter_file.exists():
            # An adapter without optimizer state (e.g. mlx-lm's adapters.safetensors): start from its weights.
            _warm_start(model, adapter_file)
            if verbose:
                print(f"note: {folder} has no checkpoint with optimizer state; starting from the weights in "
                      f"{adapter_file} at iteration 0", flush=True)
        elif not found:
            raise ConfigError(f"--resume: no checkpoint (NNNNNNN_adapters{suffix} + NNNNNNN_state.npz) and no "
                              f"{adapter_file.name} in {folder}; train without --resume first")
    if args.resume and found:
        start, ckpt, state_file = found[-1]
        with np.load(state_file) as data:
            old = json.loads(str(data["meta"])).get("settings", {})
        diff = [k for k in fingerprint if old.get(k) != fingerprint[k]]
        if diff:
            k = diff[0]
            hint = " (a decaying --lr-schedule is tied to --iters; train longer with --lr-schedule constant)" if k == "iters" else ""
            raise ConfigError(f"--resume: the checkpoint {ckpt} was trained with {k}={old.get(k)!r} but this run has "
                              f"{k}={fingerprint[k]!r}: use the same settings, or pass a new --adapter-file{hint}")
        meta = load_checkpoint(model, optimizer, ckpt, state_file)
        result.trained_tokens = int(meta.get("trained_tokens", 0))
        if start >= args.iters:
            raise ConfigError(f"--resume: the newest checkpoint {ckpt} is already at iteration {start}; "
                              f"pass a larger --iters to continue")
        kept = []
        if metrics_file.exists():  # drop reports the killed run made after its last checkpoint
            for text in metrics_file.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    entry = json.loads(text)
                    if entry.get("iteration", 0) <= start:
                        kept.append(text)
                        (result.val_loss if "val_loss" in entry else result.train_loss).append(
                            (entry["iteration"], entry.get("val_loss", entry.get("train_loss"))))
        write_text_atomic(metrics_file, "".join(t + "\n" for t in kept))
    if not (args.resume and found):
        if metrics_file.exists():
            metrics_file.unlink()
        for _, a, s in find_checkpoints(folder):  # stale checkpoints of a replaced run (the user passed --force)
            a.unlink()
            s.unlink()

    if args.grad_checkpoint:
        _checkpoint_blocks(model)
    model.train()
    log = _Log(verbose, metrics_file)
    accum = args.grad_accumulation
    clip = args.max_grad_norm

    state = [model.state, optimizer.state, mx.random.state]
    value_and_grad = nn.value_and_grad(model, lambda m, *arrays: _call_loss(m, parts, list(arrays), gather))

    def finish(grads, n):
        grads = tree_map(lambda g: g / mx.maximum(n, 1), grads)
        if clip > 0:
            grads, norm = optim.clip_grad_norm(grads, clip)
        else:
            norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
        optimizer.update(model, grads)
        return norm

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*arrays):
        (total, n), grads = value_and_grad(model, *arrays)
        return total, n, finish(grads, n)

    @partial(mx.compile, inputs=state, outputs=state)
    def accumulate(acc, *arrays):
        (total, n), grads = value_and_grad(model, *arrays)
        return total, n, tree_map(mx.add, acc, grads)

    @partial(mx.compile, inputs=state, outputs=state)
    def apply(acc, n):
        return finish(acc, n)

    def run_step(batch) -> tuple[mx.array, mx.array, mx.array]:
        if accum == 1:
            arrays, _ = prepare_batch(batch, gather)
            return step(*arrays)
        rows = np.asarray(batch.inputs).shape[0]
        size = -(-rows // accum)
        acc = tree_map(mx.zeros_like, model.trainable_parameters())
        total, n = mx.array(0.0), mx.array(0.0)
        for lo in range(0, rows, size):
            micro = _slice_batch(batch, lo, lo + size)
            arrays, _ = prepare_batch(micro, gather)
            t, c, acc = accumulate(acc, *arrays)
            total, n = total + t, n + c
        return total, n, apply(acc, n)

    def validate(it: int) -> None:
        if not valid_records:
            return
        tic = time.perf_counter()
        loss = evaluate_loss(model, valid_records, args.batch_size, args.max_seq_length, args.val_batches)
        took = time.perf_counter() - tic
        log.line(f"Iter {it}: Val loss {loss:.3f}, Val took {took:.1f}s")
        report = {"iteration": it, "val_loss": loss, "val_time": took}
        log.record(report)
        result.val_loss.append((it, loss))
        if args.plot:
            write_loss_png(plot_file, result.train_loss, result.val_loss)
        if _wants_stop(callbacks, report):
            raise _Stop()

    def checkpoint(it: int) -> None:
        meta = {"iteration": it, "trained_tokens": result.trained_tokens, "settings": fingerprint}
        ck = save_checkpoint(model, optimizer, folder, it, meta, adapter_config, suffix)
        save_adapter(model, adapter_file, adapter_config)
        log.line(f"Iter {it}: Saved adapter weights to {adapter_file} and {ck}.")

    def last_good() -> str:
        found = find_checkpoints(folder)
        if not found:
            return "no checkpoint was saved yet"
        it, ck, _ = found[-1]
        model.load_weights(list(_read_weights(ck).items()), strict=False)
        return f"the last good checkpoint is {ck} (iteration {it}), also loaded back into the model"

    from tqdm.auto import tqdm

    # Packed rows are up to max_seq_length long (attention cost grows with its square: keep it near the
    # longest example rather than at the 2048 default when packing short examples).
    batches = iterate_batches(train_records, args.batch_size * accum, max_seq_length=args.max_seq_length,
                              seed=args.seed, start_step=start, loop=True, shuffle=True, pack=pack)
    window_loss, window_tokens, window_real, window_steps, window_time = 0.0, 0.0, 0, 0, 0.0
    it = start
    mx.reset_peak_memory()
    if start == 0 and args.steps_per_eval > 0 and args.iters > 0:
        try:
            validate(0)
        except _Stop:
            result.stopped_early = True
    bar = tqdm(total=args.iters, initial=start, desc="Training", unit="it", disable=not verbose or result.stopped_early,
               dynamic_ncols=True, leave=False)
    log.bar = bar
    try:
        while it < args.iters and not result.stopped_early:
            batch = next(batches)
            it += 1
            mx.random.seed(args.seed * 1_000_003 + it)  # dropout noise is a function of (seed, step): exact resume
            tic = time.perf_counter()
            total, n, norm = run_step(batch)
            mx.eval(state, total, n, norm)
            window_time += time.perf_counter() - tic
            loss_sum, count = total.item(), n.item()
            if not (math.isfinite(loss_sum) and math.isfinite(norm.item())):
                raise TrainingError(
                    f"training stopped at iteration {it}: the {'loss' if not math.isfinite(loss_sum) else 'gradient'} "
                    f"became non-finite; {last_good()}. Try a lower --learning-rate (now {args.learning_rate:g})"
                    f"{', --max-grad-norm 1.0' if clip == 0 else ''} or a warmup (--warmup 50)")
            real = int(getattr(batch, "n_real", 0) or 0)
            window_loss, window_tokens, window_real, window_steps = window_loss + loss_sum, window_tokens + count, window_real + real, window_steps + 1
            result.trained_tokens += real
            bar.update(1)
            if it % args.steps_per_report == 0 or it == args.iters:
                train_loss = window_loss / max(window_tokens, 1)
                lr = optimizer.learning_rate.item()
                report = {"iteration": it, "train_loss": train_loss, "learning_rate": lr,
                          "iterations_per_second": window_steps / window_time, "tokens_per_second": window_real / window_time,
                          "trained_tokens": result.trained_tokens, "peak_memory": mx.get_peak_memory() / 1e9}
                log.line(f"Iter {it}: Train loss {train_loss:.3f}, Learning Rate {lr:.3e}, "
                         f"It/sec {report['iterations_per_second']:.3f}, Tokens/sec {report['tokens_per_second']:.0f}, "
                         f"Trained Tokens {result.trained_tokens}, Peak mem {report['peak_memory']:.3f} GB")
                bar.set_postfix(loss=f"{train_loss:.3f}")
                log.record(report)
                result.train_loss.append((it, train_loss))
                window_loss, window_tokens, window_real, window_steps, window_time = 0.0, 0.0, 0, 0, 0.0
                if _wants_stop(callbacks, report):
                    result.stopped_early = True
            if not result.stopped_early and (it == args.iters or (args.steps_per_eval and it % args.steps_per_eval == 0)):
                try:
                    validate(it)
                except _Stop:
                    result.stopped_early = True
            if args.save_every and it % args.save_every == 0 and it < args.iters:
                checkpoint(it)
    finally:
        bar.close()
        log.bar = None
    result.iterations = it
    save_adapter(model, adapter_file, adapter_config)
    if args.plot:
        write_loss_png(plot_file, result.train_loss, result.val_loss)
    if args.save_every and it % args.save_every == 0:  # the final step is a checkpoint too (resume can extend it)
        meta = {"iteration": it, "trained_tokens": result.trained_tokens, "settings": fingerprint}
        save_checkpoint(model, optimizer, folder, it, meta, adapter_config, suffix)
    log.line(f"{'Stopped early at iteration ' + str(it) + '. ' if result.stopped_early else ''}"
             f"Saved final adapter weights to {adapter_file}.")
    return result


class _Stop(Exception):
    """A callback asked to stop (raised out of validation, caught by the loop)."""


def _slice_batch(batch, lo: int, hi: int):
    """Rows lo:hi of a Batch (for gradient accumulation); n_real is recounted from the rows."""
    seg = None if batch.segments is None else np.asarray(batch.segments)[lo:hi]
    inputs = np.asarray(batch.inputs)[lo:hi]
    return dataclasses.replace(batch, inputs=inputs, targets=np.asarray(batch.targets)[lo:hi],
                               loss_mask=np.asarray(batch.loss_mask)[lo:hi], segments=seg)


# ------------------------------------------------------------------------------------ public API
def _resolve_defaults(model, data, config) -> tuple[Any, Any, dict | None, str | None]:
    """No model and no data: the bundled demo (with its YAML settings); exactly one of them: an error."""
    if model is None and data is None:
        from .defaults import DEFAULT_LORA_CONFIG, HINT, require_bundled

        m, d = require_bundled()
        base = read_config_file(DEFAULT_LORA_CONFIG) if DEFAULT_LORA_CONFIG.exists() else {}
        base.pop("model", None)
        base.pop("data", None)
        note = (f"Training the bundled demo model {m} on the tool-call data in {d} (a small demo): {HINT}")
        return str(m), str(d), base, note
    if model is None:
        raise ConfigError("--data was given but no --model: pass --model (a directory or a hub id like mlx-community/...)")
    if data is None:
        raise ConfigError("--model was given but no --data: pass --data DIR (train.jsonl, valid.jsonl) or a .jsonl file")
    return model, data, None, None


def lora(model: Any = None, data: Any = None, *, tokenizer: Any = None, config: str | os.PathLike | None = None,
         callbacks: Iterable[Callable] = (), verbose: bool = True, **kwargs) -> TrainResult:
    """Fine-tune `model` on `data` with LoRA (QLoRA when the model is quantized); returns a TrainResult.

    `model` is a path or hub id, or an already loaded mlx-lm model (then pass `tokenizer` too; it is
    trained in place and carries the adapter afterwards, ready for `mlxtune.generate`). Keyword
    arguments are TrainingArgs names (`iters=200, batch_size=8, lora_layers=8, ...`); `config` is a YAML
    file of the same names, which the keywords override. With neither model nor data, the bundled demo
    runs. Each callback gets every report dict (train and val) and may return True to stop training.
    """
    from .lora import AdapterConfig, apply_lora, count_parameters, load_adapter
    from .models import load_model

    preloaded = isinstance(model, nn.Module)
    explicit = {k: v for k, v in kwargs.items() if v is not None}
    if config is not None:
        file_values = read_config_file(config)
        model = model if model is not None else file_values.get("model")
        data = data if data is not None else file_values.get("data")
    model_arg, data_arg, base, note = _resolve_defaults(model, data, config)
    args = training_args(config, base=base, **explicit,
                         **({} if preloaded else {"model": str(model_arg)}),
                         data=data_arg if isinstance(data_arg, (str, os.PathLike)) else None)
    lora_layers_explicit = "lora_layers" in _normalize_keys(explicit, "argument") or (
        config is not None and "lora_layers" in read_config_file(config))
    say = (lambda text: print(text, flush=True)) if verbose else (lambda text: None)
    if note:
        say(note)

    adapter_file = Path(args.adapter_file)
    test_only = args.test and "iters" not in explicit and adapter_file.exists() and not args.resume
    if not test_only and adapter_file.exists() and not args.resume and not args.force:
        raise ConfigError(f"{adapter_file} already exists: pass --resume to continue it, --force to replace it, "
                          "or choose another --adapter-file")

    if preloaded:
        if tokenizer is None:
            raise ConfigError("a loaded model needs its tokenizer: call mlxtune.lora(model, data, tokenizer=tokenizer)")
        base_model = getattr(model, "_mlxtune_base", None)
    else:
        loaded = load_model(args.model)
        model, tokenizer = loaded.model, loaded.tokenizer
        base_model = args.model if not Path(args.model).expanduser().exists() else str(Path(args.model).expanduser().resolve())

    from .data import load_dataset

    splits = load_dataset(data_arg, tokenizer, valid_split=args.valid_split, test_split=args.test_split, seed=args.seed,
                          max_seq_length=args.max_seq_length, train_on_inputs=args.train_on_inputs,
                          chat_template=args.chat_template, prompt_key=args.prompt_key,
                          completion_key=args.completion_key, text_key=args.text_key,
                          messages_key=args.messages_key, cache=True)
    say(f"Data: {splits.summary()}")

    if test_only:
        adapter_config = load_adapter(model, adapter_file)
        say(f"Evaluating {adapter_file} on the test set (no training: pass --iters to train).")
        result = TrainResult(adapter_file=adapter_file)
        _run_test(model, splits.test, args, result, say)
        return result

    mx.random.seed(args.seed)
    adapter_config: AdapterConfig = apply_lora(model, lora_layers=args.lora_layers, rank=args.rank, alpha=args.alpha,
                                               dropout=args.dropout, target_modules=args.target_modules,
                                               explicit_layers=lora_layers_explicit)
    adapter_config.base_model = base_model
    trainable, total = count_parameters(model)
    say(f"Trainable parameters: {100 * trainable / max(total, 1):.3f}% ({_fmt_count(trainable)}/{_fmt_count(total)})")

    needed = args.batch_size * args.grad_accumulation
    if args.iters > 0 and len(splits.train) < needed:
        raise ConfigError(f"--batch-size {args.batch_size}{f' x --grad-accumulation {args.grad_accumulation}' if args.grad_accumulation > 1 else ''} "
                          f"needs at least {needed} training examples but {data_arg} has {len(splits.train)}: lower --batch-size or add data")
    callbacks = list(callbacks)
    if args.report_to == "wandb":
        callbacks.append(_wandb_callback(args))
    if args.iters > 0:
        from .data import padding_fraction

        pad = padding_fraction(splits.train, needed, max_seq_length=args.max_seq_length, seed=args.seed, pack=args.pack)
        say(f"Batches: {100 * pad:.0f}% padding ({'packed rows' if args.pack else 'length-bucketed'}; "
            f"{'--no-pack' if args.pack else '--pack'} to compare)")
    optimizer = make_optimizer(args)
    result = train(model, optimizer, splits.train, splits.valid, args, adapter_config=adapter_config,
                   callbacks=callbacks, verbose=verbose, base_model=base_model)
    if args.test:
        _run_test(model, splits.test, args, result, say)
    return result


def _wandb_callback(args: TrainingArgs) -> Callable:
    # Opt-in only: nothing leaves the machine unless the user asks for it with --report-to wandb.
    try:
        import wandb
    except ImportError:
        raise ConfigError("--report-to wandb needs the wandb package: pip install wandb (or drop --report-to)") from None
    wandb.init(project="mlxtune", config=dataclasses.asdict(args))
    return lambda report: wandb.log(report, step=report["iteration"])


def _run_test(model, records, args: TrainingArgs, result: TrainResult, say) -> None:
    if not records:
        raise DataError(f"--test: the dataset {args.data} has no test split (add test.jsonl, or set --test-split)")
    loss = evaluate_loss(model, records, args.batch_size, args.max_seq_length, args.test_batches)
    result.test_loss, result.test_perplexity = loss, math.exp(min(loss, 700.0))
    say(f"Test loss {loss:.3f}, Test ppl {result.test_perplexity:.3f}.")


__all__ = ["TrainingArgs", "TrainResult", "training_args", "lora", "train", "loss_fn", "evaluate_loss",
           "model_parts", "prepare_batch", "make_optimizer", "read_config_file", "find_checkpoints",
           "MlxtuneError"]
