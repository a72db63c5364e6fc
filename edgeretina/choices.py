"""The fixed sets of values a user picks from, in one place the CLI can read without importing torch.

The libraries that act on them validate against these tuples (export targets and their precisions, the
gate's modes, training precisions, bank dtypes, backends); tests/test_cli_choices.py checks that each
registry agrees. Importing this module costs nothing: the CLI reads it on every start.
"""

from __future__ import annotations

EXPORT_TARGETS = ("onnx", "cpu", "openvino", "jetson")
# What ExportConfig.precision may be per target (None: the target's default). cpu: "int8" measures the
# schemes and ships the fastest faithful one; the others force one scheme.
TARGET_PRECISIONS: dict[str, tuple[str, ...]] = {
    "onnx": ("fp32",),
    "cpu": ("int8", "int8-dynamic", "int8-static", "int8-dynamic-u8"),
    "openvino": ("fp16", "int8"),
    "jetson": ("fp16", "int8"),
}
EXPORT_PRECISIONS = tuple(dict.fromkeys(p for precisions in TARGET_PRECISIONS.values() for p in precisions))
GATE_MODES = ("fail", "warn", "off")
TRAINING_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRAINING_SAMPLERS = ("per_grade", "weighted")            # training/data.py
SALIENCY_KINDS = ("deep", "gated")                        # training/model.py
LESION_DETAILS = ("patch", "fine")                        # training/model.py: lesion maps on the patch grid or stride 8
LESION_LABELS = ("masks", "image")                        # training/loop.py: pixel masks or image-level labels (weak)
TRAINING_DEVICES = ("cpu", "cuda")                       # training/loop.py, training/distributed.py
BANK_DTYPES = ("float16", "int8")                      # bank.npz on disk (bank_storage.py)
BACKENDS = ("onnxruntime", "tensorrt", "openvino")     # runtime/backends/registry.py maps each to its runner
COUNTERFACTUAL_EVIDENCE = ("auto", "lesion", "saliency")   # runtime/counterfactual.py: the map that picks removals
