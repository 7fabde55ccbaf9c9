"""Dataset pipeline: mlxtune vs mlx-lm on the same multi-turn chat file and tokenizer.

    python benchmarks/data_pipeline.py                 # 5000 chats
    python benchmarks/data_pipeline.py --n 20000 --batch-size 8

Prints one side-by-side table: seconds until the records are ready (mlxtune cold, then from its
tokenization cache; mlx-lm tokenizes every example each run), the padding share of one epoch of
training batches (mlx-lm's batches as its LoRA trainer builds them: its CacheDataset sorts by the length
of the raw JSON record, not of the tokens; mlxtune's length buckets and --pack), and which
tokens carry loss (mlx-lm's mask_prompt trains only the final assistant turn; mlxtune trains every
assistant turn and its end-of-turn token).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more").split()


def make_chats(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text():
        return " ".join(rng.choice(WORDS) for _ in range(int(rng.lognormvariate(3.0, 0.8)) + 1))

    with open(path, "w") as f:
        for _ in range(n):
            turns = rng.choice([1, 1, 2, 3])
            messages = [{"role": "system", "content": "You are brief."}]
            for _ in range(turns):
                messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
            f.write(json.dumps({"messages": messages}) + "\n")


def mlx_lm_side(path: Path, tokenizer, batch_size: int, max_seq_length: int) -> dict:
    from mlx_lm.tuner.datasets import CacheDataset, ChatDataset
    from mlx_lm.tuner.trainer import iterate_batches

    start = time.perf_counter()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    dataset = CacheDataset(ChatDataset(rows, tokenizer, mask_prompt=True))
    items = [dataset[i] for i in range(len(dataset))]  # what its first epoch computes
    ready = time.perf_counter() - start
    real = total = 0
    for batch, lengths in iterate_batches(dataset, batch_size, max_seq_length):
        real += int(lengths[:, 1].sum().item()) - batch.shape[0]  # inputs are tokens[:-1]
        total += batch.shape[0] * (batch.shape[1] - 1)
    trained = sum(len(tokens) - offset - 1 for tokens, offset in items)
    return {"ready": ready, "cached": ready, "padding": 1 - real / total, "packed": None, "trained": trained,
            "tokens": sum(len(tokens) for tokens, _ in items)}


def mlxtune_side(path: Path, tokenizer, batch_size: int, max_seq_length: int, cache: Path) -> dict:
    from mlxtune.data import load_dataset, padding_fraction

    start = time.perf_counter()
    splits = load_dataset(path, tokenizer, valid_split=0, max_seq_length=max_seq_length, cache=cache)
    ready = time.perf_counter() - start
    start = time.perf_counter()
    load_dataset(path, tokenizer, valid_split=0, max_seq_length=max_seq_length, cache=cache)
    cached = time.perf_counter() - start
    train = splits.train
    return {"ready": ready, "cached": cached,
            "padding": padding_fraction(train, batch_size, max_seq_length=max_seq_length),
            "packed": padding_fraction(train, batch_size, max_seq_length=max_seq_length, pack=True),
            "trained": sum(sum(r.mask) for r in train), "tokens": sum(len(r.ids) for r in train)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000, help="number of chats")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from mlxtune.models import load_tokenizer

    from tiny import make_bpe_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = load_tokenizer(make_bpe_tokenizer(tmp / "tok"))
        path = tmp / "chats.jsonl"
        make_chats(path, args.n)
        ours = mlxtune_side(path, tokenizer, args.batch_size, args.max_seq_length, tmp / "cache")
        theirs = mlx_lm_side(path, tokenizer, args.batch_size, args.max_seq_length)

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    rows = [
        ("records ready, first run (s)", f"{theirs['ready']:.2f}", f"{ours['ready']:.2f}"),
        ("records ready, second run (s)", f"{theirs['cached']:.2f}", f"{ours['cached']:.2f}"),
        (f"padding, batches of {args.batch_size}", pct(theirs["padding"]), pct(ours["padding"])),
        ("padding with packing", pct(theirs["packed"]), pct(ours["packed"])),
        ("tokens with loss", f"{theirs['trained']} (last turn)", f"{ours['trained']} (every turn)"),
        ("tokens in total", str(theirs["tokens"]), str(ours["tokens"])),
    ]
    print(f"{args.n} chats (1-3 turns), byte-level BPE tokenizer, max_seq_length {args.max_seq_length}\n")
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'mlx-lm':>22}  {'mlxtune':>22}")
    for name, a, b in rows:
        print(f"{name:<{width}}  {a:>22}  {b:>22}")


if __name__ == "__main__":
    main()
