"""TensorRT at run time: run a serialized engine (model.plan), after checking that it can run here.

An engine only runs on the TensorRT version and GPU model that built it, so every plan carries what built
it (engine.json beside it, and the manifest's export.engine) and the runner refuses a mismatch up front
instead of failing deep inside deserialisation. Device memory goes through cuda-python (backends/cuda.py).
Building and checking a plan live in tensorrt_build.py. Only runs where NVIDIA's stack exists; imports
are guarded so this module loads anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgeretina.errors import BackendError, MissingDependencyError
from edgeretina.runtime.backends import cuda
from edgeretina.runtime.backends.base import INPUT_NAME, Runner

ENGINE_INFO = "engine.json"
PLAN_FILE = "model.plan"


def check_engine_compatibility(recorded: dict, installed_version: str, device: str) -> None:
    """Raise BackendError unless the plan was built by this TensorRT version on this device model.

    recorded: {"tensorrt_version": "10.3.0", "device": "Orin"} from engine.json / the manifest.
    """
    problems = []
    built_with = recorded.get("tensorrt_version")
    built_on = recorded.get("device")
    if not built_with or not built_on:
        problems.append("the plan does not record the TensorRT version and device that built it")
    if built_with and built_with != installed_version:
        problems.append(f"built with TensorRT {built_with}, this machine has {installed_version}")
    if built_on and built_on != device:
        problems.append(f"built on {built_on!r}, this machine is {device!r}")
    if problems:
        raise BackendError("TensorRT plan cannot run here: " + "; ".join(problems)
                           + " (rebuild it on this device with build_engine.sh or `edgeretina build-engine`)")


def recorded_engine_info(plan_path: Path) -> dict:
    """engine.json beside the plan, else the bundle manifest's export.engine section, else {}."""
    sidecar = plan_path.with_name(ENGINE_INFO)
    if sidecar.is_file():
        return json.loads(sidecar.read_text(encoding="utf-8"))
    manifest = plan_path.with_name("manifest.json")
    if manifest.is_file():
        return json.loads(manifest.read_text(encoding="utf-8")).get("export", {}).get("engine", {})
    return {}


def import_tensorrt(purpose: str = "running TensorRT engines"):
    try:
        import tensorrt
    except ImportError:
        raise MissingDependencyError("tensorrt", "jetson", purpose) from None
    return tensorrt


class TensorRtRunner(Runner):
    name = "tensorrt"

    def __init__(self, model_path: Path, threads: int | None = None, device: str | None = None,
                 settings: dict | None = None):
        super().__init__(model_path, threads, device or "cuda", settings)
        trt = import_tensorrt()
        self._cudart = cuda.cudart()
        check_engine_compatibility(recorded_engine_info(self.model_path), trt.__version__, cuda.device_name())
        self._trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(self.model_path.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {self.model_path.name}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = cuda.check(self._cudart.cudaStreamCreate())

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.context.set_input_shape(INPUT_NAME, images.shape)
        hosts = {INPUT_NAME: images}
        for name in self.output_names:
            dtype = self._trt.nptype(self.engine.get_tensor_dtype(name))
            hosts[name] = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype)
        buffers = {name: cuda.check(self._cudart.cudaMalloc(max(host.nbytes, 1))) for name, host in hosts.items()}
        try:
            to_device = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            to_host = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            cuda.check(self._cudart.cudaMemcpy(buffers[INPUT_NAME], images.ctypes.data, images.nbytes, to_device))
            for name, pointer in buffers.items():
                self.context.set_tensor_address(name, int(pointer))
            if not self.context.execute_async_v3(self.stream):
                raise BackendError("TensorRT execution failed")
            cuda.check(self._cudart.cudaStreamSynchronize(self.stream))
            for name in self.output_names:
                cuda.check(self._cudart.cudaMemcpy(hosts[name].ctypes.data, buffers[name], hosts[name].nbytes, to_host))
        finally:
            for pointer in buffers.values():
                self._cudart.cudaFree(pointer)
        return {name: hosts[name].astype(np.float32, copy=False) for name in self.output_names}
