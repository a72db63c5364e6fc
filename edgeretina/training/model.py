"""GraderModel: an open_clip vision tower, a projection head and four heads that all run in one pass.

- prototype logits: cosine similarity of the projected image embedding to one frozen text embedding
  per grade (RetinaScan, TWLR), times a learned scale;
- CORAL ordinal head: one shared weight vector and K-1 biases give K-1 cumulative logits
  (Cao, Mirjalili & Raschka 2020) — rank-consistent by construction;
- saliency: the same prototype similarity applied to every patch token; a patch's disease evidence is
  how much closer it sits to the nearest disease prototype than to the healthy one (CLPI-style patch
  attention; no autograd needed on the device);
- optional lesion head: per-patch lesion logits, image-level presence by global max pooling (CLPI, SiAN);
  with ``lesion_detail="fine"`` (ResNet towers) the logits live on the stride-8 layer2 map instead: the patch
  logits, upsampled, say what and roughly where, a small convolution over layer2 (with the deep patch features
  broadcast onto it) says where exactly — a 32x32 map at 256 px where the patch grid is 8x8 (FPN-style);
- optional side connection (``lesion_to_grade``): the image-level lesion presences feed the CORAL logits
  through one learned weight per lesion type (shared by every threshold, so the ranks stay consistent),
  zero at the start: lesion evidence may inform the grade, it is not forced to (SiAN);
- gated multi-layer saliency (ELLG; ``saliency="gated"``): a shallow layer's patches (ViT middle block,
  ResNet layer2) get their own evidence head; both maps are normalised to their image's peak, multiplied
  (geometric mean: fine shallow detail where the deep layer agrees) and gated by the deep map
  (sigmoid(GATE_SHARPNESS * (deep - GATE_LEVEL))), which suppresses the small responses normal anatomy
  (vessels, disc rim) leaves in the shallow layer; the result keeps the deep map's peak, so a healthy
  image stays dim. All in the graph, so it runs on the device;
- field of view: both patch maps are restricted to the fundus field in the graph (`field_weights`), so the
  black surround and patches cut by the field edge can carry no evidence (the edge ring, issue 14).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from edgeretina.choices import LESION_DETAILS, SALIENCY_KINDS
from edgeretina.errors import ConfigError
from edgeretina.grades import LESION_CODES, NUM_GRADES
from edgeretina.preprocess.config import FIELD_LEVEL_U8
from edgeretina.training.backbone import BackboneConfig
from edgeretina.training.factory import build_backbone
from edgeretina.training.prompts import load_prompts, orthonormal_prototypes

FIELD_LEVEL = FIELD_LEVEL_U8 / 255.0    # brighter (brightest channel) is fundus, darker the blacked-out surround
FIELD_NONE, FIELD_FULL = 0.5, 0.95   # fraction of a patch inside the field for weight 0 and weight 1
GATE_LEVEL, GATE_SHARPNESS = 0.3, 12.0   # deep evidence (of the image's peak) where the gate half opens
OUTPUT_NAMES = ("ordinal_logits", "prototype_logits", "embedding", "saliency")
LESION_OUTPUT = "lesion_logits"


@dataclass(frozen=True)
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    lesion_head: bool = False
    projection_hidden: int = 0          # 0: a single linear projection; >0: a two-layer MLP
    init_logit_scale: float = 10.0      # CLIP-style temperature for the cosine similarities
    saliency: str = "deep"              # "deep": the final layer's patch evidence; "gated": ELLG's fusion
    lesion_detail: str = "patch"        # "patch": lesion logits on the patch grid; "fine": on the stride-8 map
    lesion_to_grade: bool = False       # side connection: image-level lesion presence -> the CORAL logits

    def __post_init__(self):
        if self.saliency not in SALIENCY_KINDS:
            raise ConfigError(f"saliency must be one of {list(SALIENCY_KINDS)}, got {self.saliency!r}")
        if self.lesion_detail not in LESION_DETAILS:
            raise ConfigError(f"lesion detail must be one of {list(LESION_DETAILS)}, got {self.lesion_detail!r}")
        if not self.lesion_head and (self.lesion_detail != "patch" or self.lesion_to_grade):
            raise ConfigError("fine lesion maps and the lesion-to-grade connection need the lesion head")

    def to_dict(self) -> dict:
        return {"backbone": self.backbone.to_dict(), "lesion_head": self.lesion_head,
                "projection_hidden": self.projection_hidden, "init_logit_scale": self.init_logit_scale,
                "saliency": self.saliency, "lesion_detail": self.lesion_detail,
                "lesion_to_grade": self.lesion_to_grade}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        unknown = set(data) - {"backbone", "lesion_head", "projection_hidden", "init_logit_scale", "saliency",
                               "lesion_detail", "lesion_to_grade"}
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        return cls(backbone=BackboneConfig.from_dict(data["backbone"]),
                   lesion_head=bool(data.get("lesion_head", False)),
                   projection_hidden=int(data.get("projection_hidden", 0)),
                   init_logit_scale=float(data.get("init_logit_scale", 10.0)),
                   saliency=str(data.get("saliency", "deep")),
                   lesion_detail=str(data.get("lesion_detail", "patch")),
                   lesion_to_grade=bool(data.get("lesion_to_grade", False)))


class GraderModel(nn.Module):
    def __init__(self, config: ModelConfig, *, for_checkpoint: bool = False,
                 prompts_file: str | os.PathLike | None = None):
        """Build the backbone (pretrained weights if configured) and embed the grade and lesion texts.

        prompts_file: the grade and lesion descriptions (training/prompts.py; None: the packaged
        prompts.json); each prototype is the normalised mean of its descriptions' embeddings. A tower
        without a text tower (``timm/`` names) cannot have text prototypes: its prototypes are learnable
        parameters from a random orthonormal start (torch's global RNG, seeded by the trainer).
        for_checkpoint: the weights and prototypes will come from load_state_dict, so neither the
        pretrained weights nor the text tower are touched (nothing to download, nothing to encode).
        Raises ConfigError for a bad prompts file, and what build_backbone raises.
        """
        super().__init__()
        self.config = config
        texts = None if for_checkpoint else load_prompts(prompts_file).groups()
        backbone = replace(config.backbone, pretrained=None) if for_checkpoint else config.backbone
        build = build_backbone(backbone, texts)
        self.backbone = build.visual
        dim = self.backbone.embed_dim
        self.projection = _projection(dim, config.projection_hidden)
        prototypes = build.text_embeddings
        if not build.has_text_tower:  # no text tower, no text prototypes: learn them
            count = NUM_GRADES + len(LESION_CODES)
            prototypes = torch.zeros(count, dim) if for_checkpoint else orthonormal_prototypes(count, dim)
            self.grade_prototypes = nn.Parameter(prototypes[:NUM_GRADES].clone())
            self.lesion_prototypes = nn.Parameter(prototypes[NUM_GRADES:].clone())
        else:
            if prototypes is None:
                prototypes = torch.zeros(NUM_GRADES + len(LESION_CODES), dim)
            self.register_buffer("grade_prototypes", prototypes[:NUM_GRADES].clone())
            self.register_buffer("lesion_prototypes", prototypes[NUM_GRADES:].clone())
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.init_logit_scale)))
        # CORAL: shared weights, one bias per cumulative task, initialised in descending order.
        self.coral_weight = nn.Linear(dim, 1, bias=False)
        self.coral_bias = nn.Parameter(torch.linspace(1.0, -1.0, NUM_GRADES - 1))
        # Offset of the patch disease evidence so that sigmoid(evidence) starts well below 0.5.
        self.saliency_bias = nn.Parameter(torch.tensor(-2.0))
        self.lesion_head = nn.Linear(dim, len(LESION_CODES)) if config.lesion_head else None
        self.shallow_head = _shallow_head(self.backbone.shallow_dim) if config.saliency == "gated" else None
        self.fine_lesion_head = (FineLesionHead(self.backbone.shallow_dim, dim, len(LESION_CODES), self.backbone.fine_scale)
                                 if config.lesion_detail == "fine" else None)
        self.lesion_side = _lesion_side() if config.lesion_to_grade else None

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.backbone.grid_size

    @property
    def lesion_grid_size(self) -> tuple[int, int]:
        """The grid of `lesion_logits` (and of the lesion targets training reads): the patch grid, or the
        stride-8 map with the fine lesion head."""
        if self.fine_lesion_head is None:
            return self.grid_size
        h, w = self.grid_size
        return h * self.fine_lesion_head.scale, w * self.fine_lesion_head.scale

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES + ((LESION_OUTPUT,) if self.lesion_head is not None else ())

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled, tokens, *rest = self.forward_features(images)
        shallow, fine = (rest + [None, None])[:2]
        fine_field = self.field_weights(images, self.lesion_grid_size) if fine is not None else None
        return self.forward_heads(pooled, tokens, shallow, self.field_weights(images), fine=fine, fine_field=fine_field)

    def field_weights(self, images: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """[B, h*w] in 0..1: how far each patch lies inside the fundus field of the normalised input.

        The shared preprocessing blacks out everything outside the field (mask_outside_fov), so a pixel is
        in the field when its brightest channel, un-normalised, is above FIELD_LEVEL. A patch at least
        FIELD_FULL inside weighs 1, one at most FIELD_NONE inside weighs 0, linear between: the patches the
        field edge cuts, whose tokens mix fundus and black and lit up as a ring, carry no evidence.
        grid: the cells to weigh (default the patch grid; the fine lesion map's grid for its logits)."""
        mean = images.new_tensor(self.backbone.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.backbone.std).view(1, 3, 1, 1)
        inside = ((images * std + mean).amax(dim=1, keepdim=True) > FIELD_LEVEL).to(images.dtype)
        h, w = grid or self.grid_size
        size = self.backbone.image_size      # static: the exporters need constant pooling kernels
        kernel = (size // h, size // w)
        fraction = F.avg_pool2d(inside, kernel_size=kernel, stride=kernel)[..., :h, :w]
        return ((fraction - FIELD_NONE) / (FIELD_FULL - FIELD_NONE)).clamp(0.0, 1.0).flatten(1)

    def forward_features(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The backbone alone: (pooled [B, D], tokens [B, h*w, D]), the shallow layer's tokens [B, h*w, C]
        third with gated saliency or the fine lesion head, and the fine map [B, C, H, W] fourth with the fine
        lesion head; what the frozen-backbone cache keeps (never the fine map: the cache is off then)."""
        fine = self.fine_lesion_head is not None
        return self.backbone(images, shallow=self.shallow_head is not None or fine, fine=fine)

    def forward_heads(self, pooled: torch.Tensor, tokens: torch.Tensor, shallow: torch.Tensor | None = None,
                      field: torch.Tensor | None = None, *, fine: torch.Tensor | None = None,
                      fine_field: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every output from the backbone's pooled, tokens, shallow tokens and fine map (forward_features) and
        the field weights of the patches [B, h*w] and of the fine lesion cells (None: no restriction)."""
        z = self.projection(pooled)
        embedding = F.normalize(z, dim=-1)
        patches = F.normalize(self.projection(tokens), dim=-1)              # [B, N, D]
        scale = self.logit_scale.exp().clamp(max=100.0)
        prototypes = F.normalize(self.grade_prototypes, dim=-1)
        prototype_logits = scale * embedding @ prototypes.t()                 # [B, 5]
        ordinal_logits = self.coral_weight(z) + self.coral_bias               # [B, 4]
        patch_sim = patches @ prototypes.t()                                  # [B, N, 5]
        disease_evidence = scale * (patch_sim[..., 1:].amax(dim=-1) - patch_sim[..., 0]) + self.saliency_bias
        outside = _outside_field_offset(field)                                # [B, N] or 0
        disease_evidence = disease_evidence + outside
        h, w = self.grid_size
        deep = torch.sigmoid(disease_evidence)
        out = {
            "ordinal_logits": ordinal_logits,
            "prototype_logits": prototype_logits,
            "embedding": embedding,
            "saliency": deep.reshape(-1, h, w),
            "saliency_logits": disease_evidence.reshape(-1, h, w),           # training only, not exported
        }
        if self.shallow_head is not None:
            if shallow is None:
                raise ConfigError("gated saliency needs the shallow layer's tokens (forward_features gives them)")
            shallow_evidence = self.shallow_head(shallow).squeeze(-1) + outside
            out["saliency"] = gated_saliency(deep, torch.sigmoid(shallow_evidence)).reshape(-1, h, w)
            out["saliency_deep"] = deep.reshape(-1, h, w)                     # not exported: for comparison
            out["shallow_logits"] = shallow_evidence.reshape(-1, h, w)        # training only
        if self.lesion_head is not None:
            out.update(self._lesion_outputs(patches, fine, field, fine_field, ordinal_logits))
        return out

    def _lesion_outputs(self, patches: torch.Tensor, fine: torch.Tensor | None, field: torch.Tensor | None,
                        fine_field: torch.Tensor | None, ordinal_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """lesion_logits [B, L, *lesion_grid_size] restricted to the field; with the fine head also the patch
        grid's logits (`lesion_coarse_logits`, training only), with the side connection the ordinal logits
        moved by the lesion presences."""
        h, w = self.grid_size
        lesion = self.lesion_head(patches).transpose(1, 2).reshape(-1, len(LESION_CODES), h, w)
        out = {}
        if self.fine_lesion_head is not None:
            if fine is None:
                raise ConfigError("the fine lesion head needs the backbone's fine map (forward_features gives it)")
            out["lesion_coarse_logits"] = lesion + _grid_offset(field, lesion)
            lesion, field = self.fine_lesion_head(fine, patches, lesion), fine_field
        lesion = lesion + _grid_offset(field, lesion)
        out[LESION_OUTPUT] = lesion
        if self.lesion_side is not None:
            presence = torch.sigmoid(lesion.flatten(2).amax(dim=-1))                  # [B, L]
            out["ordinal_logits"] = ordinal_logits + self.lesion_side(presence.to(ordinal_logits.dtype))
        return out


class FineLesionHead(nn.Module):
    """Lesion logits on the stride-8 map (see the module doc): upsample(patch logits) + a refinement from
    layer2 plus the deep patch features broadcast onto it. The refinement's last layer starts at zero, so
    training starts from the patch grid's answer and learns where inside each patch the lesion sits."""

    def __init__(self, fine_dim: int, embed_dim: int, lesions: int, scale: int, width: int = 32):
        super().__init__()
        if scale <= 0 or fine_dim <= 0:
            raise ConfigError("fine lesion maps need a tower with a stride-8 map (an open_clip ModifiedResNet); "
                              "use lesion detail 'patch'")
        self.scale = scale
        self.fine = nn.Conv2d(fine_dim, width, kernel_size=1)
        self.deep = nn.Linear(embed_dim, width)
        self.refine = nn.Sequential(nn.GELU(), nn.Conv2d(width, width, kernel_size=3, padding=1), nn.GELU(),
                                    nn.Conv2d(width, lesions, kernel_size=1))
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)

    def forward(self, fine: torch.Tensor, patches: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        h, w = coarse.shape[-2:]
        deep = self.deep(patches).transpose(1, 2).reshape(patches.shape[0], -1, h, w)
        detail = self.refine(self.fine(fine.to(deep.dtype)) + self._up(deep))
        return self._up(coarse) + detail

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=float(self.scale), mode="nearest")


def _lesion_side() -> nn.Module:
    side = nn.Linear(len(LESION_CODES), 1, bias=False)
    nn.init.zeros_(side.weight)
    return side


def _grid_offset(field: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | float:
    """The field offset (log weight, _outside_field_offset) of cells [B, h*w] shaped like logits [B, L, h, w]."""
    if field is None:
        return 0.0
    return _outside_field_offset(field).reshape(field.shape[0], 1, *logits.shape[-2:])


def gated_saliency(deep: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
    """ELLG's gated fusion of a deep and a shallow evidence map [B, N] (both 0..1), see the module doc."""
    peak = deep.amax(dim=-1, keepdim=True)
    deep_n = deep / (peak + 1e-6)
    shallow_n = shallow / (shallow.amax(dim=-1, keepdim=True) + 1e-6)
    gate = torch.sigmoid(GATE_SHARPNESS * (deep_n - GATE_LEVEL))
    return peak * gate * torch.sqrt(deep_n * shallow_n + 1e-12)


def _shallow_head(channels: int) -> nn.Module:
    if channels <= 0:
        raise ConfigError("gated saliency needs a tower with a shallow-layer path (open_clip ViT or ModifiedResNet)")
    return nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, 1))


def _outside_field_offset(field: torch.Tensor | None) -> torch.Tensor | float:
    """log(weight) added to a patch logit: sigmoid(logit + log w) ~= w * sigmoid(logit) for the small
    probabilities of healthy tissue, and a patch outside the field (w = 0) sits at logit - 9.2."""
    if field is None:
        return 0.0
    return torch.log(field + 1e-4)


def _projection(dim: int, hidden: int) -> nn.Module:
    if hidden <= 0:
        return nn.Linear(dim, dim)
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class ExportWrapper(nn.Module):
    """Returns the exported outputs as a tuple in the order of `names` (what torch.onnx.export wants)."""

    def __init__(self, model: GraderModel):
        super().__init__()
        self.model = model
        self.names = model.output_names

    def forward(self, image: torch.Tensor):
        out = self.model(image)
        return tuple(out[name] for name in self.names)
