"""Benchmark: `mlxtune convert` vs `mlx_lm.convert` (wall time and peak RSS), plus a fidelity table.

    python benchmarks/convert.py              # ~500M-parameter random llama, float16 and 4-bit
    python benchmarks/convert.py --small      # a ~60M model, for a quick look
    python benchmarks/convert.py --fidelity   # per-architecture float/quantized fidelity vs transformers

The one thing to know: each conversion runs in its own subprocess and its peak RSS is that process's
`ru_maxrss` from `os.wait4`, so the numbers are not polluted by this script. The source checkpoint
(bfloat16, two safetensors shards, like a hub download) is written once and read once beforehand so
that both tools start with the same page cache. Targets: wall <= mlx_lm's, peak RSS <= 0.5x mlx_lm's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

BIG = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=26, num_attention_heads=16,
           num_key_value_heads=16, vocab_size=32000)  # 0.50B parameters
SMALL = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=32000)


def write_checkpoint(out: Path, dims: dict) -> int:
    """A random bfloat16 llama in HF layout, two shards + index, written in a subprocess."""
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
import mlx.core as mx
from tiny import make_bpe_tokenizer
out = __import__('pathlib').Path({str(out)!r})
make_bpe_tokenizer(out)
d = {dims!r}
h, i, L, V = d['hidden_size'], d['intermediate_size'], d['num_hidden_layers'], d['vocab_size']
kv = h // d['num_attention_heads'] * d['num_key_value_heads']
shapes = {{'model.embed_tokens.weight': (V, h), 'model.norm.weight': (h,), 'lm_head.weight': (V, h)}}
for l in range(L):
    p = f'model.layers.{{l}}.'
    shapes.update({{p + 'self_attn.q_proj.weight': (h, h), p + 'self_attn.k_proj.weight': (kv, h),
                   p + 'self_attn.v_proj.weight': (kv, h), p + 'self_attn.o_proj.weight': (h, h),
                   p + 'mlp.gate_proj.weight': (i, h), p + 'mlp.up_proj.weight': (i, h),
                   p + 'mlp.down_proj.weight': (h, i), p + 'input_layernorm.weight': (h,),
                   p + 'post_attention_layernorm.weight': (h,)}})
names = sorted(shapes)
half = len(names) // 2
index = {{'metadata': {{}}, 'weight_map': {{}}}}
for k, part in enumerate((names[:half], names[half:])):
    fname = f'model-{{k + 1:05d}}-of-00002.safetensors'
    mx.random.seed(k)
    w = {{n: (mx.random.normal(shapes[n]) * 0.02).astype(mx.bfloat16) for n in part}}
    mx.save_safetensors(str(out / fname), w, metadata={{'format': 'pt'}})
    index['weight_map'].update(dict.fromkeys(part, fname))
    del w
(out / 'model.safetensors.index.json').write_text(json.dumps(index))
cfg = dict(d, model_type='llama', architectures=['LlamaForCausalLM'], rms_norm_eps=1e-5,
           max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype='bfloat16',
           rope_parameters={{'rope_type': 'default', 'rope_theta': 10000.0}}, bos_token_id=1, eos_token_id=5)
(out / 'config.json').write_text(json.dumps(cfg, indent=2))
print(sum(__import__('math').prod(s) for s in shapes.values()))
"""
    res = subprocess.run([PY, "-c", code], check=True, capture_output=True, text=True)
    return int(res.stdout.strip().splitlines()[-1])


def measure(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command, from os.wait4 on that child alone."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def speed(small: bool, repeats: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="convert_bench_"))
    try:
        src = work / "hf"
        n = write_checkpoint(src, SMALL if small else BIG)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        for f in src.glob("*.safetensors"):  # same warm page cache for both tools
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        env = dict(os.environ, MLXTUNE_NO_OPENBLAS="1", TQDM_DISABLE="1")
        cases = {"float16": ["--dtype", "float16"], "4-bit": ["-q", "--q-bits", "4", "--q-group-size", "64"]}
        rows = []
        for case, flags in cases.items():
            res = {}
            for tool in ("mlx_lm", "mlxtune"):
                out = work / f"{tool}-{case}"
                if tool == "mlx_lm":
                    cmd = [PY, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(out), *flags]
                else:
                    cmd = [PY, "-m", "mlxtune", "convert", "--hf-path", str(src), "--mlx-path", str(out), *flags]
                runs = []
                for _ in range(repeats):
                    shutil.rmtree(out, ignore_errors=True)
                    runs.append(measure(cmd, env))
                res[tool] = (min(r[0] for r in runs), max(r[1] for r in runs))
                res[tool + "_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
                shutil.rmtree(out, ignore_errors=True)
            rows.append((case, res))
        print(f"\nsource: random llama, {n / 1e6:.0f}M parameters, bfloat16, {size / 1e9:.2f} GB in 2 shards; "
              f"best of {repeats} run(s) per cell\n")
        print("| case | mlx_lm wall (s) | mlxtune wall (s) | wall ratio | mlx_lm peak RSS (MB) | "
              "mlxtune peak RSS (MB) | RSS ratio | output size (MB) |")
        print("|---|---|---|---|---|---|---|---|")
        for case, r in rows:
            (tw, rm), (mw, mm) = r["mlx_lm"], r["mlxtune"]
            print(f"| {case} | {tw:.1f} | {mw:.1f} | {mw / tw:.2f} | {rm:.0f} | {mm:.0f} | {mm / rm:.2f} | "
                  f"{r['mlx_lm_bytes'] / 1e6:.0f} / {r['mlxtune_bytes'] / 1e6:.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fidelity() -> None:
    """Per-architecture logits of converted tiny models vs transformers (the bounds tests/test_convert.py holds)."""
    import mlx.core as mx
    import mlx_lm
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests"))
    from mlxtune.conversion import convert

    from hf_models import ARCHS, TEST_IDS, hf_logits, make_hf_model

    ids = np.random.default_rng(0).integers(6, 400, size=(2, 24))

    def lsm(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    print("| arch | f32 max abs diff | f16 max diff / max abs logit | bf16 max diff / max abs logit | "
          "q4 (g32) top-1 | q4 mean KL | q8 (g64) top-1 | q8 mean KL |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for arch in ARCHS:
            hf = make_hf_model(Path(work) / arch, arch)
            ref1, ref = hf_logits(hf, TEST_IDS), hf_logits(hf, ids)
            cells = []
            for kw in (dict(dtype="float32"), dict(dtype="float16"), dict(dtype="bfloat16"),
                       dict(quantize=True, q_bits=4, q_group_size=32, dtype="float32"),
                       dict(quantize=True, q_bits=8, q_group_size=64, dtype="float32")):
                out_dir = Path(work) / f"{arch}-out"
                convert(hf, out_dir, force=True, progress=False, **kw)
                model, _ = mlx_lm.load(str(out_dir))
                if kw == dict(dtype="float32"):
                    out = np.array(model(mx.array([TEST_IDS])).astype(mx.float32))
                    cells.append(f"{np.abs(out - ref1).max():.1e}")
                    continue
                out = np.array(model(mx.array(ids)).astype(mx.float32))
                if not kw.get("quantize"):
                    cells.append(f"{np.abs(out - ref).max() / np.abs(ref).max():.1e}")
                else:
                    lp, lq = lsm(ref), lsm(out)
                    cells.append(f"{(out.argmax(-1) == ref.argmax(-1)).mean():.3f}")
                    cells.append(f"{(np.exp(lp) * (lp - lq)).sum(-1).mean():.1e}")
            print(f"| {arch} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="a ~60M-parameter model instead of ~500M")
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell (best wall time is reported)")
    ap.add_argument("--fidelity", action="store_true", help="print the per-architecture fidelity table instead")
    args = ap.parse_args()
    if args.fidelity:
        fidelity()
    else:
        speed(args.small, args.repeats)


if __name__ == "__main__":
    main()
