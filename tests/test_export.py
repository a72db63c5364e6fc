import json

import numpy as np
import onnx
import pytest

from edgeretina.bundle import load_bundle
from edgeretina.errors import ExportError, GateError
from edgeretina.export import ExportConfig, export
from edgeretina.export.onnx_steps import export_onnx_fp32
from edgeretina.runtime.backends import create_runner
from edgeretina.training.checkpoint import load_checkpoint
from edgeretina.training.loop import predict
from edgeretina.dataset import read_labels
from edgeretina.preprocess import decode_image, normalize, prepare


def test_bundle_layout_and_manifest(onnx_bundle):
    bundle = load_bundle(onnx_bundle)
    m = bundle.manifest
    assert {a.file for a in m.artifacts} == {"model.onnx", "bank.npz", "reference.npz"}
    assert m.export["steps"][-1] == "write_reference_set" and m.export["verify"]["reference_set"] == "reference.npz"
    assert m.outputs["names"] == ["ordinal_logits", "prototype_logits", "embedding", "saliency"]
    assert m.outputs["shapes"]["saliency"][1:] == m.saliency["grid"]
    assert m.model["preprocess"]["image_size"] == 64
    assert m.bank["count"] > 0 and m.bank["dim"] == m.model["embed_dim"]
    assert m.export["gate"]["onnx-fp32"]["passed"] is True
    assert m.export["steps"][0] == "load_reference"
    assert m.saliency["tokens"].startswith("vit: patch tokens")


def test_onnx_graph_contract(onnx_bundle):
    graph = onnx.load(str(onnx_bundle / "model.onnx"))
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["image"]
    batch = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "B"                              # dynamic batch
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) <= 17


def test_onnxruntime_matches_torch_on_held_out_images(onnx_bundle, tiny_checkpoint, phantom_test):
    ckpt = load_checkpoint(tiny_checkpoint.checkpoint)
    prepared = np.stack([prepare(decode_image(i.path), ckpt.preprocess)[0] for i in read_labels(phantom_test)])
    torch_out = predict(ckpt.model, prepared, ckpt.preprocess)
    ort_out = create_runner("onnxruntime", onnx_bundle / "model.onnx").run(normalize(prepared, ckpt.preprocess))
    for name in ("ordinal_logits", "prototype_logits", "embedding", "saliency"):
        np.testing.assert_allclose(ort_out[name], torch_out[name], atol=2e-4, rtol=1e-3, err_msg=name)
    # batch 1 works too (dynamic axis)
    single = create_runner("onnxruntime", onnx_bundle / "model.onnx").run(normalize(prepared[:1], ckpt.preprocess))
    np.testing.assert_allclose(single["embedding"], torch_out["embedding"][:1], atol=2e-4)


def test_existing_output_is_not_overwritten(onnx_bundle, tiny_checkpoint):
    with pytest.raises(ExportError, match="already exists"):
        export(ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=onnx_bundle), log=lambda _: None)


def test_int8_bank_and_k_through_the_cli(tiny_checkpoint, phantom_test, tmp_path):
    import subprocess
    import sys

    from edgeretina.runtime.grader import Grader

    out = tmp_path / "int8-bank"
    done = subprocess.run([sys.executable, "-c", "from edgeretina.cli import main; main()", "export",
                           str(tiny_checkpoint.checkpoint), "--out", str(out), "--reference", str(phantom_test),
                           "--reference-count", "8", "--bank-dtype", "int8", "--knn-k", "7"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    bank = load_bundle(out).manifest.bank
    assert (bank["dtype"], bank["k"]) == ("int8", 7)
    assert bank["storage_fidelity"]["topk_overlap"] >= 0.9              # rounding barely moves the neighbours
    assert bank["storage_fidelity"]["max_similarity_error"] < 5e-3
    with np.load(out / "bank.npz") as data:
        assert data["embeddings"].dtype == np.int8 and data["case_ids"].dtype.kind == "S"
    record = Grader(out, threads=1).grade([read_labels(phantom_test)[0].path])[0]
    assert len(record.neighbors) == 7 and record.neighbors[0]["case_id"]


def test_bank_options_are_validated(tiny_checkpoint, tmp_path):
    from edgeretina.errors import ConfigError

    with pytest.raises(ConfigError, match="bank_dtype"):
        ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=tmp_path / "x", bank_dtype="int4")
    with pytest.raises(ConfigError, match="knn_k"):
        ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=tmp_path / "x", knn_k=0)


def _corrupt_largest_weight(ctx):
    graph = onnx.load(str(ctx.onnx_path))
    largest = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(largest).copy()
    values *= -3.0
    largest.CopyFrom(onnx.numpy_helper.from_array(values, largest.name))
    onnx.save(graph, str(ctx.onnx_path))


def test_gate_refuses_a_corrupted_graph(tiny_checkpoint, phantom_test, tmp_path, insert_step):
    insert_step("onnx", export_onnx_fp32, _corrupt_largest_weight)
    out = tmp_path / "corrupt"
    with pytest.raises(GateError) as info:
        export(ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=out, reference_images=phantom_test,
                            reference_count=8), log=lambda _: None)
    assert any("embedding_cosine" in f for f in info.value.failures)
    assert not out.exists()                                    # nothing half-made is left behind
    assert not list(tmp_path.glob(".export-*"))
    # with --gate warn the same export lands and records the failure
    export(ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=out, reference_images=phantom_test,
                        reference_count=8, gate="warn"), log=lambda _: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["export"]["gate"]["onnx-fp32"]["passed"] is False
