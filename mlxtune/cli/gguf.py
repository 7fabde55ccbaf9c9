"""`mlxtune gguf`: write a fused model directory as a GGUF file (a thin layer over `mlxtune.to_gguf`)."""

from __future__ import annotations

import click

from . import main

TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q6_k"]


@main.command("gguf")
@click.option("--model", required=True,
              help="Fused model directory (float, or MLX-quantized), hub id or GGUF file (re-encoded).")
@click.option("--outfile", required=True, type=click.Path(dir_okay=False), help="GGUF file to write.")
@click.option("--type", "out_type", type=click.Choice(TYPES, case_sensitive=False), default="f16",
              show_default=True, help="Tensor type: float, Q8_0/Q4_0, or llama-quantize's Q4_K_M / Q6_K recipes.")
@click.option("--pre-tokenizer", default=None,
              help="llama.cpp pre-tokenizer name for a byte-level BPE tokenizer (default: detected).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Read the file back and check every tensor's shape and type and the required keys.")
@click.option("--keep-adapter", default=None, type=click.Path(), metavar="ADAPTER",
              help="The adapter fused into MODEL: quantize so that its fine-tune survives (the tensors it changed "
                   "most stay at a higher type; the scale search weighs columns by activations on --data).")
@click.option("--data", default=None, type=click.Path(),
              help="With --keep-adapter: the adapter's training data (folder with train.jsonl, or a .jsonl file).")
@click.option("--force", is_flag=True, help="Replace an existing --outfile.")
def gguf_command(model, outfile, out_type, pre_tokenizer, verify, keep_adapter, data, force):
    """Write MODEL as a GGUF file for llama.cpp, Ollama and LM Studio.

    \b
    Examples:
      mlxtune gguf --model fused --outfile model.gguf --type q4_k_m
      mlxtune gguf --model fused --outfile model.gguf --type q4_k_m --keep-adapter adapters --data data/
    """
    from ..gguf import to_gguf

    if data is not None and keep_adapter is None:
        raise click.UsageError("--data is read only with --keep-adapter")
    path = to_gguf(model, outfile, out_type, pre_tokenizer=pre_tokenizer, verify=verify, force=force,
                   keep_adapter=keep_adapter, data=data, log=lambda msg: click.echo(msg, err=True))
    click.echo(f"wrote {path}")
