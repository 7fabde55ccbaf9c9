"""`mlxtune compare`: the same held-out prompts through base, adapter, fused and GGUF stages, side by side."""

from __future__ import annotations

import click

from . import main


@main.command("compare")
@click.option("--model", default=None, metavar="PATH|ID",
              help="Base model directory or hub id (default: the bundled tiny-chat model).")
@click.option("--adapter-file", required=True, type=click.Path(), help="The LoRA adapter (the reference stage).")
@click.option("--fused", default=None, type=click.Path(), help="A fused model directory to compare too.")
@click.option("--gguf", "gguf", multiple=True, type=click.Path(), metavar="FILE",
              help="A GGUF file to run in llama.cpp with its own chat template (repeatable).")
@click.option("--data", default=None, type=click.Path(),
              help="Folder with <split>.jsonl, or one .jsonl file (default: the bundled tool-call data).")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "valid", "test"]))
@click.option("-n", "n", default=None, type=int, help="Compare on the first N rows only.")
@click.option("--no-base", is_flag=True, help="Leave out the base model's stage.")
@click.option("--max-tokens", "-m", default=256, show_default=True, type=int, help="Longest reply, in tokens.")
@click.option("--batch-size", default=32, show_default=True, type=int, help="Prompts generated together (MLX stages).")
@click.option("--json", "json_file", default=None, type=click.Path(dir_okay=False), help="Write the scores as JSON.")
@click.option("--html", "html_file", default=None, type=click.Path(dir_okay=False),
              help="Write a self-contained page with every example's replies side by side.")
@click.option("--check", is_flag=True,
              help="Exit 1 when a GGUF stage keeps < 95% of the adapter's exact match or stopped replies, "
                   "or its mean KL is above the bound.")
@click.option("--max-kl", default=None, type=float, help="The --check bound on mean KL (nats per answer token).")
@click.option("--chat-template", default=None, help="Jinja chat template file overriding the tokenizer's (MLX stages).")
@click.option("--force", is_flag=True, help="Replace existing --json / --html files.")
def compare_cmd(model, adapter_file, fused, gguf, data, split, n, no_base, max_tokens, batch_size, json_file, html_file,
                check, max_kl, chat_template, force):
    """Did the fine-tune survive? Score each stage from the base model to the chat app's GGUF.

    Per stage: exact match (and valid-JSON rate and field match for JSON / tool-call answers), greedy
    agreement with the adapter stage, mean KL to it on the reference answers, the share of replies that
    stop at an end-of-turn token, and the teacher-forced loss. See docs/compare.md.

    \b
    Examples:
      mlxtune compare --adapter-file adapters --gguf tuned-q4_k_m.gguf       # bundled model and data
      mlxtune compare --model model --adapter-file adapters --fused fused --gguf a.gguf --gguf b.gguf \\
          --data data/ -n 100 --json scores.json --html compare.html --check
    """
    from ..comparison import MAX_KL, compare

    result = compare(model, adapter_file, fused=fused, gguf=gguf, data=data, split=split, n=n, base=not no_base,
                     max_tokens=max_tokens, batch_size=batch_size, chat_template=chat_template, json_file=json_file,
                     html_file=html_file, force=force, log=lambda msg: click.echo(msg, err=True))
    click.echo(f"{result.n} rows of {result.data}")
    click.echo(result.table())
    for note in result.notes:
        click.echo(f"note: {note}")
    for path in (json_file, html_file):
        if path:
            click.echo(f"Wrote {path}", err=True)
    if check:
        result.check(max_kl=MAX_KL if max_kl is None else max_kl)
        click.echo("check passed: every GGUF stage kept the fine-tune")
