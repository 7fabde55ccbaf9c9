"""`mlxtune data inspect|convert|split`: look at a dataset the way training will see it, and reshape it."""

from __future__ import annotations

import sys

import click

from . import main


@main.group("data")
def data_group():
    """Inspect, convert and split datasets (JSON lines: text, completions, chat, Alpaca, ShareGPT, pairs).

    \b
    Examples:
      mlxtune data inspect --model mlx-community/Qwen2.5-0.5B-Instruct-4bit --data data/
      mlxtune data convert alpaca.json chat.jsonl --to chat
      mlxtune data split all.jsonl --valid 0.1 --test 0.1
    """


def _bar(count: int, most: int, width: int = 40) -> str:
    return "#" * max(1 if count else 0, round(width * count / most)) if most else ""


@data_group.command("inspect")
@click.option("--model", required=True, metavar="PATH|ID|GGUF", help="Model or GGUF file (only its tokenizer is used).")
@click.option("--data", required=True, multiple=True, metavar="PATH",
              help="Folder with train/valid/test.jsonl, or a .jsonl/.json file (repeat to mix files).")
@click.option("-n", "n", default=3, show_default=True, type=int, help="Show this many training examples.")
@click.option("--max-seq-length", default=2048, show_default=True, type=int, help="Longer examples get truncated.")
@click.option("--valid-split", default=0.1, show_default=True, type=float,
              help="Validation share of a single file (or of train.jsonl when the folder has no valid.jsonl).")
@click.option("--test-split", default=0.0, show_default=True, type=float, help="Test share of a single file.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the train/valid/test split.")
@click.option("--train-on-inputs", is_flag=True, help="Train on prompt tokens too, not only the answers.")
@click.option("--chat-template", default=None, type=click.Path(dir_okay=False),
              help="Jinja chat template file replacing the tokenizer's, or `chatml` (default: its own; without one, "
                   "prompt/completion data trains as prompt + completion + EOS).")
@click.option("--prompt-key", default=None, help="Field holding the prompt (default: prompt).")
@click.option("--completion-key", default=None, help="Field holding the answer (default: completion).")
@click.option("--text-key", default=None, help="Field holding plain text (default: text).")
@click.option("--messages-key", default=None, help="Field holding chat messages (default: messages).")
@click.option("--batch-size", default=4, show_default=True, type=int,
              help="Batch size for the padding estimate (bucketed and --pack).")
@click.option("--color/--no-color", default=None, help="Colour trained tokens (default: when stdout is a terminal).")
def inspect_cmd(model, data, n, max_seq_length, valid_split, test_split, seed, train_on_inputs, chat_template,
                prompt_key, completion_key, text_key, messages_key, batch_size, color):
    """Show formats, counts, token lengths, truncation and examples with the trained tokens marked.

    Trained tokens are green in a terminal and [[in double brackets]] when the output is piped.

    \b
    Example:
      mlxtune data inspect --model mlx-community/Llama-3.2-1B-Instruct-4bit --data data/ -n 2
    """
    from ..data import highlight, inspect_dataset

    report = inspect_dataset(model, list(data) if len(data) > 1 else data[0], n=n, max_seq_length=max_seq_length,
                             valid_split=valid_split, test_split=test_split, seed=seed,
                             train_on_inputs=train_on_inputs, chat_template=chat_template,
                             prompt_key=prompt_key, completion_key=completion_key, text_key=text_key,
                             messages_key=messages_key, batch_size=batch_size)
    for file, fmt in report.formats.items():
        click.echo(f"{file}: {fmt}")
    click.echo(f"rendering: {report.rendering}")
    for split, lengths in report.lengths.items():
        stats = report.length_stats(split)
        if not stats:
            continue
        click.echo(f"{split}: {len(lengths)} examples, tokens min {stats['min']} / median {stats['median']} / "
                   f"p95 {stats['p95']} / max {stats['max']}")
    all_lengths = [x for lengths in report.lengths.values() for x in lengths]
    counts, edges = _histogram(all_lengths)
    for count, lo, hi in zip(counts, edges[:-1], edges[1:]):
        click.echo(f"  {lo:>7}-{hi:<7} {count:>6} {_bar(count, max(counts))}")
    click.echo(f"{report.truncated} examples longer than --max-seq-length {report.max_seq_length} will be truncated"
               + (f", {report.dropped} dropped (no trained token)" if report.dropped else ""))
    if report.padding:
        click.echo(f"padding in training batches of {batch_size}: {100 * report.padding['random']:.1f}% "
                   f"(with --batch-order length: {100 * report.padding['bucketed']:.1f}%, "
                   f"with --pack: {100 * report.padding['packed']:.1f}%)")
    color = sys.stdout.isatty() if color is None else color
    for i, record in enumerate(report.examples, 1):
        trained = sum(record.mask)
        click.echo(f"--- train example {i}: {len(record.ids)} tokens, {trained} trained ---")
        click.echo(highlight(report.tokenizer, record, color=color))


def _histogram(lengths: list[int], bins: int = 8):
    import numpy as np

    if not lengths:
        return [], [0]
    lo, hi = min(lengths), max(lengths)
    edges = np.linspace(lo, hi + 1, bins + 1).round().astype(int)
    edges = np.unique(edges)
    counts, _ = np.histogram(lengths, bins=edges)
    return counts.tolist(), edges.tolist()


@data_group.command("convert")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.option("--to", "to", required=True, type=click.Choice(["chat", "completions", "text"]), help="Output format.")
@click.option("--model", default=None, metavar="PATH|ID", help="With --to text: render with this model's chat template.")
@click.option("--chat-template", default=None, type=click.Path(dir_okay=False), help="With --to text: template file.")
@click.option("--prompt-key", default=None, help="Field holding the prompt in SRC (default: prompt).")
@click.option("--completion-key", default=None, help="Field holding the answer in SRC (default: completion).")
@click.option("--text-key", default=None, help="Field holding plain text in SRC (default: text).")
@click.option("--messages-key", default=None, help="Field holding chat messages in SRC (default: messages).")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
def convert_cmd(src, dst, to, model, chat_template, prompt_key, completion_key, text_key, messages_key, force):
    """Rewrite SRC (any supported format) as DST in chat, completions or text format.

    \b
    Examples:
      mlxtune data convert alpaca.json train.jsonl --to chat
      mlxtune data convert qa.jsonl out.jsonl --to completions --prompt-key question --completion-key answer
      mlxtune data convert chat.jsonl text.jsonl --to text --model mlx-community/Qwen2.5-0.5B-Instruct-4bit
    """
    from ..data import convert_dataset

    n = convert_dataset(src, dst, to, model=model, chat_template=chat_template, prompt_key=prompt_key,
                        completion_key=completion_key, text_key=text_key, messages_key=messages_key, force=force)
    click.echo(f"wrote {n} {to} records to {dst}")


@data_group.command("split")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--valid", default=0.1, show_default=True, type=float, help="Share of records for valid.jsonl.")
@click.option("--test", default=0.0, show_default=True, type=float, help="Share of records for test.jsonl.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the split (same as training's).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output folder (default: FILE without its extension).")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
def split_cmd(file, valid, test, seed, out, force):
    """Split one data file into a folder with train.jsonl, valid.jsonl and test.jsonl.

    \b
    Example:
      mlxtune data split all.jsonl --valid 0.1 --test 0.1 --out data/
    """
    from pathlib import Path

    from ..data import split_dataset

    counts = split_dataset(file, valid=valid, test=test, seed=seed, out=out, force=force)
    where = out or Path(file).with_suffix("")
    click.echo(f"wrote {where}: " + ", ".join(f"{n} {name}" for name, n in counts.items()))
