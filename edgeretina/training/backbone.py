"""The vision backbone: any open_clip image tower, giving a pooled embedding and patch tokens in one pass.

Both outputs live in CLIP's joint image-text space, so the cosine similarity of a patch token to a
text prototype is a saliency value (MaskCLIP, Zhou et al. 2022; CLPI). How the patch tokens reach
the joint space depends on the tower:

- open_clip ``VisionTransformer`` (ViT-B-16, ViT-B-32, edgeretina-tiny-vit): the tower's own
  ``output_tokens`` path returns the patch tokens after ``ln_post`` (or before it when
  ``final_ln_after_pool``, in which case we apply it), and we multiply them by the same ``proj`` that
  maps the class token to the joint space.
- open_clip ``ModifiedResNet`` (RN50, edgeretina-tiny-rn): the attention pool mixes
  ``c_proj(v_proj(x_i + pos_i))`` over the positions of the last feature map. Those value embeddings
  are our tokens, so the pooled output is exactly an attention-weighted mean of the tokens (of them and
  of the mean-feature query token). MaskCLIP takes the same path without the positional embedding.
- open_clip ``TimmModel`` (ConvNeXt, MobileCLIP, EVA, SigLIP, ...): every position of the trunk's
  final features goes through the trunk's own head and the adapter's projection as if it were a whole
  image of one position (a 1x1 map for CNNs; the token repeated in place of the prefix tokens for
  ViTs). Global pooling of one position is the identity, pointwise norms and linear/MLP projections
  apply per position, and an attention pool over identical keys returns the value of that token, so
  this is the MaskCLIP value path for attention-pooled heads (SigLIP's MAP head) too. It is exact
  (mean of tokens == pooled for average pooling) only where the head is linear after the pooling; for a
  head with a norm or MLP after the pooling the tokens are the per-position analogue. Adapters with a
  custom attention pool in the head (``timm_pool`` ``abs_attn``/``rot_attn``, no shipped config uses
  them) are refused with ConfigError.

open_clip's CoCa-style attentional poolers give query tokens, not patch tokens, and are refused.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

from edgeretina.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent / "model_configs"
_HUB_PREFIXES = ("hf-hub:", "local-dir:")
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
    for manifests).
    """

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.visual = tower
        if isinstance(tower, VisionTransformer):
            self.kind = "vit"
            self._setup_vit(tower)
        elif isinstance(tower, ModifiedResNet):
            self.kind = "resnet"
            self._setup_resnet(tower)
        elif isinstance(tower, TimmModel):
            self.kind = "timm"
            self._setup_timm(tower)
        else:
            raise ConfigError(
                f"unsupported open_clip image tower {type(tower).__name__}: "
                "supported are VisionTransformer, ModifiedResNet and TimmModel")
        preprocess = open_clip.get_model_preprocess_cfg(tower) or {}
        self.mean = tuple(float(v) for v in preprocess.get("mean", OPENAI_DATASET_MEAN))
        self.std = tuple(float(v) for v in preprocess.get("std", OPENAI_DATASET_STD))

    @property
    def num_tokens(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "vit":  # fixed at construction: not data-dependent, traces to one graph
            return self._forward_vit(images)
        if self.kind == "resnet":
            return self._forward_resnet(images)
        return self._forward_timm(images)

    # --- open_clip VisionTransformer -------------------------------------------------------------

    def _setup_vit(self, tower: VisionTransformer) -> None:
        if tower.attn_pool is not None:
            raise ConfigError("ViT towers with an attentional pooler (CoCa) give query tokens, not patch tokens")
        if tower.pool_type not in ("tok", "avg"):
            raise ConfigError(f"ViT pool_type {tower.pool_type!r} is not supported (need 'tok' or 'avg')")
        if not isinstance(tower.patch_dropout, nn.Identity):
            # Patch dropout would drop grid positions in training: saliency needs every patch.
            log.info("disabling patch dropout of the ViT tower: the saliency map needs every patch")
            tower.patch_dropout = nn.Identity()
        tower.output_tokens = True
        self.image_size = _square(tower.image_size)
        self.grid_size = tuple(int(g) for g in tower.grid_size)
        self.embed_dim = int(tower.proj.shape[1]) if tower.proj is not None else int(tower.ln_post.normalized_shape[0])
        ln = "ln_post" if tower.final_ln_after_pool else "ln_post (inside the tower)"
        self.token_path = f"vit: patch tokens -> {ln} -> proj"

    def _forward_vit(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tower = self.visual
        pooled, tokens = tower(images)  # tokens: before proj; after ln_post unless final_ln_after_pool
        if tower.final_ln_after_pool:
            tokens = tower.ln_post(tokens)
        if tower.proj is not None:
            tokens = tokens @ tower.proj
        return pooled, tokens

    # --- open_clip ModifiedResNet ----------------------------------------------------------------

    def _setup_resnet(self, tower: ModifiedResNet) -> None:
        self.image_size = _square(tower.image_size)
        side = _grid_side(tower.attnpool.positional_embedding.shape[0] - 1)
        self.grid_size = (side, side)
        self.embed_dim = int(tower.attnpool.c_proj.out_features)
        self.token_path = "resnet: layer4 map + attnpool pos -> attnpool.v_proj -> attnpool.c_proj (value path)"

    def _forward_resnet(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tower = self.visual
        x = tower.stem(images)
        x = tower.layer4(tower.layer3(tower.layer2(tower.layer1(x))))
        pool = tower.attnpool
        pooled = pool(x)
        features = x.flatten(2).transpose(1, 2) + pool.positional_embedding[1:].to(x.dtype)  # [B, h*w, C]
        tokens = pool.c_proj(pool.v_proj(features))
        return pooled, tokens

    # --- open_clip TimmModel ---------------------------------------------------------------------

    def _setup_timm(self, tower: TimmModel) -> None:
        if "pool" in dict(tower.head.named_children()):
            raise ConfigError("timm towers with an adapter attention pool (timm_pool abs_attn/rot_attn) "
                              "have no per-position path to the joint space")
        self.image_size = _square(tower.image_size)
        trunk = tower.trunk
        was_training = tower.training
        tower.eval()
        try:
            with torch.no_grad():
                features = trunk.forward_features(torch.zeros(1, 3, self.image_size, self.image_size))
        except RuntimeError as error:
            raise ConfigError(f"timm trunk {type(trunk).__name__} failed a probe forward at "
                              f"{self.image_size} px: {error}") from error
        finally:
            tower.train(was_training)
        if features.ndim == 4:
            self._timm_layout = "NHWC" if getattr(trunk, "output_fmt", "NCHW") == "NHWC" else "NCHW"
            self._timm_prefix = 0
            self._timm_channels = int(features.shape[-1] if self._timm_layout == "NHWC" else features.shape[1])
            hw = features.shape[1:3] if self._timm_layout == "NHWC" else features.shape[2:4]
            self.grid_size = (int(hw[0]), int(hw[1]))
        elif features.ndim == 3:
            self._timm_layout = "NLC"
            self._timm_prefix = int(getattr(trunk, "num_prefix_tokens", 0))
            self._timm_channels = int(features.shape[-1])
            self.grid_size = _token_grid(trunk, int(features.shape[1]) - self._timm_prefix)
        else:
            raise ConfigError(f"timm trunk {type(trunk).__name__} gives features of shape {tuple(features.shape)}")
        was_training = tower.training
        tower.eval()
        try:
            with torch.no_grad():
                pooled, tokens = self._forward_timm(torch.zeros(1, 3, self.image_size, self.image_size))
        except RuntimeError as error:
            raise ConfigError(f"timm tower {type(trunk).__name__}: its head does not apply per position "
                              f"({error})") from error
        finally:
            tower.train(was_training)
        self.embed_dim = int(pooled.shape[-1])
        if tokens.shape[-1] != self.embed_dim:
            raise ConfigError(f"timm tower tokens have dim {tokens.shape[-1]}, pooled has {self.embed_dim}")
        self.token_path = f"timm: each position ({self._timm_layout}) through trunk.forward_head and the adapter head"

    def _forward_timm(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trunk, head = self.visual.trunk, self.visual.head
        features = trunk.forward_features(images)
        pooled = head(trunk.forward_head(features))
        channels = self._timm_channels
        if self._timm_layout == "NCHW":
            positions = features.flatten(2).transpose(1, 2).reshape(-1, channels, 1, 1)
        elif self._timm_layout == "NHWC":
            positions = features.reshape(-1, 1, 1, channels)
        else:
            positions = features[:, self._timm_prefix:].reshape(-1, 1, channels)
            if self._timm_prefix:
                # The token stands in for the prefix tokens too: class-token, average and attention
                # pooling of identical tokens all return that token's own (value) path.
                positions = positions.expand(-1, self._timm_prefix + 1, channels)
        tokens = head(trunk.forward_head(positions))
        return pooled, tokens.reshape(-1, self.num_tokens, tokens.shape[-1])


@dataclass
class BackboneBuild:
    visual: VisionBackbone
    text_embeddings: torch.Tensor | None  # [N, D] L2-normalised, from the same model's text tower


def preset_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in PRESET_DIR.glob("*.json")))


def register_presets() -> None:
    """Register every JSON under training/model_configs with open_clip (idempotent)."""
    known = set(open_clip.list_models())
    if any(name not in known for name in preset_names()):
        open_clip.add_model_config(PRESET_DIR)


def build_backbone(config: BackboneConfig, texts: Sequence[str] | None = None) -> BackboneBuild:
    """Create the open_clip model, embed `texts` with its text tower, keep only the image tower.

    With ``pretrained=None`` the weights are random (seeding is the caller's business). The text tower
    runs in eval mode under no_grad and is dropped afterwards; the returned tower keeps the train/eval
    mode open_clip created it in (train).

    Raises ConfigError for an unknown model name (listing close names), an unknown pretrained tag or
    missing file, an image size the architecture cannot take, or an unsupported tower; CheckpointError
    when the weights cannot be downloaded or loaded.
    """
    register_presets()
    if isinstance(texts, str):
        raise ConfigError("texts must be a sequence of strings, not one string")
    model_cfg = _model_config(config.name)
    pretrained = _resolve_pretrained(config.name, config.pretrained)
    vision_cfg = (model_cfg or {}).get("vision_cfg", {})
    is_resnet = isinstance(vision_cfg.get("layers"), (list, tuple)) and not vision_cfg.get("timm_model_name")
    _check_image_size(config, vision_cfg, is_resnet)
    native_size = vision_cfg.get("image_size")
    # open_clip resizes a ViT's position embeddings when it loads a checkpoint at another size, but not
    # a ModifiedResNet's attention pool: load at the native size, then resize the pool ourselves.
    resize_resnet_after = (is_resnet and pretrained is not None and config.image_size is not None
                           and config.image_size != native_size)
    force_size = None if resize_resnet_after else config.image_size
    model = _create_model(config.name, pretrained, force_size)
    if resize_resnet_after:
        _resize_attnpool(model.visual, config.image_size)
    visual = VisionBackbone(model.visual)
    text_embeddings = None if texts is None else _encode_texts(model, config.name, list(texts), visual.embed_dim)
    del model  # drop the text tower
    return BackboneBuild(visual=visual, text_embeddings=text_embeddings)


def _model_config(name: str) -> dict[str, Any] | None:
    if name.startswith(_HUB_PREFIXES):
        return None  # open_clip resolves these itself (hf-hub needs the hub)
    cfg = open_clip.get_model_config(name.replace("/", "-"))
    if cfg is None:
        models = open_clip.list_models()
        lowered = {m.lower(): m for m in models}
        close = [lowered[m] for m in difflib.get_close_matches(name.lower(), list(lowered), n=5, cutoff=0.5)]
        hint = f"; close names: {close}" if close else ""
        raise ConfigError(f"unknown backbone {name!r}{hint} (open_clip.list_models() has {len(models)} names, "
                          f"our presets: {list(preset_names())})")
    return cfg


def _resolve_pretrained(name: str, pretrained: str | None) -> str | None:
    if pretrained is None or name.startswith(_HUB_PREFIXES):
        return None if pretrained is None else pretrained
    if os.path.isfile(pretrained):
        return pretrained
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        return pretrained
    raise ConfigError(f"pretrained {pretrained!r} is neither a file nor an open_clip tag of {name!r} "
                      f"(tags: {tags or 'none'})")


def _check_image_size(config: BackboneConfig, vision_cfg: dict, is_resnet: bool) -> None:
    size = config.image_size
    if size is None or not vision_cfg or vision_cfg.get("timm_model_name"):
        return  # timm towers are checked by the probe forward in VisionBackbone
    stride = 32 if is_resnet else vision_cfg.get("patch_size", 16)
    if isinstance(stride, (list, tuple)):
        stride = stride[0]
    if size % stride:
        raise ConfigError(f"image_size {size} of {config.name!r} must be a multiple of {stride}")


class _RandomInitNotice(logging.Filter):
    """open_clip warns on the root logger whenever it builds without pretrained weights; we do that on
    purpose (tests, the demo, and every checkpoint load, whose weights come right after)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def _create_model(name: str, pretrained: str | None, image_size: int | None) -> nn.Module:
    notice = _RandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        return open_clip.create_model(name, pretrained=pretrained, force_image_size=image_size)
    except RuntimeError as error:
        if pretrained is None:
            raise
        raise CheckpointError(f"could not load weights {pretrained!r} into {name!r}: {error}") from error
    finally:
        logging.getLogger().removeFilter(notice)


def _resize_attnpool(tower: ModifiedResNet, image_size: int) -> None:
    """Interpolate a ModifiedResNet's attention-pool position embeddings to a new input size."""
    pool = tower.attnpool
    old = pool.positional_embedding.detach()
    old_side, new_side = _grid_side(old.shape[0] - 1), image_size // 32
    grid = old[1:].reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_side * new_side, -1)
    pool.positional_embedding = nn.Parameter(torch.cat([old[:1], grid], dim=0))
    tower.image_size = image_size
    cfg = dict(getattr(tower, "preprocess_cfg", {}) or {})
    if cfg:
        cfg["size"] = (image_size, image_size)
        open_clip.set_model_preprocess_cfg(tower, cfg)


def _encode_texts(model: nn.Module, name: str, texts: list[str], dim: int) -> torch.Tensor:
    if not all(isinstance(t, str) for t in texts):
        raise ConfigError("texts must all be strings")
    if not texts:
        return torch.zeros(0, dim)
    tokenizer = open_clip.get_tokenizer(name)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            embeddings = model.encode_text(tokenizer(texts), normalize=True)
    finally:
        model.train(was_training)
    return embeddings.float().contiguous()


def _square(size) -> int:
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"only square inputs are supported, the tower takes {tuple(size)}")
        size = size[0]
    return int(size)


def _grid_side(count: int) -> int:
    side = int(round(math.sqrt(count)))
    if side * side != count:
        raise ConfigError(f"{count} positions do not form a square grid")
    return side


def _token_grid(trunk: nn.Module, count: int) -> tuple[int, int]:
    grid = getattr(getattr(trunk, "patch_embed", None), "grid_size", None)
    if grid is not None and int(grid[0]) * int(grid[1]) == count:
        return int(grid[0]), int(grid[1])
    side = _grid_side(count)
    return side, side
