"""The jetson target: TensorRT-ready ONNX (fp16 / explicit int8), compatibility table, build script.

No GPU here: everything up to the engine build is real (exporter, onnxruntime quantizer and runner,
bash); the engine build and the TensorRT runner run only where `tensorrt` imports.
"""

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeretina.bundle import load_bundle
from edgeretina.errors import BackendError, ExportError, MissingDependencyError
from edgeretina.export import ExportConfig, export
from edgeretina.export.jetson import qdq_problems
from edgeretina.export.trt_ops import find_offenders
from edgeretina.runtime.backends import create_runner
from edgeretina.runtime.backends.tensorrt import check_engine_compatibility

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _export(checkpoint, out, phantom_test, **options):
    return export(ExportConfig(checkpoint=checkpoint, out=out, target="jetson", reference_images=phantom_test,
                               reference_count=8, **options), log=lambda _: None)


@pytest.fixture(scope="module")
def fp16_bundle(tiny_checkpoint, phantom_test, tmp_path_factory):
    return _export(tiny_checkpoint.checkpoint, tmp_path_factory.mktemp("jetson") / "fp16", phantom_test)


@pytest.fixture(scope="module")
def int8_bundle(tiny_checkpoint, phantom_train, phantom_test, tmp_path_factory):
    return _export(tiny_checkpoint.checkpoint, tmp_path_factory.mktemp("jetson") / "int8", phantom_test,
                   precision="int8", calibration_images=phantom_train, calibration_count=32)


def _opset(graph) -> int:
    return max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))


def test_fp16_bundle_contents_and_manifest(fp16_bundle):
    m = load_bundle(fp16_bundle).manifest
    by_file = {a.file: a for a in m.artifacts}
    assert set(by_file) == {"model.onnx", "build_engine.sh", "reference_inputs.npy", "reference_outputs.npz",
                            "bank.npz", "reference.npz"}
    assert (by_file["model.onnx"].role, by_file["model.onnx"].precision, by_file["model.onnx"].target) == \
        ("model", "fp32", "jetson")
    assert by_file["build_engine.sh"].role == "build-script"
    trt = m.export["tensorrt"]
    assert trt["trt_version"] == "10" and trt["precision"] == "fp16" and trt["sparsity"] is False
    assert trt["shapes"] == {"min": [1, 3, 64, 64], "opt": [1, 3, 64, 64], "max": [8, 3, 64, 64]}
    assert m.export["gate"]["jetson-fp16"]["passed"] is True
    # the reference data the device checks its engine against is what torch produced
    outputs = np.load(fp16_bundle / "reference_outputs.npz")
    assert set(outputs.files) == set(m.outputs["names"])
    assert np.load(fp16_bundle / "reference_inputs.npy").shape == (8, 3, 64, 64)


def test_fp16_graph_is_trt_ready(fp16_bundle):
    graph = onnx.load(str(fp16_bundle / "model.onnx"))
    assert _opset(graph) <= 17
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "B"
    assert find_offenders(graph, "10") == []
    assert find_offenders(graph, "8.6") == []


def test_onnxruntime_runs_jetson_graphs_like_torch(fp16_bundle, int8_bundle):
    inputs = np.load(fp16_bundle / "reference_inputs.npy")
    torch_out = np.load(fp16_bundle / "reference_outputs.npz")
    fp32 = create_runner("onnxruntime", fp16_bundle / "model.onnx").run(inputs)
    np.testing.assert_allclose(fp32["embedding"], torch_out["embedding"], atol=2e-4, rtol=1e-3)
    int8 = create_runner("onnxruntime", int8_bundle / "model.onnx").run(inputs)
    a, b = int8["embedding"], torch_out["embedding"]
    cosine = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() >= 0.98
    assert not np.allclose(a, b, atol=1e-5)   # it really is quantized, not a copy of the FP32 graph


def test_int8_graph_is_explicit_symmetric_per_channel(int8_bundle):
    m = load_bundle(int8_bundle).manifest
    assert m.artifact("model").precision == "int8"
    assert m.export["tensorrt"]["precision"] == "int8"
    assert m.export["calibration"]["count"] == 32
    assert m.export["quantization"]["calibration_method"] == "Percentile 99.999"
    graph = onnx.load(str(int8_bundle / "model.onnx"))
    assert _opset(graph) <= 17
    inits = {t.name: t for t in graph.graph.initializer}
    qdq = [n for n in graph.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    zero_points = [numpy_helper.to_array(inits[n.input[2]]) for n in qdq if len(n.input) > 2]
    assert zero_points and all(not z.any() for z in zero_points)
    weight_dq = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].data_type == TensorProto.INT8]
    assert weight_dq
    for node in weight_dq:   # per-channel: one scale per slice along the quantization axis
        axis = next(a.i for a in node.attribute if a.name == "axis")
        assert list(inits[node.input[1]].dims) == [inits[node.input[0]].dims[axis]], node.name
    assert sum(np.prod(inits[n.input[1]].dims) > 1 for n in weight_dq) >= len(weight_dq) - 1   # all but the 1-output head
    assert qdq_problems(graph) == []
    assert not any(n.op_type == "Softmax" and "QuantizeLinear" in {p.op_type for p in graph.graph.node
                                                                   if set(p.output) & set(n.input)}
                   for n in graph.graph.node)
    assert find_offenders(graph, "10") == []


def test_qdq_check_lists_nonzero_zero_points_and_per_tensor_weights():
    weight = numpy_helper.from_array(np.ones((4, 3), np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["w_f"], name="dq_w"),
         helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="q_x"),
         helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_f"], name="dq_x"),
         helper.make_node("MatMul", ["x_f", "w_f"], ["y"], name="mm")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [weight, numpy_helper.from_array(np.float32(0.1), "w_scale"),
         numpy_helper.from_array(np.int8(0), "w_zero"), numpy_helper.from_array(np.float32(0.1), "x_scale"),
         numpy_helper.from_array(np.int8(3), "x_zero")])
    problems = qdq_problems(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert any(p.startswith("dq_w") and "per-tensor" in p for p in problems)
    assert any(p.startswith("q_x") and "zero point" in p for p in problems)
    assert any(p.startswith("dq_x") and "zero point" in p for p in problems)


def _layernorm_graph(opset: int = 17):
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])
    scale = numpy_helper.from_array(np.ones(8, np.float32), "ln_scale")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "ln_bias")
    nodes = [helper.make_node("LayerNormalization", ["image", "ln_scale", "ln_bias"], ["ln"], name="block0/ln1",
                              axis=-1),
             helper.make_node("Relu", ["ln"], ["y"], name="relu")]
    model = helper.make_model(helper.make_graph(nodes, "ln", [x], [y], [scale, bias]),
                              opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def test_layernorm_fails_the_trt_85_check_naming_the_node():
    model = _layernorm_graph()
    offenders = find_offenders(model, "8.5")
    assert [(o.node, o.op) for o in offenders] == [("block0/ln1", "LayerNormalization")]
    assert "8.5" in offenders[0].reason
    assert find_offenders(model, "8.6") == [] and find_offenders(model, "10") == []
    # above the parser's opset the graph is refused as a whole, too
    assert any(o.op == "opset" for o in find_offenders(_layernorm_graph(18), "8.6"))


def test_compatibility_step_raises_one_error_listing_the_node(tmp_path):
    from types import SimpleNamespace
    from edgeretina.export.jetson import check_trt_compatibility

    path = tmp_path / "ln.onnx"
    onnx.save(_layernorm_graph(), str(path))
    ctx = SimpleNamespace(onnx_path=path, log=lambda _: None,
                          config=ExportConfig(checkpoint=path, out=tmp_path / "x", target="jetson",
                                              trt_version="8.5"))
    with pytest.raises(ExportError, match=r"block0/ln1 \(LayerNormalization\)"):
        check_trt_compatibility(ctx)


def test_trt_85_exports_at_opset_16_without_layernorm(tiny_checkpoint, phantom_test, tmp_path):
    out = _export(tiny_checkpoint.checkpoint, tmp_path / "trt85", phantom_test, trt_version="8.5")
    graph = onnx.load(str(out / "model.onnx"))
    assert _opset(graph) == 16
    assert "LayerNormalization" not in {n.op_type for n in graph.graph.node}
    assert find_offenders(graph, "8.5") == []
    assert json.loads((out / "manifest.json").read_text())["export"]["tensorrt"]["opset"] == 16


def test_build_script_is_valid_bash_with_the_profile(fp16_bundle, int8_bundle):
    for bundle, flag in ((fp16_bundle, "--fp16"), (int8_bundle, "--int8")):
        script = bundle / "build_engine.sh"
        text = script.read_text()
        assert not re.search(r"@[A-Z_]+@", text)                    # every placeholder filled
        assert "set -euo pipefail" in text and "PRECISION=\"" + flag[2:] + "\"" in text
        assert "image:8x3x64x64" in text and "--timingCacheFile=timing.cache" in text
        subprocess.run(["bash", "-n", str(script)], check=True)
        if flag == "--fp16":   # softmax pinned to FP32 by ONNX node name
            assert re.search(r'FLOAT_LAYERS=".*Softmax[^"]*:fp32', text)
        if shutil.which("shellcheck"):
            subprocess.run(["shellcheck", str(script)], check=True)


def test_build_script_fails_cleanly_without_trtexec(fp16_bundle, tmp_path):
    copy = shutil.copytree(fp16_bundle, tmp_path / "bundle")
    result = subprocess.run(["bash", str(copy / "build_engine.sh")], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and "trtexec not found" in result.stderr
    assert not (copy / "model.plan").exists()


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_build_engine_without_tensorrt_names_the_jetson_extra(fp16_bundle):
    from edgeretina.runtime.backends.tensorrt_build import build_engine

    with pytest.raises(MissingDependencyError) as info:
        build_engine(fp16_bundle)
    assert info.value.extra == "jetson" and "edgeretina[jetson]" in str(info.value)


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_build_engine_command_without_tensorrt_is_one_line_and_exit_code_1(fp16_bundle, tmp_path):
    """`edgeretina build-engine` run as a user would: the missing stack is named, nothing is written."""
    copy = shutil.copytree(fp16_bundle, tmp_path / "bundle")
    exe = Path(sys.executable).with_name("edgeretina")
    result = subprocess.run([str(exe), "build-engine", str(copy), "--fp16"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "edgeretina[jetson]" in result.stderr
    assert not (copy / "model.plan").exists()
    assert (copy / "manifest.json").read_bytes() == (fp16_bundle / "manifest.json").read_bytes()


def test_engine_compatibility_refuses_other_versions_and_devices():
    recorded = {"tensorrt_version": "8.5.2.2", "device": "Orin"}
    check_engine_compatibility(recorded, "8.5.2.2", "Orin")   # same stack: fine
    with pytest.raises(BackendError, match="built with TensorRT 8.5.2.2, this machine has 10.3.0"):
        check_engine_compatibility(recorded, "10.3.0", "Orin")
    with pytest.raises(BackendError, match="built on 'Orin'"):
        check_engine_compatibility(recorded, "8.5.2.2", "Xavier")
    with pytest.raises(BackendError, match="does not record"):
        check_engine_compatibility({}, "8.5.2.2", "Orin")


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs tensorrt and an NVIDIA GPU")
def test_build_engine_on_gpu_matches_torch(fp16_bundle, tmp_path):
    from edgeretina.runtime.backends.tensorrt_build import build_engine

    copy = shutil.copytree(fp16_bundle, tmp_path / "bundle")
    plan = build_engine(copy, log=lambda _: None)
    m = load_bundle(copy).manifest
    assert m.artifact("model", fmt="tensorrt-plan").file == plan.name
    assert m.export["engine"]["tensorrt_version"]
    outputs = create_runner("tensorrt", plan).run(np.load(copy / "reference_inputs.npy"))
    np.testing.assert_allclose(outputs["embedding"], np.load(copy / "reference_outputs.npz")["embedding"],
                               atol=2e-2)
