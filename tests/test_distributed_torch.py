"""Data-parallel training on the torch backend: two ranks on localhost through the real `torchrun` (gloo).

The torch half of test_distributed.py: two ranks with the global batch give one process's adapter and
reports, plain, packed, with gradient accumulation and with --fsdp (the blocks' frozen weights sharded by
FSDP2, each rank holding half); only rank 0 writes; a batch the ranks cannot share is refused on every rank
in one line through `python -m mlxtune`; a rank that dies stops the other within seconds with one line;
resume across 2 -> 1 and 1 -> 2 ranks gives the uninterrupted adapter; mlx under torchrun is refused.
SGD for the equality, as on MLX (see docs/distributed.md). Each rank's output is read from torchrun's
per-rank log files (`--redirects 3`): torchrun's own report of a failed run carries a Python traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mlxtune
from mlxtune.errors import ConfigError

from test_distributed import assert_same_adapter
from tiny import write_chat_data

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
BASE = dict(backend="torch", iters=20, batch_size=4, learning_rate=5e-2, optimizer="sgd", seed=0, steps_per_report=5,
            steps_per_eval=10, save_every=10, verbose=True)


def torchrun(args: list[str], logs: Path, n: int = 2, timeout: int = 240) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `args` (a script and its arguments, or -m mlxtune ...) on n ranks; (torchrun's result, each rank's
    stdout + stderr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MLXTUNE_NO_OPENBLAS="1")
    cmd = [*TORCHRUN, str(n), "--log-dir", str(logs), "--redirects", "3", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    ranks = []
    for rank in range(n):
        found = sorted(logs.glob(f"*/attempt_0/{rank}"))
        ranks.append("".join((found[-1] / f).read_text() for f in ("stdout.log", "stderr.log")) if found else "")
    return r, ranks


def launch(spec: dict, logs: Path, n: int = 2):
    return torchrun([str(HERE / "dist_rank.py"), json.dumps(spec)], logs, n)


def cli_flags(kwargs: dict) -> list[str]:
    out = []
    for k, v in kwargs.items():
        if v is None:
            continue
        flag = "--" + k.replace("_", "-")
        out += ([flag] if v is True else [f"--no-{k.replace('_', '-')}"] if v is False else [flag, str(v)])
    return out


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    return str(tiny_llama), str(write_chat_data(tmp_path_factory.mktemp("dist-torch-data"), seed=0))


@pytest.mark.parametrize("extra", [{}, {"pack": True, "max_seq_length": 64}, {"grad_accumulation": 2}, {"fsdp": True}],
                         ids=["plain", "packed", "accumulated", "fsdp"])
def test_two_ranks_train_the_adapter_one_process_trains(setup, tmp_path, extra):
    model, data = setup
    kwargs = dict(BASE, model=model, data=data, **extra)
    one = mlxtune.lora(adapter_file=tmp_path / "one" / "adapters.npz", **{**kwargs, "verbose": False, "fsdp": False})
    out = tmp_path / "two"
    r, (rank0, rank1) = launch({"kwargs": dict(kwargs, adapter_file=str(out / "adapters.npz")), "guard": str(out)},
                               tmp_path / "logs")
    assert r.returncode == 0, rank0[-2000:] + rank1[-2000:]
    assert "Distributed: 2 ranks, backend gloo" in rank0
    assert rank0.count("Iter 20: Train loss") == 1 and "Train loss" not in rank1  # rank 0 speaks, once
    if extra.get("fsdp"):  # the blocks' frozen weights are sharded: each rank holds half of them
        m = re.search(r"FSDP: 2 transformer blocks sharded across 2 ranks: each holds ([\d.]+) MB of their ([\d.]+) MB", rank0)
        assert m and float(m[2]) > 0 and float(m[1]) == pytest.approx(float(m[2]) / 2, rel=0.01), rank0[-2000:]
    assert_same_adapter(one.adapter_file, out / "adapters.npz")
    ours = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in one.metrics_file.read_text().splitlines()]
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):  # the same reports: global loss, tokens and token counts
        assert a["iteration"] == b["iteration"] and a.get("trained_tokens") == b.get("trained_tokens")
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_a_batch_the_ranks_cannot_share_is_one_line_on_every_rank_through_python_m_mlxtune(setup, tmp_path):
    model, data = setup
    flags = cli_flags(dict(BASE, model=model, data=data, batch_size=3, adapter_file=str(tmp_path / "a.npz"), verbose=None))
    r, ranks = torchrun(["-m", "mlxtune", "lora", *flags], tmp_path / "logs")
    assert r.returncode != 0  # torchrun, unlike mlx.launch, exits non-zero when a rank fails
    for text in ranks:  # every rank says it, in one line, unless torchrun stopped it first (then it says that)
        errors = [x for x in text.splitlines() if x.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in text, text[-2000:]
        assert ("--batch-size 3 cannot be shared by 2 ranks" in errors[0]
                or "stopped by torchrun (SIGTERM)" in errors[0]), errors[0]
    assert any("--batch-size 3 cannot be shared by 2 ranks" in t for t in ranks)


def test_the_mlx_backend_under_torchrun_is_refused(setup, tmp_path):
    model, data = setup
    spec = {"kwargs": dict(BASE, model=model, data=data, backend="mlx", adapter_file=str(tmp_path / "m.npz"))}
    r, ranks = launch(spec, tmp_path / "logs")
    assert r.returncode != 0
    assert any("torchrun started 2 processes but this run's backend is mlx" in t for t in ranks), ranks
    assert not (tmp_path / "m.npz").exists()


def test_a_dead_rank_stops_the_other_quickly_with_a_line_naming_it(setup, tmp_path):
    model, data = setup
    t = time.time()
    r, (rank0, rank1) = launch({"kwargs": dict(BASE, model=model, data=data, iters=200, adapter_file=str(tmp_path / "d.npz")),
                                "die_at": 5}, tmp_path / "logs")
    assert time.time() - t < 60
    assert r.returncode != 0
    assert "Root Cause" in r.stderr and "rank      : 1" in r.stderr  # torchrun's report names the dead rank
    errors = [x for x in rank0.splitlines() if x.startswith("error: ")]
    # rank 0 notices the closed connection itself, or is stopped by torchrun first: one line either way
    assert len(errors) == 1 and "Traceback" not in rank0, rank0[-2000:]
    assert ("rank 0: the exchange with rank 1 failed" in errors[0] or "rank 0: stopped by torchrun (SIGTERM)" in errors[0])


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_resume_across_a_different_number_of_ranks_gives_the_uninterrupted_adapter(setup, tmp_path, first, second):
    model, data = setup
    kwargs = dict(BASE, model=model, data=data, verbose=False)
    whole = mlxtune.lora(adapter_file=tmp_path / "whole" / "adapters.npz", **kwargs)
    run = tmp_path / "run" / "adapters.npz"

    def train(ranks, **more):
        spec = dict(kwargs, adapter_file=str(run), **more)
        if ranks == 1:
            mlxtune.lora(**spec)
        else:
            r, (rank0, rank1) = launch({"kwargs": spec}, tmp_path / f"logs-{'resume' if more.get('resume') else 'first'}")
            assert r.returncode == 0, rank0[-2000:] + rank1[-2000:]

    train(first, iters=10)
    train(second, resume=True)
    assert_same_adapter(whole.adapter_file, run)


def test_fsdp_outside_torchrun_is_a_line(setup, tmp_path, capsys):
    model, data = setup
    quick = dict(model=model, data=data, iters=1, batch_size=2, steps_per_eval=0, save_every=0, plot=False)
    with pytest.raises(ConfigError, match="--fsdp shards a model with torch"):
        mlxtune.lora(backend="mlx", fsdp=True, adapter_file=tmp_path / "m.npz", verbose=False, **quick)
    mlxtune.lora(backend="torch", fsdp=True, adapter_file=tmp_path / "t.npz", verbose=True, **quick)
    assert "note: --fsdp: a single process has nothing to shard" in capsys.readouterr().out
    assert (tmp_path / "t.npz").exists()
