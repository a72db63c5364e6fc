"""Ordinal logits -> calibrated probabilities, grade and referable decision (from the manifest)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeretina.grades import GradingConfig, ordinal_grades


@dataclass(frozen=True)
class GradeResult:
    grade: int
    probabilities: list[float]      # P(grade = g), g = 0..4
    referable_probability: float    # P(grade >= referable_min_grade)
    referable: bool


def cumulative_probabilities(ordinal_logits: np.ndarray, grading: GradingConfig) -> np.ndarray:
    """[B, K-1] logits -> P(grade > k) with the calibrated thresholds and temperature."""
    z = (np.asarray(ordinal_logits, dtype=np.float64) - np.asarray(grading.thresholds)) / grading.temperature
    return 1.0 / (1.0 + np.exp(-z))


def class_probabilities(cumulative: np.ndarray) -> np.ndarray:
    """P(grade > k) -> P(grade = g). CORAL is rank-consistent in its biases; calibrated thresholds can
    break monotonicity slightly, so the cumulative curve is made non-increasing first."""
    monotone = np.minimum.accumulate(cumulative, axis=1)
    ones = np.ones((len(monotone), 1))
    zeros = np.zeros((len(monotone), 1))
    upper = np.concatenate([ones, monotone], axis=1)
    lower = np.concatenate([monotone, zeros], axis=1)
    return upper - lower


def grade_results(ordinal_logits: np.ndarray, grading: GradingConfig) -> list[GradeResult]:
    cumulative = cumulative_probabilities(ordinal_logits, grading)
    probabilities = class_probabilities(cumulative)
    grades = ordinal_grades(ordinal_logits, grading.thresholds)   # = #{k: P(grade > k) > 0.5}
    referable_p = cumulative[:, grading.referable_min_grade - 1]
    return [GradeResult(grade=int(g), probabilities=[round(float(p), 6) for p in probs],
                        referable_probability=round(float(r), 6), referable=bool(r >= grading.referable_threshold))
            for g, probs, r in zip(grades, probabilities, referable_p)]
