"""QLoRA on the CPU through de-quantized weights (mlxtune.dequantized), against MLX's quantized kernel.

The switched layers must train exactly as the kernel does (same losses, gradient norms and adapter after
steps of the compiled engine), keep their 4-bit parameters, switch back, and hold at most a few layers of
float32 weights during a backward pass.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlxtune import dequantized
from mlxtune.data import Record, iterate_batches
from mlxtune.dequantized import DequantizedEmbedding, DequantizedLinear, compute_dequantized, dequantized_layers, on_cpu
from mlxtune.layers import apply_lora, lora_modules
from mlxtune.mlx_engine import MLXEngine, make_optimizer
from mlxtune.models import load
from mlxtune.settings import training_args

from tiny import make_tiny_model

pytestmark = pytest.mark.skipif(not on_cpu(), reason="the de-quantized path is the CPU's; Metal keeps the kernel")


@pytest.fixture(scope="module")
def tied_tiny(tmp_path_factory):
    """A tiny llama whose head is its (to be quantized) embedding table, as SmolLM2's is."""
    return make_tiny_model(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


def _quantized_lora_engine(path, *, kernel: bool):
    model, _ = load(path)
    nn.quantize(model, group_size=32, bits=4)
    apply_lora(model, lora_layers=-1, rank=4, alpha=8, target_modules="all-linear")
    mx.random.seed(1)
    for layer in lora_modules(model).values():  # non-zero B: every LoRA tensor gets a gradient from step 1
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    args = training_args(iters=3, batch_size=2, seed=0, learning_rate=1e-2)
    engine = MLXEngine(model, make_optimizer(args), args)
    if kernel:  # the step is traced at its first call: switching back now makes it run MLX's kernel
        compute_dequantized(model, enable=False)
    return engine


def _batch(vocab: int):
    rng = np.random.default_rng(0)
    records = [Record(ids=rng.integers(3, vocab, 40).tolist(), mask=[False] * 10 + [True] * 30) for _ in range(2)]
    return next(iterate_batches(records, 2, max_seq_length=64, loop=False, shuffle=False))


def test_engine_trains_like_the_quantized_kernel(tied_tiny, monkeypatch):
    monkeypatch.setattr(dequantized, "HEAD_SLICE", 96)  # the tied head in several vocabulary slices (and a remainder)
    fast = _quantized_lora_engine(tied_tiny, kernel=False)
    slow = _quantized_lora_engine(tied_tiny, kernel=True)
    # every quantized linear layer (LoRA bases included) and the tied head's table are switched, or none
    n_quantized = sum(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in fast.model.named_modules())
    assert dequantized_layers(fast.model) == n_quantized == 2 * 7 + 1
    assert dequantized_layers(slow.model) == 0
    assert isinstance(fast.model.model.embed_tokens, DequantizedEmbedding)
    assert isinstance(fast.model.model.layers[0].mlp.down_proj.linear, DequantizedLinear)
    batch = _batch(fast.model.args.vocab_size)
    for k in (1, 2, 3):
        a, b = fast.step(batch, k), slow.step(batch, k)
        np.testing.assert_allclose(a, b, rtol=1e-4)
    ours, ref = fast.adapter_arrays(), slow.adapter_arrays()
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-3, atol=1e-5)  # Adam magnifies rounding near 0
    assert not np.allclose(ref[name], 0)  # the adapter did move


def test_parameters_stay_quantized_and_switch_back(tied_tiny):
    model, _ = load(tied_tiny)
    nn.quantize(model, group_size=32, bits=4)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert compute_dequantized(model) == 15
    after = dict(tree_flatten(model.parameters()))
    assert before.keys() == after.keys() and after["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert all(np.array_equal(before[k], np.array(v)) for k, v in after.items())
    assert compute_dequantized(model, enable=False) == 0
    assert type(model.model.layers[0].self_attn.q_proj) is nn.QuantizedLinear


def test_backward_pass_holds_few_float32_weights():
    """16 quantized 1024x1024 layers (64 MB in float32): a compiled gradient through them peaks well below that."""
    mx.random.seed(0)
    layers = [nn.QuantizedLinear(1024, 1024, bias=False, group_size=32, bits=4) for _ in range(16)]
    net = nn.Sequential(*layers)
    net.freeze()
    compute_dequantized(net)
    x = mx.random.normal((8, 1024))
    mx.eval(net.parameters(), x)
    grad = mx.compile(mx.grad(lambda x: (net(x) ** 2).sum()))
    mx.eval(grad(x))
    mx.reset_peak_memory()
    resting = mx.get_active_memory()  # the 4-bit weights
    mx.eval(grad(x))
    float32_weights = 16 * 1024 * 1024 * 4
    # measured: 0.43 (plain, uncompiled: 0.25); de-quantizing every weight up front, or sharing the forward
    # pass's copies with the backward pass, gives 1.1
    assert mx.get_peak_memory() - resting < 0.5 * float32_weights


# ------------------------------------------------------------------------- half-precision weights, float32 compute


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_layers_compute_in_float32_and_train_like_a_float32_copy(tied_tiny, dtype):
    """A float16/bfloat16 model on the CPU multiplies through float32 copies of its weights, one layer at a time
    (MLX's half-precision CPU matmul is ~50x slower): the same logits and LoRA steps as a float32 model holding
    the same (rounded) weights, while the parameters stay half precision."""
    from mlxtune.dequantized import UpcastEmbedding, UpcastLinear

    half, _ = load(tied_tiny)
    half.set_dtype(dtype)
    assert compute_dequantized(half) == 2 * 7 + 1  # every linear layer and the tied embedding
    assert isinstance(half.model.embed_tokens, UpcastEmbedding)
    assert isinstance(half.model.layers[1].self_attn.o_proj, UpcastLinear)
    assert half.model.layers[0].mlp.up_proj.weight.dtype == dtype
    copy, _ = load(tied_tiny)
    copy.update(tree_map(lambda w: w.astype(mx.float32), half.parameters()))
    assert compute_dequantized(copy) == 0  # float32 weights need no switch

    tokens = mx.array([[1, 7, 12, 40, 3, 9, 22, 5]])
    logits = half(tokens)
    assert logits.dtype == mx.float32  # float32 activations all the way through
    np.testing.assert_allclose(np.array(logits), np.array(copy(tokens)), rtol=1e-5, atol=1e-5)

    def engine(model):
        model.freeze()
        apply_lora(model, lora_layers=-1, rank=4, alpha=8, target_modules="all-linear")
        mx.random.seed(1)
        for layer in lora_modules(model).values():
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
        args = training_args(iters=3, batch_size=2, seed=0, learning_rate=1e-2)
        return MLXEngine(model, make_optimizer(args), args)

    ours, ref = engine(half), engine(copy)
    batch = _batch(half.args.vocab_size)
    for k in (1, 2, 3):
        np.testing.assert_allclose(ours.step(batch, k), ref.step(batch, k), rtol=1e-4)
    a, b = ours.adapter_arrays(), ref.adapter_arrays()
    for name in b:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-3, atol=1e-5)
    assert half.model.layers[0].mlp.up_proj.linear.weight.dtype == dtype
    assert compute_dequantized(half, enable=False) == 0
    assert type(half.model.layers[0].mlp.up_proj.linear) is nn.Linear and type(half.model.embed_tokens) is nn.Embedding


def test_a_half_precision_weight_that_trains_gets_its_gradient():
    mx.random.seed(0)
    layer = nn.Linear(64, 32)
    layer.set_dtype(mx.float16)
    reference = nn.Linear(64, 32)
    reference.update(tree_map(lambda w: w.astype(mx.float32), layer.parameters()))
    compute_dequantized(layer)
    x = mx.random.normal((3, 5, 64))

    def grads(m):
        return nn.value_and_grad(m, lambda m: (m(x) ** 2).sum())(m)

    (loss, g), (ref_loss, ref_g) = grads(layer), grads(reference)
    assert g["weight"].dtype == mx.float16
    np.testing.assert_allclose(loss.item(), ref_loss.item(), rtol=1e-5)
    np.testing.assert_allclose(np.array(g["weight"].astype(mx.float32)), np.array(ref_g["weight"]), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(np.array(g["bias"].astype(mx.float32)), np.array(ref_g["bias"]), rtol=2e-3, atol=2e-3)

