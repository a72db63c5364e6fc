"""What a load did, per --data spec: how many images, which grades, what was left out and why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from edgeretina.dataset import LabeledImage, Skipped, grade_counts
from edgeretina.grades import NUM_GRADES
from edgeretina.layouts.common import IMAGE_NOT_FOUND

EXAMPLES_PER_REASON = 5        # to_dict keeps this many skipped entries of each reason, not all 40,000


@dataclass
class SpecSummary:
    """One spec's result: loaded counts by source and grade, and every skipped entry."""

    spec: str
    format: str
    grades_by_source: dict[str, list[int]] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)

    @classmethod
    def of(cls, spec: str, format: str, items: list[LabeledImage], skipped: list[Skipped]) -> SpecSummary:
        by_source: dict[str, list[LabeledImage]] = {}
        for item in items:
            by_source.setdefault(item.source or format, []).append(item)
        return cls(spec, format, {s: grade_counts(v) for s, v in sorted(by_source.items())}, list(skipped))

    @property
    def loaded(self) -> int:
        return sum(map(sum, self.grades_by_source.values()))

    @property
    def grade_counts(self) -> list[int]:
        return _sum_counts(self.grades_by_source.values())

    def skipped_by_reason(self) -> dict[str, int]:
        """Reason -> count, most frequent first."""
        return _by_reason(self.skipped)

    def line(self) -> str:
        if self.loaded == 0:
            return f"{self.spec}: 0 loaded: {self._why_empty()}"
        text = f"{self.spec}: loaded {self.loaded:,} (grades {self.grade_counts})"
        if set(self.grades_by_source) != {self.format}:
            text += "; sources: " + ", ".join(f"{s} {sum(c):,}" for s, c in self.grades_by_source.items())
        if self.skipped:
            text += f"; skipped {len(self.skipped):,}: " + _reasons_text(self.skipped)
            missing = _first(self.skipped, IMAGE_NOT_FOUND)
            if missing is not None:
                text += f"; first missing: {missing.detail}"
        return text

    def _why_empty(self) -> str:
        if not self.skipped:
            return "the labels list no images"
        missing = _first(self.skipped, IMAGE_NOT_FOUND)
        if missing is not None and all(s.reason == IMAGE_NOT_FOUND for s in self.skipped):
            return f"all {len(self.skipped):,} images missing; first missing: {missing.detail}"
        return (f"all {len(self.skipped):,} entries skipped: {_reasons_text(self.skipped)}; "
                f"first: {self.skipped[0]}")

    def to_dict(self) -> dict:
        return {"spec": self.spec, "format": self.format, "loaded": self.loaded, "grade_counts": self.grade_counts,
                "sources": {s: {"loaded": sum(c), "grade_counts": c} for s, c in self.grades_by_source.items()},
                "skipped": len(self.skipped), "skipped_by_reason": self.skipped_by_reason(),
                "skipped_examples": _examples(self.skipped)}


@dataclass
class LoadSummary:
    """Every spec of one load_data call. ``lines()`` for people, ``to_dict()`` for JSON (a checkpoint's
    training-data summary)."""

    specs: list[SpecSummary] = field(default_factory=list)

    @property
    def loaded(self) -> int:
        return sum(s.loaded for s in self.specs)

    @property
    def grade_counts(self) -> list[int]:
        return _sum_counts(s.grade_counts for s in self.specs)

    @property
    def skipped(self) -> list[Skipped]:
        return [entry for s in self.specs for entry in s.skipped]

    def skipped_by_reason(self) -> dict[str, int]:
        return _by_reason(self.skipped)

    def by_source(self) -> dict[str, dict]:
        """Source -> {"loaded": n, "grade_counts": [...]}, over all specs."""
        merged: dict[str, list[list[int]]] = {}
        for spec in self.specs:
            for source, counts in spec.grades_by_source.items():
                merged.setdefault(source, []).append(counts)
        return {s: {"loaded": sum(map(sum, c)), "grade_counts": _sum_counts(c)} for s, c in sorted(merged.items())}

    def lines(self) -> list[str]:
        lines = [s.line() for s in self.specs]
        if len(self.specs) > 1:
            total = f"total: loaded {self.loaded:,} from {len(self.specs)} specs (grades {self.grade_counts})"
            if self.skipped:
                total += f"; skipped {len(self.skipped):,}: " + _reasons_text(self.skipped)
            lines.append(total)
        return lines

    def to_dict(self) -> dict:
        return {"loaded": self.loaded, "grade_counts": self.grade_counts, "sources": self.by_source(),
                "skipped": len(self.skipped), "skipped_by_reason": self.skipped_by_reason(),
                "specs": [s.to_dict() for s in self.specs]}


def _sum_counts(counts) -> list[int]:
    total = [0] * NUM_GRADES
    for row in counts:
        total = [a + b for a, b in zip(total, row)]
    return total


def _by_reason(skipped: list[Skipped]) -> dict[str, int]:
    counts = Counter(s.reason for s in skipped)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _reasons_text(skipped: list[Skipped]) -> str:
    return ", ".join(f"{n:,} {reason}" for reason, n in _by_reason(skipped).items())


def _first(skipped: list[Skipped], reason: str) -> Skipped | None:
    return next((s for s in skipped if s.reason == reason), None)


def _examples(skipped: list[Skipped]) -> list[dict[str, str]]:
    shown: Counter[str] = Counter()
    examples = []
    for entry in skipped:
        if shown[entry.reason] < EXAMPLES_PER_REASON:
            shown[entry.reason] += 1
            examples.append({"where": entry.where, "reason": entry.reason, "detail": entry.detail})
    return examples
