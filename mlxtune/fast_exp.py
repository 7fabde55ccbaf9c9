"""exp on the CPU from multiplies and adds, for the two places a training step spends it: SwiGLU's sigmoid and the
loss's softmax.

MLX's CPU `exp` (and `sigmoid`, `tanh`) runs at ~28 ns an element on this x86 machine, one element at a time; the
same kind of polynomial written as MLX multiplies and adds runs ~3x faster inside a compiled step, with the
same accuracy (largest relative error over float32's range ~4e-6 against float64, as `mx.exp`'s). SmolLM2's
SwiGLU alone evaluates 30 x 400 x 1536 sigmoids per 8-row batch, which took more time than the MLP's three
matmuls, and the loss 2 x 256 x 49,152 exps. Metal's `exp` is fast, so off the CPU every function here is MLX's own, and
so it is with MLXTUNE_FAST_EXP=0 (to compare, or to rule this module out when chasing a numerical question).

mlx-lm's model files stay as they are: `cpu_swiglu(model)` points the name `swiglu` in the model's own modules
(bound there by `from .activations import swiglu`) at `swiglu` below while a step is traced, and back after.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

from .dequantized import on_cpu

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# Taylor coefficients of 2**f = exp(f ln 2), highest first: degree 7 on |f| <= 1/2 is within float32 rounding
_TAYLOR = [_LN2**k / f for k, f in ((7, 5040), (6, 720), (5, 120), (4, 24), (3, 6), (2, 2), (1, 1), (0, 1))]


def _fast() -> bool:
    return on_cpu() and os.environ.get("MLXTUNE_FAST_EXP", "1") != "0"


def _poly_exp(x: mx.array) -> mx.array:
    """exp(x) = 2**n * 2**f with n = round(x log2 e): 2**n written into the float's exponent bits, 2**f a
    polynomial. Inputs are clipped to [-87, 88] (float32's normal range), so exp(-1000) is 1.6e-38, not 0: far
    below anything a sum of exps or a sigmoid can tell apart."""
    t = mx.clip(x, -87.0, 88.0) * _LOG2E
    n = mx.floor(t + 0.5)
    f = t - n
    p = _TAYLOR[0]
    for c in _TAYLOR[1:]:
        p = p * f + c
    return p * mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)


@mx.custom_function
def _exp(x):
    return _poly_exp(x.astype(mx.float32)).astype(x.dtype)


@_exp.vjp
def _exp_vjp(primals, cotangent, output):
    return cotangent * output


def exp(x: mx.array) -> mx.array:
    """mx.exp, through the polynomial on the CPU."""
    return _exp(x) if _fast() else mx.exp(x)


def logsumexp(z: mx.array, axis: int = -1) -> mx.array:
    """mx.logsumexp over one axis, through `exp` (for finite inputs)."""
    if not _fast():
        return mx.logsumexp(z, axis=axis)
    m = mx.stop_gradient(z.max(axis=axis, keepdims=True))
    return (m + mx.log(_exp(z - m).sum(axis=axis, keepdims=True))).squeeze(axis)


@mx.custom_function
def _swiglu(gate, x):
    s = 1 / (1 + _poly_exp(-gate.astype(mx.float32)))
    return (gate * s * x).astype(x.dtype), s


@_swiglu.vjp
def _swiglu_vjp(primals, cotangents, outputs):
    gate, x = primals
    d, s = cotangents[0], outputs[1]  # the sigmoid saved forward: the backward pass computes no exp
    return ((d * x * s * (1 + gate * (1 - s))).astype(gate.dtype), (d * gate * s).astype(x.dtype))


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, mlx-lm's `activations.swiglu`, with the sigmoid through the polynomial."""
    return _swiglu(gate, x)[0]


@contextmanager
def cpu_swiglu(model: nn.Module):
    """While inside, on the CPU, the model's own modules call `swiglu` above where they called mlx-lm's. Enter
    it inside a compiled function: the trace keeps it, and every new shape is traced inside it again."""
    swapped = []
    if _fast():
        names = {type(m).__module__ for _, m in model.named_modules()}
        swapped = [sys.modules[n] for n in names if getattr(sys.modules.get(n), "swiglu", None) is mlx_lm_swiglu]
    for module in swapped:
        module.swiglu = swiglu
    try:
        yield
    finally:
        for module in swapped:
            module.swiglu = mlx_lm_swiglu
