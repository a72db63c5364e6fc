"""Grad-CAM and Grad-CAM++ of the ordinal head: the autograd baseline the graph's saliency is measured
against (issue 14). Torch only, on the training machine; never on the device.

Which activations. Grad-CAM needs a feature map the score is computed *from*. GraderModel's ``tokens``
(forward_features' second output) are not that map for any tower: they are a side branch that feeds
the saliency and lesion maps, while the ordinal logits come from ``pooled`` alone, and ``pooled`` is
computed beside the tokens, not from them:

- open_clip ViT, class-token pooling (ViT-B-16, edgeretina-tiny-vit): ``pooled`` is the class token's
  output; the patch tokens of the same (last) layer never reach it — the score does not depend on them
  at all (gradient None). Recomputing ``pooled`` from the tokens is impossible here.
- open_clip ModifiedResNet: ``pooled = attnpool(x)`` and ``tokens = c_proj(v_proj(x + pos))`` are two
  separate branches from the layer4 map ``x``; pooled is an attention mean of the tokens only if the
  attention weights are recomputed from ``x`` as well, which is the attnpool again.
- timm towers: ``pooled`` comes from ``forward_head(forward_features(x))``, the tokens from a second,
  per-position call of the head.

So the gradient of the score with respect to the tokens is None (unused in the graph) for all four
tiny test towers, and the activations ``A`` are instead taken at the last layer on the score's path
that still has the token grid (what Grad-CAM prescribes, Selvaraju et al. 2017; for ViTs the usual
choice, e.g. pytorch-grad-cam's ``blocks[-1].norm1``):

- ModifiedResNet: the layer4 map [B, C, h, w] (the tokens are a per-position affine map of it);
- open_clip ViT: the last residual block's ``ln_1`` output at the patch positions: the class token
  reads the patches there, through the last attention (class-token and average pooling alike);
- timm NLC (ViTs): ``blocks[-1].norm1`` at the patch positions (prefix tokens dropped);
- timm NCHW/NHWC (CNNs): the output of the last feature stage (``feature_info[-1]["module"]``).

Its grid is the model's ``grid_size``, so a CAM lines up with the saliency map cell for cell. The map is
read with a forward hook that lives only for one call and is removed in a ``finally``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edgeretina.errors import ConfigError
from edgeretina.grades import NUM_GRADES, REFERABLE_MIN_GRADE

METHODS = ("gradcam", "gradcam++")


@dataclass(frozen=True)
class ActivationSite:
    """Where Grad-CAM reads the activations: a module whose output is on the score's path, its layout
    ("NCHW", "NHWC", "NLC" batch-first tokens, "LNC" sequence-first tokens) and how many leading
    (class, register) tokens a token layout has before the grid."""

    module: nn.Module
    layout: str
    prefix: int
    name: str


def grad_cam(model: nn.Module, images: torch.Tensor, target: str | int = "referable",
             method: str = "gradcam") -> np.ndarray:
    """Grad-CAM (or Grad-CAM++) maps of one ordinal score, float32 [B, h, w] on the model's grid.

    images: a preprocessed float batch [B, 3, H, W], as the model takes it. target: "referable" (the
    CORAL cumulative logit for grade >= 2, ``ordinal_logits[:, 1]``) or a grade k in 1..4 (the logit
    for grade >= k, ``ordinal_logits[:, k-1]``). method: "gradcam" (channel weights = mean gradient
    over the grid) or "gradcam++" (Chattopadhay et al. 2018, see ``gradcam_pp_weights``).
    Each map is ReLU(sum_c w_c A_c), divided by its maximum (an all-zero map stays zero).
    The model runs in eval mode; its train/eval modes and requires_grad flags are left as found and no
    parameter gradient is written. Raises ConfigError for an unknown method or target, a tower without a
    known activation site, or a score that does not depend on the site's activations.
    """
    weigh = _weights_function(method)
    activations, gradients = activations_and_gradients(model, images, target)
    return cam_maps(activations, weigh(gradients, activations))


def activations_and_gradients(model: nn.Module, images: torch.Tensor,
                              target: str | int = "referable") -> tuple[torch.Tensor, torch.Tensor]:
    """(A, dscore/dA), both float [B, C, h, w] (detached): the site's activations on ``images`` and the
    gradient of the target score (see grad_cam) with respect to them, in eval mode.

    Each image's score depends only on its own activations in eval mode, so the gradient of the batch's
    summed score is every image's own gradient."""
    column = ordinal_column(target)
    _check_images(images)
    if torch.is_inference_mode_enabled():
        raise ConfigError("Grad-CAM needs autograd: call it outside torch.inference_mode()")
    site = activation_site(model)
    with _eval_mode(model), _capture_output(site.module) as captured, torch.enable_grad():
        score = model(images)["ordinal_logits"][:, column].sum()
    if len(captured) != 1:
        raise ConfigError(f"Grad-CAM's activation site {site.name} ran {len(captured)} times in one forward "
                          "(need exactly once)")
    gradient, = torch.autograd.grad(score, captured[0], allow_unused=True)
    if gradient is None:
        raise ConfigError(f"the ordinal score does not depend on {site.name}: no Grad-CAM from there")
    grid = tuple(model.grid_size)
    return _as_map(captured[0].detach(), site, grid), _as_map(gradient, site, grid)


def ordinal_column(target: str | int) -> int:
    """The ordinal_logits column of a target: "referable" -> grade >= REFERABLE_MIN_GRADE, k -> grade >= k."""
    if target == "referable":
        return REFERABLE_MIN_GRADE - 1
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool) and 1 <= target < NUM_GRADES:
        return int(target) - 1
    raise ConfigError(f"Grad-CAM target must be 'referable' or a grade 1..{NUM_GRADES - 1} "
                      f"(the cumulative logit for grade >= k), got {target!r}")


def gradcam_weights(gradients: torch.Tensor, activations: torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM's channel weights [B, C]: the gradient averaged over the grid (global average pooling)."""
    return gradients.mean(dim=(2, 3))


def gradcam_pp_weights(gradients: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++'s channel weights [B, C] from gradients g and activations A, both [B, C, h, w].

    Chattopadhay et al. 2018, eq. 19 under their exponential assumption (Y = exp(S), S piecewise linear
    in A, so the 2nd and 3rd derivatives of Y are exp(S) g^2 and exp(S) g^3):
        alpha_ij = g_ij^2 / (2 g_ij^2 + sum_ab A_ab g_ij^3),   w = sum_ij alpha_ij relu(g_ij)
    per channel; exp(S) is one positive factor per image and cancels in the normalised map, so it is
    left out. alpha is 0 where its denominator is 0 (g = 0 there, as in the authors' code)."""
    g2 = gradients.pow(2)
    denominator = 2.0 * g2 + activations.sum(dim=(2, 3), keepdim=True) * g2 * gradients
    safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    alpha = torch.where(denominator != 0, g2 / safe, torch.zeros_like(g2))
    return (alpha * gradients.clamp(min=0)).sum(dim=(2, 3))


def cam_maps(activations: torch.Tensor, weights: torch.Tensor) -> np.ndarray:
    """ReLU(sum_c w_c A_c) [B, h, w], each map divided by its maximum (all-zero stays zero), float32."""
    cam = torch.einsum("bc,bchw->bhw", weights, activations).clamp(min=0)
    peak = cam.flatten(1).amax(dim=1).view(-1, 1, 1)
    cam = torch.where(peak > 0, cam / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(cam))
    return cam.detach().cpu().numpy().astype(np.float32)


def activation_site(model: nn.Module) -> ActivationSite:
    """The module whose output Grad-CAM reads for this model's tower (see the module doc for why)."""
    backbone = model.backbone
    tower = backbone.visual
    if backbone.kind == "resnet":
        return ActivationSite(tower.layer4, "NCHW", 0, "layer4 (ModifiedResNet)")
    if backbone.kind == "vit":
        transformer = tower.transformer
        layout = "NLC" if getattr(transformer, "batch_first", True) else "LNC"
        return ActivationSite(transformer.resblocks[-1].ln_1, layout, 1, "transformer.resblocks[-1].ln_1")
    if backbone.kind == "timm":
        return _timm_site(tower, backbone.adapter)
    raise ConfigError(f"Grad-CAM knows no activation site for {backbone.kind!r} towers")


def _timm_site(tower: nn.Module, adapter) -> ActivationSite:
    trunk = getattr(tower, "trunk", tower)   # open_clip's TimmModel wraps the trunk; a timm model is one
    if adapter.layout == "NLC":
        blocks = getattr(trunk, "blocks", None)
        norm = getattr(blocks[-1], "norm1", None) if blocks is not None and len(blocks) else None
        if not isinstance(norm, nn.Module):
            raise ConfigError(f"timm trunk {type(trunk).__name__} has no blocks[-1].norm1 for Grad-CAM")
        return ActivationSite(norm, "NLC", adapter.prefix, "blocks[-1].norm1 (timm)")
    info = getattr(trunk, "feature_info", None)
    try:
        name = info[-1]["module"]
        return ActivationSite(trunk.get_submodule(name), adapter.layout, 0, f"{name} (timm, last stage)")
    except (TypeError, KeyError, IndexError, AttributeError) as error:
        raise ConfigError(f"timm trunk {type(trunk).__name__} names no last feature stage "
                          "(feature_info) for Grad-CAM") from error


def _as_map(x: torch.Tensor, site: ActivationSite, grid: tuple[int, int]) -> torch.Tensor:
    """The site's output as [B, C, h, w] on the model's grid; ConfigError when it is not that grid."""
    if site.layout == "LNC":
        x = x.transpose(0, 1)
    if site.layout in ("NLC", "LNC"):
        x = x[:, site.prefix:]
        if x.shape[1] != grid[0] * grid[1]:
            raise ConfigError(f"{site.name} gives {x.shape[1]} grid tokens, the model's grid is {grid}")
        x = x.reshape(x.shape[0], grid[0], grid[1], x.shape[2])
        return x.permute(0, 3, 1, 2)
    if site.layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    if tuple(x.shape[2:]) != tuple(grid):
        raise ConfigError(f"{site.name} gives a {tuple(x.shape[2:])} map, the model's grid is {grid}")
    return x


def _weights_function(method: str):
    if method == "gradcam":
        return gradcam_weights
    if method == "gradcam++":
        return gradcam_pp_weights
    raise ConfigError(f"Grad-CAM method must be one of {list(METHODS)}, got {method!r}")


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 \
            or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"Grad-CAM takes a preprocessed float batch [B, 3, H, W], got {shape}")


@contextmanager
def _eval_mode(model: nn.Module):
    """Eval mode for the call; every module's own train/eval flag restored after (mixed modes too, e.g.
    a frozen tower kept in eval inside a training model)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def _capture_output(module: nn.Module):
    """A forward hook for this call only: keeps the module's output, made a graph leaf when nothing
    upstream requires grad (a frozen tower), so autograd can differentiate with respect to it without
    touching any parameter's requires_grad."""
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output):
        if not isinstance(output, torch.Tensor):
            raise ConfigError(f"Grad-CAM's activation site {type(_module).__name__} returns no tensor")
        if not output.requires_grad:
            output = output.detach().requires_grad_(True)
        captured.append(output)
        return output

    handle = module.register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()
