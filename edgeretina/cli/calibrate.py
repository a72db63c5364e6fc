from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.cli._options import DataOption


@app.command(epilog="Example: edgeretina calibrate model.pt --data aptos:/data/aptos-val --out model-calibrated.pt")
def calibrate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by `edgeretina train`.")],
    data: DataOption,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Checkpoint to write (default: update CHECKPOINT in place).")] = None,
    target_sensitivity: Annotated[float, typer.Option("--target-sensitivity", min=0.01, max=0.99, help="Referable sensitivity the operating point must reach on DATA.")] = 0.87,
    keep_threshold: Annotated[bool, typer.Option("--keep-referable-threshold", help="Fit thresholds and temperatures only; keep the referable threshold (its sensitivity on DATA is reported, no longer a target).")] = False,
) -> None:
    """Recalibrate on held-out images: ordinal thresholds, temperatures (ECE before/after) and the referable operating point."""
    from edgeretina.training.checkpoint_tools import recalibrate

    report = recalibrate(checkpoint, data, out, target_sensitivity=None if keep_threshold else target_sensitivity,
                         log=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps(report, indent=1))
