"""Structured pruning and 2:4 semi-structured sparsity before ONNX export (`--prune`).

`prune_model` runs after `load_reference` and before `export_onnx_fp32`. It replaces
`ctx.checkpoint.model` with a smaller model that computes less, not one with zeros in it:

- ViT towers (open_clip ``VisionTransformer``): each block's MLP keeps the hidden channels with the
  largest ``||c_fc row|| * ||c_proj column||`` (the channel's gain through the MLP) in new, narrower
  ``nn.Linear`` layers. Attention heads are kept (``nn.MultiheadAttention`` packs q, k, v and ties the
  head width to the model width; removing heads needs a custom attention module and is not done yet).
- ModifiedResNet towers: each Bottleneck keeps the inner channels (conv1 out / conv2 in+out / conv3 in)
  with the largest ``|BN gamma| * ||conv filter|| * ||next conv input slice||`` (network slimming,
  Liu et al. 2017, with the weight norms breaking the tie of untrained gammas); BN statistics are then
  re-estimated because conv2/conv3 now see fewer inputs.
- Optional 2:4 sparsity for Ampere/Orin sparse tensor cores: in every group of 4 consecutive input
  weights of a backbone Linear/Conv (and attention in-projection), the 2 of smallest magnitude are
  zeroed and kept at zero through the recovery fine-tune by a mask. The ONNX graph stays dense;
  TensorRT chooses sparse kernels with ``--sparsity=enable``.

Recovery: a short distillation from the unpruned model (MSE on ordinal logits and saliency logits +
1 - cosine of the embeddings) on phantom photographs rendered from their own seed range, because a
checkpoint carries no training images. After it, the pruned model's torch outputs become the
reference the later gates compare the exported graph with; the fidelity to the unpruned model is
gated here (label ``pruned``) and recorded with parameters, MACs and ONNX sizes in
``export_info["pruning"]``. The feature bank is kept as is: the distillation holds embeddings close
to the unpruned ones, and the ``pruned`` gate's KNN overlap measures how close.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, Bottleneck, ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn

from edgeretina.errors import ConfigError, ExportError
from edgeretina.export.gate import run_gate
from edgeretina.export.reference import load_images
from edgeretina.export.steps import ExportContext, Step
from edgeretina.fidelity import GateThresholds, compare
from edgeretina.preprocess import normalize

# Phantom seeds for the distillation images, apart from the reference and calibration ranges.
DISTILL_SEED_BASE = 30_000_011
# Channel counts stay multiples of 8: tensor cores and AMX tile by 8/16, and 2:4 groups need 4.
CHANNEL_ALIGN = 8

# A pruned and fine-tuned model is a different model: it may move a few borderline grades.
PRUNE_THRESHOLDS = GateThresholds(grade_agreement=0.85, qwk_change=0.15, referable_agreement=0.85,
                                  embedding_cosine=0.9, saliency_correlation=0.7, knn_overlap=0.5)


@dataclass(frozen=True)
class PruneConfig:
    mlp_ratio: float = 0.5              # ViT: fraction of MLP hidden channels kept (1.0 = no MLP pruning)
    conv_ratio: float = 0.5             # ResNet: fraction of Bottleneck inner channels kept (1.0 = none)
    semi_structured_24: bool = False    # zero 2 of every 4 input weights (Orin sparse tensor cores)
    recovery_steps: int = 40            # distillation steps from the unpruned model (0 = none)
    recovery_images: int = 32           # phantom photographs the distillation cycles through
    batch_size: int = 8
    lr: float = 1e-4
    thresholds: GateThresholds = field(default_factory=lambda: PRUNE_THRESHOLDS)

    def __post_init__(self):
        for name in ("mlp_ratio", "conv_ratio"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {value}")
        if self.recovery_steps < 0 or self.recovery_images < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("recovery_steps >= 0, recovery_images >= 1, batch_size >= 1 and lr > 0 are required")

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
    structure = prune_structure(student, config)
    if isinstance(student.backbone.visual, ModifiedResNet):
        recalibrate_batchnorm(student, images, config.batch_size)
    masks = apply_24_sparsity(student.backbone) if config.semi_structured_24 else {}
    before_recovery = _fidelity(ctx, predict_outputs(student, ctx.reference_inputs))
    losses = distill(student, teacher, images, masks, config)
    pruned_outputs = predict_outputs(student, ctx.reference_inputs)
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


# --- structured pruning ----------------------------------------------------------------------------

def prune_structure(model: nn.Module, config: PruneConfig) -> dict:
    """Narrow the backbone in place; returns what was kept per layer (for the manifest)."""
    tower = model.backbone.visual
    if isinstance(tower, VisionTransformer):
        return {"kind": "vit-mlp", "blocks": [_prune_mlp(block.mlp, config.mlp_ratio)
                                              for block in tower.transformer.resblocks]}
    if isinstance(tower, ModifiedResNet):
        blocks = [m for m in tower.modules() if isinstance(m, Bottleneck)]
        return {"kind": "resnet-bottleneck", "blocks": [_prune_bottleneck(b, config.conv_ratio) for b in blocks]}
    raise ConfigError(f"structured pruning supports open_clip ViT and ModifiedResNet towers, not {type(tower).__name__}")


def kept_count(total: int, ratio: float) -> int:
    if ratio >= 1.0 or total <= CHANNEL_ALIGN:
        return total
    return min(total, max(CHANNEL_ALIGN, CHANNEL_ALIGN * round(total * ratio / CHANNEL_ALIGN)))


def _top_channels(importance: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.sort(torch.topk(importance, keep).indices).values   # keep the original order


@torch.no_grad()
def _prune_mlp(mlp: nn.Sequential, ratio: float) -> dict:
    fc, proj = mlp.c_fc, mlp.c_proj
    hidden = fc.out_features
    keep = _top_channels(fc.weight.norm(dim=1) * proj.weight.norm(dim=0), kept_count(hidden, ratio))
    mlp.c_fc = _linear_rows(fc, keep)
    mlp.c_proj = _linear_columns(proj, keep)
    return {"hidden": [hidden, len(keep)]}


def _linear_rows(layer: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(layer.in_features, len(keep), bias=layer.bias is not None)
    new.weight.copy_(layer.weight[keep])
    if layer.bias is not None:
        new.bias.copy_(layer.bias[keep])
    return new


def _linear_columns(layer: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(keep), layer.out_features, bias=layer.bias is not None)
    new.weight.copy_(layer.weight[:, keep])
    if layer.bias is not None:
        new.bias.copy_(layer.bias)
    return new


@torch.no_grad()
def _prune_bottleneck(block: Bottleneck, ratio: float) -> dict:
    planes = block.conv1.out_channels
    keep = kept_count(planes, ratio)
    # conv1's outputs (= conv2's inputs) and conv2's outputs (= conv3's inputs) are pruned independently.
    first = _top_channels(_channel_importance(block.bn1, block.conv1, block.conv2), keep)
    second = _top_channels(_channel_importance(block.bn2, block.conv2, block.conv3), keep)
    block.conv1 = _conv_select(block.conv1, out_keep=first)
    block.bn1 = _bn_select(block.bn1, first)
    block.conv2 = _conv_select(block.conv2, out_keep=second, in_keep=first)
    block.bn2 = _bn_select(block.bn2, second)
    block.conv3 = _conv_select(block.conv3, in_keep=second)
    return {"inner": [planes, keep]}


def _channel_importance(bn: nn.BatchNorm2d, conv: nn.Conv2d, next_conv: nn.Conv2d) -> torch.Tensor:
    return (bn.weight.abs() * conv.weight.flatten(1).norm(dim=1)
            * next_conv.weight.transpose(0, 1).flatten(1).norm(dim=1))


def _conv_select(conv: nn.Conv2d, out_keep: torch.Tensor | None = None, in_keep: torch.Tensor | None = None) -> nn.Conv2d:
    weight = conv.weight
    if out_keep is not None:
        weight = weight[out_keep]
    if in_keep is not None:
        weight = weight[:, in_keep]
    new = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=conv.bias is not None)
    new.weight.copy_(weight)
    if conv.bias is not None:
        new.bias.copy_(conv.bias if out_keep is None else conv.bias[out_keep])
    return new


def _bn_select(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), eps=bn.eps, momentum=bn.momentum)
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name).copy_(getattr(bn, name)[keep])
    new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """Re-estimate BN running statistics (cumulative average) on the distillation images."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.eval()
    for bn in norms:
        bn.train()
    for start in range(0, len(images), batch_size):
        model(images[start:start + batch_size])
    model.eval()


# --- 2:4 semi-structured sparsity ------------------------------------------------------------------

def sparsity_targets(module: nn.Module) -> dict[str, torch.Tensor]:
    """Weights TensorRT runs as GEMM/conv, by name, whose input dimension splits into groups of 4."""
    targets = {}
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)) and sub.weight.shape[1] % 4 == 0 and getattr(sub, "groups", 1) == 1:
            targets[f"{name}.weight"] = sub.weight
        elif isinstance(sub, nn.MultiheadAttention) and sub.in_proj_weight is not None and sub.in_proj_weight.shape[1] % 4 == 0:
            targets[f"{name}.in_proj_weight"] = sub.in_proj_weight
    return targets


def _input_last(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] stays; conv [out, in, kh, kw] -> [out, kh, kw, in]: 2:4 runs along input channels."""
    return weight if weight.dim() == 2 else weight.permute(0, 2, 3, 1)


def mask_24(weight: torch.Tensor) -> torch.Tensor:
    """1 for the 2 largest magnitudes in each group of 4 consecutive input weights, 0 for the others."""
    w = _input_last(weight.detach())
    groups = w.abs().reshape(-1, 4)
    mask = torch.zeros_like(groups)
    mask.scatter_(1, groups.topk(2, dim=1).indices, 1.0)
    mask = mask.reshape(w.shape)
    return mask if weight.dim() == 2 else mask.permute(0, 3, 1, 2)


@torch.no_grad()
def apply_24_sparsity(module: nn.Module) -> dict[str, torch.Tensor]:
    masks = {}
    for name, weight in sparsity_targets(module).items():
        masks[name] = mask_24(weight).contiguous()
        weight.mul_(masks[name])
    return masks


def is_24_sparse(weight: torch.Tensor) -> bool:
    groups = _input_last(weight.detach()).reshape(-1, 4)
    return bool(((groups == 0).sum(dim=1) >= 2).all())


def layers_satisfying_24(module: nn.Module) -> list[str]:
    return [name for name, weight in sparsity_targets(module).items() if is_24_sparse(weight)]


# --- recovery ---------------------------------------------------------------------------------------

def _distillation_images(ctx: ExportContext, count: int) -> torch.Tensor:
    preprocess = ctx.checkpoint.preprocess
    prepared, _ = load_images(None, count, preprocess, DISTILL_SEED_BASE + ctx.config.seed * 1_000)
    return torch.from_numpy(normalize(prepared, preprocess)).float()


def distill(student: nn.Module, teacher: nn.Module, images: torch.Tensor, masks: dict[str, torch.Tensor],
            config: PruneConfig) -> list[float]:
    """A few AdamW steps pulling the student's outputs to the teacher's; 2:4 masks re-applied each step.

    Both stay in eval mode: BN statistics were re-estimated already and must not drift on tiny batches.
    """
    if config.recovery_steps == 0:
        return []
    with torch.no_grad():
        targets = teacher.eval()(images)
    student.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    weights = dict(_named_weights(student, masks))
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(config.recovery_steps):
        idx = torch.randint(len(images), (min(config.batch_size, len(images)),), generator=generator)
        out = student(images[idx])
        loss = (F.mse_loss(out["ordinal_logits"], targets["ordinal_logits"][idx])
                + F.mse_loss(out["saliency_logits"], targets["saliency_logits"][idx])
                + (1.0 - F.cosine_similarity(out["embedding"], targets["embedding"][idx], dim=-1)).mean())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for name, mask in masks.items():
                weights[name].mul_(mask)
        losses.append(round(loss.item(), 6))
    return losses


def _named_weights(model: nn.Module, masks: dict[str, torch.Tensor]):
    targets = sparsity_targets(model.backbone)
    return ((name, targets[name]) for name in masks)


# --- measurement ------------------------------------------------------------------------------------

@torch.no_grad()
def predict_outputs(model: nn.Module, inputs: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(inputs), batch_size):
        out = model(torch.from_numpy(inputs[start:start + batch_size]).float())
        for name in model.output_names:
            parts.setdefault(name, []).append(out[name].float().numpy())
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def _fidelity(ctx: ExportContext, candidate: dict[str, np.ndarray]) -> dict[str, float]:
    bank = ctx.checkpoint.bank.embeddings if ctx.checkpoint.bank is not None else None
    checks = compare(ctx.reference_outputs, candidate, ctx.checkpoint.grading, PRUNE_THRESHOLDS, bank)
    return {c.name: round(c.value, 6) for c in checks}


def count_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one image: Linear, Conv2d and attention (projections and both matmuls).

    Hooks see the shapes each layer really runs at; attention modules that call the functional
    kernel (their projections never run as modules) are counted analytically from their input.
    """
    total = [0]
    hooks = [m.register_forward_hook(_mac_hook(total)) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention, AttentionPool2d))]
    try:
        model.eval()(torch.zeros(1, 3, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
    return int(total[0])


def _mac_hook(total: list[int]) -> Callable:
    def hook(module, inputs, output):
        total[0] += _layer_macs(module, inputs[0], output)
    return hook


def _layer_macs(module: nn.Module, x: torch.Tensor, output) -> int:
    if isinstance(module, nn.MultiheadAttention):
        length = x.shape[1] if module.batch_first else x.shape[0]
        dim = module.embed_dim
        return length * dim * 3 * dim + 2 * length * length * dim + length * dim * dim
    if isinstance(module, AttentionPool2d):
        length, channels = x.shape[2] * x.shape[3] + 1, x.shape[1]
        return 3 * length * channels * channels + 2 * length * length * channels + length * channels * module.c_proj.out_features
    if isinstance(module, nn.Conv2d):
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return (output.numel() // module.out_features) * module.in_features * module.out_features


def _onnx_bytes(ctx: ExportContext, model: nn.Module, name: str) -> int:
    """Size of the FP32 ONNX graph of `model`, exported exactly as export_onnx_fp32 does, in scratch space."""
    from edgeretina.export.onnx_steps import export_onnx_fp32

    work = ctx.work / f"prune-{name}"
    work.mkdir(parents=True, exist_ok=True)
    scratch = dataclasses.replace(ctx, work=work, checkpoint=dataclasses.replace(ctx.checkpoint, model=model),
                                  export_info={}, log=lambda _: None)
    export_onnx_fp32(scratch)
    return int(scratch.export_info["fp32_onnx_bytes"])
