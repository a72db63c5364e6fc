"""The vision backbone: its config (which open_clip architecture, weights, input size) and the module
that gives a pooled embedding and patch tokens in one pass, whatever the tower.

How each kind of tower gives its tokens is in training/towers.py; how a backbone is created from its
config (presets, pretrained weights, the text tower) is in training/factory.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn

from edgeretina.errors import ConfigError
from edgeretina.training.towers import adapter_for

_CONFIG_KEYS = ("name", "pretrained", "image_size")


@dataclass(frozen=True)
class BackboneConfig:
    """Which open_clip architecture, which weights, which input size.

    name: an open_clip model name (``open_clip.list_models()``) or one of our presets
        (``edgeretina-tiny-vit``, ``edgeretina-tiny-rn``); ``hf-hub:``/``local-dir:`` names pass through.
    pretrained: None for random init, a local open_clip checkpoint file, or an open_clip tag
        (downloads from the hub).
    image_size: square input size overriding the architecture's; a ViT's position embeddings are
        interpolated from the checkpoint (or initialised at that size), a ModifiedResNet's attention-pool
        position embeddings likewise. Must be a multiple of the patch size (ViT) or of 32 (ResNet).
    """

    name: str = "edgeretina-tiny-vit"
    pretrained: str | None = None
    image_size: int | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"backbone name must be a non-empty string, got {self.name!r}")
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained):
            raise ConfigError(f"backbone pretrained must be None or a non-empty string, got {self.pretrained!r}")
        if self.image_size is not None and (
                isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 16):
            raise ConfigError(f"backbone image_size must be None or an integer >= 16, got {self.image_size!r}")

    def to_dict(self) -> dict:
        return {"name": self.name, "pretrained": self.pretrained, "image_size": self.image_size}

    @classmethod
    def from_dict(cls, data: dict) -> "BackboneConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"backbone config must be a mapping, got {type(data).__name__}")
        unknown = set(data) - set(_CONFIG_KEYS)
        if unknown:
            raise ConfigError(f"unknown backbone config keys: {sorted(unknown)} (known: {list(_CONFIG_KEYS)})")
        return cls(**data)



class VisionBackbone(nn.Module):
    """Wraps an open_clip image tower; ``forward(images) -> (pooled [B, D], tokens [B, h*w, D])``.

    Both outputs are in the joint space and not normalised. Tokens are in row-major grid order, so
    ``tokens.reshape(B, h, w, D)`` is the map. The wrapped tower is ``self.visual`` (open_clip's
    attribute name, so its state-dict keys read ``visual.*`` as in an open_clip checkpoint).

    Attributes: embed_dim (D), image_size, grid_size (h, w), mean, std (the tower's open_clip
    preprocess config), kind ("vit" | "resnet" | "timm") and token_path (how the tokens were projected,
    for manifests). Raises ConfigError for a tower it cannot take patch tokens from.
    """

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.visual = tower
        adapter = self.adapter = adapter_for(tower)   # fixed at construction: forward traces to one graph
        self.kind, self.token_path = adapter.kind, adapter.token_path
        self.image_size, self.grid_size, self.embed_dim = adapter.image_size, adapter.grid_size, adapter.embed_dim
        preprocess = open_clip.get_model_preprocess_cfg(tower) or {}
        self.mean = tuple(float(v) for v in preprocess.get("mean", OPENAI_DATASET_MEAN))
        self.std = tuple(float(v) for v in preprocess.get("std", OPENAI_DATASET_STD))

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapter.forward(self.visual, images)
