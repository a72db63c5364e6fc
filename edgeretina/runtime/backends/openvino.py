"""OpenVINO runner: reads an IR (model.xml + model.bin) or an ONNX graph directly, CPU by default.

Inference precision: OpenVINO computes FP32 layers in bf16 by default on CPUs with bf16 units. That is
~2x faster for an FP32/FP16 IR, but an INT8 IR loses to it: on an AVX-512 BF16 CPU without AMX (AMD EPYC
Zen 4), ViT-B-16 INT8 took 170 ms at 1 thread with the bf16 default (28 un-fused FakeQuantize + bf16->f32
reorders, 47 ms) and 127 ms with f32. Export times both and records the faster in the manifest
(export.runtime.openvino); the runner applies it on a CPU of the same precision class (the same bf16/AMX
flags), and leaves OpenVINO's default elsewhere, since AMX changes which one wins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeretina.cpu import precision_class
from edgeretina.errors import BackendError, MissingDependencyError
from edgeretina.runtime.backends.base import INPUT_NAME, Runner

# Virtual devices OpenVINO resolves itself; they never appear in core.available_devices.
_VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO")


class OpenVinoRunner(Runner):
    name = "openvino"

    def __init__(self, model_path: Path, threads: int | None = None, device: str | None = None,
                 settings: dict | None = None):
        super().__init__(model_path, threads, (device or "CPU").upper(), settings)
        try:
            import openvino as ov
        except ImportError:
            raise MissingDependencyError("openvino", "openvino", "the openvino backend") from None
        core = ov.Core()
        _check_device(self.device, core.available_devices)
        try:
            model = core.read_model(str(self.model_path))
            self.compiled = core.compile_model(model, self.device, self._compile_config())
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with its own messages
            raise BackendError(f"openvino could not load {self.model_path.name} on {self.device}: {exc}") from None
        self.output_names = [output.get_any_name() for output in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        results = self.request.infer({INPUT_NAME: images})
        # infer() reuses its output buffers between calls: copy before handing them out
        return {name: np.array(results[output]) for name, output in zip(self.output_names, self.compiled.outputs)}

    def _compile_config(self) -> dict[str, str]:
        config = {"PERFORMANCE_HINT": "LATENCY"}   # one camera, one image at a time: latency, not throughput
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = str(self.threads)
        hint = self.measured_precision_hint()
        if hint:
            config["INFERENCE_PRECISION_HINT"] = hint
        return config

    def measured_precision_hint(self) -> str | None:
        """The export-measured precision hint, when this is a CPU of the class it was measured on."""
        hint = self.settings.get("inference_precision_hint")
        measured_on = self.settings.get("cpu_precision_class")
        if not hint or not self.device.startswith("CPU") or measured_on is None:
            return None
        return hint if list(measured_on) == precision_class() else None

    def describe(self) -> dict[str, object]:
        info = super().describe()
        info["inference_precision"] = self.inference_precision()
        info["measured_hint_applied"] = self.measured_precision_hint() is not None
        return info

    def inference_precision(self) -> str | None:
        """What the plugin actually computes in: an FP32/FP16 IR runs in bf16 on CPUs with AMX/AVX-512 BF16."""
        try:
            hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        except Exception:  # not every plugin reports it
            return None
        return hint.to_string() if hasattr(hint, "to_string") else str(hint)


def _check_device(device: str, available: list[str]) -> None:
    base = device.split(":")[0].split(".")[0]
    if base in _VIRTUAL_DEVICES or device in available or base in {d.split(".")[0] for d in available}:
        return
    raise BackendError(f"openvino: device {device!r} is not available here (available: {', '.join(available)}; "
                       f"or {', '.join(_VIRTUAL_DEVICES)})")
