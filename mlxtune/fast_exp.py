"""The CPU's versions of three things a training step spends its element-wise time on: SwiGLU's sigmoid, the
loss's softmax and attention.

MLX's CPU `exp` (and `sigmoid`, `tanh`) runs at ~28 ns an element on this x86 machine, one element at a time; the
same kind of polynomial written as MLX multiplies and adds runs ~3x faster inside a compiled step, with the
same accuracy (largest relative error over float32's range ~4e-6 against float64, as `mx.exp`'s). SmolLM2's
SwiGLU alone evaluates 30 x 400 x 1536 sigmoids per 8-row batch, which took more time than the MLP's three
matmuls, and the loss 2 x 256 x 49,152 exps. MLX's CPU attention is a fallback composed of ops that copies each
key head once per query head of its group and evaluates MLX's `exp`; ours stacks a group's queries instead.
Metal's `exp` and attention are fast, so off the CPU every function here is MLX's own, and so it is with
MLXTUNE_FAST_EXP=0 (to compare, or to rule this module out when chasing a numerical question).

mlx-lm's model files stay as they are: `cpu_swaps(model)` points the names `swiglu` and
`scaled_dot_product_attention` in the model's own modules (bound there by `from .activations import swiglu` and
`from .base import ...`) at the functions below while a step is traced, and back after.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu
from mlx_lm.models.base import scaled_dot_product_attention as mlx_lm_attention

from .dequantized import on_cpu

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# Taylor coefficients of 2**f = exp(f ln 2), highest first: degree 7 on |f| <= 1/2 is within float32 rounding
_ROUND = 1.5 * 2**23  # |t| < 2**22 plus this lands where float32's spacing is exactly 1
_TAYLOR = [_LN2**k / f for k, f in ((7, 5040), (6, 720), (5, 120), (4, 24), (3, 6), (2, 2), (1, 1), (0, 1))]


def _fast() -> bool:
    return on_cpu() and os.environ.get("MLXTUNE_FAST_EXP", "1") != "0"


def _poly_exp(x: mx.array) -> mx.array:
    """exp(x) = 2**n * 2**f with n = round(x log2 e): 2**n written into the float's exponent bits, 2**f a
    polynomial. Inputs are clipped to [-87, 88] (float32's normal range), so exp(-1000) is 1.6e-38, not 0: far
    below anything a sum of exps or a sigmoid can tell apart."""
    t = mx.clip(x, -87.0, 88.0) * _LOG2E
    n = (t + _ROUND) - _ROUND  # t rounded to the nearest integer by float addition: MLX's floor is a libm call here
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


def _grouped(mask: mx.array, heads: int, kv_heads: int) -> mx.array:
    """A mask for (B, H, L, S) scores, for the same scores viewed as (B, kv_heads, H / kv_heads, L, S)."""
    if mask.ndim < 3:
        return mask
    if mask.shape[-3] == heads and heads > 1:
        return mask.reshape(*mask.shape[:-3], kv_heads, heads // kv_heads, *mask.shape[-2:])
    return mx.expand_dims(mask, -3)


def scaled_dot_product_attention(queries, keys, values, cache, scale: float, mask, sinks=None):
    """mlx-lm's `base.scaled_dot_product_attention` for the CPU. MLX's CPU version (a fallback composed of ops)
    broadcasts each key head over its group of query heads, copying the keys and values, and runs one small
    matmul per query head; here a group's queries are stacked into one matrix per key head (the head mapping
    is the same: query head h reads key head h // group)."""
    if sinks is not None or hasattr(cache, "bits"):
        return mlx_lm_attention(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    B, H, L, D = queries.shape
    kv_heads, S = keys.shape[1], keys.shape[2]
    s = (queries * scale).reshape(B, kv_heads, H // kv_heads * L, D) @ keys.swapaxes(-1, -2)
    if mask is not None:
        s = s.reshape(B, kv_heads, H // kv_heads, L, S)
        if isinstance(mask, str):  # "causal", aligned to the last query: query i sees keys up to S - L + i
            s = mx.where(mx.arange(S - L, S)[:, None] >= mx.arange(S)[None], s, mx.finfo(s.dtype).min)
        elif mask.dtype == mx.bool_:
            s = mx.where(_grouped(mask, H, kv_heads), s, mx.finfo(s.dtype).min)
        else:
            s = s + _grouped(mask, H, kv_heads).astype(s.dtype)
        s = s.reshape(B, kv_heads, H // kv_heads * L, S)
    # MLX's softmax: one pass over the scores. Through `_poly_exp` it took ~5 (the polynomial compiles into
    # several loops) and held ~3x the memory at its peak, for ~2% of a SmolLM2 step.
    return (mx.softmax(s, axis=-1, precise=True).astype(values.dtype) @ values).reshape(B, H, L, -1)


# The names the model's own modules bound with `from .x import y`, and mlx-lm's function under each; ours is the
# function of the same name here.
_SWAPS = {"swiglu": mlx_lm_swiglu, "scaled_dot_product_attention": mlx_lm_attention}


@contextmanager
def cpu_swaps(model: nn.Module):
    """While inside, on the CPU, the model's own modules call `swiglu` and `scaled_dot_product_attention` above
    where they called mlx-lm's. Enter it inside a compiled function: the trace keeps it, and every new shape is
    traced inside it again."""
    swapped = []
    if _fast():
        names = {type(m).__module__ for _, m in model.named_modules()}
        modules = [sys.modules[n] for n in names if n in sys.modules]
        swapped = [(m, name, theirs, globals()[name]) for m in modules for name, theirs in _SWAPS.items()
                   if getattr(m, name, None) is theirs]
    for module, name, _, ours in swapped:
        setattr(module, name, ours)
    try:
        yield
    finally:
        for module, name, theirs, _ in swapped:
            setattr(module, name, theirs)
