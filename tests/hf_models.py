"""Tiny random Hugging Face checkpoints written by transformers itself, and their reference logits.

Shared by every test that checks fidelity against transformers (load, convert, fuse, GGUF). The one
thing to know: weights are re-randomised after construction (norm weights and biases too), so a layer
mlxtune drops, a norm offset it gets wrong or a RoPE base it ignores shows up as a logit difference far
above float32 noise. Logits have a std of about 4 over the vocabulary (embeddings and head at std 0.5,
`edge_std`); tied models reach +-37 because the input token's own logit (its embedding dotted with
itself) dominates; the bundled trained model has std 1.9 and +-20 (docs/benchmarks.md, "GGUF
accuracy"). Configs keep the non-default RoPE bases and scalings below so that a silently ignored
`rope_parameters` entry is caught.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny import make_bpe_tokenizer

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, vocab_size=512,
            bos_token_id=1, eos_token_id=5, pad_token_id=3)

# arch name -> (transformers model_type, config overrides). RoPE settings are given in the
# transformers-5 form (`rope_parameters`), which is what mlxtune has to normalize.
ARCHS = {
    "llama": ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 50_000.0})),
    "llama3": ("llama", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("mistral", dict(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                                sliding_window=None)),
    "qwen2": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                            tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                            head_dim=32, tie_word_embeddings=True)),
    # mlx-lm's gemma uses exact GELU, as do Gemma 1 checkpoints' configs ("hidden_act": "gelu").
    "gemma": ("gemma", dict(rope_parameters={"rope_type": "default", "rope_theta": 20_000.0}, head_dim=16,
                            hidden_act="gelu")),
    # mlx-lm's gemma2 has no sliding-window mask, so the window is kept longer than the test sequences.
    "gemma2": ("gemma2", dict(rope_parameters={"rope_type": "default", "rope_theta": 30_000.0}, head_dim=16,
                              query_pre_attn_scalar=16, sliding_window=64,
                              attn_logit_softcapping=5.0, final_logit_softcapping=20.0)),
    # gemma3: a window shorter than the test sequences, and different local/global bases.
    "gemma3": ("gemma3_text", dict(rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 12_000.0},
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 700_000.0}},
        head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 40_000.0,
                                           "partial_rotary_factor": 0.5})),
}

# Test sequence: 12 tokens, longer than gemma3's window above.
TEST_IDS = [1, 17, 42, 99, 7, 256, 300, 12, 5, 88, 130, 64]


def _randomize(model, seed: int, edge_std: float = 0.5) -> None:
    """Re-draw every weight so that each one matters (transformers' init leaves norms at 1 or 0)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                # std 0.5/sqrt(fan_in) inside the blocks; embeddings and head at 0.5 so that logits have
                # a spread of several units, like a trained model's, rather than near-ties
                edge = "embed" in name or "lm_head" in name
                p.copy_(noise * (edge_std if edge else 0.5 / p.shape[-1] ** 0.5))
            else:
                # norms keep their centre (1 for llama-style, 0 for gemma's 1+w) plus noise; biases ~0.1
                p.copy_(p.float() + 0.1 * noise)


def make_hf_model(out_dir, arch: str, *, tokenizer: str = "bpe", dtype: str = "float32", seed: int = 0,
                  edge_std: float = 0.5, **overrides) -> Path:
    """Write a tiny random `arch` checkpoint (config.json, model.safetensors, tokenizer) to `out_dir`.

    arch: one of ARCHS. overrides replace config keys (e.g. num_hidden_layers=1, rope_parameters=...).
    dtype: float32 / float16 / bfloat16, the dtype the weights are saved in.
    edge_std: std of the embedding and output head weights; the logits' std over the vocabulary is
    about 8x this (hidden size 64).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if tokenizer != "bpe":
        raise ValueError(f"unknown tokenizer kind {tokenizer!r} (only 'bpe')")
    model_type, arch_cfg = ARCHS[arch]
    out = Path(out_dir)
    make_bpe_tokenizer(out)
    n_tokens = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    cfg_kwargs = {**BASE, **arch_cfg, **overrides}
    assert cfg_kwargs["vocab_size"] >= n_tokens, "config vocab must cover the tokenizer"
    config = AutoConfig.for_model(model_type, **cfg_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    _randomize(model, seed, edge_std)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model = model.to(getattr(torch, dtype)).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out


def hf_logits(model_dir, ids) -> np.ndarray:  # noqa: F821
    """Logits of `ids` (a list or 2-D list of token ids) from transformers on CPU in float32: (B, L, V)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    x = torch.tensor(np.atleast_2d(np.asarray(ids, dtype=np.int64)))
    with torch.no_grad():
        return model(x).logits.float().numpy()


_BUILT: dict = {}
_LOGITS: dict = {}


def cached_hf_model(tmp_path_factory, arch: str, **kwargs) -> Path:
    """`make_hf_model` once per pytest session for each (arch, kwargs); later calls reuse the directory."""
    key = (arch, json.dumps(kwargs, sort_keys=True))
    if key not in _BUILT:
        _BUILT[key] = make_hf_model(tmp_path_factory.mktemp(f"hf_{arch}"), arch, **kwargs)
    return _BUILT[key]


def cached_hf_logits(model_dir, ids) -> np.ndarray:  # noqa: F821
    """`hf_logits` once per session for each (model_dir, ids)."""
    import numpy as np

    key = (str(model_dir), np.asarray(ids).tobytes(), np.asarray(ids).shape)
    if key not in _LOGITS:
        _LOGITS[key] = hf_logits(model_dir, ids)
    return _LOGITS[key]
