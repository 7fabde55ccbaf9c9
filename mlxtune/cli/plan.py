"""`mlxtune plan`: the same flags as `mlxtune lora` -> `mlxtune.plan(...)`, the run's memory estimate, no training."""

from __future__ import annotations

import click

from . import main
from .lora import _flag_options


@main.command("plan")
@click.option("--config", type=click.Path(dir_okay=False), default=None,
              help="YAML file of settings (same names as the flags, with _); flags given here win.")
@_flag_options
def plan_command(config, **flags):
    """Estimate the peak memory of a `mlxtune lora` run with these flags, without training.

    Prints the weights by dtype, the LoRA parameters, gradients and optimizer state, the activations of the
    largest batch the data will produce (with and without --grad-checkpoint) and the budget; the last line
    is `Estimated peak memory: X.XX GB (budget Y.YY GB): fits` (or `does not fit`, with settings that fit).

    \b
    Examples:
      mlxtune plan --model mlx-community/Qwen2.5-0.5B-Instruct-4bit --data data/ --batch-size 8
      mlxtune plan --config my-run.yaml --memory-limit 12GB
    """
    from ..memory_plan import plan

    model, data = flags.pop("model"), list(flags.pop("data"))
    data = None if not data else data[0] if len(data) == 1 else data
    plan(model, data, config=config, **{k: v for k, v in flags.items() if v is not None})
