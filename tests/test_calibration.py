"""Calibration: temperatures that lower the ECE of a miscalibrated model, and a referable operating point
chosen for a target sensitivity, carried by GradingConfig into checkpoints and manifests."""

import numpy as np
import pytest

from edgeretina.errors import DatasetError
from edgeretina.grades import GradingConfig, class_probabilities, cumulative_probabilities
from edgeretina.metrics import sensitivity_specificity
from edgeretina.runtime.postprocess import grade_results
from edgeretina.training.calibration import (calibrate, fit_prototype_temperature, fit_temperature,
                                             referable_operating_point)


def _ordinal_cases(n: int, seed: int, overconfidence: float):
    """Cases whose true cumulative logits are well calibrated, reported `overconfidence` times too large."""
    rng = np.random.default_rng(seed)
    latent = rng.uniform(-0.5, 4.5, n)                       # a continuous severity
    cuts = np.array([0.5, 1.5, 2.5, 3.5])
    true_logits = 2.0 * (latent[:, None] - cuts[None, :])
    cumulative = 1 / (1 + np.exp(-true_logits))
    u = rng.random(n)
    grades = (u[:, None] < cumulative).sum(axis=1)            # drawn from the calibrated model
    return overconfidence * true_logits, grades


def _prototype_cases(n: int, seed: int, overconfidence: float):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, 5))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    grades = np.array([rng.choice(5, p=p) for p in probs])
    return overconfidence * logits, grades


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_ordinal_head():
    logits, grades = _ordinal_cases(3000, seed=1, overconfidence=4.0)
    result = calibrate(logits, grades, target_sensitivity=None)
    ece = result.report["ece_ordinal"]
    assert result.grading.temperature == pytest.approx(4.0, rel=0.25)
    assert ece["after"] < 0.5 * ece["before"]
    assert ece["after"] < 0.04


def test_prototype_temperature_lowers_the_prototype_ece():
    logits, grades = _prototype_cases(3000, seed=2, overconfidence=3.0)
    ordinal, _ = _ordinal_cases(3000, seed=2, overconfidence=1.0)
    result = calibrate(ordinal, grades, prototype_logits=logits, target_sensitivity=None)
    assert result.grading.prototype_temperature == pytest.approx(3.0, rel=0.2)
    ece = result.report["ece_prototype"]
    assert ece["after"] < 0.5 * ece["before"]
    assert fit_prototype_temperature(logits, grades) == pytest.approx(result.grading.prototype_temperature)


def test_an_underconfident_head_is_sharpened():
    logits, grades = _ordinal_cases(3000, seed=3, overconfidence=0.4)
    assert fit_temperature(logits, grades) == pytest.approx(0.4, rel=0.25)


def test_operating_point_reaches_the_target_sensitivity_by_hand():
    # 10 referable cases with scores 0.95 .. 0.05 and 5 non-referable cases.
    positive_scores = np.linspace(0.95, 0.05, 10)
    negative_scores = np.array([0.9, 0.5, 0.3, 0.2, 0.01])
    scores = np.concatenate([positive_scores, negative_scores])
    grades = np.array([3] * 10 + [0] * 5)
    point = referable_operating_point(scores, grades, target_sensitivity=0.8)
    # 8 of 10 positives must be caught: the 8th highest positive score is 0.95 - 7 * 0.1 = 0.25; the next
    # lower score of any case is 0.2, so the threshold is halfway, 0.225.
    assert point.threshold == pytest.approx(0.225)
    assert point.sensitivity == pytest.approx(0.8)
    assert point.specificity == pytest.approx(2 / 5)     # 0.2 and 0.01 are below it
    assert (point.positives, point.negatives) == (10, 5)


def test_operating_point_holds_on_fresh_cases_from_the_same_model():
    logits, grades = _ordinal_cases(4000, seed=4, overconfidence=1.0)
    held_logits, held_grades = _ordinal_cases(4000, seed=5, overconfidence=1.0)
    grading = calibrate(logits, grades, target_sensitivity=0.87).grading
    assert grading.target_sensitivity == 0.87
    referable = np.array([r.referable for r in grade_results(held_logits, grading)])
    sensitivity, _ = sensitivity_specificity((held_grades >= 2).astype(int), referable)
    assert sensitivity == pytest.approx(0.87, abs=0.03)
    plain = np.array([r.referable for r in grade_results(held_logits, GradingConfig())])
    assert referable.sum() != plain.sum()            # the operating point moved the decision


def test_operating_point_needs_referable_cases():
    with pytest.raises(DatasetError, match="no referable case"):
        referable_operating_point(np.array([0.1, 0.2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="target sensitivity"):
        referable_operating_point(np.array([0.1, 0.9]), np.array([0, 3]), target_sensitivity=1.0)


def test_calibration_report_is_stored_and_the_threshold_is_inside_the_open_interval():
    logits, grades = _ordinal_cases(500, seed=6, overconfidence=2.0)
    result = calibrate(logits, grades)
    report = result.report
    assert report["operating_point"]["threshold"] == result.grading.referable_threshold
    assert 0.0 < result.grading.referable_threshold < 1.0
    assert set(report) >= {"n", "thresholds", "temperature", "ece_ordinal", "operating_point"}


def test_grading_config_round_trip_and_old_manifests():
    cfg = GradingConfig(thresholds=(0.1, 0.0, -0.2, 0.3), temperature=1.7, referable_threshold=0.31,
                        target_sensitivity=0.87, prototype_temperature=2.5)
    assert GradingConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("target_sensitivity", "prototype_temperature")}
    restored = GradingConfig.from_dict(old)
    assert restored.target_sensitivity is None and restored.prototype_temperature == 1.0
    with pytest.raises(ValueError, match="target_sensitivity"):
        GradingConfig(target_sensitivity=1.2)
    with pytest.raises(ValueError, match="prototype_temperature must be positive"):
        GradingConfig(prototype_temperature=0.0)


def test_class_probabilities_are_a_distribution():
    logits, _ = _ordinal_cases(50, seed=7, overconfidence=1.0)
    probs = class_probabilities(cumulative_probabilities(logits, GradingConfig()))
    assert np.allclose(probs.sum(axis=1), 1.0) and probs.min() >= 0


def test_without_referable_cases_the_threshold_stays_and_the_report_says_why():
    rng = np.random.default_rng(8)
    logits = rng.normal(-2, 1, (40, 4))
    grades = rng.integers(0, 2, 40)                     # grades 0 and 1 only
    result = calibrate(logits, grades, base=GradingConfig(referable_threshold=0.4))
    assert result.grading.referable_threshold == 0.4 and result.grading.target_sensitivity is None
    assert "no referable case" in result.report["operating_point"]["skipped"]
    assert result.report["referable_at_threshold"]["sensitivity"] is None


def fit_thresholds_without_guard(logits, grades) -> float:
    """The accuracy-maximising threshold of task "grade > 3" on its own (what the guard prevents)."""
    grid = np.round(np.arange(-3.0, 3.0001, 0.1), 3)
    accuracy = [np.mean((logits[:, 3] > t) == (grades > 3)) for t in grid]
    return float(grid[int(np.argmax(accuracy))])


def test_a_grade_missing_from_the_calibration_data_keeps_its_task_at_the_coral_rule():
    logits, grades = _ordinal_cases(400, seed=9, overconfidence=1.0)
    keep = grades < 4                                   # no grade 4 at all: task "grade > 3" has no positive
    logits, grades = logits[keep], grades[keep]
    logits[:, 3] += 2.0                                 # an over-eager grade-4 head: the fit would move it
    assert fit_thresholds_without_guard(logits, grades) >= 1.0
    result = calibrate(logits, grades, target_sensitivity=None)
    assert result.grading.thresholds[3] == 0.0
    assert 3 in result.report["thresholds_kept_at_0"]


def test_keeping_the_referable_threshold_claims_no_target_and_measures_it():
    logits, grades = _ordinal_cases(500, seed=10, overconfidence=2.0)
    base = GradingConfig(referable_threshold=0.3, target_sensitivity=0.87)
    result = calibrate(logits, grades, base=base, target_sensitivity=None)
    assert result.grading.referable_threshold == 0.3 and result.grading.target_sensitivity is None
    measured = result.report["referable_at_threshold"]
    referable = np.array([r.referable for r in grade_results(logits, result.grading)])
    assert measured["sensitivity"] == pytest.approx(referable[grades >= 2].mean())
