"""`mlxtune adapters export|import|info`: adapter interop (thin wrappers over `mlxtune.adapters`)."""

from __future__ import annotations

import click

from . import main


@main.group("adapters")
def adapters_cmd():
    """Convert LoRA adapters to and from PEFT / GGUF, and describe them.

    \b
    Examples:
      mlxtune adapters info adapters/adapters.npz
      mlxtune adapters export --adapter-file adapters/adapters.npz --to peft peft_adapter/
      mlxtune adapters import peft_adapter/ --to adapters/adapters.npz
    """


@adapters_cmd.command("export")
@click.option("--adapter-file", required=True, type=click.Path(), help="adapters.npz / .safetensors or its folder.")
@click.option("--to", "to", required=True, type=click.Choice(["peft", "gguf"]), help="Target format.")
@click.argument("out", required=False, type=click.Path())
@click.option("--outfile", default=None, type=click.Path(), help="Output .gguf file (with --to gguf).")
@click.option("--model", default=None, metavar="PATH|ID",
              help="Base model: required for --to gguf; for --to peft it sets base_model_name_or_path.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
def export_cmd(adapter_file, to, out, outfile, model, force):
    """Write an adapter as a PEFT directory or a llama.cpp LoRA GGUF.

    \b
    Examples:
      mlxtune adapters export --adapter-file adapters/adapters.npz --to peft peft_adapter/
      mlxtune adapters export --adapter-file adapters --to gguf --model model --outfile lora.gguf
    """
    from ..adapters import export_peft
    from ..errors import ConfigError
    from ..gguf.lora import write_lora_gguf

    if to == "peft":
        if out is None:
            raise ConfigError("--to peft needs an output directory: mlxtune adapters export --adapter-file F --to peft OUT/")
        path = export_peft(adapter_file, out, base_model=model, force=force)
        click.echo(f"Wrote PEFT adapter {path} (adapter_model.safetensors + adapter_config.json)")
        return
    outfile = outfile or out
    if model is None or outfile is None:
        raise ConfigError("--to gguf needs --model BASE and --outfile X.gguf")
    path = write_lora_gguf(adapter_file, model, outfile, force=force)
    click.echo(f"Wrote LoRA GGUF {path}")


@adapters_cmd.command("import")
@click.argument("peft_dir", type=click.Path())
@click.option("--to", "to", default="adapters/adapters.npz", show_default=True, type=click.Path(),
              help="Output adapter file (.npz or .safetensors); adapter_config.json is written beside it.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
def import_cmd(peft_dir, to, force):
    """Convert a PEFT LoRA directory into an mlxtune adapter.

    \b
    Example:
      mlxtune adapters import peft_adapter/ --to adapters/adapters.npz
    """
    from ..adapters import adapter_info, import_peft

    path = import_peft(peft_dir, to, force=force)
    info = adapter_info(path)
    click.echo(f"Wrote {path}: rank {info.rank}, {info.n_modules} modules, {info.parameters:,} parameters")


@adapters_cmd.command("info")
@click.argument("file", type=click.Path())
def info_cmd(file):
    """Show an adapter's rank, alpha, layers, modules, parameter count and base model.

    \b
    Example:
      mlxtune adapters info adapters/adapters.npz
    """
    from ..adapters import adapter_info

    click.echo(adapter_info(file).summary())
