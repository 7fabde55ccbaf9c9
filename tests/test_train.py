"""The LoRA training loop end to end on a tiny random llama: CLI run, reload, QLoRA, exact gradient
accumulation, packed == unpacked loss, gathered head == full logits, resume after SIGKILL, NaN stop,
callbacks, and every bad input as a one-line error that leaves existing files alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlxtune
from mlxtune.cli import run
from mlxtune.data import iterate_batches, load_dataset
from mlxtune.errors import ConfigError, FallbackWarning, TrainingError
from mlxtune.layers import LoRALinear
from mlxtune.loss import evaluate_loss, loss_fn, model_parts
from mlxtune.model_files import copy_tokenizer_files
from mlxtune.models import load
from mlxtune.settings import training_args

from tiny import WORDS, write_chat_data

FAST = dict(steps_per_report=5, steps_per_eval=0, val_batches=2, plot=True, verbose=False)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """train/valid/test chat jsonl with varied lengths (user text, then its upper-case echo as the answer)."""
    return write_chat_data(tmp_path_factory.mktemp("chat"), seed=0)


def _reference_loss(model, records) -> tuple[float, float]:
    """(summed loss, target count): the full model(inputs) logits, one example at a time, masked CE."""
    total = count = 0.0
    for r in records:
        ids = mx.array(r.ids)[None]
        logits = model(ids[:, :-1]).astype(mx.float32)
        mask = mx.array(np.array(r.mask[1:], np.float32))[None]
        total += (nn.losses.cross_entropy(logits, ids[:, 1:]) * mask).sum().item()
        count += mask.sum().item()
    return total, count


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "mlxtune-cache"))


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


def npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def test_cli_trains_saves_and_the_adapter_changes_generation(tiny_llama, chat_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run" / "adapters.npz"
    code, stdout, err = cli(["lora", "--model", tiny_llama, "--data", chat_data, "--iters", 20, "--batch-size", 2,
                             "--learning-rate", 1e-2, "--steps-per-report", 5, "--steps-per-eval", 10,
                             "--save-every", 10, "--adapter-file", out, "--test"], monkeypatch, capsys)
    assert code == 0, err
    assert re.search(r"Trainable parameters: \d+\.\d+% \(\d+\.\d+M/\d+\.\d+M\)", stdout)
    lines = re.findall(r"Iter (\d+): Train loss ([\d.]+), Learning Rate [\d.]+e[-+]\d+, It/sec [\d.]+, Tokens/sec \d+, "
                       r"Trained Tokens \d+, Peak mem [\d.]+ GB", stdout)
    assert [int(i) for i, _ in lines] == [5, 10, 15, 20]
    vals = re.findall(r"Iter (\d+): Val loss ([\d.]+), Val took [\d.]+s", stdout)
    assert [int(i) for i, _ in vals] == [0, 10, 20]
    assert float(vals[-1][1]) < float(vals[0][1]) - 0.3  # it learns
    assert re.search(r"Test loss [\d.]+, Test ppl [\d.]+", stdout)
    folder = out.parent
    for name in ("adapters.npz", "adapter_config.json", "metrics.jsonl", "loss.png", "0000010_adapters.npz"):
        assert (folder / name).exists(), name
    assert (folder / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics if "train_loss" in m] == [5, 10, 15, 20]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model"] == str(Path(tiny_llama).resolve())
    assert config["lora_layers"] == 2  # the default 16 clamped silently to the 2 blocks
    weights = npz(out)
    assert set(weights) == {f"model.layers.{i}.self_attn.{m}.lora_{ab}" for i in (0, 1)
                            for m in ("q_proj", "k_proj", "v_proj", "o_proj") for ab in "ab"}
    assert all(np.isfinite(w).all() for w in weights.values())

    base = mlxtune.generate(str(tiny_llama), prompt="hello how are you", max_tokens=12)
    tuned = mlxtune.generate(str(tiny_llama), prompt="hello how are you", max_tokens=12, adapter_file=out)
    assert tuned != base


def test_qlora_on_a_4bit_model(tiny_llama, chat_data, tmp_path):
    from mlx.utils import tree_flatten

    model, _ = load(tiny_llama)
    nn.quantize(model, group_size=32, bits=4)
    qdir = tmp_path / "q4"
    qdir.mkdir()
    mx.save_safetensors(str(qdir / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((Path(tiny_llama) / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4}
    (qdir / "config.json").write_text(json.dumps(config))
    copy_tokenizer_files(Path(tiny_llama), qdir)
    qmodel, tok = load(qdir)
    frozen = np.array(qmodel.model.layers[1].self_attn.q_proj.weight)
    valid = load_dataset(str(chat_data), tok).valid
    before = evaluate_loss(qmodel, valid, 4, 256)
    result = mlxtune.lora(qmodel, chat_data, tokenizer=tok, iters=20, batch_size=2, learning_rate=1e-2,
                          adapter_file=tmp_path / "qa" / "adapters.npz", **FAST)
    layer = qmodel.model.layers[1].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.linear, nn.QuantizedLinear)
    np.testing.assert_array_equal(np.array(layer.linear.weight), frozen)  # base stays frozen and quantized
    # it learns: the whole validation split, before and after (measured 6.08 -> 5.37)
    assert evaluate_loss(qmodel, valid, 4, 256) < before - 0.3
    fresh, _ = load(qdir, adapter_file=result.adapter_file)
    ids = mx.array([[1, 20, 30, 40]])
    np.testing.assert_allclose(np.array(fresh(ids)), np.array(qmodel(ids)), atol=1e-4)


@pytest.mark.parametrize("order", ["length", "random"])
def test_gradient_accumulation_equals_a_larger_batch(tiny_llama, chat_data, tmp_path, order):
    # random batches: the micro-batches are the batch's rows sorted by length, each cut to its own width
    common = dict(iters=4, learning_rate=1e-3, seed=5, save_every=0, batch_order=order, **FAST)
    big = mlxtune.lora(str(tiny_llama), str(chat_data), batch_size=4, adapter_file=tmp_path / "a" / "adapters.npz", **common)
    acc = mlxtune.lora(str(tiny_llama), str(chat_data), batch_size=2, grad_accumulation=2,
                       adapter_file=tmp_path / "b" / "adapters.npz", **common)
    a, b = npz(big.adapter_file), npz(acc.adapter_file)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if k.endswith("lora_b"))  # it did train
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-6, rtol=1e-4, err_msg=k)


def test_packed_rows_and_gathered_head_give_the_plain_loss(tiny_llama, chat_data):
    model, tok = load(tiny_llama)
    splits = load_dataset(chat_data, tok, cache=False)
    records = splits.train[:6]
    parts = model_parts(model)
    assert parts.body is not None and parts.packing
    # Reference: the full model(inputs) logits, one example at a time, cross-entropy on masked targets.
    total, count = _reference_loss(model, records)
    packed = next(iterate_batches(records, 2, max_seq_length=256, seed=0, loop=False, shuffle=False, pack=True))
    assert packed.segments is not None and int(np.array(packed.segments).max()) > 1  # rows really hold several examples
    loss, n = loss_fn(model, packed)
    assert n.item() == count
    assert abs(loss.item() - total / count) < 1e-4
    assert abs(evaluate_loss(model, records, 4, 256) - total / count) < 1e-4


def test_grad_checkpoint_gives_the_same_adapter(tiny_llama, chat_data, tmp_path):
    common = dict(iters=3, batch_size=2, learning_rate=1e-3, save_every=0, **FAST)
    plain = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=tmp_path / "p" / "adapters.npz", **common)
    ckpt = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=tmp_path / "c" / "adapters.npz",
                        grad_checkpoint=True, **common)
    a, b = npz(plain.adapter_file), npz(ckpt.adapter_file)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6, err_msg=k)


RESUME = dict(iters=12, batch_size=2, learning_rate=2e-3, lr_schedule="cosine", warmup=2, dropout=0.1, seed=3, pack=True,
              save_every=4, steps_per_report=2, steps_per_eval=0, verbose=False)


# torch packs rows of 128 tokens, not 2048: its run takes ~5 s instead of ~12
KILLED = {"mlx": RESUME, "torch": dict(RESUME, backend="torch", max_seq_length=128)}


@pytest.mark.parametrize("backend", KILLED)
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(backend, tiny_llama, chat_data, tmp_path):
    settings = KILLED[backend]
    whole = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=tmp_path / "whole" / "adapters.npz", **settings)

    folder = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import time, mlxtune
        def hang(report):  # stands in for the machine dying after iteration 6 (checkpoint 4 is on disk)
            if report.get("iteration") == 6 and "train_loss" in report:
                time.sleep(600)
        mlxtune.lora({str(tiny_llama)!r}, {str(chat_data)!r}, adapter_file={str(folder / 'adapters.npz')!r},
                     callbacks=[hang], **{settings!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 180
    metrics = folder / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and '"iteration": 6, "train_loss"' in metrics.read_text():
            break
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the training subprocess never reached iteration 6")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (folder / "0000004_adapters.npz").exists() and not (folder / "0000008_adapters.npz").exists()

    resumed = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=folder / "adapters.npz", resume=True,
                           **settings)
    a, b = npz(whole.adapter_file), npz(resumed.adapter_file)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if k.endswith("lora_b"))  # it trained at all
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    iters = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]
    assert iters == [2, 4, 6, 8, 10, 12, 12]  # the killed run's reports after checkpoint 4 were dropped
    assert resumed.trained_tokens == whole.trained_tokens


def test_resume_refuses_other_data_or_another_chat_template(tiny_llama, chat_data, tmp_path):
    folder = tmp_path / "r"
    settings = dict(RESUME, lr_schedule="constant")  # so that --iters may grow on resume
    mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=folder / "adapters.npz", **dict(settings, iters=4))
    other = write_chat_data(tmp_path / "other", seed=1)
    with pytest.raises(ConfigError, match=r"--resume: the checkpoint .*0000004_adapters.npz was trained on other "
                                          r"training data .*same --data"):
        mlxtune.lora(str(tiny_llama), str(other), adapter_file=folder / "adapters.npz", resume=True, **settings)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ConfigError, match=r"trained on another chat template .*same --chat-template"):
        mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=folder / "adapters.npz", resume=True,
                     chat_template=str(template), **settings)
    unpacked = dict(settings, pack=False, iters=4)  # another batch order would not continue the same run
    run = tmp_path / "u" / "adapters.npz"
    mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=run, **unpacked)  # random batches, the default
    with pytest.raises(ConfigError, match=r"batch_order=random but this run has batch_order=length"):
        mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=run, resume=True,
                     **dict(unpacked, iters=8, batch_order="length"))
    # A checkpoint from before random became the default has no batch_order: it ran length-bucketed.
    state = run.parent / "0000004_state.npz"
    with np.load(state) as z:
        arrays = dict(z)
    meta = json.loads(str(arrays["meta"]))
    del meta["settings"]["batch_order"]
    np.savez(state, **dict(arrays, meta=np.array(json.dumps(meta))))
    with pytest.raises(ConfigError, match=r"batch_order=length but this run has batch_order=random"):
        mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=run, resume=True, **dict(unpacked, iters=8))
    older = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=run, resume=True,
                         **dict(unpacked, iters=8, batch_order="length"))
    assert older.iterations == 8
    resumed = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=folder / "adapters.npz", resume=True, **settings)
    assert resumed.iterations == 12  # the same data and template resume


def test_two_runs_share_a_folder_without_touching_each_other(tiny_llama, chat_data, tmp_path):
    from mlxtune.adapters import read_adapter

    folder = tmp_path / "runs"
    first = dict(RESUME, iters=4, rank=8)
    mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=folder / "adapters.npz", **first)
    mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=folder / "run2.npz", **dict(first, rank=4))
    names = sorted(p.name for p in folder.iterdir())
    for name in ("adapters.npz", "adapters.safetensors", "adapter_config.json", "metrics.jsonl", "loss.png",
                 "0000004_adapters.npz", "0000004_state.npz", "run2.npz", "run2.safetensors",
                 "run2.adapter_config.json", "run2.metrics.jsonl", "run2.loss.png", "0000004_run2.npz",
                 "0000004_run2.state.npz"):
        assert name in names, (name, names)
    assert read_adapter(folder / "adapters.npz")[0].rank == 8 and read_adapter(folder / "run2.npz")[0].rank == 4
    # replacing the second run deletes its own checkpoints only
    mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=folder / "run2.npz", force=True,
                 **dict(first, rank=4, save_every=0))
    assert (folder / "0000004_adapters.npz").exists() and (folder / "0000004_state.npz").exists()
    assert not (folder / "0000004_run2.npz").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_llama, chat_data, tmp_path):
    out = tmp_path / "nan" / "adapters.npz"
    # 1e30: a step that overflows float32 at once (at 1e9 the RMS norms keep this tiny model's loss finite)
    with pytest.raises(TrainingError, match=r"iteration \d+.*non-finite.*--learning-rate") as e:
        mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=out, iters=30, batch_size=2, optimizer="sgd",
                     learning_rate=1e30, max_grad_norm=0, save_every=1, **{**FAST, "steps_per_report": 1})
    assert "last good checkpoint" in str(e.value)
    for f in out.parent.glob("*adapters.npz"):
        assert all(np.isfinite(v).all() for v in npz(f).values()), f


def test_callback_sees_reports_and_can_stop(tiny_llama, chat_data, tmp_path):
    seen = []

    def cb(report):
        seen.append(report)
        return report["iteration"] >= 4

    result = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=tmp_path / "cb" / "adapters.npz", iters=50,
                          batch_size=2, callbacks=[cb], **{**FAST, "steps_per_report": 2})
    assert result.stopped_early and result.iterations == 4
    assert {"train_loss", "learning_rate", "tokens_per_second", "trained_tokens", "peak_memory"} <= set(seen[0])
    assert result.adapter_file.exists()


def test_yaml_config_with_cli_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: some/model\nnum_layers: 4\nlearning_rate: 3e-4\nlora_parameters: {rank: 16, scale: 2.0}\n")
    args = training_args(cfg, learning_rate=1e-5)
    assert (args.model, args.lora_layers, args.rank, args.alpha, args.learning_rate) == ("some/model", 4, 16, 32.0, 1e-5)
    cfg.write_text("learning_rat: 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'learning_rat'.*did you mean learning_rate"):
        training_args(cfg)


def test_test_alone_evaluates_an_existing_adapter(tiny_llama, chat_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "t" / "adapters.npz"
    mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=out, iters=2, batch_size=2, **FAST)
    before = out.read_bytes()
    code, stdout, err = cli(["lora", "--model", tiny_llama, "--data", chat_data, "--adapter-file", out, "--test"],
                            monkeypatch, capsys)
    assert code == 0, err
    assert "no training" in stdout and re.search(r"Test loss [\d.]+, Test ppl [\d.]+", stdout)
    assert out.read_bytes() == before


def test_bad_inputs_are_one_line_errors_and_overwrite_nothing(tiny_llama, chat_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bad" / "adapters.npz"
    mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=out, iters=4, batch_size=2, save_every=2, **FAST)
    before = {f.name: f.read_bytes() for f in out.parent.iterdir()}
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_llama) / name, no_tok)
    base = ["lora", "--model", tiny_llama, "--data", chat_data, "--iters", 2]
    cases = [
        (base + ["--lora-layers", 5, "--adapter-file", tmp_path / "x1.npz"], "--lora-layers 5 is larger than the model's 2"),
        (base + ["--rank", 0, "--adapter-file", tmp_path / "x2.npz"], "--rank must be a positive integer"),
        (base + ["--batch-size", 100, "--adapter-file", tmp_path / "x3.npz"],
         "--batch-size 100 needs at least 100 training examples"),
        (base + ["--target-modules", "foo_proj", "--adapter-file", tmp_path / "x4.npz"],
         "--target-modules foo_proj: no such linear layer"),
        (["lora", "--model", no_tok, "--data", chat_data, "--adapter-file", tmp_path / "x5.npz"], "has no tokenizer"),
        (base + ["--adapter-file", out], "already exists: pass --resume"),
        (base + ["--adapter-file", out, "--resume", "--rank", 4, "--iters", 8, "--batch-size", 2, "--save-every", 2],
         "--resume: the checkpoint .* was trained with rank=8 but this run has rank=4"),
        (["lora", "--model", tiny_llama, "--adapter-file", tmp_path / "x6.npz"], "no --data"),
        (base + ["--optimizer", "lion", "--adapter-file", tmp_path / "x7.npz"], "--optimizer must be one of adamw, adam, sgd"),
    ]
    if importlib.util.find_spec("wandb") is None:
        cases.append((base + ["--report-to", "wandb", "--adapter-file", tmp_path / "x8.npz"], "pip install wandb"))
    for args, message in cases:
        code, stdout, err = cli(args, monkeypatch, capsys)
        assert code == 1, (args, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        assert re.search(message, err), (message, err)
    assert {f.name: f.read_bytes() for f in out.parent.iterdir()} == before
    assert not any((tmp_path / f"x{i}.npz").exists() for i in range(1, 9))



def test_resume_starts_from_an_mlx_lm_adapter(tiny_llama, chat_data, tmp_path):
    src = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=tmp_path / "src" / "adapters.npz", iters=6,
                       batch_size=2, learning_rate=5e-3, save_every=0, **FAST)
    folder = tmp_path / "mlxlm"
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), {k: mx.array(v) for k, v in npz(src.adapter_file).items()})
    keys = [f"self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": keys}}))
    model, tok = load(tiny_llama, adapter_file=src.adapter_file)
    expected = evaluate_loss(model, load_dataset(chat_data, tok, cache=False).valid, 4, 2048, num_batches=-1)
    result = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=folder / "adapters.safetensors", resume=True,
                          iters=2, batch_size=2, save_every=0, **{**FAST, "steps_per_eval": 100, "val_batches": -1})
    assert abs(result.val_loss[0][1] - expected) < 1e-5  # training started from the mlx-lm adapter's weights
    assert set(mx.load(str(folder / "adapters.safetensors"))) == set(npz(src.adapter_file))


@pytest.mark.parametrize("head_slice", [None, 100])
@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gemma3"])
def test_loss_is_exact_across_architectures(arch, head_slice, tmp_path_factory, monkeypatch):
    """Tied embeddings (qwen2), logit soft-capping and 5-D attention (gemma2), sliding windows (gemma3):
    the gathered-head loss, packed where the architecture allows it, equals the plain per-example loss;
    with the vocabulary projected 100 rows at a time too (`loss.HEAD_SLICE`), and with a shared opening
    run once through the attention caches, the rows after it whole or in stages of fewer rows."""
    from mlxtune import loss as loss_module
    from mlxtune.data import Record

    from hf_models import cached_hf_model

    sliced = []
    if head_slice:
        monkeypatch.setattr(loss_module, "HEAD_SLICE", head_slice)
        real = loss_module._sliced_cross_entropy
        monkeypatch.setattr(loss_module, "_sliced_cross_entropy", lambda *a: sliced.append(1) or real(*a))
    model, _ = load(cached_hf_model(tmp_path_factory, arch))
    model.freeze()  # as training has it: a head with trainable weights is projected whole
    parts = model_parts(model)
    assert parts.body is not None and parts.projection is not None
    assert (parts.cap is not None) == (arch == "gemma2")
    assert parts.packing == (arch != "gemma2")  # gemma2 broadcasts masks over (kv, repeat) heads: unpacked
    rng = np.random.default_rng(0)
    records = []
    for n in (9, 5, 12, 7):
        ids = rng.integers(6, 500, n).tolist()
        records.append(Record(ids=ids, mask=[False] * (n // 2) + [True] * (n - n // 2)))
    total, count = _reference_loss(model, records)
    s = c = 0.0
    for batch in iterate_batches(records, 2, max_seq_length=64, seed=0, loop=False, shuffle=False, pack=parts.packing):
        assert (batch.segments is not None) == parts.packing
        loss, n = loss_fn(model, batch)
        s, c = s + loss.item() * n.item(), c + n.item()
    assert c == count
    assert abs(s / c - total / count) < 1e-4
    assert bool(sliced) == bool(head_slice)
    # a prompt every row opens with runs once (`batch_arrays(share=True)`): the same loss
    from mlxtune.loss import prepare_batch, token_loss

    assert parts.prefixed is not None
    opening = rng.integers(6, 500, 16).tolist()
    records = [Record(ids=opening + r.ids, mask=[False] * 16 + r.mask) for r in records]
    total, count = _reference_loss(model, records)
    s = c = 0.0
    for batch in iterate_batches(records, 2, max_seq_length=64, seed=0, loop=False, shuffle=False):
        arrays = prepare_batch(batch, True, share=True)
        assert arrays[-1].tolist() == opening
        t, n = token_loss(model, parts, arrays, True)
        s, c = s + t.item(), c + n.item()
    assert c == count and abs(s / c - total / count) < 1e-4
    # in stages: 4 columns for all 4 rows (9-12 tokens after the opening), then the rows that go on
    assert parts.staged
    monkeypatch.setattr(loss_module, "STAGE_STEP", 4)
    monkeypatch.setattr(loss_module, "STAGE_COST", 0)
    batch = next(iterate_batches(records, 4, max_seq_length=64, seed=0, loop=False, shuffle=False))
    arrays = prepare_batch(batch, True, share=True, stage=True)
    *stages, prefix = [arrays[0]] + arrays[4:]
    assert prefix.tolist() == opening and len(stages) > 1 and stages[0].shape[0] == 4
    assert [x.shape[0] for x in stages] == sorted((x.shape[0] for x in stages), reverse=True)
    t, n = token_loss(model, parts, arrays, True)
    assert n.item() == count and abs(t.item() / n.item() - total / count) < 1e-4


def test_no_model_no_data_trains_the_bundled_demo(tmp_path, monkeypatch, capsys):
    """The real bundle (data/tiny-chat on data/toolcall) with the real data/default-lora.yaml; flags still win."""
    import yaml

    from mlxtune.defaults import DEFAULT_DATA, DEFAULT_LORA_CONFIG, DEFAULT_MODEL

    settings = yaml.safe_load(DEFAULT_LORA_CONFIG.read_text())
    monkeypatch.chdir(tmp_path)
    code, stdout, err = cli(["lora", "--iters", 2, "--steps-per-report", 1, "--steps-per-eval", 0], monkeypatch, capsys)
    assert code == 0, err
    first = stdout.splitlines()[0]
    assert f"bundled demo model {DEFAULT_MODEL}" in first and str(DEFAULT_DATA) in first
    assert "--model mlx-community/" in first
    assert re.findall(r"Iter (\d+): Train loss", stdout) == ["1", "2"]  # the flag beat the file's iters
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["base_model"] == str(DEFAULT_MODEL)
    assert (config["rank"], config["alpha"]) == (settings["rank"], settings["alpha"])  # the file's settings were used
    assert "mlp.down_proj" in " ".join(config["modules"])  # its all-linear too
    assert "packed rows" in stdout  # and its pack: true


def test_loss_png_has_labelled_axes_both_curves_and_a_log_scale(tmp_path):
    from matplotlib.image import imread

    from mlxtune.report import loss_figure, write_loss_png

    train, val = [(10, 3.0), (20, 2.5), (30, 2.2)], [(0, 3.2), (30, 2.4)]
    ax = loss_figure(train, val).axes[0]
    assert ax.get_xlabel() == "iteration" and "loss" in ax.get_ylabel() and ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "validation"]
    assert [list(line.get_xdata()) for line in ax.get_lines()] == [[10, 20, 30], [0, 30]]
    pixels = (imread(write_loss_png(tmp_path / "loss.png", train, val)) * 255).round().astype(int)[..., :3]
    for color in ((31, 119, 180), (255, 127, 14)):  # matplotlib's tab:blue and tab:orange were drawn
        assert (np.abs(pixels - color).max(-1) <= 2).sum() > 100, color


def test_field_names_can_be_mapped(tiny_llama, tmp_path):
    rows = [{"q": f"say {w}", "a": w} for w in WORDS]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = mlxtune.lora(str(tiny_llama), str(tmp_path / "qa.jsonl"), adapter_file=tmp_path / "m" / "adapters.npz",
                          iters=2, batch_size=2, prompt_key="q", completion_key="a", **FAST)
    assert result.adapter_file.exists()
    with pytest.raises(Exception, match="qa.jsonl:1"):  # without the mapping no format matches
        mlxtune.lora(str(tiny_llama), str(tmp_path / "qa.jsonl"), adapter_file=tmp_path / "n" / "adapters.npz",
                     iters=2, batch_size=2, **FAST)


def test_a_body_head_split_that_does_not_match_is_said_and_not_used(tiny_llama, monkeypatch):
    import mlxtune.loss as loss

    model, _ = load(tiny_llama)
    assert model_parts(model).body is not None  # the fast path, silently, for a model it fits
    real = loss._find_parts

    def off_by_a_bit(m):
        parts = real(m)
        head = parts.head
        parts.head = lambda h: head(h) * 1.01
        return parts

    monkeypatch.setattr(loss, "_find_parts", off_by_a_bit)
    other, _ = load(tiny_llama)
    with pytest.warns(FallbackWarning, match="vocabulary projection on every position"):
        parts = model_parts(other)
    assert parts.body is None and parts.head is None


def test_repeated_data_flags_mix_the_datasets(tiny_llama, chat_data, tmp_path, monkeypatch, capsys):
    extra = write_chat_data(tmp_path / "extra", seed=5, sizes=(("train", 10), ("valid", 2)))
    code, stdout, err = cli(["lora", "--model", tiny_llama, "--data", chat_data, "--data", extra, "--iters", 1,
                             "--batch-size", 2, "--steps-per-eval", 0, "--adapter-file", tmp_path / "m" / "a.npz"],
                            monkeypatch, capsys)
    assert code == 0, err
    assert "Data: 34 train, 10 valid, 8 test examples" in stdout  # 24 + 10 train, 8 + 2 valid: both were read


def test_training_leaves_the_callers_random_stream_to_the_caller(tiny_llama, chat_data, tmp_path):
    draws = []
    for seed in (1, 2):  # training with another seed (and dropout) must not change what the caller draws next
        mx.random.seed(7)
        mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=tmp_path / f"s{seed}" / "adapters.npz", iters=2,
                     batch_size=2, dropout=0.1, seed=seed, **FAST)
        draws.append(np.array(mx.random.uniform(shape=(4,))))
    np.testing.assert_array_equal(draws[0], draws[1])
    mx.random.seed(8)
    mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=tmp_path / "s3" / "adapters.npz", iters=2,
                 batch_size=2, dropout=0.1, seed=1, **FAST)
    assert not np.array_equal(np.array(mx.random.uniform(shape=(4,))), draws[0])  # but the caller's seed does


def test_rank_larger_than_a_layer_is_refused(tiny_llama, chat_data, tmp_path):
    with pytest.raises(ConfigError, match=r"--rank 40 is larger than model.layers.\d+.self_attn.[kv]_proj \(32 x 64\)"):
        mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=tmp_path / "r" / "adapters.npz", iters=1,
                     batch_size=2, rank=40, **FAST)


def test_lazily_tokenized_data_trains_and_resumes_exactly(tiny_llama, chat_data, tmp_path, monkeypatch):
    """A big file is tokenized as batches read it: training, its checkpoints and --resume work the same way."""
    monkeypatch.setenv("MLXTUNE_LAZY_TOKENIZE", "1")
    whole = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=tmp_path / "whole" / "adapters.npz", **RESUME)
    folder = tmp_path / "stopped"
    stopped = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=folder / "adapters.npz",
                           callbacks=[lambda report: report["iteration"] >= 6], **RESUME)
    assert stopped.stopped_early and (folder / "0000004_adapters.npz").exists()
    resumed = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=folder / "adapters.npz", resume=True, **RESUME)
    a, b = npz(whole.adapter_file), npz(resumed.adapter_file)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert resumed.trained_tokens == whole.trained_tokens > 0
    monkeypatch.setenv("MLXTUNE_LAZY_TOKENIZE", "0")  # the same data tokenized first: another run, refused
    with pytest.raises(ConfigError, match="data"):
        mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=folder / "adapters.npz", resume=True, **RESUME)


@pytest.mark.parametrize("weights", ["float32", "4-bit", "4-bit computed de-quantized"])
def test_the_sliced_head_gives_the_whole_heads_loss_and_gradients(tiny_llama, chat_data, weights, monkeypatch):
    """The loss projects onto HEAD_SLICE vocabulary rows at a time (`loss._sliced_cross_entropy`) and, for the
    gradient, keeps each slice's exps from the forward pass (`loss.head_kept`) or projects the slice again
    (over HEAD_KEEP bytes, or with checkpointed blocks): the same loss and LoRA gradients as the whole
    projection either way, for a plain, a quantized and a de-quantizing head (the tiny llama's lm_head is its
    own, untied)."""
    from mlx.utils import tree_flatten

    from mlxtune import loss as loss_module
    from mlxtune.dequantized import compute_dequantized
    from mlxtune.layers import apply_lora
    from mlxtune.memory_plan import model_shape
    from mlxtune.mlx_engine import checkpoint_blocks

    model, tok = load(str(tiny_llama))
    if weights != "float32":
        nn.quantize(model, group_size=32, bits=4)
    compute_dequantized(model, enable=weights.endswith("de-quantized"))
    model.freeze()
    apply_lora(model, lora_layers=-1, rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
    for _, m in model.named_modules():  # LoRA B starts at zero: give it values so that A gets a gradient too
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    parts = model_parts(model)
    assert parts.projection is model.lm_head
    splits = load_dataset(str(chat_data), tok, cache=False)
    batch = next(iterate_batches(splits.train, 4, seed=1))

    def value_and_grads():
        loss, grads = nn.value_and_grad(model, lambda m: loss_fn(m, batch)[0])(model)
        return loss.item(), dict(tree_flatten(grads))

    vocab = model.lm_head["weight"].shape[0]
    monkeypatch.setattr(loss_module, "HEAD_SLICE", vocab)  # one piece: the whole projection
    whole, whole_grads = value_and_grads()
    monkeypatch.setattr(loss_module, "HEAD_SLICE", vocab // 3 + 1)  # three slices, the last one short
    projected, real_slice = [], loss_module._slice_logits
    monkeypatch.setattr(loss_module, "_slice_logits", lambda *a: projected.append(1) or real_slice(*a))
    sliced, sliced_grads = value_and_grads()  # the exps kept: each slice projected once
    assert len(projected) == 3
    keep = loss_module.HEAD_KEEP
    monkeypatch.setattr(loss_module, "HEAD_KEEP", 0)  # over the limit: each slice projected again for the gradient
    again, again_grads = value_and_grads()
    assert len(projected) == 3 + 6
    monkeypatch.setattr(loss_module, "HEAD_KEEP", keep)
    checkpoint_blocks(model)  # gradient checkpointing asks for memory first: projected again too
    checkpointed, checkpointed_grads = value_and_grads()
    assert len(projected) == 9 + 6
    # the memory plan counts the slice the loss holds, and the whole vocabulary for the torch engine's loss
    assert model_shape(model).head_vocab == vocab // 3 + 1
    assert model_shape(model, engine="torch").head_vocab == 0
    if weights == "float32":  # a head that trains needs its own gradient: the whole projection again
        model.lm_head.unfreeze()
        loss, grads = value_and_grads()
        assert abs(loss - whole) < 1e-6 * abs(whole) and "lm_head.weight" in grads
        assert model_shape(model).head_vocab == 0
        # evaluation takes no gradient, so it slices a head that trains too
        calls, real = [], loss_module._sliced_cross_entropy
        monkeypatch.setattr(loss_module, "_sliced_cross_entropy", lambda *a: calls.append(1) or real(*a))
        total, count = loss_module.evaluate_sums(model, splits.valid, 4, 512, 1)
        monkeypatch.setattr(loss_module, "HEAD_SLICE", vocab)
        whole_total, whole_count = loss_module.evaluate_sums(model, splits.valid, 4, 512, 1)
        assert calls == [1] and count == whole_count > 0 and abs(total - whole_total) < 1e-5 * abs(whole_total)
    for value, grads in ((sliced, sliced_grads), (again, again_grads), (checkpointed, checkpointed_grads)):
        assert abs(whole - value) < 1e-5 * abs(whole)
        assert set(whole_grads) == set(grads) and len(whole_grads) == 12
        for k, g in whole_grads.items():
            np.testing.assert_allclose(np.array(grads[k]), np.array(g), rtol=1e-3, atol=1e-6, err_msg=k)


def test_a_shared_system_prompt_runs_once_and_trains_the_same_adapter(tiny_llama, chat_data, tmp_path, monkeypatch):
    """Rows that open with the same system prompt: `batch_arrays(share=True)` moves the shared columns out of
    the rows into one prefix, the engine runs it once through mlx-lm's attention caches (`loss._PrefixCache`),
    and the loss, the adapter after 3 steps and the validation loss equal those of every row running its
    own copy (`share_prefix=False`)."""
    from mlxtune import loss as loss_module
    from mlxtune.loss import batch_arrays

    data = tmp_path / "system"
    data.mkdir()
    system = {"role": "system", "content": "You answer in capitals, as briefly as you can, every time."}
    for name in ("train", "valid"):
        rows = [json.loads(line) for line in (chat_data / f"{name}.jsonl").read_text().splitlines()]
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"messages": [system] + r["messages"]}) + "\n"
                                                    for r in rows))
    model, tok = load(tiny_llama)
    splits = load_dataset(data, tok, cache=False)
    batch = next(iterate_batches(splits.train, 4, seed=0))
    plain, shared = batch_arrays(batch), batch_arrays(batch, share=True)
    prefix = shared[-1]
    assert prefix.ndim == 1 and len(prefix) >= 8 and len(prefix) % loss_module.PREFIX_STEP == 0
    assert (plain[0][:, :len(prefix)] == prefix).all() and (shared[0] == plain[0][:, len(prefix):]).all()
    assert model_parts(model).prefixed is not None
    # the batch's loss through the prefix pass equals its plain loss
    parts = model_parts(model)
    s1, n1 = loss_module.token_loss(model, parts, [mx.array(a) for a in plain], True)
    s2, n2 = loss_module.token_loss(model, parts, [mx.array(a) for a in shared], True)
    assert n1.item() == n2.item() > 0 and abs(s1.item() - s2.item()) < 1e-4 * abs(s1.item())

    calls, plans = [], []  # the prefix lengths batches were cut at, and their rows' stages
    real, stages = loss_module.shared_prefix, loss_module._stages
    monkeypatch.setattr(loss_module, "shared_prefix", lambda *a: calls.append(real(*a)) or calls[-1])
    monkeypatch.setattr(loss_module, "_stages", lambda *a: plans.append(stages(*a)) or plans[-1])
    monkeypatch.setattr(loss_module, "STAGE_STEP", 8)  # these rows are short: cut finer than SmolLM2's
    monkeypatch.setattr(loss_module, "STAGE_COST", 0)
    common = dict(iters=3, batch_size=4, learning_rate=1e-3, seed=2, save_every=0, **FAST)
    once = mlxtune.lora(str(tiny_llama), str(data), adapter_file=tmp_path / "s" / "adapters.npz", **common)
    assert calls and min(calls) >= 8  # every batch of training and validation went through a shared prefix
    assert sum(len(p) > 1 for p in plans) >= 2  # and some ran in stages
    calls.clear()
    plans.clear()
    each = mlxtune.lora(str(tiny_llama), str(data), adapter_file=tmp_path / "e" / "adapters.npz", share_prefix=False,
                        **common)
    assert not calls and not plans  # --no-share-prefix: training and validation alike
    a, b = npz(once.adapter_file), npz(each.adapter_file)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if k.endswith("lora_b"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=2e-6, rtol=1e-4, err_msg=k)
    (_, v1), (_, v2) = once.val_loss[-1], each.val_loss[-1]
    assert abs(v1 - v2) < 1e-5 * abs(v2)
    # Not shared where a row's own randomness would be lost (LoRA dropout draws noise per row) or where the
    # cache would hold arrays from inside mx.checkpoint
    from mlxtune.layers import apply_lora
    from mlxtune.mlx_engine import MLXEngine, make_optimizer

    for dropout, settings, expected in ((0.0, {}, True), (0.1, {}, False), (0.0, {"grad_checkpoint": True}, False),
                                        (0.0, {"share_prefix": False}, False)):
        model, _ = load(tiny_llama)
        apply_lora(model, lora_layers=-1, rank=4, dropout=dropout)
        args = training_args(iters=1, **settings)
        assert MLXEngine(model, make_optimizer(args), args).share == expected, (dropout, settings)
