"""Losses for the grader's heads: CORAL on the ordinal head, focal loss (with label smoothing) on the
prototype logits, multiple-instance loss on the patch saliency, BCE + Dice on the lesion head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgeretina.errors import ConfigError
from edgeretina.grades import NUM_GRADES


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms and their settings.

    prototype: weight of the focal loss on the prototype logits (Lin et al. 2017). focal_gamma 0 makes it
    plain cross-entropy; 2.0, the paper's choice, down-weights the many easy grade-0 photographs.
    label_smoothing: of the prototype targets (0.05 spreads 5 % of each target over all five grades).
    Raises ConfigError for negative weights, a negative gamma or a smoothing outside [0, 1).
    """

    coral: float = 1.0
    prototype: float = 0.5
    saliency: float = 0.2      # multiple-instance loss on the patch disease evidence
    saliency_top_k: int = 4    # patches averaged for the image-level "any DR" evidence
    lesion: float = 1.0        # patch-level lesion head, when lesion targets exist
    focal_gamma: float = 2.0
    label_smoothing: float = 0.05

    def __post_init__(self):
        for name in ("coral", "prototype", "saliency", "lesion", "focal_gamma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss {name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.saliency_top_k < 1:
            raise ConfigError(f"saliency_top_k must be at least 1, got {self.saliency_top_k}")


def coral_targets(grades: torch.Tensor) -> torch.Tensor:
    """[B] grades -> [B, K-1] binary targets 1[grade > k]."""
    ks = torch.arange(NUM_GRADES - 1, device=grades.device)
    return (grades.unsqueeze(1) > ks).float()


def coral_loss(ordinal_logits: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(ordinal_logits, coral_targets(grades))


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Multi-class focal loss, mean over the batch: -sum_c q_c (1 - p_c)^gamma log p_c, where p is the
    softmax of `logits` [B, C] and q the (smoothed) one-hot target: (1 - eps) on the target class plus
    eps / C on every class. gamma = 0 gives F.cross_entropy(logits, targets, label_smoothing=eps)."""
    log_p = F.log_softmax(logits, dim=-1)
    classes = logits.shape[-1]
    q = F.one_hot(targets, classes).to(log_p.dtype) * (1.0 - label_smoothing) + label_smoothing / classes
    weight = (1.0 - log_p.exp()).clamp(min=0.0).pow(gamma) if gamma else 1.0
    return -(q * weight * log_p).sum(dim=-1).mean()


LESION_POS_WEIGHT = 5.0   # BCE weight of a lesion cell against a background cell (presence thresholds are fitted after)
LESION_HARD_NEGATIVE_WEIGHT = 5.0   # ... of a type's absence on a cell that holds another lesion type


def saliency_mil_loss(saliency_logits: torch.Tensor, grades: torch.Tensor, top_k: int) -> torch.Tensor:
    """The top-k patches must carry disease evidence iff the image shows any DR (weak supervision)."""
    flat = saliency_logits.flatten(1)
    k = min(top_k, flat.shape[1])
    evidence = flat.topk(k, dim=1).values.mean(dim=1)
    return F.binary_cross_entropy_with_logits(evidence, (grades > 0).float())


def lesion_loss(lesion_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SiAN's dual loss on a lesion map [B, L, h, w]: BCE for every cell (lesion cells and the cells of other
    lesion types weighted up, lesion_cell_weights: a type covers a few % of the cells) plus soft Dice per image and lesion type on the
    maps, which keeps rare, tiny lesions (a microaneurysm is one patch of 49) from being drowned by the
    background, plus soft Dice per lesion type over the batch on the max-pooled image-level presence, which
    asks the map's peak to say whether the image has the lesion at all. With masks the presence of an image
    that has the lesion is its peak over the lesion's own cells: pooled over every cell, the presence could
    be bought by one fixed cell lighting up whenever the image looks diseased (seen: exudate maps peaking at
    the same cell of every grade 3-4 image, pointing 0.16), instead of by the lesions. Image-level targets
    [B, L] (weak supervision) get the presence terms alone (lesion_presence_loss)."""
    if targets.dim() == 2:
        return lesion_presence_loss(lesion_logits, targets)
    bce = F.binary_cross_entropy_with_logits(lesion_logits, targets, weight=lesion_cell_weights(targets))
    probs = torch.sigmoid(lesion_logits).flatten(2)
    flat = targets.flatten(2)
    map_dice = _soft_dice(probs, flat, dim=-1)                                  # [B, L]
    present = flat.amax(dim=-1)                                                 # [B, L]
    presence_dice = _soft_dice(earned_presence(probs, flat).t(), present.t(), dim=-1)   # [L] over the batch
    return bce + map_dice.mean() + presence_dice.mean()


def lesion_cell_weights(targets: torch.Tensor) -> torch.Tensor:
    """BCE weight of every cell of every type [B, L, h, w]: LESION_POS_WEIGHT where the type is, and as much
    where it is not but another lesion type is (a hard negative: seen, 24 of 25 exudate misses peaked on a
    cotton-wool spot, the other bright lesion), 1 on background."""
    other_lesion = (1.0 - targets) * targets.amax(dim=1, keepdim=True)
    return 1.0 + (LESION_POS_WEIGHT - 1.0) * targets + (LESION_HARD_NEGATIVE_WEIGHT - 1.0) * other_lesion


def earned_presence(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B, L] image-level presence from cell probabilities and targets [B, L, N]: the peak over the lesion's
    own cells where the image has the lesion, the peak over every cell where it has not."""
    return torch.where(targets.amax(dim=-1) > 0, (probs * targets).amax(dim=-1), probs.amax(dim=-1))


def lesion_presence_loss(lesion_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Weak supervision from image-level labels [B, L]: BCE and batch soft Dice on each type's max-pooled
    logit. Multiple-instance learning: a labelled image must have one cell that shows the lesion, an
    unlabelled image none, and which cells light up is left to the model — where it puts them is the weak
    localisation (TWLR, CLPI)."""
    peaks = lesion_logits.flatten(2).amax(dim=-1)                                # [B, L]
    bce = F.binary_cross_entropy_with_logits(peaks, labels)
    return bce + _soft_dice(torch.sigmoid(peaks).t(), labels.t(), dim=-1).mean()


def _soft_dice(probs: torch.Tensor, targets: torch.Tensor, dim: int) -> torch.Tensor:
    return 1.0 - (2.0 * (probs * targets).sum(dim) + 1.0) / (probs.sum(dim) + targets.sum(dim) + 1.0)


_WEIGHT_OF = {"shallow": "saliency", "lesion_coarse": "lesion"}   # a loss part -> the LossWeights field weighing it


def grader_loss(outputs: dict[str, torch.Tensor], grades: torch.Tensor, weights: LossWeights,
                lesion_targets: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    parts = {
        "coral": coral_loss(outputs["ordinal_logits"].float(), grades),
        "prototype": focal_loss(outputs["prototype_logits"].float(), grades, weights.focal_gamma,
                                weights.label_smoothing),
        "saliency": saliency_mil_loss(outputs["saliency_logits"].float(), grades, weights.saliency_top_k),
    }
    if "shallow_logits" in outputs:   # gated saliency: the shallow layer's evidence learns like the deep one
        parts["shallow"] = saliency_mil_loss(outputs["shallow_logits"].float(), grades, weights.saliency_top_k)
    if lesion_targets is not None and "lesion_logits" in outputs:
        parts["lesion"] = lesion_loss(outputs["lesion_logits"].float(), lesion_targets)
        if "lesion_coarse_logits" in outputs:   # fine lesion head: the patch grid learns too (a cell has a
            coarse = outputs["lesion_coarse_logits"].float()   # lesion when any of its fine cells has)
            coarse_targets = lesion_targets
            if lesion_targets.dim() == 4:
                scale = lesion_targets.shape[-1] // coarse.shape[-1]
                coarse_targets = F.max_pool2d(lesion_targets, scale, scale)
            parts["lesion_coarse"] = lesion_loss(coarse, coarse_targets)
    total = sum(getattr(weights, _WEIGHT_OF.get(name, name)) * value for name, value in parts.items())
    return total, {name: float(value.detach()) for name, value in parts.items()}
