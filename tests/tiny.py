"""Tiny real models and tokenizers built on the fly, shared by the tests.

Nothing here is downloaded: tokenizers are trained with the `tokenizers` library on a small corpus, and
models are random-initialised mlx-lm architectures saved as Hugging Face style directories.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "SELECT name FROM users WHERE age > 30;",
    "Hello, how are you today? I am fine, thank you!",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1000 3.14",
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé façade naïve café — “quotes” and emoji 🙂.",
    "table: cities\ncolumns: name, country, population\nQ: which city is largest?\nA: SELECT name FROM cities",
    "User: set a timer for five minutes. Assistant: <tool_call name=\"timer\" arguments=\"{}\"/>",
] * 20

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def make_bpe_tokenizer(out: Path, vocab_size: int = 400, chat_template: str = CHATML_TEMPLATE) -> Path:
    """A byte-level BPE tokenizer (GPT-2 style) with ChatML specials, saved with transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = chat_template
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


WORDS = "the quick brown fox jumps over lazy dog hello how are you today fine thank".split()


def echo_chat_rows(n: int, rng, turns: int = 1) -> str:
    """JSONL of n chats whose answers upper-case (a prefix of) the user's words: learnable by a tiny model."""
    rows = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, turns) if turns > 1 else 1):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": q.upper()[:16]}]
        rows.append({"messages": messages})
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_chat_data(out: Path, seed: int = 0, turns: int = 1, sizes=(("train", 24), ("valid", 8), ("test", 8))) -> Path:
    """A data folder of echo chats (train/valid/test.jsonl), one seeded stream over the splits."""
    import random

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name, n in sizes:
        (out / f"{name}.jsonl").write_text(echo_chat_rows(n, rng, turns))
    return out


TINY_CONFIGS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False),
}


def make_tiny_model(out: Path, arch: str = "llama", num_layers: int = 2, seed: int = 0, **overrides) -> Path:
    """Random-init mlx-lm model + BPE tokenizer written as an HF-style directory (float32)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    out = Path(out)
    make_bpe_tokenizer(out)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    config = dict(TINY_CONFIGS[arch], num_hidden_layers=num_layers, vocab_size=vocab,
                  bos_token_id=1, eos_token_id=5, torch_dtype="float32", **overrides)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def gguf_rounded_copy(src: Path, dst: Path, ftype: str = "q4_k_m") -> Path:
    """A float32 copy of `src` whose every tensor went through the GGUF `ftype` recipe's encoding and back:
    the model a user holding that GGUF file would fine-tune (its weights sit on the type's grid)."""
    import shutil

    import mlx.core as mx
    import numpy as np

    from mlxtune.gguf import arch as archmod
    from mlxtune.gguf.quants import FileType, rounded
    from mlxtune.gguf.writer import plan_tensors
    from mlxtune.model_files import normalize_config, read_config
    from mlxtune.weights import index_tensors

    config = normalize_config(read_config(src))
    arch, cfg = archmod.resolve_arch(config)
    index = index_tensors(src)
    planned, _ = plan_tensors(index, arch, cfg, config, FileType(ftype))
    qtype = {p.source: p.qtype for p in planned}
    out = {}
    for name, st in index.items():
        w = st.read_rows(0, st.shape[0]).astype(np.float32).reshape(st.shape)
        q = qtype.get(name)
        if q is not None and w.ndim == 2:  # rows in HF order: blocks never cross rows, so the order does not matter
            w = rounded(w, q)
        out[name] = mx.array(w)
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / "model.safetensors"), out, metadata={"format": "pt"})
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    return dst
