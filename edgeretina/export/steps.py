"""Export as a list of small steps sharing one context (Polygraphy-style loaders, STYLE.md 5).

A target is a named list of steps; each step reads what earlier steps left in the context and adds its
own artifact or check. Adding a target adds a preset, not a branch in one big function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, get_args

import numpy as np

from edgeretina.bundle import Artifact
from edgeretina.errors import ConfigError

GateMode = Literal["fail", "warn", "off"]


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path
    out: Path                               # bundle directory to create (or .zip with zip=True)
    target: str = "onnx"
    precision: str | None = None            # target default when None (e.g. int8 for cpu, fp16 for jetson)
    opset: int = 17
    calibration_images: Path | None = None  # labels.csv or folder from the target camera; default: phantom set
    calibration_count: int = 256             # INT8 of the demo CNN passes the gate from 256, not at 64 or 128
    reference_images: Path | None = None    # labels.csv or folder of held-out images for the checks
    reference_count: int = 64               # held-out images the gate compares on (one flip = 1.6%)
    gate: GateMode = "fail"
    overwrite: bool = False
    zip: bool = False
    seed: int = 0
    trt_version: str = "10"                 # jetson target: TensorRT line on the device (8.5, 8.6, 10)
    prune: bool = False                     # structured pruning + recovery distillation before export
    bank_dtype: str = "float16"             # feature bank on disk: float16, or int8 + per-row scale (half the bytes)
    knn_k: int = 5                          # nearest cases the runtime returns per image
    bank_data: tuple[str, ...] = ()         # FORMAT:PATH specs to re-embed the feature bank from (edgeretina/layouts)
    # cpu/openvino INT8 weights: 7 bits give the same integers on every x86 class (edgeretina.cpu.int8_validity);
    # 8 bits are valid only where u8 x s8 sums do not saturate (VNNI, AMX, Arm). TensorRT (jetson) is unaffected.
    int8_weight_bits: int = 7

    def __post_init__(self):
        if self.gate not in get_args(GateMode):
            raise ConfigError(f"gate must be {', '.join(get_args(GateMode))}, not {self.gate!r}")
        if not 7 <= self.opset <= 21:
            raise ConfigError(f"opset {self.opset} is out of the supported range 7..21")
        if self.reference_count < 2:
            raise ConfigError("reference_count must be at least 2")
        if self.calibration_count < 1:
            raise ConfigError("calibration_count must be at least 1")
        if self.bank_dtype not in ("float16", "int8"):
            raise ConfigError(f"bank_dtype must be float16 or int8, not {self.bank_dtype!r}")
        if self.knn_k < 1:
            raise ConfigError("knn_k must be at least 1")
        if self.int8_weight_bits not in (7, 8):
            raise ConfigError(f"int8_weight_bits must be 7 or 8, not {self.int8_weight_bits!r}")


@dataclass
class ExportContext:
    config: ExportConfig
    staging: Path                                   # the bundle being built; moved to config.out at the end
    work: Path                                      # scratch space for intermediates (never shipped)
    checkpoint: Any = None                          # training.checkpoint.Checkpoint
    reference_inputs: np.ndarray | None = None      # float32 [N, 3, S, S], preprocessed held-out images
    reference_prepared: np.ndarray | None = None    # uint8 [N, S, S, 3]: the same images before normalisation
    reference_outputs: dict[str, np.ndarray] = field(default_factory=dict)   # torch outputs on them
    reference_source: dict[str, Any] = field(default_factory=dict)
    reference_truth: np.ndarray | None = None       # labelled grades of the reference images, when known
    onnx_path: Path | None = None                   # the current ONNX graph (in work/ until a step ships it)
    fp32_onnx_path: Path | None = None              # the FP32 reference graph, for size and fidelity ratios
    calibration_inputs: np.ndarray | None = None    # float32 [N, 3, S, S] for post-training quantization
    export_info: dict[str, Any] = field(default_factory=dict)   # merged into manifest["export"]
    artifacts: list[Artifact] = field(default_factory=list)
    bank_info: dict[str, Any] | None = None
    gate: dict[str, Any] = field(default_factory=dict)
    last_gate: Any = None                           # gate.GateRun of the latest gate: what `verify` re-checks
    steps_done: list[str] = field(default_factory=list)
    log: Callable[[str], None] = print


Step = Callable[[ExportContext], None]
