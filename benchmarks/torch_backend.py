"""The torch backend against transformers + PEFT + TRL's SFTTrainer, and against the MLX backend, on this CPU.

    pip install trl            # or: pip install "mlxtune[bench]"
    python benchmarks/torch_backend.py                  # bundled tiny-chat and a random 45M llama, 100 steps
    python benchmarks/torch_backend.py --models bundled --steps 50
    python benchmarks/torch_backend.py --quantize          # on CUDA: QLoRA (NF4, bitsandbytes) for both

On a CUDA machine both torch trainers run on the GPU in bfloat16 and peak memory is
torch.cuda.max_memory_allocated from the start of training (not yet run: no GPU was available).

Every trainer gets the same model, the same data (the bundled tool-call chats, loss on the assistant reply
only: mlxtune's default; SFTTrainer's completion-only loss on prompt/completion records), the same LoRA
(rank 16, alpha 32, every linear layer of every block, no dropout), batch 4, AdamW with bias correction
(PyTorch's; mlxtune's `--bias-correction`, since MLX's Adam without it takes ~3x larger early steps and the
losses would not be comparable) at a constant 2e-3, gradient clipping at 1.0, the same number of steps,
unpacked. What each one does with that is its own: mlxtune batches similar lengths together and projects
only target positions onto the vocabulary; TRL pads each random batch and computes full logits.
Each run is its own process (`--child`). Measured:
- real tokens/s: tokens that predict a next token (padding excluded) per second of training steps
  (mlxtune: its report; TRL: a callback timing each step, tokens counted in the collator);
- peak memory: the process's peak RSS from the start of training (VmHWM reset then), and the whole
  process's peak RSS (libraries, model load, tokenization included);
- validation loss: every adapter scored by one function (`mlxtune.torch_models.evaluate_loss`) on the
  same 200 validation chats (TRL's PEFT adapter is imported with `mlxtune adapters import`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "toolcall"
SETTINGS = dict(rank=16, alpha=32.0, dropout=0.0, target_modules="all-linear", lora_layers=-1, batch_size=4,
                learning_rate=2e-3, lr_schedule="constant", warmup=0, max_grad_norm=1.0, max_seq_length=256, pack=False,
                optimizer="adamw", weight_decay=0.0, bias_correction=True)
# a llama with a 32k vocabulary (untied head), so that the vocabulary projection weighs what it does in real models
RANDOM = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
              vocab_size=32000, tie_word_embeddings=False)


def vmhwm_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def reset_vmhwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_random(out: Path) -> Path:
    """The bundled tokenizer on a random llama (float32) with RANDOM's shape."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True)
    base = json.loads((ROOT / "data" / "tiny-chat" / "config.json").read_text())
    config = LlamaConfig(**{**{k: v for k, v in base.items() if k not in ("architectures", "model_type", "torch_dtype")},
                            **RANDOM})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    for f in (ROOT / "data" / "tiny-chat").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation")):
            shutil.copy(f, out / f.name)
    return out


# ------------------------------------------------------------------------------------------------- children

def child_ours(model: str, backend: str, out: str, steps: int, quantize: bool, seed: int, order: str) -> dict:
    import mlxtune
    from mlxtune import mlx_engine

    if backend == "mlx":  # the MLX engine reports MLX's allocator; measure the same RSS as the others
        reset = mlx_engine.MLXEngine.reset_peak_memory
        mlx_engine.MLXEngine.reset_peak_memory = lambda self: (reset(self), reset_vmhwm())
    reports = []
    result = mlxtune.lora(model, str(DATA), backend=backend, iters=steps, steps_per_report=steps, steps_per_eval=0,
                          val_batches=1, save_every=0, plot=False, verbose=False, adapter_file=f"{out}/adapters.npz",
                          callbacks=[reports.append], quantize=quantize, seed=seed, batch_order=order, **SETTINGS)
    train = next(r for r in reports if "train_loss" in r)
    cuda = backend == "torch" and _cuda()
    return {"adapter": str(result.adapter_file), "tokens_per_second": train["tokens_per_second"],
            "train_peak_gb": train["peak_memory"] if cuda else vmhwm_gb(), "train_loss": train["train_loss"]}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def child_trl(model_dir: str, out: str, steps: int, quantize: bool, seed: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = []
    for line in (DATA / "train.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    cuda = _cuda()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    extra = {}
    if quantize and cuda:
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32, **extra)
    times: list[float] = []
    tokens: list[int] = []

    class Measure(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            reset_vmhwm()
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, *args, **kwargs):
            self.tic = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.tic)

    s = SETTINGS
    config = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=s["batch_size"],
                       gradient_accumulation_steps=1, learning_rate=s["learning_rate"], lr_scheduler_type="constant",
                       warmup_steps=0, weight_decay=0.0, max_grad_norm=s["max_grad_norm"], max_length=s["max_seq_length"],
                       completion_only_loss=True, packing=False, logging_steps=steps, save_strategy="no", report_to=[],
                       use_cpu=not cuda, bf16=cuda, fp16=False, seed=seed, dataloader_num_workers=0, disable_tqdm=True)
    peft_config = LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Measure()])
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        mask = batch["attention_mask"]
        tokens.append(int(mask.sum()) - int(mask.shape[0]))  # positions that predict a next token, as mlxtune counts
        return batch

    trainer.data_collator = counting
    metrics = trainer.train().metrics
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else vmhwm_gb()
    trainer.model.save_pretrained(f"{out}/peft")
    return {"peft": f"{out}/peft", "tokens_per_second": sum(tokens[:steps]) / sum(times), "train_peak_gb": peak,
            "train_loss": metrics.get("train_loss")}


def run_child(args: list[str]) -> dict:
    """Run this script as a child process and return the JSON line it prints last."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_main(argv: list[str]) -> None:
    import resource

    kind, model, out, steps, quantize, seed = argv[0], argv[1], argv[2], int(argv[3]), argv[4] == "1", int(argv[5])
    if kind == "trl":
        result = child_trl(model, out, steps, quantize, seed)
    else:
        backend, _, order = kind.partition("-")
        result = child_ours(model, backend, out, steps, quantize, seed, order or "length")
    result["process_peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps(result))


# --------------------------------------------------------------------------------------------------- parent

def val_loss(model_dir: Path, adapter) -> float:
    from mlxtune.backends import torch_module
    from mlxtune.data import load_dataset

    tm = torch_module("torch_models")
    loaded = tm.load_torch_model(model_dir, device="cpu")
    tm.load_adapter(loaded.model, adapter)
    splits = load_dataset(str(DATA), loaded.tokenizer, max_seq_length=SETTINGS["max_seq_length"])
    return tm.evaluate_loss(loaded.model, splits.valid, 8, SETTINGS["max_seq_length"])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bundled,random-45m", help="bundled, random-45m or both (comma list)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--work", default=None, help="folder for models and adapters (default: a temp dir)")
    parser.add_argument("--quantize", action="store_true", help="QLoRA: NF4 bases on CUDA (float bases on the CPU)")
    parser.add_argument("--seeds", default="0", help="comma list: every trainer runs once per seed (LoRA init, data order)")
    parser.add_argument("--mlx-seeds", type=int, default=1, help="the MLX backend runs only the first N seeds")
    opts = parser.parse_args()
    work = Path(opts.work or tempfile.mkdtemp(prefix="torch-backend-bench-"))
    from mlxtune.adapters import import_peft

    seeds = [int(x) for x in opts.seeds.split(",")]
    kinds = ("torch-length", "torch-random", "trl", "mlx-length")
    rows = []
    for name in opts.models.split(","):
        model_dir = ROOT / "data" / "tiny-chat" if name == "bundled" else build_random(work / name)
        results: dict[str, list[dict]] = {k: [] for k in kinds}
        for n, seed in enumerate(seeds):
            for kind in kinds:
                if kind == "mlx-length" and n >= opts.mlx_seeds:
                    continue
                out = work / f"{name}-{kind}-{seed}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                print(f"{name}: training with {kind}, seed {seed} ...", file=sys.stderr, flush=True)
                r = run_child(["--child", kind, str(model_dir), str(out), str(opts.steps), "1" if opts.quantize else "0",
                               str(seed)])
                adapter = r.get("adapter") or import_peft(r["peft"], out / "imported" / "adapters.npz", force=True)
                r["val_loss"] = val_loss(model_dir, adapter)
                print(f"  {r['tokens_per_second']:.0f} tokens/s, val loss {r['val_loss']:.3f}", file=sys.stderr, flush=True)
                results[kind].append(r)
        rows.append((name, results))

    import mlx.core as mx
    import torch
    import transformers
    import trl

    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}, mlx {mx.__version__}; {opts.steps} steps, "
          f"batch 4, rank 16, all linear layers, unpacked, max length 256, "
          f"{'bfloat16 on CUDA' if torch.cuda.is_available() else 'float32 on the CPU'}{', NF4' if opts.quantize else ''}; "
          f"seeds {opts.seeds} (MLX: the first {opts.mlx_seeds}); means over seeds, val loss mean (min-max); "
          f"load average {open('/proc/loadavg').read().split()[0] if os.path.exists('/proc/loadavg') else '?'}\n")
    names = {"torch-length": "mlxtune --backend torch --batch-order length (length-bucketed batches)",
             "torch-random": "mlxtune --backend torch (random batches, the default)",
             "trl": "transformers + PEFT + TRL SFTTrainer (random batches)",
             "mlx-length": "mlxtune --backend mlx (length-bucketed)"}
    print("| model | trainer | real tokens/s | training peak RSS | process peak RSS | val loss |")
    print("|---|---|---:|---:|---:|---:|")

    def mean(rs, key):
        return sum(r[key] for r in rs) / len(rs)

    for name, results in rows:
        for kind in kinds:
            rs = results[kind]
            if not rs:
                continue
            vals = [r["val_loss"] for r in rs]
            spread = f" ({min(vals):.3f}-{max(vals):.3f})" if len(vals) > 1 else ""
            print(f"| {name} | {names[kind]} | {mean(rs, 'tokens_per_second'):.0f} | {mean(rs, 'train_peak_gb'):.2f} GB | "
                  f"{mean(rs, 'process_peak_gb'):.2f} GB | {mean(rs, 'val_loss'):.3f}{spread} |")
        h = results["trl"]
        for kind in ("torch-length", "torch-random"):
            t = results[kind]
            speed = mean(t, "tokens_per_second") / mean(h, "tokens_per_second")
            print(f"| {name} | {kind.replace('-', ' ')} / TRL | **{speed:.2f}x** | "
                  f"**{mean(t, 'train_peak_gb') / mean(h, 'train_peak_gb'):.2f}x** | "
                  f"{mean(t, 'process_peak_gb') / mean(h, 'process_peak_gb'):.2f}x | "
                  f"{mean(t, 'val_loss') - mean(h, 'val_loss'):+.3f} |")


if __name__ == "__main__":
    main()
