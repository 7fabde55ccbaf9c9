"""`mlxtune generate`: one reply to one prompt, streamed to stdout, with tokens/sec on stderr."""

from __future__ import annotations

import click

from . import main


@main.command("generate")
@click.option("--model", "model", default=None, metavar="PATH|ID|GGUF",
              help="Model directory, Hugging Face hub id or GGUF file (default: the bundled tiny-chat model).")
@click.option("--adapter-file", default=None, type=click.Path(), help="LoRA adapter to apply (adapters.npz or its folder).")
@click.option("--prompt", "-p", required=True, help="The user message (or raw text with --no-chat); - reads stdin.")
@click.option("--max-tokens", "-m", default=256, show_default=True, type=int, help="Stop after this many tokens.")
@click.option("--temp", default=0.0, show_default=True, type=float, help="Sampling temperature; 0 = greedy, deterministic.")
@click.option("--top-p", default=0.0, show_default=True, type=float, help="Nucleus sampling (0 = off).")
@click.option("--seed", default=None, type=int, help="Random seed for sampling at --temp > 0.")
@click.option("--system", default=None, help="System message put before the prompt.")
@click.option("--chat/--no-chat", default=True, show_default=True,
              help="Apply the tokenizer's chat template (--no-chat: send the prompt as plain text).")
@click.option("--backend", type=click.Choice(["auto", "mlx", "torch"]), default="auto", show_default=True,
              help="mlx, or torch (transformers; pip install \"mlxtune[torch]\"); auto: see `mlxtune doctor`.")
def generate_cmd(model, adapter_file, prompt, max_tokens, temp, top_p, seed, system, chat, backend):
    """Generate a reply to a prompt, streaming it as it is produced.

    \b
    Examples:
      mlxtune generate --model mlx-community/Qwen2.5-0.5B-Instruct-4bit --prompt "Hello"
      mlxtune generate --model model --adapter-file adapters/adapters.npz -p "Set a timer for 5 minutes"
      mlxtune generate --model model --no-chat -p "Once upon a time" --temp 0.8 --seed 1
      cat question.txt | mlxtune generate --model model -p -
      mlxtune generate --backend torch --model hf-model --adapter-file adapters -p "Hello"
    """
    from ..backends import select_backend
    from ..generation import generate_with_stats

    if prompt == "-":
        prompt = click.get_text_stream("stdin").read().rstrip("\n")
    model = _default_model(model)
    chosen = select_backend(backend)
    click.echo(chosen.line(), err=True)
    result = generate_with_stats(model, prompt=prompt, adapter_file=adapter_file, max_tokens=max_tokens, temp=temp,
                                 top_p=top_p, seed=seed, system=system, chat=chat,
                                 on_text=lambda piece: click.echo(piece, nl=False), backend=chosen.name)
    click.echo()
    click.echo(result.stats.summary(), err=True)


def _default_model(model):
    """The bundled model when --model is left out, saying so (shared by generate and chat)."""
    from ..defaults import fill_in

    filled = fill_in(model, verb="generate")
    if filled.note:
        click.echo(filled.note, err=True)
    return filled.model
