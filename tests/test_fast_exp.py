"""exp on the CPU from multiplies and adds (mlxtune.fast_exp): as accurate as MLX's own exp, the same SwiGLU and
attention values and gradients as mlx-lm's, and really used by the engine's compiled step and by evaluation, with
the same loss."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import activations, base, llama

from mlxtune import fast_exp, loss
from mlxtune.data import Record, iterate_batches
from mlxtune.dequantized import on_cpu
from mlxtune.layers import apply_lora
from mlxtune.loss import evaluate_sums
from mlxtune.mlx_engine import MLXEngine, make_optimizer
from mlxtune.models import load
from mlxtune.settings import training_args

from tiny import make_tiny_model

pytestmark = pytest.mark.skipif(not on_cpu(), reason="off the CPU every fast_exp function is MLX's own")


def _relative_error(got: mx.array, ref: np.ndarray) -> float:
    return float(np.max(np.abs(np.array(got, dtype=np.float64) - ref) / np.abs(ref)))


def test_exp_is_as_accurate_as_mlx_exp():
    x = mx.array(np.linspace(-87, 88, 200_001, dtype=np.float32))
    ref = np.exp(np.array(x, dtype=np.float64))
    ours, theirs = _relative_error(fast_exp.exp(x), ref), _relative_error(mx.exp(x), ref)
    assert ours < 1e-5 and ours <= 1.5 * theirs, (ours, theirs)  # float32 x itself is off by up to |x| x 6e-8
    far = np.array(fast_exp.exp(mx.array([-1000.0, 1000.0, float("nan")])))
    assert 0 <= far[0] < 1e-37 and np.isfinite(far[1]) and np.isnan(far[2])  # clipped, not inf; NaN stays NaN
    v = x[::200]
    assert mx.allclose(mx.grad(lambda v: fast_exp.exp(v).sum())(v), mx.exp(v), rtol=2e-6)
    z = mx.random.normal((16, 5000), key=mx.random.key(0)) * 20
    assert mx.allclose(fast_exp.logsumexp(z), mx.logsumexp(z, axis=-1), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_swiglu_values_and_gradients_equal_mlx_lm(dtype):
    """Both against mlx-lm's swiglu in float32: ours as close as theirs (in bfloat16 ours rounds once, at the end)."""
    k1, k2, k3 = mx.random.split(mx.random.key(1), 3)
    gate, x, cot = [(mx.random.normal((64, 96), key=k) * 6).astype(dtype) for k in (k1, k2, k3)]

    def values_and_grads(f, *arrays):
        return [f(*arrays[:2]), *mx.grad(lambda g, v: (f(g, v) * arrays[2]).sum(), argnums=(0, 1))(*arrays[:2])]

    truth = values_and_grads(activations.swiglu, *(a.astype(mx.float32) for a in (gate, x, cot)))
    ours = values_and_grads(fast_exp.swiglu, gate, x, cot)
    theirs = values_and_grads(activations.swiglu, gate, x, cot)
    for t, a, b in zip(truth, ours, theirs):
        assert a.dtype == b.dtype == dtype
        err_ours, err_theirs = (mx.abs(v.astype(mx.float32) - t).max().item() for v in (a, b))
        assert err_ours <= max(1.01 * err_theirs, 1e-4 * mx.abs(t).max().item()), (err_ours, err_theirs)


def _attention_cases():
    # (batch, query heads, key heads, queries, keys, mask): grouped and plain heads; no mask, causal after a
    # cached prefix (keys > queries), a per-row boolean mask (packed rows), an additive one, one mask per head
    k = iter(mx.random.split(mx.random.key(2), 8))
    segments = mx.random.randint(0, 2, (2, 12), key=next(k)).cumsum(axis=1)
    pos = mx.arange(12)
    packed = ((pos[:, None] >= pos[None]) & (segments[:, :, None] == segments[:, None, :]))[:, None]
    return [(2, 6, 2, 5, 5, None), (2, 6, 2, 7, 11, "causal"), (2, 4, 4, 7, 11, "causal"), (2, 6, 3, 12, 12, packed),
            (1, 4, 2, 6, 9, mx.random.normal((6, 9), key=next(k))),
            (2, 4, 2, 6, 6, mx.random.bernoulli(0.7, (2, 4, 6, 6), key=next(k)) | mx.eye(6, dtype=mx.bool_))]


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_attention_values_and_gradients_equal_mlx(case, dtype):
    """Ours against MLX's own (what mlx-lm calls), both against MLX's in float32: as close as MLX's."""
    b, h, kv, lq, lk, mask = _attention_cases()[case]
    k1, k2, k3, k4 = mx.random.split(mx.random.key(case), 4)
    q, k, v, cot = (mx.random.normal(shape, key=key) for shape, key in
                    [((b, h, lq, 16), k1), ((b, kv, lk, 16), k2), ((b, kv, lk, 16), k3), ((b, h, lq, 16), k4)])

    def values_and_grads(f, *arrays):
        m = mask.astype(arrays[0].dtype) if isinstance(mask, mx.array) and mask.dtype != mx.bool_ else mask

        def out(q, k, v):
            return f(q, k, v, cache=None, scale=0.25, mask=m)
        return [out(*arrays[:3]), *mx.grad(lambda *a: (out(*a) * arrays[3]).sum(), argnums=(0, 1, 2))(*arrays[:3])]

    truth = values_and_grads(base.scaled_dot_product_attention, q, k, v, cot)
    args = [a.astype(dtype) for a in (q, k, v, cot)]
    ours = values_and_grads(fast_exp.scaled_dot_product_attention, *args)
    theirs = values_and_grads(base.scaled_dot_product_attention, *args)
    for t, a, b_ in zip(truth, ours, theirs):
        assert a.shape == t.shape and a.dtype == b_.dtype == dtype
        err_ours, err_theirs = (mx.abs(x.astype(mx.float32) - t).max().item() for x in (a, b_))
        assert err_ours <= max(1.5 * err_theirs, 1e-5 * mx.abs(t).max().item()), (err_ours, err_theirs)


def test_the_engine_and_evaluation_compute_through_it_with_the_same_loss(tmp_path, monkeypatch):
    monkeypatch.setattr(loss, "HEAD_SLICE", 96)  # the tied 400-row head in slices: the sliced loss's exps too
    path = make_tiny_model(tmp_path / "m", tie_word_embeddings=True)
    rng = np.random.default_rng(0)
    records = [Record(ids=rng.integers(3, 400, 40).tolist(), mask=[False] * 10 + [True] * 30) for _ in range(4)]
    batch = next(iterate_batches(records, 4, max_seq_length=64, loop=False, shuffle=False))
    calls = {"swiglu": 0, "exp": 0, "attention": 0}

    def counted(name, fn):
        def wrapper(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapper

    def run(fast: bool):
        monkeypatch.setattr(fast_exp, "on_cpu", lambda: fast)  # decided while the step is traced
        model, _ = load(path)
        apply_lora(model, lora_layers=-1, rank=4, alpha=8)
        args = training_args(iters=2, batch_size=4, seed=0, learning_rate=1e-2)
        engine = MLXEngine(model, make_optimizer(args), args)
        steps = [engine.step(batch, i) for i in (1, 2)]
        trained = dict(calls)
        return steps, evaluate_sums(model, records, 4, 64), trained

    monkeypatch.setattr(fast_exp, "swiglu", counted("swiglu", fast_exp.swiglu))
    monkeypatch.setattr(fast_exp, "_exp", counted("exp", fast_exp._exp))
    monkeypatch.setattr(fast_exp, "scaled_dot_product_attention",
                        counted("attention", fast_exp.scaled_dot_product_attention))
    reference = run(fast=False)
    assert calls == {"swiglu": 0, "exp": 0, "attention": 0}
    got = run(fast=True)
    # each trace of the step (2 blocks; the optimizer's state appears after step 1, so step 2 is traced again)
    # and the loss's 5 slices, forward and backward; then evaluation, eagerly (2 blocks, 5 slices)
    trained = got[2]
    assert trained["swiglu"] >= 2 and trained["attention"] >= 2 and trained["exp"] >= 10, trained
    assert calls["swiglu"] - trained["swiglu"] == 2 and calls["exp"] - trained["exp"] == 5, calls
    assert calls["attention"] - trained["attention"] == 2, calls
    # mlx-lm's own again after each
    assert llama.swiglu is activations.swiglu and llama.scaled_dot_product_attention is base.scaled_dot_product_attention
    for (t1, n1, g1), (t2, n2, g2) in zip(reference[0], got[0]):
        assert n1 == n2 and t1 == pytest.approx(t2, rel=1e-5) and g1 == pytest.approx(g2, rel=1e-4)
    assert reference[1] == pytest.approx(got[1], rel=1e-5)
