"""The gate: an exported artifact must behave like the torch reference on held-out images.

Every check is computed and recorded; on failure one GateError lists all failed checks (optimum's
`_run_validation` habit, STYLE.md 8). Thresholds are per target: FP32 must match almost exactly,
quantized artifacts get the slack their precision needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeretina.errors import GateError
from edgeretina.export.steps import ExportContext
from edgeretina.grades import GradingConfig, ordinal_grades
from edgeretina.metrics import quadratic_weighted_kappa


@dataclass(frozen=True)
class GateThresholds:
    grade_agreement: float = 0.99       # fraction of images with the same grade
    qwk_change: float = 0.01            # |QWK(candidate vs truth) - QWK(torch vs truth)|, or vs torch grades
    referable_agreement: float = 0.99
    embedding_cosine: float = 0.999     # minimum over images
    saliency_correlation: float = 0.99  # mean Pearson correlation of the maps
    knn_overlap: float = 0.9            # mean top-k overlap of neighbours in the bank
    max_size_ratio: float | None = None # model files / FP32 ONNX bytes (compression targets only)


FP32_THRESHOLDS = GateThresholds()
# One INT8 bar for every target (cpu, openvino, jetson), from the acceptance criteria. KNN
# top-10 overlap is the loosest: neighbours in a tightly packed bank swap places at small cosine changes.
INT8_THRESHOLDS = GateThresholds(grade_agreement=0.98, qwk_change=0.01, referable_agreement=0.98,
                                 embedding_cosine=0.98, saliency_correlation=0.95, knn_overlap=0.7,
                                 max_size_ratio=0.35)


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    threshold: float
    higher_is_better: bool = True

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold

    def line(self) -> str:
        mark = "✓" if self.passed else "✗"
        op = "≥" if self.higher_is_better else "≤"
        return f"{mark} {self.name:<22} {self.value:>9.5f}  (needs {op} {self.threshold})"


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], grading: GradingConfig,
            thresholds: GateThresholds, bank: np.ndarray | None = None, k: int = 10,
            truth: np.ndarray | None = None) -> list[Check]:
    """All fidelity checks of a candidate against the torch reference. With `truth` (the reference set's
    labels) qwk_change is |QWK(candidate) - QWK(torch)| against the truth; without, 1 - QWK(torch, candidate)."""
    ref_grades = ordinal_grades(reference["ordinal_logits"], grading.thresholds)
    cand_grades = ordinal_grades(candidate["ordinal_logits"], grading.thresholds)
    referable = grading.referable_min_grade
    checks = [
        Check("grade_agreement", float(np.mean(ref_grades == cand_grades)), thresholds.grade_agreement),
        Check("qwk_change", _qwk_change(ref_grades, cand_grades, truth), thresholds.qwk_change, False),
        Check("referable_agreement", float(np.mean((ref_grades >= referable) == (cand_grades >= referable))),
              thresholds.referable_agreement),
        Check("embedding_cosine", float(_cosine(reference["embedding"], candidate["embedding"]).min()),
              thresholds.embedding_cosine),
        Check("saliency_correlation", _mean_correlation(reference["saliency"], candidate["saliency"]),
              thresholds.saliency_correlation),
    ]
    if bank is not None and len(bank) > 1:
        checks.append(Check("knn_overlap", _knn_overlap(reference["embedding"], candidate["embedding"], bank, k),
                            thresholds.knn_overlap))
    return checks


def _qwk_change(ref_grades: np.ndarray, cand_grades: np.ndarray, truth: np.ndarray | None) -> float:
    if truth is None:
        return 1.0 - agreement_kappa(ref_grades, cand_grades)
    return abs(agreement_kappa(truth, cand_grades) - agreement_kappa(truth, ref_grades))


def agreement_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """QWK between reference and candidate grades: 1 when identical. Used as the QWK-change proxy when
    no ground truth is at hand (the change of QWK against truth is bounded by the disagreement)."""
    if np.array_equal(a, b):
        return 1.0
    return float(quadratic_weighted_kappa(a, b))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def _mean_correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    values = []
    for x, y in zip(a, b):
        if x.std() < 1e-9 or y.std() < 1e-9:          # a flat map: compare values directly
            values.append(1.0 if np.allclose(x, y, atol=1e-3) else 0.0)
        else:
            values.append(float(np.corrcoef(x, y)[0, 1]))
    return float(np.mean(values))


def _knn_overlap(ref: np.ndarray, cand: np.ndarray, bank: np.ndarray, k: int) -> float:
    k = min(k, len(bank))
    top = lambda q: np.argsort(-(q @ bank.T), axis=1)[:, :k]   # noqa: E731
    return float(np.mean([len(set(r) & set(c)) / k for r, c in zip(top(ref), top(cand))]))


def run_gate(ctx: ExportContext, candidate: dict[str, np.ndarray], thresholds: GateThresholds, label: str,
             model_bytes: int | None = None) -> None:
    """Compare, record in ctx.gate under `label`, log a table, and enforce the configured mode.

    model_bytes: size of the candidate's model files, checked against thresholds.max_size_ratio of the
    FP32 ONNX graph when both are known.
    """
    if ctx.config.gate == "off":
        ctx.gate[label] = {"mode": "off", "passed": None}
        ctx.log(f"gate for {label} skipped (--gate off)")
        return
    bank = ctx.checkpoint.bank.embeddings if ctx.checkpoint.bank is not None else None
    checks = compare(ctx.reference_outputs, candidate, ctx.checkpoint.grading, thresholds, bank,
                     truth=ctx.reference_truth)
    fp32_bytes = ctx.export_info.get("fp32_onnx_bytes")
    if thresholds.max_size_ratio is not None and model_bytes and fp32_bytes:
        ctx.export_info["size_ratio"] = round(model_bytes / fp32_bytes, 4)
        checks.append(Check("size_ratio", model_bytes / fp32_bytes, thresholds.max_size_ratio, False))
    passed = all(c.passed for c in checks)
    ctx.gate[label] = {"checks": {c.name: {"value": round(c.value, 6), "threshold": c.threshold,
                                           "passed": c.passed} for c in checks},
                       "passed": passed, "images": int(len(ctx.reference_inputs)), "mode": ctx.config.gate}
    ctx.log(f"gate for {label} on {len(ctx.reference_inputs)} images:")
    for check in checks:
        ctx.log("  " + check.line())
    if not passed and ctx.config.gate == "fail":
        raise GateError([f"{label}: {c.name} = {c.value:.5f} (needs {'≥' if c.higher_is_better else '≤'} "
                         f"{c.threshold})" for c in checks if not c.passed])
    if not passed:
        ctx.log(f"gate failed for {label}, continuing because --gate {ctx.config.gate}")
