"""Training throughput and memory: mlxtune vs mlx-lm's LoRA trainer on the same model, data and knobs.

    python benchmarks/train_throughput.py                # tiny llama and a ~100M llama
    python benchmarks/train_throughput.py --sizes tiny --examples 200 --batch-size 4

Both trainers see the same chat data with varied example lengths (loss on the assistant tokens only),
the same LoRA layers (q, k, v, o of every block, rank 8, alpha 16), Adam at the same constant learning
rate and no gradient clipping, for the same whole number of epochs: mlx-lm and unpacked mlxtune take
the same number of steps of `--batch-size` examples, so both see every example equally often (the same
real tokens); packed mlxtune uses rows that hold about `--batch-size` examples and stops when the same
tokens are consumed. Each run is a separate process so peak memory is its own. The final validation
loss of every adapter is measured by one function (mlxtune.loss.evaluate_loss) on the same records.
Throughput is real tokens per second of training time, measured between the first and the last report
so that one-off compilation at the first step is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more write "
         "go see number no way could people my than first water been call who oil its now find long down day").split()
SIZES = {
    # name: (hidden, layers, intermediate, heads, kv heads, vocab)
    "tiny": (64, 2, 128, 4, 2, None),  # vocab = the tokenizer's
    "100m": (768, 8, 2048, 12, 4, 32000),  # ~106M parameters; a real-sized vocabulary makes the head count
}
KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]


def build_model(out: Path, size: str) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    from tiny import make_bpe_tokenizer

    if (out / "config.json").exists():
        return out
    make_bpe_tokenizer(out)
    hidden, layers, inter, heads, kv, vocab = SIZES[size]
    vocab = vocab or len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    config = dict(model_type="llama", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=4096, tie_word_embeddings=False, vocab_size=vocab, bos_token_id=1,
                  eos_token_id=5, torch_dtype="float32")
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(0)
    model = model_cls(args_cls.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config))
    return out


def build_data(out: Path, n_train: int, max_words: int, seed: int = 0) -> Path:
    """Chat examples whose lengths vary a lot (log-uniform), like real instruction data."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)

    def words(lo, hi):
        n = int(round(2 ** rng.uniform(lo, hi)))
        return " ".join(rng.choice(WORDS) for _ in range(n))

    hi = max(2.0, __import__("math").log2(max_words))
    for name, n in (("train", n_train), ("valid", 32)):
        rows = [{"messages": [{"role": "user", "content": words(1, hi)}, {"role": "assistant", "content": words(1, hi - 1)}]}
                for _ in range(n)]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


# ----------------------------------------------------------------------------------------- workers
class _Clock:
    """Timestamps and real-token totals at each report."""

    def __init__(self):
        self.marks: list[tuple[float, int]] = []

    def mark(self, tokens: int) -> None:
        self.marks.append((time.perf_counter(), tokens))

    def steady(self) -> tuple[float, int]:
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return t1 - t0, n1 - n0


def worker_mlxlm(a) -> dict:
    from types import SimpleNamespace

    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.datasets import CacheDataset, load_local_dataset
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model, tok = load(a.model)
    mx.random.seed(getattr(a, "seed", 0))
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": KEYS})
    train_set, _, _ = load_local_dataset(Path(a.data), tok, SimpleNamespace(mask_prompt=True))
    clock, seen = _Clock(), [0]

    def counting(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        for batch, lengths in trainer.iterate_batches(dataset, batch_size, max_seq_length, loop, seed, comm_group):
            seen[0] += int((mx.minimum(lengths[:, 1], max_seq_length) - 1).sum().item())
            yield batch, lengths

    class Callback:
        def on_train_loss_report(self, info):
            clock.mark(seen[0])

        def on_val_loss_report(self, info):
            pass

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    args = trainer.TrainingArgs(batch_size=a.batch_size, iters=a.iters, steps_per_report=a.report, steps_per_eval=10**9,
                                steps_per_save=10**9, adapter_file=str(out / "adapters.safetensors"),
                                max_seq_length=a.max_seq_length, grad_checkpoint=getattr(a, "grad_checkpoint", False))
    mx.reset_peak_memory()
    trainer.train(model, optim.Adam(learning_rate=a.lr), CacheDataset(train_set), None, args=args,
                  iterate_batches=counting, training_callback=Callback())
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": len(model.layers),
         "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": KEYS}}))
    seconds, tokens = clock.steady()
    return {"seconds": seconds, "tokens": tokens, "real_tokens": seen[0], "peak": mx.get_peak_memory(),
            "adapter": str(out / "adapters.safetensors"), "iters": a.iters}


def worker_mlxtune(a) -> dict:
    import mlx.core as mx

    import mlxtune
    from mlxtune.data import load_dataset
    from mlxtune.models import load_model

    loaded = load_model(a.model)
    model, tok = loaded.model, loaded.tokenizer
    batch = a.batch_size
    if a.pack:  # rows of up to max_seq_length tokens: choose rows so a step holds about batch_size examples
        splits = load_dataset(a.data, tok, cache=False, max_seq_length=a.max_seq_length)
        lengths = [len(r.ids) for r in splits.train]
        batch = max(1, round(a.batch_size * (sum(lengths) / len(lengths)) / a.max_seq_length))
    clock = _Clock()

    def until_target(report):
        clock.mark(report["trained_tokens"])
        return report["trained_tokens"] >= a.target_tokens or report["iteration"] >= a.iters

    mx.reset_peak_memory()
    result = mlxtune.lora(model, a.data, tokenizer=tok, lora_layers=-1, rank=8, alpha=16.0, seed=getattr(a, "seed", 0),
                          iters=10**6, batch_size=batch, learning_rate=a.lr, optimizer="adam", max_grad_norm=0, pack=a.pack,
                          steps_per_report=a.report, steps_per_eval=0, save_every=0, plot=False,
                          max_seq_length=a.max_seq_length, adapter_file=str(Path(a.out) / "adapters.npz"),
                          force=True, callbacks=[until_target], verbose=False,
                          # this script's own runs (docs/benchmarks.md) are length-bucketed; smollm2.py passes its order
                          batch_order=getattr(a, "batch_order", "length"),
                          grad_checkpoint=getattr(a, "grad_checkpoint", False),
                          share_prefix=getattr(a, "share_prefix", True))
    seconds, tokens = clock.steady()
    return {"seconds": seconds, "tokens": tokens, "real_tokens": result.trained_tokens, "peak": mx.get_peak_memory(),
            "adapter": str(result.adapter_file), "iters": result.iterations, "rows_per_batch": batch}


def worker_eval(a) -> dict:
    from mlxtune.data import load_dataset
    from mlxtune.loss import evaluate_loss
    from mlxtune.models import load

    model, tok = load(a.model, adapter_file=a.adapter)
    splits = load_dataset(a.data, tok, cache=False, max_seq_length=a.max_seq_length)
    return {"val_loss": evaluate_loss(model, splits.valid, 8, a.max_seq_length)}


# ----------------------------------------------------------------------------------------- driver
def spawn(*args, script: str = __file__) -> dict:
    """Run `script` (this one, or another driver that shares these workers) as a worker; its last JSON line."""
    env = dict(os.environ)
    blas = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
    if os.path.exists(blas) and "openblas" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = blas
    proc = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(size: str, work: Path, a) -> list[dict]:
    model = build_model(work / f"model-{size}", size)
    data = build_data(work / f"data-{size}", a.examples, a.max_words)
    common = ["--model", model, "--data", data, "--batch-size", a.batch_size, "--lr", a.lr, "--report", a.report,
              "--max-seq-length", a.max_seq_length]
    rows = []
    ref = spawn("--worker", "mlxlm", *common, "--iters", a.iters, "--out", work / f"{size}-mlxlm")
    ref["name"] = "mlx-lm"
    rows.append(ref)
    for pack in (False, True):
        r = spawn("--worker", "mlxtune", *common, "--target-tokens", ref["real_tokens"],
                  "--iters", a.iters if not pack else 10**6, "--out",
                  work / f"{size}-mlxtune-{'packed' if pack else 'unpacked'}", *(["--pack"] if pack else []))
        r["name"] = f"mlxtune ({'packed' if pack else 'unpacked'})"
        rows.append(r)
    for r in rows:
        r.update(spawn("--worker", "eval", "--model", model, "--data", data, "--adapter", Path(r["adapter"]).parent,
                       "--max-seq-length", a.max_seq_length))
        r["tps"] = r["tokens"] / r["seconds"]
        r["size"] = size
    return rows


def table(rows: list[dict]) -> str:
    head = "| model | trainer | steps | real tokens | real tokens/s | vs mlx-lm | peak mem (MB) | vs mlx-lm | final val loss |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ref = next(x for x in rows if x["size"] == r["size"] and x["name"] == "mlx-lm")
        lines.append(f"| {r['size']} | {r['name']} | {r['iters']} | {r['real_tokens']} | {r['tps']:.0f} | "
                     f"{r['tps'] / ref['tps']:.2f}x | {r['peak'] / 2**20:.0f} | {r['peak'] / ref['peak']:.2f}x | "
                     f"{r['val_loss']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,100m", help="comma list of: " + ", ".join(SIZES))
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default: 8 tiny, 4 for 100m)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--report", type=int, default=None)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--examples", type=int, default=None, help="training examples = one epoch (default: 400 tiny, 40 for 100m)")
    p.add_argument("--epochs", type=int, default=2, help="passes over the data (later epochs reuse compiled shapes)")
    p.add_argument("--max-words", type=int, default=100, help="longest user turn in words (lengths are log-uniform)")
    p.add_argument("--work", default=None, help="keep models/data/adapters here (default: a temp dir)")
    # worker-only arguments
    p.add_argument("--worker", choices=("mlxlm", "mlxtune", "eval"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    p.add_argument("--target-tokens", type=int, help=argparse.SUPPRESS)
    p.add_argument("--iters", type=int, help=argparse.SUPPRESS)
    p.add_argument("--pack", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        fn = {"mlxlm": worker_mlxlm, "mlxtune": worker_mlxtune, "eval": worker_eval}[a.worker]
        print(json.dumps(fn(a)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        for size in a.sizes.split(","):
            sa = argparse.Namespace(**vars(a))
            sa.batch_size = a.batch_size or (8 if size == "tiny" else 4)
            sa.examples = a.examples or (400 if size == "tiny" else 40)
            sa.examples -= sa.examples % sa.batch_size
            sa.iters = a.epochs * sa.examples // sa.batch_size
            sa.report = a.report or 1
            t = time.time()
            rows += bench(size, work, sa)
            print(f"{size}: done in {time.time() - t:.0f}s", file=sys.stderr)
    import mlx.core as mx

    print(f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, mlx {mx.__version__} "
          f"({'GPU' if mx.default_device() == mx.gpu else 'CPU'}); lr {a.lr}, max_seq_length {a.max_seq_length}, "
          f"{a.epochs} epochs of chat examples (user turns up to {a.max_words} words)")
    print(table(rows))


if __name__ == "__main__":
    main()
