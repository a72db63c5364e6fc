"""Rules about the exported graph that several targets share: where the vision tower's nodes are, which
nodes a quantizer leaves float, and how calibration images reach ONNX Runtime's quantizer.

The TorchScript exporter names nodes by torch module path (`/model/backbone/conv1/Conv`), so a scope is
a prefix of that path. The `cpu` target (quantize_ort.py), the `jetson` INT8 graph (jetson.py) and the
`openvino` target's NNCF ignored scopes (openvino_steps.py, regexes) all read these constants; each
target chooses which scopes it keeps float, with its measurements beside the choice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from edgeretina.errors import ExportError

MODEL_SCOPE = "/model/"
BACKBONE_SCOPE = "/model/backbone/"       # the vision tower; everything else under /model/ is a head
ATTENTION_POOL_SCOPE = "/attnpool/"       # open_clip ModifiedResNet's attention pooling (its projection head)
OUTPUT_NAMES = ("ordinal_logits", "prototype_logits", "embedding", "saliency")


def backbone_scope(module: str) -> str:
    """The node-name prefix of one module of the tower, e.g. backbone_scope("layer1")."""
    return f"{BACKBONE_SCOPE}{module}/"


CNN_STEM = tuple(backbone_scope(m) for m in ("conv1", "conv2", "conv3"))
CNN_EARLY_STAGES = CNN_STEM + (backbone_scope("layer1"), backbone_scope("layer2"))
# The attention pool's value and output projections (names the exporter gives the MatMuls/Gemm)
ATTENTION_POOL_PROJECTIONS = tuple(f"{ATTENTION_POOL_SCOPE}{op}" for op in ("MatMul_3", "MatMul_4", "Gemm"))


def in_backbone(node_name: str) -> bool:
    return node_name.startswith(BACKBONE_SCOPE)


def prefix_pattern(scope: str) -> str:
    """A regex (NNCF IgnoredScope patterns) for every node under `scope`."""
    return re.escape(scope) + ".*"


def fragment_pattern(fragment: str) -> str:
    """A regex for every node whose name contains `fragment`."""
    return ".*" + re.escape(fragment) + ".*"


@dataclass(frozen=True)
class KeepFloat:
    """Which nodes a quantizer leaves float. Scopes match as substrings of the node name."""

    op_types: tuple[str, ...] = ()
    heads: bool = False                    # every node outside the backbone
    activation_matmuls: bool = False       # MatMuls of two activations (attention, prototype similarity)
    scopes: tuple[str, ...] = ()


def kept_float_nodes(graph, rule: KeepFloat) -> list[str]:
    """Names of the graph's nodes that `rule` keeps float (an onnx GraphProto)."""
    if rule.heads and not any(in_backbone(node.name) for node in graph.node):
        raise ExportError(f"no node carries the {BACKBONE_SCOPE!r} scope: cannot tell the heads from the backbone")
    constants = {init.name for init in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}

    def kept(node) -> bool:
        activation_matmul = node.op_type == "MatMul" and not any(name in constants for name in node.input)
        return (node.op_type in rule.op_types or (rule.heads and not in_backbone(node.name))
                or (rule.activation_matmuls and activation_matmul)
                or any(scope in node.name for scope in rule.scopes))

    return [node.name for node in graph.node if kept(node)]


class CalibrationReader:
    """ONNX Runtime's CalibrationDataReader (get_next) over preprocessed images, `batch` at a time (the
    graph's batch axis is dynamic; ranges do not depend on the batching)."""

    def __init__(self, images: np.ndarray | None, batch: int = 8):
        if images is None or len(images) == 0:
            raise ExportError("static INT8 needs calibration images (run load_calibration first)")
        self._feeds = iter([{"image": images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)
