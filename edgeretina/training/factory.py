"""The backbone factory: open_clip architecture presets, pretrained weights, and building a
VisionBackbone with the text embeddings of its own text tower.

Our presets are open_clip model configs (one JSON per architecture under training/model_configs,
open_clip's own habit); a tiny test architecture is just another preset.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from edgeretina.errors import CheckpointError, ConfigError
from edgeretina.training.backbone import BackboneConfig, VisionBackbone
from edgeretina.training.hub_weights import check_tag_available
from edgeretina.training.towers import grid_side

PRESET_DIR = Path(__file__).resolve().parent / "model_configs"
_HUB_PREFIXES = ("hf-hub:", "local-dir:")


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
        check_tag_available(name, pretrained)
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
    old_side, new_side = grid_side(old.shape[0] - 1), image_size // 32
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
