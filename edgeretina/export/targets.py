"""Targets are named presets: an ordered list of steps (DESIGN.md "Export = a target's list of steps")."""

from __future__ import annotations

from edgeretina.errors import ConfigError
from edgeretina.export.bank import write_bank
from edgeretina.export.gate import FP32_THRESHOLDS, run_gate
from edgeretina.export.onnx_steps import check_onnx, export_onnx_fp32, ship_onnx
from edgeretina.export.reference import load_reference
from edgeretina.export.steps import ExportContext, Step


def gate_onnx_fp32(ctx: ExportContext) -> None:
    """Run the ONNX graph with the runtime's own runner and compare it with torch."""
    from edgeretina.runtime.backends import create_runner

    runner = create_runner("onnxruntime", ctx.onnx_path)
    run_gate(ctx, runner.run(ctx.reference_inputs), FP32_THRESHOLDS, "onnx-fp32")


TARGETS: dict[str, list[Step]] = {
    "onnx": [load_reference, export_onnx_fp32, check_onnx, gate_onnx_fp32, ship_onnx, write_bank],
}


def target_steps(name: str) -> list[Step]:
    if name not in TARGETS:
        raise ConfigError(f"unknown export target {name!r} (choose {', '.join(TARGETS)})")
    return TARGETS[name]
