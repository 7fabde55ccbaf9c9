"""`mlxtune convert`: Hugging Face checkpoint -> MLX directory (optionally quantized); see mlxtune.conversion."""

from __future__ import annotations

import click

from . import main


@main.command("convert")
@click.option("--hf-path", "--model", "hf_path", default=None, metavar="PATH|ID",
              help="Hugging Face model directory or hub id (or an MLX directory, with --de-quantize / -q).")
@click.option("--gguf", default=None, metavar="FILE|lmstudio:P/N|ollama:N",
              help="Import a GGUF file (or an LM Studio / Ollama model) instead: types MLX holds exactly "
                   "stay quantized, the others become --dtype.")
@click.option("--mlx-path", default="mlx_model", show_default=True, type=click.Path(),
              help="Output directory (refused if it exists, unless --force).")
@click.option("-q", "--quantize", is_flag=True, help="Quantize Linear/Embedding layers (affine).")
@click.option("--q-bits", default=4, show_default=True, type=click.Choice(["2", "3", "4", "5", "6", "8"]),
              help="Bits per quantized weight.")
@click.option("--q-group-size", default=64, show_default=True, type=click.Choice(["32", "64", "128"]),
              help="Weights sharing one scale and bias.")
@click.option("--dtype", default=None, type=click.Choice(["float16", "bfloat16", "float32"]),
              help="dtype of the float tensors [default: the checkpoint's own].")
@click.option("--keep-modules", default="", metavar="NAMES",
              help="Comma-separated module names or wildcards kept in float when quantizing "
                   "(e.g. lm_head,embed_tokens), or the recipe 'embeddings'.")
@click.option("--de-quantize", "dequantize", is_flag=True,
              help="Turn a quantized MLX model (or every GGUF tensor) into float weights.")
@click.option("--allow-bin", is_flag=True,
              help="Read pytorch_model*.bin checkpoints (with torch's weights-only loader).")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) for a hub id.")
@click.option("--force", is_flag=True, help="Replace an existing --mlx-path (only once the new one is complete).")
def convert_cmd(hf_path, gguf, mlx_path, quantize, q_bits, q_group_size, dtype, keep_modules, dequantize, allow_bin,
                revision, force):
    """Convert a Hugging Face model to MLX, optionally quantized to 4 or 8 bits.

    Tensors are streamed one at a time, so memory stays near the largest tensor. Tokenizer files and
    the chat template are copied unchanged; a README records the source and settings.

    \b
    Examples:
      mlxtune convert --hf-path Qwen/Qwen2.5-0.5B-Instruct --mlx-path qwen-4bit -q
      mlxtune convert --hf-path ./my-hf-model --mlx-path mlx8 -q --q-bits 8 --keep-modules lm_head
      mlxtune convert --hf-path ./my-hf-model --mlx-path mlx16 --dtype float16
      mlxtune convert --hf-path qwen-4bit --mlx-path qwen-float --de-quantize
      mlxtune convert --gguf SmolLM2-135M-Instruct.Q4_1.gguf --mlx-path smol
      mlxtune convert --gguf ollama:llama3.2:1b --mlx-path llama-f32 --de-quantize --dtype float32
    """
    from ..conversion import ConvertResult, convert

    result = convert(hf_path, mlx_path, gguf=gguf, quantize=quantize, q_bits=int(q_bits), q_group_size=int(q_group_size),
                     dtype=dtype, keep_modules=keep_modules, dequantize=dequantize, allow_bin=allow_bin,
                     revision=revision, force=force)
    click.echo(f"wrote {result.summary()}")
    if isinstance(result, ConvertResult) and result.float_layers:
        click.echo(f"kept in float ({len(result.float_layers)} layers):")
        items = sorted(result.float_layers.items())
        for path, why in items[:20]:
            click.echo(f"  {path}: {why}")
        if len(items) > 20:
            click.echo(f"  ... and {len(items) - 20} more (listed in {result.path / 'README.md'})")
