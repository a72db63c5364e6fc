"""Per-lesion-type presence thresholds: fitted for F1 on held-out images, carried by GradingConfig into
checkpoints and bundle manifests, and used by the runtime's lesion list."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from edgeretina.errors import ConfigError
from edgeretina.grades import LESION_CODES, GradingConfig
from edgeretina.preprocess import FieldOfView, Geometry
from edgeretina.runtime.lesions import find_lesions
from edgeretina.training.calibration import calibrate, fit_lesion_thresholds

MA, HE, EX, CWS, NV, PRH = range(6)

# 13 held-out images; every probability of MA, HE and EX is under 0.5, so at 0.5 their F1 is 0.
# MA: separable; the lowest positive (0.12) catches all 5 positives and no negative: F1 1.
# HE: F1 2/3 both at 0.36 (top 3, all positive) and at 0.26 (top 6, 4 positive): the tie goes to 0.36.
# EX: five positives and three negatives share 0.25, one candidate (F1 10/14); 0.2 adds the sixth
#     positive: F1 12/15 = 0.8. Taking the five positives alone at 0.25 would claim 10/11.
# CWS: 3 positives, NV: 2 negatives (fewer than MIN_TASK_CASES): 0.5 stays.
# PRH: separable at 0.5 already; the highest threshold with F1 1 is the lowest positive, 0.7.
_COLUMNS = {
    MA: ([0.18, 0.16, 0.15, 0.14, 0.12], [0.10, 0.08, 0.05, 0.03, 0.02, 0.02, 0.01, 0.01]),
    HE: ([0.40, 0.38, 0.36, 0.26, 0.10, 0.08], [0.30, 0.28, 0.20, 0.18, 0.16, 0.14, 0.12]),
    EX: ([0.25, 0.25, 0.25, 0.25, 0.25, 0.20], [0.25, 0.25, 0.25, 0.10, 0.05, 0.02, 0.01]),
    CWS: ([0.40, 0.30, 0.20], [0.1] * 10),
    NV: ([0.3] * 11, [0.1, 0.2]),
    PRH: ([0.9, 0.8, 0.75, 0.7, 0.7], [0.4, 0.3, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05]),
}


def _held_out() -> tuple[np.ndarray, np.ndarray]:
    """[13, 6] presence probabilities and truth (positives listed first: the order EX's trap needs)."""
    presence, truth = np.zeros((13, 6)), np.zeros((13, 6), bool)
    for j, (positives, negatives) in _COLUMNS.items():
        presence[:, j] = positives + negatives
        truth[:len(positives), j] = True
    return presence, truth


def test_thresholds_fitted_for_f1_where_every_probability_is_under_one_half():
    thresholds, report = fit_lesion_thresholds(*_held_out())
    assert thresholds == pytest.approx((0.12, 0.36, 0.20, 0.5, 0.5, 0.7))
    assert report["MA"]["f1"] == {"before": 0.0, "after": 1.0}
    assert report["HE"]["f1"] == {"before": 0.0, "after": pytest.approx(2 / 3)}
    assert report["EX"]["f1"] == {"before": 0.0, "after": pytest.approx(0.8)}
    assert report["PRH"]["f1"] == {"before": 1.0, "after": 1.0}
    assert (report["MA"]["positives"], report["MA"]["negatives"]) == (5, 8)
    assert not any("kept" in report[code] for code in ("MA", "HE", "EX", "PRH"))


def test_too_few_cases_on_either_side_keep_one_half_and_say_so():
    thresholds, report = fit_lesion_thresholds(*_held_out())
    assert thresholds[CWS] == thresholds[NV] == 0.5
    assert "3 images with and 10 without CWS" in report["CWS"]["kept"]
    assert "11 images with and 2 without NV" in report["NV"]["kept"]
    assert report["NV"]["f1"]["after"] == report["NV"]["f1"]["before"] == 0.0
    with pytest.raises(ValueError, match=r"\[N, 6\]"):
        fit_lesion_thresholds(np.zeros((13, 5)), np.zeros((13, 5), bool))


def _patch_grids(presence: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image-level numbers as [N, 6, 3, 3] patch logits (the peak in patch (1, 2), the rest far lower) and
    patch targets (a positive marked in patch (0, 0), away from the peak: truth is any patch)."""
    logits = np.full(presence.shape + (3, 3), -9.0, np.float32)
    logits[:, :, 1, 2] = np.log(presence / (1 - presence))
    targets = np.zeros(presence.shape + (3, 3), np.uint8)
    targets[:, :, 0, 0] = truth
    return logits, targets


def test_calibrate_fits_them_from_patch_logits_and_patch_targets():
    presence, truth = _held_out()
    logits, targets = _patch_grids(presence, truth)
    rng = np.random.default_rng(0)
    grades = np.arange(13) % 5
    ordinal = rng.normal(0, 1, (13, 4)) + 2.0 * (grades[:, None] - np.arange(4) - 0.5)
    plain = calibrate(ordinal, grades)
    assert plain.grading.lesion_thresholds is None and "lesion_thresholds" not in plain.report
    result = calibrate(ordinal, grades, lesion_logits=logits, lesion_targets=targets)
    assert result.grading.lesion_thresholds == pytest.approx((0.12, 0.36, 0.20, 0.5, 0.5, 0.7), abs=1e-6)
    assert result.report["lesion_thresholds"]["MA"]["f1"] == {"before": 0.0, "after": 1.0}
    assert result.grading.thresholds == plain.grading.thresholds          # the grade's calibration is unchanged
    # logits without truth: base's thresholds stay, and the report says why
    base = GradingConfig(lesion_thresholds=(0.3,) * 6)
    kept = calibrate(ordinal, grades, base=base, lesion_logits=logits)
    assert kept.grading.lesion_thresholds == (0.3,) * 6
    assert "no lesion truth" in kept.report["lesion_thresholds"]["skipped"]


def test_grading_config_carries_them_and_reads_old_dicts():
    cfg = GradingConfig(thresholds=(0.1, 0.0, -0.2, 0.3), lesion_thresholds=(0.12, 0.36, 0.2, 0.5, 0.5, 0.7))
    assert GradingConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert GradingConfig.from_dict(GradingConfig().to_dict()).lesion_thresholds is None
    old = {k: v for k, v in cfg.to_dict().items() if k != "lesion_thresholds"}
    assert GradingConfig.from_dict(old) == dataclasses.replace(cfg, lesion_thresholds=None)
    with pytest.raises(ValueError, match="need 6 lesion thresholds"):
        GradingConfig(lesion_thresholds=(0.5,) * 5)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="lesion thresholds must lie strictly between 0 and 1"):
            GradingConfig(lesion_thresholds=(0.5,) * 5 + (bad,))


GEOMETRY = Geometry(original_size=(300, 400), crop_box=(40.0, -10.0, 360.0, 310.0),
                    fov=FieldOfView(200.0, 150.0, 160.0, found=False, fraction_visible=0.0))


def test_find_lesions_takes_one_threshold_per_type():
    logits = np.full((6, 16, 16), -6.0, np.float32)
    logits[EX, 8, 8] = logits[EX, 2, 2] = -0.5             # p = 0.378: under 0.5, over 0.3
    logits[HE, 4, 4] = 1.0                                 # p = 0.731: over 0.5, under 0.8
    default = {e["code"]: e for e in find_lesions(logits, GEOMETRY)}
    assert not default["EX"]["present"] and default["HE"]["present"]
    per_type = [0.5, 0.8, 0.3, 0.5, 0.5, 0.5]
    for thresholds in (per_type, tuple(per_type), np.array(per_type)):
        entries = {e["code"]: e for e in find_lesions(logits, GEOMETRY, thresholds)}
        assert entries["EX"]["present"] and entries["EX"]["count"] == 2
        assert not entries["HE"]["present"] and entries["HE"]["count"] == 0
        assert [entries[c]["present"] for c in ("MA", "CWS", "NV", "PRH")] == [False] * 4
    with pytest.raises(ConfigError, match="one lesion threshold per type"):
        find_lesions(logits, GEOMETRY, [0.5] * 5)
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        find_lesions(logits, GEOMETRY, [0.5] * 5 + [1.0])


@pytest.fixture(scope="module")
def lesion_run(phantom_train, phantom_test, tmp_path_factory):
    from edgeretina.export import ExportConfig, export
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.loop import TrainConfig, train
    from edgeretina.training.model import ModelConfig

    out = tmp_path_factory.mktemp("lesion_thresholds")
    lines = []
    config = TrainConfig(data=phantom_train, out=out / "lesion.pt", epochs=1, batch_size=16,
                         model=ModelConfig(backbone=BackboneConfig(image_size=64), lesion_head=True), workers=1)
    checkpoint = train(config, log=lines.append, show_progress=False).checkpoint
    bundle = export(ExportConfig(checkpoint=checkpoint, out=out / "bundle", reference_images=phantom_test,
                                 reference_count=4), log=lambda _: None)
    return checkpoint, bundle, lines


def test_a_lesion_head_run_carries_its_thresholds_into_checkpoint_bundle_and_runtime(lesion_run, phantom_test):
    from edgeretina.dataset import read_labels
    from edgeretina.runtime import Grader
    from edgeretina.training.checkpoint import load_checkpoint

    checkpoint, bundle, lines = lesion_run
    ckpt = load_checkpoint(checkpoint)
    assert ckpt.grading.lesion_thresholds is not None and len(ckpt.grading.lesion_thresholds) == 6
    report = ckpt.summary["calibration"]["lesion_thresholds"]
    assert list(report) == list(LESION_CODES)
    assert [report[c]["threshold"] for c in LESION_CODES] == list(ckpt.grading.lesion_thresholds)
    assert any(line.startswith("lesion thresholds: MA ") for line in lines)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["grading"]["lesion_thresholds"] == list(ckpt.grading.lesion_thresholds)
    grader = Grader(bundle)
    assert grader.grading.lesion_thresholds == ckpt.grading.lesion_thresholds
    photo = [read_labels(phantom_test)[0].path]
    for threshold, present in ((1e-6, True), (1 - 1e-6, False)):       # the grader applies the bundle's
        grader.grading = dataclasses.replace(grader.grading, lesion_thresholds=(threshold,) * 6)
        assert [entry["present"] for entry in grader.grade(photo)[0].lesions] == [present] * 6


def test_recalibrating_fits_them_with_masks_and_keeps_them_without(lesion_run, phantom_test, tmp_path):
    from edgeretina.training.checkpoint import load_checkpoint
    from edgeretina.training.checkpoint_tools import recalibrate

    checkpoint, _, _ = lesion_run
    before = load_checkpoint(checkpoint).grading.lesion_thresholds
    report = recalibrate(checkpoint, [f"phantom:{phantom_test.parent}"], tmp_path / "masked.pt",
                         target_sensitivity=None, log=lambda _: None)
    assert list(report["lesion_thresholds"]) == list(LESION_CODES)
    fitted = load_checkpoint(tmp_path / "masked.pt").grading.lesion_thresholds
    assert list(fitted) == [report["lesion_thresholds"][c]["threshold"] for c in LESION_CODES]
    unmasked = tmp_path / "unmasked"
    shutil.copytree(phantom_test.parent, unmasked, ignore=shutil.ignore_patterns("masks"))
    report = recalibrate(checkpoint, [f"phantom:{unmasked}"], tmp_path / "unmasked.pt",
                         target_sensitivity=None, log=lambda _: None)
    assert "no lesion truth" in report["lesion_thresholds"]["skipped"]
    assert load_checkpoint(tmp_path / "unmasked.pt").grading.lesion_thresholds == before
