"""TensorRT: run a serialized engine (model.plan), build one from a jetson bundle, check it.

An engine only runs on the TensorRT version and GPU model that built it, so every plan carries what built
it (engine.json beside it, and the manifest's export.engine) and the runner refuses a mismatch up front
instead of failing deep inside deserialisation. Device memory goes through cuda-python (`cuda.bindings`
or the older `cuda.cudart`), NVIDIA's torch-free CUDA binding; without it the runner says so.
Only runs where NVIDIA's stack exists; imports are guarded so this module loads anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edgeretina.atomic import write_bytes_atomic, write_json_atomic
from edgeretina.errors import BackendError, MissingDependencyError
from edgeretina.runtime.backends.base import INPUT_NAME, Runner

ENGINE_INFO = "engine.json"
PLAN_FILE = "model.plan"
# Engine vs torch on the reference images: FP16 engines round activations, INT8 ones more.
OUTPUT_COSINE_FLOOR = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.98}


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


def _cudart():
    try:
        from cuda.bindings import runtime as cudart          # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart                           # older cuda-python
        except ImportError:
            raise MissingDependencyError("cuda-python", "jetson", "moving tensors to the GPU") from None
    return cudart


def _check(result):
    """cuda-python returns (error, *values); raise on error, return the values."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise BackendError(f"CUDA call failed: {error}")
    return values[0] if len(values) == 1 else values


def device_name() -> str:
    cudart = _cudart()
    props = _check(cudart.cudaGetDeviceProperties(0))
    name = props.name
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00").strip()


class TensorRtRunner(Runner):
    name = "tensorrt"

    def __init__(self, model_path: Path, threads: int | None = None, device: str | None = None,
                 settings: dict | None = None):
        super().__init__(model_path, threads, device or "cuda", settings)
        trt = import_tensorrt()
        self._cudart = _cudart()
        check_engine_compatibility(recorded_engine_info(self.model_path), trt.__version__, device_name())
        self._trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(self.model_path.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {self.model_path.name}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = _check(self._cudart.cudaStreamCreate())

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.context.set_input_shape(INPUT_NAME, images.shape)
        hosts = {INPUT_NAME: images}
        for name in self.output_names:
            dtype = self._trt.nptype(self.engine.get_tensor_dtype(name))
            hosts[name] = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype)
        buffers = {name: _check(self._cudart.cudaMalloc(max(host.nbytes, 1))) for name, host in hosts.items()}
        try:
            to_device = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            to_host = self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _check(self._cudart.cudaMemcpy(buffers[INPUT_NAME], images.ctypes.data, images.nbytes, to_device))
            for name, pointer in buffers.items():
                self.context.set_tensor_address(name, int(pointer))
            if not self.context.execute_async_v3(self.stream):
                raise BackendError("TensorRT execution failed")
            _check(self._cudart.cudaStreamSynchronize(self.stream))
            for name in self.output_names:
                _check(self._cudart.cudaMemcpy(hosts[name].ctypes.data, buffers[name], hosts[name].nbytes, to_host))
        finally:
            for pointer in buffers.values():
                self._cudart.cudaFree(pointer)
        return {name: hosts[name].astype(np.float32, copy=False) for name in self.output_names}


# ---- checking a freshly built plan (build_engine.sh calls this through `python3 -m`) ---------------------

def verify_plan(plan: Path, inputs: Path, outputs: Path, precision: str) -> dict[str, float]:
    """Run the plan on the reference inputs; raise BackendError if an output's min cosine to torch is low."""
    runner = TensorRtRunner(plan)
    images = np.load(inputs, allow_pickle=False)
    expected = np.load(outputs, allow_pickle=False)
    got = runner.run(images)
    floor = OUTPUT_COSINE_FLOOR.get(precision, 0.98)
    cosines = {name: _min_cosine(expected[name], got[name]) for name in expected.files if name in got}
    low = {name: value for name, value in cosines.items() if value < floor}
    if low:
        raise BackendError(f"engine disagrees with torch on the reference images (min cosine, needs ≥ {floor}): "
                           + ", ".join(f"{k} {v:.4f}" for k, v in low.items()))
    return cosines


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(np.min(np.sum(a * b, axis=1) / norms))


def installed_engine_info(precision: str, sparsity: bool = False) -> dict:
    trt = import_tensorrt()
    return {"tensorrt_version": trt.__version__, "device": device_name(), "precision": precision,
            "sparsity": sparsity}


# ---- building a plan inside a jetson bundle (`edgeretina build-engine`) ---------------------------------

def build_engine(bundle_dir: Path, precision: str | None = None, sparsity: bool | None = None,
                 log=print) -> Path:
    """Build model.plan from a jetson bundle's model.onnx with the TensorRT Python API, check it against
    the bundle's reference outputs, and add it to the manifest (rewritten atomically).

    precision/sparsity default to what the export recorded. Returns the plan path. Raises
    MissingDependencyError without tensorrt, BackendError when parsing, building or the check fails.
    """
    trt = import_tensorrt("building TensorRT engines")
    from edgeretina.bundle import describe_artifact, load_bundle, save_manifest

    bundle = load_bundle(bundle_dir)
    recipe = bundle.manifest.export.get("tensorrt")
    if not recipe:
        raise BackendError(f"{bundle_dir} is not a jetson bundle (no export.tensorrt section)")
    precision = precision or recipe["precision"]
    sparsity = recipe.get("sparsity", False) if sparsity is None else sparsity
    plan_bytes = _build_serialized(trt, bundle.root, recipe, precision, sparsity, log)
    plan = bundle.root / PLAN_FILE
    write_bytes_atomic(plan, plan_bytes)
    info = installed_engine_info(precision, sparsity)
    write_json_atomic(bundle.root / ENGINE_INFO, info)
    refs = recipe["reference"]
    cosines = verify_plan(plan, bundle.root / refs["inputs"], bundle.root / refs["outputs"], precision)
    log("engine matches torch on the reference images: "
        + ", ".join(f"{k} {v:.4f}" for k, v in cosines.items()))
    manifest = bundle.manifest
    kept = [a for a in manifest.artifacts if a.file not in (PLAN_FILE, ENGINE_INFO)]
    manifest.artifacts = kept + [
        describe_artifact(bundle.root, PLAN_FILE, fmt="tensorrt-plan", role="model", precision=precision,
                          target="jetson"),
        describe_artifact(bundle.root, ENGINE_INFO, fmt="json", role="engine-info", precision="n/a",
                          target="jetson")]
    manifest.export["engine"] = {**info, "min_cosine": cosines}
    save_manifest(bundle.root, manifest)
    return plan


def _build_serialized(trt, root: Path, recipe: dict, precision: str, sparsity: bool, log) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; 8.x needs the flag.
    flags = 0 if int(trt.__version__.split(".")[0]) >= 10 else \
        1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(root / "model.onnx")):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BackendError("TensorRT could not parse model.onnx: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)   # explicit Q/DQ scales: no calibrator
    else:
        _keep_normalisation_in_fp32(trt, network, config)
    if sparsity:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    shapes = recipe["shapes"]
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    cache_path = root / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    log(f"building TensorRT {trt.__version__} engine ({precision}{', sparse' if sparsity else ''})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError("TensorRT failed to build the engine (see the TensorRT log above)")
    write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _keep_normalisation_in_fp32(trt, network, config) -> None:
    """LayerNorm and softmax in FP32 inside an FP16 engine: their reductions lose precision in half."""
    kinds = {getattr(trt.LayerType, k) for k in ("NORMALIZATION", "SOFTMAX", "REDUCE") if hasattr(trt.LayerType, k)}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type in kinds:
            layer.precision = trt.float32
    config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgeretina.runtime.backends.tensorrt")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="check a freshly built plan against the reference outputs")
    verify.add_argument("plan", type=Path)
    verify.add_argument("inputs", type=Path)
    verify.add_argument("outputs", type=Path)
    verify.add_argument("--precision", default="fp16")
    verify.add_argument("--exported-for", default="")
    verify.add_argument("--write-info", type=Path)
    args = parser.parse_args(argv)
    info = installed_engine_info(args.precision) | {"exported_for": args.exported_for}
    if args.write_info:
        # Written first: the runner refuses a plan without it, and verifying needs the runner.
        write_json_atomic(args.write_info, info)
    try:
        cosines = verify_plan(args.plan, args.inputs, args.outputs, args.precision)
    except BackendError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"engine": info, "min_cosine": cosines}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
