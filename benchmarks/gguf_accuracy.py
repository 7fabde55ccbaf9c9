"""GGUF accuracy: llama.cpp's logits from our F32/F16 files against the MLX model, per architecture.

    python benchmarks/gguf_accuracy.py      # ~30 s on 2 cores; prints the table of docs/benchmarks.md

The one thing to know: the reference is always the MLX model computed in float32 from the checkpoint the
file was written from (an f16 checkpoint's weights widened, which is exact), so for an f16 checkpoint the
F16 file holds exactly the reference's weights and what is left is llama.cpp's own arithmetic (ggml rounds
every matmul input to f16 for F16 weights). Rows: the tiny random models of tests/hf_models.py at the
test scale and with smaller embeddings/head (smaller logits), and the bundled trained model
(data/tiny-chat) on held-out chat text. llama.cpp runs with an F32 KV cache, as in tests/test_gguf.py.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]
QUIET = dict(progress=False, log=lambda msg: None)


def measure(model_dir: Path, seqs: np.ndarray, work: Path, gelu: bool) -> dict:
    """Logit scale of the float32 MLX model and max |llama.cpp - MLX| for the F32 and F16 files."""
    from test_gguf import mlx_logits

    from mlxtune.gguf import to_gguf

    import llamacpp

    ref = mlx_logits(model_dir, seqs, gguf_gelu=gelu)
    out = {"std": float(ref.std(-1).mean()), "max": float(np.abs(ref).max())}
    for kind in ("f32", "f16"):
        llm = llamacpp.load(to_gguf(model_dir, work / f"{kind}.gguf", kind, force=True, **QUIET))
        got = np.stack([llamacpp.logits(llm, s) for s in seqs])
        out[kind] = float(np.abs(got - ref).max())
        del llm
    out["mlx16"] = float(np.abs(mlx_logits(model_dir, seqs, gguf_gelu=gelu, float32=False) - ref).max())
    return out


def random_rows(work: Path) -> list[tuple[str, dict]]:
    from hf_models import TEST_IDS, make_hf_model

    ids = np.array([TEST_IDS])
    extra = np.random.default_rng(0).integers(6, 500, (2, 32))
    rows = []
    for arch in ARCHS:
        gelu = arch.startswith("gemma")
        r = {}
        for dtype in ("float32", "float16"):
            d = make_hf_model(work / f"{arch}-{dtype}", arch, dtype=dtype)
            r[dtype] = measure(d, ids, work, gelu)
            if dtype == "float16":
                r["extra"] = measure(d, extra, work, gelu)
        for edge in (0.25, 0.125):
            r[edge] = measure(make_hf_model(work / f"{arch}-{edge}", arch, dtype="float16", edge_std=edge),
                              ids, work, gelu)
        rows.append((arch, r))
    return rows


def trained_row(work: Path) -> dict:
    """The bundled model, as a float32 and a float16 checkpoint, on 8 x 64 tokens of held-out chat text."""
    import sentencepiece as spm
    from safetensors.numpy import load_file, save_file

    src = ROOT / "data" / "tiny-chat"
    lines = (ROOT / "data" / "toolcall" / "valid.jsonl").read_text(encoding="utf-8").splitlines()[:60]
    text = "\n".join(m["content"] for line in lines for m in json.loads(line)["messages"])
    ids = np.array(spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model")).encode(text))
    seqs = ids[: 8 * 64].reshape(8, 64)
    r = {}
    for dtype in ("float32", "float16"):
        d = shutil.copytree(src, work / f"tiny-chat-{dtype}")
        weights = load_file(d / "model.safetensors")
        save_file({k: v.astype(dtype) for k, v in weights.items()}, d / "model.safetensors", metadata={"format": "pt"})
        r[dtype] = measure(d, seqs, work, False)
    return r


def main() -> None:
    import llamacpp

    # the tokenizer trainer behind tests/tiny.py writes progress lines straight to fd 1
    with tempfile.TemporaryDirectory() as tmp, llamacpp.quiet(1):
        work = Path(tmp)
        rows = random_rows(work)
        trained = trained_row(work)
    print("max |llama.cpp - MLX float32| (F32 KV cache); random models: 12 tokens (tests' TEST_IDS)")
    print("| model | logit std / max | F32 file | F16 file, f32 checkpoint | F16 file, f16 checkpoint "
          "| same, 2x32 tokens | MLX float16 inference | F16, f16 ckpt, logit std 2 | same, logit std 1 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for arch, r in rows:
        a, b = r["float32"], r["float16"]
        print(f"| {arch} | {b['std']:.1f} / {b['max']:.0f} | {max(a['f32'], b['f32']):.0e} | {a['f16']:.1e} "
              f"| **{b['f16']:.1e}** | {r['extra']['f16']:.1e} | {b['mlx16']:.1e} | {r[0.25]['f16']:.1e} "
              f"| {r[0.125]['f16']:.1e} |")
    a, b = trained["float32"], trained["float16"]
    print(f"| bundled tiny-chat (trained), 8x64 tokens of chat text | {b['std']:.1f} / {b['max']:.0f} "
          f"| {max(a['f32'], b['f32']):.0e} | {a['f16']:.1e} | **{b['f16']:.1e}** | | {b['mlx16']:.1e} | | |")


if __name__ == "__main__":
    main()
