"""Torch -> ONNX FP32 and the structural checks every ONNX artifact passes."""

from __future__ import annotations

import shutil
import warnings

import torch

from edgeretina.bundle import describe_artifact
from edgeretina.errors import ExportError
from edgeretina.export.steps import ExportContext
from edgeretina.training.model import ExportWrapper

MODEL_FILE = "model.onnx"


def export_onnx_fp32(ctx: ExportContext) -> None:
    """Export with the TorchScript-based exporter at the configured opset, batch axis dynamic.

    Why this exporter: at opset <= 17 it is the one that also serves TensorRT 8.5 (it decomposes
    LayerNorm at 16); open_clip's attention fast path cannot be traced under no_grad, so export runs
    with gradients enabled on the eval-mode model (shared FACTS.md).
    """
    model = ctx.checkpoint.model.eval()
    wrapper = ExportWrapper(model).eval()
    names = list(wrapper.names)
    size = ctx.checkpoint.preprocess.image_size
    dummy = torch.from_numpy(ctx.reference_inputs[:2]).float()
    path = ctx.work / "model_fp32.onnx"
    dynamic = {"image": {0: "B"}, **{name: {0: "B"} for name in names}}
    try:
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (dummy,), str(path), input_names=["image"], output_names=names,
                              dynamic_axes=dynamic, opset_version=ctx.config.opset, dynamo=False,
                              do_constant_folding=True)
    except Exception as exc:  # the exporter raises many types; one typed error names the cause
        raise ExportError(f"ONNX export failed at opset {ctx.config.opset}: {exc}") from exc
    ctx.onnx_path = ctx.fp32_onnx_path = path
    ctx.export_info["fp32_onnx_bytes"] = path.stat().st_size
    ctx.log(f"exported FP32 ONNX ({path.stat().st_size / 1e6:.1f} MB, opset {ctx.config.opset}, input {size}px)")


def check_onnx(ctx: ExportContext) -> None:
    """onnx.checker, opset, and the graph contract of DESIGN.md (input `image`, named outputs)."""
    import onnx

    model = onnx.load(str(ctx.onnx_path), load_external_data=False)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{ctx.onnx_path.name} fails onnx.checker: {exc}") from None
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    expected = list(ctx.checkpoint.model.output_names)
    if inputs != ["image"] or outputs != expected:
        raise ExportError(f"graph contract broken: inputs {inputs}, outputs {outputs}, expected ['image'], {expected}")
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset > ctx.config.opset:
        raise ExportError(f"graph uses opset {opset}, above the requested {ctx.config.opset}")


def ship_onnx(ctx: ExportContext, precision: str = "fp32") -> None:
    """Copy the current ONNX graph into the bundle as model.onnx and describe it in the manifest."""
    shutil.copyfile(ctx.onnx_path, ctx.staging / MODEL_FILE)
    ctx.onnx_path = ctx.staging / MODEL_FILE
    ctx.artifacts.append(describe_artifact(ctx.staging, MODEL_FILE, fmt="onnx", role="model",
                                           precision=precision, target=ctx.config.target))
