"""A million rows: `mlxtune lora --iters 1` vs `mlx_lm lora --iters 1` on one big synthetic chat file.

    python benchmarks/data_scale.py                    # 1,000,000 chats (~411 MB), a tiny model
    python benchmarks/data_scale.py --rows 200000      # quicker

Both trainers get the same data folder (train.jsonl with the rows, valid.jsonl with 100) and the same tiny
random model (the tests' 2-block llama with its byte-level BPE tokenizer), and run one training step with
one validation batch. Each run is a fresh process; the table gives the seconds until the first
report of step 1's train loss appears (the first step done), the whole run's seconds, and peak memory: the
largest RSS of the trainer's process, and the largest sum over its process tree (mlxtune tokenizes a big
file in worker processes when it tokenizes first), sampled every 50 ms. mlxtune runs twice as it runs by
default (a file this big is tokenized as batches read it, like mlx-lm), then twice with
MLXTUNE_LAZY_TOKENIZE=0: with an empty tokenization cache, then with the cache the first run wrote.
mlx-lm keeps no cache: it tokenizes each example when a batch needs it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more").split()
# mlxtune's report line, or mlx-lm's table row `   1    6.111 ▼    53   0.8k` (iteration 1, its train loss).
FIRST_STEP = re.compile(r"Iter 1: Train loss|^\s*1\s+\d+\.\d+\s")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def make_chats(path: Path, n: int, seed: int = 0) -> None:
    """n short chats (a system line, one user and one assistant turn of 12-48 words): ~411 bytes a row."""
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with open(path, "w") as f:
        for _ in range(n):
            messages = [{"role": "system", "content": "You are brief."},
                        {"role": "user", "content": text(12, 48)}, {"role": "assistant", "content": text(12, 48)}]
            f.write(json.dumps({"messages": messages}) + "\n")


def measure(cmd: list[str], env: dict) -> dict:
    """Seconds to the first step, seconds in all, peak RSS of the process and of its tree (GB), and the
    machine's 1-minute load average before and after (other jobs slow every time here down)."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = psutil.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    peak = {"own": 0, "tree": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                own = proc.memory_info().rss
                tree = own + sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                own = tree = 0
            peak["own"], peak["tree"] = max(peak["own"], own), max(peak["tree"], tree)
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    first = None
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-20:]
        if first is None and FIRST_STEP.search(ANSI.sub("", line)):
            first = time.perf_counter() - start
    code = proc.wait()
    done.set()
    total = time.perf_counter() - start
    if code != 0 or first is None:
        sys.exit(f"{' '.join(cmd[:4])} ... failed (exit {code}):\n{''.join(tail)}")
    return {"first": first, "total": total, "own": peak["own"] / 1e9, "tree": peak["tree"] / 1e9,
            "load": f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--skip-mlx-lm", action="store_true")
    ap.add_argument("--skip-eager", action="store_true", help="leave out the MLXTUNE_LAZY_TOKENIZE=0 runs (minutes)")
    args = ap.parse_args()
    from tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = make_tiny_model(tmp / "model")
        data = tmp / "data"
        data.mkdir()
        t = time.perf_counter()
        make_chats(data / "train.jsonl", args.rows)
        make_chats(data / "valid.jsonl", 100, seed=1)
        size = (data / "train.jsonl").stat().st_size
        print(f"{args.rows:,} chats, {size / 1e6:.0f} MB, written in {time.perf_counter() - t:.0f} s", flush=True)
        env = {**os.environ, "MLXTUNE_CACHE": str(tmp / "cache"), "PYTHONPATH": str(ROOT)}
        common = ["--model", str(model), "--data", str(data), "--iters", "1", "--batch-size", "4",
                  "--val-batches", "1", "--steps-per-report", "1", "--max-seq-length", "512"]
        ours = [sys.executable, "-m", "mlxtune", "lora", *common, "--adapter-file", str(tmp / "ours" / "adapters.npz"), "--force"]
        rows = {}
        rows["mlxtune (lazy), first run"] = measure(ours, env)
        rows["mlxtune (lazy), second run"] = measure(ours, env)
        print("mlxtune lazy runs done", flush=True)
        if not args.skip_eager:
            eager = {**env, "MLXTUNE_LAZY_TOKENIZE": "0"}
            rows["mlxtune, tokenized first (MLXTUNE_LAZY_TOKENIZE=0), first run"] = measure(ours, eager)
            rows["mlxtune, tokenized first, with its cache"] = measure(ours, eager)
        if not args.skip_mlx_lm:
            theirs = [sys.executable, "-m", "mlx_lm", "lora", "--train", *common, "--adapter-path", str(tmp / "theirs")]
            rows["mlx-lm (tokenizes per batch)"] = measure(theirs + ["--num-layers", "2"], env)
    print(f"\n{args.rows:,} rows, {size / 1e6:.0f} MB; os.cpu_count() = {os.cpu_count()}\n")
    print("| run | to first step (s) | whole run (s) | peak RSS, process (GB) | peak RSS, process tree (GB) "
          "| load before / after |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['first']:.1f} | {r['total']:.1f} | {r['own']:.2f} | {r['tree']:.2f} | {r['load']} |")
    theirs = rows.get("mlx-lm (tokenizes per batch)")
    if theirs:  # the machine's speed cancels out of a ratio taken in the same run
        for name in (n for n in rows if n.startswith("mlxtune")):
            print(f"{name}: {rows[name]['first'] / theirs['first']:.2f}x mlx-lm's time to the first step")


if __name__ == "__main__":
    main()
