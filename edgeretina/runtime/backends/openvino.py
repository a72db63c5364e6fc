"""OpenVINO runner: reads an IR (model.xml + model.bin) or an ONNX graph directly, CPU by default.

Inference precision: OpenVINO computes FP32 layers in bf16 by default on CPUs with bf16 units. That is
~2x faster for an FP32/FP16 IR, but an INT8 IR loses to it: on an AVX-512 BF16 CPU without AMX (AMD EPYC
Zen 4), ViT-B-16 INT8 took 170 ms at 1 thread with the bf16 default (28 un-fused FakeQuantize + bf16->f32
reorders, 47 ms) and 127 ms with f32. Export times both and records the faster in the manifest
(export.runtime.openvino); the runner applies it on a CPU of the same precision class (the same bf16/AMX
flags). On a CPU of another class the choice is re-measured here once and cached (runtime/device_cache.py),
since AMX changes which one wins; a CPU without bf16 units has only f32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeretina.cpu import has_native_bf16, precision_class
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
            self.compiled = core.compile_model(model, self.device, self._compile_config(core))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with its own messages
            raise BackendError(f"openvino could not load {self.model_path.name} on {self.device}: {exc}") from None
        self.output_names = [output.get_any_name() for output in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        results = self.request.infer({INPUT_NAME: images})
        # infer() reuses its output buffers between calls: copy before handing them out
        return {name: np.array(results[output]) for name, output in zip(self.output_names, self.compiled.outputs)}

    def _compile_config(self, core) -> dict[str, str]:
        config = {"PERFORMANCE_HINT": "LATENCY"}   # one camera, one image at a time: latency, not throughput
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = str(self.threads)
            # A thread share means other work on this machine. OpenVINO pins a stream's threads to cores
            # counted from core 0 in every process, so single-thread runners side by side (grade-archive's
            # Ray workers) all ran on core 0: ViT-B-16 INT8, 1 thread, 2 processes on 2 cores (x86-amx),
            # 324 ms an image each pinned, 163 ms unpinned (one process alone: 146 vs 159 ms).
            config["ENABLE_CPU_PINNING"] = "NO"
        self.precision_hint_source = None
        hint = self.measured_precision_hint()
        if hint:
            self.precision_hint_source = "measured at export on this CPU class"
        elif self._recorded_for_another_class() and self.settings.get("fallback"):
            # bf16 flipped grades at export: being faster here is no reason to grade with it
            hint, self.precision_hint_source = "f32", f"f32 on every CPU class: {self.settings['fallback']}"
        elif self._recorded_for_another_class():
            hint = self._remeasured_precision_hint(core)
            self.precision_hint_source = "re-measured on this CPU class (cached)"
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

    def _recorded_for_another_class(self) -> bool:
        measured_on = self.settings.get("cpu_precision_class")
        return (self.device.startswith("CPU") and bool(self.settings.get("inference_precision_hint"))
                and measured_on is not None and list(measured_on) != precision_class())

    def _remeasured_precision_hint(self, core) -> str:
        """The faster inference precision on this CPU: f32 without bf16 units (nothing to time), else f32 and
        bf16 timed once on this IR (1 thread, interleaved) and the answer cached for this CPU."""
        if not has_native_bf16():
            return "f32"
        from edgeretina.bundle import sha256_file
        from edgeretina.cpu import cpu_fingerprint
        from edgeretina.runtime import device_cache

        key = device_cache.cache_key(sha256_file(self.model_path), _version(), cpu_fingerprint())
        cached = device_cache.read_entry("openvino-precision", key)
        if cached and cached.get("inference_precision_hint") in ("f32", "bf16"):
            return cached["inference_precision_hint"]
        medians = time_precision_hints(core, self.model_path, ("f32", "bf16"))
        chosen = min(medians, key=medians.get)
        device_cache.write_entry("openvino-precision", key, {"inference_precision_hint": chosen,
                                                             "measured_ms_1_thread": medians})
        return chosen

    def describe(self) -> dict[str, object]:
        info = super().describe()
        info["inference_precision"] = self.inference_precision()
        info["measured_hint_applied"] = self.measured_precision_hint() is not None
        info["precision_hint_source"] = self.precision_hint_source
        return info

    def inference_precision(self) -> str | None:
        """What the plugin actually computes in: an FP32/FP16 IR runs in bf16 on CPUs with AMX/AVX-512 BF16."""
        try:
            hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        except Exception:  # not every plugin reports it
            return None
        return hint.to_string() if hasattr(hint, "to_string") else str(hint)


def time_precision_hints(core, model_path: Path, hints: tuple[str, ...] | list[str], runs: int = 12,
                         image: np.ndarray | None = None) -> dict[str, float]:
    """Median 1-thread latency of the model on `image` (default: zeros, batch 1) compiled under each
    inference precision hint; the runs alternate between the hints."""
    from edgeretina.timing import interleaved_median_ms

    model = core.read_model(str(model_path))
    if image is None:
        shape = [1 if dim.is_dynamic else dim.get_length() for dim in model.input(0).get_partial_shape()]
        image = np.zeros(shape, dtype=np.float32)
    requests = {hint: core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": "1",
                                                        "ENABLE_CPU_PINNING": "NO",   # as the runners: see there
                                                        "INFERENCE_PRECISION_HINT": hint}).create_infer_request()
                for hint in hints}
    medians = interleaved_median_ms({hint: (lambda r=request: r.infer({INPUT_NAME: image}))
                                     for hint, request in requests.items()}, runs)
    return {hint: round(ms, 2) for hint, ms in medians.items()}


def _version() -> str:
    import openvino

    return str(getattr(openvino, "__version__", None) or openvino.get_version())


def _check_device(device: str, available: list[str]) -> None:
    base = device.split(":")[0].split(".")[0]
    if base in _VIRTUAL_DEVICES or device in available or base in {d.split(".")[0] for d in available}:
        return
    raise BackendError(f"openvino: device {device!r} is not available here (available: {', '.join(available)}; "
                       f"or {', '.join(_VIRTUAL_DEVICES)})")
