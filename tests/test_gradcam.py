"""Grad-CAM / Grad-CAM++ of the ordinal head (training/gradcam.py): the autograd baseline of issue 14.

Tiny random towers at 64 px for shapes and state; a hand-built ModifiedResNet whose CAMs are known in
closed form for localisation; a finite-difference check of the ViT's gradient path; the Grad-CAM++
formula against a hand computation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeretina.errors import ConfigError
from edgeretina.training.backbone import BackboneConfig
from edgeretina.training.gradcam import (ActivationSite, activations_and_gradients, gradcam_pp_weights,
                                         gradcam_weights, grad_cam, ordinal_column)
from edgeretina.training.model import GraderModel, ModelConfig

TOWERS = ("edgeretina-tiny-vit", "edgeretina-tiny-rn", "timm/test_vit", "timm/test_resnet")


def tiny_model(name: str, image_size: int = 64, seed: int = 0) -> GraderModel:
    """A random tiny model; for_checkpoint: no text tower to encode (the ordinal head needs none)."""
    torch.manual_seed(seed)
    config = ModelConfig(backbone=BackboneConfig(name=name, image_size=image_size))
    return GraderModel(config, for_checkpoint=True)


@pytest.mark.parametrize("name", TOWERS)
def test_maps_are_grid_shaped_non_negative_and_normalised_per_image(name):
    model = tiny_model(name)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    lit = 0
    for method in ("gradcam", "gradcam++"):
        maps = grad_cam(model, images, target="referable", method=method)
        assert maps.shape == (3, *model.grid_size) and maps.dtype == np.float32
        assert np.isfinite(maps).all() and maps.min() >= 0.0
        for one in maps:
            assert one.max() == pytest.approx(1.0, abs=1e-6) or not one.any()
        lit += int((maps.reshape(3, -1).max(axis=1) > 0).sum())
        # each image's map is its own: the batch gives what one image alone gives
        np.testing.assert_allclose(maps[1:2], grad_cam(model, images[1:2], method=method), atol=1e-5)
    assert lit > 0, "every map was zero: normalisation untested"


# --- a hand-built ModifiedResNet: the CAMs are known in closed form -------------------------------

SPOTS_RED = {(1, 2): 2.0, (3, 0): 1.0}     # grid cell -> red value; background -1 in every channel
SPOT_GREEN = {(0, 3): 3.0}


def hand_built_resnet() -> GraderModel:
    """Tiny RN at 128 px (4 x 4 grid) whose layer4 map is the image's mean red (channel 0) and green
    (channel 1) per grid cell, with a uniform attention pool and heads that make the referable score
    mean(red) - 0.5 mean(green) over the grid (plus a constant).

    Then dscore/dA is 1/16 on channel 0 and -0.5/16 on channel 1 at every cell, so
    Grad-CAM   = relu(red - 0.5 green) / max,
    Grad-CAM++ = relu(red) / max (channel 1's gradient is negative: relu(g) = 0 gives it no weight)."""
    model = tiny_model("edgeretina-tiny-rn", image_size=128)
    tower = model.backbone.visual
    pool = tower.attnpool
    channels, dim = pool.c_proj.in_features, pool.c_proj.out_features
    tower.stem = lambda x: x              # instance attribute: shadows ModifiedResNet.stem for this model
    tower.layer1 = tower.layer2 = tower.layer3 = nn.Identity()
    colour = nn.Conv2d(3, channels, 1, bias=False)
    layer4 = nn.Sequential(nn.AvgPool2d(32), colour)
    with torch.no_grad():
        colour.weight.zero_()
        colour.weight[0, 0] = 1.0          # channel 0: red
        colour.weight[1, 1] = 1.0          # channel 1: green
        for proj in (pool.q_proj, pool.k_proj):   # all attention logits 0: the pool is a plain mean
            proj.weight.zero_()
            proj.bias.zero_()
        pool.positional_embedding.zero_()
        pool.v_proj.weight.copy_(torch.eye(channels))
        pool.v_proj.bias.zero_()
        pool.c_proj.weight.zero_()
        pool.c_proj.weight[0, 0], pool.c_proj.weight[0, 1] = 1.0, -0.5
        pool.c_proj.bias.zero_()
        model.projection.weight.copy_(torch.eye(dim))
        model.projection.bias.zero_()
        model.coral_weight.weight.zero_()
        model.coral_weight.weight[0, 0] = 1.0
    tower.layer4 = layer4
    return model


def spot_image() -> torch.Tensor:
    grid = -torch.ones(1, 3, 4, 4)
    for (row, col), value in SPOTS_RED.items():
        grid[0, 0, row, col] = value
    for (row, col), value in SPOT_GREEN.items():
        grid[0, 1, row, col] = value
    return grid.repeat_interleave(32, dim=2).repeat_interleave(32, dim=3)


def expected_map(red_weight: float, green_weight: float) -> np.ndarray:
    grid = -np.ones((2, 4, 4))
    for (row, col), value in SPOTS_RED.items():
        grid[0, row, col] = value
    for (row, col), value in SPOT_GREEN.items():
        grid[1, row, col] = value
    cam = np.maximum(red_weight * grid[0] + green_weight * grid[1], 0.0)
    return cam / cam.max()


def test_gradcam_finds_the_red_spot_the_score_reads():
    model = hand_built_resnet()
    images = spot_image()
    scores = model.eval()(images)["ordinal_logits"]
    assert model.grid_size == (4, 4)
    cam = grad_cam(model, images, target="referable", method="gradcam")[0]
    assert np.unravel_index(cam.argmax(), cam.shape) == (1, 2)
    np.testing.assert_allclose(cam, expected_map(1.0, -0.5), atol=1e-5)   # 1 at (1,2), 0.6 at (3,0)
    # every target reads the same CORAL weight vector: the same map for grade >= 1 .. >= 4
    for grade in (1, 4):
        np.testing.assert_allclose(grad_cam(model, images, target=grade)[0], cam, atol=1e-6)
    assert torch.isfinite(scores).all()


def test_gradcam_pp_same_peak_but_drops_the_negative_gradient_channel():
    model = hand_built_resnet()
    images = spot_image()
    plain = grad_cam(model, images, method="gradcam")[0]
    plus = grad_cam(model, images, method="gradcam++")[0]
    assert np.unravel_index(plus.argmax(), plus.shape) == np.unravel_index(plain.argmax(), plain.shape) == (1, 2)
    np.testing.assert_allclose(plus, expected_map(1.0, 0.0), atol=1e-5)    # 0.5 at (3,0), not 0.6
    activations, gradients = activations_and_gradients(model, images)
    np.testing.assert_allclose(gradients[0, 0].numpy(), np.full((4, 4), 1 / 16), rtol=1e-5)
    np.testing.assert_allclose(gradients[0, 1].numpy(), np.full((4, 4), -0.5 / 16), rtol=1e-5)
    assert float(gradients[0, 2:].abs().max()) == 0.0


# --- the ViT's gradient path: finite differences through the last block ---------------------------

def _score_from_last_ln1(model: GraderModel, images: torch.Tensor, patch_delta: torch.Tensor) -> torch.Tensor:
    """The referable score with patch_delta [B, C, h, w] added to the last block's ln_1 output at the patch
    positions, by VisionTransformer's own steps (no hooks): what Grad-CAM's gradient must differentiate."""
    tower = model.backbone.visual
    blocks = tower.transformer.resblocks
    x = tower._embeds(images)
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    normed = last.ln_1(x)
    delta = patch_delta.flatten(2).transpose(1, 2)                     # row-major grid order
    normed = torch.cat([normed[:, :1], normed[:, 1:] + delta], dim=1)
    x = x + last.ls_1(last.attention(q_x=normed))
    x = x + last.ls_2(last.mlp(last.ln_2(x)))
    pooled, tokens = tower._pool(x)
    pooled = pooled @ tower.proj
    return model.forward_heads(pooled, tokens @ tower.proj)["ordinal_logits"][:, 1].sum()


def test_vit_gradients_match_finite_differences_of_the_class_token_path():
    model = tiny_model("edgeretina-tiny-vit").double().eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    activations, gradients = activations_and_gradients(model, images)
    assert gradients.shape == (2, model.backbone.visual.transformer.width, 4, 4)
    assert float(gradients.abs().max()) > 0
    with torch.no_grad():
        zero = torch.zeros_like(gradients)
        assert float(_score_from_last_ln1(model, images, zero)) == pytest.approx(
            float(model(images)["ordinal_logits"][:, 1].sum()), rel=1e-9)
        for seed in (0, 1):
            direction = torch.randn(gradients.shape, generator=torch.Generator().manual_seed(seed),
                                    dtype=torch.float64)
            eps = 1e-5
            numeric = (_score_from_last_ln1(model, images, eps * direction)
                       - _score_from_last_ln1(model, images, -eps * direction)) / (2 * eps)
            assert float(numeric) == pytest.approx(float((gradients * direction).sum()), rel=1e-6)


# --- the Grad-CAM++ weights against a hand computation -------------------------------------------

def test_gradcam_pp_weights_follow_the_alpha_formula_by_hand():
    # two channels, 1 x 3 grid, the same mean gradient (0.2): Grad-CAM weighs them alike, Grad-CAM++ not
    g = torch.tensor([[[[0.6, 0.0, 0.0]], [[0.2, 0.2, 0.2]]]], dtype=torch.float64)
    a = torch.tensor([[[[1.0, 2.0, 0.5]], [[0.5, 1.0, 3.0]]]], dtype=torch.float64)
    plain = gradcam_weights(g)
    assert plain[0, 0] == pytest.approx(0.2) and plain[0, 1] == pytest.approx(0.2)

    def by_hand(grads, acts):
        total = sum(acts)
        weight = 0.0
        for gi in grads:
            if gi == 0:
                continue
            alpha = gi ** 2 / (2 * gi ** 2 + total * gi ** 3)
            weight += alpha * max(gi, 0.0)
        return weight

    want = [by_hand([0.6, 0.0, 0.0], [1.0, 2.0, 0.5]), by_hand([0.2, 0.2, 0.2], [0.5, 1.0, 3.0])]
    got = gradcam_pp_weights(g, a)[0].tolist()
    assert got == pytest.approx(want, rel=1e-12)
    assert want[0] == pytest.approx(0.6 / (2 + 3.5 * 0.6)) and want[1] == pytest.approx(3 * 0.2 / (2 + 4.5 * 0.2))
    assert abs(got[0] - got[1]) > 0.05
    # a negative gradient gives no weight; zero gradients give alpha 0, not 0/0
    assert gradcam_pp_weights(-g, a)[0].tolist() == [0.0, 0.0]
    assert gradcam_pp_weights(torch.zeros_like(g), a)[0].tolist() == [0.0, 0.0]


# --- the model is left as found ------------------------------------------------------------------

def test_model_state_is_left_as_found():
    model = tiny_model("edgeretina-tiny-vit")
    model.train()
    for p in model.backbone.parameters():      # a frozen tower kept in eval inside a training model
        p.requires_grad_(False)
    model.backbone.eval()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    assert len(set(modes.values())) == 2
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():                      # the caller's no_grad does not stop it
        maps = grad_cam(model, images, method="gradcam++")
    assert maps.any()
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())


def test_eval_mode_during_the_call():
    """Dropout-free towers give the same map in train and eval mode only if the call runs in eval:
    a ResNet's BatchNorm in train mode would use batch statistics."""
    model = tiny_model("edgeretina-tiny-rn")
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    in_eval = grad_cam(model.eval(), images, method="gradcam++")
    in_train = grad_cam(model.train(), images, method="gradcam++")
    assert model.training
    np.testing.assert_allclose(in_train, in_eval, atol=1e-6)


# --- clear errors --------------------------------------------------------------------------------

def test_targets_name_their_cumulative_logit():
    """CORAL shares one weight vector across its logits, so every target has the same gradient (the
    hand-built test above shows the same map); which column a target names is checked here."""
    assert ordinal_column("referable") == 1
    assert [ordinal_column(k) for k in (1, 2, 3, 4)] == [0, 1, 2, 3]
    assert ordinal_column(np.int64(4)) == 3


@pytest.mark.parametrize("target", [0, 5, "severe", True, 2.0, None])
def test_unknown_target_is_a_config_error(target):
    model = tiny_model("edgeretina-tiny-rn")
    with pytest.raises(ConfigError, match="target"):
        grad_cam(model, torch.zeros(1, 3, 64, 64), target=target)


def test_unknown_method_and_bad_images_are_config_errors():
    model = tiny_model("edgeretina-tiny-rn")
    with pytest.raises(ConfigError, match="method"):
        grad_cam(model, torch.zeros(1, 3, 64, 64), method="scorecam")
    with pytest.raises(ConfigError, match=r"\[B, 3, H, W\]"):
        grad_cam(model, torch.zeros(3, 64, 64))


def test_a_site_off_the_score_path_is_refused(monkeypatch):
    """The model's tokens are a side branch: the ResNet's attnpool.v_proj runs only for them (the pool
    itself calls the functional attention with v_proj's weights), so the score cannot depend on it."""
    import edgeretina.training.gradcam as gradcam

    model = tiny_model("edgeretina-tiny-rn")
    site = ActivationSite(model.backbone.visual.attnpool.v_proj, "NLC", 0, "attnpool.v_proj (tokens branch)")
    monkeypatch.setattr(gradcam, "activation_site", lambda _model: site)
    with pytest.raises(ConfigError, match="does not depend on attnpool.v_proj"):
        grad_cam(model, torch.zeros(1, 3, 64, 64))
    assert not site.module._forward_hooks
