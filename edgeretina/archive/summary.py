"""Counts over the merged results: what summary.json reports for the whole archive."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from edgeretina.grades import NUM_GRADES

SCREENING_OUTCOMES = ("negative", "referable", "ungradable")


@dataclass
class ResultCounts:
    screening: dict[str, int] = field(default_factory=dict)
    grades: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    nodes: dict[str, int] = field(default_factory=dict)
    cpu_classes: list[str] = field(default_factory=list)


def count_results(table) -> ResultCounts:
    """Every outcome and grade is listed, 0 when absent, so two summaries compare key by key."""
    data = table.select(["screening", "grade", "error", "node", "cpu_class"]).to_pydict()
    screening = Counter(value for value in data["screening"] if value is not None)
    grades = Counter(value for value in data["grade"] if value is not None)
    return ResultCounts(
        screening={outcome: screening.get(outcome, 0) for outcome in SCREENING_OUTCOMES},
        grades={str(g): grades.get(g, 0) for g in range(NUM_GRADES)},
        errors=sum(error is not None for error in data["error"]),
        nodes=dict(sorted(Counter(n for n in data["node"] if n is not None).items())),
        cpu_classes=sorted({c for c in data["cpu_class"] if c is not None}))
