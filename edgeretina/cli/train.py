from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.cli._options import ComputeThreadsOption, SeedOption, TrainingPrecision


@app.command(epilog="Example: edgeretina train data/train/labels.csv --out model.pt --val data/val/labels.csv --epochs 20")
def train(
    labels: Annotated[Path, typer.Argument(help="labels.csv of the training set (path, grade, ...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint file to write.")] = Path("checkpoint.pt"),
    arch: Annotated[str, typer.Option("--arch", help="open_clip model name or edgeretina preset.")] = "edgeretina-tiny-rn",
    pretrained: Annotated[Optional[str], typer.Option("--pretrained", help="Local weights file or open_clip tag.")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Override the model input size.")] = None,
    val_labels: Annotated[Optional[Path], typer.Option("--val", help="labels.csv of a validation set.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    lesion_head: Annotated[bool, typer.Option("--lesion-head", help="Train a patch-level lesion head (needs masks/<CODE>/<case_id>.png beside labels.csv).")] = False,
    ben_graham: Annotated[bool, typer.Option("--ben-graham", help="Local-average subtraction preprocessing.")] = False,
    precision: Annotated[TrainingPrecision, typer.Option("--precision", help="auto = bf16 only where the CPU has bf16 units; fp16 on CUDA.")] = TrainingPrecision("auto"),
    max_minutes: Annotated[Optional[float], typer.Option("--max-minutes", help="Stop after this budget.")] = None,
    threads: ComputeThreadsOption = None,
    seed: SeedOption = 0,
) -> None:
    """Train a grader (open_clip tower, text prototypes, CORAL head, patch saliency) on a labels.csv."""
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.loop import TrainConfig, train as run_training
    from edgeretina.training.model import ModelConfig

    model = ModelConfig(backbone=BackboneConfig(name=arch, pretrained=pretrained, image_size=image_size),
                        lesion_head=lesion_head)
    config = TrainConfig(labels=labels, out=out, model=model, val_labels=val_labels, epochs=epochs,
                         batch_size=batch_size, lr=lr, backbone_lr_scale=0.1 if pretrained else 1.0,
                         ben_graham=ben_graham, precision=precision.value, max_minutes=max_minutes, threads=threads, seed=seed)
    result = run_training(config)
    typer.echo(json.dumps({"checkpoint": str(result.checkpoint), "seconds": result.seconds,
                           "val": {k: result.metrics.get(k) for k in ("qwk", "accuracy", "n")}}))
