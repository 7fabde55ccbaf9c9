"""`mlxtune eval`: exact match by greedy generation over a dataset split, plus test loss and perplexity."""

from __future__ import annotations

import click

from . import main


@main.command("eval")
@click.option("--model", "model", default=None, metavar="PATH|ID|GGUF",
              help="Model directory, Hugging Face hub id or GGUF file (default: the bundled tiny-chat model).")
@click.option("--adapter-file", default=None, type=click.Path(), help="LoRA adapter to apply (adapters.npz or its folder).")
@click.option("--data", default=None, type=click.Path(),
              help="Folder with <split>.jsonl, or one .jsonl file (default: the bundled tool-call data).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "valid", "test"]),
              help="Which file of a data folder to score.")
@click.option("--max-tokens", "-m", default=256, show_default=True, type=int, help="Longest reply, in tokens.")
@click.option("--limit", default=None, type=int, help="Score only the first N records.")
@click.option("--batch-size", default=32, show_default=True, type=int,
              help="Prompts generated together (1 = one at a time).")
@click.option("--show", default=0, show_default=True, type=int, help="Print the first N mismatches (in full).")
@click.option("--loss/--no-loss", default=True, show_default=True, help="Also compute test loss and perplexity.")
@click.option("--max-seq-length", default=2048, show_default=True, type=int, help="Truncation length for the loss.")
@click.option("--chat-template", default=None, help="Jinja chat template file overriding the tokenizer's.")
@click.option("--output", "-o", default=None, type=click.Path(),
              help="Write every reply, in full, as JSON lines (line, expected, got, match) to this file.")
@click.option("--force", is_flag=True, help="Replace an existing --output file.")
@click.option("--backend", type=click.Choice(["auto", "mlx", "torch"]), default="auto", show_default=True,
              help="mlx, or torch (transformers; pip install \"mlxtune[torch]\"); auto: see `mlxtune doctor`.")
def eval_cmd(model, adapter_file, data, split, max_tokens, limit, batch_size, show, loss, max_seq_length,
             chat_template, output, force, backend):
    """Score a model on a chat dataset: exact match of greedy replies, test loss and perplexity.

    The prompt of each record is every message before its last assistant turn (rendered with the chat
    template); the reply matches when it equals that turn after stripping whitespace.

    \b
    Examples:
      mlxtune eval --adapter-file adapters/adapters.npz          # bundled model and tool-call data
      mlxtune eval --model model --adapter-file adapters --data data/ --limit 200 --show 3
      mlxtune eval --model fused --data data/valid.jsonl --no-loss -o replies.jsonl
      mlxtune eval --backend torch --model hf-model --adapter-file adapters --data data/
    """
    from pathlib import Path

    from ..backends import select_backend
    from ..errors import ConfigError
    from ..evaluation import evaluate

    if output and Path(output).exists() and not force:  # before the work, not after it
        raise ConfigError(f"--output {output} already exists: choose another file or pass --force to replace it")

    chosen = select_backend(backend)
    click.echo(chosen.line(), err=True)
    result = evaluate(model, data=data, adapter_file=adapter_file, split=split, max_tokens=max_tokens, limit=limit,
                      batch_size=batch_size, loss=loss, max_seq_length=max_seq_length, chat_template=chat_template,
                      early_stop=not output, show=show, backend=chosen.name)
    for m in result.mismatches[:max(show, 0)]:
        click.echo(f"--- {result.file}:{m.line}")
        click.echo(f"expected: {m.expected.strip()}")
        got = m.got.strip()
        click.echo(f"got:      {got if len(got) <= 500 else got[:500] + ' ...'}")
    click.echo(f"Exact match: {result.exact_match:.1%} ({result.correct}/{result.n}) on {result.file}")
    if result.test_loss is not None:
        click.echo(f"Test loss {result.test_loss:.3f}, Test ppl {result.perplexity:.3f}")
    if output:
        click.echo(f"Replies written to {result.save(output, force=force)}", err=True)
    click.echo(f"Took {result.seconds:.1f}s", err=True)
