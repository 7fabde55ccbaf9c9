"""`mlxtune lora`: flags -> `mlxtune.train.lora(...)` (the function `mlxtune.lora`).

Every flag is generated from a TrainingArgs field (name, type and help text live there), so the CLI,
the Python keywords and the YAML keys cannot drift apart. Flags default to "not given" so that only
what the user typed overrides --config and the built-in defaults.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys

import click

from . import main


def _flag_options(fn):
    from ..settings import TrainingArgs

    for f in reversed(dataclasses.fields(TrainingArgs)):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not None else "none"
        text = f"{f.metadata['help']} [default: {default}]"
        if isinstance(f.default, bool):
            fn = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=None, help=text)(fn)
            continue
        if f.name == "data":  # repeatable: several datasets are mixed
            fn = click.option(flag, "data", multiple=True, help=f"{f.metadata['help']} Repeat to mix datasets.")(fn)
            continue
        names = [flag, "--num-layers"] if f.name == "lora_layers" else [flag]
        kind = type(f.default) if f.default is not None else str
        fn = click.option(*names, f.name, type=kind, default=None, help=text,
                          metavar=kind.__name__.upper() if kind is not str else "TEXT")(fn)
    return fn


@main.command("lora")
@click.option("--config", type=click.Path(dir_okay=False), default=None,
              help="YAML file of settings (same names as the flags, with _); flags given here win.")
@_flag_options
def lora_command(config, **flags):
    """Fine-tune a model with LoRA (QLoRA when the model is quantized).

    Writes adapters/adapters.npz + adapter_config.json, metrics.jsonl, loss.png and
    NNNNNNN_adapters.npz checkpoints. With no --model and --data it trains the bundled demo.

    \b
    Examples:
      mlxtune lora --model mlx-community/Qwen2.5-0.5B-Instruct-4bit --data data/ --iters 600
      mlxtune lora --config my-run.yaml --learning-rate 2e-4
      mlxtune lora --model model --data data/ --iters 1200 --resume
      mlxtune lora --model model --data data/ --adapter-file adapters/adapters.npz --test
    """
    from ..train import lora

    command = resume_command(config, flags)
    model, data = flags.pop("model"), list(flags.pop("data"))
    data = None if not data else data[0] if len(data) == 1 else data
    result = lora(model, data, config=config, resume_command=command, **{k: v for k, v in flags.items() if v is not None})
    if result.interrupted:
        sys.exit(130)  # what a shell expects after Ctrl-C; the checkpoint is saved and the --resume line printed


def resume_command(config, flags: dict) -> str:
    """The command line that continues this run after Ctrl-C: the flags as given, then --resume (not --force)."""
    words = ["mlxtune", "lora"] + (["--config", str(config)] if config is not None else [])
    words += ["--model", str(flags["model"])] if flags.get("model") is not None else []
    for d in flags.get("data") or ():
        words += ["--data", str(d)]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is None or name in ("model", "data", "resume", "force"):
            continue
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            words += [flag, str(value)]
    return shlex.join(words + ["--resume"])
