"""The vision backbone: its config (which open_clip architecture or timm model, weights, input size) and the
module that gives a pooled embedding and patch tokens in one pass, whatever the tower.

How each kind of tower gives its tokens is in training/towers.py; how a backbone is created from its
config (presets, pretrained weights, the text tower) is in training/factory.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgeretina.errors import ConfigError
from edgeretina.training.towers import adapter_for

_CONFIG_KEYS = ("name", "pretrained", "image_size")


@dataclass(frozen=True)
class BackboneConfig:
    """Which architecture, which weights, which input size.

    name: an open_clip model name (``open_clip.list_models()``) or one of our presets
        (``edgeretina-tiny-vit``, ``edgeretina-tiny-rn``); ``hf-hub:``/``local-dir:`` names pass through.
        Or ``timm/<timm model name>`` for a timm model used directly as the image tower, without a text
        tower (its grade and lesion prototypes are then learned): e.g. ``timm/vit_large_patch16_224``
        (RETFound-MAE's ViT-L/16), ``timm/vit_small_patch14_reg4_dinov2`` at 392 px (RETFound-Green),
        ``timm/convnext_tiny``, and timm's tiny ``timm/test_vit``, ``timm/test_resnet`` for tests.
    pretrained: None for random init; a local weights file (open_clip or timm state dict, ``.safetensors``
        or torch, bare or wrapped as {"state_dict"|"model": ...}, ``module.`` prefixes; it must fit the
        architecture exactly, a classifier head aside); an open_clip tag (downloads from the hub); or
        ``timm`` for timm's own pretrained weights of a ``timm/`` name (downloads from the hub).
    image_size: square input size overriding the architecture's; a ViT's position embeddings are
        interpolated from the checkpoint (or initialised at that size), a ModifiedResNet's attention-pool
        position embeddings likewise. Must be a multiple of the patch size (ViT) or of the total stride
        (32 for the ResNets and ConvNeXts).
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
    """Wraps an image tower; ``forward(images) -> (pooled [B, D], tokens [B, h*w, D])``.

    Both outputs are in the joint space (of an open_clip tower; a timm model's own feature space) and
    not normalised. Tokens are in row-major grid order, so
    ``tokens.reshape(B, h, w, D)`` is the map. The wrapped tower is ``self.visual`` (open_clip's
    attribute name, so its state-dict keys read ``visual.*`` as in an open_clip checkpoint).

    Attributes: embed_dim (D), image_size, grid_size (h, w), mean, std (the tower's open_clip
    preprocess config, or timm's data config of a timm model), kind ("vit" | "resnet" | "timm": open_clip's
    TimmModel and a timm model alike) and token_path (how the tokens were projected, for manifests; it
    starts "timm-direct" for a timm model). Raises ConfigError for a tower it cannot take patch tokens from.
    """

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.visual = tower
        adapter = self.adapter = adapter_for(tower)   # fixed at construction: forward traces to one graph
        self.kind, self.token_path = adapter.kind, adapter.token_path
        self.image_size, self.grid_size, self.embed_dim = adapter.image_size, adapter.grid_size, adapter.embed_dim
        self.mean, self.std = adapter.mean, adapter.std

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward(self, images: torch.Tensor, shallow: bool = False, fine: bool = False) -> tuple[torch.Tensor, ...]:
        """(pooled, tokens), or with shallow (pooled, tokens, shallow tokens [B, h*w, shallow_dim]) in one
        pass, and with fine the fine map [B, shallow_dim, fine_scale*h, fine_scale*w] fourth; ConfigError for
        a path the tower does not have. Always called as the module (never adapter methods directly), so
        exported graphs keep the backbone's scope for the INT8 steps."""
        if shallow or fine:
            return self.adapter.forward_layers(self.visual, images, fine=fine)
        return self.adapter.forward(self.visual, images)

    @property
    def fine_scale(self) -> int:
        """The fine map's cells per grid cell along each side (0: this tower has no fine path)."""
        return self.adapter.fine_scale

    @property
    def shallow_dim(self) -> int:
        """Channels of the shallow tokens (0: this tower has no shallow path)."""
        return self.adapter.shallow_dim
