"""ONNX Runtime runner (CPU by default; CUDA/TensorRT execution providers when installed and asked for)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeretina.errors import BackendError, MissingDependencyError
from edgeretina.runtime.backends.base import INPUT_NAME, Runner

_DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, model_path: Path, threads: int | None = None, device: str | None = None,
                 settings: dict | None = None):
        super().__init__(model_path, threads, device or "cpu", settings)
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime", "export", "the onnxruntime backend") from None
        if self.device not in _DEVICE_PROVIDERS:
            raise BackendError(f"onnxruntime: unknown device {self.device!r} (choose {', '.join(_DEVICE_PROVIDERS)})")
        available = set(ort.get_available_providers())
        providers = [p for p in _DEVICE_PROVIDERS[self.device] if p in available]
        if _DEVICE_PROVIDERS[self.device][0] not in available:
            raise BackendError(f"onnxruntime: {_DEVICE_PROVIDERS[self.device][0]} is not available here "
                               f"(available: {', '.join(sorted(available))})")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for unreadable graphs
            raise BackendError(f"onnxruntime could not load {self.model_path.name}: {exc}") from None
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        values = self.session.run(self.output_names, {INPUT_NAME: images})
        return dict(zip(self.output_names, values))
