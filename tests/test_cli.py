"""The CLI foundation: --version, an example in every verb's --help, one-line errors with exit 1 for bad
models (exit 2 for usage errors), --debug tracebacks, and the OpenBLAS re-exec as `mlxtune doctor` sees it.

Most cases call `mlxtune.cli.run` in-process (fast); the ones about the real process (re-exec, env read
at import time, tracebacks) run `python -m mlxtune` as a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from mlxtune import __version__
from mlxtune.blas import find_openblas
from mlxtune.cli import _register, main, run


def subprocess_cli(*args, env=None, stdin=None, reexec=False):
    """`python -m mlxtune ARGS`; without `reexec`, OpenBLAS is preloaded directly (no second start)."""
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLXTUNE_BLAS_REEXEC", "MLXTUNE_DEBUG")}
    if not reexec and find_openblas():
        base["LD_PRELOAD"] = find_openblas()
    return subprocess.run([sys.executable, "-m", "mlxtune", *args], capture_output=True, text=True, timeout=120,
                          env={**base, **(env or {})}, input=stdin)


def inprocess_cli(args, monkeypatch, capsys):
    """(exit code, stdout, stderr) of `mlxtune ARGS` run through the console-script entry point."""
    monkeypatch.setenv("MLXTUNE_NO_OPENBLAS", "1")  # no re-exec of the test process
    monkeypatch.setenv("MLXTUNE_DEBUG", "0")
    code = 0
    try:
        run(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    # `Backend: mlx (cpu)` is said before the model loads (issue 15: every run names its backend); the error
    # after it must be one line
    lines = [line for line in err.strip().splitlines() if not line.startswith("Backend: ")]
    assert code == 1, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def all_commands(group=main, path=()):
    for name, cmd in sorted(group.commands.items()):
        yield path + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, path + (name,))


def test_version():
    r = subprocess_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mlxtune, version {__version__}"


def test_every_verb_help_has_an_example():
    _register()
    commands = list(all_commands())
    names = {p[0] for p, _ in commands}
    assert {"generate", "chat", "eval", "doctor"} <= names  # our own verbs are registered
    runner = CliRunner()
    missing = []
    for path, _ in [((), main)] + commands:
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        # An example is an indented command line calling this very verb (main: any verb).
        call = re.compile(r"^\s+(\S+=\S+\s+)*mlxtune " + re.escape(" ".join(path)), re.M)
        if not call.search(result.output):
            missing.append(" ".join(path) or "(main)")
    assert not missing, f"--help without an example command: {missing}"


@pytest.fixture
def broken_models(tiny_llama, tmp_path):
    """Model directories that are each wrong in one way."""
    out = {}
    out["no_config"] = tmp_path / "no_config"
    out["no_config"].mkdir()
    (out["no_config"] / "model.safetensors").write_bytes(b"")

    out["unsupported"] = tmp_path / "unsupported"
    shutil.copytree(tiny_llama, out["unsupported"])
    cfg = json.loads((out["unsupported"] / "config.json").read_text())
    cfg["model_type"] = "definitely_not_a_model"
    (out["unsupported"] / "config.json").write_text(json.dumps(cfg))

    out["no_tokenizer"] = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_llama, out["no_tokenizer"])
    for f in out["no_tokenizer"].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()

    out["corrupt"] = tmp_path / "corrupt"
    shutil.copytree(tiny_llama, out["corrupt"])
    (out["corrupt"] / "model.safetensors").write_bytes(b"\xff" * 8 + b"not a header at all")
    return out


@pytest.mark.parametrize("case, needles", [
    ("missing", ["does not exist"]),
    ("no_config", ["no config.json"]),
    ("unsupported", ["definitely_not_a_model", "not supported", "llama", "qwen2"]),
    ("no_tokenizer", ["no tokenizer"]),
    ("corrupt", ["model.safetensors", "not a valid safetensors"]),
])
def test_bad_model_is_one_line_error(case, needles, broken_models, tmp_path, monkeypatch, capsys):
    model = str(tmp_path / "does" / "not" / "exist") if case == "missing" else str(broken_models[case])
    code, out, err = inprocess_cli(["generate", "--model", model, "--prompt", "hi"], monkeypatch, capsys)
    assert_one_line_error(code, err, *needles)
    if case != "missing":
        assert model in err  # the message names the directory at fault


def test_uncached_hub_id_offline_is_one_line_error(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    r = subprocess_cli("generate", "--model", "some-org/some-model", "--prompt", "hi", env=env)
    assert_one_line_error(r.returncode, r.stderr, "no such local path some-org/some-model", "offline",
                          "not in the local")


def test_a_missing_local_path_that_looks_like_a_hub_id_is_not_fetched(tmp_path, monkeypatch, capsys):
    import mlxtune.model_files as model_files

    (tmp_path / "models" / "qwen-4bit").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    def no_hub(*args, **kwargs):
        raise AssertionError("a local-looking path went to the hub")

    monkeypatch.setattr(model_files, "snapshot_download", no_hub)
    code, out, err = inprocess_cli(["generate", "--model", "models/qwen-4bt", "--prompt", "hi"], monkeypatch, capsys)
    assert_one_line_error(code, err, "no such local path models/qwen-4bt", "qwen-4bit")


def test_usage_errors_exit_2(monkeypatch, capsys):
    code, _, err = inprocess_cli(["generate", "--model", "x"], monkeypatch, capsys)
    assert code == 2 and "--prompt" in err and "Traceback" not in err
    code, _, err = inprocess_cli(["no-such-verb"], monkeypatch, capsys)
    assert code == 2 and "no-such-verb" in err
    code, _, err = inprocess_cli(["generate", "--prompt", "hi", "--max-tokens", "many"], monkeypatch, capsys)
    assert code == 2 and "--max-tokens" in err


def test_bad_flag_value_is_one_line_error(tiny_llama, monkeypatch, capsys):
    code, _, err = inprocess_cli(["generate", "--model", str(tiny_llama), "--prompt", "hi", "--temp", "-1"],
                                 monkeypatch, capsys)
    assert_one_line_error(code, err, "--temp")


def test_debug_shows_traceback(tmp_path):
    missing = str(tmp_path / "nope")
    r = subprocess_cli("--debug", "generate", "--model", missing, "--prompt", "hi")
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr and "ModelLoadError" in r.stderr
    r = subprocess_cli("generate", "--model", missing, "--prompt", "hi", env={"MLXTUNE_DEBUG": "1"})
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr


def test_doctor_reports_openblas_reexec_and_opt_out():
    r = subprocess_cli("doctor", reexec=True)
    assert r.returncode == 0, r.stderr
    blas = next(line for line in r.stdout.splitlines() if line.startswith("BLAS:"))
    if sys.platform.startswith("linux") and find_openblas():
        assert "OpenBLAS" in blas and "openblas" in blas  # the library really is mapped into the process
    for key in ("Backend:", "MLX:", "mlx-lm:", "Memory:", "torch:", "Python:", "Platform:"):
        assert key in r.stdout
    r = subprocess_cli("doctor", "--json", env={"MLXTUNE_NO_OPENBLAS": "1"}, reexec=True)
    report = json.loads(r.stdout)
    if sys.platform.startswith("linux"):
        assert report["blas"].startswith("reference BLAS")
    assert report["backend"] in ("CPU", "Metal GPU", "CUDA GPU") and report["memory_total_gb"] > 0


@pytest.mark.skipif(not (sys.platform.startswith("linux") and find_openblas()), reason="needs Linux with OpenBLAS")
def test_reexec_keeps_the_arguments_given_to_run():
    # run(argv) from another program re-executes with argv, not with the host's sys.argv.
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLXTUNE_BLAS_REEXEC")}
    r = subprocess.run([sys.executable, "-c", "from mlxtune.cli import run; run(['doctor'])"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "BLAS:" in r.stdout and "OpenBLAS" in r.stdout
