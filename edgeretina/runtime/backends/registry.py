"""The backend registry: name -> runner class (imported lazily, so only the chosen backend loads), the
artifact formats it runs and the package whose presence makes it installed."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from edgeretina.errors import BackendError
from edgeretina.runtime.backends.base import Runner


@dataclass(frozen=True)
class BackendSpec:
    module: str
    runner_class: str
    formats: tuple[str, ...]      # the artifact formats it runs, the one it prefers first
    package: str                  # importable once the backend is installed


_BACKENDS: dict[str, BackendSpec] = {
    "onnxruntime": BackendSpec("edgeretina.runtime.backends.onnxruntime", "OnnxRuntimeRunner", ("onnx",), "onnxruntime"),
    "tensorrt": BackendSpec("edgeretina.runtime.backends.tensorrt", "TensorRtRunner", ("tensorrt-plan",), "tensorrt"),
    "openvino": BackendSpec("edgeretina.runtime.backends.openvino", "OpenVinoRunner", ("openvino-ir", "onnx"), "openvino"),
}


def registered_backends() -> list[str]:
    """Every backend edgeretina knows, installed or not, in registry order."""
    return list(_BACKENDS)


def installed_backends() -> list[str]:
    """The registered backends whose package imports here (found without importing it)."""
    return [name for name in _BACKENDS if is_installed(name)]


def is_installed(backend: str) -> bool:
    return importlib.util.find_spec(_spec(backend).package) is not None


def formats_for(backend: str) -> tuple[str, ...]:
    return _spec(backend).formats


def create_runner(backend: str, model_path: Path, threads: int | None = None, device: str | None = None,
                  settings: dict | None = None) -> Runner:
    spec = _spec(backend)
    runner_cls = getattr(importlib.import_module(spec.module), spec.runner_class)
    return runner_cls(model_path, threads=threads, device=device, settings=settings)


def _spec(backend: str) -> BackendSpec:
    if backend not in _BACKENDS:
        raise BackendError(f"unknown backend {backend!r} (choose {', '.join(_BACKENDS)})")
    return _BACKENDS[backend]
