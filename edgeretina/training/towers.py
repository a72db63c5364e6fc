"""Tower adapters: how each kind of open_clip image tower gives a pooled embedding and patch tokens.

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

- a timm model used directly (backbone name ``timm/<model>``, built with ``num_classes=0``; RETFound's
  ViT-L/16, RETFound-Green's DINOv2 ViT-S/14, ConvNeXt, ...): pooled = ``forward_head(forward_features(x),
  pre_logits=True)`` and the tokens are every position of ``forward_features`` (the NLC tokens after the
  prefix tokens, or the NCHW/NHWC map) through the same ``forward_head`` as one-position images, exactly
  as for TimmModel. Such a tower has no joint image-text space and no text tower: GraderModel learns its
  prototypes. Its mean, std and input size come from timm's data config of the model
  (``timm.data.resolve_model_data_config``), the others' from open_clip's preprocess config.

open_clip's CoCa-style attentional poolers give query tokens, not patch tokens, and are refused.

A shallow layer's tokens, for the gated multi-layer saliency (model.py): ``forward_layers(tower, images)`` gives
(pooled, tokens, shallow [B, h*w, C]) in one pass — the ViT's patch tokens after the middle block, the
ResNet's layer2 map average-pooled onto the final grid. The timm kinds have no shallow path yet
(ConfigError). ``forward_layers(tower, images, fine=True)`` adds the ResNet's layer2 map itself
[B, C, fine_scale*h, fine_scale*w] (stride 8), what the fine lesion head draws on; the ViT has nothing
finer than its patches (fine_scale 0: no fine path).

An adapter reads the tower's geometry once (``image_size``, ``grid_size``, ``embed_dim``, ``token_path``,
``mean``, ``std``)
and holds no reference to it: the tower stays a submodule of the VisionBackbone (its state-dict keys),
and ``forward(tower, images)`` is given it on every call.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn

from edgeretina.errors import ConfigError

log = logging.getLogger(__name__)


class TowerAdapter:
    """One kind of tower: its geometry, and ``forward(tower, images) -> (pooled [B, D], tokens [B, h*w, D])``."""

    kind: str
    image_size: int
    grid_size: tuple[int, int]
    embed_dim: int
    token_path: str     # how the tokens reach the joint space, for manifests
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    shallow_dim: int = 0   # channels of forward_layers' shallow tokens; 0: no shallow path
    fine_scale: int = 0    # the fine map's cells per grid cell along each side; 0: no fine path

    def forward(self, tower: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward_layers(self, tower: nn.Module, images: torch.Tensor, fine: bool = False) -> tuple[torch.Tensor, ...]:
        raise ConfigError(f"{self.kind} towers have no shallow-layer path: gated saliency needs an open_clip "
                          "ViT or ModifiedResNet tower (use saliency 'deep')")


def adapter_for(tower: nn.Module) -> TowerAdapter:
    """The adapter of an open_clip image tower or a timm model; ConfigError for a tower kind we cannot take
    tokens from."""
    if isinstance(tower, VisionTransformer):
        adapter = VitAdapter(tower)
    elif isinstance(tower, ModifiedResNet):
        adapter = ResNetAdapter(tower)
    elif isinstance(tower, TimmModel):
        adapter = TimmAdapter(tower)
    elif is_timm_model(tower):
        return TimmDirectAdapter(tower)
    else:
        raise ConfigError(f"unsupported image tower {type(tower).__name__}: supported are open_clip's "
                          "VisionTransformer, ModifiedResNet and TimmModel, and timm models")
    adapter.mean, adapter.std = _open_clip_normalisation(tower)
    return adapter


def is_timm_model(tower: nn.Module) -> bool:
    """A timm model (what timm.create_model returns): a pretrained cfg and forward_features/forward_head."""
    return (isinstance(getattr(tower, "pretrained_cfg", None), dict)
            and callable(getattr(tower, "forward_features", None)) and callable(getattr(tower, "forward_head", None)))


def _open_clip_normalisation(tower: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    preprocess = open_clip.get_model_preprocess_cfg(tower) or {}
    return (tuple(float(v) for v in preprocess.get("mean", OPENAI_DATASET_MEAN)),
            tuple(float(v) for v in preprocess.get("std", OPENAI_DATASET_STD)))


class VitAdapter(TowerAdapter):
    kind = "vit"

    def __init__(self, tower: VisionTransformer):
        if tower.attn_pool is not None:
            raise ConfigError("ViT towers with an attentional pooler (CoCa) give query tokens, not patch tokens")
        if tower.pool_type not in ("tok", "avg"):
            raise ConfigError(f"ViT pool_type {tower.pool_type!r} is not supported (need 'tok' or 'avg')")
        if not isinstance(tower.patch_dropout, nn.Identity):
            # Patch dropout would drop grid positions in training: saliency needs every patch.
            log.info("disabling patch dropout of the ViT tower: the saliency map needs every patch")
            tower.patch_dropout = nn.Identity()
        tower.output_tokens = True
        self.image_size = square_size(tower.image_size)
        self.grid_size = tuple(int(g) for g in tower.grid_size)
        self.embed_dim = int(tower.proj.shape[1]) if tower.proj is not None else int(tower.ln_post.normalized_shape[0])
        ln = "ln_post" if tower.final_ln_after_pool else "ln_post (inside the tower)"
        self.token_path = f"vit: patch tokens -> {ln} -> proj"
        self.shallow_index = len(tower.transformer.resblocks) // 2 - 1    # the middle block's output
        self.shallow_dim = int(tower.transformer.width)

    def forward(self, tower: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = tower(images)  # tokens: before proj; after ln_post unless final_ln_after_pool
        return pooled, self._joint_tokens(tower, tokens)

    def forward_layers(self, tower: VisionTransformer, images: torch.Tensor, fine: bool = False):
        """VisionTransformer.forward's own steps, keeping the middle block's patch tokens on the way."""
        if fine:
            raise ConfigError("a ViT tower has nothing finer than its patch grid: fine lesion maps need an open_clip "
                              "ModifiedResNet tower (use lesion detail 'patch')")
        x, taken = tower.transformer.forward_intermediates(tower._embeds(images), indices=[self.shallow_index])
        pooled, tokens = tower._pool(x)
        if tower.proj is not None:
            pooled = pooled @ tower.proj
        return pooled, self._joint_tokens(tower, tokens), taken[0][:, 1:]   # the class token dropped

    @staticmethod
    def _joint_tokens(tower: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
        if tower.final_ln_after_pool:
            tokens = tower.ln_post(tokens)
        if tower.proj is not None:
            tokens = tokens @ tower.proj
        return tokens


class ResNetAdapter(TowerAdapter):
    kind = "resnet"

    def __init__(self, tower: ModifiedResNet):
        self.image_size = square_size(tower.image_size)
        side = grid_side(tower.attnpool.positional_embedding.shape[0] - 1)
        self.grid_size = (side, side)
        self.embed_dim = int(tower.attnpool.c_proj.out_features)
        self.token_path = "resnet: layer4 map + attnpool pos -> attnpool.v_proj -> attnpool.c_proj (value path)"
        last_block = tower.layer2[-1]
        self.shallow_dim = int(last_block.bn3.num_features)
        self.shallow_stride = 4    # layer2 is at 1/8 of the input, layer4 (the grid) at 1/32
        self.fine_scale = self.shallow_stride

    def forward(self, tower: ModifiedResNet, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = tower.stem(images)
        return self._pooled_and_tokens(tower, tower.layer4(tower.layer3(tower.layer2(tower.layer1(x)))))

    def forward_layers(self, tower: ModifiedResNet, images: torch.Tensor, fine: bool = False):
        shallow = tower.layer2(tower.layer1(tower.stem(images)))
        pooled, tokens = self._pooled_and_tokens(tower, tower.layer4(tower.layer3(shallow)))
        k = self.shallow_stride
        out = (pooled, tokens, nn.functional.avg_pool2d(shallow, k, k).flatten(2).transpose(1, 2))
        return out + (shallow,) if fine else out

    @staticmethod
    def _pooled_and_tokens(tower: ModifiedResNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = tower.attnpool
        pooled = pool(x)
        features = x.flatten(2).transpose(1, 2) + pool.positional_embedding[1:].to(x.dtype)  # [B, h*w, C]
        tokens = pool.c_proj(pool.v_proj(features))
        return pooled, tokens


class _PerPositionHead(TowerAdapter):
    """A timm trunk whose head is applied to every position of its final features as a one-position image.

    The trunk's feature layout (NCHW, NHWC or tokens NLC with prefix tokens) is found by a probe forward."""

    kind = "timm"

    def _probe_images(self) -> torch.Tensor:
        return torch.zeros(1, 3, self.image_size, self.image_size)

    def _read_layout(self, trunk: nn.Module, features: torch.Tensor) -> None:
        if features.ndim == 4:
            self.layout = "NHWC" if getattr(trunk, "output_fmt", "NCHW") == "NHWC" else "NCHW"
            self.prefix = 0
            self.channels = int(features.shape[-1] if self.layout == "NHWC" else features.shape[1])
            hw = features.shape[1:3] if self.layout == "NHWC" else features.shape[2:4]
            self.grid_size = (int(hw[0]), int(hw[1]))
        elif features.ndim == 3:
            self.layout = "NLC"
            self.prefix = int(getattr(trunk, "num_prefix_tokens", 0))
            self.channels = int(features.shape[-1])
            self.grid_size = _token_grid(trunk, int(features.shape[1]) - self.prefix)
        else:
            raise ConfigError(f"timm trunk {type(trunk).__name__} gives features of shape {tuple(features.shape)}")

    def _read_dims(self, tower: nn.Module, images: torch.Tensor, name: str) -> None:
        with _probing(tower, f"timm tower {name}: its head does not apply per position"):
            pooled, tokens = self.forward(tower, images)
        self.embed_dim = int(pooled.shape[-1])
        if tokens.shape[-1] != self.embed_dim:
            raise ConfigError(f"timm tower tokens have dim {tokens.shape[-1]}, pooled has {self.embed_dim}")

    def _as_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.reshape(-1, self.grid_size[0] * self.grid_size[1], tokens.shape[-1])

    def _positions(self, features: torch.Tensor) -> torch.Tensor:
        """Every grid position as a one-position 'image' in the trunk's own layout."""
        channels = self.channels
        if self.layout == "NCHW":
            return features.flatten(2).transpose(1, 2).reshape(-1, channels, 1, 1)
        if self.layout == "NHWC":
            return features.reshape(-1, 1, 1, channels)
        positions = features[:, self.prefix:].reshape(-1, 1, channels)
        if self.prefix:
            # The token stands in for the prefix tokens too: class-token, average and attention
            # pooling of identical tokens all return that token's own (value) path.
            positions = positions.expand(-1, self.prefix + 1, channels)
        return positions


class TimmAdapter(_PerPositionHead):
    """open_clip's TimmModel: the trunk's forward_head, then the adapter's head (projection to the joint space)."""

    def __init__(self, tower: TimmModel):
        if "pool" in dict(tower.head.named_children()):
            raise ConfigError("timm towers with an adapter attention pool (timm_pool abs_attn/rot_attn) "
                              "have no per-position path to the joint space")
        self.image_size = square_size(tower.image_size)
        trunk = tower.trunk
        with _probing(tower, f"timm trunk {type(trunk).__name__} failed a probe forward at {self.image_size} px"):
            features = trunk.forward_features(self._probe_images())
        self._read_layout(trunk, features)
        self._read_dims(tower, self._probe_images(), type(trunk).__name__)
        self.token_path = f"timm: each position ({self.layout}) through trunk.forward_head and the adapter head"

    def forward(self, tower: TimmModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        trunk, head = tower.trunk, tower.head
        features = trunk.forward_features(images)
        pooled = head(trunk.forward_head(features))
        tokens = head(trunk.forward_head(self._positions(features)))
        return pooled, self._as_tokens(tokens)


class TimmDirectAdapter(_PerPositionHead):
    """A timm model itself (num_classes=0): pooled = forward_head(features, pre_logits=True), the tokens its
    per-position analogue. Input size, mean and std are timm's data config of the model."""

    def __init__(self, model: nn.Module):
        from timm.data import resolve_model_data_config

        data = resolve_model_data_config(model)
        self.image_size = square_size(tuple(data["input_size"][1:]))
        self.mean = tuple(float(v) for v in data["mean"])
        self.std = tuple(float(v) for v in data["std"])
        name = type(model).__name__
        with _probing(model, f"timm model {name} failed a probe forward at {self.image_size} px"):
            features = model.forward_features(self._probe_images())
        self._read_layout(model, features)
        self._read_dims(model, self._probe_images(), name)
        self.token_path = f"timm-direct: each position ({self.layout}) through forward_head(pre_logits=True)"

    def forward(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = model.forward_features(images)
        pooled = model.forward_head(features, pre_logits=True)
        tokens = model.forward_head(self._positions(features), pre_logits=True)
        return pooled, self._as_tokens(tokens)


@contextmanager
def _probing(tower: nn.Module, failure: str):
    """Eval mode and no_grad for a probe forward; a RuntimeError becomes ConfigError(failure)."""
    was_training = tower.training
    tower.eval()
    try:
        with torch.no_grad():
            yield
    except RuntimeError as error:
        raise ConfigError(f"{failure}: {error}") from error
    finally:
        tower.train(was_training)


def square_size(size) -> int:
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"only square inputs are supported, the tower takes {tuple(size)}")
        size = size[0]
    return int(size)


def grid_side(count: int) -> int:
    side = int(round(math.sqrt(count)))
    if side * side != count:
        raise ConfigError(f"{count} positions do not form a square grid")
    return side


def _token_grid(trunk: nn.Module, count: int) -> tuple[int, int]:
    grid = getattr(getattr(trunk, "patch_embed", None), "grid_size", None)
    if grid is not None and int(grid[0]) * int(grid[1]) == count:
        return int(grid[0]), int(grid[1])
    side = grid_side(count)
    return side, side
