"""The torch backend against the MLX backend, on every test architecture, CPU, float32.

Same seed, same data: the same first loss (1e-4 relative), the same 20 losses (1e-3), the same adapter
after 20 steps (1e-3 relative), the same base+adapter logits (1e-4); also packed, with gradient
accumulation and gradient checkpointing. Then what the backend promises around training: exact resume
after SIGKILL, checkpoints that continue on the other backend, an adapter that fuses and runs in
llama.cpp, generate/eval/doctor, `--quantize`, and one-line errors (no torch, an MLX-quantized model).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

import mlxtune
from mlxtune.adapters import export_peft
from mlxtune.backends import select_backend, torch_module
from mlxtune.cli import run
from mlxtune.data import Record, iterate_batches
from mlxtune.loss import batch_arrays
from mlxtune.models import load

import llamacpp
from hf_models import ARCHS, TEST_IDS, cached_hf_model

tm = torch_module("torch_models")

WORDS = "the quick brown fox jumps over lazy dog hello how are you today fine thank".split()
QUIET = dict(steps_per_eval=0, save_every=0, verbose=False, plot=False)
# 20 steps at lr 1e-3 on every linear layer (phi3's fused qkv/gate_up too); reports every step.
PARITY = dict(iters=20, batch_size=4, learning_rate=1e-3, target_modules="all-linear", steps_per_report=1,
              max_seq_length=96, seed=7, **QUIET)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """train/valid/test chat jsonl of varied lengths (a user line and its upper-case echo)."""
    out = tmp_path_factory.mktemp("torch_chat")
    rng = random.Random(1)
    for name, n in (("train", 24), ("valid", 8), ("test", 8)):
        rows = []
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": q.upper()[:16]}]})
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def cli(args, monkeypatch, capsys):
    monkeypatch.setenv("MLXTUNE_NO_OPENBLAS", "1")
    monkeypatch.setenv("MLXTUNE_DEBUG", "0")
    code = 0
    try:
        run([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def torch_logits(model_dir, adapter=None) -> np.ndarray:
    loaded = tm.load_torch_model(model_dir, device="cpu")
    if adapter is not None:
        tm.load_adapter(loaded.model, adapter)
    with torch.no_grad():
        return loaded.model(torch.tensor([TEST_IDS])).logits.float().numpy()


def mlx_logits(model_dir, adapter=None) -> np.ndarray:
    model, _ = load(model_dir, adapter_file=adapter)
    return np.array(model(mx.array([TEST_IDS])).astype(mx.float32))


def relative(a: dict, b: dict) -> float:
    """The largest difference of any tensor, relative to that tensor's largest magnitude."""
    return max(float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-12)) for k in a)


def train_both(model_dir, data, out: Path, **settings) -> tuple:
    runs = {be: mlxtune.lora(str(model_dir), str(data), backend=be, adapter_file=out / be / "adapters.npz", **settings)
            for be in ("mlx", "torch")}
    return runs["mlx"], runs["torch"]


def assert_same_training(mlx_run, torch_run) -> None:
    a, b = [loss for _, loss in mlx_run.train_loss], [loss for _, loss in torch_run.train_loss]
    assert len(a) == len(b) == 20
    assert abs(a[0] - b[0]) <= 1e-4 * abs(a[0]), (a[0], b[0])
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    assert worst <= 1e-3, f"losses differ by {worst:.2e} (relative)"
    assert mlx_run.trained_tokens == torch_run.trained_tokens
    wa, wb = npz(mlx_run.adapter_file), npz(torch_run.adapter_file)
    assert set(wa) == set(wb)
    assert any(np.abs(v).max() > 0 for k, v in wa.items() if k.endswith("lora_b"))  # it trained
    assert relative(wa, wb) <= 1e-3, f"adapters differ by {relative(wa, wb):.2e} (relative)"
    cfg_a, cfg_b = (json.loads((r.adapter_file.parent / "adapter_config.json").read_text()) for r in (mlx_run, torch_run))
    for key in ("rank", "alpha", "lora_layers", "target_modules", "modules", "base_model"):
        assert sorted(cfg_a[key]) == sorted(cfg_b[key]) if isinstance(cfg_a[key], list) else cfg_a[key] == cfg_b[key], key


@pytest.mark.parametrize("arch", list(ARCHS))
def test_backends_train_alike(arch, chat_data, tmp_path_factory, tmp_path):
    model_dir = cached_hf_model(tmp_path_factory, arch)
    mlx_run, torch_run = train_both(model_dir, chat_data, tmp_path, **PARITY)
    assert_same_training(mlx_run, torch_run)
    # the same adapter on either backend gives the same logits
    for adapter in (mlx_run.adapter_file, torch_run.adapter_file):
        diff = np.abs(mlx_logits(model_dir, adapter) - torch_logits(model_dir, adapter)).max()
        assert diff <= 1e-4, f"{arch}: base+adapter logits differ by {diff:.2e}"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_backends_train_alike_packed_accumulated_checkpointed(arch, chat_data, tmp_path_factory, tmp_path):
    """--pack, --grad-accumulation 2, --grad-checkpoint and --bias-correction together. MLX packs every architecture but
    gemma2 (mlx-lm's gemma2 broadcasts a per-row mask wrongly); the torch backend packs all of them, and
    packs gemma2 exactly too (test below), but for the same batches this test packs where both can."""
    model_dir = cached_hf_model(tmp_path_factory, arch)
    both_pack = arch != "gemma2"
    mlx_run, torch_run = train_both(model_dir, chat_data, tmp_path, pack=both_pack, grad_accumulation=2,
                                    grad_checkpoint=True, bias_correction=True, **PARITY)
    assert_same_training(mlx_run, torch_run)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_packed_rows_score_as_examples_alone(arch, tmp_path_factory):
    """The torch loss of packed rows (gathered head, block-diagonal mask) equals the plain per-example loss
    from transformers' own full logits."""
    loaded = tm.load_torch_model(cached_hf_model(tmp_path_factory, arch), device="cpu")
    model = loaded.model
    parts = tm.model_parts(model)
    assert parts.body is not None and parts.packing
    rng = np.random.default_rng(0)
    records = []
    for n in (9, 5, 12, 7):
        ids = rng.integers(6, 500, n).tolist()
        records.append(Record(ids=ids, mask=[False] * (n // 2) + [True] * (n - n // 2)))
    total = count = 0.0
    with torch.no_grad():
        for r in records:
            logits = model(torch.tensor([r.ids[:-1]])).logits.float()[0]
            mask = torch.tensor(r.mask[1:], dtype=torch.float32)
            ce = torch.nn.functional.cross_entropy(logits, torch.tensor(r.ids[1:]), reduction="none")
            total, count = total + float((ce * mask).sum()), count + float(mask.sum())
        s = c = 0.0
        for batch in iterate_batches(records, 2, max_seq_length=64, seed=0, loop=False, shuffle=False, pack=True):
            assert batch.segments is not None and batch.segments.max() > 1
            t, n = tm.token_loss(model, parts, tm.to_tensors(batch_arrays(batch, True, bucket=False), "cpu"), True)
            s, c = s + float(t), c + float(n)
    assert c == count
    assert abs(s / c - total / count) < 1e-4


@pytest.mark.parametrize("first,then", [("mlx", "torch"), ("torch", "mlx")])
def test_a_checkpoint_continues_on_the_other_backend(first, then, tiny_llama, chat_data, tmp_path):
    """Checkpoints (adapter + optimizer state) are the same files on both backends: 4 steps on one and 4
    resumed on the other end where 8 steps on the first do."""
    common = dict(iters=8, batch_size=2, learning_rate=1e-3, lr_schedule="cosine", warmup=2, seed=5, save_every=4,
                  steps_per_report=4, steps_per_eval=0, verbose=False)
    whole = mlxtune.lora(str(tiny_llama), str(chat_data), backend=first, adapter_file=tmp_path / "whole" / "adapters.npz",
                         **common)
    folder = tmp_path / "switched"
    folder.mkdir()
    for name in ("0000004_adapters.npz", "0000004_state.npz", "adapter_config.json", "metrics.jsonl"):
        shutil.copy(tmp_path / "whole" / name, folder / name)
    resumed = mlxtune.lora(str(tiny_llama), str(chat_data), backend=then, adapter_file=folder / "adapters.npz",
                           resume=True, **common)
    a, b = npz(whole.adapter_file), npz(resumed.adapter_file)
    assert relative(a, b) <= 1e-4
    assert abs(whole.train_loss[-1][1] - resumed.train_loss[-1][1]) <= 1e-4 * whole.train_loss[-1][1]


def test_torch_adapter_fuses_exports_and_runs_in_llama_cpp(tiny_llama, chat_data, tmp_path):
    from mlxtune.fusion import fuse
    from mlxtune.gguf import to_gguf

    result = mlxtune.lora(str(tiny_llama), str(chat_data), backend="torch", adapter_file=tmp_path / "ad" / "adapters.npz",
                          iters=15, batch_size=4, learning_rate=1e-2, **QUIET)
    expected = torch_logits(tiny_llama, result.adapter_file)[0]
    assert np.abs(expected - torch_logits(tiny_llama)[0]).max() > 1e-2  # the adapter changes the model
    fused = fuse(tiny_llama, result.adapter_file, tmp_path / "fused", log=lambda msg: None)
    assert fused.parity is not None and fused.parity <= 1e-4
    np.testing.assert_allclose(mlx_logits(tmp_path / "fused")[0], expected, atol=1e-4)
    gguf_file = to_gguf(tmp_path / "fused", tmp_path / "tuned-f32.gguf", "f32", progress=False, log=lambda msg: None)
    got = llamacpp.logits(gguf_file, TEST_IDS)
    assert np.abs(got - expected).max() <= 2e-3
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    # and the other adapter verbs take it unchanged
    peft_dir = export_peft(result.adapter_file, tmp_path / "peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), peft_dir)
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.tensor([TEST_IDS])).logits[0].numpy(), expected, atol=1e-4)


def test_generate_and_eval_on_torch_answer_as_on_mlx(tiny_llama, chat_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run" / "adapters.npz"
    code, stdout, err = cli(["lora", "--backend", "torch", "--model", tiny_llama, "--data", chat_data, "--iters", 20,
                             "--batch-size", 4, "--learning-rate", 1e-2, "--steps-per-report", 10, "--steps-per-eval", 20,
                             "--adapter-file", out, "--test"], monkeypatch, capsys)
    assert code == 0, err
    assert "Backend: torch (cpu)" in stdout and "Model: transformers" in stdout
    assert re.search(r"Iter 10: Train loss [\d.]+, Learning Rate [\d.]+e[-+]\d+, It/sec [\d.]+, Tokens/sec \d+, "
                     r"Trained Tokens \d+, Peak mem [\d.]+ GB", stdout)
    assert re.search(r"Iter 20: Val loss [\d.]+", stdout) and re.search(r"Test loss [\d.]+, Test ppl [\d.]+", stdout)
    assert (out.parent / "loss.png").exists() and (out.parent / "metrics.jsonl").exists()

    replies = {}
    for backend in ("mlx", "torch"):
        code, stdout, err = cli(["generate", "--backend", backend, "--model", tiny_llama, "--adapter-file", out,
                                 "-p", "hello how are you", "-m", 12], monkeypatch, capsys)
        assert code == 0, err
        assert f"Backend: {backend} (cpu)" in err
        replies[backend] = stdout
    assert replies["mlx"] == replies["torch"]

    results = {backend: mlxtune.evaluate(str(tiny_llama), data=chat_data, adapter_file=out, max_tokens=16, backend=backend,
                                         progress=False) for backend in ("mlx", "torch")}
    assert results["torch"].correct == results["mlx"].correct
    assert results["torch"].predictions == results["mlx"].predictions
    assert abs(results["torch"].test_loss - results["mlx"].test_loss) < 1e-4
    code, stdout, err = cli(["eval", "--backend", "torch", "--model", tiny_llama, "--adapter-file", out, "--data", chat_data,
                             "-m", 16], monkeypatch, capsys)
    assert code == 0, err
    assert "Backend: torch (cpu)" in err and f"Exact match: {results['torch'].exact_match:.1%}" in stdout


def test_doctor_says_what_auto_picks_and_runs_name_their_backend(tiny_llama, chat_data, tmp_path, monkeypatch, capsys):
    code, stdout, err = cli(["doctor"], monkeypatch, capsys)
    assert code == 0, err
    picked = select_backend("auto")
    assert f"--backend auto: {picked.name} ({picked.device}): {picked.reason}" in stdout
    if not torch.cuda.is_available():  # this machine: MLX on the CPU, and why
        assert "mlx (cpu): MLX has no GPU and torch sees no CUDA" in stdout
    code, stdout, err = cli(["lora", "--model", tiny_llama, "--data", chat_data, "--iters", 1, "--batch-size", 2,
                             "--adapter-file", tmp_path / "a" / "adapters.npz"], monkeypatch, capsys)
    assert code == 0, err
    assert f"Backend: {picked.name} ({picked.device})" in stdout


def test_quantize_request(tiny_llama, chat_data, tmp_path, capsys):
    """MLX: QLoRA on the base quantized in memory; torch on the CPU: the float base, said in one line."""
    import mlx.nn as nn

    from mlxtune.layers import LoRALinear

    model, tok = load(tiny_llama)
    mlx_run = mlxtune.lora(model, chat_data, tokenizer=tok, quantize=True, iters=3, batch_size=2,
                           adapter_file=tmp_path / "m" / "adapters.npz", **{**QUIET, "verbose": True})
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.linear, nn.QuantizedLinear)
    assert "Quantized the base model to 4 bits" in capsys.readouterr().out
    assert mlx_run.adapter_file.exists()
    mlxtune.lora(str(tiny_llama), str(chat_data), backend="torch", quantize=True, iters=2, batch_size=2,
                 adapter_file=tmp_path / "t" / "adapters.npz", **{**QUIET, "verbose": True})
    out = capsys.readouterr().out
    assert "quantizes only on CUDA (bitsandbytes NF4); training the float32 base on the CPU" in out


def test_one_line_errors(tiny_llama, chat_data, tmp_path, monkeypatch, capsys):
    from mlx.utils import tree_flatten

    # an MLX-quantized directory: only the mlx backend reads it
    model, _ = load(tiny_llama)
    import mlx.nn as nn

    nn.quantize(model, group_size=32, bits=4)
    qdir = tmp_path / "q4"
    qdir.mkdir()
    mx.save_safetensors(str(qdir / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((Path(tiny_llama) / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4}
    (qdir / "config.json").write_text(json.dumps(config))
    code, _, err = cli(["lora", "--backend", "torch", "--model", qdir, "--data", chat_data, "--iters", 1,
                        "--adapter-file", tmp_path / "x" / "adapters.npz"], monkeypatch, capsys)
    assert code == 1 and err.count("\n") == 1 and "quantized by MLX" in err and "--de-quantize" in err, err
    code, _, err = cli(["lora", "--backend", "cuda", "--model", tiny_llama, "--data", chat_data,
                        "--adapter-file", tmp_path / "y" / "adapters.npz"], monkeypatch, capsys)
    assert code == 1 and "--backend must be one of auto, mlx, torch" in err, err


def test_without_torch_the_torch_backend_is_one_line(tiny_llama, chat_data, tmp_path):
    """A python that cannot find torch, as when it is not installed (a sitecustomize hides it from every finder)."""
    fake = tmp_path / "no_torch"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys

        class Hide:
            def __init__(self, finder):
                self.finder = finder

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch":
                    return None
                return self.finder.find_spec(name, path, target)

            def __getattr__(self, attr):
                return getattr(self.finder, attr)

        sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]),
               MLXTUNE_NO_OPENBLAS="1")
    probe = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('torch'))"],
                           env=env, capture_output=True, text=True)
    assert probe.stdout.strip() == "None", probe.stderr
    for args in (["lora", "--backend", "torch", "--model", tiny_llama, "--data", chat_data, "--iters", 1,
                  "--adapter-file", tmp_path / "a.npz"],
                 ["generate", "--backend", "torch", "--model", tiny_llama, "-p", "hi"]):
        r = subprocess.run([sys.executable, "-m", "mlxtune", *map(str, args)], env=env, capture_output=True, text=True)
        assert r.returncode == 1, r.stderr
        assert r.stderr.count("\n") == 1 and 'pip install "mlxtune[torch]"' in r.stderr, r.stderr
    # and the MLX backend does not need torch at all
    r = subprocess.run([sys.executable, "-m", "mlxtune", "lora", "--backend", "mlx", "--model", str(tiny_llama), "--data",
                        str(chat_data), "--iters", "1", "--batch-size", "2", "--adapter-file", str(tmp_path / "m.npz")],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Backend: mlx (cpu)" in r.stdout


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_llama, chat_data, tmp_path):
    from mlxtune.errors import TrainingError

    out = tmp_path / "nan" / "adapters.npz"
    with pytest.raises(TrainingError, match=r"iteration \d+.*non-finite.*last good checkpoint"):
        mlxtune.lora(str(tiny_llama), str(chat_data), backend="torch", adapter_file=out, iters=30, batch_size=2,
                     optimizer="sgd", learning_rate=1e9, max_grad_norm=0, steps_per_report=1, **{**QUIET, "save_every": 1})
    files = list(out.parent.glob("*adapters.npz"))
    assert files and all(np.isfinite(v).all() for f in files for v in npz(f).values())
