"""The `jetson` target: a TensorRT-ready bundle that the device turns into an engine.

TensorRT engines are tied to the exact TensorRT version and GPU that built them, so the export ships the
ONNX graph (opset <= 17, dynamic batch with a recorded profile), a `build_engine.sh` for trtexec on the
device, and the reference images with the torch outputs so the device can check its own engine.
- fp16 (default): the graph stays FP32; trtexec builds with --fp16 and pins normalisation/softmax layers
  to FP32 (their reductions overflow or lose the small differences that matter in half precision).
- int8: explicit quantization, the form TensorRT 8.5+ prefers to implicit calibration: symmetric int8
  Q/DQ (zero points 0), per-channel weights on the output-channel axis, per-tensor activations,
  LayerNorm/Softmax left unquantized.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from importlib import resources

import numpy as np

from edgeretina.bundle import describe_artifact
from edgeretina.choices import TARGET_PRECISIONS
from edgeretina.export.graph import ATTENTION_POOL_SCOPE, CNN_EARLY_STAGES, CalibrationReader, KeepFloat, kept_float_nodes
from edgeretina.errors import ConfigError, ExportError
from edgeretina.export.gate import run_gate
from edgeretina.export.steps import ExportContext
from edgeretina.export.trt_ops import find_offenders, support_for
from edgeretina.fidelity import FP32_THRESHOLDS, INT8_THRESHOLDS

PRECISIONS = TARGET_PRECISIONS["jetson"]
BUILD_SCRIPT = "build_engine.sh"
REFERENCE_INPUTS = "reference_inputs.npy"
REFERENCE_OUTPUTS = "reference_outputs.npz"
OPSET_WITHOUT_LAYERNORM = 16   # the legacy exporter decomposes LayerNorm at 16 (FACTS); TRT 8.5 needs that

# Explicit INT8 loses more than FP32 re-ordering does; the floor for the device graph.
# The ONNX of an explicit-INT8 bundle is not what runs on the device (the engine is), so no size bar.
JETSON_INT8_THRESHOLDS = replace(INT8_THRESHOLDS, max_size_ratio=None)
# Op types whose inputs get Q/DQ: where TensorRT has INT8 kernels (NVIDIA's pytorch-quantization places
# quantizers on conv/linear/matmul inputs only); everything else runs in FP16/FP32 between them.
QUANTIZED_OP_TYPES = ["Conv", "MatMul", "Gemm"]
KEEP_FLOAT_OP_TYPES = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf")
# Symmetric activations spend the whole int8 range on |max|, so one rare outlier coarsens every image's
# steps. Demo tiny-rn, 64 references: MinMax agreement 0.953, min cosine 0.989, KNN 0.75; percentile
# 99.999: 0.969, 0.996, 0.82; 99.99 clips real signal (cosine 0.965); 99.9999 behaves like MinMax.
CALIBRATION_PERCENTILE = 99.999
# Issue 3: the CNN's stem and first stages carry most of the INT8 ordinal-logit error on the demo tiny-rn
# (ORT layer scan, see quantize_ort.py); small weights, so keeping them float costs little on the device.
# Demo tiny-rn, 256 calibration images, percentile 99.999, 64 references: stem+layer1 float agreement 0.969
# (flips 0.040 and 0.048 from a threshold), min cosine 0.995, KNN 0.86; + layer2 float 1.0, 0.998, 0.89
# (ONNX 0.745 of FP32; no size bar here); + layer3 1.0, 0.999, 0.92 but more of the compute in float.
# MinMax with layer2 float: 0.9375 (the outlier-coarsened steps again); 64 calibration images with layer2
# float: 0.953 (percentile ranges need the 256, ExportConfig.calibration_count).
EARLY_FLOAT_SCOPES = CNN_EARLY_STAGES
# Nodes left unquantized: normalisation/softmax, MatMuls of two activations (attention scores, prototype
# similarities), the heads after the backbone and the CNN's final attention pool (tiny compute that sets the
# embedding directly). Measured on the demo tiny-rn checkpoint, 32 held-out images, MinMax: min embedding
# cosine 0.914 quantizing all Conv/MatMul/Gemm, 0.974 keeping the activation MatMuls in float, 0.987
# keeping heads and attention pool in float too.
KEEP_FLOAT = KeepFloat(op_types=KEEP_FLOAT_OP_TYPES, heads=True, activation_matmuls=True,
                       scopes=(ATTENTION_POOL_SCOPE, *EARLY_FLOAT_SCOPES))


@dataclass(frozen=True)
class JetsonOptions:
    trt_version: str = "10"
    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    sparsity: bool = False     # 2:4 structured sparsity is only used when the weights are pruned that way

    def __post_init__(self):
        support_for(self.trt_version)   # raises ConfigError for an unknown line
        if self.precision not in PRECISIONS:
            raise ConfigError(f"jetson precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError("jetson batch profile needs 1 <= min <= opt <= max")


def jetson_options(ctx: ExportContext) -> JetsonOptions:
    return JetsonOptions(trt_version=ctx.config.trt_version, precision=ctx.config.precision or "fp16")


def shape_profile(options: JetsonOptions, image_size: int) -> dict[str, list[int]]:
    return {name: [batch, 3, image_size, image_size]
            for name, batch in (("min", options.min_batch), ("opt", options.opt_batch), ("max", options.max_batch))}


# ---- steps -------------------------------------------------------------------------------------------

def prepare_jetson(ctx: ExportContext) -> None:
    """Validate the options and pick the opset the device's TensorRT parses (16 for 8.5: no LayerNorm)."""
    options = jetson_options(ctx)
    limit = support_for(options.trt_version).max_opset
    if options.trt_version.startswith("8.5") and ctx.config.opset > OPSET_WITHOUT_LAYERNORM:
        ctx.log(f"TensorRT 8.5 has no LayerNormalization: exporting at opset {OPSET_WITHOUT_LAYERNORM}")
        ctx.config = dataclasses.replace(ctx.config, opset=OPSET_WITHOUT_LAYERNORM)
    elif ctx.config.opset > limit:
        raise ConfigError(f"TensorRT {options.trt_version} parses opset <= {limit}; asked for {ctx.config.opset}")


def calibrate_if_int8(ctx: ExportContext) -> None:
    if jetson_options(ctx).precision == "int8":
        from edgeretina.export.reference import load_calibration
        load_calibration(ctx)


def check_trt_compatibility(ctx: ExportContext) -> None:
    """Walk the graph against the onnx-tensorrt support table; one ExportError lists every offender."""
    import onnx

    version = jetson_options(ctx).trt_version
    offenders = find_offenders(onnx.load(str(ctx.onnx_path), load_external_data=False), version)
    if offenders:
        raise ExportError(f"{ctx.onnx_path.name} will not parse on TensorRT {version}: "
                          + "; ".join(o.line() for o in offenders))
    ctx.log(f"graph is compatible with TensorRT {version}")


def quantize_int8_explicit(ctx: ExportContext) -> None:
    """Symmetric S8S8 Q/DQ calibrated on ctx.calibration_inputs (no-op for fp16)."""
    if jetson_options(ctx).precision != "int8":
        return
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(ctx.onnx_path))
    excluded = kept_float_nodes(model.graph, KEEP_FLOAT)
    out = ctx.work / "model_int8_qdq.onnx"
    try:
        quantize_static(str(ctx.onnx_path), str(out), CalibrationReader(ctx.calibration_inputs, batch=1),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OP_TYPES,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "CalibPercentile": CALIBRATION_PERCENTILE})
    except Exception as exc:  # ORT's quantizer raises assorted types; name the step
        raise ExportError(f"INT8 Q/DQ quantization for TensorRT failed: {exc}") from exc
    ctx.onnx_path = out
    ctx.export_info["quantization"] = {
        "library": "onnxruntime.quantization", "format": "QDQ S8S8 symmetric, per-channel weights",
        "calibration_method": f"Percentile {CALIBRATION_PERCENTILE}", "kept_float_nodes": len(excluded),
        "calibration_images": len(ctx.calibration_inputs),
        "kept_float_scopes": ["normalisation/softmax", "activation MatMuls", "heads", ATTENTION_POOL_SCOPE,
                              *EARLY_FLOAT_SCOPES]}
    ctx.log(f"quantized to explicit INT8 Q/DQ ({out.stat().st_size / 1e6:.1f} MB; {len(excluded)} "
            "normalisation/softmax/attention nodes kept in float)")


def verify_explicit_quantization(ctx: ExportContext) -> None:
    """Zero points all 0, weights per-channel on the output-channel axis, activations per-tensor."""
    if jetson_options(ctx).precision != "int8":
        return
    import onnx

    problems = qdq_problems(onnx.load(str(ctx.onnx_path)))
    if problems:
        raise ExportError("INT8 graph is not in TensorRT's explicit-quantization form: " + "; ".join(problems))


def gate_jetson(ctx: ExportContext) -> None:
    """onnxruntime runs the graph the device will build from (FP32 or Q/DQ INT8) against torch.

    The INT8 graph runs with its Q/DQ pairs unfused: ORT's fused S8S8 kernels on x86 without VNNI sum
    pairs of products in saturating int16 (AMD EPYC Zen 3, demo model: agreement 0.70, min cosine 0.945),
    which the device's TensorRT never does; unfused, the integer products are summed exactly, as on the
    GPU, and the gate says the same on every CPU class."""
    from edgeretina.runtime.backends import create_runner

    options = jetson_options(ctx)
    thresholds = JETSON_INT8_THRESHOLDS if options.precision == "int8" else FP32_THRESHOLDS
    settings = {"qdq_as_float": True} if options.precision == "int8" else None
    outputs = create_runner("onnxruntime", ctx.onnx_path, settings=settings).run(ctx.reference_inputs)
    run_gate(ctx, outputs, thresholds, f"jetson-{options.precision}")


def ship_jetson_onnx(ctx: ExportContext) -> None:
    from edgeretina.export.onnx_steps import ship_onnx

    # The shipped graph is FP32 for fp16 engines (TensorRT casts while building) and Q/DQ for int8.
    ship_onnx(ctx, "int8" if jetson_options(ctx).precision == "int8" else "fp32")


def write_reference_data(ctx: ExportContext) -> None:
    """The held-out images and torch's outputs on them, so the device can check the engine it builds."""
    np.save(ctx.staging / REFERENCE_INPUTS, ctx.reference_inputs.astype(np.float32))
    np.savez(ctx.staging / REFERENCE_OUTPUTS, **{k: np.asarray(v, np.float32) for k, v in ctx.reference_outputs.items()})
    for file, fmt in ((REFERENCE_INPUTS, "npy"), (REFERENCE_OUTPUTS, "npz")):
        ctx.artifacts.append(describe_artifact(ctx.staging, file, fmt=fmt, role="reference", precision="fp32",
                                               target=ctx.config.target))


def write_build_script(ctx: ExportContext) -> None:
    options = jetson_options(ctx)
    profile = shape_profile(options, ctx.checkpoint.preprocess.image_size)
    path = ctx.staging / BUILD_SCRIPT
    path.write_text(render_build_script(options, profile, _float_layer_names(ctx)), encoding="utf-8")
    path.chmod(0o755)
    ctx.artifacts.append(describe_artifact(ctx.staging, BUILD_SCRIPT, fmt="script", role="build-script",
                                           precision="n/a", target=ctx.config.target))


def record_tensorrt_info(ctx: ExportContext) -> None:
    options = jetson_options(ctx)
    ctx.export_info["tensorrt"] = {
        "trt_version": options.trt_version, "opset": ctx.config.opset, "precision": options.precision,
        "input": "image", "shapes": shape_profile(options, ctx.checkpoint.preprocess.image_size),
        "sparsity": options.sparsity, "build_script": BUILD_SCRIPT,
        "reference": {"inputs": REFERENCE_INPUTS, "outputs": REFERENCE_OUTPUTS},
    }


# ---- helpers -----------------------------------------------------------------------------------------

def qdq_problems(model) -> list[str]:
    """Every Q/DQ node that breaks TensorRT's explicit-quantization form, as readable lines."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    consumers = _consumers(model)
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = initializers.get(node.input[1])
        zero = initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            problems.append(f"{node.name}: scale is not a constant")
            continue
        if zero is not None and numpy_helper.to_array(zero).any():
            problems.append(f"{node.name}: zero point is not 0")
        weight = initializers.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if weight is not None and weight.data_type == 3:   # int8 weight (int32 = bias, follows the weight)
            problems.extend(_weight_axis_problems(node, weight, scale, consumers))
        elif weight is None and int(np.prod(scale.dims)) != 1:
            problems.append(f"{node.name}: activation scale is not per-tensor ({list(scale.dims)})")
    return problems


def _weight_axis_problems(node, weight, scale, consumers) -> list[str]:
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    rank = len(weight.dims)
    axis = axis % rank if rank else 0
    expected = _output_channel_axis(consumers.get(node.output[0]), rank)
    # Per-channel: a 1-D scale with one entry per slice along the axis (a 1-output head has just one).
    if rank > 1 and (len(scale.dims) != 1 or scale.dims[0] != weight.dims[axis]):
        return [f"{node.name}: weight scale {list(scale.dims)} is per-tensor, not per-channel"]
    if expected is not None and axis != expected:
        return [f"{node.name}: weight quantized on axis {axis}, output channels are axis {expected}"]
    return []


def _output_channel_axis(consumer, rank: int) -> int | None:
    if consumer is None:
        return None
    if consumer.op_type in ("Conv", "ConvTranspose"):
        return 0 if consumer.op_type == "Conv" else 1
    if consumer.op_type == "MatMul":
        return rank - 1                       # weight [.., K, N]: N is the output channel
    if consumer.op_type == "Gemm":
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return None


def _consumers(model) -> dict:
    found = {}
    for node in model.graph.node:
        for name in node.input:
            found.setdefault(name, node)
    return found


def _float_layer_names(ctx: ExportContext) -> list[str]:
    """ONNX node names of normalisation and softmax, which trtexec pins to FP32 in fp16 builds.

    TensorRT names layers after their ONNX nodes, so `--layerPrecisions=<name>:fp32` reaches them; nodes
    the builder fuses away lose the constraint (a warning on the device, not an error).
    """
    import onnx

    model = onnx.load(str(ctx.fp32_onnx_path or ctx.onnx_path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax") and n.name]


def render_build_script(options: JetsonOptions, profile: dict[str, list[int]], float_layers: list[str]) -> str:
    template = resources.files("edgeretina.export").joinpath("templates", BUILD_SCRIPT).read_text(encoding="utf-8")
    values = {
        "PRECISION": options.precision,
        "TRT_VERSION": options.trt_version,
        "MIN_SHAPE": "x".join(map(str, profile["min"])),
        "OPT_SHAPE": "x".join(map(str, profile["opt"])),
        "MAX_SHAPE": "x".join(map(str, profile["max"])),
        "SPARSITY": "1" if options.sparsity else "0",
        "FLOAT_LAYERS": ",".join(f"{name}:fp32" for name in float_layers),
    }
    for key, value in values.items():
        if any(c in value for c in "\"'$`\\"):
            raise ExportError(f"unsafe character in build-script value {key}={value!r}")
        template = template.replace(f"@{key}@", value)
    return template



def jetson_target() -> list:
    """The step list of the `jetson` target (precision and TensorRT line come from the ExportConfig)."""
    from edgeretina.export.bank import write_bank
    from edgeretina.export.onnx_steps import check_onnx, export_onnx_fp32
    from edgeretina.export.reference import load_reference
    from edgeretina.export.reference_set import write_reference_set

    return [prepare_jetson, load_reference, calibrate_if_int8, export_onnx_fp32, check_onnx,
            quantize_int8_explicit, verify_explicit_quantization, check_trt_compatibility, gate_jetson,
            ship_jetson_onnx, write_reference_data, write_build_script, write_bank, write_reference_set,
            record_tensorrt_info]
