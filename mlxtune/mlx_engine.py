"""The MLX engine: one compiled training step, evaluation, optimizer and state as numpy, for the shared loop.

`mlxtune.loop` drives training without knowing the framework; this module is what it drives on MLX
(a torch engine offers the same methods). The one thing to know: each iteration is ONE graph (forward,
loss, backward, gradient accumulation, clipping, optimizer update) built lazily, compiled with `mx.compile`
over the model, optimizer and RNG state, and evaluated once. The loss is a parameter (`token_loss` by
default, see `mlxtune.loss`), so another objective plugs in without another loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .adapters import AdapterConfig, check_fits, model_adapter_arrays
from .cpu_memory import keep_freed_memory
from .data import micro_batches
from .dequantized import compute_dequantized, on_cpu
from .distributed import World, rows_of
from .errors import TrainingError
from .fast_exp import cpu_swaps
from .layers import lora_modules, transformer_blocks
from .loss import evaluate_sums, model_parts, prepare_batch, token_loss
from .schedule import learning_rate_at
from .settings import TrainingArgs


def make_optimizer(args: TrainingArgs) -> optim.Optimizer:
    """The optimizer; its learning rate is set before every step from `mlxtune.schedule` (see MLXEngine.step)."""
    lr = learning_rate_at(args, 1)
    if args.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=args.weight_decay, bias_correction=args.bias_correction)
    if args.optimizer == "adam":
        return optim.Adam(learning_rate=lr, bias_correction=args.bias_correction)
    return optim.SGD(learning_rate=lr, weight_decay=args.weight_decay)


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing: each transformer block recomputes its activations in the backward pass.

    Done per instance (a subclass swapped in), so other models of the same class are not affected.
    """
    model_parts(model).checkpointed = True  # (so the sliced head projects again too: loss.head_kept)
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


class MLXWorld(World):
    """`mx.distributed` (ring over TCP/Thunderbolt, JACCL, MPI, NCCL): what `mlx.launch` sets up."""

    def __init__(self, group, backend: str):
        self.group, self.backend = group, backend
        self.rank, self.size = group.rank(), group.size()

    def _run(self, fn, values: np.ndarray) -> np.ndarray:
        try:
            out = fn(mx.array(np.asarray(values)), group=self.group, stream=mx.cpu)
            mx.eval(out)
        except RuntimeError as e:  # the ring backend's "connection to a peer was lost" when a rank dies
            raise self.lost(e) from None
        return np.array(out)

    def all_sum(self, values):
        return self._run(mx.distributed.all_sum, values)

    def all_max(self, values):
        return self._run(mx.distributed.all_max, values)

    def all_gather(self, values):
        values = np.asarray(values)
        return self._run(mx.distributed.all_gather, values[None]).reshape(self.size, *values.shape)

    def broadcast(self, arrays, like):
        # a sum in which only rank 0 brings something: rank 0's arrays everywhere, exactly
        return {k: self.all_sum(np.asarray(arrays[k]) if self.main else np.zeros_like(np.asarray(ref)))
                for k, ref in like.items()}

    def lost(self, error):
        self.stopping = True
        others = sorted({(self.rank - 1) % self.size, (self.rank + 1) % self.size} - {self.rank})
        who = " or ".join(f"rank {r}" for r in others)
        return TrainingError(f"rank {self.rank}: the connection to {who} was lost ({error}): that rank stopped or "
                             "died; the others stop too. Resume all ranks with --resume (any number of ranks that "
                             "divides --batch-size)")


def mlx_world() -> World:
    """The world `mlx.launch` started this process in, or a single process."""
    group = mx.distributed.init()
    if group.size() == 1:
        return World()
    world = MLXWorld(group, _backend_name())
    world.stop_on_sigterm("mlx.launch")
    return world


def _backend_name() -> str:
    # mlx.launch says little about the backend it chose: read the traces each one leaves in the environment
    env = os.environ
    if "MLX_IBV_DEVICES" in env or "MLX_JACCL_COORDINATOR" in env:
        return "jaccl"
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return "mpi"
    if "NCCL_HOST_IP" in env or "MLX_NCCL" in env:
        return "nccl"
    return "ring"


class MLXEngine:
    """Trains the LoRA layers `model` carries with `optimizer`; what `mlxtune.loop.train` calls on MLX.

    With a multi-process `world` each rank takes rows `rank::size` of every global batch, and the loss sums,
    token counts and gradients are summed over the ranks inside the compiled step, before the update.
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, args: TrainingArgs, *,
                 loss: Callable = token_loss, world: World | None = None):
        self.model, self.optimizer, self.args = model, optimizer, args
        self.world = world or World()
        self.parts = model_parts(model)
        self.gather = self.parts.body is not None
        self.packing = self.parts.packing
        # A shared prefix runs once for every row: same loss and gradients, less work. Not under checkpointing
        # (the cache would hold arrays from inside mx.checkpoint) nor with LoRA dropout (one noise draw would
        # serve every row's prefix, where each row should get its own).
        self.share = (args.share_prefix and self.parts.prefixed is not None and not args.grad_checkpoint
                      and not any(m.dropout_p > 0 for m in lora_modules(model).values()))
        self.stage = self.share and self.parts.staged  # rows of mixed lengths skip their padding (`loss._stages`)
        self.name = f"mlx ({'gpu' if mx.default_device() == mx.gpu else 'cpu'})"
        if on_cpu():  # a model loaded elsewhere (mlx_lm.load) gets the CPU's fast QLoRA path too
            compute_dequantized(model)
            keep_freed_memory()
        if args.grad_checkpoint:
            checkpoint_blocks(model)
        model.train()
        self._state = [model.state, optimizer.state, mx.random.state]
        loss_and_grad = nn.value_and_grad(model, lambda m, *arrays: loss(m, self.parts, list(arrays), self.gather))

        def value_and_grad(*arrays):
            with cpu_swaps(model):  # entered while tracing: every new shape's trace takes it too
                return loss_and_grad(model, *arrays)

        clip = args.max_grad_norm
        group = getattr(self.world, "group", None)

        def everywhere(total, n, grads):
            # one all-sum of every gradient, flattened together, plus the loss sum and the token count
            if group is None:
                return total, n, grads
            flat = tree_flatten(grads)
            packed = mx.concatenate([total.reshape(1).astype(mx.float32), n.reshape(1).astype(mx.float32)]
                                    + [g.reshape(-1).astype(mx.float32) for _, g in flat])
            summed = mx.distributed.all_sum(packed, group=group)
            out, at = [], 2
            for k, g in flat:
                out.append((k, summed[at:at + g.size].reshape(g.shape).astype(g.dtype)))
                at += g.size
            return summed[0], summed[1], tree_unflatten(out)

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
            (total, n), grads = value_and_grad(*arrays)
            total, n, grads = everywhere(total, n, grads)
            return total, n, finish(grads, n)

        @partial(mx.compile, inputs=self._state, outputs=self._state)
        def accumulate(acc, *arrays):
            (total, n), grads = value_and_grad(*arrays)
            return total, n, tree_map(mx.add, acc, grads)

        @partial(mx.compile, inputs=self._state, outputs=self._state)
        def apply(acc, total, n):
            total, n, acc = everywhere(total, n, acc)
            return total, n, finish(acc, n)

        self._step, self._accumulate, self._apply = step, accumulate, apply

    def step(self, batch, iteration: int) -> tuple[float, float, float]:
        """One optimizer step on the global `batch`: (sum of token losses, target tokens, gradient norm before
        clipping), over every rank."""
        mx.random.seed(self.args.seed * 1_000_003 + iteration)  # dropout noise is a function of (seed, step): exact resume
        self.optimizer.learning_rate = learning_rate_at(self.args, iteration)
        world, accum = self.world, self.args.grad_accumulation
        mine = rows_of(batch, world)
        try:
            if accum == 1:
                total, n, norm = self._step(*prepare_batch(mine, self.gather, self.share, self.stage))
            else:
                acc = tree_map(mx.zeros_like, self.model.trainable_parameters())
                total, n = mx.array(0.0), mx.array(0.0)
                for part in micro_batches(mine, accum):
                    t, c, acc = self._accumulate(acc, *prepare_batch(part, self.gather, self.share, self.stage))
                    total, n = total + t, n + c
                    # one micro-batch at a time: left lazy, MLX ran them all in one graph and the peak grew with
                    # every micro-batch, so accumulation saved no memory (measured: 1.7x at 2 micro-batches)
                    mx.eval(acc, total, n)
                total, n, norm = self._apply(acc, total, n)
            mx.eval(self._state, total, n, norm)
        except RuntimeError as e:  # a collective failed: another rank went away
            if world.size == 1:
                raise
            raise world.lost(e) from None
        return total.item(), n.item(), norm.item()

    def evaluate(self, records, num_batches: int = -1) -> float:
        total, count = evaluate_sums(self.model, records, self.args.batch_size, self.args.max_seq_length, num_batches,
                                     share=(self.world.rank, self.world.size), share_prefix=self.args.share_prefix)
        return self.world.mean_loss(total, count)

    def learning_rate(self) -> float:
        return self.optimizer.learning_rate.item()

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def peak_memory(self) -> float:
        """Peak memory in GB since the last reset: the largest over the ranks."""
        return float(self.world.all_max(np.array([mx.get_peak_memory() / 1e9], np.float64))[0])

    def adapter_arrays(self) -> dict[str, np.ndarray]:
        return model_adapter_arrays(self.model)

    def optimizer_arrays(self) -> dict[str, np.ndarray]:
        """The whole optimizer state (initialized first, so its shapes are known before the first step)."""
        self.optimizer.init(self.model.trainable_parameters())
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
