"""The torch engine: what `mlxtune.loop.train` drives on the optional torch backend (CUDA machines, or the CPU).

The same methods as `mlxtune.mlx_engine.MLXEngine` and the same arithmetic: token-weighted loss on target
positions only (`mlxtune.torch_models.token_loss`), gradients summed over micro-batches and divided by
the step's target count, global-norm clipping, and the optimizers of `mlx.optimizers` written out in a few
lines (`MLXOptimizer`: Adam/AdamW without bias correction, SGD) with the learning rate of
`mlxtune.schedule`, so a step here is a step there. The one
thing to know: the optimizer state is exported under MLX's own names (`step`, `learning_rate`,
`<module>.lora_a.m` ...), so a checkpoint is the same file whichever backend wrote it, and `--resume`
continues an MLX run on torch and the reverse. Resume is bit for bit on the CPU; on CUDA deterministic
algorithms are asked for where torch offers them.

Under `torchrun` (`TorchWorld`, torch.distributed: gloo on the CPU, NCCL on CUDA) each rank takes rows
`rank::size` of every global batch and the loss sums, token counts and LoRA gradients are summed over the
ranks in one all-reduce before the update, as `mlxtune.mlx_engine` does on `mx.distributed`; `--fsdp`
also shards the frozen weights of the transformer blocks across the ranks (FSDP2 `fully_shard`).
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .data import Batch, micro_batches
from .distributed import World, rows_of, torchrun_size
from .errors import TrainingError
from .files import proc_field_bytes
from .loss import batch_arrays
from .schedule import learning_rate_at
from .settings import TrainingArgs
from .torch_models import (
    adapter_arrays,
    evaluate_sums,
    load_adapter_arrays,
    lora_layers,
    model_parts,
    to_tensors,
    token_loss,
    transformer_blocks,
)

# A collective waits at most this long for the other ranks once training runs (a rank that dies is usually
# noticed at once, by its closed connection; this bounds a hung one). The first exchange, the settings
# fingerprint after loading the model and the data, may wait as long as loading takes on the slowest rank.
STEP_TIMEOUT_S = 45
START_TIMEOUT_S = 30 * 60


class MLXOptimizer:
    """mlx.optimizers' AdamW / Adam (eps 1e-8, betas 0.9/0.999, bias correction only if asked) and SGD, on torch."""

    def __init__(self, params: dict[str, torch.nn.Parameter], args: TrainingArgs):
        self.params, self.args = params, args
        self.kind, self.weight_decay = args.optimizer, args.weight_decay
        self.step = 0
        self.lr = 0.0
        slots = ("v",) if self.kind == "sgd" else ("m", "v")
        self.state = {k: {s: torch.zeros_like(p) for s in slots} for k, p in params.items()}

    @torch.no_grad()
    def update(self, grads: dict[str, torch.Tensor], lr: float) -> None:
        self.lr = float(np.float32(lr))  # MLX keeps the rate as a float32 array
        self.step += 1
        wd = self.weight_decay
        lr = self.lr
        for k, p in self.params.items():
            g, st = grads[k], self.state[k]
            if self.kind == "sgd":
                p.sub_(lr * (g + wd * p) if wd else lr * g)
                continue
            if self.kind == "adamw" and wd:
                p.mul_(1 - lr * wd)
            st["m"].mul_(0.9).add_((1 - 0.9) * g)
            st["v"].mul_(0.999).add_((1 - 0.999) * g.square())
            if self.args.bias_correction:  # as mlx.optimizers.Adam(bias_correction=True), step counted from 1
                c1 = lr / (1 - 0.9 ** self.step)
                c2 = (1 - 0.999 ** self.step) ** -0.5
                p.sub_(c1 * st["m"] / (st["v"].sqrt() * c2 + 1e-8))
            else:
                p.sub_(lr * st["m"] / (st["v"].sqrt() + 1e-8))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"step": np.array(self.step, np.uint64), "learning_rate": np.array(self.lr, np.float32)}
        for k, slots in self.state.items():
            for s, t in slots.items():
                out[f"{k}.{s}"] = t.detach().float().cpu().numpy()
        return out

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for key, value in arrays.items():
                if key == "step":
                    self.step = int(value)
                elif key == "learning_rate":
                    self.lr = float(value)
                else:
                    name, slot = key.rsplit(".", 1)
                    if name in self.state and slot in self.state[name]:
                        self.state[name][slot].copy_(torch.from_numpy(np.array(value, np.float32)))


def _peak_rss_gb() -> float:
    peak = proc_field_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak / 1e9
    import resource  # not on Windows; ru_maxrss is KiB on Linux, bytes on macOS

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if os.uname().sysname == "Darwin" else rss * 1024 / 1e9


class TorchWorld(World):
    """torch.distributed under `torchrun`: gloo on the CPU, NCCL on CUDA (one GPU per rank, cuda:LOCAL_RANK)."""

    def __init__(self, device: str):
        env = os.environ
        self.rank, self.size, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
        cuda = torch.device(device).type == "cuda"
        self.backend = "nccl" if cuda else "gloo"
        self.device = f"cuda:{local}" if cuda else device
        if cuda:
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(self.backend, timeout=timedelta(seconds=START_TIMEOUT_S))
            atexit.register(_close_process_group)
        # every rank creates it right after init: training's exchanges use it, with the short timeout
        self.group = dist.new_group(backend=self.backend, timeout=timedelta(seconds=STEP_TIMEOUT_S))
        self.started = False  # the first exchange (the fingerprint) waits on the default group's long timeout
        self.stop_on_sigterm("torchrun")

    def _run(self, fn, tensor, **kwargs):
        group = self.group if self.started else None
        try:
            fn(tensor, group=group, **kwargs)
        except RuntimeError as e:  # gloo: "Connection closed by peer" or a timeout; NCCL: an aborted communicator
            raise self.lost(e) from None
        self.started = True

    def _tensor(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(values)).to(self.device)

    def all_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place, where it lives (the gradient exchange)."""
        self._run(dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_sum(self, values):
        return self.all_sum_(self._tensor(np.asarray(values))).cpu().numpy()

    def all_max(self, values):
        t = self._tensor(np.asarray(values))
        self._run(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return t.cpu().numpy()

    def all_gather(self, values):
        t = self._tensor(np.asarray(values))
        out = [torch.empty_like(t) for _ in range(self.size)]
        self._run(lambda tensor, group: dist.all_gather(out, tensor, group=group), t)
        return torch.stack(out).cpu().numpy()

    def broadcast(self, arrays, like):
        out = {}
        for k, ref in like.items():
            ref = np.asarray(ref)
            mine = np.ascontiguousarray(np.asarray(arrays[k], ref.dtype) if self.main else np.zeros_like(ref))
            raw = self._tensor(mine.reshape(-1).view(np.uint8))  # as bytes: exact for every dtype (uint64 too)
            self._run(dist.broadcast, raw, group_src=0)
            out[k] = raw.cpu().numpy().view(ref.dtype).reshape(ref.shape)
        return out

    def lost(self, error):
        self.stopping = True
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        who = f"rank {1 - self.rank}" if self.size == 2 else "another rank"
        return TrainingError(f"rank {self.rank}: the exchange with {who} failed ({first}): that rank stopped, died or "
                             f"hung for {STEP_TIMEOUT_S} s; the others stop too. Resume all ranks with --resume (any "
                             "number of ranks that divides --batch-size)")


def _close_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def torch_world(device: str) -> World:
    """The world `torchrun` started this process in, or a single process."""
    if torchrun_size() <= 1:
        return World()
    return TorchWorld(device)


def shard_blocks(model, world: TorchWorld, device: str) -> tuple[int, int, int]:
    """--fsdp: shard each transformer block's frozen weights over the ranks (FSDP2 `fully_shard`); returns the
    number of blocks sharded, and the bytes of their frozen weights this rank holds and all of them take.

    The LoRA tensors are left out of the sharding (`ignored_params`): they are small, every rank keeps them
    whole, and their gradients are exchanged like DDP's (`TorchEngine.step`), so --fsdp computes exactly the
    update of a DDP run, and rank 0 alone can read the adapter to write it. The embedding, final norm and
    output head stay whole too: the loss calls the decoder and the head separately (hidden states of target
    positions only reach the head), and a tied embedding cannot sit in two shard units.
    """
    from torch.distributed.device_mesh import DeviceMesh  # only for --fsdp
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    # FSDP's all-gathers run on the world's group with its short timeout: wait first (on the long one) until
    # every rank has loaded its model
    world.all_max(np.zeros(1))
    mesh = DeviceMesh.from_group(world.group, device_type=torch.device(device).type)
    lora = {p for m in lora_layers(model).values() for p in (m.lora_a, m.lora_b)}
    _, blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params={p for p in block.parameters() if p in lora})
    target = torch.device(device)
    with torch.no_grad():  # what fully_shard did not move (model loaded on the CPU for a CUDA run): in place
        for m in model.modules():
            for p in m.parameters(recurse=False):
                if not isinstance(p, DTensor) and p.device != target:
                    p.data = p.data.to(target)
            for name, b in m.named_buffers(recurse=False):
                if b.device != target:
                    m._buffers[name] = b.to(target)
    sharded = [p for block in blocks for p in block.parameters() if isinstance(p, DTensor)]
    held = sum(p.to_local().numel() * p.element_size() for p in sharded)
    return len(blocks), held, sum(p.numel() * p.element_size() for p in sharded)


class TorchEngine:
    """Trains the LoRA layers of a transformers model; what `mlxtune.loop.train` calls on torch.

    With a multi-process `world` (torchrun) each rank takes rows `rank::size` of every global batch; with
    `args.fsdp` the blocks' frozen weights are sharded over the ranks first (`shard_blocks`).
    """

    def __init__(self, model, args: TrainingArgs, device: str, world: World | None = None):
        self.model, self.args, self.device = model, args, torch.device(device)
        self.world = world or World()
        self.name = f"torch ({device})"
        self.sharded = (0, 0, 0)  # --fsdp: blocks sharded, bytes of their frozen weights held here, in all
        if args.fsdp and self.world.size > 1:
            self.sharded = shard_blocks(model, self.world, device)
        if self.device.type == "cuda":  # exact resume where CUDA has deterministic kernels (cuBLAS needs the workspace
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # setting before its first matmul)
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.parts = model_parts(model)
        self.gather = self.parts.body is not None
        self.packing = self.parts.packing
        self.layers = lora_layers(model)
        self.params = {f"{p}.lora_{ab}": getattr(m, f"lora_{ab}") for p, m in self.layers.items() for ab in "ab"}
        for p in self.params.values():
            p.requires_grad_(True)
        self.optimizer = MLXOptimizer(self.params, args)
        if args.grad_checkpoint:  # activation_checkpointing_enable: transformers >= 5.2x's name for it
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()

    def step(self, batch: Batch, iteration: int) -> tuple[float, float, float]:
        """One optimizer step on `batch`: (sum of token losses, target tokens, gradient norm before clipping)."""
        torch.manual_seed(self.args.seed * 1_000_003 + iteration)  # dropout noise is a function of (seed, step)
        for p in self.params.values():
            p.grad = None
        total = n = 0.0
        try:
            for part in micro_batches(rows_of(batch, self.world), self.args.grad_accumulation):
                arrays = to_tensors(batch_arrays(part, self.gather, bucket=False), self.device)
                t, c = token_loss(self.model, self.parts, arrays, self.gather)
                t.backward()  # gradients of the summed loss add up over micro-batches
                total, n = total + t.item(), n + c.item()
            grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in self.params.items()}
            if self.world.size > 1:
                total, n, grads = self._everywhere(total, n, grads)
        except RuntimeError as e:  # with --fsdp the forward's all-gathers fail first when a rank went away
            if self.world.size == 1 or isinstance(e, TrainingError):
                raise
            raise self.world.lost(e) from None
        with torch.no_grad():
            grads = {k: g / max(n, 1.0) for k, g in grads.items()}
            norm = torch.sqrt(sum(g.float().square().sum() for g in grads.values()))
            clip = self.args.max_grad_norm
            if clip > 0:
                scale = torch.clamp(clip / (norm + 1e-6), max=1.0)
                grads = {k: g * scale for k, g in grads.items()}
            self.optimizer.update(grads, learning_rate_at(self.args, iteration))
        return total, n, norm.item()

    @torch.no_grad()
    def _everywhere(self, total: float, n: float, grads: dict[str, torch.Tensor]):
        """Loss sum, token count and every LoRA gradient summed over the ranks, in one all-reduce.

        Not DDP: DDP averages gradients over the ranks, while the step must divide the sum of every rank's
        summed token losses by the global token count (ranks hold different numbers of target tokens), which
        DDP does not exchange; and DDP reduces only when the forward goes through its wrapper, whereas the
        loss calls the decoder and the head separately. A sum of the per-rank sums, then one division by the
        global count, is the single process's step up to the order of float additions, as on MLX.
        """
        flat = torch.cat([torch.tensor([total, n], dtype=torch.float32, device=self.device)]
                         + [g.reshape(-1).float() for g in grads.values()])
        self.world.all_sum_(flat)
        out, at = {}, 2
        for k, g in grads.items():
            out[k] = flat[at:at + g.numel()].view_as(g).to(g.dtype)
            at += g.numel()
        return float(flat[0]), float(flat[1]), out

    def evaluate(self, records, num_batches: int = -1) -> float:
        total, count = evaluate_sums(self.model, records, self.args.batch_size, self.args.max_seq_length, num_batches,
                                     share=(self.world.rank, self.world.size))
        return self.world.mean_loss(total, count)

    def learning_rate(self) -> float:
        return self.optimizer.lr

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: writing 5 resets the process's peak RSS (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def peak_memory(self) -> float:
        """Peak memory in GB since the last reset (the largest over the ranks): CUDA allocations, or the
        process's peak RSS on the CPU."""
        mine = torch.cuda.max_memory_allocated(self.device) / 1e9 if self.device.type == "cuda" else _peak_rss_gb()
        return float(self.world.all_max(np.array([mine], np.float64))[0])

    def adapter_arrays(self) -> dict[str, np.ndarray]:
        return adapter_arrays(self.model)

    def optimizer_arrays(self) -> dict[str, np.ndarray]:
        return self.optimizer.arrays()

    def load_adapter_arrays(self, weights: dict, source: str) -> None:
        load_adapter_arrays(self.model, weights, source)

    def load_optimizer_arrays(self, state: dict[str, np.ndarray]) -> None:
        self.optimizer.load(state)
