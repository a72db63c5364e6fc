"""Ordinal logits -> calibrated probabilities, grade and referable decision (from the manifest)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeretina.grades import GradingConfig, class_probabilities, cumulative_probabilities, ordinal_grades

__all__ = ["GradeResult", "class_probabilities", "cumulative_probabilities", "grade_results"]


@dataclass(frozen=True)
class GradeResult:
    grade: int
    probabilities: list[float]      # P(grade = g), g = 0..4
    referable_probability: float    # P(grade >= referable_min_grade)
    referable: bool


def grade_results(ordinal_logits: np.ndarray, grading: GradingConfig) -> list[GradeResult]:
    cumulative = cumulative_probabilities(ordinal_logits, grading)
    probabilities = class_probabilities(cumulative)
    grades = ordinal_grades(ordinal_logits, grading.thresholds)   # = #{k: P(grade > k) > 0.5}
    referable_p = cumulative[:, grading.referable_min_grade - 1]
    return [GradeResult(grade=int(g), probabilities=[round(float(p), 6) for p in probs],
                        referable_probability=round(float(r), 6), referable=bool(r >= grading.referable_threshold))
            for g, probs, r in zip(grades, probabilities, referable_p)]
