"""The runtime's ONNX serializer against the onnx package: same model, runnable by ONNX Runtime."""

import numpy as np
import pytest

from edgeretina.runtime.onnx_wire import Node, ValueInfo, model_bytes

onnx = pytest.importorskip("onnx")


def _model():
    weights = np.arange(12, dtype=np.float32).reshape(4, 3) - 5.5
    nodes = [Node("MatMul", ("x", "w"), ("y",)),
             Node("TopK", ("y", "k"), ("values", "index"), {"axis": -1, "largest": 1, "sorted": 1}),
             Node("Cast", ("index",), ("index_int",), {"to": 6})]
    inputs = [ValueInfo("x", np.float32, ("batch", 4)), ValueInfo("k", np.int64, (1,))]
    outputs = [ValueInfo("values", np.float32, ("batch", "k")), ValueInfo("index_int", np.int32, ("batch", "k"))]
    return model_bytes(nodes, {"w": weights}, inputs, outputs, name="wire"), weights


def test_serialized_model_parses_and_passes_the_onnx_checker():
    data, weights = _model()
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["MatMul", "TopK", "Cast"]
    top_k = model.graph.node[1]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in top_k.attribute} == {"axis": -1, "largest": 1, "sorted": 1}
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(model.graph.initializer[0]), weights)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert (dims[0].dim_param, dims[1].dim_value) == ("batch", 4)
    assert model.opset_import[0].version == 17 and model.opset_import[0].domain == ""


def test_serialized_model_runs_in_onnxruntime_like_numpy():
    import onnxruntime as ort

    data, weights = _model()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    values, index = session.run(None, {"x": x, "k": np.array([2], np.int64)})
    expected = x @ weights
    np.testing.assert_array_equal(index, np.argsort(-expected, axis=1)[:, :2])
    np.testing.assert_allclose(values, np.sort(expected, axis=1)[:, ::-1][:, :2], rtol=1e-6)
    assert index.dtype == np.int32


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(TypeError, match="no ONNX element type for complex64"):
        model_bytes([], {"c": np.zeros(2, np.complex64)}, [], [])
