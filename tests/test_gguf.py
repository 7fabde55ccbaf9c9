"""GGUF writer: every file is loaded by llama.cpp itself and compared with the MLX model.

Float files must give the MLX model's logits (F32 KV cache), quantized files must keep its top-1 choices;
the K-quant encoders are checked block by block against `gguf`'s decoder and against ggml's own encoder
(llama_model_quantize), and the per-tensor recipe against llama-quantize's choices.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from mlxtune.errors import ConfigError, ExportError
from mlxtune.gguf import quants, to_gguf
from mlxtune.gguf.writer import dequantize_mlx

import llamacpp
from hf_models import TEST_IDS, cached_hf_model

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]
QUIET = dict(progress=False, log=lambda msg: None)


@contextlib.contextmanager
def ggml_gelu():
    """Make MLX's GELU round like ggml's CPU GELU (tanh form through an f16 lookup table).

    llama.cpp evaluates GELU on the f16-rounded input and stores an f16 result; on Gemma 2 that alone
    moves logits by ~2e-3, which would hide what the writer does. The reference applies the same rounding.
    """
    import mlx.core as mx
    import mlx.nn as nn

    saved = nn.gelu, nn.gelu_approx

    def gelu(x):
        h = x.astype(mx.float16).astype(mx.float32)
        y = 0.5 * h * (1 + mx.tanh(0.7978845608028654 * h * (1 + 0.044715 * h * h)))
        y = y.astype(mx.float16).astype(mx.float32)
        return mx.where(x <= -10, 0, mx.where(x >= 10, x, y))

    nn.gelu = nn.gelu_approx = gelu
    try:
        yield
    finally:
        nn.gelu, nn.gelu_approx = saved


@contextlib.contextmanager
def ggml_f16_matmul():
    """Make MLX's Linear layers round their input to f16, as ggml's CPU matmul does for F16 weights.

    ggml converts the activations to the weight's dot-product type (f16) before multiplying; with
    logits spread over tens of units that alone moves them by a few 1e-3. Embedding rows are exact.
    """
    import mlx.core as mx
    import mlx.nn as nn

    linear, as_linear = nn.Linear.__call__, nn.Embedding.as_linear
    r16 = lambda x: x.astype(mx.float16).astype(mx.float32)  # noqa: E731
    nn.Linear.__call__ = lambda self, x: linear(self, r16(x))
    nn.Embedding.as_linear = lambda self, x: as_linear(self, r16(x))
    try:
        yield
    finally:
        nn.Linear.__call__, nn.Embedding.as_linear = linear, as_linear


def mlx_logits(model_dir, seqs, *, f16_weights: bool = False, gguf_gelu: bool = False,
               float32: bool = True) -> np.ndarray:
    """MLX logits (B, L, V) as float32 arrays.

    float32: compute in float32 whatever the checkpoint's dtype (widening the weights is exact, so this is the
    checkpoint's model without rounding). `load` keeps a float16 checkpoint in float16 and on the CPU
    multiplies through float32 copies (mlxtune.dequantized); float32=False switches that off to get MLX's
    own float16 inference (~1e-2 off the float32 result on these models), as on Metal.
    f16_weights: matrices rounded to f16 as an F16 file stores them, and matmul inputs rounded like
    ggml's. gguf_gelu: GELU rounded like ggml's (see `ggml_gelu`).
    """
    import mlx.core as mx
    from mlx.utils import tree_map

    from mlxtune.dequantized import compute_dequantized
    from mlxtune.models import load

    model, _ = load(model_dir)
    if float32:
        model.set_dtype(mx.float32)
    else:
        compute_dequantized(model, enable=False)
    if f16_weights:
        model.update(tree_map(lambda v: v.astype(mx.float16).astype(mx.float32) if v.ndim == 2 else v,
                              model.parameters()))
    with contextlib.ExitStack() as stack:
        if gguf_gelu:
            stack.enter_context(ggml_gelu())
        if f16_weights:
            stack.enter_context(ggml_f16_matmul())
        out = model(mx.array(np.atleast_2d(seqs)))
        return np.array(out.astype(mx.float32))


def gguf_logits(path, seqs) -> np.ndarray:
    llm = llamacpp.load(path)
    return np.stack([llamacpp.logits(llm, s) for s in np.atleast_2d(seqs)])


def perplexity(logits: np.ndarray, seqs: np.ndarray) -> float:
    """Perplexity of each next token of `seqs` under `logits` (B, L, V)."""
    lg = logits[:, :-1].astype(np.float64)
    lg = lg - lg.max(-1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, seqs[:, 1:, None], -1)
    return float(np.exp(nll.mean()))


def mlx_logits_bundled_blas(model_dir, seqs, tmp: Path, **kwargs) -> np.ndarray:
    """`mlx_logits` computed in a child process on MLX's bundled BLAS, without the OpenBLAS that .ci/run preloads.

    The F16 emulation rounds every matmul input to f16, so a last-bit difference in a float32 sum can flip one
    rounding and cascade: OpenBLAS picks its sgemm kernel by CPU, and on an AMD EPYC its sums (5e-6 off MLX's
    own in float32) moved qwen3's emulated logits by 3e-3, where MLX's bundled BLAS stays within 1e-5 of ggml.
    """
    if "openblas" not in os.environ.get("LD_PRELOAD", ""):
        return mlx_logits(model_dir, seqs, **kwargs)
    out = tmp / "bundled_blas_logits.npy"
    code = ("import sys, json, numpy as np; sys.path.insert(0, sys.argv[1]); from test_gguf import mlx_logits; "
            "np.save(sys.argv[3], mlx_logits(sys.argv[2], np.array(json.loads(sys.argv[4])), **json.loads(sys.argv[5])))")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(model_dir), str(out),
                        json.dumps(np.asarray(seqs).tolist()), json.dumps(kwargs)], env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(out)


# ---------------------------------------------------------------- float files, every architecture


@pytest.mark.parametrize("arch", ARCHS)
def test_float_files_give_the_mlx_logits(arch, tmp_path_factory, tmp_path):
    """F32 files give the MLX model's logits to 2e-3 (in practice ~1e-5), from float32 and float16
    checkpoints alike.

    F16 files, checked twice:
    - the bytes: from a float32 checkpoint, llama.cpp equals an MLX model holding the same f16 weights
      and rounding matmul inputs like ggml (exact at most positions; an activation sitting on an f16
      rounding boundary can round the other way and move one position by a few 1e-3).
    - the issue's comparison, done the way it can hold best: a float16 checkpoint (as real checkpoints
      and fused models are stored), whose F16 file holds exactly the checkpoint's weights (checked
      tensor by tensor against the F32 file), against the MLX model loaded from that same checkpoint and
      computed in float32. What is left is ggml's rounding of every matmul input to f16, which llama.cpp
      does for any F16 file: 3.6e-3..5.5e-3 on these models, not issue 7's 2e-3. Smaller test models
      would not be more realistic and would not reach it either: 1.8e-3..3.4e-3 with logits of std 2
      (the bundled trained model has 1.9, and its own F16 file is 1.3e-2 off: its activations are far
      larger than these random models'); see docs/benchmarks.md, "GGUF accuracy". So the test asserts
      the measured bound, and that llama.cpp's F16 is closer to the float model than MLX running the
      same checkpoint in float16.
    """
    gemma = arch.startswith("gemma")
    model = cached_hf_model(tmp_path_factory, arch)
    ref32 = mlx_logits(model, TEST_IDS, gguf_gelu=gemma)[0]
    got32 = llamacpp.logits(to_gguf(model, tmp_path / f"{arch}-f32.gguf", "f32", **QUIET), TEST_IDS)
    diff32 = float(np.abs(got32 - ref32).max())
    assert diff32 <= 2e-3, f"{arch} f32: max |llama.cpp - MLX| = {diff32:.2e}"
    assert (got32.argmax(-1) == ref32.argmax(-1)).all()

    ref16 = mlx_logits_bundled_blas(model, TEST_IDS, tmp_path, f16_weights=True, gguf_gelu=gemma)[0]
    got16 = llamacpp.logits(to_gguf(model, tmp_path / f"{arch}-f16.gguf", "f16", **QUIET), TEST_IDS)
    per_position = np.abs(got16 - ref16).max(-1)
    # measured with the Makefile's portable build: median position 3e-6..6e-6 on every arch, the worst position
    # 5e-6 (llama, qwen2) to 4.3e-3 (phi3). A native AVX512 build rounds otherwise (median 9e-4..1.6e-3 seen),
    # so the exact emulation is asserted for the build it emulates and the measured bound for every build.
    if llamacpp.emulated_f16_build():
        assert np.median(per_position) <= 2e-5, f"{arch} f16: {per_position}"
    assert np.median(per_position) <= 2e-3 and per_position.max() <= 6e-3, f"{arch} f16: {per_position}"
    assert (got16.argmax(-1) == ref16.argmax(-1)).all()

    half = cached_hf_model(tmp_path_factory, arch, dtype="float16")
    files = {kind: to_gguf(half, tmp_path / f"{arch}-half-{kind}.gguf", kind, **QUIET) for kind in ("f32", "f16")}
    exact = {t.name: np.array(t.data) for t in gguf.GGUFReader(files["f32"]).tensors}
    for t in gguf.GGUFReader(files["f16"]).tensors:
        assert np.array_equal(np.array(t.data).astype(np.float32), exact[t.name]), f"{arch}: {t.name} changed"
    ref = mlx_logits(half, TEST_IDS, gguf_gelu=gemma)[0]
    got = {kind: llamacpp.logits(path, TEST_IDS) for kind, path in files.items()}
    diff = {kind: float(np.abs(g - ref).max()) for kind, g in got.items()}
    # for scale: MLX's own float16 inference of the checkpoint (the model as `load` gives it)
    diff["mlx float16"] = float(np.abs(mlx_logits(half, TEST_IDS, gguf_gelu=gemma, float32=False)[0] - ref).max())
    print(f"{arch} float16 checkpoint, max |logit diff| vs MLX float32:",
          ", ".join(f"{k} {v:.1e}" for k, v in diff.items()))
    assert diff["f32"] <= 2e-3
    # measured 3.6e-3 (gemma) .. 5.5e-3 (gemma3); MLX float16: 4.9e-3 (gemma) .. 1.3e-2
    assert diff["f16"] <= 6e-3 and diff["f16"] < diff["mlx float16"], f"{arch}: {diff}"
    assert (got["f16"].argmax(-1) == ref.argmax(-1)).all()


def test_llama3_rope_freqs_and_tensor_layout(tmp_path_factory, tmp_path):
    out = to_gguf(cached_hf_model(tmp_path_factory, "llama3"), tmp_path / "l3.gguf", "f32", **QUIET)
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    freqs = np.array(tensors["rope_freqs.weight"].data)
    # factor 8 on the long wavelengths, 1 on the short ones (original context 64, head dim 16)
    assert freqs.shape == (8,) and freqs[0] == 1.0 and freqs[-1] == 8.0
    assert reader.fields["llama.rope.dimension_count"].contents() == 16
    assert "output.weight" in tensors  # untied llama keeps its own output matrix


def test_tied_and_gemma_outputs(tmp_path_factory, tmp_path):
    for arch in ("qwen2", "gemma"):
        out = to_gguf(cached_hf_model(tmp_path_factory, arch), tmp_path / f"{arch}.gguf", "f16", **QUIET)
        names = {t.name: t for t in gguf.GGUFReader(out).tensors}
        assert "output.weight" not in names
        if arch == "qwen2":
            assert names["blk.0.attn_q.bias"].tensor_type == Q.F32
        assert names["blk.0.attn_norm.weight"].tensor_type == Q.F32


# ---------------------------------------------------------------- quantized files


WINDOW = 64  # tokens per text window (llamacpp.load's context is 128)


def _text_windows(model_dir: Path, count: int) -> np.ndarray:
    """The bundled tool-call chat data, tokenized by the model's tokenizer, as (count, WINDOW) windows."""
    from tokenizers import Tokenizer

    from mlxtune.defaults import DEFAULT_DATA

    lines = (DEFAULT_DATA / "train.jsonl").read_text(encoding="utf-8").splitlines()[:400]
    text = "\n".join(m["content"] for line in lines for m in json.loads(line)["messages"])
    ids = np.array(Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids)
    assert len(ids) >= count * WINDOW
    return ids[: count * WINDOW].reshape(count, WINDOW)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """8 blocks with 256-wide rows so that the K-quants apply (and the Q4_K_M layer pattern shows), with
    the output head fitted to text (ridge regression of the next token on the last hidden state).

    A fully random model has nearly flat next-token distributions whose top-1 flips under any noise
    (llama.cpp's own Q4_K_M keeps only ~0.83 of them); a trained model is peaked where the text is
    predictable. Fitting the head in closed form gets that in a second: every block stays random and
    quantized, so a broken encoder still moves the top-1 choices, but agreement now measures what it
    measures on real models.
    """
    import mlx.core as mx
    from safetensors.numpy import load_file, save_file

    from mlxtune.models import load

    base = cached_hf_model(tmp_path_factory, "llama", hidden_size=256, intermediate_size=512,
                           num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path_factory.mktemp("wide_llama") / "model"
    shutil.copytree(base, out)
    train = _text_windows(out, 258)[:250]
    model, _ = load(out)
    hidden = np.concatenate([np.array(model.model(mx.array(train[i:i + 50]))) for i in range(0, len(train), 50)])
    x = hidden[:, :-1].reshape(-1, hidden.shape[-1]).astype(np.float64)
    y = train[:, 1:].reshape(-1)
    target = np.zeros((len(y), model.args.vocab_size))
    target[np.arange(len(y)), y] = 10.0
    # a strong ridge penalty keeps the head smooth, as training with weight decay would
    head = np.linalg.solve(x.T @ x + 100 * len(y) / 1000 * np.eye(x.shape[1]), x.T @ target)
    weights = load_file(out / "model.safetensors")
    weights["lm_head.weight"] = np.ascontiguousarray(head.T, dtype=np.float32)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def eval_seqs(wide_llama):
    """Held-out text windows (not used to fit the head), 8 x 64 tokens."""
    return _text_windows(wide_llama, 258)[250:]


@pytest.fixture(scope="module")
def quantized(wide_llama, tmp_path_factory):
    """Our files for each quantized type, and llama-quantize's Q4_K_M / Q6_K made from our F32 file."""
    work = tmp_path_factory.mktemp("quantized")
    files = {kind: to_gguf(wide_llama, work / f"{kind}.gguf", kind, **QUIET)
             for kind in ("f32", "f16", "q8_0", "q6_k", "q4_k_m", "q4_0")}
    for kind, ftype in (("q4_k_m", gguf.LlamaFileType.MOSTLY_Q4_K_M), ("q6_k", gguf.LlamaFileType.MOSTLY_Q6_K)):
        files[f"llama-quantize {kind}"] = llamacpp.quantize(files["f32"], work / f"ref-{kind}.gguf", ftype)
    return files


def test_quantized_files_keep_the_top1_choices(wide_llama, eval_seqs, quantized):
    """Top-1 agreement with the float MLX model and perplexity on held-out text, next to llama-quantize's.

    Issue 7's targets: q8_0 >= 0.98, q4_k_m >= 0.90 (measured here 1.000 and 0.965 over 504 positions;
    llama-quantize's own Q4_K_M also 0.965). F16 against the *float* MLX model: logits span about +-10 here, and ggml rounds
    both the weights and the matmul inputs to f16, which alone moves them by ~2.5e-3 at worst (median
    ~1e-3 per position); the exact check of the F16 bytes is test_float_files_give_the_mlx_logits.
    """
    ref = mlx_logits(wide_llama, eval_seqs)
    ppl_ref = perplexity(ref, eval_seqs)
    agree, ppl, diff = {}, {}, {}
    for kind, path in quantized.items():
        got = gguf_logits(path, eval_seqs)
        agree[kind] = float((got.argmax(-1) == ref.argmax(-1)).mean())
        ppl[kind] = perplexity(got, eval_seqs)
        diff[kind] = np.abs(got - ref).max(-1)  # per position
        print(f"{kind}: top-1 agreement {agree[kind]:.3f}, perplexity {ppl[kind]:.3f} (MLX {ppl_ref:.3f}), "
              f"max |logit diff| {diff[kind].max():.2e} (median position {np.median(diff[kind]):.1e})")
    assert agree["f32"] == 1.0 and diff["f32"].max() <= 2e-4
    assert agree["f16"] == 1.0 and diff["f16"].max() <= 4e-3 and np.median(diff["f16"]) <= 1.5e-3
    assert agree["q8_0"] >= 0.98 and abs(ppl["q8_0"] / ppl_ref - 1) < 0.01
    assert agree["q6_k"] >= 0.97 and abs(ppl["q6_k"] / ppl_ref - 1) < 0.01
    assert agree["q4_k_m"] >= 0.90 and abs(ppl["q4_k_m"] / ppl_ref - 1) < 0.03
    assert agree["q4_0"] >= 0.88
    for kind in ("q4_k_m", "q6_k"):
        theirs = f"llama-quantize {kind}"
        assert agree[kind] >= agree[theirs] - 0.01
        assert ppl[kind] <= ppl[theirs] * 1.01
        # logit error like ggml's encoder (a 6-bit scale one step off still keeps 0.945 top-1 here)
        assert np.median(diff[kind]) <= 1.1 * np.median(diff[theirs])


def test_q4_k_m_recipe_and_blocks_match_llama_quantize(quantized):
    """llama-quantize, fed our F32 file, picks the same type per tensor and (nearly) the same bytes."""
    for kind in ("q4_k_m", "q6_k"):
        ours_t = {t.name: t for t in gguf.GGUFReader(quantized[kind]).tensors}
        theirs_t = {t.name: t for t in gguf.GGUFReader(quantized[f"llama-quantize {kind}"]).tensors}
        assert {n: t.tensor_type for n, t in ours_t.items()} == {n: t.tensor_type for n, t in theirs_t.items()}
        same_blocks, n_blocks = 0, 0
        for name, t in ours_t.items():
            if t.tensor_type not in (Q.Q4_K, Q.Q6_K):
                continue
            size = gguf.GGML_QUANT_SIZES[t.tensor_type][1]
            a = np.array(t.data).reshape(-1, size)
            b = np.array(theirs_t[name].data).reshape(-1, size)
            same_blocks += int((a == b).all(axis=1).sum())
            n_blocks += len(a)
        print(f"{kind}: {same_blocks}/{n_blocks} K-quant blocks byte-identical to ggml's encoder")
        assert same_blocks / n_blocks >= 0.95, f"only {same_blocks}/{n_blocks} blocks byte-identical to ggml"
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(quantized["q4_k_m"]).tensors}
    # 8 blocks: "more bits" on layers 0, 3, 6 and 7
    assert [types[f"blk.{i}.attn_v.weight"] == Q.Q6_K for i in range(8)] == [1, 0, 0, 1, 0, 0, 1, 1]
    assert types["blk.3.ffn_down.weight"] == Q.Q6_K and types["blk.2.ffn_down.weight"] == Q.Q4_K
    assert types["output.weight"] == Q.Q6_K and types["token_embd.weight"] == Q.Q4_K
    assert types["blk.1.attn_q.weight"] == Q.Q4_K and types["blk.1.ffn_norm.weight"] == Q.F32


# ---------------------------------------------------------------- the K-quant encoders


def _q4_k_reference_decode(block: np.ndarray) -> np.ndarray:
    """Decode one Q4_K block by following ggml's dequantize_row_q4_K literally (scalar code)."""
    d = float(block[0:2].view(np.float16)[0])
    dmin = float(block[2:4].view(np.float16)[0])
    sc, q = block[4:16], block[16:144]
    out = []
    for j in range(8):
        if j < 4:
            s, m = sc[j] & 63, sc[j + 4] & 63
        else:
            s = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)
            m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
        nib = q[32 * (j // 2): 32 * (j // 2) + 32]
        vals = (nib & 0xF) if j % 2 == 0 else (nib >> 4)
        out.extend(d * s * v - dmin * m for v in vals.astype(np.float64))
    return np.array(out, dtype=np.float32)


def _q6_k_reference_decode(block: np.ndarray) -> np.ndarray:
    """Decode one Q6_K block following ggml's dequantize_row_q6_K literally."""
    ql, qh, sc = block[0:128], block[128:192], block[192:208].view(np.int8)
    d = float(block[208:210].view(np.float16)[0])
    y = np.zeros(256, dtype=np.float32)
    for half in range(2):
        l_, h_, s_ = ql[64 * half:], qh[32 * half:], sc[8 * half:]
        for i in range(32):
            is_ = i // 16
            q1 = int((l_[i] & 0xF) | (((h_[i] >> 0) & 3) << 4)) - 32
            q2 = int((l_[i + 32] & 0xF) | (((h_[i] >> 2) & 3) << 4)) - 32
            q3 = int((l_[i] >> 4) | (((h_[i] >> 4) & 3) << 4)) - 32
            q4 = int((l_[i + 32] >> 4) | (((h_[i] >> 6) & 3) << 4)) - 32
            base = 128 * half + i
            y[base] = d * s_[is_] * q1
            y[base + 32] = d * s_[is_ + 2] * q2
            y[base + 64] = d * s_[is_ + 4] * q3
            y[base + 96] = d * s_[is_ + 6] * q4
    return y


def _test_blocks() -> np.ndarray:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((24, 256)) * 0.05).astype(np.float32)
    x[0] = 0                                # all zero
    x[1] = 0.25                             # constant positive
    x[2] = -0.25                            # constant negative
    x[3, 7] = 3.0                           # one outlier
    x[4] = np.abs(x[4])                     # one-signed
    x[5, :128] = 0                          # half empty
    x[6] *= 1e-6                            # tiny values
    return x


@pytest.mark.parametrize("qtype,encode,reference,bound", [
    (Q.Q4_K, quants.quantize_q4_k, _q4_k_reference_decode, 0.09),
    (Q.Q6_K, quants.quantize_q6_k, _q6_k_reference_decode, 0.022),
])
def test_k_quant_blocks_decode_exactly_and_within_bounds(qtype, encode, reference, bound):
    x = _test_blocks()
    blocks = encode(x)
    assert blocks.dtype == np.uint8 and blocks.shape == (len(x), gguf.GGML_QUANT_SIZES[qtype][1])
    decoded = quants.gguf_quants.dequantize(blocks, qtype)
    for row, block in zip(decoded, blocks):
        np.testing.assert_array_equal(row, reference(block))  # gguf's decoder == the literal ggml decoder
    assert (decoded[0] == 0).all()
    np.testing.assert_allclose(decoded[1], 0.25, rtol=2e-3)
    np.testing.assert_allclose(decoded[2], -0.25, rtol=2e-3)
    assert abs(decoded[3, 7] - 3.0) < 0.05              # the outlier survives
    gauss = x[7:]
    rel_rmse = np.sqrt(((decoded[7:] - gauss) ** 2).mean()) / gauss.std()
    assert rel_rmse < bound
    # each value within one quantization step of its sub-block (range / levels); typically half a step
    sub = 32 if qtype == Q.Q4_K else 16
    levels = 15 if qtype == Q.Q4_K else 63
    g = gauss.reshape(-1, sub)
    err = np.abs(decoded[7:].reshape(-1, sub) - g).max(axis=1)
    assert (err <= (g.max(axis=1) - np.minimum(g.min(axis=1), 0)) / levels + 1e-6).all()


# ---------------------------------------------------------------- inputs, streaming, errors, CLI


def test_mlx_dequantize_matches_mlx():
    import mlx.core as mx

    w = mx.random.normal((8, 256), key=mx.random.key(0))
    for bits in (2, 3, 4, 5, 6, 8):
        q, s, b = mx.quantize(w, group_size=64, bits=bits)
        ref = np.array(mx.dequantize(q, s, b, group_size=64, bits=bits))
        got = dequantize_mlx(np.array(q), np.array(s), np.array(b), bits)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_mlx_quantized_input_is_dequantized(tmp_path_factory, tmp_path):
    from mlx_lm.utils import quantize_model, save_config, save_model

    from mlxtune.models import load

    src = cached_hf_model(tmp_path_factory, "qwen3")
    qdir = tmp_path / "q4"
    model, tok = load(src)
    cfg = json.loads((src / "config.json").read_text())
    model, cfg = quantize_model(model, cfg, group_size=32, bits=4)
    qdir.mkdir()
    save_model(qdir, model)
    save_config(cfg, qdir / "config.json")
    for f in src.glob("tokenizer*"):
        shutil.copy(f, qdir)
    notes = []
    out = to_gguf(qdir, tmp_path / "q.gguf", "f32", progress=False, log=notes.append)
    assert any("MLX-quantized" in n for n in notes)
    ref = mlx_logits(qdir, TEST_IDS)[0]
    assert np.abs(llamacpp.logits(out, TEST_IDS) - ref).max() <= 2e-3


def test_chunked_streaming_gives_identical_bytes(wide_llama, tmp_path, monkeypatch):
    """Converting in tiny row chunks (q/k permutation across chunk borders included) changes nothing."""
    from mlxtune.gguf import writer

    whole = to_gguf(wide_llama, tmp_path / "whole.gguf", "q4_k_m", **QUIET).read_bytes()
    monkeypatch.setattr(writer, "CHUNK_VALUES", 1000)
    small = to_gguf(wide_llama, tmp_path / "small.gguf", "q4_k_m", **QUIET).read_bytes()
    assert small == whole


def test_refuses_existing_unsupported_and_broken(tmp_path_factory, tmp_path):
    from safetensors.numpy import load_file, save_file

    model = cached_hf_model(tmp_path_factory, "llama")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="--force"):
        to_gguf(model, out, "f16", **QUIET)
    with pytest.raises(ConfigError, match="q4_k_m"):
        to_gguf(model, tmp_path / "x.gguf", "q3_k", **QUIET)
    odd = tmp_path / "odd"
    shutil.copytree(model, odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(ExportError, match="supported: gemma.*llama.*phi3.*qwen2"):
        to_gguf(odd, tmp_path / "x.gguf", "f16", **QUIET)
    # a NaN in the weights: refused, and the existing file is untouched with no temp file left behind
    (odd / "config.json").write_text(json.dumps(cfg))
    weights = load_file(odd / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(weights, odd / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="NaN"):
        to_gguf(odd, out, "q8_0", force=True, **QUIET)
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "odd"]


def test_verify_catches_a_wrong_file(tmp_path_factory, tmp_path):
    from mlxtune.gguf.quants import FileType
    from mlxtune.gguf.writer import verify_gguf, write_gguf

    planned = write_gguf(cached_hf_model(tmp_path_factory, "llama"), tmp_path / "a.gguf", FileType.F16, **QUIET)
    verify_gguf(tmp_path / "a.gguf", planned)
    planned[3].qtype = Q.Q8_0
    with pytest.raises(ExportError, match=f"verify: tensor {planned[3].name} is F"):
        verify_gguf(tmp_path / "a.gguf", planned)


def test_cli(tmp_path_factory, tmp_path, capsys, monkeypatch):
    from mlxtune.cli import run

    def cli(*args):
        try:
            run(["gguf", *map(str, args)])
            return 0
        except SystemExit as e:
            return e.code or 0

    monkeypatch.setenv("MLXTUNE_NO_OPENBLAS", "1")
    model = cached_hf_model(tmp_path_factory, "qwen2")
    out = tmp_path / "m.gguf"
    assert cli("--model", model, "--outfile", out, "--type", "q8_0") == 0
    assert out.stat().st_mode & 0o044  # readable like any model file, not private like a temp file
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out and "verified" in captured.err
    ids = llamacpp.tokenize(out, "<|im_start|>user\nHello, how are you?<|im_end|>")
    from transformers import AutoTokenizer

    assert ids == AutoTokenizer.from_pretrained(model)("<|im_start|>user\nHello, how are you?<|im_end|>")["input_ids"]
    assert cli("--model", model, "--outfile", out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--force" in err[0]
    assert cli("--model", model, "--outfile", out, "--force", "--no-verify", "--type", "bf16") == 0
    assert "verified" not in capsys.readouterr().err
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16


def test_gemma3_multimodal_checkpoint_writes_its_language_model(tmp_path_factory, tmp_path):
    """A Gemma 3 vision-language directory (text_config, language_model.* tensors, a vision tower)."""
    from safetensors.numpy import load_file, save_file

    text = cached_hf_model(tmp_path_factory, "gemma3")
    mm = tmp_path / "mm"
    shutil.copytree(text, mm)
    weights = {f"language_model.{k}": v for k, v in load_file(mm / "model.safetensors").items()}
    weights["vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((8, 3, 2, 2), np.float32)
    save_file(weights, mm / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((mm / "config.json").read_text())
    (mm / "config.json").write_text(json.dumps({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                                                "text_config": cfg, "vision_config": {"hidden_size": 8}}))
    out = to_gguf(mm, tmp_path / "mm.gguf", "f32", **QUIET)
    ref = mlx_logits(text, TEST_IDS, gguf_gelu=True)[0]
    assert np.abs(llamacpp.logits(out, TEST_IDS) - ref).max() <= 2e-3


@pytest.mark.parametrize("arch", ["phi3", "qwen2"])
def test_q4_k_m_recipe_matches_llama_quantize_on_fused_and_tied_models(arch, tmp_path_factory, tmp_path):
    """phi3's fused attn_qkv / gate|up and qwen2's tied embedding (token_embd takes the output's Q6_K)."""
    model = cached_hf_model(tmp_path_factory, arch, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                            num_attention_heads=4, num_key_value_heads=2)
    ours = to_gguf(model, tmp_path / "ours.gguf", "q4_k_m", **QUIET)
    theirs = llamacpp.quantize(to_gguf(model, tmp_path / "f32.gguf", "f32", **QUIET), tmp_path / "theirs.gguf",
                               gguf.LlamaFileType.MOSTLY_Q4_K_M)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(ours).tensors}
    assert types == {t.name: t.tensor_type for t in gguf.GGUFReader(theirs).tensors}
    if arch == "qwen2":
        assert "output.weight" not in types and types["token_embd.weight"] == Q.Q6_K
    else:
        assert types["blk.0.attn_qkv.weight"] == Q.Q6_K and types["blk.1.attn_qkv.weight"] == Q.Q4_K


def test_bf16_to_f16_bits_exact_on_every_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    with np.errstate(over="ignore"):
        want = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float16)
    got = quants.bf16_to_f16(bits.copy()).view(np.float16)
    nan = np.isnan(want)
    assert np.array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16)) and np.isnan(got[nan]).all()


def test_q8_0_encoder_bytes_equal_gguf_and_catches_non_finite():
    """Our faster Q8_0 encoder must write exactly gguf's bytes: rounding ties (x.5 after scaling), zero
    and -0.0 blocks, tiny/huge scales, every finite bf16 pattern; NaN/inf must be reported."""
    from gguf import quants as gguf_quants

    rng = np.random.default_rng(0)
    cases = [(rng.standard_normal((48, 1024)) * s).astype(np.float32) for s in (1e-30, 1e-6, 1, 100, 1e30)]
    ties = (rng.integers(-254, 255, (48, 1024)) / 2).astype(np.float32)
    ties[:, ::32] = 127  # d = 1 exactly, so every x.5 stays a tie
    ties[3:5] = 0
    ties[6, 64:96] = -0.0
    cases.append(ties)
    pats = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)
    pats = pats[np.isfinite(pats)]
    pats = pats[: len(pats) // 1024 * 1024].reshape(-1, 1024)
    cases += [pats, pats[:, rng.permutation(1024)]]
    for x in cases:
        with np.errstate(all="ignore"):
            want = gguf_quants.quantize(x, Q.Q8_0)
        got, finite = quants.quantize_q8_0_checked(x)
        assert finite and got.shape == want.shape and got.tobytes() == want.tobytes()
    for bad in (np.nan, np.inf, -np.inf):
        x = cases[2].copy()
        x[40, 999] = bad
        assert not quants.quantize_q8_0_checked(x)[1]


def test_bf16_checkpoint_f16_file_equals_the_float32_path(tmp_path_factory, tmp_path, monkeypatch):
    """bf16 weights go to F16 by moving bits; the file must be byte for byte what widening gives (q/k
    permutation across chunk borders included), and a NaN is still refused."""
    import torch
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    from mlxtune.gguf import writer

    bf = cached_hf_model(tmp_path_factory, "llama", dtype="bfloat16")
    wide = shutil.copytree(bf, tmp_path / "f32" / bf.name)
    assert load_torch(bf / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    save_torch({k: v.float() for k, v in load_torch(bf / "model.safetensors").items()}, wide / "model.safetensors")
    monkeypatch.setattr(writer, "CHUNK_VALUES", 1000)
    fast = to_gguf(bf, tmp_path / "fast.gguf", "f16", **QUIET)
    slow = to_gguf(wide, tmp_path / "slow.gguf", "f16", **QUIET)
    assert fast.read_bytes() == slow.read_bytes()

    broken = shutil.copytree(bf, tmp_path / "nan" / bf.name)
    tensors = load_torch(broken / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = torch.nan
    save_torch(tensors, broken / "model.safetensors")
    with pytest.raises(ExportError, match="up_proj.weight has NaN"):
        to_gguf(broken, tmp_path / "nan.gguf", "f16", **QUIET)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_values_beyond_float16_are_refused_not_written_as_inf(dtype, tmp_path):
    """f16 holds |x| <= 65504: a larger weight used to pass the finite check and land in the file as inf."""
    import mlx.core as mx

    from hf_models import make_hf_model

    big = make_hf_model(tmp_path / "big", "llama", dtype=dtype)
    weights = mx.load(str(big / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    w = weights[name]
    weights[name] = w.at[3, 5].add(mx.array(1e5, w.dtype) - w[3, 5])  # bf16 rounds it to 99840: still > 65504
    mx.save_safetensors(str(big / "model.safetensors"), weights, metadata={"format": "pt"})
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ExportError, match=r"up_proj.weight has values beyond float16's range .*bf16, f32 or q8_0"):
        to_gguf(big, out, "f16", force=True, **QUIET)
    assert out.read_bytes() == b"keep me"
    to_gguf(big, tmp_path / "ok.gguf", "f32", **QUIET)  # f32 holds it


def test_a_file_that_fails_verification_never_replaces_the_old_one(tmp_path_factory, tmp_path, monkeypatch):
    import mlxtune.gguf.writer as writer

    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")

    def fails(path, planned, name=None):
        assert Path(path) != out and Path(path).exists()  # it checks the new file before the rename
        raise ExportError(f"verify: {name} is wrong")

    monkeypatch.setattr(writer, "verify_gguf", fails)
    with pytest.raises(ExportError, match="verify: .*m.gguf is wrong"):
        to_gguf(cached_hf_model(tmp_path_factory, "llama"), out, "f16", force=True, **QUIET)
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
