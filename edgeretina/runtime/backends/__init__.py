"""Backend registry: names -> runner classes, imported lazily so only the chosen backend loads."""

from __future__ import annotations

import importlib
from pathlib import Path

from edgeretina.errors import BackendError
from edgeretina.runtime.backends.base import Runner

# backend name -> (module, class, the artifact formats it runs)
_BACKENDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "onnxruntime": ("edgeretina.runtime.backends.onnxruntime", "OnnxRuntimeRunner", ("onnx",)),
    "tensorrt": ("edgeretina.runtime.backends.tensorrt", "TensorRtRunner", ("tensorrt-plan",)),
    "openvino": ("edgeretina.runtime.backends.openvino", "OpenVinoRunner", ("openvino-ir", "onnx")),
}


def available_backends() -> list[str]:
    return list(_BACKENDS)


def formats_for(backend: str) -> tuple[str, ...]:
    if backend not in _BACKENDS:
        raise BackendError(f"unknown backend {backend!r} (choose {', '.join(_BACKENDS)})")
    return _BACKENDS[backend][2]


def create_runner(backend: str, model_path: Path, threads: int | None = None, device: str | None = None,
                  settings: dict | None = None) -> Runner:
    formats_for(backend)  # raises for an unknown name
    module_name, class_name, _ = _BACKENDS[backend]
    runner_cls = getattr(importlib.import_module(module_name), class_name)
    return runner_cls(model_path, threads=threads, device=device, settings=settings)
