"""The export step `--prune`: structured pruning and 2:4 sparsity of the checkpoint's model before ONNX export.

`prune_model` runs after `load_reference` and before `export_onnx_fp32`. It replaces
`ctx.checkpoint.model` with a smaller model that computes less, not one with zeros in it; the torch
surgery, the recovery distillation and the counting are edgeretina/training/prune.py. This step picks
the distillation images, measures and gates, and records.

Recovery images are phantom photographs rendered from their own seed range, because a checkpoint
carries no training images. After the recovery, the pruned model's torch outputs become the
reference the later gates compare the exported graph with; the fidelity to the unpruned model is
gated here (label ``pruned``) and recorded with parameters, MACs and ONNX sizes in
``export_info["pruning"]``. The feature bank is kept as is: the distillation holds embeddings close
to the unpruned ones, and the ``pruned`` gate's KNN overlap measures how close.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from edgeretina.errors import ConfigError, ExportError
from edgeretina.export.gate import run_gate
from edgeretina.export.reference import load_images
from edgeretina.export.steps import ExportContext, Step
from edgeretina.fidelity import GateThresholds, compare
from edgeretina.preprocess import normalize
from edgeretina.training.loop import predict_normalized
from edgeretina.training.prune import (ChannelPruning, DistillConfig, apply_24_sparsity, count_macs,
                                       count_parameters, distill, layers_satisfying_24, prune_structure,
                                       recalibrate_batchnorm)

# Phantom seeds for the distillation images, apart from the reference and calibration ranges.
DISTILL_SEED_BASE = 30_000_011
PREDICT_BATCH = 16

# A pruned and fine-tuned model is a different model: it may move a few borderline grades.
PRUNE_THRESHOLDS = GateThresholds(grade_agreement=0.85, qwk_change=0.15, referable_agreement=0.85,
                                  embedding_cosine=0.9, saliency_correlation=0.7, knn_overlap=0.5)


@dataclass(frozen=True)
class PruneConfig:
    """The options of `--prune`; the defaults of the torch side are training/prune.py's."""

    mlp_ratio: float = ChannelPruning.mlp_ratio    # ViT: fraction of MLP hidden channels kept (1.0 = none)
    conv_ratio: float = ChannelPruning.conv_ratio  # ResNet: fraction of Bottleneck inner channels kept
    semi_structured_24: bool = False               # zero 2 of every 4 input weights (Orin sparse tensor cores)
    recovery_steps: int = DistillConfig.steps      # distillation steps from the unpruned model (0 = none)
    recovery_images: int = 32                      # phantom photographs the distillation cycles through
    batch_size: int = DistillConfig.batch_size
    lr: float = DistillConfig.lr
    thresholds: GateThresholds = field(default_factory=lambda: PRUNE_THRESHOLDS)

    def __post_init__(self):
        _ = self.channels, self.distillation   # building them validates ratios and schedule
        if self.recovery_images < 1:
            raise ConfigError(f"recovery_images must be at least 1, got {self.recovery_images}")

    @property
    def channels(self) -> ChannelPruning:
        return ChannelPruning(mlp_ratio=self.mlp_ratio, conv_ratio=self.conv_ratio)

    @property
    def distillation(self) -> DistillConfig:
        return DistillConfig(steps=self.recovery_steps, batch_size=self.batch_size, lr=self.lr)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "thresholds"}


def make_prune_step(config: PruneConfig) -> Step:
    """A step with the given options and the name `prune_model` (export records step names)."""
    def prune_model(ctx: ExportContext) -> None:
        run_pruning(ctx, config)
    return prune_model


def prune_model(ctx: ExportContext) -> None:
    """The pruning step with default options (MLP / bottleneck channels halved, no 2:4)."""
    run_pruning(ctx, PruneConfig())


def run_pruning(ctx: ExportContext, config: PruneConfig) -> None:
    """Prune ctx.checkpoint.model, recover by distillation, gate and record; see the module docstring."""
    if ctx.checkpoint is None or ctx.reference_inputs is None:
        raise ExportError("prune_model needs load_reference to run first")
    teacher = ctx.checkpoint.model.eval()
    student = copy.deepcopy(teacher)
    images = _distillation_images(ctx, config.recovery_images)
    structure = prune_structure(student, config.channels)
    recalibrate_batchnorm(student, images, config.batch_size)
    masks = apply_24_sparsity(student.backbone) if config.semi_structured_24 else {}
    before_recovery = _fidelity(ctx, predict_normalized(student, ctx.reference_inputs, PREDICT_BATCH))
    losses = distill(student, teacher, images, masks, config.distillation)
    pruned_outputs = predict_normalized(student, ctx.reference_inputs, PREDICT_BATCH)
    run_gate(ctx, pruned_outputs, config.thresholds, "pruned")
    ctx.export_info["pruning"] = {
        "config": config.to_dict(),
        "structure": structure,
        "params": {"before": count_parameters(teacher), "after": count_parameters(student)},
        "macs": {"before": count_macs(teacher, ctx.reference_inputs.shape[-1]),
                 "after": count_macs(student, ctx.reference_inputs.shape[-1])},
        "onnx_bytes": {"before": _onnx_bytes(ctx, teacher, "unpruned"), "after": _onnx_bytes(ctx, student, "pruned")},
        "sparsity_24": {"layers": sorted(masks), "satisfied": sorted(layers_satisfying_24(student.backbone))}
        if config.semi_structured_24 else None,
        "recovery": {"steps": config.recovery_steps, "images": len(images), "source": "phantom",
                     "seed_base": DISTILL_SEED_BASE + ctx.config.seed * 1_000,
                     "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None},
        "fidelity": {"before_recovery": before_recovery, "after_recovery": _fidelity(ctx, pruned_outputs)},
    }
    ctx.checkpoint = dataclasses.replace(ctx.checkpoint, model=student.eval())
    ctx.reference_outputs = pruned_outputs   # later gates check the export of the pruned model
    info = ctx.export_info["pruning"]
    ctx.log(f"pruned: params {info['params']['before']:,} -> {info['params']['after']:,}, "
            f"MACs {info['macs']['before']:,} -> {info['macs']['after']:,} per image")


# --- recovery images and measurement ---------------------------------------------------------------

def _distillation_images(ctx: ExportContext, count: int) -> torch.Tensor:
    preprocess = ctx.checkpoint.preprocess
    prepared, _ = load_images(None, count, preprocess, DISTILL_SEED_BASE + ctx.config.seed * 1_000)
    return torch.from_numpy(normalize(prepared, preprocess)).float()


def _fidelity(ctx: ExportContext, candidate: dict[str, np.ndarray]) -> dict[str, float]:
    bank = ctx.checkpoint.bank.embeddings if ctx.checkpoint.bank is not None else None
    checks = compare(ctx.reference_outputs, candidate, ctx.checkpoint.grading, PRUNE_THRESHOLDS, bank)
    return {c.name: round(c.value, 6) for c in checks}


def _onnx_bytes(ctx: ExportContext, model: nn.Module, name: str) -> int:
    """Size of the FP32 ONNX graph of `model`, exported exactly as export_onnx_fp32 does, in scratch space."""
    from edgeretina.export.onnx_steps import export_onnx_fp32

    work = ctx.work / f"prune-{name}"
    work.mkdir(parents=True, exist_ok=True)
    scratch = dataclasses.replace(ctx, work=work, checkpoint=dataclasses.replace(ctx.checkpoint, model=model),
                                  export_info={}, log=lambda _: None)
    export_onnx_fp32(scratch)
    return int(scratch.export_info["fp32_onnx_bytes"])
