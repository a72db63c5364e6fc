"""Freezing the backbone: fine-tune everything, only the last N blocks, or nothing (a linear probe).

`TrainConfig.trainable_blocks`: None fine-tunes the whole tower; 0 freezes all of it, so only the grader's
heads (projection, prototype scale, CORAL, saliency offset, lesion head) learn — RetinaScan's linear probe
on a frozen CLIP tower; N > 0 trains the tower's last N blocks together with what follows them (the
tower's head: a ViT's ln_post and proj, a ModifiedResNet's attention pool, a timm trunk's final norm and
head and open_clip's projection head). The stem (patch or convolutional embedding, class and position
embeddings) stays frozen unless N reaches the number of blocks, which is the same as None.

The ordered blocks of each tower kind:
- open_clip VisionTransformer: `transformer.resblocks`;
- open_clip ModifiedResNet: `layer1` .. `layer4`;
- open_clip TimmModel: the timm trunk's `blocks`, `stages`, `layers` or `layer1`..`layerN`; the trunk's
  children before that container are the stem, those after it (and the tower's `head`) the head;
- a timm model used directly (a `timm/<name>` backbone): the same split of the model itself — the stem is
  the patch or convolutional embedding with the class/position/register tokens, the head the norms,
  pooling and head after the blocks.
N = 0 freezes any tower, whether its blocks are known or not.

Frozen modules are kept in eval mode while training (`keep_frozen_in_eval` after every `model.train()`):
BatchNorm statistics do not drift and dropout does not perturb what the frozen layers compute, so a
frozen tower computes in training exactly what it computes at inference — and what the feature cache
(training/feature_cache.py) stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

from edgeretina.errors import ConfigError
from edgeretina.training.towers import is_timm_model

_TIMM_BLOCK_CONTAINERS = ("blocks", "stages", "layers")


@dataclass
class TowerParts:
    """A tower split in three, in forward order; each part a list of modules and loose parameters."""

    stem: list[nn.Module | nn.Parameter]
    blocks: list[nn.Module]
    head: list[nn.Module | nn.Parameter]


@dataclass
class FreezePlan:
    """What `freeze_backbone` did. frozen_modules: the modules to hold in eval mode while training."""

    trainable_blocks: int | None          # as requested
    total_blocks: int
    frozen_modules: list[nn.Module] = field(default_factory=list)
    backbone_parameters: int = 0
    trainable_backbone_parameters: int = 0

    @property
    def fine_tunes_everything(self) -> bool:
        return self.trainable_backbone_parameters == self.backbone_parameters

    @property
    def backbone_frozen(self) -> bool:
        return self.trainable_backbone_parameters == 0

    def describe(self, model: nn.Module) -> str:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if self.fine_tunes_everything:
            what = "the whole backbone"
        elif self.backbone_frozen:
            what = "backbone frozen (heads only)"
        else:
            what = f"the last {self.trainable_blocks} of {self.total_blocks} backbone blocks"
        return (f"trainable: {what}; {trainable:,} of {total:,} parameters "
                f"({self.trainable_backbone_parameters:,} of {self.backbone_parameters:,} in the backbone)")


def tower_parts(tower: nn.Module) -> TowerParts:
    """The stem, ordered blocks and head of an open_clip image tower or a timm model; ConfigError for other
    towers and for timm models without a known block container."""
    if isinstance(tower, VisionTransformer):
        stem = [tower.conv1, tower.ln_pre, tower.class_embedding, tower.positional_embedding]
        head = [m for m in (tower.attn_pool, tower.ln_post, tower.proj) if m is not None]
        return TowerParts(stem=stem, blocks=list(tower.transformer.resblocks), head=head)
    if isinstance(tower, ModifiedResNet):
        blocks = [tower.layer1, tower.layer2, tower.layer3, tower.layer4]
        stem = [m for name, m in tower.named_children() if not name.startswith("layer") and name != "attnpool"]
        return TowerParts(stem=stem, blocks=blocks, head=[tower.attnpool])
    if isinstance(tower, TimmModel):
        parts = _timm_trunk_parts(tower.trunk)
        parts.head.append(tower.head)
        return parts
    if is_timm_model(tower):
        return _timm_trunk_parts(tower)
    raise ConfigError(f"cannot freeze blocks of a {qualified_name(tower)} tower: supported are open_clip's "
                      "VisionTransformer, ModifiedResNet and TimmModel, and timm models (timm/<name> backbones); "
                      "trainable_blocks 0 (everything frozen) or None (nothing frozen) work for any tower")


def qualified_name(module: nn.Module) -> str:
    """module.Class of a tower, so that open_clip's and timm's VisionTransformer are told apart in messages."""
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _timm_trunk_parts(trunk: nn.Module) -> TowerParts:
    children = list(trunk.named_children())
    names = [name for name, _ in children]
    container = next((name for name in _TIMM_BLOCK_CONTAINERS if name in names), None)
    if container is not None:
        index = names.index(container)
        blocks = list(getattr(trunk, container).children())
        first, last = index, index
    else:
        layers = [i for i, name in enumerate(names) if name.startswith("layer") and name[5:].isdigit()]
        if not layers:
            raise ConfigError(f"timm model {qualified_name(trunk)} has none of {list(_TIMM_BLOCK_CONTAINERS)} nor "
                              f"layer1..layerN (children: {names})")
        blocks = [children[i][1] for i in layers]
        first, last = layers[0], layers[-1]
    stem = [m for _, m in children[:first]] + list(trunk.parameters(recurse=False))
    return TowerParts(stem=stem, blocks=blocks, head=[m for _, m in children[last + 1:]])


def freeze_backbone(backbone: nn.Module, trainable_blocks: int | None) -> FreezePlan:
    """Set requires_grad on a VisionBackbone's tower for `trainable_blocks` (see the module docstring)
    and return the plan. Raises ConfigError for a negative count, or a positive one on a tower whose blocks
    are unknown."""
    tower = backbone.visual
    all_params = list(tower.parameters())
    total = sum(p.numel() for p in all_params)
    if trainable_blocks is None:
        for p in all_params:
            p.requires_grad_(True)
        return FreezePlan(None, _block_count(tower), [], total, total)
    if trainable_blocks < 0:
        raise ConfigError(f"trainable_blocks must be None (everything), 0 (frozen) or a positive count, "
                          f"got {trainable_blocks}")
    if trainable_blocks == 0:  # needs no block list: any tower can be frozen whole
        for p in all_params:
            p.requires_grad_(False)
        return FreezePlan(0, _block_count(tower), [tower], total, 0)
    parts = tower_parts(tower)
    if trainable_blocks >= len(parts.blocks):
        plan = freeze_backbone(backbone, None)
        plan.trainable_blocks = trainable_blocks
        return plan
    for p in all_params:
        p.requires_grad_(False)
    trained = parts.blocks[len(parts.blocks) - trainable_blocks:] + parts.head
    for part in trained:
        for p in _parameters(part):
            p.requires_grad_(True)
    frozen = [m for m in parts.stem + parts.blocks[:len(parts.blocks) - trainable_blocks] if isinstance(m, nn.Module)]
    trainable = sum(p.numel() for p in all_params if p.requires_grad)
    return FreezePlan(trainable_blocks, len(parts.blocks), frozen, total, trainable)


def keep_frozen_in_eval(plan: FreezePlan) -> None:
    """Put the plan's frozen modules back in eval mode (call after every `model.train()`)."""
    for module in plan.frozen_modules:
        module.eval()


def _parameters(part: nn.Module | nn.Parameter) -> list[nn.Parameter]:
    return [part] if isinstance(part, nn.Parameter) else list(part.parameters())


def _block_count(tower: nn.Module) -> int:
    try:
        return len(tower_parts(tower).blocks)
    except ConfigError:
        return 0
