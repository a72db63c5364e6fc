"""Grading metrics in numpy: agreement (QWK), accuracy, error, F1, referable AUC and sensitivity, calibration.

Grades are integers 0..num_classes-1 (ICDR: 0 no DR .. 4 proliferative). Every function returns plain
Python numbers and lists (JSON-ready), except `confusion_matrix`, which returns an integer array with
true grades on the rows and predicted grades on the columns, and `roc_curve`, which returns float arrays
(for plotting). Invalid input (mismatched lengths, grades out of range, empty arrays, non-finite scores)
is a programming error and raises ValueError.

Conventions where a value is undefined:
- precision, recall and F1 of a class are 0.0 when their denominator is 0 (scikit-learn's
  ``zero_division=0``); the macro F1 averages over the classes that occur in y_true or y_pred
  (scikit-learn's default), the weighted F1 weights by true support;
- ROC AUC is None when only one class is present; sensitivity (specificity) is None without any
  positive (negative) case;
- QWK is 1.0 when the expected disagreement is 0 (see `quadratic_weighted_kappa`);
- an empty reliability bin has confidence and accuracy None; `bootstrap_ci` drops (and counts) the
  resamples on which its metric is None or not finite.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

NUM_CLASSES = 5
REFERABLE_MIN_GRADE = 2
# CLPI's unacceptable errors: a case with no or mild DR graded severe or proliferative, and the reverse.
LOW_GRADES = (0, 1)
HIGH_GRADES = (3, 4)


def confusion_matrix(y_true, y_pred, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """[num_classes, num_classes] int64 counts: rows are true grades, columns predicted grades."""
    t, p = _grade_pair(y_true, y_pred, num_classes)
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def quadratic_weighted_kappa(y_true, y_pred, num_classes: int = NUM_CLASSES) -> float:
    """Cohen's kappa with quadratic weights (i - j)^2 / (K - 1)^2 over the grades 0..K-1.

    Degenerate case: the expected disagreement is 0 only when both raters give every case the same
    single grade; kappa is then 0/0 (scikit-learn returns nan). We return 1.0 when the observed
    disagreement is 0 too (which it then always is: perfect agreement), else 0.0.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    grades = np.arange(num_classes)
    weights = (grades[:, None] - grades[None, :]) ** 2 / float((num_classes - 1) ** 2)
    n = cm.sum()
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / n
    observed_disagreement = float((weights * cm).sum())
    expected_disagreement = float((weights * expected).sum())
    if expected_disagreement <= 0.0:
        return 1.0 if observed_disagreement <= 0.0 else 0.0
    return float(1.0 - observed_disagreement / expected_disagreement)


def accuracy(y_true, y_pred, num_classes: int = NUM_CLASSES) -> float:
    t, p = _grade_pair(y_true, y_pred, num_classes)
    return float(np.mean(t == p))


def mean_absolute_error(y_true, y_pred, num_classes: int = NUM_CLASSES) -> float:
    t, p = _grade_pair(y_true, y_pred, num_classes)
    return float(np.mean(np.abs(t - p)))


def off_by_one_accuracy(y_true, y_pred, num_classes: int = NUM_CLASSES) -> float:
    """Fraction of predictions within one grade of the truth."""
    t, p = _grade_pair(y_true, y_pred, num_classes)
    return float(np.mean(np.abs(t - p) <= 1))


def per_class_prf(y_true, y_pred, num_classes: int = NUM_CLASSES) -> dict[str, list]:
    """{"precision", "recall", "f1": [float] * K, "support": [int] * K} for grades 0..K-1."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support)
    f1 = _safe_divide(2.0 * tp, support + predicted)  # 2TP / (2TP + FP + FN)
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "support": [int(s) for s in support]}


def f1_scores(y_true, y_pred, num_classes: int = NUM_CLASSES) -> dict[str, float]:
    """{"macro": mean F1 over the grades present in y_true or y_pred, "weighted": support-weighted F1}."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    prf = per_class_prf(y_true, y_pred, num_classes)
    f1 = np.asarray(prf["f1"])
    support = np.asarray(prf["support"], dtype=np.float64)
    present = (cm.sum(axis=1) + cm.sum(axis=0)) > 0
    return {"macro": float(f1[present].mean()), "weighted": float((f1 * support).sum() / support.sum())}


def roc_auc(y_binary, scores) -> float | None:
    """Area under the ROC curve as the Mann-Whitney U statistic (ties count one half).

    None when y_binary holds only one class (the AUC is undefined).
    """
    y = _binary(y_binary, "y_binary")
    s = _finite_scores(scores, len(y))
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    midranks = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = float(midranks[inverse][y == 1].sum())
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_binary, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(fpr, tpr, thresholds) at every distinct score, highest first; a case is called positive when its
    score >= the threshold. The first point is (0, 0) at threshold +inf, the last (1, 1) at the lowest
    score; tied scores move both rates at once, so the trapezoidal area equals `roc_auc`. scikit-learn's
    `roc_curve(..., drop_intermediate=False)` gives the same points. None when y_binary holds only one
    class (a rate is undefined). Raises ValueError on the input `roc_auc` rejects."""
    y = _binary(y_binary, "y_binary")
    s = _finite_scores(scores, len(y))
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tp = np.cumsum(y_sorted)[last_of_each_score]
    fp = (last_of_each_score + 1) - tp
    fpr = np.r_[0.0, fp / n_neg]
    tpr = np.r_[0.0, tp / n_pos]
    thresholds = np.r_[np.inf, s_sorted[last_of_each_score]]
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds.astype(np.float64)


def sensitivity_specificity(y_binary, pred_binary) -> tuple[float | None, float | None]:
    """(TP / (TP + FN), TN / (TN + FP)); each None when its denominator is 0."""
    y = _binary(y_binary, "y_binary")
    p = _binary(pred_binary, "pred_binary")
    if len(p) != len(y):
        raise ValueError(f"y_binary and pred_binary differ in length: {len(y)} != {len(p)}")
    positives, negatives = int(y.sum()), int((y == 0).sum())
    tp = int(((y == 1) & (p == 1)).sum())
    tn = int(((y == 0) & (p == 0)).sum())
    sensitivity = tp / positives if positives else None
    specificity = tn / negatives if negatives else None
    return sensitivity, specificity


def unacceptable_errors(y_true, y_pred) -> dict[str, Any]:
    """CLPI's unacceptable errors on the ICDR scale, each direction apart and together.

    ``true_0_1_pred_3_4``: no or mild DR graded severe or proliferative (a needless urgent referral);
    ``true_3_4_pred_0_1``: severe or proliferative DR graded no or mild (a missed sight-threatening case).
    Each is {"count", "rate" (of all n cases), "rate_of_true_group" (of the cases with those true grades;
    None when there are none)}; ``total`` is {"count", "rate"}; ``n`` is the number of cases.
    Raises ValueError on grades outside 0..4 or mismatched lengths.
    """
    t, p = _grade_pair(y_true, y_pred, NUM_CLASSES)
    n = len(t)
    true_low, true_high = np.isin(t, LOW_GRADES), np.isin(t, HIGH_GRADES)
    low_as_high = int((true_low & np.isin(p, HIGH_GRADES)).sum())
    high_as_low = int((true_high & np.isin(p, LOW_GRADES)).sum())

    def direction(count: int, group: int) -> dict[str, Any]:
        return {"count": count, "rate": count / n, "rate_of_true_group": count / group if group else None}

    return {"n": n,
            "true_0_1_pred_3_4": direction(low_as_high, int(true_low.sum())),
            "true_3_4_pred_0_1": direction(high_as_low, int(true_high.sum())),
            "total": {"count": low_as_high + high_as_low, "rate": (low_as_high + high_as_low) / n}}


def reliability_bins(probs, y_true, n_bins: int = 15) -> dict[str, list]:
    """The top-label reliability table that ECE and the reliability diagram share.

    Equal-width confidence bins (lo, hi] over [0, 1] (a confidence of exactly 0 falls in the first);
    confidence = max class probability, correct = its class is y_true (ties: the lowest class).
    Returns {"edges": [n_bins + 1 floats], "confidence": mean confidence per bin, "accuracy": fraction
    correct per bin (both None for an empty bin), "count": [int] per bin}.
    Raises ValueError unless probs is [N, C] (N >= 1, C >= 2) of finite values in [0, 1] whose rows sum
    to 1, y_true holds N grades in 0..C-1 and n_bins is a positive integer.
    """
    count, confidence_sum, correct_sum = _bin_sums(probs, y_true, n_bins)
    filled = count > 0
    confidence = np.divide(confidence_sum, count, out=np.zeros_like(confidence_sum), where=filled)
    accuracy_ = np.divide(correct_sum, count, out=np.zeros_like(correct_sum), where=filled)
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
            "confidence": [float(c) if f else None for c, f in zip(confidence, filled)],
            "accuracy": [float(a) if f else None for a, f in zip(accuracy_, filled)],
            "count": [int(c) for c in count]}


def expected_calibration_error(probs, y_true, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): sum over the bins of `reliability_bins` of
    |bin| / N * |accuracy(bin) - mean confidence(bin)|. Raises ValueError as `reliability_bins` does."""
    count, confidence_sum, correct_sum = _bin_sums(probs, y_true, n_bins)
    return float(np.abs(correct_sum - confidence_sum).sum() / count.sum())  # |bin| * |acc - conf| per bin


def _bin_sums(probs, y_true, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: (count, sum of confidence, number correct), float64 [n_bins] each."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] < 2:
        raise ValueError(f"probs must be [N, C] with N >= 1 and C >= 2, got shape {p.shape}")
    if not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("probs must be finite and within [0, 1]")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("each row of probs must sum to 1")
    y = _grades(y_true, "y_true", p.shape[1])
    if len(y) != len(p):
        raise ValueError(f"probs and y_true differ in length: {len(p)} != {len(y)}")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    return (np.bincount(bins, minlength=n_bins).astype(np.float64),
            np.bincount(bins, weights=confidence, minlength=n_bins),
            np.bincount(bins, weights=correct, minlength=n_bins))


def bootstrap_ci(metric_fn: Callable[..., Any], *arrays, n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> dict[str, Any]:
    """Percentile bootstrap interval of ``metric_fn(*arrays)`` over cases.

    Every resample draws N case indices with replacement and applies the same indices to every array
    (axis 0), so a metric of two predictions of the same cases is paired: e.g.
    ``bootstrap_ci(lambda t, a, b: qwk(t, a) - qwk(t, b), truth, pred_a, pred_b)``. The same seed and N
    give the same resamples, so intervals of different metrics on one data set are drawn from the same
    resampled cases. A resample on which the metric is undefined (returns None or a non-finite value,
    e.g. AUC with one class) is dropped and counted.

    Returns {"estimate": the metric on all cases (None if undefined), "low", "high": the (1 - confidence)/2
    and (1 + confidence)/2 quantiles of the defined resamples (None if none is defined), "confidence",
    "n_resamples", "n_undefined"}. Raises ValueError without arrays, on arrays of different or zero
    length, n_resamples < 1 or confidence outside (0, 1); errors raised by metric_fn propagate.
    """
    # Hand-written rather than scipy.stats.bootstrap: scipy is no core dependency, and it neither drops
    # undefined resamples nor takes a metric that returns None.
    columns = [np.asarray(a) for a in arrays]
    n = _common_length(columns)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(n_resamples)):
        index = rng.integers(0, n, size=n)
        value = _defined(metric_fn(*(c[index] for c in columns)))
        if value is not None:
            values.append(value)
    low = high = None
    if values:
        tail = (1.0 - float(confidence)) / 2.0
        low, high = (float(q) for q in np.quantile(np.asarray(values), [tail, 1.0 - tail]))
    return {"estimate": _defined(metric_fn(*columns)), "low": low, "high": high, "confidence": float(confidence),
            "n_resamples": int(n_resamples), "n_undefined": int(n_resamples) - len(values)}


def _defined(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None


def _common_length(columns: list[np.ndarray]) -> int:
    if not columns:
        raise ValueError("bootstrap_ci needs at least one array of cases")
    if any(c.ndim == 0 for c in columns):
        raise ValueError("bootstrap_ci needs arrays with one entry per case, got a scalar")
    lengths = {len(c) for c in columns}
    if len(lengths) != 1:
        raise ValueError(f"bootstrap_ci arrays differ in length: {sorted(lengths)}")
    n = lengths.pop()
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one case")
    return n


def grading_report(y_true, y_pred, referable_scores=None, referable_pred=None,
                   num_classes: int = NUM_CLASSES, referable_min_grade: int = REFERABLE_MIN_GRADE) -> dict[str, Any]:
    """Every grading metric in one JSON-ready dict.

    Keys: n, qwk, accuracy, mae, off_by_one, f1_macro, f1_weighted, per_class, confusion_matrix,
    referable_sensitivity, referable_specificity, referable_auc. A case is referable when its grade is
    >= referable_min_grade; referable_pred defaults to y_pred >= referable_min_grade; referable_auc is
    None unless referable_scores (e.g. P(referable)) are given. With no cases at all (n == 0, e.g. every
    image ungradable) every metric is None and the matrix is all zeros.
    """
    _check_num_classes(num_classes)
    if isinstance(referable_min_grade, bool) or not 1 <= int(referable_min_grade) < num_classes:
        raise ValueError(f"referable_min_grade must be in 1..{num_classes - 1}, got {referable_min_grade!r}")
    if len(np.atleast_1d(np.asarray(y_true))) == 0 and len(np.atleast_1d(np.asarray(y_pred))) == 0:
        return _empty_report(num_classes)
    t, p = _grade_pair(y_true, y_pred, num_classes)
    referable_true = (t >= referable_min_grade).astype(np.int64)
    if referable_pred is None:
        referable_pred = p >= referable_min_grade
    elif len(np.asarray(referable_pred).reshape(-1)) != len(t):
        raise ValueError(f"referable_pred must have one value per case ({len(t)})")
    sensitivity, specificity = sensitivity_specificity(referable_true, referable_pred)
    auc = None
    if referable_scores is not None:
        if len(np.asarray(referable_scores).reshape(-1)) != len(t):
            raise ValueError(f"referable_scores must have one value per case ({len(t)})")
        auc = roc_auc(referable_true, referable_scores)
    f1 = f1_scores(t, p, num_classes)
    return {
        "n": int(len(t)),
        "qwk": quadratic_weighted_kappa(t, p, num_classes),
        "accuracy": accuracy(t, p, num_classes),
        "mae": mean_absolute_error(t, p, num_classes),
        "off_by_one": off_by_one_accuracy(t, p, num_classes),
        "f1_macro": f1["macro"],
        "f1_weighted": f1["weighted"],
        "per_class": per_class_prf(t, p, num_classes),
        "confusion_matrix": confusion_matrix(t, p, num_classes).tolist(),
        "referable_sensitivity": sensitivity,
        "referable_specificity": specificity,
        "referable_auc": auc,
    }


def _empty_report(num_classes: int) -> dict[str, Any]:
    nothing = [None] * num_classes
    return {"n": 0, "qwk": None, "accuracy": None, "mae": None, "off_by_one": None, "f1_macro": None,
            "f1_weighted": None,
            "per_class": {"precision": nothing, "recall": list(nothing), "f1": list(nothing),
                          "support": [0] * num_classes},
            "confusion_matrix": [[0] * num_classes for _ in range(num_classes)],
            "referable_sensitivity": None, "referable_specificity": None, "referable_auc": None}


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")


def _as_int_vector(values, name: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if a.dtype == bool:
        return a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{name} must hold integer values")
    return a.astype(np.int64)


def _grades(values, name: str, num_classes: int) -> np.ndarray:
    _check_num_classes(num_classes)
    a = _as_int_vector(values, name)
    if a.min() < 0 or a.max() >= num_classes:
        raise ValueError(f"{name} must hold grades in 0..{num_classes - 1}, got {int(a.min())}..{int(a.max())}")
    return a


def _grade_pair(y_true, y_pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    t = _grades(y_true, "y_true", num_classes)
    p = _grades(y_pred, "y_pred", num_classes)
    if len(t) != len(p):
        raise ValueError(f"y_true and y_pred differ in length: {len(t)} != {len(p)}")
    return t, p


def _binary(values, name: str) -> np.ndarray:
    a = _as_int_vector(values, name)
    if not np.all((a == 0) | (a == 1)):
        raise ValueError(f"{name} must hold only 0/1 (or booleans)")
    return a


def _finite_scores(scores, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or len(s) != n:
        raise ValueError(f"scores must be 1-D with the length of y_binary ({n}), got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    denominator = denominator.astype(np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64), where=denominator > 0)
