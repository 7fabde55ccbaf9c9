"""Does re-quantization round a fine-tune away? The fused model's update against each GGUF type's rounding.

    python benchmarks/update_survival.py BASE FUSED [--type q4_k_m --type q4_0 ...]

BASE is the float model the adapter was trained on (or its de-quantized copy), FUSED the model with the adapter
merged. For every tensor the adapter changed (update U = FUSED - BASE), each type's recipe encodes FUSED and
decodes it again (Q) as `mlxtune gguf` would, and the table says, over all adapted tensors:

- update / rounding: RMS of U over RMS of the rounding error Q - FUSED (min, median, max over tensors);
- update kept: the share of U that survives, <Q - BASE, U> / <U, U> (1.0: all of it; 0: rounded away, as when
  BASE sits on the type's grid and U is well below its step);
- noise / update: RMS of Q - FUSED over RMS of U, all tensors together.

This is the question `--keep-adapter` answers tensor by tensor (docs/benchmarks.md, "Fine-tune-aware
quantization"): a type can only lose the fine-tune where the update is near or below its rounding error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def survival(base: Path, fused: Path, ftype: str) -> dict:

    from mlxtune.gguf import arch as archmod
    from mlxtune.gguf.quants import FileType, rounded
    from mlxtune.gguf.writer import plan_tensors
    from mlxtune.model_files import normalize_config, read_config
    from mlxtune.weights import index_tensors

    config = normalize_config(read_config(fused))
    arch, cfg = archmod.resolve_arch(config)
    before, after = index_tensors(base), index_tensors(fused)
    planned, _ = plan_tensors(after, arch, cfg, config, FileType(ftype))
    qtype = {p.source: p.qtype for p in planned}
    ratios, kept_num, upd_sq, err_sq, types = [], 0.0, 0.0, 0.0, {}
    for name, st in after.items():
        if len(st.shape) != 2 or name not in qtype:
            continue
        w1 = st.read_rows(0, st.shape[0]).astype(np.float32).reshape(st.shape)
        w0 = before[name].read_rows(0, st.shape[0]).astype(np.float32).reshape(st.shape)
        u = w1 - w0
        if not np.any(u):
            continue
        q = qtype[name]
        types[q.name] = types.get(q.name, 0) + 1
        back = rounded(w1, q)
        err = back - w1
        ratios.append(float(np.sqrt((u * u).mean() / max((err * err).mean(), 1e-30))))
        kept_num += float(((back - w0) * u).sum())
        upd_sq += float((u * u).sum())
        err_sq += float((err * err).sum())
    if not ratios:
        sys.exit(f"{fused}: no tensor differs from {base}: is the adapter fused into it?")
    r = np.sort(ratios)
    return {"type": ftype, "tensors": len(r), "types": ", ".join(f"{v} {k}" for k, v in sorted(types.items())),
            "min": r[0], "median": r[len(r) // 2], "max": r[-1], "kept": kept_num / upd_sq,
            "noise": (err_sq / upd_sq) ** 0.5}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path)
    p.add_argument("fused", type=Path)
    p.add_argument("--type", dest="types", action="append", help="GGUF type(s) (default: q4_k_m and q4_0)")
    args = p.parse_args()
    print("| type | adapted tensors (as written) | update / rounding, min / median / max | update kept | noise / update |")
    print("|---|---|---|---:|---:|")
    for t in args.types or ["q4_k_m", "q4_0"]:
        s = survival(args.base, args.fused, t)
        print(f"| {t} | {s['tensors']} ({s['types']}) | {s['min']:.2f}x / {s['median']:.2f}x / {s['max']:.2f}x | "
              f"{s['kept']:.2%} | {s['noise']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
