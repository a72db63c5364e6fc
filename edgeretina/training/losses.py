"""Losses for the grader's heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgeretina.grades import NUM_GRADES


@dataclass(frozen=True)
class LossWeights:
    coral: float = 1.0
    prototype: float = 0.5
    saliency: float = 0.2      # multiple-instance loss on the patch disease evidence
    saliency_top_k: int = 4    # patches averaged for the image-level "any DR" evidence
    lesion: float = 1.0        # patch-level lesion head, when lesion targets exist


def coral_targets(grades: torch.Tensor) -> torch.Tensor:
    """[B] grades -> [B, K-1] binary targets 1[grade > k]."""
    ks = torch.arange(NUM_GRADES - 1, device=grades.device)
    return (grades.unsqueeze(1) > ks).float()


def coral_loss(ordinal_logits: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(ordinal_logits, coral_targets(grades))


def saliency_mil_loss(saliency_logits: torch.Tensor, grades: torch.Tensor, top_k: int) -> torch.Tensor:
    """The top-k patches must carry disease evidence iff the image shows any DR (weak supervision)."""
    flat = saliency_logits.flatten(1)
    k = min(top_k, flat.shape[1])
    evidence = flat.topk(k, dim=1).values.mean(dim=1)
    return F.binary_cross_entropy_with_logits(evidence, (grades > 0).float())


def lesion_loss(lesion_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dual loss of the lesion segmentation literature (L-Net, SiAN): BCE for every patch plus soft Dice
    per lesion type, which keeps rare, tiny lesions (a microaneurysm is one patch of 49) from being
    drowned by the background."""
    bce = F.binary_cross_entropy_with_logits(lesion_logits, targets)
    probs = torch.sigmoid(lesion_logits).flatten(2)
    flat = targets.flatten(2)
    dice = 1.0 - (2.0 * (probs * flat).sum(-1) + 1.0) / (probs.sum(-1) + flat.sum(-1) + 1.0)
    return bce + dice.mean()


def grader_loss(outputs: dict[str, torch.Tensor], grades: torch.Tensor, weights: LossWeights,
                lesion_targets: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    parts = {
        "coral": coral_loss(outputs["ordinal_logits"].float(), grades),
        "prototype": F.cross_entropy(outputs["prototype_logits"].float(), grades, label_smoothing=0.05),
        "saliency": saliency_mil_loss(outputs["saliency_logits"].float(), grades, weights.saliency_top_k),
    }
    if lesion_targets is not None and "lesion_logits" in outputs:
        parts["lesion"] = lesion_loss(outputs["lesion_logits"].float(), lesion_targets)
    total = sum(getattr(weights, name) * value for name, value in parts.items())
    return total, {name: float(value.detach()) for name, value in parts.items()}
