"""`mlxtune doctor`: print the backend, BLAS, versions, memory and torch status of this machine."""

from __future__ import annotations

import json

import click

from . import main


@main.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor_cmd(as_json):
    """Check what mlxtune will run on: backend (Metal GPU / CUDA / CPU), BLAS, versions, memory, torch.

    \b
    Examples:
      mlxtune doctor
      mlxtune doctor --json
      MLXTUNE_NO_OPENBLAS=1 mlxtune doctor     # see the BLAS without the OpenBLAS re-exec
    """
    from ..doctor import doctor

    report = doctor()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo("\n".join(report.lines()))
