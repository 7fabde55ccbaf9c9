"""`mlxtune fuse`: merge a LoRA adapter into its base model (thin wrapper over `mlxtune.fusion.fuse`)."""

from __future__ import annotations

import click

from . import main


@main.command("fuse")
@click.option("--model", required=True, metavar="PATH|ID|GGUF",
              help="Base model directory, Hugging Face hub id or GGUF file (lmstudio:P/N, ollama:N too).")
@click.option("--adapter-file", required=True, type=click.Path(),
              help="adapters.npz / adapters.safetensors, a PEFT directory, or the folder holding one.")
@click.option("--save-path", default="fused_model", show_default=True, type=click.Path(),
              help="Output directory (written to a temp dir and renamed; an existing one needs --force).")
@click.option("--de-quantize", "de_quantize", is_flag=True,
              help="Write a float model from a quantized base (needed for GGUF export and most other tools).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Weight dtype of the output [default: float16 with --de-quantize, else the base's dtype].")
@click.option("--verify/--no-verify", default=None,
              help="Check fused vs base+adapter logits in float32 (<= 1e-4) and reload the output "
                   "[default: on for models up to 2B parameters].")
@click.option("--gguf", "gguf", default=None, type=click.Path(), metavar="FILE",
              help="Also write the fused model as a GGUF file (llama.cpp, Ollama, LM Studio).")
@click.option("--gguf-type", default="f16", show_default=True, help="GGUF weight type: f32, f16, bf16, q8_0, q4_0, q4_k_m, q6_k.")
@click.option("--keep-adapter", is_flag=True,
              help="With --gguf: fine-tune-aware quantization for this adapter (needs --data, its training data).")
@click.option("--data", default=None, type=click.Path(),
              help="With --keep-adapter: the adapter's training data (folder with train.jsonl, or a .jsonl file).")
@click.option("--force", is_flag=True, help="Replace an existing --save-path.")
@click.option("--ignore-base-name", is_flag=True,
              help="Accept an adapter recorded for a differently named base (e.g. a converted copy); "
                   "module names and shapes are still checked.")
def fuse_cmd(model, adapter_file, save_path, de_quantize, dtype, verify, gguf, gguf_type, keep_adapter, data, force,
             ignore_base_name):
    """Merge a LoRA adapter into its base model and save a standalone model.

    The adapter is checked against the base (module names, shapes, recorded base model). A quantized
    base is re-quantized unless --de-quantize; fuse then measures how much of the fine-tune survives
    and warns when most of it is rounded away.

    \b
    Examples:
      mlxtune fuse --model model --adapter-file adapters/adapters.npz --save-path fused --de-quantize
      mlxtune fuse --model Qwen/Qwen2.5-0.5B-Instruct --adapter-file peft_adapter/ --save-path fused
      mlxtune fuse --model model --adapter-file adapters --de-quantize --gguf model.gguf --gguf-type q8_0
      mlxtune fuse --model model --adapter-file adapters --de-quantize --gguf model.gguf --gguf-type q4_k_m \
          --keep-adapter --data data/
    """
    from ..fusion import fuse

    result = fuse(model, adapter_file, save_path, de_quantize=de_quantize, dtype=dtype, verify=verify,
                  gguf=gguf, gguf_type=gguf_type, force=force, ignore_base_name=ignore_base_name,
                  keep_adapter=keep_adapter, data=data,
                  log=lambda msg: click.echo(msg, err=True))

    a = result.adapter
    click.echo(f"Fused {len(a.modules)} adapted layers (rank {a.rank}, scale {a.scale:g}) into {result.base_model}")
    if result.requantized:
        click.echo(f"Re-quantized with the base's settings; share of each update kept: mean {result.mean_kept:.0%}, "
                   f"worst {min(layer.kept for layer in result.layers):.0%}")
    elif result.de_quantized:
        click.echo(f"De-quantized to {result.dtype}")
    if result.parity is not None:
        what = "logit change from re-quantization" if result.requantized else "parity with base+adapter"
        click.echo(f"Verified: {what} {result.parity:.2e} (max abs logit difference, float32); "
                   f"reloaded output matches ({result.reload_diff:.1e})")
    kind = f"{result.bits}-bit ({result.dtype} scales)" if result.requantized else result.dtype
    click.echo(f"Saved {kind} model to {result.path}")
    if result.gguf is not None:
        click.echo(f"Wrote GGUF {result.gguf}")
