"""GGUF tensor encodings: which type each tensor gets, and the encoders for each type.

`tensor_type` follows llama-quantize's per-tensor recipes (Q4_K_M: Q4_K base, Q6_K for the output and
for `attn_v`/`ffn_down` on the "more bits" layers; norms and biases F32; fallbacks for rows that are not
a whole number of blocks). `encode` turns float32 rows into the bytes of a type. F16/BF16/Q8_0/Q4_0/Q5_0
come from the `gguf` package (bit-identical to ggml); Q4_K and Q6_K, which `gguf` can only decode, are
encoded here with numpy, following ggml's reference (no importance matrix) algorithm.

The one thing to know: a quantization block never spans two rows, so any run of whole rows can be
encoded on its own; the writer streams row chunks through `encode` and never holds a whole tensor.
"""

from __future__ import annotations

import re
from enum import Enum

import numpy as np
from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

QK_K = 256
_BLOCKS_AT_ONCE = 512
Q8_BLOCKS_AT_ONCE = 1024  # 32K values: the Q8_0 temporaries stay in cache


class FileType(str, Enum):
    """The `--type` choices: the file's main tensor type (llama.cpp's `general.file_type`)."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    Q4_K_M = "q4_k_m"
    Q6_K = "q6_k"

    @property
    def llama_file_type(self) -> LlamaFileType:
        return {
            "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0,
            "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M, "q6_k": LlamaFileType.MOSTLY_Q6_K,
        }[self.value]

    @classmethod
    def from_llama(cls, value: int) -> FileType:
        """The type whose `general.file_type` is `value` (ValueError for types mlxtune does not write)."""
        for t in cls:
            if t.llama_file_type == value:
                return t
        raise ValueError(f"file type {value} is not one mlxtune writes")

    @property
    def base(self) -> Q:
        return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0,
                "q4_k_m": Q.Q4_K, "q6_k": Q.Q6_K}[self.value]


# llama-quantize's fallback when a row is not a whole number of blocks of the wanted type.
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}
# Types written by llama-quantize (the K-quant recipes); the others follow convert_hf_to_gguf.
_LLAMA_QUANTIZE = {Q.Q4_0, Q.Q4_K, Q.Q6_K}


def block_size(qtype: Q) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def row_bytes(qtype: Q, n: int) -> int:
    """Bytes one row of `n` values takes in `qtype`."""
    block, size = GGML_QUANT_SIZES[qtype]
    return n // block * size


def _more_bits(i: int, n: int) -> bool:
    # llama-quantize's `use_more_bits`: first and last eighth of the layers, and every third in between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fits(qtype: Q, ncols: int) -> bool:
    return ncols % block_size(qtype) == 0


def tensor_type(name: str, shape: tuple[int, ...], ftype: FileType, n_layers: int, tied: bool) -> Q:
    """GGUF type for tensor `name` (GGUF naming, numpy shape (rows, cols)) in a file of type `ftype`.

    `tied`: the model has no `output.weight`, so `token_embd` doubles as the output matrix.
    """
    if len(shape) < 2 or not name.endswith(".weight") or name.endswith("_norm.weight") or "rope_" in name:
        return Q.F32
    ncols = shape[-1]
    base = ftype.base
    if base not in _LLAMA_QUANTIZE:
        # convert_hf_to_gguf: one type for every matrix, F16 when the rows do not split into blocks
        return base if _fits(base, ncols) else Q.F16
    want = base
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        want = Q.Q6_K if _fits(Q.Q6_K, ncols) else Q.Q8_0
    elif ftype is FileType.Q4_K_M and (m := re.match(r"blk\.(\d+)\.(attn_v|attn_qkv|ffn_down)\.weight$", name)):
        # attn_qkv counts as attn_v in llama-quantize's categories
        if _more_bits(int(m.group(1)), n_layers):
            want = Q.Q6_K
    if _fits(want, ncols):
        return want
    fallback = _FALLBACK.get(want, want)
    return fallback if _fits(fallback, ncols) else Q.F16


def encode(rows: np.ndarray, qtype: Q, importance: np.ndarray | None = None) -> np.ndarray:
    """Encode float32 `rows` (n, cols) as `qtype`: uint8 (n, row_bytes), or f32/f16 arrays as they are.

    `importance` (cols,): how much each column's error costs (an importance matrix, e.g. the mean squared
    activation feeding that column). The scale searches of Q4_K, Q6_K, Q5_0 and Q4_0 then weigh each
    value's error by it; Q8_0 and the float types ignore it (as llama.cpp does).
    """
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if qtype == Q.F32:
        return rows
    if qtype == Q.F16:
        with np.errstate(over="ignore"):  # beyond 65504 becomes inf, which the writer refuses (_checked_f16)
            return rows.astype(np.float16)
    n, cols = rows.shape
    if qtype in (Q.Q4_K, Q.Q6_K):
        fn = quantize_q4_k if qtype == Q.Q4_K else quantize_q6_k
        blocks = rows.reshape(-1, QK_K)
        imp = None if importance is None else np.tile(importance.reshape(-1, QK_K), (n, 1))
        # a few hundred blocks at a time keep the working arrays in cache (about 2x faster)
        out = [fn(blocks[i:i + _BLOCKS_AT_ONCE], None if imp is None else imp[i:i + _BLOCKS_AT_ONCE])
               for i in range(0, len(blocks), _BLOCKS_AT_ONCE)]
        return np.concatenate(out).reshape(n, -1)
    if qtype == Q.Q8_0:
        return quantize_q8_0(rows)
    if importance is not None and qtype in (Q.Q5_0, Q.Q4_0):
        return quantize_q_0_weighted(rows, qtype, importance)
    return gguf_quants.quantize(rows, qtype)


def rounded(rows: np.ndarray, qtype: Q, importance: np.ndarray | None = None) -> np.ndarray:
    """`rows` (n, cols) as a file of `qtype` gives them back: encoded, then decoded by the gguf package's
    reference decoder (ggml's layout). What rounding to the type does to a weight."""
    rows = np.asarray(rows, np.float32)
    return gguf_quants.dequantize(encode(rows, qtype, importance), qtype).reshape(rows.shape)


def _importance_weights(x: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """Per-value weights for a scale search with an importance matrix: importance * sqrt(sigma^2 + x^2).

    sigma^2 is the block's mean square: the sqrt term keeps small values from counting for nothing.
    """
    sigma2 = np.einsum("ij,ij->i", x, x)[:, None] / np.float32(x.shape[1])
    return (importance * np.sqrt(sigma2 + x * x)).astype(np.float32)


def quantize_q_0_weighted(rows: np.ndarray, qtype: Q, importance: np.ndarray) -> np.ndarray:
    """Q5_0 / Q4_0 bytes of float32 `rows` with each block's scale chosen by an importance-weighted search.

    Layouts as ggml's: Q5_0 is f16 d, 4 bytes of fifth bits, 16 bytes of nibbles (value j low, j + 16 high);
    Q4_0 is f16 d and the 16 bytes of nibbles; values are stored as q + 16 (q + 8) and decode as d * q.
    """
    n, cols = rows.shape
    nmax = 16 if qtype == Q.Q5_0 else 8
    x = rows.reshape(-1, 32)
    w = _importance_weights(x, np.tile(importance.reshape(-1, 32), (n, 1)))
    d16 = _symmetric_scales(x, nmax, w).astype(np.float16)
    d = d16.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _nearest(x / d)
    q = (np.where(d == 0, 0, np.clip(q, -nmax, nmax - 1)) + nmax).astype(np.uint8)
    lo, hi = q[:, :16], q[:, 16:]
    qs = (lo & 0xF) | ((hi & 0xF) << 4)
    head = d16.view(np.uint8).reshape(-1, 2)
    if qtype == Q.Q4_0:
        return np.concatenate([head, qs], axis=1).reshape(n, -1)
    bits = np.concatenate([lo >> 4, hi >> 4], axis=1).astype(np.uint32)  # fifth bit of value j at bit j
    qh = (bits << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return np.concatenate([head, qh.astype("<u4").view(np.uint8).reshape(-1, 4), qs], axis=1).reshape(n, -1)


def quantize_q8_0(rows: np.ndarray) -> np.ndarray:
    """float32 rows (n, cols) -> Q8_0 bytes (n, cols // 32 * 34), byte for byte what gguf's encoder gives."""
    return quantize_q8_0_checked(rows)[0]


def quantize_q8_0_checked(rows: np.ndarray) -> tuple[np.ndarray, bool]:
    """Q8_0 bytes of float32 `rows` and whether every value was finite (NaN/inf make a block's d so).

    The same float32 arithmetic as gguf.quants.Q8_0 (d = absmax / 127, x * (1 / d), rounding half away
    from zero with floors), but in cache-sized slices with fewer temporaries and a faster absmax: ~1.7x
    faster, and the finiteness check comes free instead of costing a separate summing pass.
    """
    n, cols = rows.shape
    blocks = rows.reshape(-1, 32)
    out = np.empty((len(blocks), 34), dtype=np.uint8)
    finite = True
    for i in range(0, len(blocks), Q8_BLOCKS_AT_ONCE):
        finite &= _q8_0_into(blocks[i:i + Q8_BLOCKS_AT_ONCE], out[i:i + Q8_BLOCKS_AT_ONCE])
    return out.reshape(n, -1), finite


def _q8_0_into(blocks: np.ndarray, out: np.ndarray) -> bool:
    # max |x| by halving the block five times: numpy's reduction along a 32-wide axis is ~4x slower
    m = np.abs(blocks)
    while m.shape[1] > 1:
        h = m.shape[1] // 2
        m = np.maximum(m[:, :h], m[:, h:])
    d = m[:, 0] / np.float32(127)
    # NaN/inf blocks (reported by the caller) and overflowing f16 d must not warn
    with np.errstate(all="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
        x = blocks * inv[:, None]
        a = np.abs(x)
        f = np.floor(a)
        a -= f
        a *= 2
        np.floor(a, out=a)
        a += f
        np.copysign(a, x, out=a)
        out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[:, 2:] = a.astype(np.int8).view(np.uint8)
    return bool(np.isfinite(d).all())


def bf16_to_f16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float16 bit patterns, exactly what float32 -> float16 gives.

    Every bf16 value whose exponent fits f16's normal range converts by moving bits (bf16's 7 mantissa
    bits fit in f16's 10): ~2x faster than widening to float32 and casting, which the few others
    (zeros, f16 subnormals, overflow, inf/nan) still do. Checked on all 65536 patterns in the tests.
    """
    exp = (bits >> 7) & 0xFF
    out = bits & 0x7FFF
    out -= np.uint16(112 << 7)  # rebias the exponent 127 -> 15, mantissa and all, in 16-bit arithmetic
    out <<= 3
    out |= bits & 0x8000
    odd = np.flatnonzero((exp < 113) | (exp > 142))
    if len(odd):
        wide = bits.reshape(-1)[odd].astype(np.uint32) << 16
        with np.errstate(over="ignore"):  # out of f16 range -> inf, as the float32 cast does
            out.reshape(-1)[odd] = wide.view(np.float32).astype(np.float16).view(np.uint16)
    return out


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to float16 and back, as ggml stores `d` and reads it again."""
    return x.astype(np.float16).astype(np.float32)


def _nearest(x: np.ndarray) -> np.ndarray:
    # ggml's nearest_int rounds half to even, like np.rint
    return np.rint(x)


# ---------------------------------------------------------------- Q4_K
# 256 values per block: 8 sub-blocks of 32 with a 6-bit scale and a 6-bit min each (relative to the
# block's f16 d and dmin), values as 4-bit unsigned: x ~ d*sc*q - dmin*m.

def _affine_scales(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                   importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants for each row of `x` (n, 32): the best (scale, -min) with x ~ scale*q + min.

    Weighted least squares over a sweep of trial scales, all rows at once. The error of each trial is
    summed directly from its residuals, as ggml does: expanding it from the fit's running sums cancels
    catastrophically in float32 and picks a different trial for most blocks. `importance` (same shape as
    x) switches the weights to the importance-matrix ones.
    """
    x = x.astype(np.float32, copy=False)
    if importance is None:
        w = np.sqrt(np.einsum("ij,ij->i", x, x) / np.float32(x.shape[1]))[:, None] + np.abs(x)
    else:
        w = _importance_weights(x, importance)
    xmin = np.minimum(x.min(axis=1), 0).astype(np.float32)
    xmax = x.max(axis=1)
    span = xmax - xmin
    flat = span == 0
    span = np.where(flat, 1, span).astype(np.float32)
    sum_w = np.einsum("ij->i", w)
    sum_x = np.einsum("ij,ij->i", w, x)
    q = np.empty_like(x)
    wq = np.empty_like(x)
    r = np.empty_like(x)

    def trial(iscale, mn):
        # in place, into reused buffers: this loop is where Q4_K spends its time
        np.subtract(x, mn[:, None], out=q)
        np.multiply(q, iscale[:, None], out=q)
        np.rint(q, out=q)
        np.clip(q, 0, nmax, out=q)
        np.multiply(w, q, out=wq)
        # einsum: numpy's .sum(axis=1) over 32 columns is ~7x slower
        return np.einsum("ij->i", wq), np.einsum("ij,ij->i", wq, q), np.einsum("ij,ij->i", wq, x)

    def error(scale, mn):
        np.multiply(q, scale[:, None], out=r)
        np.add(r, mn[:, None], out=r)
        np.subtract(r, x, out=r)
        np.square(r, out=r)
        return np.einsum("ij,ij->i", w, r)

    iscale = (nmax / span).astype(np.float32)
    scale = (1 / iscale).astype(np.float32)
    mn = xmin.copy()
    trial(iscale, mn)
    best = error(scale, mn)
    for step in range(nstep + 1):
        # like ggml, each trial starts from the best min found so far (a sequential sweep per row)
        span = xmax - mn
        span = np.where(flat | (span <= 0), 1, span).astype(np.float32)
        iscale = ((np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)) / span).astype(np.float32)
        sum_l, sum_l2, sum_xl = trial(iscale, mn)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, 1)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        pos = this_min > 0
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, 1), this_scale).astype(np.float32)
        this_min = np.where(pos, 0, this_min).astype(np.float32)
        err = error(this_scale, this_min)
        better = ok & (err < best)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, 0, scale).astype(np.float32)
    mn = np.where(flat, xmin, mn).astype(np.float32)
    return scale, -mn


def _pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Pack 8 six-bit scales and 8 six-bit mins per block into ggml's 12-byte layout."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def quantize_q4_k(blocks: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """(n, 256) float32 -> (n, 144) uint8 Q4_K blocks: f16 d, f16 dmin, 12 bytes scales/mins, 128 bytes nibbles."""
    n = blocks.shape[0]
    x = blocks.astype(np.float32, copy=False).reshape(n, 8, 32)
    imp = None if importance is None else importance.reshape(-1, 32)
    scales, mins = _affine_scales(x.reshape(-1, 32), nmax=15, rmin=-1.0, rdelta=0.1, nstep=20, importance=imp)
    scales = scales.reshape(n, 8)
    mins = mins.reshape(n, 8)
    max_scale = scales.max(axis=1)
    max_min = mins.max(axis=1)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, np.float32(63) / max_scale, 0).astype(np.float32)
        inv_min = np.where(max_min > 0, np.float32(63) / max_min, 0).astype(np.float32)
    ls = np.minimum(63, _nearest(inv_scale[:, None] * scales)).astype(np.uint8)
    lm = np.minimum(63, _nearest(inv_min[:, None] * mins)).astype(np.uint8)
    d16 = (max_scale / np.float32(63)).astype(np.float16)
    dmin16 = (max_min / np.float32(63)).astype(np.float16)
    # values are re-quantized against the scales as they will be decoded (f16 d times 6-bit sc)
    d = d16.astype(np.float32)[:, None] * ls.astype(np.float32)
    dm = dmin16.astype(np.float32)[:, None] * lm.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _nearest((x + dm[..., None]) / d[..., None])
    q = np.where(d[..., None] == 0, 0, np.clip(q, 0, 15)).astype(np.uint8)
    # nibbles: byte l of each 32-byte group holds sub-block 2k value l (low) and sub-block 2k+1 value l (high)
    q = q.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
    return np.concatenate([d16.view(np.uint8).reshape(n, 2), dmin16.view(np.uint8).reshape(n, 2),
                           _pack_scale_min_k4(ls, lm), qs], axis=1)


# ---------------------------------------------------------------- Q6_K
# 256 values per block: 16 sub-blocks of 16 with an int8 scale (relative to the block's f16 d),
# values as 6-bit signed (q - 32): x ~ d*sc*(q - 32).

def _symmetric_scales(x: np.ndarray, nmax: int, w: np.ndarray | None = None) -> np.ndarray:
    """ggml's make_qx_quants (rmse_type 1) for each row of `x` (n, 16 or 32): the best scale.

    The weights `w` default to x^2 (ggml's choice without an importance matrix).
    """
    x = x.astype(np.float32, copy=False)
    idx = np.abs(x).argmax(axis=1)
    xmax = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]
    zero = np.abs(xmax) < 1e-15
    xmax = np.where(zero, 1, xmax).astype(np.float32)
    w = x * x if w is None else w
    wx = w * x

    q = np.empty_like(x)

    def sums(iscale):
        np.multiply(x, iscale[:, None], out=q)
        np.rint(q, out=q)
        np.clip(q, -nmax, nmax - 1, out=q)
        return np.einsum("ij,ij->i", wx, q), np.einsum("ij,ij,ij->i", w, q, q)

    iscale = (-nmax / xmax).astype(np.float32)
    sum_lx, sum_l2 = sums(iscale)
    scale = np.where(sum_l2 > 0, sum_lx / np.where(sum_l2 > 0, sum_l2, 1), 0).astype(np.float32)
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = (-(nmax + np.float32(0.1) * step) / xmax).astype(np.float32)
        sum_lx, sum_l2 = sums(iscale)
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        this_scale = sum_lx / np.where(sum_l2 > 0, sum_l2, 1)
        scale = np.where(better, this_scale, scale)
        best = np.where(better, this_scale * sum_lx, best)
    return np.where(zero, 0, scale).astype(np.float32)


def quantize_q6_k(blocks: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """(n, 256) float32 -> (n, 210) uint8 Q6_K blocks: ql[128], qh[64], int8 scales[16], f16 d."""
    n = blocks.shape[0]
    x = blocks.astype(np.float32, copy=False).reshape(n, 16, 16)
    x16 = x.reshape(-1, 16)
    w = None if importance is None else _importance_weights(x16, importance.reshape(-1, 16))
    scales = _symmetric_scales(x16, nmax=32, w=w).reshape(n, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
    empty = np.abs(max_scale) < 1e-15
    iscale = (np.float32(-128) / np.where(empty, 1, max_scale)).astype(np.float32)
    d16 = np.where(empty, 0, 1 / iscale).astype(np.float16)
    sc = np.minimum(127, _nearest(iscale[:, None] * scales))
    sc = np.where(empty[:, None], 0, sc).astype(np.int8)
    d = d16.astype(np.float32)[:, None] * sc.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = _nearest(x / d[..., None])
    q = (np.where(d[..., None] == 0, 0, np.clip(q, -32, 31)) + 32).astype(np.uint8).reshape(n, 2, 4, 32)
    # per 128 values: ql[0:32] = q0 | q2<<4, ql[32:64] = q1 | q3<<4, qh = q0>>4 | q1>>4<<2 | q2>>4<<4 | q3>>4<<6
    lo = q & 0xF
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    hi = q >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8),
                           d16.view(np.uint8).reshape(n, 2)], axis=1)
