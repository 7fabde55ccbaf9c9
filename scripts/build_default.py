"""Rebuild the bundled default model and dataset from nothing: `python scripts/build_default.py`.

Four deterministic steps (fixed seeds): generate a corpus of templated chats and plain text
(scripts/pretrain_corpus.py), train a SentencePiece tokenizer on it, pretrain a tiny mlx-lm Llama on it
with a plain full-parameter MLX loop, and write the tool-call dataset (scripts/toolcall_task.py).
Outputs: data/tiny-chat/ (HF layout) and data/toolcall/{train,valid,test}.jsonl. The one thing to know:
the corpus teaches chatting and copying values, never the `<tool_call .../>` format, so the base model
scores ~0 on the task and LoRA has something to learn. On Linux run it with OpenBLAS preloaded
(LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0); ~25 minutes on 2 quiet CPU cores.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pretrain_corpus  # noqa: E402
import toolcall_task  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
IM_END = 5
DOC_END = 2  # </s> closes a plain-text document in the pretraining stream
# The space marker is a piece of its own, so no piece starts with it: "Dana" is the same tokens after a
# space (a request) and after a quote (a JSON value), and copying a value is copying tokens.
WORD_BOUNDARY = "\u2581"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MODEL_CONFIG = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=128, intermediate_size=384,
    num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=512, tie_word_embeddings=True, hidden_act="silu", bos_token_id=1,
    eos_token_id=IM_END, pad_token_id=3, torch_dtype="float32",
)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template in Python (tests check it renders exactly like the Jinja one)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def corpus_texts(n_docs: int, seed: int) -> list[str]:
    docs = pretrain_corpus.make_corpus(n_docs, seed=seed)
    return [render_chat(d) if isinstance(d, list) else d for d in docs]


def train_tokenizer(texts: list[str], out: Path, vocab_size: int) -> None:
    """A SentencePiece BPE model + HF tokenizer_config.json (LlamaTokenizer, ChatML template).

    Identity normalization and no dummy prefix: llama.cpp applies no SentencePiece normalizer, and a
    rendered chat then tokenizes the same whole or piece by piece. Byte fallback covers any text.
    """
    import sentencepiece as spm

    lines = [line for t in texts for line in t.split("\n") if line]
    spm.set_random_generator_seed(1)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        user_defined_symbols=SPECIALS[4:] + ["\n", WORD_BOUNDARY], num_threads=1, max_sentencepiece_length=16, minloglevel=2)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    special = {"special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    config = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "legacy": False, "clean_up_tokenization_spaces": False, "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {str(i): dict(special, content=p) for i, p in enumerate(SPECIALS)},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=2) + "\n")


def token_stream(texts: list[str], model_file: Path):
    import numpy as np
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    ids: list[int] = []
    for text, encoded in zip(texts, sp.encode(texts)):
        ids += encoded if text.startswith("<|im_start|>") else encoded + [DOC_END]
    return np.array(ids, dtype=np.int32), sp.get_piece_size()


def pretrain(out: Path, stream, vocab_size: int, steps: int, batch_size: int, seq_len: int, lr: float,
             seed: int, progress: bool = True, snapshot_every: int = 0,
             snapshot_to: Path | None = None) -> list[float]:
    """Full-parameter next-token training on random windows of the token stream (AdamW, cosine LR)."""
    from functools import partial

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.utils import _get_classes
    from tqdm.auto import tqdm

    config = dict(MODEL_CONFIG, vocab_size=vocab_size)
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    mx.eval(model.parameters())
    warmup = max(1, steps // 20)
    schedule = optim.join_schedules([optim.linear_schedule(lr / 100, lr, warmup),
                                     optim.cosine_decay(lr, steps - warmup, lr / 10)], [warmup])
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

    def loss_fn(model, x):
        logits = model(x[:, :-1])
        return nn.losses.cross_entropy(logits.astype(mx.float32), x[:, 1:]).mean()

    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    starts_max = len(stream) - seq_len - 2
    losses = []
    bar = tqdm(range(steps), desc="pretrain", mininterval=5, disable=not progress)
    for it in bar:
        starts = rng.integers(0, starts_max, batch_size)
        x = mx.array(np.stack([stream[s: s + seq_len + 1] for s in starts]))
        loss = step(x)
        mx.eval(state)
        losses.append(loss.item())
        if (it + 1) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.3f}")
        if snapshot_every and (it + 1) % snapshot_every == 0 and it + 1 < steps:
            save_model(Path(f"{snapshot_to or out}-step{it + 1}"), model, config, tokenizer_from=out)
    save_model(out, model, config)
    return losses


def save_model(out: Path, model, config: dict, tokenizer_from: Path | None = None) -> None:
    """model.safetensors + config.json (and, for a snapshot, a copy of the tokenizer files)."""
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten

    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        for f in tokenizer_from.glob("*"):
            if f.name.startswith(("tokenizer", "special")):
                shutil.copy(f, out / f.name)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_dataset(out: Path, seed: int) -> dict[str, int]:
    splits = toolcall_task.make_splits(seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {k: len(v) for k, v in splits.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "data", help="folder that gets tiny-chat/ and toolcall/")
    p.add_argument("--docs", type=int, default=60000, help="documents in the generated corpus")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=4000, help="pretraining steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snapshot-every", type=int, default=0,
                   help="also save the model every N steps as tiny-chat-stepN (for tuning)")
    p.add_argument("--data-only", action="store_true", help="only rewrite the dataset")
    args = p.parse_args(argv)

    from mlxtune.files import atomic_dir

    t0 = time.time()
    print("dataset:", write_dataset(args.out / "toolcall", seed=1234 + args.seed), flush=True)
    if args.data_only:
        return
    texts = corpus_texts(args.docs, seed=7 + args.seed)
    with atomic_dir(args.out / "tiny-chat", force=True) as tmp:
        tmp = Path(tmp)
        train_tokenizer(texts[:20000], tmp, args.vocab_size)
        stream, vocab = token_stream(texts, tmp / "tokenizer.model")
        print(f"corpus: {len(texts)} documents, {len(stream)} tokens; vocabulary {vocab}", flush=True)
        losses = pretrain(tmp, stream, vocab, args.steps, args.batch_size, args.seq_len, args.lr, args.seed,
                          snapshot_every=args.snapshot_every, snapshot_to=args.out / "tiny-chat")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": IM_END, "pad_token_id": 3}, indent=2) + "\n")
    print(f"final loss {sum(losses[-50:]) / 50:.3f}; built in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
