"""GGUF writing speed and memory: mlxtune vs llama.cpp's own tools, side by side.

    python benchmarks/gguf_write.py [--work /tmp/gguf-bench] [--sdist DIR] [--threads 2]

Builds a random ~440M-parameter llama checkpoint (bf16 safetensors, SentencePiece tokenizer, so that the
reference converter accepts it without a known-tokenizer hash), then times, each in a fresh process:
  f16 and q8_0: `mlxtune gguf` vs `convert_hf_to_gguf.py` (from the llama-cpp-python source distribution)
  q4_k_m:       `mlxtune gguf` (from the HF checkpoint) vs llama-quantize (llama_model_quantize, from the
                converter's f16 file, as people run it)
and prints wall time, peak resident memory and the ratio. Targets: <= 0.5x the converter's time,
peak RSS < 300 MB, q4_k_m within 2x llama-quantize. The one thing to know: every run is a separate
process whose peak RSS is read from the kernel (ru_maxrss), so nothing measured shares memory; before
each run the page cache is flushed to disk (sync), so no tool pays for the previous tool's ~1 GB of
pending writes; each cell is the median of --repeat runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=1024, intermediate_size=4096,
              num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8, rms_norm_eps=1e-5,
              rope_theta=10000.0, max_position_embeddings=2048, vocab_size=32000, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")

# Runs `cmd` and reports (wall seconds, peak RSS of that child in MiB) as JSON on stdout.
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
if r.returncode:
    sys.stderr.write(r.stderr[-3000:])
    sys.exit(r.returncode)
print(json.dumps([wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024]))
"""
_QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = int(sys.argv[3]); p.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def build_checkpoint(out: Path) -> Path:
    """Random bf16 llama of ~440M parameters with a SentencePiece tokenizer (cached in `out`)."""
    if (out / "config.json").exists():
        return out
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    from spm import make_spm_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    make_spm_tokenizer(out, vocab_size=1000)
    c = CONFIG
    h, f = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h), "lm_head.weight": (c["vocab_size"], h),
              "model.norm.weight": (h,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                       p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=gen) * (0.02 if len(s) > 1 else 0.1) + (len(s) == 1)).to(torch.bfloat16)
               for k, s in shapes.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(c, indent=2))
    n = sum(t.numel() for t in tensors.values())
    print(f"built {out}: {n / 1e6:.0f}M parameters, {(out / 'model.safetensors').stat().st_size / 2**30:.2f} GiB")
    return out


def find_converter(sdist: Path | None, work: Path) -> Path:
    if sdist is None:
        found = sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
        if found:
            return found[-1]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        "llama-cpp-python", "-d", str(work)], check=True)
        archive = sorted(work.glob("llama_cpp_python-*.tar.gz"))[-1]
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        return find_converter(None, work)
    found = sorted(Path(sdist).glob("**/convert_hf_to_gguf.py"))
    if not found:
        raise SystemExit(f"no convert_hf_to_gguf.py under {sdist}")
    return found[0]


REPEAT = 3


FRESH = False


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Median wall time and largest peak RSS over REPEAT fresh processes."""
    runs = []
    for _ in range(REPEAT):
        if FRESH and "--outfile" in cmd:  # the output path follows --outfile; replacing a file costs ext4 a forced writeback
            Path(cmd[cmd.index("--outfile") + 1]).unlink(missing_ok=True)
        os.sync()  # the previous run's dirty pages would otherwise be written back during this one
        r = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=env)
        if r.returncode:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr}")
        runs.append(json.loads(r.stdout))
    walls = sorted(w for w, _ in runs)
    return walls[len(walls) // 2], max(rss for _, rss in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gguf-bench"))
    ap.add_argument("--sdist", type=Path, default=None, help="unpacked llama-cpp-python sdist (default: download)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama-quantize threads")
    ap.add_argument("--only", nargs="*", default=["f16", "q8_0", "q4_k_m"])
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"], help="fewer for a quick smoke run")
    ap.add_argument("--repeat", type=int, default=REPEAT, help="runs per cell (the median is reported)")
    ap.add_argument("--fresh", action="store_true",
                    help="delete each tool's output before each run (default: both replace their previous file)")
    args = ap.parse_args()
    globals()["REPEAT"] = args.repeat
    globals()["FRESH"] = args.fresh
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    CONFIG["num_hidden_layers"] = args.layers
    model = build_checkpoint(work / f"model-{args.layers}")
    converter = find_converter(args.sdist, work)
    env = {**os.environ, "LD_PRELOAD": os.environ.get("LD_PRELOAD", "")}
    py = sys.executable
    rows = []

    def ours(kind):
        out = work / f"mlxtune-{kind}.gguf"
        return measure([py, "-m", "mlxtune", "gguf", "--model", str(model), "--outfile", str(out),
                        "--type", kind, "--no-verify", "--force"], env)

    for kind in [k for k in ("f16", "q8_0") if k in args.only]:
        theirs = measure([py, str(converter), str(model), "--outfile", str(work / f"ref-{kind}.gguf"),
                          "--outtype", kind], env)
        rows.append((kind, "convert_hf_to_gguf.py", *theirs))
        rows.append((kind, "mlxtune gguf", *ours(kind)))
    if "q4_k_m" in args.only:
        f16 = work / "ref-f16.gguf"
        if not f16.exists():
            subprocess.run([py, str(converter), str(model), "--outfile", str(f16), "--outtype", "f16"], env=env,
                           check=True, capture_output=True)
        import gguf

        theirs = measure([py, "-c", _QUANTIZE, str(f16), str(work / "ref-q4_k_m.gguf"),
                          str(int(gguf.LlamaFileType.MOSTLY_Q4_K_M)), str(args.threads)], env)
        rows.append(("q4_k_m", f"llama-quantize (from f16, {args.threads} threads)", *theirs))
        rows.append(("q4_k_m", "mlxtune gguf (from HF)", *ours("q4_k_m")))

    print(f"\nmodel: {model} ({(model / 'model.safetensors').stat().st_size / 2**30:.2f} GiB bf16), "
          f"{os.cpu_count()} CPU cores, median of {REPEAT} runs, "
          f"{'new output files' if FRESH else 'replacing the previous output'}, load average {os.getloadavg()[0]:.1f}")
    print("| type | tool | wall (s) | peak RSS (MiB) | time vs reference |")
    print("|---|---|---:|---:|---:|")
    ref_time = {}
    for kind, tool, wall, rss in rows:
        ref = ref_time.setdefault(kind, wall)
        print(f"| {kind} | {tool} | {wall:.1f} | {rss:.0f} | {wall / ref:.2f}x |")


if __name__ == "__main__":
    main()
