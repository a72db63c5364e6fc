"""numpy grading metrics: hand-computed cases, edge cases, and agreement with scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeretina.metrics import (accuracy, confusion_matrix, expected_calibration_error, f1_scores, grading_report,
                                mean_absolute_error, off_by_one_accuracy, per_class_prf, quadratic_weighted_kappa,
                                roc_auc, sensitivity_specificity)

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
