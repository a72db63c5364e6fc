from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeretina.cli import app
from edgeretina.cli._options import ComputeThreadsOption, TrainingPrecision


@app.command(epilog="Example: edgeretina demo --workdir demo-run --train-minutes 5")
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Folder for data, checkpoint, bundle, metrics.")] = Path("demo-run"),
    n_train: Annotated[int, typer.Option("--n-train", min=50)] = 1800,
    n_test: Annotated[int, typer.Option("--n-test", min=20)] = 300,
    train_minutes: Annotated[float, typer.Option("--train-minutes", help="Training time budget (minutes).")] = 5.0,
    precision: Annotated[TrainingPrecision, typer.Option("--precision", help="Training precision: auto = bf16 only where the CPU has bf16 units.")] = TrainingPrecision("auto"),
    threads: ComputeThreadsOption = None,
) -> None:
    """The whole path on phantom data: synthesise, train, export, grade the held-out set on the runtime."""
    from edgeretina.demo import DemoConfig, format_summary, run_demo

    config = DemoConfig(workdir=workdir, n_train=n_train, n_test=n_test, train_minutes=train_minutes,
                        precision=precision.value, threads=threads)
    metrics = run_demo(config, log=lambda line: typer.echo(line, err=True))
    typer.echo(format_summary(metrics))
    typer.echo(f"metrics: {workdir / 'metrics.json'}")
