"""What a training run reports: the report lines, metrics.jsonl and the loss plot.

The lines keep mlx-lm's wording (`Iter 10: Train loss 2.345, Learning Rate 1.000e-04, ...`) so scripts
that parse mlx-lm's output parse ours. The one thing to know: lines go through the progress bar's
`write` while a bar is open, so bar and lines never garble each other, in a terminal or a notebook. In a
notebook the loss plot is also shown in the cell and redrawn in place while training (`LivePlot`).
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never open a window, never need a display

from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)

from .files import append_line, atomic_file  # noqa: E402


class Reporter:
    """Report lines to the terminal (through the bar when one is open) and records to metrics.jsonl."""

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
            append_line(self.metrics, json.dumps(entry))


def train_line(it: int, report: dict) -> str:
    return (f"Iter {it}: Train loss {report['train_loss']:.3f}, Learning Rate {report['learning_rate']:.3e}, "
            f"It/sec {report['iterations_per_second']:.3f}, Tokens/sec {report['tokens_per_second']:.0f}, "
            f"Trained Tokens {report['trained_tokens']}, Peak mem {report['peak_memory']:.3f} GB")


def val_line(it: int, loss: float, seconds: float) -> str:
    return f"Iter {it}: Val loss {loss:.3f}, Val took {seconds:.1f}s"


def loss_figure(train: list[tuple[int, float]], val: list[tuple[int, float]]) -> Figure:
    """Training and validation loss against the iteration, log-scale loss, labelled, with a legend."""
    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), color="tab:blue", label="train")
    if val:
        ax.plot(*zip(*val), color="tab:orange", marker="o", markersize=3, label="validation")
    values = [v for _, v in train + val]
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (per target token)")
    ax.grid(True, which="both", alpha=0.3)
    if train or val:
        ax.legend()
    return fig


def write_loss_png(path: str | Path, train: list[tuple[int, float]], val: list[tuple[int, float]]) -> Path:
    """loss.png for a run, written atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        loss_figure(train, val).savefig(tmp, format="png")
    return path


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython's ZMQ shell, which has a `kernel`), where `display` reaches a notebook.

    IPython is looked up in sys.modules, never imported: a kernel has always imported it already.
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and hasattr(shell, "kernel")


class LivePlot:
    """The loss figure (`loss_figure`, what loss.png holds) shown once in a notebook cell and redrawn in place
    through its IPython display handle as reports come in. `start()` is None outside a notebook."""

    def __init__(self, min_seconds: float = 1.0):
        from IPython.display import Image, display  # only reached inside a kernel (see `start`)

        self._image, self._display = Image, display
        self.min_seconds, self.handle, self.shown_at = min_seconds, None, 0.0
        self.pending: tuple[list, list] | None = None

    @classmethod
    def start(cls, enabled: bool = True) -> LivePlot | None:
        return cls() if enabled and in_notebook() else None

    def update(self, train: list[tuple[int, float]], val: list[tuple[int, float]]) -> None:
        """Redraw with these curves, at most once per `min_seconds` (a drawing costs ~50 ms); `flush` draws the rest."""
        self.pending = (list(train), list(val))
        if time.monotonic() - self.shown_at >= self.min_seconds:
            self.flush()

    def flush(self) -> None:
        if self.pending is None or not any(self.pending):
            return
        buffer = io.BytesIO()
        loss_figure(*self.pending).savefig(buffer, format="png")
        image = self._image(data=buffer.getvalue(), format="png")
        if self.handle is None:
            self.handle = self._display(image, display_id=True)
        else:
            self.handle.update(image)
        self.shown_at, self.pending = time.monotonic(), None
