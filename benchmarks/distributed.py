"""Data-parallel speed on this machine: 2 ranks with 1 thread each against 1 process with 1 thread.

    python benchmarks/distributed.py                    # MLX (mlx.launch, ring) and, if installed, torch (torchrun, gloo)
    python benchmarks/distributed.py --engines mlx --iters 40
    python benchmarks/distributed.py --engines torch,torch-fsdp

Same model (a random ~25M-parameter llama), data, LoRA settings and global batch for every run; real tokens
per second between the first and the last report (compilation left out), and the bytes each rank sends per
step: a ring all-reduce of S bytes sends 2 (N-1)/N * S per rank, and S is every LoRA gradient in float32
plus the loss sum and token count. With --fsdp (torch-fsdp) each block's frozen weights W are also
all-gathered before its forward and again before its backward (they are resharded after the forward):
2 (N-1)/N * W more per rank and step. The ideal speedup is 2.0x (target >= 1.7x).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))


def build(work: Path) -> tuple[Path, Path]:
    import train_throughput

    train_throughput.SIZES["25m"] = (512, 6, 1376, 8, 4, 8000)
    model = train_throughput.build_model(work / "model", "25m")
    return model, train_throughput.build_data(work / "data", 400, 120, seed=0)


def run(cmd: list[str], threads: int = 1) -> str:
    return run_ranks([cmd], threads)[0]


def run_ranks(cmds: list[list[str]], threads: int = 1, extra: list[dict] | None = None) -> list[str]:
    """Run the commands at the same time (one per rank); their standard outputs."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MLXTUNE_NO_OPENBLAS="0")
    blas = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"
    if os.path.exists(blas):
        env["LD_PRELOAD"] = blas
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              text=True, env=dict(env, **(extra[i] if extra else {})))
             for i, cmd in enumerate(cmds)]
    outs = [p.communicate() for p in procs]
    out, err = outs[0]  # rank 0 reports
    if "Iter" not in out:
        raise SystemExit(f"run failed: {' '.join(cmds[0])}\n{err[-3000:]}")
    return [out for out, _ in outs]


def ring_ranks(cmd: list[str], work: Path, n: int = 2) -> str:
    """`cmd` on n local ranks of MLX's ring backend, started the way mlx.launch starts them (MLX_RANK and a
    MLX_HOSTFILE listing each rank's address) but without its output relay: mlx.launch 0.32 polls the ranks'
    stdin pipes, which are always writable, so its relay threads spin a core; on 2 cores that is a rank's worth
    of CPU. Rank 0's output."""
    hostfile = work / "ring-hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{5320 + r}"] for r in range(n)]))
    return run_ranks([cmd] * n, extra=[{"MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)} for r in range(n)])[0]


def tokens_per_second(stdout: str) -> float:
    """The mean of the reported rates after the first report (which includes compilation)."""
    rates = [float(r) for r in re.findall(r"Tokens/sec (\d+)", stdout)]
    return sum(rates[1:]) / max(len(rates) - 1, 1) if len(rates) > 1 else rates[0]


def trainable_bytes(stdout: str) -> int:
    m = re.search(r"Trainable parameters: [\d.]+% \(([\d.]+)M/", stdout)
    return int(float(m.group(1)) * 1e6 * 4) + 8


def sharded_bytes(stdout: str) -> float:
    """The blocks' frozen weights --fsdp shards (rank 0's FSDP line), or 0."""
    m = re.search(r"FSDP: .* MB of their ([\d.]+) MB", stdout)
    return float(m.group(1)) * 1e6 if m else 0.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--engines", default="mlx,mlx-ring,torch" if importlib.util.find_spec("torch") else "mlx,mlx-ring",
                   help="comma list of mlx (mlx.launch), mlx-ring (the ring ranks started directly), torch, torch-fsdp")
    a = p.parse_args()
    work = Path(tempfile.gettempdir()) / "mlxtune-bench-distributed"
    work.mkdir(exist_ok=True)
    model, data = build(work)
    common = ["lora", "--model", str(model), "--data", str(data), "--iters", str(a.iters), "--batch-size",
              str(a.batch_size), "--steps-per-report", "5", "--steps-per-eval", "0", "--save-every", "0", "--no-plot",
              "--lora-layers", "-1", "--force"]
    mlxtune = [str(Path(sys.executable).parent / "mlxtune")]
    rows, singles = [], {}
    for engine in a.engines.split(","):
        if engine in ("mlx", "mlx-ring"):
            if "mlx" not in singles:
                singles["mlx"] = run(mlxtune + common + ["--adapter-file", str(work / "one" / "adapters.npz")])
            one = singles["mlx"]
            if engine == "mlx":
                two = run([str(Path(sys.executable).parent / "mlx.launch"), "-n", "2", "--backend", "ring",
                           *mlxtune, *common, "--adapter-file", str(work / "two" / "adapters.npz")])
            else:
                two = ring_ranks(mlxtune + common + ["--adapter-file", str(work / "two" / "adapters.npz")], work)
        else:  # torch, torch-fsdp: torchrun with gloo (python -m mlxtune on each rank)
            torch_args = ["--backend", "torch"] + (["--fsdp"] if engine == "torch-fsdp" else [])
            if "torch" not in singles:  # the one-process run is the same for both rows
                singles["torch"] = run(mlxtune + common + ["--backend", "torch", "--adapter-file",
                                                           str(work / "tone" / "adapters.npz")])
            one = singles["torch"]
            two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                       "mlxtune", *common, *torch_args, "--adapter-file", str(work / engine / "adapters.npz")])
        t1, t2 = tokens_per_second(one), tokens_per_second(two)
        sent = 2 * (2 - 1) / 2 * (trainable_bytes(one) + sharded_bytes(two))  # an all-gather sends (N-1)/N * W
        rows.append((engine, t1, t2, t2 / t1, sent))
    print(f"\n{'engine':<11} {'1 process tok/s':>16} {'2 ranks tok/s':>14} {'speedup':>8} {'bytes sent/rank/step':>22}")
    for engine, t1, t2, ratio, sent in rows:
        print(f"{engine:<11} {t1:>16.0f} {t2:>14.0f} {ratio:>7.2f}x {sent / 1e6:>19.2f} MB")
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
