"""Checkpoints of a training run and resuming from them, exactly.

A checkpoint is two files beside the adapter: `NNNNNNN_adapters.npz` (the LoRA tensors, same layout as the
adapter) and `NNNNNNN_state.npz` (the optimizer state as numpy arrays, its step count included so the
learning-rate schedule continues, and a JSON `meta` with the iteration, trained tokens and a fingerprint of
the settings, the data and the chat template). The state file is written first: a checkpoint counts only
once both files are complete. Every file of a run is named after its adapter file (`RunFiles`), so runs
can share a folder: `run2.npz` has `0000100_run2.npz`, `0000100_run2.state.npz`, `run2.metrics.jsonl`.
The one thing to know: the data order and the dropout noise are functions of (seed, iteration), so loading
a checkpoint and continuing repeats the uninterrupted run bit for bit; the fingerprint refuses a resume
whose settings would break that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .adapters import DEFAULT_STEM, config_path, read_adapter, read_weights, run_stem, write_adapter_files
from .errors import ConfigError
from .files import atomic_file, write_text_atomic
from .settings import TrainingArgs

# Settings that change what an iteration computes; a resumed run must have the same ones.
FINGERPRINT_KEYS = ["rank", "alpha", "dropout", "target_modules", "batch_size", "grad_accumulation", "learning_rate",
                    "lr_schedule", "lr_end", "lr_decay_steps", "warmup", "optimizer", "weight_decay", "max_grad_norm",
                    "max_seq_length", "pack", "train_on_inputs", "seed"]


# What a checkpoint without the key ran with, where the default has changed since: batch_order was written
# only when not `length`, its default until random batches proved to train better.
ABSENT = {"batch_order": "length"}


def settings_fingerprint(args: TrainingArgs, adapter_modules: list[str], base: str | None, *,
                         data: str | None = None, template: str | None = None) -> dict:
    """What a resumed run must share with its checkpoint: settings, modules, base, data and template identity."""
    keys = list(FINGERPRINT_KEYS)
    if args.lr_schedule != "constant" and not args.lr_decay_steps:
        keys.append("iters")  # the decay length depends on it
    if args.bias_correction:
        keys.append("bias_correction")  # only when set, like quantize below
    if not args.pack:
        keys.append("batch_order")  # --pack fills rows from a random order whatever it says
    if args.quantize:
        keys.append("quantize")  # a 4-bit base computes other losses (only when set: older checkpoints lack the key)
    fp = {k: getattr(args, k) for k in keys}
    fp["modules"] = sorted(adapter_modules)
    fp["base_model"] = base
    fp["data"] = data
    fp["template"] = template
    return fp


@dataclass(frozen=True)
class RunFiles:
    """Every file of one training run, named after its adapter file (the default `adapters` keeps the
    short names mlx-lm users know: metrics.jsonl, loss.png, NNNNNNN_adapters.npz, NNNNNNN_state.npz)."""

    adapter: Path

    @property
    def folder(self) -> Path:
        return self.adapter.parent

    @property
    def stem(self) -> str:
        return run_stem(self.adapter)

    def _named(self, name: str) -> Path:
        return self.folder / (name if self.stem == DEFAULT_STEM else f"{self.stem}.{name}")

    @property
    def metrics(self) -> Path:
        return self._named("metrics.jsonl")

    @property
    def plot(self) -> Path:
        return self._named("loss.png")

    @property
    def config(self) -> Path:
        return config_path(self.adapter)

    def checkpoint(self, it: int) -> Path:
        return self.folder / f"{it:07d}_{self.stem}{self.adapter.suffix}"

    def state(self, it: int) -> Path:
        return self.folder / f"{it:07d}_{'state' if self.stem == DEFAULT_STEM else self.stem + '.state'}.npz"

    def checkpoints(self) -> list[tuple[int, Path, Path]]:
        """(iteration, adapter, state) for every complete checkpoint of this run, oldest first."""
        pattern = re.compile(rf"^(\d{{7}})_{re.escape(self.stem)}\.(npz|safetensors)$")
        out = []
        if self.folder.is_dir():
            for f in self.folder.iterdir():
                m = pattern.match(f.name)
                if m and self.state(int(m.group(1))).exists():
                    out.append((int(m.group(1)), f, self.state(int(m.group(1)))))
        return sorted(out)


def save_checkpoint(files: RunFiles, it: int, adapter: dict[str, np.ndarray], optimizer: dict[str, np.ndarray],
                    meta: dict) -> Path:
    """State first, adapter second, each atomically. Returns the adapter file of the checkpoint."""
    state = {f"opt.{k}": v for k, v in optimizer.items()}
    state["meta"] = np.array(json.dumps(meta))
    with atomic_file(files.state(it), suffix=".npz") as tmp:
        np.savez(tmp, **state)
    return write_adapter_files(files.checkpoint(it), adapter, None)


def read_state(state_file: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(optimizer arrays, meta) of a checkpoint's state file."""
    with np.load(state_file) as data:
        meta = json.loads(str(data["meta"]))
        optimizer = {k[4:]: data[k] for k in data.files if k.startswith("opt.")}
    return optimizer, meta


@dataclass
class Resume:
    """Where a resumed run starts: the weights (and optimizer state) to load and the iteration."""

    iteration: int
    adapter: dict  # LoRA tensors by name
    optimizer: dict[str, np.ndarray] | None  # None: weights only (an adapter without a checkpoint)
    source: Path
    trained_tokens: int = 0
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)


# Fingerprint keys with a message of their own (the others are plain settings).
# A template change changes the token ids too, so it is named first.
IDENTITY = {
    "template": "another chat template (or none): resume with the same --chat-template and tokenizer",
    "data": "other training data (its examples or their token ids differ): resume with the same --data and "
            "tokenizer",
}


def resume_point(args: TrainingArgs, fingerprint: dict, files: RunFiles) -> Resume:
    """The newest checkpoint of this run (or the adapter's own weights when there is none).

    Refuses, with one line each: no checkpoint and no adapter, settings, data or chat template that differ
    from the checkpoint's, and a checkpoint already at or past `args.iters`. Metrics the interrupted run wrote
    after its last checkpoint are dropped, so metrics.jsonl reads as if the run had never stopped.
    """
    found = files.checkpoints()
    if not found:
        if not files.adapter.exists():
            raise ConfigError(f"--resume: no checkpoint ({files.checkpoint(0).name.replace('0000000', 'NNNNNNN')} + "
                              f"{files.state(0).name.replace('0000000', 'NNNNNNN')}) and no {files.adapter.name} in "
                              f"{files.folder}; train without --resume first")
        # An adapter without optimizer state (e.g. mlx-lm's adapters.safetensors): start from its weights.
        _, weights = read_adapter(files.adapter)
        return Resume(0, weights, None, files.adapter)
    start, ckpt, state_file = found[-1]
    optimizer, meta = read_state(state_file)
    old = meta.get("settings", {})
    # A setting newer than the checkpoint is absent from it: the checkpoint ran with that setting's default
    # at the time, which is today's default unless ABSENT says otherwise.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainingArgs)} | ABSENT
    diff = [k for k in fingerprint if old.get(k, defaults.get(k, fingerprint[k])) != fingerprint[k]]
    identity = [k for k in IDENTITY if k in diff]
    if identity:
        raise ConfigError(f"--resume: the checkpoint {ckpt} was trained on {IDENTITY[identity[0]]}, "
                          "or pass a new --adapter-file")
    if diff:
        k = diff[0]
        hint = " (a decaying --lr-schedule is tied to --iters; train longer with --lr-schedule constant)" if k == "iters" else ""
        was = old.get(k, defaults.get(k))
        raise ConfigError(f"--resume: the checkpoint {ckpt} was trained with {k}={was} but this run has "
                          f"{k}={fingerprint[k]}: use the same settings, or pass a new --adapter-file{hint}")
    if start >= args.iters:
        raise ConfigError(f"--resume: the newest checkpoint {ckpt} is already at iteration {start}; "
                          f"pass a larger --iters to continue")
    resume = Resume(start, read_weights(ckpt), optimizer, ckpt, int(meta.get("trained_tokens", 0)))
    resume.train_loss, resume.val_loss = rewind_metrics(files.metrics, start)
    return resume


def rewind_metrics(metrics_file: Path, upto: int) -> tuple[list, list]:
    """Keep only the reports up to iteration `upto` in metrics.jsonl; return (train_loss, val_loss) from them."""
    kept, train, val = [], [], []
    if metrics_file.exists():
        for text in metrics_file.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(text)
                if entry.get("iteration", 0) <= upto:
                    kept.append(text)
                    (val if "val_loss" in entry else train).append(
                        (entry["iteration"], entry.get("val_loss", entry.get("train_loss"))))
    write_text_atomic(metrics_file, "".join(t + "\n" for t in kept))
    return train, val


def clear_run(files: RunFiles) -> None:
    """Remove a replaced run's metrics and checkpoints (the user passed --force); other runs' files stay."""
    if files.metrics.exists():
        files.metrics.unlink()
    for _, adapter, state in files.checkpoints():
        adapter.unlink()
        state.unlink()
