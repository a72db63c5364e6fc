from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.cli._options import DataOption

bank_app = typer.Typer(no_args_is_help=True, help="The KNN feature bank of a checkpoint.")
app.add_typer(bank_app, name="bank")


@bank_app.command("build", epilog="Example: edgeretina bank build model.pt --data aptos:/data/aptos --data phantom:data/train")
def build(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by `edgeretina train`.")],
    data: DataOption,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Checkpoint to write (default: update CHECKPOINT in place).")] = None,
) -> None:
    """Rebuild the feature bank from DATA with the checkpoint's model (case ids, grades, sources), without retraining."""
    from edgeretina.training.checkpoint_tools import rebuild_bank

    info = rebuild_bank(checkpoint, data, out, log=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps(info))
