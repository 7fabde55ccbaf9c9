"""GGUF import speed and memory: `mlxtune convert --gguf` vs transformers' GGUF loader, side by side.

    python benchmarks/gguf_import.py [--work /tmp/gguf-import-bench] [--layers 28] [--repeat 1]

Builds a random ~506M-parameter llama checkpoint (benchmarks/gguf_write.py's builder, 28 layers), writes
it as Q8_0 and Q4_K_M GGUF files with mlxtune's writer, then times, each in a fresh process (peak RSS
from the kernel, page cache flushed before each run):
  mlxtune convert --gguf F --mlx-path D                 (default: Q8_0/Q4_K stay quantized, exactly)
  mlxtune convert --gguf F --mlx-path D --de-quantize   (float16 everywhere)
  transformers: AutoModelForCausalLM.from_pretrained(dir, gguf_file=F, dtype=float16) and
                AutoTokenizer.from_pretrained(dir, gguf_file=F), written to D as safetensors, config and
                tokenizer files (save_pretrained refuses a GGUF-loaded model, so safetensors' save_model)
Targets: >= 3x faster than transformers, peak RSS below 300 MB plus the largest tensor. With --repeat, later
runs replace the previous output (mlxtune with --force: the new directory is built, then swapped in).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gguf_write  # noqa: E402  (the checkpoint builder and the fresh-process measurement)

_TRANSFORMERS = """
import sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
f, out = Path(sys.argv[1]), sys.argv[2]
from safetensors.torch import save_model
model = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float16)
Path(out).mkdir(exist_ok=True)
# save_pretrained refuses a model loaded from GGUF ("quantized with gguf and is not serializable")
save_model(model, f"{out}/model.safetensors")
model.config.save_pretrained(out)
AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name).save_pretrained(out)
"""


def largest_tensor_mib(path: Path, dtype_bytes: int = 2) -> float:
    """The largest tensor of the GGUF `path` in float16 (what the float output holds), in MiB."""
    from mlxtune.gguf.reader import read_gguf

    g = read_gguf(path)
    return max(t.rows * t.cols for t in g.tensors.values()) * dtype_bytes / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf-import-bench"))
    ap.add_argument("--layers", type=int, default=28, help="fewer for a quick smoke run")
    ap.add_argument("--repeat", type=int, default=1, help="runs per cell (the median is reported)")
    ap.add_argument("--only", nargs="*", default=["q8_0", "q4_k_m"])
    args = ap.parse_args()
    gguf_write.REPEAT = args.repeat
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    gguf_write.CONFIG["num_hidden_layers"] = args.layers
    model = gguf_write.build_checkpoint(work / f"model-{args.layers}")
    py = sys.executable
    env = {**os.environ}
    rows = []
    for kind in args.only:
        src = work / f"model-{args.layers}.{kind}.gguf"
        if not src.exists():
            from mlxtune.gguf import to_gguf

            to_gguf(model, src, kind, verify=False, log=lambda *a: None)
        out = work / f"out-{kind}"

        def run(cmd, out=out):
            shutil.rmtree(out, ignore_errors=True)
            return gguf_write.measure(cmd, env)

        theirs = run([py, "-c", _TRANSFORMERS, str(src), str(out)])
        rows.append((kind, "transformers from_pretrained(gguf_file) + save (float16)", *theirs))
        rows.append((kind, "mlxtune convert --gguf (default: exact types stay quantized)",
                     *run([py, "-m", "mlxtune", "convert", "--gguf", str(src), "--mlx-path", str(out), "--force"])))
        rows.append((kind, "mlxtune convert --gguf --de-quantize (float16)",
                     *run([py, "-m", "mlxtune", "convert", "--gguf", str(src), "--mlx-path", str(out), "--de-quantize",
                           "--force"])))
        rows.append((kind, None, largest_tensor_mib(src), src.stat().st_size / 2**20))

    print(f"\nmodel: {model} ({args.layers} layers), {os.cpu_count()} CPU cores, median of {args.repeat} run(s), "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| GGUF | tool | wall (s) | peak RSS (MiB) | speed-up vs transformers |")
    print("|---|---|---:|---:|---:|")
    ref = {}
    for kind, tool, wall, rss in rows:
        if tool is None:
            print(f"| {kind} | (file {rss:.0f} MiB; largest tensor {wall:.0f} MiB as float16) | | | |")
            continue
        base = ref.setdefault(kind, wall)
        print(f"| {kind} | {tool} | {wall:.1f} | {rss:.0f} | {base / wall:.1f}x |")


if __name__ == "__main__":
    main()
