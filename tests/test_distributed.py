"""Data-parallel training on mx.distributed, two ranks on localhost through the real `mlx.launch` (ring).

Two ranks with the global batch give one process's adapter, also packed and with gradient accumulation;
only rank 0 writes; a batch the ranks cannot share, and ranks with other data, are refused on every rank;
a rank that dies stops the other within seconds with a line naming it; and a run resumes across 2 -> 1 and
1 -> 2 ranks to the uninterrupted adapter. SGD keeps the comparison at float rounding: Adam(W) divides by
the root of tiny second moments and turns summation-order rounding into differences of ~1e-2 after 20
steps, which a single process shows too (grad accumulation vs one big batch; see docs/distributed.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import mlxtune

from tiny import write_chat_data

HERE = Path(__file__).parent
LAUNCH = Path(sys.executable).parent / "mlx.launch"
BASE = dict(iters=20, batch_size=4, learning_rate=5e-2, optimizer="sgd", seed=0, steps_per_report=5,
            steps_per_eval=10, save_every=10, verbose=True)


def failed(r: subprocess.CompletedProcess) -> bool:
    """mlx.launch itself exits 0 whatever its ranks do; it reports each failed rank on stderr."""
    return r.returncode != 0 or "exited with code 1" in r.stderr


def launch(spec: dict, n: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
               OPENBLAS_NUM_THREADS="1", MLXTUNE_NO_OPENBLAS="1")
    cmd = [str(LAUNCH), "-n", str(n), "--backend", "ring", sys.executable, str(HERE / "dist_rank.py"), json.dumps(spec)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def assert_same_adapter(a, b, rel=1e-5):
    a, b = npz(a), npz(b)
    assert sorted(a) == sorted(b)
    diff = np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a))
    size = np.sqrt(sum(np.sum(a[k] ** 2) for k in a))
    assert size > 0 and diff <= rel * size, f"relative difference {diff / size:.2e}"


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    return str(tiny_llama), str(write_chat_data(tmp_path_factory.mktemp("dist-data"), seed=0))


@pytest.mark.parametrize("extra", [{}, {"pack": True, "max_seq_length": 64}, {"grad_accumulation": 2}],
                         ids=["plain", "packed", "accumulated"])
def test_two_ranks_train_the_adapter_one_process_trains(setup, tmp_path, extra):
    model, data = setup
    kwargs = dict(BASE, model=model, data=data, **extra)
    one = mlxtune.lora(adapter_file=tmp_path / "one" / "adapters.npz", **{**kwargs, "verbose": False})
    out = tmp_path / "two"
    r = launch({"kwargs": dict(kwargs, adapter_file=str(out / "adapters.npz")), "guard": str(out)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Distributed: 2 ranks, backend ring" in r.stdout
    assert r.stdout.count("Iter 20: Train loss") == 1  # rank 0 speaks, once
    assert_same_adapter(one.adapter_file, out / "adapters.npz")
    ours = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    theirs = [json.loads(line) for line in (one.metrics_file).read_text().splitlines()]
    for a, b in zip(ours, theirs):  # the same reports: global loss, tokens and token counts
        assert a["iteration"] == b["iteration"] and a.get("trained_tokens") == b.get("trained_tokens")
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_a_batch_the_ranks_cannot_share_and_other_data_are_refused_on_every_rank(setup, tmp_path):
    model, data = setup
    r = launch({"kwargs": dict(BASE, model=model, data=data, batch_size=3, adapter_file=str(tmp_path / "a.npz"))})
    assert failed(r) and "Traceback" not in r.stderr
    # every rank says it (unless the launcher stopped the slower one first, after the other failed)
    assert r.stderr.count("error: --batch-size 3 cannot be shared by 2 ranks") >= 1, r.stderr[-2000:]
    other = write_chat_data(tmp_path / "other", seed=9)  # rank 1 reads other data
    r = launch({"kwargs": dict(BASE, model=model, data=data, adapter_file=str(tmp_path / "b.npz")),
                "rank_data": {"1": str(other)}})
    assert failed(r) and "Traceback" not in r.stderr
    assert "have other settings or data than rank 0" in r.stderr, r.stderr[-2000:]


def test_a_dead_rank_stops_the_other_quickly_with_a_line_naming_it(setup, tmp_path):
    model, data = setup
    t = time.time()
    r = launch({"kwargs": dict(BASE, model=model, data=data, iters=200, adapter_file=str(tmp_path / "d.npz")),
                "die_at": 5})
    assert time.time() - t < 120
    # rank 0 notices the closed connection itself, or mlx.launch stops it first (SIGTERM): one line either way
    assert ("rank 0: the connection to rank 1 was lost" in r.stderr
            or "rank 0: stopped by mlx.launch (SIGTERM)" in r.stderr), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


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
            r = launch({"kwargs": spec})
            assert r.returncode == 0, r.stderr[-3000:]

    train(first, iters=10)
    train(second, resume=True)
    assert_same_adapter(whole.adapter_file, run)
