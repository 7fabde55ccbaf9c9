"""Ctrl-C during `mlxtune lora`: a real process sent SIGINT mid-training saves a checkpoint, prints the exact
--resume command and exits 130, and that command finishes the run bit for bit as if it had never stopped; a
second SIGINT during a checkpoint write stops at once and leaves every file whole. In Python the same
interrupt returns the partial result (`interrupted=True`, `resume_call`).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import mlxtune
from mlxtune.checkpoints import RunFiles, read_state
from mlxtune.cli import run

from tiny import write_chat_data

# Like test_train's RESUME (dropout, a cosine schedule, packing: everything a resume must reproduce).
SETTINGS = dict(iters=12, batch_size=2, learning_rate=2e-3, lr_schedule="cosine", warmup=2, dropout=0.1, seed=3,
                pack=True, save_every=4, steps_per_report=1, steps_per_eval=0)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("chat"), seed=0)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "mlxtune-cache"))


@pytest.fixture(scope="module")
def whole(tiny_llama, chat_data, tmp_path_factory):
    """The uninterrupted run every interrupted one must end up equal to."""
    folder = tmp_path_factory.mktemp("whole")
    return mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=folder / "adapters.npz", verbose=False, **SETTINGS)


def npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        out += ([flag] if v else [f"--no-{k.replace('_', '-')}"]) if isinstance(v, bool) else [flag, str(v)]
    return out


def parse(words: list[str]) -> dict[str, str | bool]:
    """{flag: value} of a command line (a flag without a value: True)."""
    out, i = {}, 0
    while i < len(words):
        value = i + 1 < len(words) and not words[i + 1].startswith("--")
        out[words[i]] = words[i + 1] if value else True
        i += 2 if value else 1
    return out


def start_cli(argv: list[str], markers: Path) -> subprocess.Popen:
    """`mlxtune lora ARGV` in a child process, the real CLI, made slow enough to be interrupted where the test
    wants: every report line waits 0.3 s, and every atomic write leaves a marker file and waits 1 s just
    before its rename (the moment a second Ctrl-C could tear a file)."""
    script = textwrap.dedent(f"""
        import itertools, time
        from pathlib import Path
        import mlxtune.files, mlxtune.loop
        from mlxtune.cli import run

        line, fsync, count = mlxtune.loop.train_line, mlxtune.files._fsync, itertools.count()
        def slow_line(it, report):
            time.sleep(0.3)
            return line(it, report)
        def slow_fsync(path):
            fsync(path)
            if path.name.startswith("."):  # a temporary file, about to be renamed into place
                (Path({str(markers)!r}) / f"{{next(count):04d}}-{{path.name}}").touch()
                time.sleep(1.0)
        mlxtune.loop.train_line, mlxtune.files._fsync = slow_line, slow_fsync
        run({argv!r})
    """)
    env = dict(os.environ, MLXTUNE_NO_OPENBLAS="1")
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the training process ended before {what}: {out[-1500:]} {err[-1500:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def reported(folder: Path, at_least: int) -> bool:
    metrics = folder / "metrics.jsonl"
    if not metrics.exists():
        return False
    return any(json.loads(line).get("iteration", 0) >= at_least for line in metrics.read_text().splitlines() if line)


def test_ctrl_c_saves_a_checkpoint_prints_the_resume_command_and_exits_130(tiny_llama, chat_data, whole, tmp_path,
                                                                           monkeypatch, capsys):
    folder, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    argv = ["lora", "--model", str(tiny_llama), "--data", str(chat_data), "--adapter-file", str(folder / "adapters.npz"),
            *flags(SETTINGS)]
    proc = start_cli(argv, markers)
    wait_for(proc, lambda: reported(folder, 5), "iteration 5")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err

    # The checkpoint of the iteration it stopped at is complete and valid, and said so.
    files = RunFiles(folder / "adapters.npz")
    it, adapter, state = files.checkpoints()[-1]
    assert 5 <= it < SETTINGS["iters"]
    optimizer, meta = read_state(state)
    assert meta["iteration"] == it and optimizer
    assert set(npz(adapter)) == set(npz(whole.adapter_file))
    assert f"Interrupted at iteration {it}: saved the checkpoint {adapter}" in out
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left behind

    # The printed command is this one with --resume; run as printed, it ends where the whole run ended.
    printed = [line for line in out.splitlines() if line.startswith("Resume with: ")]
    assert len(printed) == 1
    command = shlex.split(printed[0].removeprefix("Resume with: "))
    assert command[:2] == ["mlxtune", "lora"] and command[-1] == "--resume"
    assert parse(command[2:-1]) == parse(argv[1:]) and len(command) == len(argv) + 2
    monkeypatch.setenv("MLXTUNE_NO_OPENBLAS", "1")
    run(command[1:])
    assert "Saved final adapter weights" in capsys.readouterr().out
    a, b = npz(whole.adapter_file), npz(folder / "adapters.npz")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_a_second_ctrl_c_during_a_checkpoint_write_stops_at_once_and_tears_nothing(tiny_llama, chat_data, whole,
                                                                                     tmp_path):
    folder, markers = tmp_path / "run", tmp_path / "markers"
    markers.mkdir()
    argv = ["lora", "--model", str(tiny_llama), "--data", str(chat_data), "--adapter-file", str(folder / "adapters.npz"),
            *flags(SETTINGS)]
    proc = start_cli(argv, markers)
    wait_for(proc, lambda: reported(folder, 5), "iteration 5")  # checkpoint 4 is complete by then
    before = set(os.listdir(markers))
    proc.send_signal(signal.SIGINT)
    wait_for(proc, lambda: set(os.listdir(markers)) - before, "a checkpoint write after the first Ctrl-C")
    proc.send_signal(signal.SIGINT)  # in the middle of that write, before its rename
    t0 = time.time()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - t0 < 5, err[-2000:]
    assert err.rstrip().endswith("Aborted.") and "Traceback" not in err  # click turns KeyboardInterrupt into Abort

    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # the torn write's temporary file is gone
    files = RunFiles(folder / "adapters.npz")
    found = files.checkpoints()
    assert found and found[0][0] == 4
    for it, adapter, state in found:  # every checkpoint that counts is whole
        assert read_state(state)[1]["iteration"] == it
        assert set(npz(adapter)) == set(npz(whole.adapter_file))
    # and the run still resumes to the uninterrupted result
    resumed = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=folder / "adapters.npz", resume=True,
                           verbose=False, **SETTINGS)
    a, b = npz(whole.adapter_file), npz(resumed.adapter_file)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_interrupt_in_python_returns_the_partial_result_and_the_call_that_resumes_it(tiny_llama, chat_data, whole,
                                                                                        tmp_path, capsys):
    folder = tmp_path / "py"

    def press_ctrl_c(report):  # what the stop button does: SIGINT to this process, mid-training
        if report.get("iteration") == 6 and "train_loss" in report:
            os.kill(os.getpid(), signal.SIGINT)

    result = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=folder / "adapters.npz",
                          callbacks=[press_ctrl_c], **SETTINGS)
    out = capsys.readouterr().out
    assert result.interrupted and result.iterations == 6
    assert result.checkpoint == folder / "0000006_adapters.npz" and result.checkpoint.exists()
    assert result.resume_call == (f"mlxtune.lora({str(tiny_llama)!r}, {str(chat_data)!r}, "
                                  f"adapter_file={str(folder / 'adapters.npz')!r}, "
                                  + ", ".join(f"{k}={v!r}" for k, v in SETTINGS.items()) + ", resume=True)")
    assert f"Resume with: {result.resume_call}" in out
    assert "interrupted at iteration 6" in repr(result) and "resume=True" in result._repr_html_()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back

    resumed = eval(result.resume_call.replace("resume=True", "resume=True, verbose=False"), {"mlxtune": mlxtune})
    assert not resumed.interrupted and resumed.iterations == SETTINGS["iters"]
    a, b = npz(whole.adapter_file), npz(resumed.adapter_file)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_the_torch_engine_stops_the_same_way(tiny_llama, chat_data, tmp_path):
    """The interrupt lives in the shared loop, so the torch backend gets it too: same checkpoint, same resume."""
    pytest.importorskip("torch")  # the test extra installs it; a bare install has no torch backend at all
    settings = dict(SETTINGS, backend="torch", verbose=False)
    whole_torch = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=tmp_path / "whole" / "adapters.npz",
                               **settings)

    def press_ctrl_c(report):
        if report.get("iteration") == 5 and "train_loss" in report:
            os.kill(os.getpid(), signal.SIGINT)

    folder = tmp_path / "torch"
    result = mlxtune.lora(str(tiny_llama), str(chat_data), adapter_file=folder / "adapters.npz", callbacks=[press_ctrl_c],
                          **settings)
    assert result.interrupted and result.iterations == 5 and result.checkpoint == folder / "0000005_adapters.npz"
    assert "backend='torch'" in result.resume_call
    resumed = eval(result.resume_call, {"mlxtune": mlxtune})
    a, b = npz(whole_torch.adapter_file), npz(resumed.adapter_file)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
