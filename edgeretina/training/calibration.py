"""Post-hoc calibration on held-out logits (numpy; no re-training, no re-export).

- one operating point per cumulative CORAL task ("grade > k"), chosen on held-out logits;
- temperature scaling (Guo et al. 2017) of the CORAL cumulative logits and, separately, of the
  prototype logits, with the expected calibration error before and after;
- a referable operating point: the P(referable) threshold that reaches a target sensitivity on the
  held-out cases (default 0.87, the sensitivity endpoint of the pivotal trial of the first autonomous
  DR device, Abramoff et al. 2018), with the specificity it costs;
- per lesion type, the image-level presence threshold that maximises F1 on the held-out images: a
  rare or small type's max-pooled probability can rank images well yet never reach 0.5, and at 0.5 it
  would never be reported present.

Everything lands in GradingConfig, which checkpoints and bundle manifests carry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeretina.errors import DatasetError
from edgeretina.grades import (GradingConfig, LESION_CODES, NUM_GRADES, class_probabilities,
                               cumulative_probabilities, prototype_probabilities)
from edgeretina.metrics import expected_calibration_error, sensitivity_specificity

DEFAULT_TARGET_SENSITIVITY = 0.87

_THRESHOLD_GRID = np.round(np.arange(-3.0, 3.0001, 0.1), 3)
_MIN_GAIN = 0.002  # a threshold moves only for a real accuracy gain: small validation sets overfit easily
# A task "grade > k" with fewer cases on either side keeps the CORAL rule: with no case of grade 4, say,
# accuracy peaks once the threshold passes every logit, and the model would never grade 4 again.
MIN_TASK_CASES = 5
DEFAULT_LESION_THRESHOLD = 0.5   # the runtime's presence rule without a fitted threshold (runtime/lesions.py)


def fit_temperature(ordinal_logits: np.ndarray, grades: np.ndarray) -> float:
    """Temperature minimising the binary NLL of the cumulative targets (1-D search on log T)."""
    logits = np.asarray(ordinal_logits, dtype=np.float64)
    targets = (np.asarray(grades)[:, None] > np.arange(NUM_GRADES - 1)[None, :]).astype(np.float64)

    def nll(temperature: float) -> float:
        z = logits / temperature
        return float(np.mean(np.logaddexp(0.0, z) - targets * z))

    return _search_log_temperature(nll)


def fit_thresholds(ordinal_logits: np.ndarray, grades: np.ndarray) -> tuple[float, ...]:
    """One operating point per cumulative task "grade > k": the threshold that maximises that task's
    accuracy on held-out logits, preferring 0 (the CORAL rule) unless moving gains real accuracy. A task
    with fewer than MIN_TASK_CASES cases on either side (underdetermined_tasks) keeps 0.

    Each task is fitted on its own: a joint search on QWK is not identifiable under the counting rule
    (one threshold can compensate another) and wanders to meaningless values.
    """
    logits = np.asarray(ordinal_logits, dtype=np.float64)
    grades = np.asarray(grades)
    thresholds = []
    unfit = set(underdetermined_tasks(grades))
    for k in range(NUM_GRADES - 1):
        target = grades > k
        if k in unfit:
            thresholds.append(0.0)
            continue
        accuracy = np.array([np.mean((logits[:, k] > t) == target) for t in _THRESHOLD_GRID])
        at_zero = accuracy[np.argmin(np.abs(_THRESHOLD_GRID))]
        best = int(np.argmax(accuracy - 1e-9 * np.abs(_THRESHOLD_GRID)))   # ties: the smaller move
        thresholds.append(float(_THRESHOLD_GRID[best]) if accuracy[best] > at_zero + _MIN_GAIN else 0.0)
    return tuple(thresholds)


def underdetermined_tasks(grades: np.ndarray) -> list[int]:
    """The tasks "grade > k" with fewer than MIN_TASK_CASES cases above or at-or-below k."""
    grades = np.asarray(grades)
    return [k for k in range(NUM_GRADES - 1)
            if min(int((grades > k).sum()), int((grades <= k).sum())) < MIN_TASK_CASES]


def fit_prototype_temperature(prototype_logits: np.ndarray, grades: np.ndarray) -> float:
    """Temperature minimising the softmax NLL of the prototype logits (1-D search on log T)."""
    logits = np.asarray(prototype_logits, dtype=np.float64)
    rows = np.arange(len(logits))

    def nll(temperature: float) -> float:
        z = logits / temperature
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[rows, grades]))

    return _search_log_temperature(nll)


def _search_log_temperature(nll) -> float:
    candidates = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
    best = min(candidates, key=nll)
    fine = best * np.exp(np.linspace(-0.05, 0.05, 21))
    return float(min(fine, key=nll))


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float              # referable when P(referable) >= threshold
    target_sensitivity: float
    sensitivity: float            # on the held-out cases it was chosen on
    specificity: float | None
    positives: int
    negatives: int


def referable_operating_point(referable_scores: np.ndarray, grades: np.ndarray,
                              target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
                              referable_min_grade: int = 2) -> OperatingPoint:
    """The highest P(referable) threshold whose sensitivity on these cases reaches the target.

    The threshold sits halfway between the score of the last positive it must catch and the next lower
    score, so it does not rest on one case's exact score. Raises DatasetError without referable cases.
    """
    if not 0.0 < target_sensitivity < 1.0:
        raise ValueError(f"target sensitivity must lie strictly between 0 and 1, got {target_sensitivity}")
    scores = np.asarray(referable_scores, dtype=np.float64)
    positive = np.asarray(grades) >= referable_min_grade
    if not positive.any():
        raise DatasetError("no referable case (grade >= 2) in the calibration data: "
                           "a referable operating point cannot be chosen")
    ranked = np.sort(scores[positive])[::-1]
    needed = int(np.ceil(target_sensitivity * len(ranked) - 1e-9))      # positives to catch
    last = ranked[needed - 1]
    lower = scores[scores < last]
    threshold = 0.5 * (last + lower.max()) if lower.size else last
    threshold = float(np.clip(threshold, 1e-6, 1.0 - 1e-6))
    sensitivity, specificity = sensitivity_specificity(positive.astype(np.int64), scores >= threshold)
    return OperatingPoint(threshold=threshold, target_sensitivity=float(target_sensitivity),
                          sensitivity=float(sensitivity), specificity=specificity,
                          positives=int(positive.sum()), negatives=int((~positive).sum()))


def lesion_presence_probabilities(lesion_logits: np.ndarray) -> np.ndarray:
    """[N, L, h, w] patch logits -> [N, L] image-level presence probability: the sigmoid of the max over
    patches, the pooling the head was trained with and the runtime reports (runtime/lesions.py, whose
    clipping this repeats so that a fitted threshold means the same number there)."""
    logits = np.asarray(lesion_logits, dtype=np.float64)
    peak = logits.reshape(logits.shape[0], logits.shape[1], -1).max(axis=2)
    return 1.0 / (1.0 + np.exp(-np.clip(peak, -60.0, 60.0)))


def image_lesion_truth(lesion_targets: np.ndarray) -> np.ndarray:
    """Patch-grid targets [N, L, h, w] (PreparedSet.lesions; [N, L] passes through) -> [N, L] bool:
    a type is in an image when any of its patches is."""
    targets = np.asarray(lesion_targets)
    return targets.reshape(targets.shape[0], targets.shape[1], -1).any(axis=2)


def fit_lesion_thresholds(presence: np.ndarray, truth: np.ndarray) -> tuple[tuple[float, ...], dict]:
    """Per lesion type, the presence threshold (present when probability >= threshold) with the highest F1
    on these images. Candidates are the observed probabilities; among equal F1 the higher threshold wins
    (fewer false alarms for the same score). A type with fewer than MIN_TASK_CASES images with or without
    it keeps DEFAULT_LESION_THRESHOLD: F1 on a handful of cases picks a threshold by chance.

    presence, truth: [N, L] (lesion_presence_probabilities, image_lesion_truth), L = len(LESION_CODES).
    Returns the thresholds and, per type code, {threshold, f1 {before (at 0.5), after}, positives,
    negatives} plus `kept` saying why where the threshold stayed."""
    presence = np.asarray(presence, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    if presence.shape != truth.shape or presence.ndim != 2 or presence.shape[1] != len(LESION_CODES):
        raise ValueError(f"need [N, {len(LESION_CODES)}] presence probabilities and truth, "
                         f"got {presence.shape} and {truth.shape}")
    thresholds, report = [], {}
    for j, code in enumerate(LESION_CODES):
        p, t = presence[:, j], truth[:, j]
        positives, negatives = int(t.sum()), int((~t).sum())
        entry = {"positives": positives, "negatives": negatives}
        if min(positives, negatives) < MIN_TASK_CASES:
            threshold = DEFAULT_LESION_THRESHOLD
            entry["kept"] = (f"{positives} images with and {negatives} without {code}: fewer than "
                             f"{MIN_TASK_CASES} on one side, the threshold stays {DEFAULT_LESION_THRESHOLD}")
        else:
            threshold = _best_f1_threshold(p, t)
        thresholds.append(threshold)
        report[code] = {"threshold": threshold, **entry,
                        "f1": {"before": _f1(t, p >= DEFAULT_LESION_THRESHOLD), "after": _f1(t, p >= threshold)}}
    return tuple(thresholds), report


def _best_f1_threshold(probability: np.ndarray, truth: np.ndarray) -> float:
    """The observed probability that, as a threshold, gives the highest F1; the highest such one on ties.

    Sorted high to low, "probability >= the i-th value" predicts the first i + 1 images (up to the last of
    a run of equal values), so F1 = 2 TP / (predicted + positives) for every candidate at once."""
    order = np.argsort(-probability, kind="stable")
    ranked, hits = probability[order], truth[order]
    last_of_run = np.append(ranked[1:] != ranked[:-1], True)
    tp = np.cumsum(hits)[last_of_run]
    predicted = np.flatnonzero(last_of_run) + 1
    f1 = 2.0 * tp / (predicted + truth.sum())
    best = int(np.argmax(f1))                  # the first maximum: the highest threshold
    # the open interval GradingConfig requires (a saturated sigmoid gives exactly 1.0)
    return float(np.clip(ranked[last_of_run][best], 1e-6, 1.0 - 1e-6))


def _f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    tp = int(np.sum(truth & predicted))
    denominator = int(predicted.sum()) + int(truth.sum())
    return 2.0 * tp / denominator if denominator else 0.0


@dataclass(frozen=True)
class CalibrationResult:
    grading: GradingConfig
    report: dict            # ECE before/after, temperatures, thresholds, operating point (JSON-ready)


def calibrate(ordinal_logits: np.ndarray, grades: np.ndarray, base: GradingConfig = GradingConfig(),
              prototype_logits: np.ndarray | None = None,
              target_sensitivity: float | None = DEFAULT_TARGET_SENSITIVITY,
              lesion_logits: np.ndarray | None = None,
              lesion_targets: np.ndarray | None = None) -> CalibrationResult:
    """Fit the ordinal thresholds, both temperatures and the referable operating point on held-out
    outputs. target_sensitivity None keeps base's referable threshold (and claims no sensitivity for it);
    without a referable case the operating point cannot be chosen: base's threshold is kept and the
    report says why. The report also gives the referable sensitivity/specificity at the final threshold.

    With lesion_logits [N, L, h, w] and lesion_targets (patch-grid [N, L, h, w] or image-level [N, L])
    the per-type presence thresholds are fitted too (fit_lesion_thresholds, report "lesion_thresholds");
    with logits but no targets they stay base's and the report says so."""
    grades = np.asarray(grades)
    thresholds = fit_thresholds(ordinal_logits, grades)
    shifted = np.asarray(ordinal_logits, dtype=np.float64) - np.asarray(thresholds)[None, :]
    fitted = GradingConfig(thresholds=thresholds, temperature=fit_temperature(shifted, grades),
                           referable_min_grade=base.referable_min_grade,
                           referable_threshold=base.referable_threshold, target_sensitivity=None,
                           prototype_temperature=(fit_prototype_temperature(prototype_logits, grades)
                                                  if prototype_logits is not None else base.prototype_temperature),
                           lesion_thresholds=base.lesion_thresholds)
    report = {"n": int(len(grades)), "thresholds": list(thresholds),
              "thresholds_kept_at_0": underdetermined_tasks(grades), "temperature": fitted.temperature,
              "ece_ordinal": {"before": _ordinal_ece(ordinal_logits, grades, base),
                              "after": _ordinal_ece(ordinal_logits, grades, fitted)}}
    if prototype_logits is not None:
        report["prototype_temperature"] = fitted.prototype_temperature
        report["ece_prototype"] = {"before": _prototype_ece(prototype_logits, grades, base),
                                   "after": _prototype_ece(prototype_logits, grades, fitted)}
    if lesion_logits is not None and lesion_targets is not None:
        lesion_thresholds, report["lesion_thresholds"] = fit_lesion_thresholds(
            lesion_presence_probabilities(lesion_logits), image_lesion_truth(lesion_targets))
        fitted = GradingConfig(**{**fitted.__dict__, "lesion_thresholds": lesion_thresholds})
    elif lesion_logits is not None:
        report["lesion_thresholds"] = {"skipped": f"no lesion truth for the {len(grades)} calibration images: "
                                                  f"the lesion thresholds stay {base.lesion_thresholds or DEFAULT_LESION_THRESHOLD}"}
    referable = cumulative_probabilities(ordinal_logits, fitted)[:, fitted.referable_min_grade - 1]
    positive = grades >= fitted.referable_min_grade
    if target_sensitivity is not None and positive.any():
        point = referable_operating_point(referable, grades, target_sensitivity, fitted.referable_min_grade)
        fitted = GradingConfig(**{**fitted.__dict__, "referable_threshold": point.threshold,
                                  "target_sensitivity": point.target_sensitivity})
        report["operating_point"] = point.__dict__.copy()
    elif target_sensitivity is not None:
        report["operating_point"] = {"skipped": f"no referable case (grade >= {fitted.referable_min_grade}) in "
                                                f"the {len(grades)} calibration images: the referable threshold "
                                                f"stays {fitted.referable_threshold}"}
    sensitivity, specificity = sensitivity_specificity(positive.astype(np.int64), referable >= fitted.referable_threshold)
    report["referable_at_threshold"] = {"threshold": fitted.referable_threshold, "sensitivity": sensitivity,
                                        "specificity": specificity}
    return CalibrationResult(grading=fitted, report=report)


def _ordinal_ece(ordinal_logits, grades, grading: GradingConfig) -> float:
    probs = class_probabilities(cumulative_probabilities(ordinal_logits, grading))
    return expected_calibration_error(probs, grades)


def _prototype_ece(prototype_logits, grades, grading: GradingConfig) -> float:
    return expected_calibration_error(prototype_probabilities(prototype_logits, grading), grades)
