"""`mlxtune chat`: an interactive multi-turn conversation in the terminal (or over piped stdin)."""

from __future__ import annotations

import click

from . import main
from .generate import _default_model


@main.command("chat")
@click.option("--model", "model", default=None, metavar="PATH|ID|GGUF",
              help="Model directory, Hugging Face hub id or GGUF file (default: the bundled tiny-chat model).")
@click.option("--adapter-file", default=None, type=click.Path(), help="LoRA adapter to apply (adapters.npz or its folder).")
@click.option("--system", default=None, help="System message for the whole conversation.")
@click.option("--max-tokens", "-m", default=512, show_default=True, type=int, help="Longest reply, in tokens.")
@click.option("--temp", default=0.0, show_default=True, type=float, help="Sampling temperature; 0 = greedy.")
@click.option("--top-p", default=0.0, show_default=True, type=float, help="Nucleus sampling (0 = off).")
@click.option("--seed", default=None, type=int, help="Random seed for sampling at --temp > 0.")
def chat_cmd(model, adapter_file, system, max_tokens, temp, top_p, seed):
    """Chat with a model: type a message, read the reply; the conversation is kept between turns.

    /reset starts a new conversation, /exit or Ctrl-D quits. Piped input works too (one message a line).

    \b
    Examples:
      mlxtune chat --model mlx-community/Qwen2.5-0.5B-Instruct-4bit
      mlxtune chat --model model --adapter-file adapters/adapters.npz --system "You call tools."
      printf 'hi\\nwhat did I say?\\n' | mlxtune chat --model model
    """
    from ..generation import chat

    chat(_default_model(model), adapter_file=adapter_file, system=system, max_tokens=max_tokens, temp=temp,
         top_p=top_p, seed=seed)
