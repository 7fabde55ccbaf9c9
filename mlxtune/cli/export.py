"""`mlxtune export`: put a GGUF file where a chat app finds it (Ollama Modelfile, LM Studio folder).

`mlxtune export ollama|lmstudio` take an existing GGUF; `mlxtune export --model M --adapter-file A` goes
from an adapter to a chat-ready file in one step (fuse, GGUF, then the app's layout).
"""

from __future__ import annotations

import click

from . import main


@main.group("export", invoke_without_command=True)
@click.option("--model", default=None, metavar="PATH|ID", help="One shot: the base model the adapter was trained on.")
@click.option("--adapter-file", default=None, type=click.Path(), help="One shot: the LoRA adapter to fuse.")
@click.option("--out", default=None, type=click.Path(), help="One shot: a new folder for fused/, the GGUF and the Modelfile.")
@click.option("--app", default="ollama", show_default=True, type=click.Choice(["ollama", "lmstudio", "both"]),
              help="One shot: which chat app to prepare for.")
@click.option("--type", "gguf_type", default="q8_0", show_default=True,
              help="One shot: GGUF type (f32, f16, bf16, q8_0, q4_0, q4_k_m, q6_k).")
@click.option("--name", default=None, help="One shot: model name (default: the base model's folder name).")
@click.option("--keep-adapter", is_flag=True,
              help="One shot: fine-tune-aware quantization for this adapter (needs --data, its data folder).")
@click.option("--verify", is_flag=True,
              help="One shot: before placing anything, check the GGUF in llama.cpp against the adapter on the test "
                   "split of --data (mlxtune compare --check); place nothing when it fails.")
@click.option("--data", default=None, type=click.Path(),
              help="One shot: the adapter's data folder (test.jsonl for --verify, train.jsonl for --keep-adapter).")
@click.option("-n", "n", default=None, type=int, help="One shot: --verify on the first N test rows only.")
@click.option("--force", is_flag=True, help="Replace existing outputs.")
@click.pass_context
def export_group(ctx, model, adapter_file, out, app, gguf_type, name, keep_adapter, verify, data, n, force):
    """Prepare a model for Ollama or LM Studio.

    \b
    Examples:
      mlxtune export ollama --gguf model.gguf --name my-model
      mlxtune export lmstudio --gguf model.gguf --publisher me --name my-model
      mlxtune export --model mlx-community/Qwen2.5-0.5B-Instruct-4bit --adapter-file adapters --out chat --app both
      mlxtune export --model model --adapter-file adapters --out chat --type q4_k_m --keep-adapter --verify --data data/
    """
    if ctx.invoked_subcommand is not None:
        return
    if not model or not adapter_file or not out:
        raise click.UsageError("give a subcommand (ollama, lmstudio) or --model, --adapter-file and --out "
                               "for the one-shot export; see mlxtune export --help")
    from ..export import export_chat

    result = export_chat(model, adapter_file, out, app=app, gguf_type=gguf_type, name=name, force=force,
                         keep_adapter=keep_adapter, verify=verify, data=data, n=n,
                         log=lambda msg: click.echo(msg, err=True))
    click.echo(f"GGUF: {result.gguf}")
    if result.ollama:
        _report_ollama(result.ollama)
    if result.lmstudio:
        click.echo(f"LM Studio: {result.lmstudio}")


@export_group.command("ollama")
@click.option("--gguf", "gguf", required=True, type=click.Path(), help="The GGUF model file.")
@click.option("--name", default=None, help="Ollama model name (default: from the file name).")
@click.option("--out", default=None, type=click.Path(), help="Folder for the Modelfile (default: beside the GGUF).")
@click.option("--adapter", default=None, type=click.Path(),
              help="A LoRA GGUF (mlxtune adapters export --to gguf) applied on top of --gguf as the base.")
@click.option("--system", default=None, help="A default system prompt (SYSTEM line).")
@click.option("--force", is_flag=True, help="Replace an existing Modelfile.")
def ollama_cmd(gguf, name, out, adapter, system, force):
    """Write an Ollama Modelfile (FROM, TEMPLATE, PARAMETER stop) for a GGUF file.

    \b
    Examples:
      mlxtune export ollama --gguf model.gguf
      mlxtune export ollama --gguf base.gguf --adapter lora.gguf --name my-lora --out ollama/
    """
    from ..export import export_ollama

    _report_ollama(export_ollama(gguf, name, out, adapter=adapter, system=system, force=force))


@export_group.command("lmstudio")
@click.option("--gguf", "gguf", required=True, type=click.Path(), help="The GGUF model file.")
@click.option("--publisher", default="mlxtune", show_default=True, help="First folder level under models/.")
@click.option("--name", default=None, help="Second folder level (default: the file name without .gguf).")
@click.option("--models-dir", default=None, type=click.Path(),
              help="LM Studio's models folder (default: $LMSTUDIO_MODELS_DIR or ~/.lmstudio/models).")
@click.option("--link", is_flag=True, help="Make a symbolic link instead of copying the file.")
@click.option("--force", is_flag=True, help="Replace a file already there.")
def lmstudio_cmd(gguf, publisher, name, models_dir, link, force):
    """Place a GGUF file as models/<publisher>/<name>/<file>.gguf for LM Studio.

    \b
    Examples:
      mlxtune export lmstudio --gguf model-q4_k_m.gguf --publisher me --name tool-caller
      mlxtune export lmstudio --gguf model.gguf --models-dir /Volumes/ssd/lmstudio/models --link
    """
    from ..export import export_lmstudio

    dest = export_lmstudio(gguf, publisher, name, models_dir, link=link, force=force)
    click.echo(f"{'Linked' if link else 'Copied'} to {dest}; it appears in LM Studio's model list.")


def _report_ollama(result) -> None:
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    family = f" ({result.family} chat template)" if result.family else ""
    click.echo(f"Wrote {result.modelfile}{family}. Create the model with:")
    click.echo(f"  {result.command}")
    click.echo(f"then chat: ollama run {result.name}")
