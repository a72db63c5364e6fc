"""Compressing a trained GraderModel in torch: structured channel pruning, 2:4 semi-structured sparsity,
BN recalibration, recovery by distillation from the unpruned model, and parameter / MAC counts.

- ViT towers (open_clip ``VisionTransformer``): each block's MLP keeps the hidden channels with the
  largest ``||c_fc row|| * ||c_proj column||`` (the channel's gain through the MLP) in new, narrower
  ``nn.Linear`` layers. Attention heads are kept (``nn.MultiheadAttention`` packs q, k, v and ties the
  head width to the model width; removing heads needs a custom attention module and is not done yet).
- ModifiedResNet towers: each Bottleneck keeps the inner channels (conv1 out / conv2 in+out / conv3 in)
  with the largest ``|BN gamma| * ||conv filter|| * ||next conv input slice||`` (network slimming,
  Liu et al. 2017, with the weight norms breaking the tie of untrained gammas); BN statistics are then
  re-estimated because conv2/conv3 now see fewer inputs.
- 2:4 sparsity for Ampere/Orin sparse tensor cores: in every group of 4 consecutive input weights of a
  backbone Linear/Conv (and attention in-projection), the 2 of smallest magnitude are zeroed and kept at
  zero through the recovery fine-tune by a mask. The graph stays dense; TensorRT chooses sparse kernels.
- Recovery: a few AdamW steps pulling the student's ordinal logits, saliency logits (MSE) and embeddings
  (1 - cosine) to the unpruned teacher's.

The export step that runs this on a checkpoint, gates it and records it is edgeretina/export/prune.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, Bottleneck, ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn

from edgeretina.errors import ConfigError
from edgeretina.training.freezing import qualified_name

# Channel counts stay multiples of 8: tensor cores and AMX tile by 8/16, and 2:4 groups need 4.
CHANNEL_ALIGN = 8


@dataclass(frozen=True)
class ChannelPruning:
    """Fractions of channels kept (1.0 = that kind is not pruned); counts stay multiples of CHANNEL_ALIGN."""

    mlp_ratio: float = 0.5              # ViT: MLP hidden channels
    conv_ratio: float = 0.5             # ResNet: Bottleneck inner channels

    def __post_init__(self):
        for name in ("mlp_ratio", "conv_ratio"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {value}")


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 40                     # AdamW steps (0 = no recovery)
    batch_size: int = 8
    lr: float = 1e-4

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"distillation needs steps >= 0, batch_size >= 1 and lr > 0, got {self}")


# --- structured pruning ----------------------------------------------------------------------------

def prune_structure(model: nn.Module, channels: ChannelPruning) -> dict:
    """Narrow the backbone in place; returns what was kept per layer (for the manifest)."""
    tower = model.backbone.visual
    if isinstance(tower, VisionTransformer):
        return {"kind": "vit-mlp", "blocks": [_prune_mlp(block.mlp, channels.mlp_ratio)
                                              for block in tower.transformer.resblocks]}
    if isinstance(tower, ModifiedResNet):
        blocks = [m for m in tower.modules() if isinstance(m, Bottleneck)]
        return {"kind": "resnet-bottleneck", "blocks": [_prune_bottleneck(b, channels.conv_ratio) for b in blocks]}
    raise ConfigError("structured pruning supports open_clip's VisionTransformer and ModifiedResNet towers, "
                      f"not {qualified_name(tower)}")


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


def _conv_select(conv: nn.Conv2d, out_keep: torch.Tensor | None = None,
                 in_keep: torch.Tensor | None = None) -> nn.Conv2d:
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
    """Re-estimate BN running statistics (cumulative average) on `images`; a no-op for a model without BN.

    Needed after bottleneck pruning: conv2/conv3 now see fewer inputs.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return
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
        elif (isinstance(sub, nn.MultiheadAttention) and sub.in_proj_weight is not None
              and sub.in_proj_weight.shape[1] % 4 == 0):
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

def distill(student: nn.Module, teacher: nn.Module, images: torch.Tensor, masks: dict[str, torch.Tensor],
            config: DistillConfig) -> list[float]:
    """A few AdamW steps pulling the student's outputs to the teacher's; 2:4 masks re-applied each step.

    Both stay in eval mode: BN statistics were re-estimated already and must not drift on tiny batches.
    Returns the loss of every step.
    """
    if config.steps == 0:
        return []
    with torch.no_grad():
        targets = teacher.eval()(images)
    student.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    weights = dict(_named_weights(student, masks))
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(config.steps):
        idx = torch.randint(len(images), (min(config.batch_size, len(images)),), generator=generator)
        loss = _distillation_loss(student(images[idx]), targets, idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for name, mask in masks.items():
                weights[name].mul_(mask)
        losses.append(round(loss.item(), 6))
    return losses


def _distillation_loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                       idx: torch.Tensor) -> torch.Tensor:
    return (F.mse_loss(out["ordinal_logits"], targets["ordinal_logits"][idx])
            + F.mse_loss(out["saliency_logits"], targets["saliency_logits"][idx])
            + (1.0 - F.cosine_similarity(out["embedding"], targets["embedding"][idx], dim=-1)).mean())


def _named_weights(model: nn.Module, masks: dict[str, torch.Tensor]):
    targets = sparsity_targets(model.backbone)
    return ((name, targets[name]) for name in masks)


# --- measurement ------------------------------------------------------------------------------------

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
        return (3 * length * channels * channels + 2 * length * length * channels
                + length * channels * module.c_proj.out_features)
    if isinstance(module, nn.Conv2d):
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return (output.numel() // module.out_features) * module.in_features * module.out_features
