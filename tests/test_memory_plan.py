"""The memory planner: estimates against the peak training really reaches, the refusal, --auto-fit, the last line.

Every check trains a small random llama for real (a few steps) and compares with the `Peak mem` the
training report gives (mx.get_peak_memory), so a planner that drifted from the compiled step would fail here.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace

import pytest

import mlxtune
from mlxtune.cli import run
from mlxtune.errors import ConfigError
from mlxtune.memory_plan import GB, MicroBatch, activation_bytes, model_shape, parse_size
from mlxtune.models import load

from hf_models import make_hf_model
from tiny import WORDS, make_tiny_model

LAST_LINE = re.compile(r"^Estimated peak memory: \d+\.\d\d GB \(budget \d+\.\d\d GB\): (fits|does not fit)$")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # 128 wide, 3 blocks: activations are most of the peak, as they are for real models
    return make_tiny_model(tmp_path_factory.mktemp("plan_model"), num_layers=3, hidden_size=128, intermediate_size=384,
                           num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Prompt/completion records of 40-400 words: varied lengths, loss on the completions only."""
    out = tmp_path_factory.mktemp("plan_data")
    rng = random.Random(0)
    for name, n in (("train", 48), ("valid", 8)):
        rows = []
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(40, 400))]
            cut = len(words) // 3
            rows.append({"prompt": " ".join(words[:cut]), "completion": " " + " ".join(words[cut:])})
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def measured_peak(model, data, tmp_path, **settings) -> float:
    """The `Peak mem` (GB) of a short real run's last report."""
    reports = []
    mlxtune.lora(str(model), str(data), adapter_file=str(tmp_path / "a" / "adapters.npz"), iters=3, steps_per_report=3,
                 steps_per_eval=0, val_batches=1, plot=False, save_every=0, verbose=False,
                 callbacks=[lambda r: reports.append(r)], **settings)
    return [r["peak_memory"] for r in reports if "peak_memory" in r][-1]


@pytest.mark.parametrize("settings", [
    dict(batch_size=4, max_seq_length=512, lora_layers=-1, rank=8),
    dict(batch_size=4, max_seq_length=512, lora_layers=-1, rank=8, batch_order="length"),
    dict(batch_size=4, max_seq_length=512, lora_layers=-1, rank=16, grad_checkpoint=True, pack=True),
    dict(batch_size=2, grad_accumulation=2, max_seq_length=256, lora_layers=1, rank=64, target_modules="all-linear"),
], ids=["plain", "length-order", "checkpointed-packed", "accumulated-one-block"])
def test_estimate_is_within_15_percent_of_the_measured_peak(model, data, tmp_path, settings):
    plan = mlxtune.plan(str(model), str(data), verbose=False, iters=3, **settings)
    estimate = plan.estimate.peak / GB
    # the value shows itself: the report in a terminal, a table in a notebook
    assert LAST_LINE.match(repr(plan).splitlines()[-1]) and "<table" in plan._repr_html_()
    if settings["batch_size"] == 4 and len(settings) == 4:  # "plain": random batches of 40-400 words run in stages
        assert len(plan.estimate.batch.stages) > 1 and "in stages" in repr(plan)
    measured = measured_peak(model, data, tmp_path, **settings)
    assert 0.85 <= estimate / measured <= 1.15, f"estimate {estimate:.4f} GB vs measured {measured:.4f} GB"


def test_plan_prints_the_breakdown_and_the_exact_last_line(model, data, monkeypatch, capsys):
    monkeypatch.setenv("MLXTUNE_NO_OPENBLAS", "1")
    run(["plan", "--model", str(model), "--data", str(data), "--batch-size", "4", "--max-seq-length", "512"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert LAST_LINE.match(lines[-1]) and lines[-1].endswith(": fits"), lines[-1]
    text = "\n".join(lines)
    for part in ("float32", "optimizer state", "with gradient checkpointing", "without gradient checkpointing",
                 "Budget:"):
        assert part in text
    capsys.readouterr()
    run(["plan", "--model", str(model), "--data", str(data), "--batch-size", "4", "--memory-limit", "1MB"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert LAST_LINE.match(last) and last.endswith("(budget 0.00 GB): does not fit"), last


def test_lora_refuses_a_run_over_the_budget_naming_settings_that_fit(model, data, tmp_path, monkeypatch, capsys):
    full = mlxtune.plan(str(model), str(data), verbose=False, batch_size=8, max_seq_length=512, iters=2)
    limit = (full.estimate.peak * 0.8) / GB
    adapter = tmp_path / "refused" / "adapters.npz"
    monkeypatch.setenv("MLXTUNE_NO_OPENBLAS", "1")
    monkeypatch.setenv("MLXTUNE_DEBUG", "0")
    with pytest.raises(SystemExit) as e:
        run(["lora", "--model", str(model), "--data", str(data), "--batch-size", "8", "--max-seq-length", "512",
             "--iters", "2", "--memory-limit", f"{limit:.4f}GB", "--adapter-file", str(adapter)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: this run needs ~"), err
    assert re.search(r"Settings that fit: --batch-size \d --grad-accumulation \d", err[0]) and "--force" in err[0]
    assert not adapter.exists()


def test_auto_fit_stays_under_the_memory_limit(model, data, tmp_path, capsys):
    full = mlxtune.plan(str(model), str(data), verbose=False, batch_size=8, max_seq_length=512, iters=3)
    limit = full.estimate.peak * 0.75 / GB
    reports = []
    mlxtune.lora(str(model), str(data), adapter_file=str(tmp_path / "fit" / "adapters.npz"), batch_size=8,
                 max_seq_length=512, iters=3, steps_per_report=3, steps_per_eval=0, plot=False, save_every=0,
                 auto_fit=True, memory_limit=f"{limit:.4f}GB", callbacks=[reports.append])
    out = capsys.readouterr().out
    chosen = re.search(r"--auto-fit: training with --batch-size (\d+) --grad-accumulation (\d+)", out)
    assert chosen and int(chosen[1]) * int(chosen[2]) == 8, out  # the effective batch is kept
    peak = [r["peak_memory"] for r in reports if "peak_memory" in r][-1]
    assert peak < limit, f"measured {peak:.4f} GB over the {limit:.4f} GB limit"


def test_lora_says_when_grad_checkpoint_raises_the_peak(model, data, tmp_path, capsys):
    # Random batches of 40-400 words run in stages of their own lengths; checkpointed blocks cannot, and on
    # this 3-block model that costs more than the activations they drop. The note must be true, and said.
    settings = dict(batch_size=4, max_seq_length=512, lora_layers=-1, rank=8)
    checkpointed = mlxtune.plan(str(model), str(data), verbose=False, iters=3, grad_checkpoint=True, **settings)
    plain = mlxtune.plan(str(model), str(data), verbose=False, iters=3, **settings)
    assert checkpointed.estimate.peak > plain.estimate.peak and not plain.warnings
    assert len(checkpointed.warnings) == 1 and "drop --grad-checkpoint" in checkpointed.warnings[0]
    assert checkpointed.warnings[0] in repr(checkpointed)  # `mlxtune plan` shows it too
    assert measured_peak(model, data, tmp_path / "c", grad_checkpoint=True, **settings) > \
        measured_peak(model, data, tmp_path / "p", **settings)
    mlxtune.lora(str(model), str(data), adapter_file=str(tmp_path / "said" / "adapters.npz"), iters=1,
                 steps_per_eval=0, plot=False, save_every=0, grad_checkpoint=True, **settings)
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("Memory plan:"))
    assert lines[at + 1].startswith("note: --grad-checkpoint raises this run's peak by "), lines[at:at + 2]


def test_force_starts_a_run_over_the_budget(model, data, tmp_path, capsys):
    mlxtune.lora(str(model), str(data), adapter_file=str(tmp_path / "forced" / "adapters.npz"), iters=1,
                 steps_per_eval=0, plot=False, save_every=0, memory_limit="1MB", force=True)
    out = capsys.readouterr().out
    assert "starting anyway (--force)" in out and (tmp_path / "forced" / "adapters.npz").exists()


def test_memory_limit_sizes():
    assert parse_size("12GB") == 12 * 10**9 and parse_size("500MB") == 500 * 10**6 and parse_size("1.5G") == 1.5e9
    assert parse_size("2GiB") == 2 * 2**30 and parse_size(3) == 3 * 10**9
    with pytest.raises(ConfigError, match="--memory-limit 12XB"):
        parse_size("12XB")


def test_the_plan_counts_no_kept_head_exps_for_soft_capped_logits(tmp_path):
    # Gemma 2's capped logits: the loss's backward needs them, so its sliced head keeps no exps (loss.head_kept),
    # and the plan must not count them either. A vocabulary over one slice, so the head is sliced at all.
    model, _ = load(make_hf_model(tmp_path / "gemma2", "gemma2", vocab_size=8192))
    model.freeze()  # as LoRA leaves it: a head that trains is projected whole
    shape = model_shape(model)
    assert shape.head_capped and shape.head_vocab
    b = MicroBatch(rows=2, length=64, targets=64, packed=False)
    assert activation_bytes(replace(shape, head_capped=False), b, False) - activation_bytes(shape, b, False) == 64 * 8192 * 4
