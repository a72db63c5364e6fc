"""OpenVINO runner: reads an IR (model.xml + model.bin) or an ONNX graph directly, CPU by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeretina.errors import BackendError, MissingDependencyError
from edgeretina.runtime.backends.base import INPUT_NAME, Runner

# Virtual devices OpenVINO resolves itself; they never appear in core.available_devices.
_VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO")


class OpenVinoRunner(Runner):
    name = "openvino"

    def __init__(self, model_path: Path, threads: int | None = None, device: str | None = None):
        super().__init__(model_path, threads, (device or "CPU").upper())
        try:
            import openvino as ov
        except ImportError:
            raise MissingDependencyError("openvino", "openvino", "the openvino backend") from None
        core = ov.Core()
        _check_device(self.device, core.available_devices)
        try:
            model = core.read_model(str(self.model_path))
            self.compiled = core.compile_model(model, self.device, _compile_config(threads))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with its own messages
            raise BackendError(f"openvino could not load {self.model_path.name} on {self.device}: {exc}") from None
        self.output_names = [output.get_any_name() for output in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        results = self.request.infer({INPUT_NAME: images})
        # infer() reuses its output buffers between calls: copy before handing them out
        return {name: np.array(results[output]) for name, output in zip(self.output_names, self.compiled.outputs)}

    def describe(self) -> dict[str, object]:
        info = super().describe()
        info["inference_precision"] = self.inference_precision()
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


def _compile_config(threads: int | None) -> dict[str, str]:
    config = {"PERFORMANCE_HINT": "LATENCY"}   # one camera, one image at a time: latency, not throughput
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config
