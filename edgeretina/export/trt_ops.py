"""Which ONNX graphs a TensorRT version's ONNX parser accepts, and a check that lists every offender.

Source: onnx/onnx-tensorrt `docs/operators.md` on the release branches
- `release/8.5-GA` ("TensorRT 8.5 supports operators up to Opset 17"; JetPack 5.0/5.1 ship TRT 8.5):
  the N rows are copied below; LayerNormalization is N.
- `release/8.6-GA` (up to opset 17): as 8.5 plus LayerNormalization (added in 8.6).
- `release/10.0` ("supports operators in the inclusive range of opset 9 to opset 20"; JetPack 6 ships
  TRT 10.x): the ML-training, sequence, string and integer-arithmetic rows stay N.
Restrictions from the same tables that matter for our graphs: QuantizeLinear/DequantizeLinear need a zero
point of 0; Squeeze/Unsqueeze/Slice axes and TopK's K must be constants (initializers or Constant nodes).
"""

from __future__ import annotations

from dataclasses import dataclass

_UNSUPPORTED_8_5 = frozenset({
    "Bernoulli", "BitShift", "BlackmanWindow", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det",
    "DynamicQuantizeLinear", "HammingWindow", "HannWindow", "Hardmax", "IsInf", "LayerNormalization",
    "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss",
    "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul", "STFT",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
    "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringNormalizer", "TfIdfVectorizer", "Unique",
})
_UNSUPPORTED_10 = frozenset({
    "Bernoulli", "BitShift", "Compress", "ConcatFromSequence", "ConvInteger", "Det", "DynamicQuantizeLinear",
    "MatMulInteger", "MaxRoiPool", "MaxUnpool", "Multinomial", "NegativeLogLikelihoodLoss", "Optional",
    "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul", "SequenceAt",
    "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "SequenceMap",
    "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringNormalizer", "TfIdfVectorizer", "Unique",
    "StringConcat", "StringSplit", "RegexFullMatch", "ImageDecoder",
})


@dataclass(frozen=True)
class TrtOpSupport:
    version: str             # "8.5", "8.6", "10"
    max_opset: int
    unsupported: frozenset[str]
    jetpack: str             # the JetPack line that ships it, for messages


TRT_SUPPORT: dict[str, TrtOpSupport] = {
    "8.5": TrtOpSupport("8.5", 17, _UNSUPPORTED_8_5, "JetPack 5.0/5.1"),
    "8.6": TrtOpSupport("8.6", 17, _UNSUPPORTED_8_5 - {"LayerNormalization"}, "DRIVE OS 6.0.7+ / x86"),
    "10": TrtOpSupport("10", 20, _UNSUPPORTED_10, "JetPack 6"),
}

# Inputs that must be build-time constants: (op, input index) per onnx-tensorrt's restrictions column.
_CONSTANT_INPUTS = {"Squeeze": 1, "Unsqueeze": 1, "TopK": 1, "CumSum": 1}
_ZERO_POINT_INPUT = 2   # QuantizeLinear/DequantizeLinear: (x, scale, zero_point)


@dataclass(frozen=True)
class Offender:
    node: str
    op: str
    reason: str

    def line(self) -> str:
        return f"{self.node or '<unnamed>'} ({self.op}): {self.reason}"


def support_for(trt_version: str) -> TrtOpSupport:
    """The table for "8.5", "8.6" or "10" (a full version such as "10.3.0" maps to its line)."""
    from edgeretina.errors import ConfigError

    key = "10" if trt_version.split(".")[0] == "10" else ".".join(trt_version.split(".")[:2])
    if key not in TRT_SUPPORT:
        raise ConfigError(f"unknown TensorRT version {trt_version!r} (choose {', '.join(TRT_SUPPORT)})")
    return TRT_SUPPORT[key]


def find_offenders(model, trt_version: str) -> list[Offender]:
    """Every node of an onnx.ModelProto that `trt_version`'s ONNX parser would reject, with the reason."""
    support = support_for(trt_version)
    offenders = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > support.max_opset:
        offenders.append(Offender("<graph>", "opset", f"opset {opset} > {support.max_opset}, the highest "
                                                       f"TensorRT {support.version} parses"))
    constants = _constant_names(model)
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            offenders.append(Offender(node.name, node.op_type, f"custom domain {node.domain!r} needs a plugin"))
        elif node.op_type in support.unsupported:
            offenders.append(Offender(node.name, node.op_type, f"not supported by TensorRT {support.version} "
                                                               f"({support.jetpack})"))
        offenders.extend(_restriction_offenders(node, constants))
    return offenders


def _restriction_offenders(node, constants: dict) -> list[Offender]:
    import onnx.numpy_helper

    found = []
    index = _CONSTANT_INPUTS.get(node.op_type)
    if index is not None and len(node.input) > index and node.input[index] and node.input[index] not in constants:
        found.append(Offender(node.name, node.op_type, f"input {index} must be a constant for TensorRT"))
    if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > _ZERO_POINT_INPUT:
        zero_point = constants.get(node.input[_ZERO_POINT_INPUT])
        if zero_point is not None and onnx.numpy_helper.to_array(zero_point).any():
            found.append(Offender(node.name, node.op_type, "zero point must be 0 for TensorRT"))
    return found


def _constant_names(model) -> dict:
    """Initializers and Constant-node outputs by name (tensors)."""
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = attribute.t
    return constants
