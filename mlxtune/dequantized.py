"""Quantized layers that compute through their de-quantized weights: QLoRA at float32 speed on the CPU.

On Apple silicon MLX's quantized matmul is a fast GPU kernel. On the CPU backend it runs at a few GFLOP/s,
~25-60x slower than a dense float32 matmul of the same shape, so a QLoRA step on a 135M model takes minutes
where float32 LoRA takes seconds. Where MLX runs on the CPU, `compute_dequantized` switches every affine
`nn.QuantizedLinear` (LoRA bases included, since a LoRA layer calls its base) and the tied head of a
`nn.QuantizedEmbedding` to `mx.dequantize(w, scales, biases)` then a float32 matmul, one layer at a time,
whenever a call carries at least `KERNEL_ROWS` token rows (one-token decoding keeps the kernel, faster there).

The one thing to know: the weights stay 4-bit at rest and are de-quantized when a layer runs, in the forward
pass and again in the backward pass (`mx.depends` on the layer's input, and on the incoming gradient, keeps
MLX from de-quantizing everything up front and `mx.compile` from sharing the forward copy), so only a layer
or two of float32 weights exist at any moment and peak memory stays that of a quantized model.
The values are those of the quantized kernel (the same `scale * q + bias`), summed in another order.

Half-precision weights have the same problem there: MLX's CPU matmul in float16 or bfloat16 runs at ~2
GFLOP/s against ~80 in float32 (512 x 576 by 1536, mlx 0.32), and its float16 element-wise ops, norms and
attention are 2-6x slower than float32's. So the same switch makes float16/bfloat16 `nn.Linear` and
`nn.Embedding` layers multiply through a float32 copy of their weight made when the layer runs (and again in
the backward pass, not kept), and every switched layer hands float32 activations on: the whole forward and
backward pass runs in float32 while the weights stay half precision at rest. (A float16 SmolLM2-135M: one
forward pass over 57 tokens took 9.8 s, 0.93 s switched.) MLX does not free these copies as promptly as the
de-quantized ones (docs/benchmarks.md, "Float16 weights on the CPU"): a float16 LoRA step peaks below a
float32 model's, not at a half-precision model's.
"""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import mlx.nn as nn

# Below this many rows (one token at a time: generation) the kernel wins: 2.6 ms against 7.0 ms for one row
# of 576 x 1536 at 4 bits, 8.5 against 6.6 for four (measured on the CPU backend, mlx 0.32).
KERNEL_ROWS = 4
HEAD_SLICE = 2048  # vocabulary rows of a quantized tied head de-quantized at a time


def _rows(x) -> int:
    return x.size // x.shape[-1] if x.ndim else 1


def on_cpu() -> bool:
    """Whether MLX computes on the CPU here (no Metal GPU, or the CPU chosen as default device)."""
    return mx.default_device().type == mx.DeviceType.cpu


@cache
def _dequantized_matmul(group_size: int, bits: int):
    """x @ dequantize(w).T in float32, as a function whose backward pass de-quantizes w again."""

    def weight(w, scales, biases):
        return mx.dequantize(w, scales, biases, group_size, bits, dtype=mx.float32)

    @mx.custom_function
    def matmul(x, w, scales, biases):
        # Not before x exists: MLX's scheduler would otherwise de-quantize every layer's weight up front
        # (they depend on nothing computed), and all of them would live through the forward pass.
        w, scales, biases = mx.depends([w, scales, biases], [x])
        return x.astype(mx.float32) @ weight(w, scales, biases).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w, scales, biases = primals
        # Recompute the weight after the gradient exists: without the dependency mx.compile would share the
        # forward pass's float32 copy, and every layer's copy would live until the backward pass.
        w, scales, biases = mx.depends([w, scales, biases], [cotangent])
        dx = (cotangent.astype(mx.float32) @ weight(w, scales, biases)).astype(x.dtype)
        # the frozen weights get no gradient: these zeros are never evaluated
        return dx, mx.zeros_like(w), mx.zeros_like(scales), mx.zeros_like(biases)

    return matmul


@cache
def _upcast_matmul():
    """x @ w.T in float32 for a half-precision w, as a function whose backward pass converts w again."""

    @mx.custom_function
    def matmul(x, w):
        (w,) = mx.depends([w], [x])  # not before x exists (see _dequantized_matmul)
        return x.astype(mx.float32) @ w.astype(mx.float32).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        x, w = primals
        (w,) = mx.depends([w], [cotangent])
        dx = (cotangent.astype(mx.float32) @ w.astype(mx.float32)).astype(x.dtype)
        # a weight that trains gets its gradient; for a frozen one this is never evaluated
        flat = cotangent.reshape(-1, cotangent.shape[-1]).astype(mx.float32)
        dw = (flat.T @ x.reshape(-1, x.shape[-1]).astype(mx.float32)).astype(w.dtype)
        return dx, dw

    return matmul


def _by_vocabulary_slice(matmul, x: mx.array, *table: mx.array) -> mx.array:
    """matmul(x, *rows of `table`) over HEAD_SLICE vocabulary rows at a time, joined: a tied head whose float32
    copy exists a slice at a time (see DequantizedEmbedding.as_linear)."""
    return mx.concatenate([matmul(x, *(t[lo:lo + HEAD_SLICE] for t in table))
                           for lo in range(0, table[0].shape[0], HEAD_SLICE)], axis=-1)


def _half(w: mx.array) -> bool:
    return w.dtype in (mx.float16, mx.bfloat16)


class UpcastLinear(nn.Linear):
    """An `nn.Linear` with float16/bfloat16 weights that multiplies in float32 (same parameters, same files)."""

    def __call__(self, x):
        y = _upcast_matmul()(x, self["weight"])
        return y + self["bias"] if "bias" in self else y


class UpcastEmbedding(nn.Embedding):
    """An `nn.Embedding` with a half-precision table that hands float32 vectors on, and whose tied head
    (`as_linear`) multiplies in float32, HEAD_SLICE vocabulary rows at a time."""

    def __call__(self, x):
        return super().__call__(x).astype(mx.float32)

    def as_linear(self, x):
        return _by_vocabulary_slice(_upcast_matmul(), x, self["weight"])


class DequantizedLinear(nn.QuantizedLinear):
    """An `nn.QuantizedLinear` (same parameters, same files) that multiplies through its de-quantized weight."""

    def __call__(self, x):
        if _rows(x) < KERNEL_ROWS:
            return super().__call__(x)
        y = _dequantized_matmul(self.group_size, self.bits)(x, self["weight"], self["scales"], self["biases"])
        return y + self["bias"] if "bias" in self else y


class DequantizedEmbedding(nn.QuantizedEmbedding):
    """An `nn.QuantizedEmbedding` whose tied head (`as_linear`) multiplies through the de-quantized table.

    The lookup itself already de-quantizes only the rows it takes; its vectors go on in float32.
    """

    def __call__(self, x):
        return super().__call__(x).astype(mx.float32)

    def as_linear(self, x):
        if _rows(x) < KERNEL_ROWS:
            return super().as_linear(x)
        # The table is the largest weight (49k x 576 floats is 113 MB for SmolLM2): de-quantize it in slices
        # of the vocabulary, so that only a slice at a time is float32, in the forward and the backward pass
        # (SmolLM2, batch 8: the step's transient memory is 0.92 GB with 2048-row slices, 1.02 with 8192, 1.26
        # whole; float32 LoRA's is 0.84 over a resting model 0.42 GB larger).
        return _by_vocabulary_slice(_dequantized_matmul(self.group_size, self.bits), x,
                                    self["weight"], self["scales"], self["biases"])


def _switchable(m: nn.Module) -> bool:
    # affine quantization only: the other modes (mxfp4, nvfp4, ...) have no biases and keep their kernel
    return getattr(m, "mode", "affine") == "affine" and "biases" in m


_SWITCHES = ((nn.QuantizedLinear, DequantizedLinear, _switchable),
             (nn.QuantizedEmbedding, DequantizedEmbedding, _switchable),
             (nn.Linear, UpcastLinear, lambda m: _half(m["weight"])),
             (nn.Embedding, UpcastEmbedding, lambda m: _half(m["weight"])))


def compute_dequantized(model: nn.Module, *, enable: bool = True) -> int:
    """Switch the model's affine quantized layers to compute through de-quantized weights, and its half-precision
    linear and embedding layers through float32 ones (or back, with `enable=False`), in place; returns how many
    layers are now switched. Parameters are untouched.

    Callers decide when: `models.load_model` and the MLX engine do it where `on_cpu()`.
    """
    for _, m in model.named_modules():
        for plain, switched, applies in _SWITCHES:
            # exact classes only: a subclass of mlx-lm's own (another kernel) is left as it is
            if enable and type(m) is plain and applies(m):
                m.__class__ = switched
            elif not enable and type(m) is switched:
                m.__class__ = plain
    return dequantized_layers(model)


def dequantized_layers(model: nn.Module) -> int:
    """How many layers of `model` compute through float32 copies of their weights (de-quantized or upcast)."""
    switched = tuple(s for _, s, _ in _SWITCHES)
    return sum(isinstance(m, switched) for _, m in model.named_modules())
