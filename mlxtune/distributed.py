"""Training across processes and machines: who this process is (rank, size) and the few collectives the
shared loop needs, on the framework's own engine (`mx.distributed` under `mlx.launch`; torch.distributed
under `torchrun` in the torch engine).

Data parallel, with `--batch-size` the global batch: every rank draws the same global batches from the
same seed and keeps rows `rank::size` of each; gradients, loss sums and token counts are summed over the
ranks before the update, so the step equals a single process's on the whole batch (up to float summation
order). Only rank 0 writes files. The one thing to know: every collective goes through the framework (the
engines implement `World`: `mlx_engine.MLXWorld`, and the torch engine's); mlxtune adds no protocol of its
own, only a check that all ranks start from the same settings and data. This module imports no framework.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading

import numpy as np

from .data import batch_rows
from .errors import ConfigError, DataError, TrainingError


class World:
    """A single process: rank 0 of 1. The base of every multi-process world."""

    rank = 0
    size = 1
    backend = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values)

    def all_max(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values)

    def all_gather(self, values: np.ndarray) -> np.ndarray:
        """(size, *shape): every rank's `values`."""
        return np.asarray(values)[None]

    def mean_loss(self, total: float, count: float) -> float:
        """The loss per target token over every rank, from this rank's (sum of token losses, target tokens)."""
        total, count = self.all_sum(np.array([total, count], np.float64))
        if count == 0:
            raise DataError("the evaluation records carry no target tokens (is every completion empty or truncated?)")
        return float(total / count)

    def broadcast(self, arrays: dict[str, np.ndarray] | None, like: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rank 0's `arrays` on every rank (`like` gives the names, shapes and dtypes where a rank has none)."""
        return dict(arrays) if arrays is not None else dict(like)

    stopping = False  # this rank is already on its way out with a line of its own

    def lost(self, error: BaseException) -> TrainingError:
        """The one-line error when a collective fails because another rank went away."""
        self.stopping = True
        return TrainingError(f"rank {self.rank}: {error}")

    def stop_on_sigterm(self, launcher: str) -> None:
        """The launcher (mlx.launch, torchrun) stops the surviving ranks with SIGTERM when one fails, often before
        their next exchange notices: make that one line too (`error: rank R: stopped by ...`), not a silent death."""
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            return

        def stopped(signum, frame):
            if not self.stopping:
                self.stopping = True
                raise TrainingError(f"rank {self.rank}: stopped by {launcher} (SIGTERM): another rank failed or the run "
                                    f"was interrupted ({launcher} names the rank). Resume all ranks with --resume")

        signal.signal(signal.SIGTERM, stopped)

    def describe(self) -> str:
        return f"Distributed: {self.size} ranks, backend {self.backend}"


def torchrun_size() -> int:
    """How many processes torchrun started this run with (0: this process was not started by torchrun)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return int(env.get("WORLD_SIZE", "1"))
    return 0


def rows_of(batch, world: World):
    """This rank's share of a global batch (a `mlxtune.data.Batch`): rows rank::size (n_real, a report number,
    stays the global batch's)."""
    return batch if world.size == 1 else batch_rows(batch, slice(world.rank, None, world.size))


def check_same_run(world: World, fingerprint: dict, batch_size: int) -> None:
    """Every rank must train the same run: the same settings, data and template, and a batch it can share."""
    if world.size == 1:
        return
    if batch_size % world.size:
        raise ConfigError(f"--batch-size {batch_size} cannot be shared by {world.size} ranks: use a multiple of "
                          f"{world.size} (it stays the global batch: each rank takes batch-size / ranks rows)")
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).digest()[:8]
    mine = np.frombuffer(digest, np.uint8).astype(np.int32)
    everyone = world.all_gather(mine)
    differ = [r for r in range(world.size) if not np.array_equal(everyone[r], everyone[0])]
    if differ:
        raise ConfigError(f"rank {world.rank}: ranks {', '.join(map(str, differ))} have other settings or data than "
                          "rank 0 (flags, --data files, tokenizer or chat template differ): give every rank the same")
