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
            "cores": os.cpu_count(), "python": platform.python_version(), "libraries": library_versions()}


def library_versions(names=LIBRARIES) -> dict[str, str]:
    """Installed versions of the named distributions; those not installed are left out."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
