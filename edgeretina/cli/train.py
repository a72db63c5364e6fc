from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.choices import LESION_DETAILS, LESION_LABELS, SALIENCY_KINDS, TRAINING_DEVICES, TRAINING_SAMPLERS
from edgeretina.cli._options import ComputeThreadsOption, SeedOption, TrainingPrecision, choice_enum

Sampler = choice_enum("Sampler", TRAINING_SAMPLERS)
SaliencyKind = choice_enum("SaliencyKind", SALIENCY_KINDS)
LesionDetail = choice_enum("LesionDetail", LESION_DETAILS)
LesionLabels = choice_enum("LesionLabels", LESION_LABELS)
Device = choice_enum("Device", TRAINING_DEVICES)


@app.command(epilog="Example: edgeretina train --data aptos:/data/aptos2019 --data eyepacs:/data/eyepacs --out model.pt --epochs 20")
def train(
    labels: Annotated[Optional[Path], typer.Argument(help="labels.csv of the training set (path, grade, ...): the same as --data csv:LABELS.")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", "-d", help="Training data as FORMAT:PATH (aptos, eyepacs, ddr, idrid, messidor2, deepdrid, phantom, dicom, csv); repeat to merge corpora.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint file to write.")] = Path("checkpoint.pt"),
    arch: Annotated[str, typer.Option("--arch", help="open_clip model name or edgeretina preset.")] = "edgeretina-tiny-rn",
    pretrained: Annotated[Optional[str], typer.Option("--pretrained", help="Local weights file or open_clip tag.")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Override the model input size.")] = None,
    val: Annotated[Optional[list[str]], typer.Option("--val", help="Validation data as FORMAT:PATH or a labels.csv (repeatable). Default: a patient-, source- and grade-aware split of the training data.")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.01, max=0.5, help="Share of the training data held out for validation when --val is not given.")] = 0.15,
    target_sensitivity: Annotated[float, typer.Option("--target-sensitivity", min=0.01, max=0.99, help="Referable sensitivity the operating point must reach on the validation set.")] = 0.87,
    operating_point: Annotated[bool, typer.Option("--operating-point/--no-operating-point", help="Choose the referable threshold for --target-sensitivity on the validation set (else P(referable) >= 0.5).")] = True,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="JSON of grade and lesion descriptions for the text prototypes (default: the packaged prompts.json).")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    lesion_head: Annotated[bool, typer.Option("--lesion-head", help="Train a patch-level lesion head (needs masks/<CODE>/<case_id>.png beside labels.csv).")] = False,
    lesion_detail: Annotated[LesionDetail, typer.Option("--lesion-detail", help="patch: lesion maps on the patch grid; fine: on the stride-8 map (ResNet towers; 32x32 at 256 px).")] = LesionDetail("patch"),
    lesion_labels: Annotated[LesionLabels, typer.Option("--lesion-labels", help="What the lesion head learns from: masks (masks/<CODE>/<case_id>.png) or image (weak: a <CODE> or n_<CODE> column per lesion type in labels.csv, max-pooled presence).")] = LesionLabels("masks"),
    lesion_to_grade: Annotated[bool, typer.Option("--lesion-to-grade", help="Side connection: the lesion head's image-level presences feed the grade (needs --lesion-head).")] = False,
    saliency: Annotated[SaliencyKind, typer.Option("--saliency", help="deep: the last layer's patch evidence; gated: ELLG's gated fusion with a shallow layer (open_clip ViT and ResNet towers).")] = SaliencyKind("deep"),
    ben_graham: Annotated[bool, typer.Option("--ben-graham", help="Local-average subtraction preprocessing.")] = False,
    precision: Annotated[TrainingPrecision, typer.Option("--precision", help="auto = bf16 only where the CPU has bf16 units; fp16 on CUDA.")] = TrainingPrecision("auto"),
    max_minutes: Annotated[Optional[float], typer.Option("--max-minutes", help="Stop after this budget.")] = None,
    sampler: Annotated[Sampler, typer.Option("--sampler", help="per_grade: n images of every grade in each batch; weighted: class-balancing weights.")] = Sampler("per_grade"),
    per_grade: Annotated[Optional[int], typer.Option("--per-grade", min=1, help="Images of each grade per batch (default: batch size // grades present).")] = None,
    patience: Annotated[Optional[int], typer.Option("--patience", min=1, help="Stop when validation QWK has not risen for this many epochs.")] = None,
    min_delta: Annotated[float, typer.Option("--min-delta", min=0.0, help="The rise in validation QWK that counts for --patience.")] = 0.0,
    trainable_blocks: Annotated[Optional[int], typer.Option("--trainable-blocks", min=0, help="Train only the backbone's last N blocks; 0 freezes it (heads only). Default: everything.")] = None,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Flips, rotation, zoom, exposure, colour, gamma, blur inside the field of view.")] = True,
    focal_gamma: Annotated[float, typer.Option("--focal-gamma", min=0.0, help="Focal loss gamma on the prototype logits (0: cross-entropy).")] = 2.0,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", min=0.0, max=0.99, help="Label smoothing of the prototype targets.")] = 0.05,
    lesion_generation: Annotated[float, typer.Option("--lesion-generation", min=0.0, max=1.0, help="ELLG lesion generation: the share of training images that get lesions cut from other training images pasted in (needs lesion masks). 0: off.")] = 0.0,
    lesion_generation_keep_grade: Annotated[bool, typer.Option("--lesion-generation-keep-grade", help="Paste only lesions that imply no higher grade than the image's own, so labels never change.")] = False,
    contrastive_epochs: Annotated[int, typer.Option("--contrastive-epochs", min=0, help="Image-text contrastive epochs (captions from the grade and lesion labels) before the grading epochs; needs an open_clip tower. 0: none.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the resume file next to --out, when there is one.")] = False,
    device: Annotated[Device, typer.Option("--device", help="cpu or cuda (under torchrun each process takes cuda:LOCAL_RANK).")] = Device("cpu"),
    threads: ComputeThreadsOption = None,
    seed: SeedOption = 0,
) -> None:
    """Train a grader (open_clip or timm tower, text prototypes, CORAL head, patch saliency) on one or more datasets.

    Several processes: torchrun --nproc_per_node N -m edgeretina train ... (DDP; rank 0 writes)."""
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.loop import TrainConfig, train as run_training
    from edgeretina.training.lesion_generation import LesionGenerationConfig
    from edgeretina.training.losses import LossWeights
    from edgeretina.training.model import ModelConfig

    model = ModelConfig(backbone=BackboneConfig(name=arch, pretrained=pretrained, image_size=image_size),
                        lesion_head=lesion_head, saliency=saliency.value, lesion_detail=lesion_detail.value,
                        lesion_to_grade=lesion_to_grade)
    specs = [f"csv:{labels}"] if labels is not None else []
    config = TrainConfig(data=tuple(specs + list(data or [])), out=out, model=model,
                         val_data=tuple(_spec_or_labels(v) for v in val or []), val_fraction=val_fraction,
                         target_sensitivity=target_sensitivity if operating_point else None, prompts_file=prompts, epochs=epochs,
                         batch_size=batch_size, lr=lr, backbone_lr_scale=0.1 if pretrained else 1.0,
                         ben_graham=ben_graham, precision=precision.value, max_minutes=max_minutes, threads=threads, seed=seed,
                         sampler=sampler.value, per_grade=per_grade, patience=patience, min_delta=min_delta,
                         trainable_blocks=trainable_blocks, augment=augment, resume=resume, contrastive_epochs=contrastive_epochs, device=device.value,
                         loss=LossWeights(focal_gamma=focal_gamma, label_smoothing=label_smoothing),
                         lesion_generation=LesionGenerationConfig(probability=lesion_generation,
                                                                  raise_grade=not lesion_generation_keep_grade),
                         lesion_labels=lesion_labels.value)
    result = run_training(config)
    if result.rank == 0:        # under torchrun every process returns; one line is printed
        typer.echo(json.dumps({"checkpoint": str(result.checkpoint), "seconds": result.seconds,
                               "val": {k: result.metrics.get(k) for k in ("qwk", "accuracy", "n")}}))


def _spec_or_labels(text: str) -> str:
    """--val takes FORMAT:PATH or, as before datasets had layouts, the path of a labels.csv."""
    from edgeretina.errors import ConfigError
    from edgeretina.layouts import parse_data_spec

    try:
        return str(parse_data_spec(text))
    except ConfigError:
        if Path(text).suffix.lower() == ".csv":
            return f"csv:{text}"
        raise
