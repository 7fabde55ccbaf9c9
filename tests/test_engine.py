"""The MLX engine's update rule, checked against a reference computed outside it: learning-rate schedule
values (warmup's first step moves), gradient clipping, weight decay (SGD and AdamW), and the settings
that have no effect refused in one line (mlx-lm YAML keys, Adam with weight decay).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlxtune.data import Record, iterate_batches
from mlxtune.errors import ConfigError
from mlxtune.layers import apply_lora, lora_modules
from mlxtune.loss import model_parts, prepare_batch, token_loss
from mlxtune.mlx_engine import MLXEngine, make_optimizer
from mlxtune.models import load
from mlxtune.schedule import learning_rate_at
from mlxtune.settings import read_config_file, training_args


def _batch(vocab: int):
    rng = np.random.default_rng(0)
    records = [Record(ids=rng.integers(3, vocab, 12).tolist(), mask=[False] * 4 + [True] * 8) for _ in range(2)]
    return next(iterate_batches(records, 2, max_seq_length=32, loop=False, shuffle=False))


def _engine(tiny_llama, **settings):
    model, _ = load(tiny_llama)
    mx.random.seed(0)
    apply_lora(model, lora_layers=1, rank=4, alpha=8)
    for layer in lora_modules(model).values():  # non-zero B so that every LoRA tensor gets a gradient
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    args = training_args(iters=10, batch_size=2, seed=0, **settings)
    return MLXEngine(model, make_optimizer(args), args), args


def _reference_gradient(engine, batch) -> dict[str, mx.array]:
    """d(mean token loss)/d(trainable) by plain value_and_grad, outside the engine's compiled step."""
    parts = model_parts(engine.model)
    arrays = prepare_batch(batch, parts.body is not None)
    fn = nn.value_and_grad(engine.model, lambda m: token_loss(m, parts, arrays, parts.body is not None))
    (_, n), grads = fn(engine.model)
    return {k: g / n for k, g in tree_flatten(grads)}


def _trainable(engine) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(engine.model.trainable_parameters())}


def test_schedule_values():
    base = dict(iters=10, learning_rate=1e-3)
    warm = training_args(**base, warmup=4, lr_schedule="cosine")
    assert [learning_rate_at(warm, k) for k in (1, 2, 4)] == pytest.approx([2.5e-4, 5e-4, 1e-3])  # never 0
    assert learning_rate_at(warm, 5) == pytest.approx(1e-3)  # first step after warmup: the peak
    assert learning_rate_at(warm, 10) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    linear = training_args(**base, lr_schedule="linear", lr_end=1e-4)
    assert [learning_rate_at(linear, k) for k in (1, 6)] == pytest.approx([1e-3, 1e-3 - 9e-4 * 5 / 10])
    short = training_args(**base, lr_schedule="cosine", lr_decay_steps=4, lr_end=1e-5)
    assert learning_rate_at(short, 5) == learning_rate_at(short, 10) == pytest.approx(1e-5)  # decayed, then held
    assert learning_rate_at(training_args(**base), 7) == 1e-3


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_sgd_step_is_minus_lr_times_the_clipped_gradient(tiny_llama, clip):
    engine, args = _engine(tiny_llama, optimizer="sgd", learning_rate=0.5, warmup=3, max_grad_norm=clip)
    batch = _batch(engine.model.args.vocab_size)
    grads = _reference_gradient(engine, batch)
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    before = _trainable(engine)
    _, _, reported = engine.step(batch, 1)
    assert reported == pytest.approx(norm, rel=1e-4)  # the norm before clipping is what the report shows
    lr = 0.5 / 3  # warmup's first update: lr / warmup, not 0
    scale = min(1.0, clip / norm) if clip else 1.0
    assert clip == 0 or scale < 0.1  # the clip really bites in the clipped case
    for k, w in _trainable(engine).items():
        np.testing.assert_allclose(w, before[k] - lr * scale * np.array(grads[k]), rtol=1e-4, atol=1e-7, err_msg=k)
    assert engine.learning_rate() == pytest.approx(lr)


def test_weight_decay_sgd_and_adamw(tiny_llama):
    engine, _ = _engine(tiny_llama, optimizer="sgd", learning_rate=0.1, weight_decay=0.5, max_grad_norm=0)
    batch = _batch(engine.model.args.vocab_size)
    grads, before = _reference_gradient(engine, batch), _trainable(engine)
    engine.step(batch, 1)
    for k, w in _trainable(engine).items():  # SGD: coupled decay, w - lr * (g + wd * w)
        np.testing.assert_allclose(w, before[k] - 0.1 * (np.array(grads[k]) + 0.5 * before[k]), rtol=1e-4, atol=1e-7)

    runs = {}
    for wd in (0.0, 0.5):  # AdamW: decoupled, the same Adam step applied to w * (1 - lr * wd)
        engine, _ = _engine(tiny_llama, optimizer="adamw", learning_rate=0.01, weight_decay=wd, max_grad_norm=0)
        before = _trainable(engine)
        engine.step(batch, 1)
        runs[wd] = _trainable(engine)
    for k, w in runs[0.5].items():
        np.testing.assert_allclose(w - runs[0.0][k], -0.01 * 0.5 * before[k], rtol=1e-4, atol=1e-8, err_msg=k)
    assert any(np.abs(before[k]).max() > 0.01 for k in before)  # the decay term was not trivially zero


def test_settings_without_effect_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--weight-decay 0.1 has no effect with --optimizer adam"):
        training_args(optimizer="adam", weight_decay=0.1)
    cases = {
        "fine_tune_type: dora\n": "fine_tune_type 'dora' is not supported",
        "fine_tune_type: full\n": "fine_tune_type 'full' is not supported",
        "train: false\n": "train: false is not supported",
        "lr_schedule:\n  name: exponential_decay\n  arguments: [1e-4, 0.9]\n": "name 'exponential_decay'",
        "lr_schedule:\n  name: cosine_decay\n  arguments: [1e-4, 100]\n  warmup: 10\n  warmup_init: 1e-6\n": "warmup_init",
        "optimizer: adamw\noptimizer_config:\n  adamw:\n    betas: [0.8, 0.9]\n": "optimizer_config 'betas'",
    }
    for text, message in cases.items():
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_config_file(tmp_path / "c.yaml")


def test_mlx_lm_schedule_and_optimizer_config_are_honoured(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "iters: 110\nlr_schedule:\n  name: cosine_decay\n  arguments: [2.0e-4, 60, 1.0e-6]\n  warmup: 10\n"
        "optimizer: adamw\noptimizer_config:\n  adamw:\n    weight_decay: 0.05\nmask_prompt: true\n")
    args = training_args(tmp_path / "c.yaml")
    assert (args.lr_schedule, args.learning_rate, args.lr_decay_steps, args.lr_end, args.warmup) == (
        "cosine", 2e-4, 60, 1e-6, 10)
    assert args.weight_decay == 0.05 and args.train_on_inputs is False
    assert learning_rate_at(args, 11) == pytest.approx(2e-4)
    assert learning_rate_at(args, 71) == learning_rate_at(args, 110) == pytest.approx(1e-6)
