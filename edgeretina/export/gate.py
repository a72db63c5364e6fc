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
from edgeretina.fidelity import Check, GateThresholds, checks_table, compare


@dataclass(frozen=True)
class GateRun:
    """The latest gate: its thresholds and the candidate's outputs, for the shipped reference set."""

    label: str
    thresholds: GateThresholds
    outputs: dict[str, np.ndarray]


def run_gate(ctx: ExportContext, candidate: dict[str, np.ndarray], thresholds: GateThresholds, label: str,
             model_bytes: int | None = None) -> None:
    """Compare, record in ctx.gate under `label`, log a table, and enforce the configured mode.

    model_bytes: size of the candidate's model files, checked against thresholds.max_size_ratio of the
    FP32 ONNX graph when both are known.
    """
    ctx.last_gate = GateRun(label, thresholds, candidate)
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
    for line in checks_table(checks):
        ctx.log("  " + line)
    if not passed and ctx.config.gate == "fail":
        raise GateError([f"{label}: {c.failure()}" for c in checks if not c.passed])
    if not passed:
        ctx.log(f"gate failed for {label}, continuing because --gate {ctx.config.gate}")
