"""The importance matrix, measured with MLX: how strongly each input column of each linear layer is driven.

For every linear layer, the mean of x^2 over the tokens of some training examples, per input column (the
statistic llama.cpp's imatrix holds). A quantization error in column j of a weight costs about
importance[j] times its square in the layer's output, which is what the K-quant scale search then weighs.
The one thing to know: it is measured on the model being quantized (the fused one) over the adapter's
training data, and keyed by GGUF tensor name, so the writer can hand each tensor its own column weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from tqdm.auto import tqdm

# modules, not names: mlxtune.data and mlxtune.models import the gguf package (for GGUF --model), so either
# may still be initializing when this module loads
from .. import data as data_module
from .. import models
from ..errors import DataError
from .arch import tensor_namer, text_tensor_name

MAX_RECORDS = 256  # examples measured: spread evenly over the training file


class _Recorder(nn.Module):
    """A linear layer that adds the squares of its inputs, per column, to a running sum."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.sums = None  # an mx.array (in,), kept out of the parameters by being set after __init__
        self.tokens = 0

    def __call__(self, x):
        flat = x.astype(mx.float32).reshape(-1, x.shape[-1])
        s = mx.sum(flat * flat, axis=0)
        self.sums = s if self.sums is None else self.sums + s
        self.tokens += flat.shape[0]
        return self.inner(x)


def importance_matrix(model_dir: str | os.PathLike, data, arch, cfg: dict, *, max_records: int = MAX_RECORDS,
                      max_seq_length: int = 512, chat_template: str | None = None,
                      progress: bool = True) -> tuple[dict[str, np.ndarray], int]:
    """({GGUF tensor name: mean x^2 per input column}, tokens measured) of the linear layers of `model_dir`.

    data: the training data (a folder's train split, or a .jsonl file), rendered as training renders it.
    """
    loaded = models.load_model(model_dir)
    model = loaded.model
    splits = data_module.load_dataset(str(data), loaded.tokenizer, valid_split=0.0, test_split=0.0, max_seq_length=max_seq_length,
                          chat_template=chat_template, cache=False)
    records = splits.train
    if not records:
        raise DataError(f"{data}: no training examples to measure activations on")
    step = max(1, len(records) // max_records)
    records = records[::step][:max_records]
    recorders = {name: _Recorder(m) for name, m in model.named_modules()
                 if isinstance(m, (nn.Linear, nn.QuantizedLinear))}
    model.update_modules(tree_unflatten(list(recorders.items())))
    model.eval()
    for record in tqdm(records, desc="importance", unit="example", disable=not progress, leave=False):
        model(mx.array([record.ids]))
        mx.eval([r.sums for r in recorders.values() if r.sums is not None])
    name_of = tensor_namer(arch, cfg["num_hidden_layers"])
    out = {}
    for module, r in recorders.items():
        hf = text_tensor_name(f"{module}.weight")
        if r.sums is None or hf is None:
            continue
        out[name_of(hf)] = np.array(r.sums / max(1, r.tokens), dtype=np.float32)
    return out, sum(len(r.ids) for r in records)


def source_data(data) -> Path:
    """The training file behind `--data`: a folder's train.jsonl, or the file itself."""
    path = Path(data).expanduser()
    if path.is_dir():
        for name in ("train.jsonl", "train.json"):
            if (path / name).is_file():
                return path / name
        raise DataError(f"--data {path} has no train.jsonl to measure activations on")
    if not path.is_file():
        raise DataError(f"--data {path} does not exist")
    return path
