"""Targets are named presets: an ordered list of steps (DESIGN.md "Export = a target's list of steps")."""

from __future__ import annotations

from edgeretina.errors import ConfigError
from edgeretina.export.bank import write_bank
from edgeretina.export.gate import run_gate
from edgeretina.choices import TARGET_PRECISIONS
from edgeretina.export.jetson import jetson_target
from edgeretina.export.onnx_steps import check_onnx, export_onnx_fp32, ship_onnx
from edgeretina.export.openvino_steps import openvino_target
from edgeretina.export.quantize_ort import gate_onnx_int8, quantize_int8, ship_onnx_int8
from edgeretina.export.reference import load_calibration, load_reference
from edgeretina.export.reference_set import write_reference_set
from edgeretina.export.steps import ExportContext, Step
from edgeretina.fidelity import FP32_THRESHOLDS


def gate_onnx_fp32(ctx: ExportContext) -> None:
    """Run the ONNX graph with the runtime's own runner and compare it with torch."""
    from edgeretina.runtime.backends import create_runner

    runner = create_runner("onnxruntime", ctx.onnx_path)
    run_gate(ctx, runner.run(ctx.reference_inputs), FP32_THRESHOLDS, "onnx-fp32")


TARGETS: dict[str, list[Step]] = {
    "onnx": [load_reference, export_onnx_fp32, check_onnx, gate_onnx_fp32, ship_onnx, write_bank, write_reference_set],
    "jetson": jetson_target(),  # TensorRT-ready ONNX (fp16 default or explicit int8) + build_engine.sh
    "openvino": openvino_target(),  # IR FP16 or NNCF INT8 (precision, default int8)
    "cpu": [load_reference, export_onnx_fp32, check_onnx, load_calibration, quantize_int8, gate_onnx_int8,
            ship_onnx_int8, write_bank, write_reference_set],
}


def check_precision(target: str, precision: str | None) -> None:
    """Refuse a precision the target does not make, before any step runs (the onnx target used to ignore it)."""
    allowed = TARGET_PRECISIONS.get(target, ())
    if precision is not None and precision not in allowed:
        raise ConfigError(f"the {target} target makes {' or '.join(allowed)}, not {precision!r}")


def target_steps(name: str, prune: bool = False, rebuild_bank: bool = False) -> list[Step]:
    """The target's steps; with prune, structured pruning + recovery runs on the torch model right after
    the reference is taken (its fidelity to the unpruned model is gated as `pruned`); with rebuild_bank,
    the feature bank is re-embedded with the (pruned) model next."""
    if name not in TARGETS:
        raise ConfigError(f"unknown export target {name!r} (choose {', '.join(TARGETS)})")
    steps = list(TARGETS[name])
    if prune:
        from edgeretina.export.prune import prune_model
        steps.insert(steps.index(load_reference) + 1, prune_model)
    if rebuild_bank:
        from edgeretina.export.bank import rebuild_bank as rebuild
        steps.insert(steps.index(load_reference) + 1 + int(prune), rebuild)
    return steps
