"""Crash stress: SIGKILL each writing verb at random moments and check that nothing the user has is lost.

    python benchmarks/faults.py                 # 30 kill points per verb (long: a few seconds a run)
    python benchmarks/faults.py --kills 3 --verbs gguf,fuse

For every verb (convert, fuse, gguf, export lmstudio, adapters export, data convert, lora during its
checkpoint writes) it first runs the verb to completion (the previous output, which the killed runs
replace with --force), then starts it again and SIGKILLs it after a random delay between the end of
Python's start-up and the length of a full run. After each kill: the destination is the previous output
byte for byte or a complete new output that passes its own check (it loads), and the inputs are
untouched. At the end one more run completes, and no temporary file of any killed run is left beside the
destination. Prints a table: verb, kills, kills that landed while the verb was writing (the previous
output already moved or a temporary present), failures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
TEMP = re.compile(r"^\..+\.(\d+)\.tmp|^\..+\.old$")


@dataclass
class Verb:
    argv: list[str]  # mlxtune arguments; the destination is replaced with --force
    dest: Path
    check: Callable[[Path], None]  # raises when the destination is not a complete, valid output
    inputs: list[Path]
    inside: bool = False  # temporaries appear inside the destination (a run folder), not beside it

    @property
    def temp_dir(self) -> Path:
        return self.dest if self.inside else self.dest.parent


def digest(path: Path) -> str | None:
    """A hash of a file, or of a folder's files and names; None when absent. Temporaries are left out."""
    if not path.exists():
        return None
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if f != path and any(TEMP.match(part) for part in f.relative_to(path).parts):
            continue
        h.update(str(f.relative_to(path) if f != path else "").encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP.match(p.name)) if folder.is_dir() else []


def cli(*args: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlxtune", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def make_inputs(work: Path) -> dict[str, Path]:
    """A tiny model, its data folder, a trained adapter, a GGUF of the model and a bigger JSONL file."""
    from tiny import echo_chat_rows, make_tiny_model, write_chat_data

    model = make_tiny_model(work / "model")
    data = write_chat_data(work / "data")
    adapter = work / "adapter"
    r = cli("lora", "--model", str(model), "--data", str(data), "--iters", "2", "--batch-size", "2",
            "--adapter-file", str(adapter / "adapters.npz"), "--steps-per-eval", "0")
    assert r.returncode == 0, r.stderr
    gguf = work / "model.gguf"
    r = cli("gguf", "--model", str(model), "--outfile", str(gguf), "--type", "f16")
    assert r.returncode == 0, r.stderr
    big = work / "big.jsonl"
    big.write_text(echo_chat_rows(100000, random.Random(0)))
    return {"model": model, "data": data, "adapter": adapter, "gguf": gguf, "big": big}


# ------------------------------------------------------------------------------------------- checks


def check_model_dir(path: Path) -> None:
    from mlxtune.models import load_model

    load_model(path)


def check_gguf(path: Path) -> None:
    from mlxtune.gguf.reader import read_gguf

    read_gguf(path)


def check_same_as(source: Path) -> Callable[[Path], None]:
    def check(path: Path) -> None:
        assert digest(path) == digest(source), f"{path} differs from {source}"

    return check


def check_peft(path: Path) -> None:
    from mlxtune.adapters import read_peft

    read_peft(path)


def check_jsonl(n: int) -> Callable[[Path], None]:
    def check(path: Path) -> None:
        lines = path.read_text().splitlines()
        assert len(lines) == n and all(json.loads(line) for line in lines), f"{path}: {len(lines)} of {n} lines"

    return check


def check_run_folder(path: Path) -> None:
    """Every adapter and checkpoint file in a lora output folder loads whole. A killed writer's temporary
    (`.0000002_adapters.npz.PID.tmpXXXX.npz`) is not an output: the next run removes it, which `stress` checks."""
    import numpy as np

    outputs = [f for f in path.iterdir() if not TEMP.match(f.name)]
    for f in (f for f in outputs if f.suffix == ".npz"):
        with np.load(f) as z:
            for k in z.files:
                z[k]
    for f in (f for f in outputs if f.suffix == ".json"):
        json.loads(f.read_text())


def verbs(inputs: dict[str, Path], out: Path) -> dict[str, Verb]:
    m, a, g = inputs["model"], inputs["adapter"], inputs["gguf"]
    n = sum(1 for line in inputs["big"].read_text().splitlines() if line.strip())
    everything = [m, inputs["data"], a, g, inputs["big"]]
    return {
        "convert": Verb(["convert", "--hf-path", str(m), "--mlx-path", str(out / "converted"), "-q"],
                        out / "converted", check_model_dir, everything),
        "fuse": Verb(["fuse", "--model", str(m), "--adapter-file", str(a), "--save-path", str(out / "fused"),
                      "--no-verify"], out / "fused", check_model_dir, everything),
        "gguf": Verb(["gguf", "--model", str(m), "--outfile", str(out / "m.gguf"), "--type", "q8_0"],
                     out / "m.gguf", check_gguf, everything),
        "export": Verb(["export", "lmstudio", "--gguf", str(g), "--models-dir", str(out / "lms"), "--publisher", "me",
                        "--name", "tiny"], out / "lms" / "me" / "tiny" / g.name, check_same_as(g), everything),
        "adapters export": Verb(["adapters", "export", "--adapter-file", str(a), "--to", "peft", str(out / "peft")],
                                out / "peft", check_peft, everything),
        "data convert": Verb(["data", "convert", str(inputs["big"]), str(out / "conv.jsonl"), "--to", "completions"],
                             out / "conv.jsonl", check_jsonl(n), everything),
        "lora": Verb(["lora", "--model", str(m), "--data", str(inputs["data"]), "--iters", "40", "--batch-size", "2",
                      "--save-every", "2", "--steps-per-eval", "0", "--adapter-file", str(out / "run" / "adapters.npz")],
                     out / "run", check_run_folder, everything, inside=True),
    }


@dataclass
class Tally:
    kills: int = 0
    mid_write: int = 0
    failures: list[str] | None = None


def stress(name: str, verb: Verb, kills: int, rng: random.Random, startup: float) -> Tally:
    """Run `verb` to completion once, then `kills` times killed at random, then once more to completion."""
    tally = Tally(failures=[])
    before_inputs = {p: digest(p) for p in verb.inputs}
    first_write, last_write, full, code = timed_run(verb)
    if code != 0:
        return Tally(0, 0, [f"the first run failed (exit {code})"])
    # Kill points: three in four while it writes (a random moment between its first temporary appearing and
    # the end of a full run's write phase), the rest at any moment after start-up.
    write_len = last_write - first_write + 0.05 if first_write is not None else full
    for k in range(kills):
        previous = digest(verb.dest)
        proc = subprocess.Popen([sys.executable, "-m", "mlxtune", *verb.argv, "--force"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if first_write is not None and rng.random() < 0.75:
            while proc.poll() is None and not leftovers(verb.temp_dir):
                time.sleep(0.005)
            delay = rng.uniform(0, write_len)
        else:
            delay = rng.uniform(startup, full)
        time.sleep(delay)
        writing = bool(leftovers(verb.temp_dir)) or (verb.dest.exists() and digest(verb.dest) != previous)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        tally.kills += 1
        tally.mid_write += writing or bool(leftovers(verb.temp_dir))
        now = digest(verb.dest)
        problem = None
        if now is None:
            problem = "the previous output is gone"
        elif now != previous:
            try:
                verb.check(verb.dest)
            except Exception as e:  # noqa: BLE001 - any failure to load is what we look for
                problem = f"a changed output that does not load: {type(e).__name__}: {str(e)[:200]}"
        if problem:
            tally.failures.append(f"kill {k + 1} after {delay:.1f} s: {problem}")
    r = cli(*verb.argv, "--force")
    if r.returncode != 0:
        tally.failures.append(f"the run after the kills failed: {r.stderr.strip()[-300:]}")
    left = leftovers(verb.temp_dir)
    if left:
        tally.failures.append(f"temporaries left after the next run: {left}")
    try:
        verb.check(verb.dest)
    except Exception as e:  # noqa: BLE001
        tally.failures.append(f"the final output does not load: {e}")
    changed = [str(p) for p, d in before_inputs.items() if digest(p) != d]
    if changed:
        tally.failures.append(f"inputs changed: {changed}")
    return tally


def timed_run(verb: Verb) -> tuple[float | None, float | None, float, int]:
    """(seconds until a temporary first and last appeared beside the destination, seconds in all, exit code)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "mlxtune", *verb.argv, "--force"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = last = None
    while proc.poll() is None:
        if leftovers(verb.temp_dir):
            last = time.perf_counter() - start
            first = first if first is not None else last
        time.sleep(0.005)
    return first, last, time.perf_counter() - start, proc.returncode


def startup_seconds() -> float:
    start = time.perf_counter()
    cli("--version")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=30, help="kill points per verb")
    ap.add_argument("--verbs", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["MLXTUNE_CACHE"] = str(tmp / "cache")
        inputs = make_inputs(tmp / "in")
        table = verbs(inputs, tmp / "out")
        chosen = args.verbs.split(",") if args.verbs else list(table)
        startup = startup_seconds()
        rows = []
        for name in chosen:
            t = stress(name, table[name], args.kills, rng, startup)
            rows.append((name, t))
            print(f"{name}: {t.kills} kills, {t.mid_write} mid-write, {len(t.failures)} failures", flush=True)
            for f in t.failures:
                print(f"  {f}", flush=True)
    print("\n| verb | kills | landed mid-write | failures |\n|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t.kills} | {t.mid_write} | {len(t.failures)} |")
    sys.exit(1 if any(t.failures for _, t in rows) else 0)


if __name__ == "__main__":
    main()
