from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.cli._options import Backend, DataOption, SeedOption, enum_value


@app.command("evaluate-saliency",
             epilog="Example: edgeretina evaluate-saliency model.pt --data phantom:data/test --out saliency-eval/ "
                    "--methods saliency,lesion,gradcam")
def evaluate_saliency(
    target: Annotated[Path, typer.Argument(help="Checkpoint (.pt) or exported bundle (directory or .zip).")],
    data: DataOption,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for report.json, report.md and examples.png.")] = Path("saliency-evaluation"),
    methods: Annotated[Optional[str], typer.Option(
        "--methods", help="Comma-separated maps to score: saliency, saliency-deep, lesion, gradcam, gradcam++, counterfactual "
                          "(default: all; those this model cannot make are skipped with the reason).")] = None,
    backend: Annotated[Optional[Backend], typer.Option("--backend", help="Bundle backend (default: the bundle's best).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Score the first N images only.")] = None,
    tolerance: Annotated[float, typer.Option(
        "--tolerance", help="Pointing-game tolerance as a fraction of the field diameter (0.015: 15 px on a 1000 px field).")] = 0.015,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=100, help="Bootstrap resamples for the confidence intervals.")] = 1000,
    examples: Annotated[int, typer.Option("--examples", min=0, help="Images with lesions shown in examples.png.")] = 4,
    seed: SeedOption = 0,
    counterfactual_grow: Annotated[float, typer.Option(
        "--counterfactual-grow", min=0.0, max=4.0, help="The counterfactual methods widen each removal by this many "
                                                      "grid cells (as explain --grow).")] = 0.0,
) -> None:
    """Do the explanation maps point at the lesions? Pointing game, AUC-PR and mass inside the masks per lesion type."""
    from edgeretina.evaluation.saliency import SaliencyEvalConfig, evaluate_saliency as run

    names = None if methods is None else tuple(n.strip() for n in methods.split(",") if n.strip())
    config = SaliencyEvalConfig(target=target, data=tuple(data), out=out, methods=names, backend=enum_value(backend),
                                limit=limit, tolerance=tolerance, n_bootstrap=bootstrap, seed=seed, examples=examples,
                                counterfactual_grow=counterfactual_grow)
    _, files = run(config, log=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps({name: str(path) for name, path in files.items()}))
