"""The backbone factory: open_clip architecture presets, timm models, pretrained weights, and building a
VisionBackbone with the text embeddings of its own text tower (when it has one), and that text tower
itself (build_text_encoder: what contrastive image-text training adapts, training/contrastive.py).

Our presets are open_clip model configs (one JSON per architecture under training/model_configs,
open_clip's own habit); a tiny test architecture is just another preset. A ``timm/<name>`` backbone is
``timm.create_model(name, num_classes=0)``: an image tower without a text tower.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import open_clip
import timm
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from edgeretina.errors import CheckpointError, ConfigError
from edgeretina.training.backbone import BackboneConfig, VisionBackbone
from edgeretina.training.hub_weights import check_tag_available, check_timm_weights_available
from edgeretina.training.towers import grid_side
from edgeretina.training.weights import load_open_clip_weights, load_timm_weights

log = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent / "model_configs"
TIMM_PREFIX = "timm/"       # backbone names "timm/<timm model name>": a timm model as the image tower
TIMM_HUB_WEIGHTS = "timm"   # pretrained="timm": timm's own pretrained weights of that model (from the hub)
_HUB_PREFIXES = ("hf-hub:", "local-dir:")

#: one item per prototype row: a description, or several whose embeddings are averaged
TextGroups = Sequence[Union[str, Sequence[str]]]


@dataclass
class BackboneBuild:
    visual: VisionBackbone
    text_embeddings: torch.Tensor | None  # [N, D] L2-normalised, one per text group, from the same model's text tower
    has_text_tower: bool = True           # False for a timm/ tower: no text prototypes can exist for it


def preset_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in PRESET_DIR.glob("*.json")))


def register_presets() -> None:
    """Register every JSON under training/model_configs with open_clip (idempotent)."""
    known = set(open_clip.list_models())
    if any(name not in known for name in preset_names()):
        open_clip.add_model_config(PRESET_DIR)


def build_backbone(config: BackboneConfig, texts: TextGroups | None = None) -> BackboneBuild:
    """Create the model, embed ``texts`` with its text tower, keep only the image tower.

    texts: one item per prototype row, each a description or a group of descriptions; a group's
        embedding is the L2-normalised mean of its descriptions' L2-normalised embeddings (prompt
        ensembling; ``prompts.load_prompts(path).groups()`` gives the grade and lesion groups).
        A ``timm/`` tower has no text tower: nothing is encoded, text_embeddings is None and
        has_text_tower False (GraderModel then learns its prototypes).

    With ``pretrained=None`` the weights are random (seeding is the caller's business). The text tower
    runs in eval mode under no_grad and is dropped afterwards (build_text_encoder gives it); the returned tower keeps the train/eval
    mode it was created in (train).

    Raises ConfigError for an unknown model name (listing close names), an unknown pretrained tag or
    missing file, an open_clip tag trained with another activation (QuickGELU) than the config uses,
    hub weights that are neither cached nor reachable, an image size the architecture cannot take,
    malformed texts or an unsupported tower; CheckpointError when the weights cannot be read or loaded,
    or do not fit the architecture exactly (a classifier head aside).
    """
    groups = _text_groups(texts)
    if config.name.startswith(TIMM_PREFIX):
        return _build_timm(config)
    return _build_open_clip(config, groups)


def _build_open_clip(config: BackboneConfig, groups: list[tuple[str, ...]] | None) -> BackboneBuild:
    model = _open_clip_model(config)
    visual = VisionBackbone(model.visual)
    text_embeddings = None
    if groups is not None:
        text_embeddings = TextEncoder(model, config.name).encode_groups(groups) if groups else torch.zeros(0, visual.embed_dim)
    del model  # drop the text tower
    return BackboneBuild(visual=visual, text_embeddings=text_embeddings)


def build_text_encoder(config: BackboneConfig, seed: int | None = None) -> "TextEncoder":
    """The open_clip text tower (and tokenizer) of ``config``'s model, with the same weights as the image tower
    build_backbone makes from it: the pretrained tag's or file's, or, with ``pretrained=None``, the random
    initialisation open_clip draws right after ``torch.manual_seed(seed)`` (what the trainer does before
    building its GraderModel). The global RNG state is left as it was. The image tower is built too and dropped.

    Raises ConfigError for a ``timm/`` tower (it has no text tower) and what build_backbone raises.
    """
    if config.name.startswith(TIMM_PREFIX):
        raise ConfigError(f"{config.name!r} is a timm image tower without a text tower: contrastive image-text "
                          "training needs an open_clip model (e.g. edgeretina-tiny-vit, ViT-B-16)")
    if seed is None:
        return TextEncoder(_open_clip_model(config), config.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TextEncoder(_open_clip_model(config), config.name)


def _open_clip_model(config: BackboneConfig) -> nn.Module:
    """The whole open_clip model (both towers) at the configured image size, with its weights."""
    register_presets()
    model_cfg = _model_config(config.name)
    tag, weights_file = _resolve_pretrained(config.name, config.pretrained)
    vision_cfg = (model_cfg or {}).get("vision_cfg", {})
    is_resnet = isinstance(vision_cfg.get("layers"), (list, tuple)) and not vision_cfg.get("timm_model_name")
    _check_image_size(config, vision_cfg, is_resnet)
    native_size = vision_cfg.get("image_size")
    # open_clip resizes a ViT's position embeddings when it loads a checkpoint at another size, but not
    # a ModifiedResNet's attention pool: load at the native size, then resize the pool ourselves.
    resize_resnet_after = (is_resnet and (tag or weights_file) is not None and config.image_size is not None
                           and config.image_size != native_size)
    force_size = None if resize_resnet_after else config.image_size
    model = _create_model(config.name, tag, force_size)
    if weights_file is not None:
        load_open_clip_weights(model, weights_file, config.name)
    if resize_resnet_after:
        _resize_attnpool(model.visual, config.image_size)
    return model


class TextEncoder(nn.Module):
    """An open_clip model's text side (its image tower removed): ``forward(tokens) -> [B, D]`` L2-normalised
    text embeddings in the joint space, ``tokenize(texts)``, and the model's own ``logit_scale`` (log of the
    CLIP temperature's inverse), which contrastive training learns along with it."""

    def __init__(self, clip_model: nn.Module, name: str):
        super().__init__()
        clip_model.visual = None        # the text side only; open_clip's encode_text never touches it
        self.clip = clip_model
        self.tokenizer = open_clip.get_tokenizer(name)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=True)

    def encode_groups(self, groups: list[tuple[str, ...]]) -> torch.Tensor:
        """[len(groups), D] on the CPU, float32: per group, the normalised mean of its descriptions' normalised
        embeddings (prompt ensembling). Runs in eval mode under no_grad; the train/eval mode is restored."""
        flat = [text for group in groups for text in group]
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                embeddings = self(self.tokenize(flat).to(device)).float().cpu()
        finally:
            self.train(was_training)
        means = torch.stack([chunk.mean(dim=0) for chunk in embeddings.split([len(g) for g in groups])])
        return F.normalize(means, dim=-1).contiguous()


def _build_timm(config: BackboneConfig) -> BackboneBuild:
    name = config.name[len(TIMM_PREFIX):]
    _check_timm_name(name)
    hub = config.pretrained == TIMM_HUB_WEIGHTS
    weights_file = None if hub else config.pretrained
    if weights_file is not None and not os.path.isfile(weights_file):
        raise ConfigError(f"pretrained {weights_file!r} of {config.name!r} is neither a file nor "
                          f"{TIMM_HUB_WEIGHTS!r} (timm's own pretrained weights)")
    if hub:
        check_timm_weights_available(name)
    model = _create_timm_model(name, hub, config.image_size)
    if weights_file is not None:
        load_timm_weights(model, weights_file, config.name)
    if config.image_size is not None:
        # what resolve_model_data_config reports from now on; set after loading, since timm's position-
        # embedding resampling reads the checkpoint's grid from the original input_size
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, config.image_size, config.image_size)}
    log.info("%s has no text tower: its grade and lesion prototypes cannot be text embeddings, GraderModel "
             "learns them from a random orthonormal start", config.name)
    return BackboneBuild(visual=VisionBackbone(model), text_embeddings=None, has_text_tower=False)


def _check_timm_name(name: str) -> None:
    if timm.is_model(name):
        return
    models = timm.list_models()
    close = difflib.get_close_matches(name, models, n=5, cutoff=0.6)
    hint = f"; close names: {[TIMM_PREFIX + m for m in close]}" if close else ""
    raise ConfigError(f"unknown timm model {name!r}{hint} (timm.list_models() has {len(models)} names)")


def _create_timm_model(name: str, hub: bool, image_size: int | None) -> nn.Module:
    """timm.create_model(name, num_classes=0), at ``image_size`` where the model takes an img_size (ViTs);
    a CNN takes any size, checked against its total stride."""
    kwargs: dict[str, Any] = {"pretrained": hub, "num_classes": 0}
    try:
        try:
            model = timm.create_model(name, **kwargs, **({} if image_size is None else {"img_size": image_size}))
        except TypeError as error:
            if image_size is None or "img_size" not in str(error):
                raise
            model = timm.create_model(name, **kwargs)
    except (RuntimeError, OSError, ValueError) as error:
        if not hub:
            raise ConfigError(f"timm could not create {name!r}: {error}") from error
        raise CheckpointError(f"could not load timm's pretrained weights of {name!r}: {error}") from error
    if image_size is not None:
        _check_timm_image_size(model, name, image_size)
    return model


def _check_timm_image_size(model: nn.Module, name: str, size: int) -> None:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        stride = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    else:
        info = getattr(model, "feature_info", None) or [{}]
        stride = int(info[-1].get("reduction", 1))
    if size % stride:
        raise ConfigError(f"image_size {size} of {TIMM_PREFIX}{name} must be a multiple of {stride}")


def check_quick_gelu(name: str, tag: str) -> None:
    """ConfigError when open_clip tag ``tag`` was trained with another activation than model ``name`` uses.

    open_clip only warns ("QuickGELU mismatch") and builds a model whose features are off: OpenAI's
    weights (and DFN's, MetaCLIP's) were trained with QuickGELU, most open_clip configs use nn.GELU. The
    fix is the ``-quickgelu`` twin of the config (or the plain one the other way round). Reads the model
    config and the tag's pretrained cfg only, so it costs nothing and needs no network. A local weights
    file records no activation and cannot be checked.
    """
    cleaned = name.replace("/", "-")
    model_quick = bool((open_clip.get_model_config(cleaned) or {}).get("quick_gelu", False))
    tag_quick = bool((open_clip.get_pretrained_cfg(cleaned, tag) or {}).get("quick_gelu", False))
    if model_quick == tag_quick:
        return
    twin = f"{cleaned}-quickgelu" if tag_quick else cleaned.removesuffix("-quickgelu")
    fits = twin != cleaned and tag in open_clip.list_pretrained_tags_by_model(twin)
    fix = (f"use backbone {twin!r} with pretrained {tag!r}" if fits
           else f"use a model config with quick_gelu={str(tag_quick).lower()}")
    trained = "QuickGELU" if tag_quick else "GELU"
    uses = "QuickGELU" if model_quick else "GELU"
    raise ConfigError(f"pretrained {tag!r} of {name!r} was trained with {trained}, but the {name!r} config uses "
                      f"{uses}: the weights would give wrong features. Fix: {fix}")


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


def _resolve_pretrained(name: str, pretrained: str | None) -> tuple[str | None, str | None]:
    """(open_clip tag or None, local weights file or None); hub-prefixed names pass ``pretrained`` on."""
    if pretrained is None:
        return None, None
    if name.startswith(_HUB_PREFIXES):
        return pretrained, None
    if os.path.isfile(pretrained):
        return None, pretrained
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        check_quick_gelu(name, pretrained)
        check_tag_available(name, pretrained)
        return pretrained, None
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


def _text_groups(texts: TextGroups | None) -> list[tuple[str, ...]] | None:
    if texts is None:
        return None
    if isinstance(texts, str):
        raise ConfigError("texts must be a sequence of strings (or of groups of strings), not one string")
    groups = []
    for i, item in enumerate(texts):
        group = (item,) if isinstance(item, str) else tuple(item) if isinstance(item, Sequence) else None
        if not group or not all(isinstance(t, str) for t in group):
            raise ConfigError(f"texts[{i}] must be a string or a non-empty sequence of strings, got {item!r}")
        groups.append(group)
    return groups
