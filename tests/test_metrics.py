"""numpy grading metrics: hand-computed cases, edge cases, and agreement with scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeretina.metrics import (accuracy, bootstrap_ci, confusion_matrix, expected_calibration_error, f1_scores,
                                grading_report, mean_absolute_error, off_by_one_accuracy, per_class_prf,
                                quadratic_weighted_kappa, reliability_bins, roc_auc, roc_curve,
                                sensitivity_specificity, unacceptable_errors)

LABELS = list(range(5))


def _random_grades(seed: int, n: int = 200, agreement: float = 0.6):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 5, n)
    noise = rng.integers(-2, 3, n)
    y_pred = np.where(rng.random(n) < agreement, y_true, np.clip(y_true + noise, 0, 4))
    return y_true, y_pred


# --- hand-computed ------------------------------------------------------------------------------

def test_qwk_hand_computed():
    assert quadratic_weighted_kappa([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]) == 1.0
    assert quadratic_weighted_kappa([0, 1, 2, 3, 4], [4, 3, 2, 1, 0]) == pytest.approx(-1.0)
    # K=3, one swap of adjacent grades: observed 0.5, expected 1.0 (in weight units) -> 0.5
    assert quadratic_weighted_kappa([0, 1, 2], [0, 2, 1], num_classes=3) == pytest.approx(0.5)


def test_qwk_degenerate_single_grade_is_perfect_agreement():
    # Both raters give everyone grade 0: expected disagreement 0, kappa 0/0 (sklearn: nan).
    assert quadratic_weighted_kappa([0, 0, 0], [0, 0, 0]) == 1.0
    assert quadratic_weighted_kappa([3], [3]) == 1.0
    # Constant truth but varied predictions is not degenerate: kappa 0 (no better than chance).
    assert quadratic_weighted_kappa([2, 2, 2, 2], [1, 2, 3, 2]) == pytest.approx(0.0)


def test_simple_rates_hand_computed():
    y_true, y_pred = [0, 1, 2, 3, 4, 4], [0, 2, 2, 1, 4, 3]
    assert accuracy(y_true, y_pred) == pytest.approx(3 / 6)
    assert mean_absolute_error(y_true, y_pred) == pytest.approx((0 + 1 + 0 + 2 + 0 + 1) / 6)
    assert off_by_one_accuracy(y_true, y_pred) == pytest.approx(5 / 6)
    cm = confusion_matrix(y_true, y_pred)
    assert cm.shape == (5, 5) and cm.sum() == 6 and cm[3, 1] == 1 and cm[4, 4] == 1 and cm[4, 3] == 1


def test_per_class_prf_hand_computed_and_zero_division():
    prf = per_class_prf([0, 0, 1, 1], [0, 1, 1, 1], num_classes=3)
    assert prf["precision"] == pytest.approx([1.0, 2 / 3, 0.0])   # class 2 never predicted -> 0.0
    assert prf["recall"] == pytest.approx([0.5, 1.0, 0.0])        # class 2 never true -> 0.0
    assert prf["f1"] == pytest.approx([2 / 3, 0.8, 0.0])
    assert prf["support"] == [2, 2, 0]
    f1 = f1_scores([0, 0, 1, 1], [0, 1, 1, 1], num_classes=3)
    assert f1["macro"] == pytest.approx((2 / 3 + 0.8) / 2)        # absent class 2 is not averaged in
    assert f1["weighted"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_roc_auc_hand_computed_with_ties_and_one_class():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([0, 0, 1], [0.2, 0.7, 0.7]) == pytest.approx(0.75)
    assert roc_auc([True, False], [0.9, 0.1]) == 1.0
    assert roc_auc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    assert roc_auc([0, 0], [0.1, 0.2]) is None


def test_sensitivity_specificity_and_undefined_sides():
    sens, spec = sensitivity_specificity([1, 1, 0, 0, 0], [1, 0, 0, 1, 0])
    assert sens == pytest.approx(0.5) and spec == pytest.approx(2 / 3)
    assert sensitivity_specificity([0, 0], [0, 1]) == (None, 0.5)
    assert sensitivity_specificity([1, 1], [1, 1]) == (1.0, None)


def test_ece_hand_computed():
    probs = [[0.9, 0.1], [0.4, 0.6]]
    # confident-right at 0.9, wrong at 0.6: 0.5 * |1 - 0.9| + 0.5 * |0 - 0.6|
    assert expected_calibration_error(probs, [0, 0], n_bins=10) == pytest.approx(0.35)
    assert expected_calibration_error([[1.0, 0.0], [0.0, 1.0]], [0, 1]) == 0.0
    # one bin: |accuracy - mean confidence|
    assert expected_calibration_error(probs, [0, 1], n_bins=1) == pytest.approx(abs(1.0 - 0.75))


def _reference_ece(probs: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi) if lo > 0 else (confidence >= lo) & (confidence <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs((predicted[in_bin] == y[in_bin]).mean() - confidence[in_bin].mean())
    return total


def test_ece_matches_a_loop_reference():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(500, 5)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 5, 500)
    for n_bins in (1, 10, 15):
        assert expected_calibration_error(probs, y, n_bins) == pytest.approx(_reference_ece(probs, y, n_bins))


# --- against scikit-learn -----------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_scikit_learn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    y_true, y_pred = _random_grades(seed)
    if seed == 4:  # a grade absent from both: labels matter for the weights and the macro average
        y_true, y_pred = np.where(y_true == 3, 2, y_true), np.where(y_pred == 3, 4, y_pred)
    assert quadratic_weighted_kappa(y_true, y_pred) == pytest.approx(
        sk.cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=LABELS))
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred), sk.confusion_matrix(y_true, y_pred, labels=LABELS))
    assert accuracy(y_true, y_pred) == pytest.approx(sk.accuracy_score(y_true, y_pred))
    assert mean_absolute_error(y_true, y_pred) == pytest.approx(sk.mean_absolute_error(y_true, y_pred))
    precision, recall, f1, support = sk.precision_recall_fscore_support(y_true, y_pred, labels=LABELS,
                                                                        zero_division=0)
    prf = per_class_prf(y_true, y_pred)
    np.testing.assert_allclose(prf["precision"], precision)
    np.testing.assert_allclose(prf["recall"], recall)
    np.testing.assert_allclose(prf["f1"], f1)
    assert prf["support"] == support.tolist()
    scores = f1_scores(y_true, y_pred)
    assert scores["macro"] == pytest.approx(sk.f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert scores["weighted"] == pytest.approx(sk.f1_score(y_true, y_pred, average="weighted", zero_division=0))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_agrees_with_scikit_learn_including_ties(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) * 0.6 + 0.4 * y, 1)  # rounding makes many ties
    assert roc_auc(y, scores) == pytest.approx(sk.roc_auc_score(y, scores))


# --- the report ---------------------------------------------------------------------------------

def test_grading_report_keys_values_and_json():
    y_true = [0, 0, 1, 2, 3, 4, 2, 1]
    y_pred = [0, 1, 1, 2, 2, 4, 1, 0]
    scores = [0.1, 0.3, 0.2, 0.8, 0.7, 0.9, 0.4, 0.1]
    report = grading_report(y_true, y_pred, referable_scores=scores)
    assert set(report) == {"n", "qwk", "accuracy", "mae", "off_by_one", "f1_macro", "f1_weighted", "per_class",
                           "confusion_matrix", "referable_sensitivity", "referable_specificity", "referable_auc"}
    assert json.loads(json.dumps(report)) == report  # plain Python values only
    assert report["n"] == 8 and report["accuracy"] == pytest.approx(4 / 8)
    assert report["qwk"] == pytest.approx(quadratic_weighted_kappa(y_true, y_pred))
    # referable (grade >= 2): truth at indices 3, 4, 5, 6; predicted referable 3, 4, 5
    assert report["referable_sensitivity"] == pytest.approx(3 / 4)
    assert report["referable_specificity"] == pytest.approx(1.0)
    assert report["referable_auc"] == pytest.approx(1.0)
    assert report["confusion_matrix"][2][1] == 1 and len(report["per_class"]["f1"]) == 5


def test_grading_report_options():
    y_true, y_pred = [0, 1, 2, 3], [0, 1, 2, 3]
    report = grading_report(y_true, y_pred)
    assert report["referable_auc"] is None and report["qwk"] == 1.0
    assert report["referable_sensitivity"] == 1.0 and report["referable_specificity"] == 1.0
    explicit = grading_report(y_true, y_pred, referable_pred=np.array([True, True, False, False]))
    assert explicit["referable_sensitivity"] == 0.0 and explicit["referable_specificity"] == 0.0
    stricter = grading_report(y_true, y_pred, referable_min_grade=3)
    assert stricter["referable_sensitivity"] == 1.0
    one_class = grading_report([0, 1], [0, 1], referable_scores=[0.2, 0.3])
    assert one_class["referable_auc"] is None and one_class["referable_sensitivity"] is None


def test_grading_report_with_no_cases_is_all_none():
    report = grading_report([], [])
    assert report["n"] == 0 and report["qwk"] is None and report["referable_auc"] is None
    assert report["confusion_matrix"] == [[0] * 5 for _ in range(5)]
    assert json.loads(json.dumps(report)) == report


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: accuracy([0, 1], [0]),                               # lengths differ
    lambda: accuracy([0, 5], [0, 1]),                            # grade out of range
    lambda: accuracy([-1, 0], [0, 1]),
    lambda: accuracy([0.5, 1], [0, 1]),                          # not an integer
    lambda: accuracy([], []),                                    # empty
    lambda: accuracy([[0, 1]], [[0, 1]]),                        # 2-D
    lambda: accuracy(["a"], ["b"]),                              # not numeric
    lambda: quadratic_weighted_kappa([0], [0], num_classes=1),
    lambda: roc_auc([0, 2], [0.1, 0.2]),                         # not binary
    lambda: roc_auc([0, 1], [0.1, float("nan")]),                # non-finite score
    lambda: roc_auc([0, 1], [0.1]),
    lambda: sensitivity_specificity([0, 1], [1]),
    lambda: expected_calibration_error([[0.5, 0.6]], [0]),       # row does not sum to 1
    lambda: expected_calibration_error([0.5, 0.5], [0]),         # not 2-D
    lambda: expected_calibration_error([[0.5, 0.5]], [2]),       # label out of range
    lambda: expected_calibration_error([[0.5, 0.5]], [0], n_bins=0),
    lambda: grading_report([0, 1], [0, 1], referable_min_grade=5),
    lambda: grading_report([0, 1], [0, 1], referable_scores=[0.1]),
    lambda: grading_report([0, 1], [0, 1], referable_pred=[1]),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_accepts_integral_floats_bools_and_numpy_ints():
    assert accuracy(np.array([0.0, 1.0, 2.0]), np.array([0, 1, 2], dtype=np.uint8)) == 1.0
    assert isinstance(accuracy(np.array([0, 1]), np.array([0, 1])), float)
    assert sensitivity_specificity(np.array([True, False]), np.array([1, 0])) == (1.0, 1.0)


# --- unacceptable errors, ROC points, reliability bins, bootstrap intervals ---------------------

def test_unacceptable_errors_hand_computed():
    #          idx: 0  1  2  3  4  5  6  7  8
    y_true = np.array([0, 1, 3, 4, 2, 0, 4, 1, 0])
    y_pred = np.array([3, 4, 1, 2, 2, 0, 4, 3, 4])
    # true 0-1 -> predicted 3-4: idx 0 (0->3), 1 (1->4), 7 (1->3, the boundary counts), 8 (0->4) = 4;
    #   true 0-1 cases: idx 0, 1, 5, 7, 8 = 5
    # true 3-4 -> predicted 0-1: idx 2 (3->1) = 1; idx 3 (4->2) is not one; true 3-4 cases: idx 2, 3, 6 = 3
    # grade 2 (idx 4) can never be an unacceptable error
    errors = unacceptable_errors(y_true, y_pred)
    assert errors["n"] == 9
    assert errors["true_0_1_pred_3_4"] == {"count": 4, "rate": pytest.approx(4 / 9), "rate_of_true_group": 0.8}
    assert errors["true_3_4_pred_0_1"] == {"count": 1, "rate": pytest.approx(1 / 9),
                                           "rate_of_true_group": pytest.approx(1 / 3)}
    assert errors["total"] == {"count": 5, "rate": pytest.approx(5 / 9)}
    assert json.loads(json.dumps(errors)) == errors


def test_unacceptable_errors_none_and_empty_groups():
    errors = unacceptable_errors([2, 2, 3], [3, 4, 2])          # no true 0-1 case; 3 -> 2 is acceptable
    assert errors["true_0_1_pred_3_4"] == {"count": 0, "rate": 0.0, "rate_of_true_group": None}
    assert errors["true_3_4_pred_0_1"] == {"count": 0, "rate": 0.0, "rate_of_true_group": 0.0}
    assert errors["total"] == {"count": 0, "rate": 0.0}
    with pytest.raises(ValueError):
        unacceptable_errors([0, 5], [0, 1])


def _area(fpr, tpr) -> float:
    """Trapezoidal area under the curve (np.trapezoid is numpy >= 2 only)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def test_roc_curve_hand_computed():
    # scores high to low: 0.8 (pos), 0.4 (neg), 0.35 (pos), 0.1 (neg)
    fpr, tpr, thresholds = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])
    assert _area(fpr, tpr) == pytest.approx(0.75) == roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])


def test_roc_curve_ties_move_both_rates_and_one_class_is_none():
    # 0.7 holds one negative and the positive: one step from (0, 0) to (0.5, 1); area 0.25 + 0.5
    fpr, tpr, thresholds = roc_curve([0, 0, 1], [0.2, 0.7, 0.7])
    np.testing.assert_allclose(fpr, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 1.0, 1.0])
    np.testing.assert_allclose(thresholds, [np.inf, 0.7, 0.2])
    assert _area(fpr, tpr) == pytest.approx(roc_auc([0, 0, 1], [0.2, 0.7, 0.7]))
    assert roc_curve([1, 1], [0.2, 0.3]) is None
    with pytest.raises(ValueError):
        roc_curve([0, 1], [0.2, float("inf")])


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_agrees_with_scikit_learn_and_its_area_with_roc_auc(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) * 0.6 + 0.4 * y, 2)        # ties
    fpr, tpr, thresholds = roc_curve(y, scores)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thresholds) < 0)
    assert _area(fpr, tpr) == pytest.approx(roc_auc(y, scores))
    sk = pytest.importorskip("sklearn.metrics")
    sk_fpr, sk_tpr, sk_thresholds = sk.roc_curve(y, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thresholds[1:], sk_thresholds[1:])


def test_reliability_bins_hand_computed():
    probs = [[0.9, 0.1],     # confidence 0.9  -> bin (0.75, 1],  right
             [0.4, 0.6],     # confidence 0.6  -> bin (0.5, 0.75], wrong (class 1, truth 0)
             [0.55, 0.45],   # confidence 0.55 -> bin (0.5, 0.75], right
             [0.5, 0.5]]     # confidence 0.5  -> bin (0.25, 0.5] (bins are closed on the right); the tie
    y = [0, 0, 0, 1]         #   picks class 0, truth 1: wrong
    bins = reliability_bins(probs, y, n_bins=4)
    assert bins["edges"] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert bins["count"] == [0, 1, 2, 1]
    assert bins["confidence"][0] is None and bins["accuracy"][0] is None
    assert bins["confidence"][1:] == pytest.approx([0.5, 0.575, 0.9])
    assert bins["accuracy"][1:] == pytest.approx([0.0, 0.5, 1.0])
    # ECE = 1/4 * |0 - 0.5| + 2/4 * |0.5 - 0.575| + 1/4 * |1 - 0.9| = 0.125 + 0.0375 + 0.025
    assert expected_calibration_error(probs, y, n_bins=4) == pytest.approx(0.1875)
    assert json.loads(json.dumps(bins)) == bins


def _ece_before_reliability_bins(probs, y_true, n_bins: int) -> float:
    """expected_calibration_error as it was before reliability_bins owned the binning (kept verbatim)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    gap = np.abs(np.bincount(bins, weights=correct, minlength=n_bins)
                 - np.bincount(bins, weights=confidence, minlength=n_bins))
    return float(gap.sum() / count.sum())


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_is_the_weighted_gap_of_the_reliability_bins_and_unchanged(n_bins):
    rng = np.random.default_rng(n_bins)
    logits = rng.normal(size=(400, 5)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 5, 400)
    bins = reliability_bins(probs, y, n_bins)
    assert sum(bins["count"]) == 400
    from_bins = sum(c / 400 * abs(a - m) for c, a, m in zip(bins["count"], bins["accuracy"], bins["confidence"]) if c)
    ece = expected_calibration_error(probs, y, n_bins)
    assert ece == pytest.approx(from_bins, abs=1e-12)
    assert ece == pytest.approx(_ece_before_reliability_bins(probs, y, n_bins), abs=1e-12)


def test_bootstrap_ci_of_a_constant_metric_has_zero_width():
    ci = bootstrap_ci(lambda t, p: 0.7, np.arange(20), np.arange(20), n_resamples=50)
    assert ci == {"estimate": 0.7, "low": 0.7, "high": 0.7, "confidence": 0.95, "n_resamples": 50, "n_undefined": 0}
    perfect = bootstrap_ci(accuracy, [0, 1, 2, 3, 4] * 4, [0, 1, 2, 3, 4] * 4, n_resamples=50)
    assert perfect["estimate"] == perfect["low"] == perfect["high"] == 1.0


def test_bootstrap_ci_of_a_mean_matches_the_normal_interval_and_covers_the_truth():
    # Bernoulli(0.3), n = 400: the sample mean's 95% interval is about +-1.96 * sqrt(0.3 * 0.7 / 400) = +-0.045.
    rng = np.random.default_rng(7)
    sample = (rng.random(400) < 0.3).astype(float)
    ci = bootstrap_ci(np.mean, sample, n_resamples=1000, seed=1)
    assert ci["estimate"] == pytest.approx(sample.mean())
    assert ci["low"] < ci["estimate"] < ci["high"]
    assert ci["high"] - ci["low"] == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / 400), rel=0.15)
    # Over 200 samples of n = 100, a 90% interval covers the true mean about 90% of the time.
    covered = 0
    for trial in range(200):
        sample = (rng.random(100) < 0.3).astype(float)
        ci = bootstrap_ci(np.mean, sample, n_resamples=200, confidence=0.9, seed=trial)
        covered += ci["low"] <= 0.3 <= ci["high"]
    assert 0.82 <= covered / 200 <= 0.97


def test_bootstrap_ci_same_seed_same_interval_and_wider_at_higher_confidence():
    y_true, y_pred = _random_grades(0, n=150)
    first = bootstrap_ci(quadratic_weighted_kappa, y_true, y_pred, n_resamples=200, seed=3)
    assert bootstrap_ci(quadratic_weighted_kappa, y_true, y_pred, n_resamples=200, seed=3) == first
    wide = bootstrap_ci(quadratic_weighted_kappa, y_true, y_pred, n_resamples=200, seed=3, confidence=0.99)
    assert wide["low"] <= first["low"] < first["estimate"] < first["high"] <= wide["high"]
    assert first["estimate"] == pytest.approx(quadratic_weighted_kappa(y_true, y_pred))


def test_bootstrap_ci_pairs_the_arrays_case_by_case():
    # Two identical predictions: paired, every resample differs by exactly 0 (unpaired it would not).
    y_true, y_pred = _random_grades(1, n=120)
    ci = bootstrap_ci(lambda t, a, b: accuracy(t, a) - accuracy(t, b), y_true, y_pred, y_pred.copy(), n_resamples=100)
    assert ci["estimate"] == ci["low"] == ci["high"] == 0.0
    # Rows of a 2-D array travel with their case.
    probs = np.eye(5)[y_true]
    ci = bootstrap_ci(lambda p, t: float(np.mean(p.argmax(axis=1) == t)), probs, y_true, n_resamples=50)
    assert ci["low"] == ci["high"] == 1.0


def test_bootstrap_ci_drops_and_counts_undefined_resamples():
    # One positive in 10 cases: a resample misses it with probability 0.9^10 = 0.349, and its AUC is None.
    y = np.array([1] + [0] * 9)
    scores = np.linspace(0.9, 0.0, 10)
    ci = bootstrap_ci(roc_auc, y, scores, n_resamples=1000)
    assert ci["estimate"] == 1.0 and ci["low"] == ci["high"] == 1.0
    assert 300 <= ci["n_undefined"] <= 400          # binomial(1000, 0.349): +-3.3 standard deviations
    nan = bootstrap_ci(lambda v: float("nan"), np.arange(5), n_resamples=20)
    assert nan["estimate"] is None and nan["low"] is None and nan["n_undefined"] == 20
    none = bootstrap_ci(roc_auc, [0, 0, 0], [0.1, 0.2, 0.3], n_resamples=20)
    assert none == {"estimate": None, "low": None, "high": None, "confidence": 0.95, "n_resamples": 20,
                    "n_undefined": 20}


@pytest.mark.parametrize("call", [
    lambda: bootstrap_ci(np.mean),                                        # no arrays
    lambda: bootstrap_ci(np.mean, []),                                    # no cases
    lambda: bootstrap_ci(accuracy, [0, 1], [0]),                          # lengths differ
    lambda: bootstrap_ci(np.mean, [1.0, 2.0], n_resamples=0),
    lambda: bootstrap_ci(np.mean, [1.0, 2.0], confidence=1.0),
    lambda: bootstrap_ci(np.mean, 3.0),                                   # a scalar is not cases
    lambda: reliability_bins([[0.5, 0.5]], [0], n_bins=0),
    lambda: reliability_bins([[0.5, 0.6]], [0]),
])
def test_new_metrics_reject_bad_input(call):
    with pytest.raises(ValueError):
        call()
