"""Fine-tune-aware quantization on the bundled task: plain q4_k_m / q4_0 against `--keep-adapter`, by `mlxtune compare`.

    python benchmarks/keep_adapter.py --work /tmp/keep      # ~40 min on 2 cores (two LoRA runs); prints the table
    python benchmarks/keep_adapter.py --work /tmp/keep --scenarios fragile -n 100   # one scenario, 100 test rows

Three adapters, each trained with the bundled settings (data/default-lora.yaml), fused, and written as f16,
q8_0, q4_k_m and q4_0, the last two plain and with `--keep-adapter`:

- `float`: 1000 steps on the bundled model as it ships (float32): the README's run.
- `from-q4_k_m`: 1000 steps on the bundled model as it comes out of a q4_k_m GGUF file (every tensor rounded
  through the recipe's encodings and back), the model a user holding a GGUF in LM Studio would fine-tune;
  writing the fused model with the same recipe rounds weights back towards the grid they came from.
- `fragile`: 40 steps on the bundled model from a q4_0 file: an early adapter with small margins. With the
  bundled schedule (50 warmup steps) it measured 0% exact match, so it only shows KL and agreement;
  `--scenarios fragile:150` (30% exact match) is the case where rounding costs replies (docs/benchmarks.md).

Each row is a GGUF stage of `mlxtune compare` on the 200-row test split: exact match, the share of the
adapter's exact match it keeps, agreement with the adapter, mean KL to it, stopped share and file size.
Trained adapters and fused models are kept in --work and reused by a second run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TYPES = ["q4_k_m", "q4_0"]
SCENARIOS = {"float": (None, 1000), "from-q4_k_m": ("q4_k_m", 1000), "fragile": ("q4_0", 40)}


def run(*args: str, cwd: Path) -> None:
    out = Path(args[args.index("--outfile") + 1]).name if "--outfile" in args else ""
    keep = " --keep-adapter" if "--keep-adapter" in args else ""
    print(f"  {time.strftime('%H:%M:%S')} mlxtune {args[0]} {out}{keep}", flush=True)
    r = subprocess.run([sys.executable, "-m", "mlxtune", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"mlxtune {' '.join(args)} failed:\n{r.stderr[-3000:]}")


def scenario(name: str, base: Path, iters: int, work: Path, data: Path, n: int | None) -> list[dict]:
    if iters != SCENARIOS[name][1]:  # another step count: its own folder, so a second run reuses the right adapter
        name = f"{name}-{iters}"
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    adapters = d / "adapters"
    if not (adapters / "adapters.npz").exists():
        print(f"[{name}] training (mlxtune lora --iters {iters}) ...", flush=True)
        run("lora", "--model", str(base), "--data", str(data), "--config", str(ROOT / "data" / "default-lora.yaml"),
            "--iters", str(iters), "--adapter-file", str(adapters / "adapters.npz"), cwd=d)
    fused = d / "fused"
    if not fused.exists():
        run("fuse", "--model", str(base), "--adapter-file", str(adapters), "--save-path", str(fused), cwd=d)
    files = []
    for t in ("f16", "q8_0"):
        files.append(d / f"{name}-{t}.gguf")
        run("gguf", "--model", str(fused), "--outfile", str(files[-1]), "--type", t, "--force", cwd=d)
    for t in TYPES:
        plain, keep = d / f"{name}-{t}.gguf", d / f"{name}-{t}-keep.gguf"
        run("gguf", "--model", str(fused), "--outfile", str(plain), "--type", t, "--force", cwd=d)
        run("gguf", "--model", str(fused), "--outfile", str(keep), "--type", t, "--force", "--keep-adapter",
            str(adapters), "--data", str(data), cwd=d)
        files += [plain, keep]
    report = d / "compare.json"
    args = ["compare", "--model", str(base), "--adapter-file", str(adapters), "--data", str(data), "--no-base",
            "--json", str(report), "--force"]
    if n is not None:
        args += ["-n", str(n)]
    for f in files:
        args += ["--gguf", str(f)]
    print(f"[{name}] comparing {len(files)} files ...", flush=True)
    run(*args, cwd=d)
    stages = json.loads(report.read_text())["stages"]
    adapter = next(s for s in stages if s["stage"] == "adapter")
    rows = []
    for s in stages:
        path = d / s["stage"].removeprefix("gguf:")
        rows.append({"base": name, **s, "kept": s["exact_match"] / adapter["exact_match"] if adapter["exact_match"] else None,
                     "bytes": path.stat().st_size if s["stage"].startswith("gguf:") else None})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="working folder (adapters and fused models are reused)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated NAME or NAME:STEPS, run in this order (default: all of {', '.join(SCENARIOS)})")
    p.add_argument("-n", dest="n", type=int, default=None, help="compare on the first N test rows only (default: all 200)")
    args = p.parse_args()
    names = [s.strip().partition(":") for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s, _, _ in names if s not in SCENARIOS]
    if unknown:
        p.error(f"--scenarios: unknown {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    from mlxtune.defaults import DEFAULT_DATA, DEFAULT_MODEL

    from tiny import gguf_rounded_copy

    work = args.work.resolve()
    rows = []
    for name, _, steps in names:
        grid, iters = SCENARIOS[name]
        iters = int(steps) if steps else iters
        base = DEFAULT_MODEL
        if grid is not None:
            base = work / f"tiny-chat-from-{grid}"
            if not base.exists():
                gguf_rounded_copy(DEFAULT_MODEL, base, grid)
        rows += scenario(name, base, iters, work, DEFAULT_DATA, args.n)
    print(f"compare rows: {args.n or 'all'}")
    print("| adapter | stage | exact match | kept of adapter's | agreement | mean KL | stopped | size |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r['bytes'] / 1024:.0f} KiB" if r["bytes"] else "-"
        kept = "-" if r["kept"] is None else f"{r['kept']:.1%}"
        print(f"| {r['base']} | {r['stage']} | {r['exact_match']:.1%} | {kept} | {r['agreement']:.1%} | "
              f"{r['mean_kl']:.2e} | {r['stopped']:.1%} | {size} |")


if __name__ == "__main__":
    main()
