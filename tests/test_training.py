import numpy as np
import pytest
import torch

from edgeretina.errors import CheckpointError
from edgeretina.grades import NUM_GRADES
from edgeretina.training.backbone import BackboneConfig
from edgeretina.grades import ordinal_grades
from edgeretina.training.calibration import calibrate, fit_temperature, fit_thresholds
from edgeretina.training.checkpoint import load_checkpoint
from edgeretina.training.losses import coral_loss, coral_targets
from edgeretina.training.model import GraderModel, ModelConfig


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GraderModel(ModelConfig(backbone=BackboneConfig(image_size=64), lesion_head=True)).eval()


def test_forward_gives_every_head_in_one_pass(tiny_model):
    out = tiny_model(torch.randn(3, 3, 64, 64))
    h, w = tiny_model.grid_size
    assert out["ordinal_logits"].shape == (3, NUM_GRADES - 1)
    assert out["prototype_logits"].shape == (3, NUM_GRADES)
    assert torch.allclose(out["embedding"].norm(dim=1), torch.ones(3), atol=1e-5)
    assert out["saliency"].shape == (3, h, w)
    assert float(out["saliency"].detach().min()) >= 0.0 and float(out["saliency"].detach().max()) <= 1.0
    assert out["lesion_logits"].shape == (3, 6, h, w)
    assert tiny_model.output_names[-1] == "lesion_logits"


def test_text_prototypes_are_frozen_unit_buffers(tiny_model):
    names = {name for name, _ in tiny_model.named_parameters()}
    assert "grade_prototypes" not in names
    norms = tiny_model.grade_prototypes.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)
    # distinct texts give distinct prototypes
    sims = tiny_model.grade_prototypes @ tiny_model.grade_prototypes.T
    assert float((sims - torch.eye(5)).abs().max()) < 0.9999


def test_coral_targets_and_loss():
    grades = torch.tensor([0, 2, 4])
    assert coral_targets(grades).tolist() == [[0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    good = torch.tensor([[-9.0, -9, -9, -9], [9, 9, -9, -9], [9, 9, 9, 9]])
    assert float(coral_loss(good, grades)) < 1e-3 < float(coral_loss(-good, grades))


def test_calibration_recovers_shifted_thresholds():
    rng = np.random.default_rng(0)
    grades = rng.integers(0, 5, 2000)
    # logits of a model that is right but whose second cut-off sits 1.5 too high
    logits = (grades[:, None] - np.arange(4)[None, :] - 0.5) * 3.0 + rng.normal(0, 0.5, (2000, 4))
    logits[:, 1] += 1.5
    shifted = ordinal_grades(logits, [0, 0, 0, 0])
    thresholds = fit_thresholds(logits, grades)
    assert thresholds[1] == pytest.approx(1.5, abs=0.4)
    assert (ordinal_grades(logits, thresholds) == grades).mean() > (shifted == grades).mean()
    assert 0.05 < fit_temperature(logits, grades) < 20
    assert calibrate(logits, grades).grading.thresholds == thresholds


def test_training_writes_a_self_describing_checkpoint(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint.checkpoint)
    assert ckpt.preprocess.image_size == 64
    assert ckpt.model_config.backbone.name == "edgeretina-tiny-vit"
    assert ckpt.bank is not None and ckpt.bank.embeddings.shape[1] == ckpt.model.backbone.embed_dim
    assert len(ckpt.bank.case_ids) == len(ckpt.bank.grades) == ckpt.summary["train"]["n"]
    assert ckpt.summary["schedule"]["epochs_run"] == 2
    assert "qwk" in ckpt.summary["val_metrics"]
    from edgeretina.training.precision import resolve_precision
    assert ckpt.summary["schedule"]["precision"] == resolve_precision("auto").name   # what this CPU computes natively
    # prototypes survive the round trip without re-running the text tower
    assert float(ckpt.model.grade_prototypes.norm(dim=1).min()) > 0.99


def test_bad_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"format": "something-else"}, bad)
    with pytest.raises(CheckpointError, match="not an edgeretina checkpoint"):
        load_checkpoint(bad)


def test_schedule_fits_the_time_budget():
    from edgeretina.training.loop import _WarmupCosine, _epochs_within_budget

    schedule = _WarmupCosine(total_steps=100, warmup_fraction=0.1)
    assert schedule(0) == pytest.approx(0.1) and schedule(9) == pytest.approx(1.0)
    assert schedule(99) < 0.01
    schedule.total_steps = 50                        # shortened: the decay now ends at step 50
    assert schedule(49) < 0.01 < schedule(30)
    # after the first epoch, 100 s left: the epoch run plus as many more as end by the deadline
    def fits(planned: int, epoch_seconds: float, left: float) -> int:
        return _epochs_within_budget(planned, epoch_seconds, deadline=1000.0 + left, now=1000.0)

    assert fits(30, 20.0, 100.0) == 6                # 5 more end exactly at the deadline
    assert fits(30, 20.0, 99.999) == 5               # the 5th would end after it
    assert fits(30, 20.0, 119.999) == 6 and fits(30, 20.0, 120.0) == 7
    assert fits(3, 1.0, 100.0) == 3                  # never more than planned
    assert fits(30, 500.0, 100.0) == 1               # the first epoch alone overran: it is kept
    assert fits(30, 20.0, -5.0) == 1                 # already past the deadline
    assert fits(30, 0.0, 100.0) == 30                # an epoch too short to time


def test_augmentation_moves_lesion_grids_with_the_image():
    from edgeretina.training.data import augment

    images = np.zeros((16, 64, 64, 3), np.uint8)
    images[:, 2:14, 50:62] = 200                     # a bright blob in grid cell (0, 3) of a 4x4 grid
    grids = np.zeros((16, 6, 4, 4), np.uint8)
    grids[:, 1, 0, 3] = 1
    out, out_grids = augment(images, np.random.default_rng(3), grids)
    for image, grid in zip(out, out_grids):
        cell = np.unravel_index(np.argmax(grid[1]), (4, 4))
        bright = image.sum(-1).reshape(4, 16, 4, 16).sum(axis=(1, 3))
        assert np.unravel_index(np.argmax(bright), (4, 4)) == cell
        assert grid.sum() == 1


def test_lesion_head_trains_from_phantom_masks_and_exports(phantom_train, phantom_test, tmp_path):
    import onnx
    from edgeretina.export import ExportConfig, export
    from edgeretina.runtime.backends import create_runner
    from edgeretina.training.loop import TrainConfig, train

    config = TrainConfig(data=phantom_train, out=tmp_path / "lesion.pt", epochs=1, batch_size=16,
                         model=ModelConfig(backbone=BackboneConfig(image_size=64), lesion_head=True), workers=1)
    result = train(config, log=lambda _: None, show_progress=False)
    assert "lesion" in load_checkpoint(result.checkpoint).summary["history"][0]["loss"]
    bundle = export(ExportConfig(checkpoint=result.checkpoint, out=tmp_path / "bundle", reference_images=phantom_test,
                                 reference_count=4), log=lambda _: None)
    graph = onnx.load(str(bundle / "model.onnx"))
    assert graph.graph.output[-1].name == "lesion_logits"
    ckpt = load_checkpoint(result.checkpoint)
    x = torch.randn(2, 3, 64, 64)
    expected = ckpt.model(x)["lesion_logits"].detach().numpy()
    got = create_runner("onnxruntime", bundle / "model.onnx").run(x.numpy())["lesion_logits"]
    np.testing.assert_allclose(got, expected, atol=2e-4)
    from edgeretina.dataset import read_labels
    from edgeretina.runtime import Grader
    record = Grader(bundle).grade([read_labels(phantom_test)[0].path])[0]
    assert [entry["code"] for entry in record.lesions] == ["MA", "HE", "EX", "CWS", "NV", "PRH"]
    assert all(0.0 <= entry["probability"] <= 1.0 for entry in record.lesions)


@pytest.mark.parametrize("requested, device, flags, cuda_bf16, expected", [
    ("auto", "cpu", ["avx2"], None, "fp32"),                        # no bf16 units: bf16 would be emulated
    ("auto", "cpu", ["avx2", "avx512f", "avx512_bf16"], None, "bf16"),
    ("auto", "cpu", ["avx2", "amx_bf16", "amx_int8"], None, "bf16"),
    ("fp32", "cpu", ["avx512_bf16"], None, "fp32"),
    ("bf16", "cpu", ["avx2"], None, "bf16"),                         # asked for: honoured, with a warning
    ("auto", "cuda", [], True, "bf16"),
    ("auto", "cuda", [], False, "fp16"),
])
def test_training_precision_fits_the_hardware(requested, device, flags, cuda_bf16, expected):
    from edgeretina.training.precision import resolve_precision

    resolved = resolve_precision(requested, device, flags=flags, cuda_bf16=cuda_bf16)
    assert resolved.name == expected and resolved.reason
    if requested == "bf16" and "avx512_bf16" not in flags:
        assert "warning" in resolved.reason


def test_unusable_training_precisions_are_config_errors():
    from edgeretina.errors import ConfigError
    from edgeretina.training.loop import TrainConfig
    from edgeretina.training.precision import resolve_precision

    with pytest.raises(ConfigError, match="fp16 training is for CUDA"):
        resolve_precision("fp16", "cpu", flags=["avx2"])
    with pytest.raises(ConfigError, match="no bf16"):
        resolve_precision("bf16", "cuda", cuda_bf16=False)
    with pytest.raises(ConfigError, match="precision must be one of"):
        TrainConfig(data="csv:x.csv", out="y.pt", precision="int4")


# ---------------------------------------------------------------- focal loss on the prototype logits

def test_focal_loss_with_gamma_zero_is_cross_entropy():
    import torch.nn.functional as F
    from edgeretina.training.losses import focal_loss

    torch.manual_seed(0)
    logits, targets = torch.randn(16, 5) * 3, torch.randint(0, 5, (16,))
    for smoothing in (0.0, 0.05, 0.3):
        expected = F.cross_entropy(logits, targets, label_smoothing=smoothing)
        assert float(focal_loss(logits, targets, 0.0, smoothing)) == pytest.approx(float(expected), rel=1e-6)


def test_focal_loss_by_hand_on_two_samples():
    """Sample 1: equal logits, p = 0.2 everywhere, target 2: -(1 - 0.2)^2 ln 0.2 = 0.64 ln 5.
    Sample 2: logits (ln 4, 0, 0, 0, 0), p_0 = 4 / 8 = 0.5, target 0: -(1 - 0.5)^2 ln 0.5 = 0.25 ln 2."""
    import math
    from edgeretina.training.losses import focal_loss

    logits = torch.tensor([[0.0, 0, 0, 0, 0], [math.log(4.0), 0, 0, 0, 0]])
    expected = (0.64 * math.log(5.0) + 0.25 * math.log(2.0)) / 2
    assert float(focal_loss(logits, torch.tensor([2, 0]), gamma=2.0)) == pytest.approx(expected, rel=1e-6)
    # with smoothing eps the target mass 1 - eps + eps / 5 and eps / 5 elsewhere, each times its (1 - p_c)^2
    eps = 0.1
    q = [eps / 5] * 5
    q[0] += 1 - eps
    p = [0.5, 0.125, 0.125, 0.125, 0.125]
    second = -sum(qc * (1 - pc) ** 2 * math.log(pc) for qc, pc in zip(q, p))
    got = float(focal_loss(logits, torch.tensor([2, 0]), gamma=2.0, label_smoothing=eps))
    assert got == pytest.approx((0.64 * math.log(5.0) + second) / 2, rel=1e-6)


def test_focal_loss_down_weights_easy_examples():
    import torch.nn.functional as F
    from edgeretina.training.losses import focal_loss

    easy = torch.tensor([[6.0, 0, 0, 0, 0]])        # p_target ~ 0.99
    hard = torch.tensor([[0.5, 0, 0, 0, 0]])        # p_target ~ 0.29
    target = torch.tensor([0])

    def ratio(logits):
        return float(focal_loss(logits, target, gamma=2.0)) / float(F.cross_entropy(logits, target))

    assert ratio(easy) < 1e-3 < 0.4 < ratio(hard) < 1.0
    assert ratio(hard) < float(focal_loss(hard, target, gamma=0.5)) / float(F.cross_entropy(hard, target))


def test_loss_weights_settings_reach_the_prototype_loss():
    import torch.nn.functional as F
    from edgeretina.errors import ConfigError
    from edgeretina.training.losses import LossWeights, focal_loss, grader_loss

    torch.manual_seed(1)
    outputs = {"ordinal_logits": torch.randn(6, 4), "prototype_logits": torch.randn(6, 5) * 2,
               "saliency_logits": torch.randn(6, 2, 2)}
    grades = torch.tensor([0, 1, 2, 3, 4, 0])
    _, parts = grader_loss(outputs, grades, LossWeights(focal_gamma=0.0, label_smoothing=0.2))
    assert parts["prototype"] == pytest.approx(float(F.cross_entropy(outputs["prototype_logits"], grades,
                                                                     label_smoothing=0.2)), rel=1e-6)
    _, parts = grader_loss(outputs, grades, LossWeights())
    assert LossWeights().focal_gamma == 2.0 and LossWeights().label_smoothing == 0.05
    assert parts["prototype"] == pytest.approx(float(focal_loss(outputs["prototype_logits"], grades, 2.0, 0.05)),
                                               rel=1e-6)
    for bad in (dict(focal_gamma=-1.0), dict(label_smoothing=1.0), dict(prototype=-0.5)):
        with pytest.raises(ConfigError):
            LossWeights(**bad)


# ---------------------------------------------------------------- augmentation that keeps the field of view

def _disc_image(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    disc = (xx + 0.5 - size / 2) ** 2 + (yy + 0.5 - size / 2) ** 2 <= (size / 2) ** 2
    image = np.zeros((size, size, 3), np.uint8)
    image[disc] = np.random.default_rng(seed).integers(40, 180, (int(disc.sum()), 3))
    return image, disc


def test_augmentation_keeps_the_outside_black_and_the_circle_its_size(phantom_test):
    from edgeretina.dataset import read_labels
    from edgeretina.preprocess import PreprocessConfig
    from edgeretina.training.augment import AugmentConfig, augment
    from edgeretina.training.data import prepare_images

    prepared = prepare_images(read_labels(phantom_test)[:4], PreprocessConfig(image_size=96), workers=1).images
    strong = AugmentConfig(brightness=0.4, contrast=0.3, colour=0.2, gamma=0.3, blur_probability=0.5)
    geometric = AugmentConfig(brightness=0.0, contrast=0.0, colour=0.0, gamma=0.0, blur_probability=0.0)
    rng = np.random.default_rng(0)
    for config in [strong] * 6 + [geometric] * 6:
        out, _ = augment(prepared, rng, config=config)
        for before, after in zip(prepared, out):
            field = before.max(-1) > 0
            assert after[~field].max() == 0                               # outside the circle: still black
            radius_before = np.sqrt(field.sum() / np.pi)
            radius_after = np.sqrt((after.max(-1) > 0).sum() / np.pi)
            assert 0.97 * radius_before <= radius_after <= radius_before   # the circle keeps its radius
            assert not np.array_equal(before, after)


def test_lesion_grid_follows_a_rotation():
    from edgeretina.training.augment import AugmentParams, apply

    image, _ = _disc_image()
    image[4:12, 20:28] = 250                       # a bright lesion at the centre of grid cell (0, 1) of 4 x 4
    grid = np.zeros((6, 4, 4), np.uint8)
    grid[2, 0, 1] = 1
    for quarter in (1, 2, 3):                       # right angles: exactly np.rot90 (counter-clockwise)
        out, out_grid = apply(image, AugmentParams(angle=90.0 * quarter), grid)
        assert np.array_equal(out_grid, np.rot90(grid, quarter, axes=(1, 2)))
        assert np.array_equal(out, np.rot90(image, quarter))
    for angle, zoom, flip in ((30.0, 1.0, False), (-45.0, 1.08, False), (137.0, 1.05, True), (200.0, 1.1, True)):
        out, out_grid = apply(image, AugmentParams(angle=angle, zoom=zoom, flip_x=flip), grid)
        bright = (out.max(-1) >= 240).astype(float).reshape(4, 16, 4, 16).sum(axis=(1, 3))
        cell = np.unravel_index(np.argmax(bright), (4, 4))
        assert out_grid[2][cell] == 1, (angle, cell, out_grid[2])
        assert 1 <= out_grid.sum() <= 2 and out_grid[[0, 1, 3, 4, 5]].sum() == 0


def test_flips_mirror_image_and_grid():
    from edgeretina.training.augment import AugmentParams, apply

    image, _ = _disc_image(seed=1)
    grid = np.random.default_rng(2).integers(0, 2, (6, 4, 4)).astype(np.uint8)
    out, out_grid = apply(image, AugmentParams(flip_x=True), grid)
    assert np.array_equal(out, image[:, ::-1]) and np.array_equal(out_grid, grid[:, :, ::-1])
    out, out_grid = apply(image, AugmentParams(flip_y=True), grid)
    assert np.array_equal(out, image[::-1]) and np.array_equal(out_grid, grid[:, ::-1])


def test_no_op_augmentation_returns_the_input():
    from edgeretina.errors import ConfigError
    from edgeretina.training.augment import NO_AUGMENTATION, AugmentConfig, AugmentParams, apply, augment

    image, _ = _disc_image(seed=3)
    grid = np.random.default_rng(4).integers(0, 2, (6, 4, 4)).astype(np.uint8)
    for params in (AugmentParams(), AugmentParams(angle=0.0, zoom=1.0), AugmentParams(angle=360.0)):
        out, out_grid = apply(image, params, grid)
        assert np.array_equal(out, image) and np.array_equal(out_grid, grid) and out is not image
    images, grids = np.stack([image, image[::-1]]), np.stack([grid, grid])
    out, out_grids = augment(images, np.random.default_rng(0), grids, config=NO_AUGMENTATION)
    assert np.array_equal(out, images) and np.array_equal(out_grids, grids)
    with pytest.raises(ConfigError):
        AugmentConfig(max_zoom=0.5)
    with pytest.raises(ConfigError):
        AugmentConfig(max_rotation=270.0)
