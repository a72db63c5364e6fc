from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.cli._options import Backend, DataOption, SeedOption, enum_value


@app.command(epilog="Example: edgeretina evaluate model.pt --data phantom:data/test --out eval/")
def evaluate(
    target: Annotated[Path, typer.Argument(help="Checkpoint (.pt) or exported bundle (directory or .zip).")],
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.json, report.md and the plots.")] = Path("evaluation"),
    k: Annotated[int, typer.Option("--knn-k", min=1, help="Neighbours of the KNN vote (checkpoints; a bundle uses its own).")] = 5,
    backend: Annotated[Optional[Backend], typer.Option("--backend", help="Bundle backend (default: the bundle's best).")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=100, help="Bootstrap resamples for the confidence intervals.")] = 1000,
    seed: SeedOption = 0,
) -> None:
    """Accuracy, QWK, F1, ECE, referable AUC/sensitivity/specificity with CIs, head vs KNN; JSON, Markdown and plots."""
    from edgeretina.evaluation.run import evaluate as run_evaluation

    _, files = run_evaluation(target, data, out, k=k, backend=enum_value(backend), n_bootstrap=bootstrap, seed=seed,
                              log=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps({name: str(path) for name, path in files.items()}))
