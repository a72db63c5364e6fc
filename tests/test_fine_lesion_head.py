"""The fine lesion head (stride-8 lesion maps, ResNet towers), SiAN's presence Dice and the lesion-to-grade
side connection (training/model.py, training/losses.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgeretina.errors import ConfigError
from edgeretina.grades import LESION_CODES
from edgeretina.preprocess import PreprocessConfig
from edgeretina.training.backbone import BackboneConfig
from edgeretina.training.data import to_model_input
from edgeretina.training.losses import lesion_loss
from edgeretina.training.model import GraderModel, ModelConfig
from test_saliency_graph import _disc  # noqa: E402  (the same synthetic fundus disc)

L = len(LESION_CODES)


def _model(**kwargs) -> GraderModel:
    torch.manual_seed(0)
    return GraderModel(ModelConfig(backbone=BackboneConfig(name="edgeretina-tiny-rn", image_size=64), lesion_head=True, **kwargs)).eval()


def _inputs(model, images_u8):
    return to_model_input(images_u8, PreprocessConfig(image_size=64, mean=tuple(model.backbone.mean),
                                                      std=tuple(model.backbone.std)))


def test_fine_maps_are_four_times_the_patch_grid_and_start_from_the_patch_answer():
    model = _model(lesion_detail="fine")
    h, w = model.grid_size
    assert model.lesion_grid_size == (4 * h, 4 * w)
    with torch.no_grad():
        out = model(_inputs(model, np.full((2, 64, 64, 3), 150, np.uint8)))   # all field: no restriction
    assert out["lesion_logits"].shape == (2, L, 4 * h, 4 * w)
    assert out["lesion_coarse_logits"].shape == (2, L, h, w)
    upsampled = F.interpolate(out["lesion_coarse_logits"], scale_factor=4.0, mode="nearest")
    torch.testing.assert_close(out["lesion_logits"], upsampled, atol=1e-5, rtol=0)   # zero refinement at start
    with torch.no_grad():
        model.fine_lesion_head.refine[-1].bias.fill_(1.0)
        moved = model(_inputs(model, np.full((1, 64, 64, 3), 150, np.uint8)))["lesion_logits"]
    torch.testing.assert_close(moved, upsampled[:1] + 1.0, atol=1e-5, rtol=0)


def test_fine_cells_outside_the_field_carry_no_lesion():
    model = _model(lesion_detail="fine")
    with torch.no_grad():
        model.lesion_head.bias.fill_(4.0)            # every lesion everywhere, unless the field says otherwise
        image = _disc()
        probs = torch.sigmoid(model(_inputs(model, image))["lesion_logits"])[0].numpy()
    gh, gw = model.lesion_grid_size
    k = 64 // gh
    fraction = (image[0].max(axis=-1) > 8).reshape(gh, k, gw, k).mean(axis=(1, 3))
    outside, inside = fraction <= 0.5, fraction >= 0.95
    assert outside.any() and inside.any()
    assert probs[:, outside].max() < 0.01 and probs[:, inside].min() > 0.95


def test_fine_detail_needs_a_stride_8_tower_and_the_lesion_head():
    with pytest.raises(ConfigError, match="need the lesion head"):
        ModelConfig(lesion_detail="fine")
    with pytest.raises(ConfigError, match="need the lesion head"):
        ModelConfig(lesion_to_grade=True)
    with pytest.raises(ConfigError, match="lesion detail must be one of"):
        ModelConfig(lesion_head=True, lesion_detail="pixel")
    with pytest.raises(ConfigError, match="nothing finer than its patch grid|stride-8"):
        GraderModel(ModelConfig(backbone=BackboneConfig(name="edgeretina-tiny-vit", image_size=64), lesion_head=True,
                                lesion_detail="fine"), for_checkpoint=True)
    config = ModelConfig(backbone=BackboneConfig(name="edgeretina-tiny-rn", image_size=64), lesion_head=True, lesion_detail="fine",
                         lesion_to_grade=True)
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_side_connection_moves_every_ordinal_logit_by_the_weighted_presences():
    model = _model(lesion_to_grade=True)
    x = _inputs(model, np.full((2, 64, 64, 3), 150, np.uint8))
    with torch.no_grad():
        before = model(x)
        weights = torch.arange(1.0, L + 1.0)
        model.lesion_side.weight.copy_(weights[None])
        after = model(x)
    torch.testing.assert_close(before["ordinal_logits"], model.coral_weight(model.projection(
        model.forward_features(x)[0])) + model.coral_bias)   # starts as no connection at all
    presence = torch.sigmoid(after["lesion_logits"].flatten(2).amax(-1))
    shift = (presence * weights).sum(-1, keepdim=True)
    torch.testing.assert_close(after["ordinal_logits"] - before["ordinal_logits"], shift.expand(-1, 4))


def test_presence_dice_punishes_a_lesion_peak_in_an_image_without_that_lesion():
    targets = torch.zeros(4, L, 4, 4)
    targets[:2, 0, 1, 1] = 1.0                       # two images have one MA cell, two have none
    perfect = torch.where(targets > 0, 12.0, -12.0)
    assert float(lesion_loss(perfect, targets)) < 0.02
    spurious = perfect.clone()
    spurious[2, 0, 3, 3] = 12.0                      # an image without MA shows a confident MA cell
    # the map Dice of an empty image can only see the background; presence Dice over the batch sees the
    # false image-level positive: 1 - 2*2/(3 + 2) = 0.2 on MA, /L over the types, on top of BCE 12/(16*L*4)
    extra = float(lesion_loss(spurious, targets) - lesion_loss(perfect, targets))
    assert extra > 0.2 / L + 0.0


def test_fine_training_exports_and_the_runtime_reads_the_fine_map(phantom_train, phantom_test, tmp_path):
    from edgeretina.bundle import load_bundle
    from edgeretina.dataset import read_labels
    from edgeretina.export import ExportConfig, export
    from edgeretina.runtime import Grader
    from edgeretina.runtime.backends import create_runner
    from edgeretina.training.checkpoint import load_checkpoint
    from edgeretina.training.loop import TrainConfig, train

    config = ModelConfig(backbone=BackboneConfig(name="edgeretina-tiny-rn", image_size=64), lesion_head=True, lesion_detail="fine",
                         lesion_to_grade=True)
    result = train(TrainConfig(data=phantom_train, out=tmp_path / "f.pt", epochs=1, batch_size=16, workers=1,
                               val_fraction=0.2, model=config), log=lambda _: None, show_progress=False)
    ckpt = load_checkpoint(result.checkpoint)
    losses = ckpt.summary["history"][0]["loss"]
    assert {"lesion", "lesion_coarse"} <= set(losses)
    assert ckpt.model.fine_lesion_head.refine[-1].weight.abs().sum() > 0   # the refinement learned
    bundle = export(ExportConfig(checkpoint=result.checkpoint, out=tmp_path / "b", reference_images=phantom_test,
                                 reference_count=4), log=lambda _: None)
    manifest = load_bundle(bundle).manifest
    gh, gw = ckpt.model.lesion_grid_size
    assert manifest.outputs["shapes"]["lesion_logits"] == ["B", L, gh, gw]
    x = _inputs(ckpt.model, _disc())
    expected = ckpt.model(x)
    got = create_runner("onnxruntime", bundle / "model.onnx").run(x.numpy())
    for name in ("lesion_logits", "ordinal_logits"):
        np.testing.assert_allclose(got[name], expected[name].detach().numpy(), atol=2e-4)
    graded = next(Grader(bundle, threads=1).grade_iter([read_labels(phantom_test)[0].path]))
    assert [entry["code"] for entry in graded.record.lesions] == list(LESION_CODES)


def test_image_level_labels_come_from_code_or_count_columns():
    from pathlib import Path

    from edgeretina.dataset import LabeledImage
    from edgeretina.errors import DatasetError
    from edgeretina.training.data import image_lesion_labels

    counts = {f"n_{code}": str(i) for i, code in enumerate(LESION_CODES)}      # n_MA=0, n_HE=1, ...
    flags = {code: "1" if code == "EX" else "0" for code in LESION_CODES}
    items = [LabeledImage(Path("a.png"), "a", 2, extra=counts), LabeledImage(Path("b.png"), "b", 1, extra=flags)]
    labels = image_lesion_labels(items)
    assert labels.tolist() == [[0, 1, 1, 1, 1, 1], [int(code == "EX") for code in LESION_CODES]]
    with pytest.raises(DatasetError, match="c: no image-level label for MA"):
        image_lesion_labels([LabeledImage(Path("c.png"), "c", 0)])
    with pytest.raises(DatasetError, match="not a number"):
        image_lesion_labels([LabeledImage(Path("d.png"), "d", 0, extra={**counts, "n_MA": "many"})])


def test_presence_loss_sees_only_each_type_s_peak():
    labels = torch.tensor([[1.0] + [0.0] * (L - 1), [0.0] * L])
    logits = torch.full((2, L, 4, 4), -12.0)
    logits[0, 0, 2, 3] = 12.0                        # one MA cell in the image labelled MA: nothing to learn
    assert float(lesion_loss(logits, labels)) < 0.02
    moved = logits.clone()
    moved[0, 0, 2, 3], moved[0, 0, 0, 0] = -12.0, 12.0   # where the cell is does not matter to weak labels
    assert float(lesion_loss(moved, labels)) == pytest.approx(float(lesion_loss(logits, labels)))
    missed = torch.full((2, L, 4, 4), -12.0)
    assert float(lesion_loss(missed, labels)) > 1.0    # the labelled MA has no cell


def test_weak_training_learns_presence_from_image_labels_alone(phantom_train, tmp_path):
    import shutil

    from edgeretina.training.checkpoint import load_checkpoint
    from edgeretina.training.loop import TrainConfig, train

    data = tmp_path / "nomasks"
    shutil.copytree(phantom_train.parent, data, ignore=shutil.ignore_patterns("masks"))
    config = ModelConfig(backbone=BackboneConfig(name="edgeretina-tiny-rn", image_size=64), lesion_head=True)
    from edgeretina.errors import DatasetError

    with pytest.raises(ConfigError, match="add --lesion-head"):
        TrainConfig(data=data / phantom_train.name, out=tmp_path / "x.pt", lesion_labels="image")
    with pytest.raises(DatasetError, match="lesion masks"):
        train(TrainConfig(data=data / phantom_train.name, out=tmp_path / "m.pt", epochs=1, workers=1, model=config),
              log=lambda _: None, show_progress=False)
    result = train(TrainConfig(data=data / phantom_train.name, out=tmp_path / "w.pt", epochs=1, batch_size=16,
                               workers=1, val_fraction=0.2, model=config, lesion_labels="image"),
                   log=lambda _: None, show_progress=False)
    ckpt = load_checkpoint(result.checkpoint)
    assert "lesion" in ckpt.summary["history"][0]["loss"]
    assert len(ckpt.grading.lesion_thresholds) == L            # fitted on the image-level validation labels
    assert "lesion_thresholds" in ckpt.summary["calibration"]


def test_with_masks_presence_is_earned_on_the_lesion_cells_not_on_a_fixed_cell():
    from edgeretina.training.losses import earned_presence

    targets = torch.zeros(2, L, 16)
    targets[0, 2, 5] = 1.0                           # image 0 has one EX cell, image 1 none
    probs = torch.full((2, L, 16), 0.01)
    probs[:, 2, 15] = 0.99                           # EX "present" at a fixed cell of both images
    probs[0, 2, 5] = 0.30                            # the lesion cell itself is only lukewarm
    presence = earned_presence(probs, targets)
    assert float(presence[0, 2]) == pytest.approx(0.30)   # what the lesion's cells say, not the fixed cell
    assert float(presence[1, 2]) == pytest.approx(0.99)   # an image without EX: any cell is a false positive
    assert float(presence[0, 0]) == pytest.approx(0.01)


def test_a_cell_of_another_lesion_type_is_a_hard_negative():
    from edgeretina.training.losses import LESION_HARD_NEGATIVE_WEIGHT, LESION_POS_WEIGHT, lesion_cell_weights

    targets = torch.zeros(1, L, 2, 2)
    targets[0, LESION_CODES.index("CWS"), 0, 0] = 1.0      # a cotton-wool spot in cell (0, 0)
    weights = lesion_cell_weights(targets)[0]
    ex, cws = LESION_CODES.index("EX"), LESION_CODES.index("CWS")
    assert float(weights[cws, 0, 0]) == LESION_POS_WEIGHT
    assert float(weights[ex, 0, 0]) == LESION_HARD_NEGATIVE_WEIGHT > 1.0   # EX must not fire on the CWS
    assert float(weights[ex, 1, 1]) == float(weights[cws, 1, 1]) == 1.0    # background
