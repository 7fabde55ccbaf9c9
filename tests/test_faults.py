"""Faults: SIGKILL at write time (a few kill points per verb; benchmarks/faults.py runs 30), a full disk,
leftovers of killed writers, two lora runs on one adapter folder, and two writers of one GGUF file."""

from __future__ import annotations

import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlxtune.errors import MlxtuneError
from mlxtune.files import LOCK_NAME, FolderLock, atomic_dir, atomic_file, clean_leftovers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import faults  # noqa: E402

from tiny import echo_chat_rows, write_chat_data  # noqa: E402


def env(tmp_path):
    return {**os.environ, "PYTHONPATH": str(ROOT), "MLXTUNE_CACHE": str(tmp_path / "cache")}


def cli(*args, tmp_path, limit_bytes=None, timeout=300):
    """`python -m mlxtune ARGS`; with `limit_bytes`, no file it writes may grow past that (RLIMIT_FSIZE)."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "mlxtune", *args], capture_output=True, text=True, timeout=timeout,
                          env=env(tmp_path), preexec_fn=limit if limit_bytes else None)


def one_error_line(r) -> str:
    assert r.returncode == 1 and r.stderr.count("error: ") == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr[r.stderr.index("error: "):].splitlines()[0]


# ------------------------------------------------------------------------------------ kills at random points


@pytest.fixture(scope="module")
def fault_inputs(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    return faults.make_inputs(work / "in"), work / "out"


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["convert", "fuse", "gguf", "export", "adapters export", "data convert", "lora"])
def test_sigkill_at_random_points_loses_nothing(verb, fault_inputs):
    inputs, out = fault_inputs
    tally = faults.stress(verb, faults.verbs(inputs, out)[verb], kills=2, rng=random.Random(verb),
                          startup=faults.startup_seconds())
    assert tally.kills == 2 and not tally.failures, tally.failures


# -------------------------------------------------------------------------------------- leftovers and locks


def test_the_next_write_removes_temporaries_of_dead_writers_only(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "out.gguf"
    stale = tmp_path / f".out.gguf.{dead.pid}.tmpabc.gguf"
    live = tmp_path / f".out.gguf.{os.getppid()}.tmpdef.gguf"  # a writer still running (our parent)
    stale.write_bytes(b"half")
    live.write_bytes(b"busy")
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"whole")
    assert not stale.exists() and live.exists() and target.read_bytes() == b"whole"


def test_a_folder_moved_aside_by_a_killed_replace_is_put_back(tmp_path):
    # Killed between atomic_dir's two renames: the old folder is at .NAME.old and NAME is missing.
    old = tmp_path / ".fused.old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(MlxtuneError, match="already exists"):  # put back first, so it is refused like any output
        with atomic_dir(tmp_path / "fused"):
            pass
    assert (tmp_path / "fused" / "config.json").read_text() == "{}" and not old.exists()
    # After a finished replace the .old copy is only garbage.
    old.mkdir()
    assert clean_leftovers(tmp_path / "fused") == [old] and not old.exists() and (tmp_path / "fused").is_dir()


def test_folder_lock_refuses_a_second_holder_and_is_released(tmp_path):
    folder = tmp_path / "adapters"
    with FolderLock(folder, "mlxtune lora run", "--adapter-file"):
        holder = subprocess.run([sys.executable, "-c", "import sys; from mlxtune.files import FolderLock\n"
                                 "try:\n FolderLock(sys.argv[1], 'mlxtune lora run', '--adapter-file')\n"
                                 "except Exception as e: print(e)", str(folder)],
                                capture_output=True, text=True, env=env(tmp_path))
        assert f"pid {os.getpid()}" in holder.stdout and "--adapter-file" in holder.stdout, holder
    assert not folder.exists()  # created for the lock, empty: removed again
    folder.mkdir()
    with FolderLock(folder, "x", "--y"):
        assert (folder / LOCK_NAME).exists()
    assert folder.is_dir() and not (folder / LOCK_NAME).exists()


def test_two_lora_runs_into_one_adapter_folder(tiny_llama, tmp_path):
    data = write_chat_data(tmp_path / "data")
    adapter = tmp_path / "run" / "adapters.npz"
    args = ["lora", "--model", str(tiny_llama), "--data", str(data), "--batch-size", "2", "--steps-per-eval", "0",
            "--adapter-file", str(adapter)]
    first = subprocess.Popen([sys.executable, "-m", "mlxtune", *args, "--iters", "400", "--save-every", "50"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env(tmp_path))
    try:
        deadline = time.time() + 120
        while not (adapter.parent / LOCK_NAME).exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = cli(*args, "--iters", "2", "--force", tmp_path=tmp_path)
        assert "is in use by another mlxtune lora run" in one_error_line(second)
    finally:
        first.kill()
        first.wait()


# -------------------------------------------------------------------------------------------- a full disk


def test_a_full_disk_is_one_line_and_keeps_the_previous_file(tiny_llama, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(echo_chat_rows(3000, random.Random(0)))
    dst = tmp_path / "out.jsonl"
    dst.write_text("previous\n")
    line = one_error_line(cli("data", "convert", str(src), str(dst), "--to", "completions", "--force",
                              tmp_path=tmp_path, limit_bytes=64 << 10))
    assert f"cannot write {dst}" in line and "File too large" in line
    assert dst.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    # A GGUF too: the previous file stays, no partial output.
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"previous")
    line = one_error_line(cli("gguf", "--model", str(tiny_llama), "--outfile", str(gguf), "--type", "f16", "--force",
                              tmp_path=tmp_path, limit_bytes=64 << 10))
    assert str(gguf) in line and gguf.read_bytes() == b"previous"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.gguf")]


def test_two_writers_of_one_gguf_never_leave_a_mixed_file(tiny_llama, tmp_path):
    out = tmp_path / "m.gguf"
    procs = [subprocess.Popen([sys.executable, "-m", "mlxtune", "gguf", "--model", str(tiny_llama), "--outfile", str(out),
                               "--type", t, "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=env(tmp_path)) for t in ("f16", "q8_0")]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    from mlxtune.gguf.reader import read_gguf

    read_gguf(out)  # one whole file, whichever finished last
    assert faults.leftovers(tmp_path) == []
