"""The MLX engine: one compiled training step, evaluation, optimizer and state as numpy, for the shared loop.

`mlxtune.loop` drives training without knowing the framework; this module is what it drives on MLX
(a torch engine offers the same methods). The one thing to know: each iteration is ONE graph (forward,
loss, backward, gradient accumulation, clipping, optimizer update) built lazily, compiled with `mx.compile`
over the model, optimizer and RNG state, and evaluated once. The loss is a parameter (`token_loss` by
default, see `mlxtune.loss`), so another objective plugs in without another loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .adapters import AdapterConfig, check_fits, model_adapter_arrays
from .layers import transformer_blocks
from .loss import evaluate_loss, model_parts, prepare_batch, token_loss
from .schedule import learning_rate_at
from .settings import TrainingArgs


def make_optimizer(args: TrainingArgs) -> optim.Optimizer:
    """The optimizer; its learning rate is set before every step from `mlxtune.schedule` (see MLXEngine.step)."""
    lr = learning_rate_at(args, 1)
    if args.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return optim.Adam(learning_rate=lr)
    return optim.SGD(learning_rate=lr, weight_decay=args.weight_decay)


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing: each transformer block recomputes its activations in the backward pass.

    Done per instance (a subclass swapped in), so other models of the same class are not affected.
    """
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


def _slice_batch(batch, lo: int, hi: int):
    """Rows lo:hi of a Batch (for gradient accumulation)."""
    seg = None if batch.segments is None else batch.segments[lo:hi]
    return dataclasses.replace(batch, inputs=batch.inputs[lo:hi], targets=batch.targets[lo:hi],
                               loss_mask=batch.loss_mask[lo:hi], segments=seg)


class MLXEngine:
    """Trains the LoRA layers `model` carries with `optimizer`; what `mlxtune.loop.train` calls on MLX."""

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, args: TrainingArgs, *,
                 loss: Callable = token_loss):
        self.model, self.optimizer, self.args = model, optimizer, args
        self.parts = model_parts(model)
        self.gather = self.parts.body is not None
        self.packing = self.parts.packing
        self.name = f"mlx ({'gpu' if mx.default_device() == mx.gpu else 'cpu'})"
        if args.grad_checkpoint:
            checkpoint_blocks(model)
        model.train()
        self._state = [model.state, optimizer.state, mx.random.state]
        value_and_grad = nn.value_and_grad(model, lambda m, *arrays: loss(m, self.parts, list(arrays), self.gather))
        clip = args.max_grad_norm

        def finish(grads, n):
            grads = tree_map(lambda g: g / mx.maximum(n, 1), grads)
            if clip > 0:
                grads, norm = optim.clip_grad_norm(grads, clip)
            else:
                norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
            optimizer.update(model, grads)
            return norm

        @partial(mx.compile, inputs=self._state, outputs=self._state)
        def step(*arrays):
            (total, n), grads = value_and_grad(model, *arrays)
            return total, n, finish(grads, n)

        @partial(mx.compile, inputs=self._state, outputs=self._state)
        def accumulate(acc, *arrays):
            (total, n), grads = value_and_grad(model, *arrays)
            return total, n, tree_map(mx.add, acc, grads)

        @partial(mx.compile, inputs=self._state, outputs=self._state)
        def apply(acc, n):
            return finish(acc, n)

        self._step, self._accumulate, self._apply = step, accumulate, apply

    def step(self, batch, iteration: int) -> tuple[float, float, float]:
        """One optimizer step on `batch`: (sum of token losses, target tokens, gradient norm before clipping)."""
        mx.random.seed(self.args.seed * 1_000_003 + iteration)  # dropout noise is a function of (seed, step): exact resume
        self.optimizer.learning_rate = learning_rate_at(self.args, iteration)
        accum = self.args.grad_accumulation
        if accum == 1:
            arrays = prepare_batch(batch, self.gather)
            total, n, norm = self._step(*arrays)
        else:
            rows = batch.inputs.shape[0]
            size = -(-rows // accum)
            acc = tree_map(mx.zeros_like, self.model.trainable_parameters())
            total, n = mx.array(0.0), mx.array(0.0)
            for lo in range(0, rows, size):
                arrays = prepare_batch(_slice_batch(batch, lo, lo + size), self.gather)
                t, c, acc = self._accumulate(acc, *arrays)
                total, n = total + t, n + c
            norm = self._apply(acc, n)
        mx.eval(self._state, total, n, norm)
        return total.item(), n.item(), norm.item()

    def evaluate(self, records, num_batches: int = -1) -> float:
        return evaluate_loss(self.model, records, self.args.batch_size, self.args.max_seq_length, num_batches)

    def learning_rate(self) -> float:
        return self.optimizer.learning_rate.item()

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def peak_memory(self) -> float:
        """Peak memory in GB since the last reset."""
        return mx.get_peak_memory() / 1e9

    def adapter_arrays(self) -> dict[str, np.ndarray]:
        return model_adapter_arrays(self.model)

    def optimizer_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in tree_flatten(self.optimizer.state)}

    def load_adapter_arrays(self, weights: dict, source: str) -> None:
        """Put saved LoRA tensors into the model, after checking they fit its LoRA layers."""
        check_fits(self.model, AdapterConfig.of_model(self.model), weights, source)
        self.model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=False)
        mx.eval(self.model.parameters())

    def load_optimizer_arrays(self, state: dict[str, np.ndarray]) -> None:
        self.optimizer.init(self.model.trainable_parameters())
        tree = self.optimizer.state
        for k, v in state.items():
            _set_path(tree, k.split("."), mx.array(v).astype(mx.uint64) if k == "step" else mx.array(v))
        mx.eval(self.optimizer.state)


def _set_path(tree, path: list[str], value) -> None:
    for k in path[:-1]:
        tree = tree[int(k)] if isinstance(tree, list) else tree[k]
    last = path[-1]
    if isinstance(tree, list):
        tree[int(last)] = value
    else:
        tree[last] = value
