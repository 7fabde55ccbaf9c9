"""The learning-rate schedule: one pure function of the settings and the update number, for every engine.

Update k (1-based) uses:
  warmup (k <= W):  lr * k / W                        (the first update already moves: lr / W, never 0)
  constant:         lr
  cosine:           end + (lr - end) * (1 + cos(pi * t / D)) / 2     t = min(k - W - 1, D)
  linear:           lr + (end - lr) * t / D
with D = lr_decay_steps, or iters - W when that is 0; so the first update after warmup uses the peak rate. The one thing
to know: engines set this value before every step instead of keeping a schedule object inside the
optimizer, so MLX and torch follow the same numbers and a resumed run only needs the iteration.
"""

from __future__ import annotations

import math

from .settings import TrainingArgs


def learning_rate_at(args: TrainingArgs, update: int) -> float:
    """The learning rate of update number `update` (1 for the first step of a run)."""
    lr, end, warmup = args.learning_rate, args.lr_end, args.warmup
    if update <= warmup:
        return lr * update / warmup
    decay_steps = max(1, args.lr_decay_steps or args.iters - warmup)
    t = min(update - warmup - 1, decay_steps)
    if args.lr_schedule == "cosine":
        return end + (lr - end) * 0.5 * (1.0 + math.cos(math.pi * t / decay_steps))
    if args.lr_schedule == "linear":
        return lr + (end - lr) * t / decay_steps
    return lr
