"""Post-hoc calibration of the ordinal head on held-out logits (numpy; no re-training, no re-export).

Temperature scaling (Guo et al. 2017) applied to the CORAL cumulative logits, and one operating point
per cumulative task ("grade > k") chosen on held-out logits.
"""

from __future__ import annotations

import numpy as np

from edgeretina.grades import GradingConfig, NUM_GRADES

_THRESHOLD_GRID = np.round(np.arange(-3.0, 3.0001, 0.1), 3)
_MIN_GAIN = 0.002  # a threshold moves only for a real accuracy gain: small validation sets overfit easily


def fit_temperature(ordinal_logits: np.ndarray, grades: np.ndarray) -> float:
    """Temperature minimising the binary NLL of the cumulative targets (1-D search on log T)."""
    logits = np.asarray(ordinal_logits, dtype=np.float64)
    targets = (np.asarray(grades)[:, None] > np.arange(NUM_GRADES - 1)[None, :]).astype(np.float64)

    def nll(temperature: float) -> float:
        z = logits / temperature
        return float(np.mean(np.logaddexp(0.0, z) - targets * z))

    candidates = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))
    best = min(candidates, key=nll)
    fine = best * np.exp(np.linspace(-0.05, 0.05, 21))
    return float(min(fine, key=nll))


def fit_thresholds(ordinal_logits: np.ndarray, grades: np.ndarray) -> tuple[float, ...]:
    """One operating point per cumulative task "grade > k": the threshold that maximises that task's
    accuracy on held-out logits, preferring 0 (the CORAL rule) unless moving gains real accuracy.

    Each task is fitted on its own: a joint search on QWK is not identifiable under the counting rule
    (one threshold can compensate another) and wanders to meaningless values.
    """
    logits = np.asarray(ordinal_logits, dtype=np.float64)
    grades = np.asarray(grades)
    thresholds = []
    for k in range(NUM_GRADES - 1):
        target = grades > k
        accuracy = np.array([np.mean((logits[:, k] > t) == target) for t in _THRESHOLD_GRID])
        at_zero = accuracy[np.argmin(np.abs(_THRESHOLD_GRID))]
        best = int(np.argmax(accuracy - 1e-9 * np.abs(_THRESHOLD_GRID)))   # ties: the smaller move
        thresholds.append(float(_THRESHOLD_GRID[best]) if accuracy[best] > at_zero + _MIN_GAIN else 0.0)
    return tuple(thresholds)


def calibrate(ordinal_logits: np.ndarray, grades: np.ndarray, base: GradingConfig = GradingConfig()) -> GradingConfig:
    thresholds = fit_thresholds(ordinal_logits, grades)
    shifted = np.asarray(ordinal_logits, dtype=np.float64) - np.asarray(thresholds)[None, :]
    return GradingConfig(thresholds=thresholds,
                         temperature=fit_temperature(shifted, grades),
                         referable_min_grade=base.referable_min_grade,
                         referable_threshold=base.referable_threshold)
