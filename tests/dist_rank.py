"""One rank of a distributed test run, started by `mlx.launch` or `torchrun` (test_distributed.py,
test_distributed_torch.py).

argv[1] is a JSON object: `kwargs` for mlxtune.lora (model and data included), and optionally `die_at`
(rank 1 kills itself at that iteration), `hang_at` (rank 1 stops answering at that iteration), `guard`
(ranks other than 0 fail on any file write under that folder, to prove that only rank 0 writes) and
`rank_data` ({rank: data}: that rank reads other data).
"""

from __future__ import annotations

import builtins
import json
import os
import sys
import time

import mlxtune
from mlxtune.errors import MlxtuneError

spec = json.loads(sys.argv[1])
rank = int(os.environ.get("MLX_RANK", os.environ.get("RANK", "0")))
callbacks = []
if str(rank) in spec.get("rank_data", {}):
    spec["kwargs"]["data"] = spec["rank_data"][str(rank)]
if spec.get("die_at") and rank == 1:
    def die(report):
        if report.get("iteration") == spec["die_at"] and "train_loss" in report:
            os._exit(9)  # like a SIGKILL: no cleanup, no goodbye
    callbacks.append(die)
if spec.get("hang_at") and rank == 1:
    def hang(report):
        if report.get("iteration") == spec["hang_at"] and "train_loss" in report:
            time.sleep(3600)  # alive, but never at the next exchange
    callbacks.append(hang)

if spec.get("guard") and rank != 0:
    guarded = os.path.realpath(spec["guard"])
    real_open, real_replace, real_os_open = builtins.open, os.replace, os.open

    def no_writes(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and os.path.realpath(path).startswith(guarded):
            raise AssertionError(f"rank {rank} wrote {path}")
        return real_open(path, mode, *args, **kwargs)

    def no_replace(src, dst, *args, **kwargs):
        if os.path.realpath(dst).startswith(guarded):
            raise AssertionError(f"rank {rank} renamed onto {dst}")
        return real_replace(src, dst, *args, **kwargs)

    def no_os_writes(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and os.path.realpath(path).startswith(guarded):
            raise AssertionError(f"rank {rank} wrote {path}")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open, os.replace, os.open = no_writes, no_replace, no_os_writes

try:
    mlxtune.lora(callbacks=callbacks, **spec["kwargs"])
except MlxtuneError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
