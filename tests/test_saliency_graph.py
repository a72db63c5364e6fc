"""The patch maps are restricted to the fundus field in the graph (GraderModel.field_weights)."""

import numpy as np
import pytest
import torch

from edgeretina.preprocess import PreprocessConfig
from edgeretina.training.backbone import BackboneConfig
from edgeretina.training.data import to_model_input
from edgeretina.training.model import GraderModel, ModelConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GraderModel(ModelConfig(backbone=BackboneConfig(image_size=64), lesion_head=True)).eval()
    with torch.no_grad():
        m.saliency_bias.fill_(4.0)   # every patch lights up unless the field says otherwise
    return m


def _inputs(model, images_u8: np.ndarray) -> torch.Tensor:
    preprocess = PreprocessConfig(image_size=64, mean=tuple(model.backbone.mean), std=tuple(model.backbone.std))
    return to_model_input(images_u8, preprocess)


def _disc(size: int = 64, radius: float = 0.45) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 <= (radius * size) ** 2
    image = np.zeros((1, size, size, 3), np.uint8)
    image[0][inside] = (150, 60, 30)
    return image


def _patch_fraction(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    h, w = grid
    lit = image[0].max(axis=-1) > 8
    k = lit.shape[0] // h
    return lit.reshape(h, k, w, k).mean(axis=(1, 3))


def test_weights_follow_the_share_of_each_patch_inside_the_field(model):
    image = _disc()
    weights = model.field_weights(_inputs(model, image)).reshape(model.grid_size).numpy()
    fraction = _patch_fraction(image, model.grid_size)
    expected = np.clip((fraction - 0.5) / 0.45, 0.0, 1.0)
    np.testing.assert_allclose(weights, expected, atol=1e-5)
    assert weights.max() == 1.0 and weights.min() == 0.0   # the disc has full and empty patches


def test_patches_outside_the_field_carry_no_evidence(model):
    image = _disc()
    with torch.no_grad():
        out = model(_inputs(model, image))
        pooled, tokens = model.forward_features(_inputs(model, image))
        unrestricted = model.forward_heads(pooled, tokens)
    outside = _patch_fraction(image, model.grid_size) <= 0.5
    saliency = out["saliency"][0].numpy()
    assert outside.any() and (~outside).any()
    assert saliency[outside].max() < 0.01 < unrestricted["saliency"][0].numpy()[outside].min()
    inside = _patch_fraction(image, model.grid_size) >= 0.95
    np.testing.assert_allclose(saliency[inside], unrestricted["saliency"][0].numpy()[inside], rtol=1e-4)
    lesion = torch.sigmoid(out["lesion_logits"][0]).amax(dim=0).numpy()
    free = torch.sigmoid(unrestricted["lesion_logits"][0]).amax(dim=0).numpy()
    assert np.all(lesion[outside] <= free[outside] * 1e-3 + 1e-6)
    # the grade does not depend on the field weights: they only restrict the maps
    torch.testing.assert_close(out["ordinal_logits"], unrestricted["ordinal_logits"])


def test_an_all_black_input_has_no_field(model):
    black = np.zeros((2, 64, 64, 3), np.uint8)
    assert model.field_weights(_inputs(model, black)).abs().max() == 0.0


def test_gated_fusion_by_hand():
    from edgeretina.training.model import GATE_LEVEL, GATE_SHARPNESS, gated_saliency

    deep = torch.tensor([[0.8, 0.4, 0.08, 0.8]])
    shallow = torch.tensor([[0.5, 0.5, 1.0, 0.05]])
    fused = gated_saliency(deep, shallow)[0].numpy()
    dn, sn = deep[0].numpy() / 0.8, shallow[0].numpy() / 1.0
    expected = 0.8 / (1 + np.exp(-GATE_SHARPNESS * (dn - GATE_LEVEL))) * np.sqrt(dn * sn)
    np.testing.assert_allclose(fused, expected, rtol=1e-4)
    # the shallow layer's strongest response (index 2: an anatomy edge the deep layer does not see) is gated
    # off; where both layers agree the map keeps the deep peak's scale
    assert fused[2] < 0.05 * fused[0] and fused.max() <= 0.8 + 1e-6


@pytest.mark.parametrize("arch", ["edgeretina-tiny-vit", "edgeretina-tiny-rn"])
def test_gated_model_gives_both_maps_and_the_cache_path_agrees(arch):
    from edgeretina.training.feature_cache import FeatureCache

    torch.manual_seed(0)
    model = GraderModel(ModelConfig(backbone=BackboneConfig(name=arch, image_size=64), saliency="gated")).eval()
    x = _inputs(model, np.concatenate([_disc(), _disc(radius=0.3)]))
    with torch.no_grad():
        out = model(x)
        pooled, tokens, shallow = model.forward_features(x)
        cache = FeatureCache(pooled=pooled, tokens=tokens, shallow=shallow, field=model.field_weights(x))
        from_cache = model.forward_heads(*cache.take(np.arange(2)[:, None].ravel()))
    h, w = model.grid_size
    assert shallow.shape == (2, h * w, model.backbone.shallow_dim)
    assert out["saliency"].shape == out["saliency_deep"].shape == out["shallow_logits"].shape == (2, h, w)
    assert not torch.allclose(out["saliency"], out["saliency_deep"])
    for name in ("saliency", "saliency_deep", "shallow_logits", "ordinal_logits"):
        torch.testing.assert_close(from_cache[name], out[name])
    assert "saliency_deep" not in model.output_names     # the graph ships one map: the gated one


def test_gated_saliency_is_refused_for_a_tower_without_a_shallow_path():
    from edgeretina.errors import ConfigError

    with pytest.raises(ConfigError, match="saliency must be one of"):
        ModelConfig(saliency="shallow")
    with pytest.raises(ConfigError, match="shallow"):
        GraderModel(ModelConfig(backbone=BackboneConfig(name="timm/test_vit"), saliency="gated"), for_checkpoint=True)


def test_gated_training_learns_the_shallow_head_and_exports(phantom_train, phantom_test, tmp_path):
    from edgeretina.export import ExportConfig, export
    from edgeretina.bundle import load_bundle
    from edgeretina.training.checkpoint import load_checkpoint
    from edgeretina.training.loop import TrainConfig, train

    result = train(TrainConfig(data=phantom_train, out=tmp_path / "g.pt", epochs=1, batch_size=16, workers=1,
                               val_fraction=0.2, model=ModelConfig(backbone=BackboneConfig(image_size=64),
                                                                   saliency="gated")),
                   log=lambda _: None, show_progress=False)
    ckpt = load_checkpoint(result.checkpoint)
    assert ckpt.model_config.saliency == "gated"
    assert "shallow" in ckpt.summary["history"][0]["loss"]
    bundle = export(ExportConfig(checkpoint=result.checkpoint, out=tmp_path / "b", reference_images=phantom_test,
                                 reference_count=4), log=lambda _: None)
    manifest = load_bundle(bundle).manifest
    assert manifest.saliency["method"].startswith("gated multi-layer (ELLG)")
    assert all(gate["passed"] for gate in manifest.export["gate"].values())
    from edgeretina.runtime.backends import create_runner

    x = _inputs(ckpt.model, _disc())
    expected = ckpt.model(x)["saliency"].detach().numpy()
    got = create_runner("onnxruntime", bundle / "model.onnx").run(x.numpy())["saliency"]
    np.testing.assert_allclose(got, expected, atol=2e-4)
    # INT8 finds the backbone by its ONNX scope: the gated forward must keep it
    int8 = export(ExportConfig(checkpoint=result.checkpoint, out=tmp_path / "b8", target="cpu",
                               reference_images=phantom_test, reference_count=4, calibration_count=8, gate="warn"),
                  log=lambda _: None)
    assert load_bundle(int8).manifest.artifact("model").precision.startswith("int8")
