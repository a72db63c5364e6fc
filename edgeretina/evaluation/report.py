"""The evaluation report of a DR grader on a labelled test set: what a paper or a regulator reads.

One `EvaluationInput` holds the true grades of N cases and one `ModePredictions` per way of grading them
(the ordinal head, the KNN bank, the text prototypes, ...). `evaluation_report` turns it into one
JSON-ready dict: per mode every grading metric, intervals from a percentile bootstrap over cases, the
unacceptable errors, calibration, and a per-source breakdown; then paired differences between modes.
`write_report` writes report.json, report.md and the plots, each atomically.

Every number comes from `edgeretina.metrics`; this module only chooses, groups and formats them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeretina import metrics
from edgeretina.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from edgeretina.errors import DatasetError
from edgeretina.grades import GRADES, NUM_GRADES, REFERABLE_MIN_GRADE

SCHEMA = "edgeretina.evaluation/1"
ECE_BINS = 15
_MODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")   # it names files: confusion_<mode>.png


@dataclass(frozen=True, eq=False)
class ModePredictions:
    """One way of grading the same cases. Arrays are coerced on construction (lists are fine).

    predicted: int [N] grades; grade_probs: float [N, 5], rows sum to 1 (ECE, reliability);
    referable_scores: float [N] P(grade >= referable grade); referable_pred: bool [N], the decision at the
    model's operating point. Raises ValueError on a name that cannot name a file or on mismatched shapes.
    """

    name: str
    predicted: np.ndarray
    grade_probs: np.ndarray
    referable_scores: np.ndarray
    referable_pred: np.ndarray

    def __post_init__(self):
        if not isinstance(self.name, str) or not _MODE_NAME.fullmatch(self.name):
            raise ValueError(f"mode name {self.name!r} must be letters, digits, '_', '.' or '-' (it names files)")
        _set(self, "predicted", np.asarray(self.predicted))
        _set(self, "grade_probs", np.asarray(self.grade_probs, dtype=np.float64))
        _set(self, "referable_scores", np.asarray(self.referable_scores, dtype=np.float64))
        decisions = np.asarray(self.referable_pred)
        if decisions.dtype != bool and not np.isin(decisions, (0, 1)).all():
            raise ValueError(f"mode {self.name!r}: referable_pred must be booleans (or 0/1), not scores")
        _set(self, "referable_pred", decisions.astype(bool))
        n = len(self.predicted) if self.predicted.ndim == 1 else -1
        if (self.predicted.ndim != 1 or self.grade_probs.shape != (n, NUM_GRADES)
                or self.referable_scores.shape != (n,) or self.referable_pred.shape != (n,)):
            raise ValueError(f"mode {self.name!r}: predicted [N], grade_probs [N, {NUM_GRADES}], referable_scores [N] "
                             f"and referable_pred [N] must agree; got {self.predicted.shape}, "
                             f"{self.grade_probs.shape}, {self.referable_scores.shape}, {self.referable_pred.shape}")


@dataclass(frozen=True, eq=False)
class EvaluationInput:
    """The scored cases and every mode's predictions of them.

    excluded: cases left out before scoring, by reason (e.g. {"ungradable by the quality gate": 3}):
    reported, never scored. meta: model, data, machine, timings; copied into the report as JSON.
    modes[0] is the reference of the comparison (e.g. head: knn - head, prototype - head).
    Raises ValueError on mismatched lengths, a case id twice in one source, duplicate mode names, no mode,
    negative counts.
    """

    case_ids: list[str]
    grades: np.ndarray
    sources: list[str]
    modes: list[ModePredictions]
    excluded: dict[str, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        _set(self, "case_ids", [str(c) for c in self.case_ids])
        _set(self, "sources", [str(s) for s in self.sources])
        _set(self, "grades", np.asarray(self.grades))
        _set(self, "modes", list(self.modes))
        n = len(self.case_ids)
        if self.grades.ndim != 1 or len(self.grades) != n or len(self.sources) != n:
            raise ValueError(f"case_ids ({n}), grades {self.grades.shape} and sources ({len(self.sources)}) "
                             "must hold one entry per case")
        _check_unique([f"{case} (source {source})" for case, source in zip(self.case_ids, self.sources)], "case")
        if not self.modes or not all(isinstance(m, ModePredictions) for m in self.modes):
            raise ValueError("modes must be a non-empty list of ModePredictions")
        _check_unique([m.name for m in self.modes], "mode name")
        for mode in self.modes:
            if len(mode.predicted) != n:
                raise ValueError(f"mode {mode.name!r} grades {len(mode.predicted)} cases, the input holds {n}")
        for reason, count in self.excluded.items():
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
                raise ValueError(f"excluded[{reason!r}] must be a count >= 0, got {count!r}")


def evaluation_report(data: EvaluationInput, *, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
                      referable_min_grade: int = REFERABLE_MIN_GRADE) -> dict:
    """Every metric of every mode, JSON-ready (plain numbers, lists, dicts; None where undefined).

    Keys: schema, n, excluded, n_excluded, grade_counts, referable_min_grade, n_referable, sources,
    bootstrap, meta, modes {name: section}, comparison [paired differences against modes[0]].
    Intervals are {"estimate", "low", "high", "n_undefined"}; every interval of one report is drawn from
    the same resampled cases (same seed, same N), so differences are paired.
    Raises DatasetError when no case is left to score, ValueError on invalid grades, probabilities or
    settings (from `edgeretina.metrics`).
    """
    n = len(data.grades)
    if n == 0:
        raise DatasetError(f"no case left to score (excluded: {_excluded_text(data.excluded)}); "
                           "evaluate on a test set with gradable, labelled photographs")
    if isinstance(referable_min_grade, bool) or not 1 <= int(referable_min_grade) < NUM_GRADES:
        raise ValueError(f"referable_min_grade must be in 1..{NUM_GRADES - 1}, got {referable_min_grade!r}")
    truth = data.grades
    metrics.confusion_matrix(truth, truth)   # raises ValueError naming y_true when a grade is not 0..4
    boot = _Bootstrap(n_bootstrap, confidence, seed)
    referable_true = truth >= referable_min_grade
    return {
        "schema": SCHEMA,
        "n": n,
        "excluded": {str(k): int(v) for k, v in data.excluded.items()},
        "n_excluded": int(sum(data.excluded.values())),
        "grade_counts": np.bincount(truth.astype(np.int64), minlength=NUM_GRADES).tolist(),
        "referable_min_grade": int(referable_min_grade),
        "n_referable": int(referable_true.sum()),
        "sources": {s: int(c) for s, c in _source_counts(data.sources).items()},
        "bootstrap": {"method": "percentile", "unit": "case", "n_resamples": int(n_bootstrap),
                      "confidence": float(confidence), "seed": int(seed)},
        "meta": _json_ready(data.meta),
        "modes": {m.name: _mode_section(m, data, int(referable_min_grade), boot) for m in data.modes},
        "comparison": [_comparison(m, data.modes[0], truth, referable_true, boot) for m in data.modes[1:]],
    }


def write_report(report: dict, data: EvaluationInput, out_dir: Path) -> dict[str, Path]:
    """report.json, report.md, confusion_<mode>.png and reliability_<mode>.png per mode, and roc.png (every
    mode's referable ROC on one plot) into out_dir, each written atomically (temp file, then rename).

    Returns {file name: path}. The JSON and the Markdown are written first, so they are on disk even when
    the plots fail. Raises MissingDependencyError (the `plot` extra) without matplotlib, ValueError when
    the report was not made from `data`.
    """
    from edgeretina.evaluation import plots

    if report.get("n") != len(data.grades) or list(report.get("modes", {})) != [m.name for m in data.modes]:
        raise ValueError("the report was not made from this EvaluationInput (case count or modes differ)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"report.json": write_json_atomic(out_dir / "report.json", report),
               "report.md": write_text_atomic(out_dir / "report.md", markdown_report(report))}
    pngs = {}
    for name, section in report["modes"].items():
        pngs[f"confusion_{name}.png"] = plots.confusion_png(section["confusion_matrix"],
                                                            f"{name}: confusion matrix (n = {section['n']})")
        pngs[f"reliability_{name}.png"] = plots.reliability_png(section["reliability"], section["ece"],
                                                                f"{name}: reliability")
    pngs["roc.png"] = plots.roc_png(_roc_curves(report, data),
                                    f"referable DR (grade >= {report['referable_min_grade']}): ROC")
    for file_name, png in pngs.items():
        written[file_name] = write_bytes_atomic(out_dir / file_name, png)
    return written


def markdown_report(report: dict) -> str:
    """The report as Markdown: data and exclusions, a summary table of every mode with intervals written
    "0.912 (0.884–0.940)", the paired comparison, then per mode the full tables."""
    lines = ["# Diabetic retinopathy grading: evaluation report", ""]
    lines += _data_lines(report)
    if report["meta"]:
        items = [[_cell(key), _meta_text(value)] for key, value in report["meta"].items()]
        lines += ["", "## Run", ""] + _table(["Item", "Value"], items, text_columns=2)
    lines += ["", "## Summary", ""] + _summary_table(report)
    if report["comparison"]:
        lines += ["", "## Comparison (paired: the same resampled cases for both modes)", ""]
        lines += _comparison_table(report["comparison"])
    for name, section in report["modes"].items():
        lines += ["", f"## Mode: {name}", ""] + _mode_lines(section, report["referable_min_grade"])
    return "\n".join(lines) + "\n"


# --- the numbers ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Bootstrap:
    n_resamples: int
    confidence: float
    seed: int

    def interval(self, metric_fn: Callable[..., Any], *arrays) -> dict[str, Any]:
        ci = metrics.bootstrap_ci(metric_fn, *arrays, n_resamples=self.n_resamples, confidence=self.confidence,
                                  seed=self.seed)
        return {key: ci[key] for key in ("estimate", "low", "high", "n_undefined")}


def _mode_section(mode: ModePredictions, data: EvaluationInput, referable_min_grade: int,
                  boot: _Bootstrap) -> dict[str, Any]:
    truth, predicted = data.grades, mode.predicted
    referable_true = truth >= referable_min_grade
    base = metrics.grading_report(truth, predicted, mode.referable_scores, mode.referable_pred, NUM_GRADES,
                                  referable_min_grade)
    return {
        "n": base["n"],
        "qwk": boot.interval(metrics.quadratic_weighted_kappa, truth, predicted),
        "accuracy": boot.interval(metrics.accuracy, truth, predicted),
        "mae": base["mae"],
        "off_by_one": base["off_by_one"],
        "f1_macro": base["f1_macro"],
        "f1_weighted": base["f1_weighted"],
        "per_class": base["per_class"],
        "confusion_matrix": base["confusion_matrix"],
        "unacceptable_errors": _unacceptable(truth, predicted, data),
        "ece": metrics.expected_calibration_error(mode.grade_probs, truth, ECE_BINS),
        "reliability": metrics.reliability_bins(mode.grade_probs, truth, ECE_BINS),
        "referable": {
            "n_positive": int(referable_true.sum()),
            "n_negative": int((~referable_true).sum()),
            "auc": boot.interval(metrics.roc_auc, referable_true, mode.referable_scores),
            "sensitivity": boot.interval(_sensitivity, referable_true, mode.referable_pred),
            "specificity": boot.interval(_specificity, referable_true, mode.referable_pred),
        },
        "by_source": _by_source(mode, data, referable_true),
    }


def _sensitivity(referable_true, referable_pred):
    return metrics.sensitivity_specificity(referable_true, referable_pred)[0]


def _specificity(referable_true, referable_pred):
    return metrics.sensitivity_specificity(referable_true, referable_pred)[1]


def _unacceptable(truth: np.ndarray, predicted: np.ndarray, data: EvaluationInput) -> dict[str, Any]:
    """metrics.unacceptable_errors plus the cases themselves, for a grader to review."""
    counts = metrics.unacceptable_errors(truth, predicted)
    low_as_high = np.isin(truth, metrics.LOW_GRADES) & np.isin(predicted, metrics.HIGH_GRADES)
    high_as_low = np.isin(truth, metrics.HIGH_GRADES) & np.isin(predicted, metrics.LOW_GRADES)

    def cases(rows: np.ndarray) -> list[dict[str, Any]]:
        return [{"case_id": data.case_ids[i], "source": data.sources[i], "true": int(truth[i]),
                 "predicted": int(predicted[i])} for i in np.flatnonzero(rows)]

    counts["cases"] = {"true_0_1_pred_3_4": cases(low_as_high), "true_3_4_pred_0_1": cases(high_as_low)}
    return counts


def _by_source(mode: ModePredictions, data: EvaluationInput, referable_true: np.ndarray) -> dict | None:
    sources = np.asarray(data.sources)
    names = list(_source_counts(data.sources))
    if len(names) < 2:
        return None
    breakdown = {}
    for name in names:
        rows = sources == name
        sensitivity, specificity = metrics.sensitivity_specificity(referable_true[rows], mode.referable_pred[rows])
        breakdown[name] = {"n": int(rows.sum()),
                           "qwk": metrics.quadratic_weighted_kappa(data.grades[rows], mode.predicted[rows]),
                           "accuracy": metrics.accuracy(data.grades[rows], mode.predicted[rows]),
                           "referable_sensitivity": sensitivity, "referable_specificity": specificity}
    return breakdown


def _comparison(mode: ModePredictions, reference: ModePredictions, truth: np.ndarray, referable_true: np.ndarray,
                boot: _Bootstrap) -> dict[str, Any]:
    def difference(metric_fn):
        def paired(target, ours, theirs):
            a, b = metric_fn(target, ours), metric_fn(target, theirs)
            return None if a is None or b is None else a - b
        return paired

    return {"mode": mode.name, "reference": reference.name,
            "qwk": boot.interval(difference(metrics.quadratic_weighted_kappa), truth, mode.predicted,
                                 reference.predicted),
            "accuracy": boot.interval(difference(metrics.accuracy), truth, mode.predicted, reference.predicted),
            "referable_auc": boot.interval(difference(metrics.roc_auc), referable_true, mode.referable_scores,
                                           reference.referable_scores)}


def _roc_curves(report: dict, data: EvaluationInput) -> list:
    from edgeretina.evaluation.plots import RocCurve

    referable_true = data.grades >= report["referable_min_grade"]
    curves = []
    for mode in data.modes:
        points = metrics.roc_curve(referable_true, mode.referable_scores)
        if points is None:
            continue     # one class only: no curve to draw (the AUC is None too)
        referable = report["modes"][mode.name]["referable"]
        sensitivity, specificity = referable["sensitivity"]["estimate"], referable["specificity"]["estimate"]
        operating_point = None if sensitivity is None or specificity is None else (1.0 - specificity, sensitivity)
        curves.append(RocCurve(mode.name, points[0], points[1], referable["auc"]["estimate"], operating_point))
    return curves


def _source_counts(sources: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for source in sources:
        counts[source] = counts.get(source, 0) + 1
    return counts


# --- the Markdown --------------------------------------------------------------------------------

def _data_lines(report: dict) -> list[str]:
    n, sources = report["n"], report["sources"]
    boot = report["bootstrap"]
    grade_counts = ", ".join(f"{g.value} {g.short} {c}" for g, c in zip(GRADES, report["grade_counts"]))
    lines = [f"- Cases scored: {n}" + (f" from {len(sources)} sources ("
                                       + ", ".join(f"{_cell(s)} {c}" for s, c in sources.items()) + ")"
                                       if len(sources) > 1 else ""),
             f"- True grades (ICDR): {grade_counts}",
             f"- Referable (grade >= {report['referable_min_grade']}): {report['n_referable']} of {n}",
             f"- Excluded, not scored: {report['n_excluded']}"
             + (f" ({_excluded_text(report['excluded'])})" if report["n_excluded"] else ""),
             f"- Intervals: {_percent(boot['confidence'], 0)} percentile bootstrap over cases "
             f"({boot['n_resamples']} resamples, seed {boot['seed']})"]
    return lines


def _summary_table(report: dict) -> list[str]:
    header = ["Mode", "n", "QWK", "Accuracy", "Referable AUC", "Sensitivity", "Specificity", f"ECE ({ECE_BINS} bins)",
              "Unacceptable errors"]
    rows = []
    for name, s in report["modes"].items():
        errors = s["unacceptable_errors"]["total"]
        rows.append([name, str(s["n"]), _ci_text(s["qwk"]), _ci_text(s["accuracy"]),
                     _ci_text(s["referable"]["auc"]), _ci_text(s["referable"]["sensitivity"]),
                     _ci_text(s["referable"]["specificity"]), _number(s["ece"]),
                     f"{errors['count']} ({_percent(errors['rate'])})"])
    return _table(header, rows)


def _comparison_table(comparison: list[dict]) -> list[str]:
    rows = [[f"{c['mode']} − {c['reference']}", _ci_text(c["qwk"], signed=True),
             _ci_text(c["accuracy"], signed=True), _ci_text(c["referable_auc"], signed=True)] for c in comparison]
    return _table(["Difference", "QWK", "Accuracy", "Referable AUC"], rows)


def _mode_lines(section: dict, referable_min_grade: int) -> list[str]:
    errors = section["unacceptable_errors"]
    lines = [f"MAE {_number(section['mae'])} · within one grade {_percent(section['off_by_one'])} · "
             f"F1 macro {_number(section['f1_macro'])} · F1 weighted {_number(section['f1_weighted'])} · "
             f"ECE {_number(section['ece'])}", "",
             "Unacceptable errors: "
             + "; ".join(f"true {label}: {errors[key]['count']} ({_percent(errors[key]['rate'])} of cases, "
                         f"{_percent(errors[key]['rate_of_true_group'])} of true {label.split(' ')[0]})"
                         for key, label in (("true_0_1_pred_3_4", "0–1 graded 3–4"),
                                            ("true_3_4_pred_0_1", "3–4 graded 0–1")))
             + f"; total {errors['total']['count']} ({_percent(errors['total']['rate'])})"]
    listed = [case for cases in errors["cases"].values() for case in cases]
    if listed:
        lines += ["", "Cases: " + ", ".join(f"{_cell(c['case_id'])} ({_cell(c['source'])}, true {c['true']}, "
                                            f"graded {c['predicted']})" for c in listed)]
    prf = section["per_class"]
    lines += ["", "### Per grade", ""]
    lines += _table(["Grade", "Precision", "Recall", "F1", "Support"],
                    [[f"{g.value} {g.name}", _number(prf["precision"][g.value]), _number(prf["recall"][g.value]),
                      _number(prf["f1"][g.value]), str(prf["support"][g.value])] for g in GRADES])
    lines += ["", "### Confusion matrix (rows: true grade, columns: predicted grade)", ""]
    lines += _table(["True \\ predicted"] + [str(g.value) for g in GRADES],
                    [[f"{g.value} {g.name}"] + [str(c) for c in row]
                     for g, row in zip(GRADES, section["confusion_matrix"])])
    if section["by_source"]:
        lines += ["", f"### By source (referable: grade >= {referable_min_grade})", ""]
        lines += _table(["Source", "n", "QWK", "Accuracy", "Sensitivity", "Specificity"],
                        [[_cell(name), str(s["n"]), _number(s["qwk"]), _number(s["accuracy"]),
                          _number(s["referable_sensitivity"]), _number(s["referable_specificity"])]
                         for name, s in section["by_source"].items()])
    return lines


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """A Markdown table: the first `text_columns` columns left-aligned, the numbers right-aligned."""
    rule = ["---"] * text_columns + ["--:"] * (len(header) - text_columns)
    return (["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
            + ["| " + " | ".join(row) + " |" for row in rows])


def _ci_text(interval: dict, signed: bool = False) -> str:
    """0.912 (0.884–0.940); differences, which may be negative, as +0.012 (-0.010 to 0.034)."""
    if interval["estimate"] is None:
        return "n/a"
    text = _number(interval["estimate"], signed)
    if interval["low"] is None:
        return text
    if signed:
        return f"{text} ({interval['low']:.3f} to {interval['high']:.3f})"
    return f"{text} ({interval['low']:.3f}–{interval['high']:.3f})"


def _number(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _percent(rate: float | None, decimals: int = 1) -> str:
    return "n/a" if rate is None else f"{100.0 * rate:.{decimals}f}%"


def _excluded_text(excluded: dict[str, int]) -> str:
    return ", ".join(f"{_cell(reason)}: {count}" for reason, count in excluded.items()) or "none"


def _meta_text(value: Any) -> str:
    return _cell(value if isinstance(value, str) else json.dumps(value, sort_keys=True))


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# --- small helpers -------------------------------------------------------------------------------

def _set(instance, name: str, value) -> None:
    object.__setattr__(instance, name, value)   # a frozen dataclass normalising its own fields


def _check_unique(values: list[str], what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate {what} {value!r}: each must appear once")
        seen.add(value)


def _json_ready(meta: dict) -> dict:
    """meta as plain JSON values: numpy numbers and arrays become numbers and lists, paths strings.
    Raises ValueError on anything else that JSON cannot hold."""
    def plain(value):
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, Path):
            return str(value)
        raise ValueError(f"meta holds a {type(value).__name__}, which JSON cannot hold: {value!r}")

    return json.loads(json.dumps(meta, default=plain, allow_nan=False))
