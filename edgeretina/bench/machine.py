"""The machine a benchmark ran on: CPU model, the ISA flags that decide INT8/BF16 speed, cores, versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform

from edgeretina.cpu import cpu_info

LIBRARIES = ("numpy", "onnxruntime", "openvino", "opencv-python-headless", "opencv-python", "tensorrt")


def machine_info() -> dict:
    """CPU model, the ISA flags that decide INT8/BF16 speed, cores and library versions."""
    model, flags = cpu_info()
    return {"cpu": model, "machine": platform.machine(), "cpu_flags": list(flags),
            "cores": os.cpu_count(), "python": platform.python_version(), "libraries": _library_versions()}


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
