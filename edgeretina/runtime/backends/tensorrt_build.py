"""Building a TensorRT engine on the device, and checking a freshly built one against torch.

`build_engine` builds model.plan inside a jetson bundle with the TensorRT Python API (`edgeretina
build-engine`); `check_built_plan` checks a plan that build_engine.sh built with trtexec and records what
built it (`edgeretina check-engine`). Both compare the engine's outputs with the torch outputs the bundle
ships. Only runs where NVIDIA's stack exists; imports are guarded so this module loads anywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeretina.atomic import write_bytes_atomic, write_json_atomic
from edgeretina.bundle import describe_artifact, load_bundle, save_manifest
from edgeretina.errors import BackendError
from edgeretina.fidelity import cosine
from edgeretina.runtime.backends import cuda
from edgeretina.runtime.backends.base import INPUT_NAME
from edgeretina.runtime.backends.tensorrt import ENGINE_INFO, PLAN_FILE, TensorRtRunner, import_tensorrt

# Engine vs torch on the reference images: FP16 engines round activations, INT8 ones more.
OUTPUT_COSINE_FLOOR = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.98}


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
    flat = [x.reshape(len(x), -1).astype(np.float64) for x in (a, b)]
    return float(cosine(*flat).min())


def installed_engine_info(precision: str, sparsity: bool = False) -> dict:
    trt = import_tensorrt()
    return {"tensorrt_version": trt.__version__, "device": cuda.device_name(), "precision": precision,
            "sparsity": sparsity}


def check_built_plan(plan: Path, inputs: Path, outputs: Path, precision: str = "fp16", exported_for: str = "",
                     write_info: Path | None = None) -> dict:
    """Check a plan built outside edgeretina (build_engine.sh, trtexec) against the reference outputs.

    Writes what built it to `write_info` (engine.json) first: the runner refuses a plan without it, and
    checking needs the runner. Returns {"engine": info, "min_cosine": {output: value}}; raises
    MissingDependencyError without tensorrt, BackendError when the engine disagrees with torch."""
    info = installed_engine_info(precision) | {"exported_for": exported_for}
    if write_info is not None:
        write_json_atomic(write_info, info)
    return {"engine": info, "min_cosine": verify_plan(plan, inputs, outputs, precision)}


def build_engine(bundle_dir: Path, precision: str | None = None, sparsity: bool | None = None,
                 log=print) -> Path:
    """Build model.plan from a jetson bundle's model.onnx with the TensorRT Python API, check it against
    the bundle's reference outputs, and add it to the manifest (rewritten atomically).

    precision/sparsity default to what the export recorded. Returns the plan path. Raises
    MissingDependencyError without tensorrt, BackendError when parsing, building or the check fails.
    """
    trt = import_tensorrt("building TensorRT engines")
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
