"""The `mlxtune` command: a thin click layer over the public Python functions.

Each verb lives in its own module here and only parses flags, calls one function and prints.
Errors are caught once, in `run`: an `MlxtuneError` becomes one `error: ...` line and exit 1.
"""

from __future__ import annotations

import os
import sys
import warnings

import click

from .. import __version__
from ..errors import MlxtuneError, MlxtuneWarning

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="mlxtune")
@click.option("--debug", is_flag=True, help="Show full tracebacks (or set MLXTUNE_DEBUG=1).")
def main(debug: bool) -> None:
    """Fine-tune LLMs with MLX and chat with the result in LM Studio, Ollama or llama.cpp.

    \b
    The usual path:
      mlxtune convert --hf-path ID --mlx-path model -q
      mlxtune lora --model model --data data/ --iters 1000
      mlxtune fuse --model model --adapter-file adapters/adapters.npz --save-path fused --de-quantize
      mlxtune gguf --model fused --outfile model.gguf --type q4_k_m
      mlxtune export ollama --gguf model.gguf
    """
    if debug:
        os.environ["MLXTUNE_DEBUG"] = "1"


def _register() -> None:
    # Importing a verb module attaches its command to `main`.
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    # Ours are for the user: one `warning: ...` line each time; anything else keeps Python's format.
    if issubclass(category, MlxtuneWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _default(message, category, filename, lineno, file, line)


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point: OpenBLAS re-exec, then the command with one-line errors and warnings."""
    from ..blas import maybe_reexec_with_openblas

    # Re-execute with the arguments actually given (a caller's argv, not the host process's sys.argv).
    maybe_reexec_with_openblas(None if argv is None else ["mlxtune", *argv])
    _register()
    warnings.showwarning = _show_warning
    warnings.simplefilter("always", MlxtuneWarning)  # every run says it, not only the first in a process
    debug = os.environ.get("MLXTUNE_DEBUG") == "1" or "--debug" in (argv or sys.argv)
    try:
        main.main(args=argv, prog_name="mlxtune", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("\nInterrupted.", err=True)
        sys.exit(130)
    except MlxtuneError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except Exception as e:  # a bug, not bad input: still one line unless asked
        if debug:
            raise
        click.echo(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
        sys.exit(1)
