"""The training loss on MLX: token-weighted cross-entropy on target tokens only, and the batch arrays it takes.

A batch from `mlxtune.data` (numpy: inputs, targets, loss mask, optional packing segments) becomes the arrays
`prepare_batch` returns; `token_loss` turns them into (sum of token losses, number of target tokens). The one
thing to know: the vocabulary projection runs only on target positions. `model_parts` splits the model into
body (tokens -> hidden states) and head (hidden -> logits), checked numerically once per model, and the hidden
states of target positions are gathered before the head, which is where most of the speed and memory saving
over a plain `model(inputs)` comes from. Packed rows get block-diagonal attention by swapping the mask
function mlx-lm's model files call, without touching those files.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import create_attention_mask as cache_mask

from .data import evaluation_batches, round_up
from .errors import ConfigError, DataError, FallbackWarning
from .fast_exp import cpu_swaps, exp, logsumexp


@dataclass
class ModelParts:
    """How to run a model as body (tokens -> hidden states) + head (hidden -> logits), and where its mask comes from."""

    body: Callable | None  # None: no split found, use model(inputs) and weight every position
    head: Callable | None
    mask_modules: list  # the python modules whose `create_attention_mask` the model calls
    packing: bool = True  # verified: a packed row gives the same loss as its examples one by one
    projection: nn.Module | None = None  # the head's frozen vocabulary projection when the loss can slice it
    cap: float | None = None  # final logit soft-capping (Gemma 2)
    prefixed: Callable | None = None  # (prefix ids, rows' ids, *stages) -> flat hidden states; None: not verified
    staged: bool = False  # verified: rows may run in stages of fewer rows (`_stages`)
    checkpointed: bool = False  # its blocks recompute their activations in the backward (checkpoint_blocks)


def _find_parts(model: nn.Module) -> ModelParts:
    inner = model.get("model") if isinstance(model, dict) else None
    mods = {sys.modules[type(m).__module__] for _, m in model.named_modules()}
    mask_modules = [m for m in mods if hasattr(m, "create_attention_mask")]
    if not isinstance(inner, nn.Module):
        return ModelParts(None, None, mask_modules)
    if "lm_head" in model and not getattr(model, "tie_word_embeddings", False):
        owner = proj = model.lm_head
    elif hasattr(inner, "embed_tokens") and hasattr(inner.embed_tokens, "as_linear"):
        owner, proj = inner.embed_tokens, inner.embed_tokens.as_linear
    else:
        return ModelParts(None, None, mask_modules)
    args = getattr(model, "args", None)
    cap = getattr(model, "final_logit_softcapping", None) or getattr(args, "final_logit_softcapping", None)

    def head(h):
        logits = proj(h)
        return mx.tanh(logits / cap) * cap if cap else logits

    layers = getattr(inner, "layers", None)
    prefixed = _prefixed_body(inner, len(layers)) if isinstance(layers, list) else None
    return ModelParts(lambda inputs: inner(inputs), head, mask_modules, projection=_sliceable(owner), cap=cap,
                      prefixed=prefixed)


# ---------------------------------------------------------------------------------------- the shared prefix

PREFIX_STEP = 8  # shared prefixes are cut to a multiple of this, so that mx.compile sees few shapes


class _PrefixCache:
    """One layer's keys and values so far, in the three things mlx-lm's attention asks of a cache (offset,
    update_and_fetch, make_mask). The first call (the prefix, one row) records them; each later call (the
    rows' next columns, at the positions after what is recorded) attends to them, broadcast over its rows or
    cut to them (a stage holds the first rows of the one before), so the gradient of every row flows back
    into the one prefix pass."""

    def __init__(self):
        self.offset, self.keys, self.values = 0, None, None

    def _joined(self, old: mx.array, new: mx.array) -> mx.array:
        if old is None:
            return new
        rows = new.shape[0]
        old = old[:rows] if old.shape[0] >= rows else mx.broadcast_to(old, (rows, *old.shape[1:]))
        return mx.concatenate([old, new], axis=2)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = self._joined(self.keys, keys), self._joined(self.values, values)
        self.offset = self.keys.shape[2]
        return self.keys, self.values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        return cache_mask(n, offset=self.offset, return_array=return_array, window_size=window_size)


def _prefixed_body(inner: nn.Module, layers: int) -> Callable:
    def body(prefix: mx.array, inputs: mx.array, *stages: mx.array) -> mx.array:
        """Hidden states (flat: positions x hidden) of `inputs` after `prefix` (may be empty), then of each of
        `stages`: the next columns of the first rows of the one before (see `_stages`)."""
        cache = [_PrefixCache() for _ in range(layers)]
        if prefix.shape[0]:
            inner(prefix[None], cache=cache)  # only its keys and values are used: MLX never computes the rest
        hs = [inner(x, cache=cache) for x in (inputs, *stages)]
        return mx.concatenate([h.reshape(-1, h.shape[-1]) for h in hs])

    return body


STAGE_STEP = 16  # stage boundaries fall on multiples of this many columns, so that mx.compile sees few shapes
STAGE_COST = 48  # positions a stage must save to pay for itself (one more pass of small ops through the blocks)
MAX_STAGES = 3


def _stages(ends: np.ndarray, width: int) -> list[tuple[int, int, int]]:
    """(rows, first column, end column) of each stage, for rows whose live columns `ends` are in decreasing
    order: the first stage runs every row up to its end column, each later one only the rows that reach past
    the one before, from there. Positions after a row's last target cannot change any loss (attention is causal), so a batch
    of mixed lengths skips most of its padding; the cut that runs the fewest positions (each extra stage
    counted as STAGE_COST) wins, fewer stages and then earlier boundaries on a tie, so rows of one length stay
    in one stage. Every cut is costed at once (the memory planner runs this on thousands of batches)."""
    cuts = np.arange(STAGE_STEP, width, STAGE_STEP)
    reach = (np.asarray(ends)[None, :] > np.concatenate([[0], cuts])[:, None]).sum(1)  # rows past 0, then each cut
    best, plan = len(ends) * width, [(len(ends), 0, width)]
    for n in range(1, MAX_STAGES):
        picks = _combinations(len(cuts), n)  # indices into cuts, lexicographic
        if not len(picks):
            break
        lo = np.concatenate([np.zeros((len(picks), 1), np.int64), cuts[picks]], axis=1)
        hi = np.concatenate([cuts[picks], np.full((len(picks), 1), width)], axis=1)
        rows = np.concatenate([np.full((len(picks), 1), reach[0]), reach[picks + 1]], axis=1)
        cost = (rows * (hi - lo)).sum(1) + STAGE_COST * n
        cost[rows[:, -1] == 0] = best  # a stage without rows is no plan
        i = int(np.argmin(cost))
        if cost[i] < best:
            best, plan = int(cost[i]), [(int(r), int(a), int(b)) for r, a, b in zip(rows[i], lo[i], hi[i])]
    return plan


@functools.lru_cache(maxsize=64)
def _combinations(k: int, n: int) -> np.ndarray:
    return np.array(list(itertools.combinations(range(k), n)), np.int64).reshape(-1, n)


def shared_prefix(inputs: np.ndarray, mask: np.ndarray) -> int:
    """Leading columns that every row holds the same tokens in and no row takes loss on, cut to a multiple
    of PREFIX_STEP; 0 when that leaves nothing (or a single row) to share. Their hidden states feed no loss,
    only the attention of later positions, so one pass over them serves every row."""
    if len(inputs) < 2 or not mask.any():
        return 0
    same = (inputs == inputs[:1]).all(0)
    n = len(same) if same.all() else int(np.argmin(same))
    n = min(n, int(np.argmax(mask.any(0))))
    return n // PREFIX_STEP * PREFIX_STEP


# ---------------------------------------------------------------------------------------- the sliced head

HEAD_SLICE = 4096  # vocabulary rows the loss projects onto at a time (see `_sliced_cross_entropy`)
HEAD_KEEP = 1 << 27  # bytes of the sliced head's exps kept from its forward pass for its backward (`head_kept`)


def _sliceable(module) -> nn.Module | None:
    """`module` if the loss may project onto slices of its rows: a frozen, plain or affine-quantized
    Linear/Embedding (a LoRA-adapted head, or another kind, goes through the whole projection)."""
    from .dequantized import DequantizedEmbedding, DequantizedLinear, UpcastEmbedding, UpcastLinear, _switchable

    plain = (nn.Linear, nn.Embedding, UpcastLinear, UpcastEmbedding)  # (a half-precision w meets float32 h: promoted)
    quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding, DequantizedLinear, DequantizedEmbedding)
    if type(module) in quantized:
        return module if _switchable(module) else None
    return module if type(module) in plain else None


def head_slice(parts: ModelParts, grad: bool = True) -> int:
    """Vocabulary rows whose logits the loss holds at once: HEAD_SLICE where it slices the head (a projection
    with more rows than that, frozen when the loss is differentiated: `_sliced_cross_entropy`'s VJP is for the
    hidden states only), else 0 for the whole vocabulary. The memory planner asks the same question here."""
    p = parts.projection
    if p is None or p["weight"].shape[0] <= HEAD_SLICE or (grad and tree_flatten(p.trainable_parameters())):
        return 0
    return HEAD_SLICE


def head_kept(rows: int, vocab: int, checkpointed: bool, capped: bool = False) -> bool:
    """Whether the sliced head keeps its exps (rows x vocabulary float32) from the forward pass for the
    backward instead of projecting again: one vocabulary matmul and one exp per logit fewer a step (the head's
    forward and backward on SmolLM2's 256 target rows: 0.27 -> 0.20 s, ~3.5% of a step), for rows x vocab x 4
    bytes held from the head's forward to its backward. Up to HEAD_KEEP bytes (128 MiB: 256-320 rows of a 49k
    vocabulary take 50-63 MB), not under gradient checkpointing, which asks for memory before time, and not for
    soft-capped logits (Gemma 2), whose backward needs the logits too. The memory planner asks the same question
    here."""
    return not checkpointed and not capped and rows * vocab * 4 <= HEAD_KEEP


def _slice_logits(module: nn.Module, h: mx.array, lo: int, hi: int) -> mx.array:
    """h @ rows lo:hi of the projection's weight, as its own forward pass computes them."""
    from .dequantized import KERNEL_ROWS, DequantizedEmbedding, DequantizedLinear, _dequantized_matmul, _rows

    w = module["weight"][lo:hi]
    if "scales" in module:
        scales, biases = module["scales"][lo:hi], module["biases"][lo:hi]
        # de-quantized once h exists, not as early as MLX likes: more slices' float32 copies (and the
        # de-quantization's temporaries) overlapped (SmolLM2's 4-bit head, 64 rows: 80 MB at its peak, 68 MB)
        w, scales, biases = mx.depends([w, scales, biases], [h])
        if isinstance(module, (DequantizedLinear, DequantizedEmbedding)) and _rows(h) >= KERNEL_ROWS:
            z = _dequantized_matmul(module.group_size, module.bits)(h, w, scales, biases)
        else:
            z = mx.quantized_matmul(h, w, scales, biases, transpose=True, group_size=module.group_size,
                                    bits=module.bits)
    else:
        z = h @ w.T
    return z + module["bias"][lo:hi] if "bias" in module else z


def _slice_input_grad(module: nn.Module, dz: mx.array, lo: int, hi: int) -> mx.array:
    """dz @ rows lo:hi of the projection's weight: the gradient of `_slice_logits` with respect to h."""
    w = module["weight"][lo:hi]
    if "scales" not in module:
        return dz @ w
    scales, biases = module["scales"][lo:hi], module["biases"][lo:hi]
    w, scales, biases = mx.depends([w, scales, biases], [dz])  # de-quantized when dz exists (see _slice_logits)
    return dz @ mx.dequantize(w, scales, biases, module.group_size, module.bits).astype(dz.dtype)


def _sliced_cross_entropy(parts: ModelParts, h: mx.array, t: mx.array, grad: bool = True) -> mx.array:
    """Per-row cross-entropy of the head's logits for (rows, hidden) states `h` and targets `t`, without the
    whole (rows, vocabulary) logits: HEAD_SLICE rows of the projection at a time give a running log-sum-exp
    and the target logits that fall in them, forward. For the gradient each slice's exps are kept from the
    forward pass (`head_kept`: small enough, and `grad`) or the slice is projected again. SmolLM2 (49k
    vocabulary, 8-bit tied embedding), 256 target rows: the head's temporaries were ~240-290 MB in one piece
    (logits, softmax and gradients, 50 MB each). The same values as `nn.losses.cross_entropy` on the whole
    logits, summed in another order."""
    module, cap = parts.projection, parts.cap
    vocab = module["weight"].shape[0]
    slices = [(lo, min(lo + HEAD_SLICE, vocab)) for lo in range(0, vocab, HEAD_SLICE)]
    keep = grad and head_kept(h.shape[0], vocab, parts.checkpointed, capped=bool(cap))

    def logits(x, lo, hi):
        z = _slice_logits(module, x, lo, hi).astype(mx.float32)
        return mx.tanh(z / cap) * cap if cap else z

    def after(x, previous):
        # MLX runs independent branches in any order, so without this every slice's logits could exist at
        # once: each slice starts once the previous one is reduced.
        return x if previous is None else mx.depends([x], previous)[0]

    @mx.custom_function
    def loss(x, targets):
        lse = target = previous = None
        kept = []  # each slice's exp(z - its row maxima), and those maxima
        for lo, hi in slices:
            z = logits(after(x, previous), lo, hi)
            at = mx.take_along_axis(z, mx.clip(targets - lo, 0, hi - lo - 1)[:, None], axis=-1)[:, 0]
            if keep:
                top = z.max(axis=-1)
                e = exp(z - top[:, None])
                part = top + mx.log(e.sum(axis=-1))
                kept += [e, top]
            else:
                part = logsumexp(z, axis=-1)
            hit = mx.where((targets >= lo) & (targets < hi), at, 0.0)
            lse = part if lse is None else mx.logaddexp(lse, part)
            target = hit if target is None else target + hit
            previous = [lse, target]
        return (lse - target, lse, *kept)

    @loss.vjp
    def loss_vjp(primals, cotangents, outputs):
        x, targets = primals
        d, lse = cotangents[0], outputs[1]
        dx = previous = None
        for i, (lo, hi) in enumerate(slices):
            if keep:  # softmax = exp(z - top) * exp(top - lse)
                e, top = outputs[2 + 2 * i], outputs[3 + 2 * i]
                dz = after(e, previous) * exp(top - lse)[:, None]
            else:
                z = logits(after(x, previous), lo, hi)
                dz = exp(z - lse[:, None])  # softmax
            dz = dz - (mx.arange(lo, hi)[None] == targets[:, None])
            dz = dz * d[:, None]
            if cap:
                dz = dz * (1 - (z / cap) ** 2)
            part = _slice_input_grad(module, dz.astype(x.dtype), lo, hi)
            dx = part if dx is None else dx + part
            previous = [dx]
        return dx, mx.zeros_like(targets)

    return loss(h, t)[0]


def model_parts(model: nn.Module) -> ModelParts:
    """Find (and check numerically, once per model) the body/head split and packed-attention support."""
    parts = model.__dict__.get("_mlxtune_parts")
    if parts is not None:
        return parts
    parts = _find_parts(model)
    was_training = model.training
    model.eval()
    ids = mx.array([[3, 7, 1, 9, 4, 2, 8, 5], [6, 2, 9, 3, 1, 7, 4, 2]]) % _vocab_size(model)
    try:
        if parts.body is not None:
            full = model(ids).astype(mx.float32)
            try:
                split = parts.head(parts.body(ids)).astype(mx.float32)
                same = split.shape == full.shape and mx.allclose(full, split, rtol=1e-3, atol=1e-3).item()
            except TypeError:  # an inner model with another calling convention
                same = False
            if not same:
                parts.body = parts.head = parts.projection = parts.prefixed = None
                warnings.warn(f"{type(model).__module__}: the body/head split does not reproduce the model's logits, "
                              "so the loss runs the vocabulary projection on every position (slower, more memory)",
                              FallbackWarning, stacklevel=2)
        if parts.prefixed is not None:  # two rows sharing their first 4 tokens, through the prefix pass
            rows = mx.concatenate([mx.broadcast_to(ids[:1, :4], (2, 4)), ids[:, 4:]], axis=1)
            whole = parts.body(rows)[:, 4:].astype(mx.float32)
            try:
                split = parts.prefixed(rows[0, :4], rows[:, 4:]).astype(mx.float32)
                if not mx.allclose(whole.reshape(split.shape), split, rtol=1e-3, atol=1e-3).item():
                    parts.prefixed = None
            except (TypeError, ValueError, AttributeError, IndexError):  # a cache this model cannot use
                parts.prefixed = None
        if parts.prefixed is not None:  # in stages: both rows' next 2 columns, then row 0's last 2
            try:
                split = parts.prefixed(rows[0, :4], rows[:, 4:6], rows[:1, 6:]).astype(mx.float32)
                expect = mx.concatenate([whole[:, :2].reshape(-1, whole.shape[-1]), whole[0, 2:]])
                parts.staged = mx.allclose(expect, split, rtol=1e-3, atol=1e-3).item()
            except (TypeError, ValueError, AttributeError, IndexError):
                parts.staged = False
        # Packing check: two rows, each holding two examples, must score as the examples do alone.
        # (Two rows with different layouts catch attention code that broadcasts a per-row mask wrongly.)
        a, b = ids[:1, :5], ids[1:, :3]
        seg = mx.array([[1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 2, 2, 2, 2, 2]])
        rows = mx.concatenate([mx.concatenate([a, b], 1), mx.concatenate([b, a], 1)])
        try:
            packed = _logits(model, parts, rows, seg)
            la, lb = _logits(model, parts, a, None), _logits(model, parts, b, None)
            alone = mx.concatenate([mx.concatenate([la, lb], 1), mx.concatenate([lb, la], 1)])
            parts.packing = bool(mx.allclose(packed, alone, rtol=1e-3, atol=1e-3).item())
        except ValueError:  # attention that cannot broadcast a per-row mask: training says so when --pack is asked
            parts.packing = False
    finally:
        model.train(was_training)
    object.__setattr__(model, "_mlxtune_parts", parts)
    return parts


def _vocab_size(model) -> int:
    args = getattr(model, "args", None)
    return int(getattr(args, "vocab_size", 0) or 0) or 16


def _segment_mask(segments: mx.array):
    """A create_attention_mask replacement: causal AND same segment, (B, 1, L, L) booleans."""

    def create_attention_mask(h, cache=None, window_size=None, return_array=False, **_):
        pos = mx.arange(segments.shape[1])
        mask = (pos[:, None] >= pos[None]) & (segments[:, :, None] == segments[:, None, :])
        if window_size:
            mask = mask & (pos[:, None] < pos[None] + window_size)
        return mask[:, None]

    return create_attention_mask


@contextlib.contextmanager
def _attention_segments(parts: ModelParts, segments):
    # mlx-lm models build their causal mask with the create_attention_mask they import; swapping that
    # name while the graph is traced gives every architecture block-diagonal attention without touching
    # model code. Positions keep counting across a packed row; RoPE is relative so that changes nothing.
    if segments is None:
        yield
        return
    fn = _segment_mask(segments)
    saved = [(m, m.create_attention_mask) for m in parts.mask_modules]
    try:
        for m, _ in saved:
            m.create_attention_mask = fn
        yield
    finally:
        for m, old in saved:
            m.create_attention_mask = old


def _logits(model, parts, inputs, segments):
    with _attention_segments(parts, segments):
        if parts.body is None:
            return model(inputs)
        return parts.head(parts.body(inputs))


def _loss_sums(model, parts: ModelParts, inputs, targets, weights, index=None, segments=None, grad=True,
               prefix=None, stages=()):
    """(sum of token losses, number of loss tokens). With `index`, only those flat positions reach the head.
    `grad=False`: the sums are not differentiated (evaluation), so a head that trains may be sliced too.
    `prefix`: token ids that precede every row of `inputs`, and `stages` the columns that follow it in
    fewer rows (`batch_arrays(share=True)`)."""
    with _attention_segments(parts, segments):
        if parts.body is not None:
            h = parts.body(inputs) if prefix is None else parts.prefixed(prefix, inputs, *stages)
            h = h.reshape(-1, h.shape[-1])
            t = targets.reshape(-1)
            if index is not None:
                h, t = h[index], t[index]
            if head_slice(parts, grad):
                return (_sliced_cross_entropy(parts, h, t, grad) * weights).sum(), weights.sum()
            logits = parts.head(h)
        else:
            logits = model(inputs)
            logits, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
            if index is not None:
                logits, t = logits[index], t[index]
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), t) * weights
    return ce.sum(), weights.sum()


def _bucket(n: int) -> int:
    # Gathered lengths are rounded up (<= 12.5% waste) so mx.compile sees few distinct shapes.
    return max(64, round_up(n, 1 << max(6, n.bit_length() - 3)))


def batch_arrays(batch, gather: bool = True, bucket: bool = True, share: bool = False,
                 stage: bool = False) -> list[np.ndarray]:
    """Batch -> the numpy arrays every engine's loss takes: [inputs, targets, weights, index, segments?].

    Trailing columns with no loss in any row are dropped: attention is causal, so they cannot change the
    loss of earlier positions. With `gather`, `index` lists the flat target positions (zero-weighted
    padding up to a `_bucket` length when `bucket`, so that mx.compile sees few shapes) and `weights` their
    loss weights; without it, `weights` is the whole flattened mask and there is no index.
    `share` (gathered, unpacked batches only): the columns of `shared_prefix` leave `inputs` and `targets`
    and come last, one row of ids: [inputs, targets, weights, index, prefix].
    `stage` (with `share`): rows of mixed lengths run in `_stages`, longest rows first. `inputs` is then the
    first stage, the later stages' ids come before the prefix (empty if there is none), and `targets` and
    `index` are flat over the stages' positions, one stage after the other: [inputs, targets, weights, index,
    *stages, prefix].
    """
    inputs = np.asarray(batch.inputs, np.int32)
    targets = np.asarray(batch.targets, np.int32)
    mask = np.asarray(batch.loss_mask, np.float32)
    segments = None if batch.segments is None else np.asarray(batch.segments, np.int32)
    used = np.flatnonzero(mask.any(0))
    length = min(inputs.shape[1], round_up(int(used[-1]) + 1 if len(used) else 1, 32))
    inputs, targets, mask = inputs[:, :length], targets[:, :length], mask[:, :length]
    if segments is not None:
        segments = segments[:, :length]
    prefix, stages = None, []
    if share and gather and segments is None:
        p = shared_prefix(inputs, mask)
        if p:
            prefix = inputs[0, :p]
            inputs, targets, mask = inputs[:, p:], targets[:, p:], mask[:, p:]
        if stage:
            ends = np.where(mask.any(1), mask.shape[1] - np.argmax(mask[:, ::-1] > 0, axis=1), 0)
            order = np.argsort(-ends, kind="stable")
            plan = _stages(ends[order], inputs.shape[1])
            if len(plan) > 1:
                inputs, targets, mask = inputs[order], targets[order], mask[order]
                stages = [inputs[:rows, lo:hi] for rows, lo, hi in plan]
                targets = np.concatenate([targets[:rows, lo:hi].reshape(-1) for rows, lo, hi in plan])
                mask = np.concatenate([mask[:rows, lo:hi].reshape(-1) for rows, lo, hi in plan])
                inputs, stages = stages[0], stages[1:]
                prefix = inputs[0, :0] if prefix is None else prefix
    if gather:
        flat = np.flatnonzero(mask.reshape(-1))
        size = _bucket(len(flat)) if bucket else len(flat)
        index = np.zeros(size, np.int32)
        index[: len(flat)] = flat
        weights = np.zeros(size, np.float32)
        weights[: len(flat)] = mask.reshape(-1)[flat]
        arrays = [inputs, targets, weights, index]
    else:
        arrays = [inputs, targets, mask.reshape(-1)]
    if segments is not None:
        arrays.append(segments)
    arrays += stages
    if prefix is not None:
        arrays.append(prefix)
    return arrays


def prepare_batch(batch, gather: bool = True, share: bool = False, stage: bool = False) -> list[mx.array]:
    """Batch -> the MLX arrays `token_loss` takes (see `batch_arrays`)."""
    return [mx.array(a) for a in batch_arrays(batch, gather, share=share, stage=stage)]


def token_loss(model, parts: ModelParts, arrays: list[mx.array], gather: bool,
               grad: bool = True) -> tuple[mx.array, mx.array]:
    """(sum of token losses, number of target tokens) for the arrays of `prepare_batch` (`grad`: see _loss_sums)."""
    if gather:
        inputs, targets, weights, index, *rest = arrays
    else:
        (inputs, targets, weights, *rest), index = arrays, None
    # packing segments (rows x columns), or stages (rows x columns each) and a shared prefix (one row of ids)
    prefix = rest[-1] if rest and rest[-1].ndim == 1 else None
    segments = rest[0] if rest and prefix is None else None
    stages = rest[:-1] if prefix is not None else ()
    return _loss_sums(model, parts, inputs, targets, weights, index, segments, grad, prefix, stages)


def loss_fn(model: nn.Module, batch) -> tuple[mx.array, mx.array]:
    """(mean loss per target token, number of target tokens) for one `mlxtune.data.Batch`."""
    parts = model_parts(model)
    gather = parts.body is not None
    if batch.segments is not None and not parts.packing:
        raise ConfigError("this architecture does not support packed batches: iterate with pack=False")
    arrays = prepare_batch(batch, gather)
    total, n = token_loss(model, parts, arrays, gather)
    return total / mx.maximum(n, 1), n


def target_logits(model: nn.Module, batch) -> tuple[mx.array, np.ndarray]:
    """Float32 logits (N, vocab) at the batch's target positions, row by row, and the N target ids.

    The positions and head are those `token_loss` scores, so the mean cross-entropy of these logits is the
    training loss; a comparison of two models on the same batch lines up position by position.
    """
    parts = model_parts(model)
    flat = np.flatnonzero(np.asarray(batch.loss_mask).reshape(-1))
    targets = np.asarray(batch.targets).reshape(-1)[flat]
    inputs, index = mx.array(np.asarray(batch.inputs, np.int32)), mx.array(flat.astype(np.int32))
    was_training = model.training
    model.eval()
    try:
        if parts.body is not None:
            h = parts.body(inputs)
            logits = parts.head(h.reshape(-1, h.shape[-1])[index])
        else:
            logits = model(inputs)
            logits = logits.reshape(-1, logits.shape[-1])[index]
    finally:
        model.train(was_training)
    return logits.astype(mx.float32), targets


def evaluate_sums(model: nn.Module, records, batch_size: int, max_seq_length: int, num_batches: int = -1, *,
                  share: tuple[int, int] = (0, 1), share_prefix: bool = True) -> tuple[float, float]:
    """(sum of token losses, target tokens) over the first `num_batches` batches of `records` (-1 = all),
    unpacked, in order. `share=(rank, size)`: only rows rank::size of each batch (a rank's part of the sums).
    `share_prefix`: a prefix every row shares runs once (evaluation has no dropout to keep per row)."""
    parts = model_parts(model)
    gather = parts.body is not None
    batches = evaluation_batches(records, batch_size, max_seq_length, num_batches, share=share)
    once = share_prefix and parts.prefixed is not None
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    try:
        with cpu_swaps(model):
            for batch in batches:
                s, n = token_loss(model, parts, prepare_batch(batch, gather, once, once and parts.staged), gather,
                                  grad=False)
                total, count = total + s, count + n
                mx.eval(total, count)
    finally:
        model.train(was_training)
    return total.item(), count.item()


def evaluate_loss(model: nn.Module, records, batch_size: int, max_seq_length: int, num_batches: int = -1) -> float:
    """Mean loss per target token over `records` (the first `num_batches` batches; -1 = all), unpacked, in order."""
    total, count = evaluate_sums(model, records, batch_size, max_seq_length, num_batches)
    if count == 0:
        raise DataError("the evaluation records carry no target tokens (is every completion empty or truncated?)")
    return total / count
