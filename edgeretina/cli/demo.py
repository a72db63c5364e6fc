from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgeretina.cli import app
from edgeretina.cli._options import ThreadsOption


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Folder for data, checkpoint, bundle, metrics.")] = Path("demo-run"),
    n_train: Annotated[int, typer.Option("--n-train", min=50)] = 1800,
    n_test: Annotated[int, typer.Option("--n-test", min=20)] = 300,
    train_minutes: Annotated[float, typer.Option("--train-minutes", help="Training time budget (minutes).")] = 5.0,
    precision: Annotated[str, typer.Option("--precision", help="Training precision: auto, fp32, bf16.")] = "auto",
    threads: ThreadsOption = None,
) -> None:
    """The whole path on phantom data: synthesise, train, export, grade the held-out set on the runtime."""
    from edgeretina.demo import DemoConfig, format_summary, run_demo

    config = DemoConfig(workdir=workdir, n_train=n_train, n_test=n_test, train_minutes=train_minutes,
                        precision=precision, threads=threads)
    metrics = run_demo(config, log=lambda line: typer.echo(line, err=True))
    typer.echo(format_summary(metrics))
    typer.echo(f"metrics: {workdir / 'metrics.json'}")
