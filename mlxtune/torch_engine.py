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
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .data import Batch
from .loss import batch_arrays, micro_batches
from .schedule import learning_rate_at
from .settings import TrainingArgs
from .torch_models import adapter_arrays, load_adapter_arrays, lora_layers, model_parts, to_tensors, token_loss
from .torch_models import evaluate_loss as _evaluate_loss


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
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    import resource  # not on Windows; ru_maxrss is KiB on Linux, bytes on macOS

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if os.uname().sysname == "Darwin" else rss * 1024 / 1e9


class TorchEngine:
    """Trains the LoRA layers of a transformers model; what `mlxtune.loop.train` calls on torch."""

    def __init__(self, model, args: TrainingArgs, device: str):
        self.model, self.args, self.device = model, args, torch.device(device)
        self.name = f"torch ({device})"
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
        for part in micro_batches(batch, self.args.grad_accumulation):
            arrays = to_tensors(batch_arrays(part, self.gather, bucket=False), self.device)
            t, c = token_loss(self.model, self.parts, arrays, self.gather)
            t.backward()  # gradients of the summed loss add up over micro-batches
            total, n = total + t.item(), n + c.item()
        with torch.no_grad():
            grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) / max(n, 1.0) for k, p in self.params.items()}
            norm = torch.sqrt(sum(g.float().square().sum() for g in grads.values()))
            clip = self.args.max_grad_norm
            if clip > 0:
                scale = torch.clamp(clip / (norm + 1e-6), max=1.0)
                grads = {k: g * scale for k, g in grads.items()}
            self.optimizer.update(grads, learning_rate_at(self.args, iteration))
        return total, n, norm.item()

    def evaluate(self, records, num_batches: int = -1) -> float:
        return _evaluate_loss(self.model, records, self.args.batch_size, self.args.max_seq_length, num_batches)

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
        """Peak memory in GB since the last reset: CUDA allocations, or the process's peak RSS on the CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return _peak_rss_gb()

    def adapter_arrays(self) -> dict[str, np.ndarray]:
        return adapter_arrays(self.model)

    def optimizer_arrays(self) -> dict[str, np.ndarray]:
        return self.optimizer.arrays()

    def load_adapter_arrays(self, weights: dict, source: str) -> None:
        load_adapter_arrays(self.model, weights, source)

    def load_optimizer_arrays(self, state: dict[str, np.ndarray]) -> None:
        self.optimizer.load(state)
