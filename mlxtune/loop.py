"""The training loop, shared by every engine: batch -> step -> report -> validate -> checkpoint.

It never touches a framework. What it runs comes in as parameters: an engine (`mlxtune.mlx_engine.MLXEngine`,
or the torch engine) whose `step(batch, iteration)` does forward, loss, backward and the optimizer update
with the engine's loss function, and a batch source (`batches(start) -> iterator of mlxtune.data.Batch`).
The one thing to know: everything that decides what an iteration computes is a function of (seed,
iteration), so a run resumed from a checkpoint repeats the uninterrupted one exactly; the loop only has to
start the batch source and the engine's state at the checkpoint's iteration. That is also what makes Ctrl-C
(a notebook's stop button) safe: the first one stops after the current step and saves a checkpoint, and the
run returns with `interrupted=True`; a second one stops at once (every write is atomic).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from .adapters import AdapterConfig, read_weights, write_adapter_files
from .checkpoints import Resume, RunFiles, clear_run, resume_point, save_checkpoint
from .display import fields_html, fields_text, num
from .distributed import World
from .errors import ConfigError, MlxtuneError, TrainingError
from .report import LivePlot, Reporter, train_line, val_line, write_loss_png
from .settings import TrainingArgs


class Engine(Protocol):
    """What the loop needs from a framework (see MLXEngine for the reference implementation)."""

    name: str

    def step(self, batch, iteration: int) -> tuple[float, float, float]: ...  # loss sum, tokens, grad norm
    def evaluate(self, records, num_batches: int = -1) -> float: ...
    def learning_rate(self) -> float: ...
    def reset_peak_memory(self) -> None: ...
    def peak_memory(self) -> float: ...  # GB
    def adapter_arrays(self) -> dict[str, np.ndarray]: ...
    def optimizer_arrays(self) -> dict[str, np.ndarray]: ...
    def load_adapter_arrays(self, weights: dict, source: str) -> None: ...
    def load_optimizer_arrays(self, state: dict[str, np.ndarray]) -> None: ...


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
    peak_memory: float | None = None  # GB, the largest of the run's reports
    interrupted: bool = False  # Ctrl-C / the stop button: a checkpoint was saved at `iterations`
    checkpoint: Path | None = None  # the checkpoint an interrupted run saved
    resume_call: str | None = None  # an interrupted run: the exact call that continues it
    model_note: str | None = None  # a model passed in loaded: whether it keeps the adapter afterwards

    def _rows(self) -> list[tuple[str, object]]:
        def last(losses):
            return f"{losses[-1][1]:.3f} (iteration {losses[-1][0]})" if losses else None

        status = (f"interrupted at iteration {self.iterations}" if self.interrupted
                  else f"stopped early at iteration {self.iterations}" if self.stopped_early else "finished")
        return [("status", status), ("adapter", self.adapter_file), ("iterations", self.iterations),
                ("trained tokens", f"{self.trained_tokens:,}"), ("train loss", last(self.train_loss)),
                ("validation loss", last(self.val_loss)), ("test loss", num(self.test_loss)),
                ("test perplexity", num(self.test_perplexity)),
                ("peak memory", None if self.peak_memory is None else f"{self.peak_memory:.3f} GB"),
                ("loss plot", self.plot_file), ("checkpoint", self.checkpoint), ("resume with", self.resume_call),
                ("model", self.model_note)]

    def __repr__(self) -> str:
        return fields_text("TrainResult", self._rows())

    def _repr_html_(self) -> str:
        return fields_html("mlxtune.lora", self._rows())


class _Interrupts:
    """SIGINT while training: the first asks the loop to stop after the current step (it then saves a
    checkpoint); a second raises KeyboardInterrupt at once. Outside the main thread Python delivers no
    signals, so there is nothing to install."""

    def __init__(self):
        self.requested, self.previous = False, None

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        # Only a flag: printing from a signal handler can re-enter a stream the interrupted code is writing.
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class _Stop(Exception):
    """A callback asked to stop (raised out of validation, caught by the loop)."""


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


def _agreed(world: World, stop: bool) -> bool:
    """A stop every rank takes together (a callback may answer on one rank only)."""
    return stop if world.size == 1 else bool(world.all_max(np.array([int(stop)]))[0])


def _resume(engine: Engine, args: TrainingArgs, fingerprint: dict, files: RunFiles, world: World) -> Resume:
    """The resume point, read by rank 0 and handed to every rank through the framework's collectives (the
    other ranks need no copy of the checkpoint on their own disk)."""
    if world.size == 1:
        return resume_point(args, fingerprint, files)
    found, error = None, None
    if world.main:
        try:
            found = resume_point(args, fingerprint, files)
        except MlxtuneError as e:
            error = e
    kind = 0 if found is None else 1 if found.optimizer is None else 2
    head = world.broadcast({"kind": np.array([kind]), "start": np.array([found.iteration if found else 0]),
                            "tokens": np.array([found.trained_tokens if found else 0])} if world.main else None,
                           like={k: np.zeros(1, np.int64) for k in ("kind", "start", "tokens")})
    kind = int(head["kind"][0])
    if kind == 0:
        raise error if world.main else ConfigError(f"rank {world.rank}: rank 0 cannot resume this run (its message "
                                                   "says why)")
    to_numpy = (lambda d: {k: np.array(v) for k, v in d.items()}) if world.main else (lambda d: None)
    adapter = world.broadcast(to_numpy(found.adapter) if world.main else None, like=engine.adapter_arrays())
    optimizer = None
    if kind == 2:
        optimizer = world.broadcast(found.optimizer if world.main else None, like=engine.optimizer_arrays())
    resume = Resume(int(head["start"][0]), adapter, optimizer, found.source if world.main else files.adapter,
                    int(head["tokens"][0]))
    if world.main:
        resume.train_loss, resume.val_loss = found.train_loss, found.val_loss
    return resume


def train(engine: Engine, batches: Callable[[int], Iterator], valid_records, args: TrainingArgs, *,
          adapter_config: AdapterConfig, fingerprint: dict, callbacks: Iterable[Callable] = (),
          verbose: bool = True) -> TrainResult:
    """Train for `args.iters` steps (from the newest checkpoint with `args.resume`); returns a TrainResult.

    `batches(start)` yields the training batches from step `start` on. Writes the adapter, checkpoints,
    metrics and the loss plot beside `args.adapter_file`, named after it (`checkpoints.RunFiles`).
    """
    world = getattr(engine, "world", None) or World()
    files = RunFiles(Path(args.adapter_file))
    adapter_file = files.adapter
    if world.main:
        files.folder.mkdir(parents=True, exist_ok=True)
    callbacks = list(callbacks)
    result = TrainResult(adapter_file=adapter_file, metrics_file=files.metrics, plot_file=files.plot if args.plot else None)
    log = Reporter(verbose and world.main, files.metrics if world.main else None)  # only rank 0 writes

    start = 0
    resume = _resume(engine, args, fingerprint, files, world) if args.resume else None
    if resume is not None and resume.optimizer is not None:
        engine.load_adapter_arrays(resume.adapter, str(resume.source))
        engine.load_optimizer_arrays(resume.optimizer)
        start, result.trained_tokens = resume.iteration, resume.trained_tokens
        result.train_loss, result.val_loss = resume.train_loss, resume.val_loss
    else:
        if resume is not None:
            engine.load_adapter_arrays(resume.adapter, str(resume.source))
            log.line(f"note: {files.folder} has no checkpoint with optimizer state; starting from the weights in "
                     f"{adapter_file} at iteration 0")
        if world.main:
            clear_run(files)

    live = LivePlot.start(verbose and world.main)  # the loss plot redrawn in a notebook cell; None elsewhere

    def validate(it: int) -> None:
        if not valid_records:
            return
        tic = time.perf_counter()
        loss = engine.evaluate(valid_records, args.val_batches)
        took = time.perf_counter() - tic
        log.line(val_line(it, loss, took))
        report = {"iteration": it, "val_loss": loss, "val_time": took}
        log.record(report)
        result.val_loss.append((it, loss))
        if live:
            live.update(result.train_loss, result.val_loss)
        if args.plot and world.main:
            write_loss_png(files.plot, result.train_loss, result.val_loss)
        if _agreed(world, _wants_stop(callbacks, report)):
            raise _Stop()

    def checkpoint(it: int, announce: bool = True) -> Path | None:
        if not world.main:
            return None
        meta = {"iteration": it, "trained_tokens": result.trained_tokens, "settings": fingerprint}
        adapter = engine.adapter_arrays()
        ck = save_checkpoint(files, it, adapter, engine.optimizer_arrays(), meta)
        if announce:
            write_adapter_files(adapter_file, adapter, adapter_config)
            log.line(f"Iter {it}: Saved adapter weights to {adapter_file} and {ck}.")
        return ck

    def last_good() -> str:
        found = files.checkpoints() if world.main else []
        if not found:
            return "no checkpoint was saved yet" if world.main else "rank 0 keeps the checkpoints"
        it, ck, _ = found[-1]
        engine.load_adapter_arrays(read_weights(ck), str(ck))
        return f"the last good checkpoint is {ck} (iteration {it}), also loaded back into the model"

    source = batches(start)
    window_loss, window_tokens, window_real, window_steps, window_time = 0.0, 0.0, 0, 0, 0.0
    it = start
    engine.reset_peak_memory()
    if start == 0 and args.steps_per_eval > 0 and args.iters > 0:
        try:
            validate(0)
        except _Stop:
            result.stopped_early = True
    bar = tqdm(total=args.iters, initial=start, desc="Training", unit="it",
               disable=not (verbose and world.main) or result.stopped_early, dynamic_ncols=True, leave=False)
    log.bar = bar
    interrupts = _Interrupts().__enter__()  # left in the `finally` below
    try:
        while it < args.iters and not result.stopped_early:
            if _agreed(world, interrupts.requested):  # every rank stops at the same step
                result.interrupted = True
                break
            batch = next(source)
            it += 1
            tic = time.perf_counter()
            loss_sum, count, norm = engine.step(batch, it)
            window_time += time.perf_counter() - tic
            if not (math.isfinite(loss_sum) and math.isfinite(norm)):
                raise TrainingError(
                    f"training stopped at iteration {it}: the {'loss' if not math.isfinite(loss_sum) else 'gradient'} "
                    f"became non-finite; {last_good()}. Try a lower --learning-rate (now {args.learning_rate:g})"
                    f"{', --max-grad-norm 1.0' if args.max_grad_norm == 0 else ''} or a warmup (--warmup 50)")
            real = int(batch.n_real)
            window_loss, window_tokens, window_real = window_loss + loss_sum, window_tokens + count, window_real + real
            window_steps += 1
            result.trained_tokens += real
            bar.update(1)
            if it % args.steps_per_report == 0 or it == args.iters:
                train_loss = window_loss / max(window_tokens, 1)
                report = {"iteration": it, "train_loss": train_loss, "learning_rate": engine.learning_rate(),
                          "iterations_per_second": window_steps / window_time,
                          "tokens_per_second": window_real / window_time,
                          "trained_tokens": result.trained_tokens, "peak_memory": engine.peak_memory()}
                log.line(train_line(it, report))
                bar.set_postfix(loss=f"{train_loss:.3f}")
                log.record(report)
                result.train_loss.append((it, train_loss))
                result.peak_memory = max(result.peak_memory or 0.0, report["peak_memory"])
                if live:
                    live.update(result.train_loss, result.val_loss)
                window_loss, window_tokens, window_real, window_steps, window_time = 0.0, 0.0, 0, 0, 0.0
                if _agreed(world, _wants_stop(callbacks, report)):
                    result.stopped_early = True
            if not result.stopped_early and (it == args.iters or (args.steps_per_eval and it % args.steps_per_eval == 0)):
                try:
                    validate(it)
                except _Stop:
                    result.stopped_early = True
            if args.save_every and it % args.save_every == 0 and it < args.iters:
                checkpoint(it)
        bar.close()
        log.bar = None
        result.iterations = it
        # Still inside the handler: a second Ctrl-C during these writes stops at once, and the atomic writes
        # leave the previous files whole.
        if result.interrupted:
            log.line(f"Interrupted: saving a checkpoint of iteration {it} (interrupt again to stop at once)")
            result.checkpoint = checkpoint(it, announce=False)  # whatever --save-every says: resume needs it
        if world.main:
            write_adapter_files(adapter_file, engine.adapter_arrays(), adapter_config)
            if args.plot:
                write_loss_png(files.plot, result.train_loss, result.val_loss)
        if not result.interrupted and args.save_every and it % args.save_every == 0:
            checkpoint(it, announce=False)  # the final step is a checkpoint too (resume can extend it)
    finally:
        interrupts.__exit__()
        bar.close()
        log.bar = None
        if live:
            live.flush()
    if result.interrupted:
        log.line(f"Interrupted at iteration {it}: saved the checkpoint {result.checkpoint} and the adapter {adapter_file}.")
    else:
        log.line(f"{'Stopped early at iteration ' + str(it) + '. ' if result.stopped_early else ''}"
                 f"Saved final adapter weights to {adapter_file}.")
    return result
