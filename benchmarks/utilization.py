"""Where a float32 SmolLM2 step's time goes on this machine: its matmuls alone against the whole step, MLX against torch.

    python benchmarks/utilization.py                       # 30 steps each, batch 8, data/toolcall
    python benchmarks/utilization.py --steps 50 --work /tmp/smol-bench   # reuse smollm2.py's float32 import

The utilization target of benchmarks/smollm2.py (tokens/s x 4 x body parameters / the float32 matmul rate of
the model's projection shapes) asks what share of the burst rate a training step keeps. This script prints
the rows that bound it, each in its own process, with the rate timed in that process (MLX's or torch's):
- the step's matmuls alone: the 30 blocks' seven projections forward and their input gradients backward on
  as many tokens as the run's batches average, with nothing between them; then with LoRA's rank-8 products on
  q, k, v and o (forward, input and weight gradients). The ceiling a step can reach here;
- mlxtune's step on MLX (the default engine) and on its torch backend (`--backend torch`, vectorised
  element-wise kernels on every core): the same model, data, LoRA (q, k, v, o of all blocks, rank 8, scale 2),
  Adam at 1e-3, batch 8, random batches, seed 0, timed from the end of the first step to the end of the last.
Needs the `torch` extra for the last row (`pip install "mlxtune[torch]"`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402  (the model, its body count and the MLX matmul rate)
import train_throughput as tt  # noqa: E402  (spawn, the step clock)

LORA_RANK = 8


def batch_tokens(model: str, data: str, steps: int, batch_size: int) -> float:
    """Mean non-padding tokens of the run's timed random batches (what the run's tokens/s counts)."""
    import itertools

    from mlxtune.data import iterate_batches, load_dataset
    from mlxtune.models import load_tokenizer

    splits = load_dataset(data, load_tokenizer(Path(model)), cache=False, max_seq_length=512)
    batches = iterate_batches(splits.train, batch_size, max_seq_length=512, order="random", seed=0)
    return sum(b.n_real for b in itertools.islice(batches, 1, steps + 1)) / steps  # the timed ones: after the first


def matmuls_alone(config: dict, tokens: int, lora: bool, repeats: int = 3) -> float:
    """Seconds for one step's projection matmuls (forward and input gradients), best of `repeats`."""
    import mlx.core as mx

    shapes = smollm2.projection_shapes(config)
    blocks = config["num_hidden_layers"]
    w = [[mx.random.normal((n, k)) * 0.02 for k, n in shapes] for _ in range(blocks)]
    a = [[mx.random.normal((LORA_RANK, k)) * 0.02 for k, _ in shapes[:4]] for _ in range(blocks)]
    b = [[mx.random.normal((n, LORA_RANK)) * 0.02 for _, n in shapes[:4]] for _ in range(blocks)]
    x = {k: mx.random.normal((tokens, k)) for k in dict.fromkeys(k for k, _ in shapes)}
    g = {n: mx.random.normal((tokens, n)) for n in dict.fromkeys(n for _, n in shapes)}
    mx.eval(w, a, b, x, g)

    def step():
        for i in range(blocks):
            outs = []
            for j, ((k, n), wij) in enumerate(zip(shapes, w[i])):
                outs += [x[k] @ wij.T, g[n] @ wij]
                if lora and j < 4:
                    xa = x[k] @ a[i][j].T
                    ga = g[n] @ b[i][j]
                    outs += [xa @ b[i][j].T, g[n].T @ xa, ga.T @ x[k], ga @ a[i][j]]
            mx.eval(outs)  # a block at a time, as a step's graph would hold it

    step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best


def torch_matmul_gflops(config: dict, tokens: int = 512, repeats: int = 5) -> float:
    """smollm2.matmul_gflops in torch: its own BLAS, its own threads."""
    import torch

    shapes = smollm2.projection_shapes(config)
    xs = {k: torch.randn(tokens, k) for k in dict.fromkeys(k for k, _ in shapes)}
    ws = [torch.randn(k, n) for k, n in shapes]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            for (k, _n), w in zip(shapes, ws):
                xs[k] @ w
        best = min(best, (time.perf_counter() - start) / 4)
    return sum(2 * tokens * k * n for k, n in shapes) / best / 1e9


def worker(a) -> dict:
    config = json.loads((Path(a.model) / "config.json").read_text())
    if a.worker == "matmuls":
        tokens = round(batch_tokens(a.model, a.data, a.steps, a.batch_size))
        before = smollm2.matmul_gflops(config)
        plain, lora = matmuls_alone(config, tokens, False), matmuls_alone(config, tokens, True)
        return {"tokens": tokens, "plain": plain, "lora": lora, "gflops": max(before, smollm2.matmul_gflops(config))}
    import mlxtune

    rate = torch_matmul_gflops if a.worker == "torch" else smollm2.matmul_gflops
    before = rate(config)
    clock = tt._Clock()

    def until_done(report):
        clock.mark(report["trained_tokens"])
        return report["iteration"] >= a.steps + 1

    with tempfile.TemporaryDirectory() as out:
        mlxtune.lora(a.model, a.data, backend=a.worker, lora_layers=-1, rank=LORA_RANK, alpha=16.0, seed=0,
                     iters=10**6, batch_size=a.batch_size, learning_rate=1e-3, optimizer="adam", max_grad_norm=0,
                     steps_per_report=1, steps_per_eval=0, save_every=0, plot=False, max_seq_length=512,
                     adapter_file=str(Path(out) / "adapters.npz"), callbacks=[until_done], verbose=False,
                     batch_order="random")
    seconds, tokens = clock.steady()
    return {"seconds": seconds / a.steps, "tokens": tokens / a.steps, "gflops": max(before, rate(config))}


def table(rows: list[tuple[str, float, float, float]], body: int) -> str:
    """rows: (what, seconds a step, tokens a step, matmul GFLOP/s of its process)"""
    lines = ["| what | seconds a step | tokens a step | tokens/s | matmul GFLOP/s (its own) | utilization |",
             "|---|---|---|---|---|---|"]
    for what, seconds, tokens, gflops in rows:
        util = tokens / seconds * 4 * body / (gflops * 1e9)
        lines.append(f"| {what} | {seconds:.2f} | {tokens:.0f} | {tokens / seconds:.0f} | {gflops:.0f} | {util:.0%} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed steps of each trainer (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data", default=str(smollm2.ROOT / "data" / "toolcall"))
    p.add_argument("--work", default=None, help="where the float32 import is (or goes); default: a temp dir")
    p.add_argument("--worker", choices=("matmuls", "mlx", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    from mlxtune.gguf.importer import import_gguf

    model = Path(a.work or tempfile.mkdtemp(prefix="utilization_")) / "f32"
    if not (model / "config.json").exists():
        import_gguf(smollm2.SMOLLM2, model, progress=False, dequantize=True, dtype="float32")
    common = ["--model", model, "--data", a.data, "--steps", a.steps, "--batch-size", a.batch_size]
    m = tt.spawn("--worker", "matmuls", *common, script=__file__)
    rows = [("the step's matmuls alone (MLX)", m["plain"], m["tokens"], m["gflops"]),
            (f"+ LoRA's rank-{LORA_RANK} products on q, k, v, o", m["lora"], m["tokens"], m["gflops"])]
    for engine, name in (("mlx", "mlxtune's step, MLX"), ("torch", "mlxtune's step, torch backend")):
        r = tt.spawn("--worker", engine, *common, script=__file__)
        rows.append((name, r["seconds"], r["tokens"], r["gflops"]))
    body = smollm2.body_parameters(model)
    print(f"SmolLM2-135M-Instruct float32 ({body / 1e6:.1f}M body parameters), data/toolcall, batch {a.batch_size}, "
          f"{a.steps} steps, {os.cpu_count()} CPUs")
    print(table(rows, body))


if __name__ == "__main__":
    main()
