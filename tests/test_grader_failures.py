"""Grader, when something is missing or breaks: the model fails at inference, the bundle ships no KNN bank,
no installed backend runs the bundle's model. Real bundles (copies of the session's tiny export, edited as
a re-export would leave them), real onnxruntime."""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from edgeretina.dataset import read_labels
from edgeretina.errors import BackendError, MissingDependencyError
from edgeretina.runtime import Grader
from edgeretina.runtime.backends import pick_backend


@pytest.fixture(scope="module")
def grader(onnx_bundle):
    return Grader(onnx_bundle, threads=1)


@pytest.fixture(scope="module")
def photos(phantom_test):
    return [Path(item.path) for item in read_labels(phantom_test)]


def _edit_bundle(source: Path, target: Path, edit_manifest) -> Path:
    """Copy a bundle, let `edit_manifest(manifest, root)` change files and manifest, and re-describe every
    artifact whose file changed (size and sha256), as export would have written them."""
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    edit_manifest(manifest, target)
    for artifact in manifest["artifacts"]:
        data = (target / artifact["file"]).read_bytes()
        artifact.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


# --- inference fails ----------------------------------------------------------------------------------------------

def _fix_batch_to_one(manifest: dict, root: Path) -> None:
    """The same graph, its input's batch dimension fixed to 1 (an export without the dynamic axis): it
    loads and grades one image per run, and onnxruntime refuses a run of two at inference time."""
    model = onnx.load(str(root / "model.onnx"))
    [image] = [i for i in model.graph.input if i.name == "image"]
    batch = image.type.tensor_type.shape.dim[0]
    batch.ClearField("dim_param")
    batch.dim_value = 1
    onnx.save(model, str(root / "model.onnx"))


def _dark_photo(path: Path) -> Path:
    """Decodes, but the quality gate finds no fundus in it: ungradable, never sent to the model."""
    cv2.imwrite(str(path), np.full((192, 192, 3), 3, np.uint8))
    return path


def test_an_inference_failure_is_an_error_record_for_that_batch_and_the_next_batch_is_graded(
        onnx_bundle, grader, photos, tmp_path):
    root = _edit_bundle(onnx_bundle, tmp_path / "batch-one", _fix_batch_to_one)
    # unsigned copy (trust None); verification runs the reference set as a batch, which this graph refuses
    fixed = Grader(root, threads=1, trust=None, verify="off")
    notes = tmp_path / "notes.jpg"
    notes.write_text("not a photograph")
    dark = _dark_photo(tmp_path / "dark.jpg")
    assert grader.grade([dark])[0].screening == "ungradable"
    paths = [photos[0], notes, dark, photos[1], photos[2]]
    records = fixed.grade(paths, batch_size=4)                # [p0, notes, dark, p1] -> 2 to the model; [p2]
    assert [Path(r.file) for r in records] == paths
    failed = [records[0], records[3]]
    for record in failed:
        assert record.error.startswith("inference failed: onnxruntime failed to run model.onnx: "), record.error
        assert "image" in record.error                        # onnxruntime names the input it refused
        assert record.gradable is True and record.quality is not None   # the photo was fine, the model failed
        assert (record.grade, record.grade_name, record.probabilities, record.referable_probability,
                record.referable, record.screening, record.knn_grade) == (None,) * 7
        assert record.neighbors == [] and "inference" not in record.timings_ms
    assert records[1].error.startswith("not an image")        # its own error, not the model's
    assert records[2].error is None and records[2].screening == "ungradable"   # never reached the model
    expected = grader.grade([photos[2]])[0]                   # the next batch (one image) runs, and is right
    assert records[4].error is None and records[4].grade == expected.grade
    assert records[4].probabilities == pytest.approx(expected.probabilities, abs=1e-6)
    assert [n["case_id"] for n in records[4].neighbors] == [n["case_id"] for n in expected.neighbors]


def test_a_model_that_fails_on_every_batch_gives_every_image_an_error_record(onnx_bundle, photos, tmp_path):
    root = _edit_bundle(onnx_bundle, tmp_path / "batch-one", _fix_batch_to_one)
    fixed = Grader(root, threads=1, trust=None, verify="off")
    records = fixed.grade(photos[:6], batch_size=2)
    assert len(records) == 6
    assert all(r.error.startswith("inference failed: ") and r.grade is None for r in records)


# --- no KNN bank --------------------------------------------------------------------------------------------------

def _drop_bank(manifest: dict, root: Path) -> None:
    manifest["bank"] = None
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["role"] != "bank"]
    (root / "bank.npz").unlink()


def test_a_bundle_without_a_bank_grades_the_same_and_has_no_neighbours(onnx_bundle, grader, photos, tmp_path):
    root = _edit_bundle(onnx_bundle, tmp_path / "no-bank", _drop_bank)
    bankless = Grader(root, threads=1)                        # verified on this device, as any bundle is
    assert bankless.bank is None and bankless.k == 0
    checks = [c["name"] for c in bankless.verification.checks]
    assert bankless.verification.passed and "knn_overlap" not in checks and "embedding_cosine" in checks
    with_bank = grader.grade(photos)
    records = bankless.grade(photos)
    assert any(r.neighbors for r in with_bank)                # the comparison is not vacuous
    for record, reference in zip(records, with_bank):
        assert record.error is None and record.neighbors == [] and record.knn_grade is None
        assert (record.grade, record.screening, record.referable) == (reference.grade, reference.screening,
                                                                       reference.referable)
        assert record.probabilities == pytest.approx(reference.probabilities, abs=1e-6)
    files, grades, embeddings = bankless.grades_and_embeddings(photos)
    assert grades == [r.grade for r in with_bank] and embeddings.shape == (len(photos), 128)


# --- no installed backend -----------------------------------------------------------------------------------------

def _only_a_tensorrt_plan(manifest: dict, root: Path) -> None:
    """What the jetson target leaves after building its engine, without the portable ONNX beside it."""
    (root / "model.onnx").unlink()
    (root / "model.plan").write_bytes(b"serialized TensorRT engine, built on an Orin")
    (root / "engine.json").write_text(json.dumps({"tensorrt_version": "10.3.0", "device": "Orin"}))
    model = next(a for a in manifest["artifacts"] if a["role"] == "model")
    model.update(file="model.plan", format="tensorrt-plan", precision="fp16", target="jetson")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_a_bundle_only_tensorrt_runs_says_which_extra_to_install(onnx_bundle, photos, tmp_path):
    from edgeretina.bundle import load_bundle

    root = _edit_bundle(onnx_bundle, tmp_path / "plan-only", _only_a_tensorrt_plan)
    assert pick_backend(load_bundle(root).manifest) == "tensorrt"           # the only one that runs it
    expected = ("tensorrt is not installed (needed for running TensorRT engines): pip install 'edgeretina[jetson]'")
    with pytest.raises(MissingDependencyError) as refused:
        Grader(root, trust=None, verify="off")
    assert str(refused.value) == expected and refused.value.extra == "jetson"
    with pytest.raises(BackendError, match=r"^backend onnxruntime cannot run this bundle \(it runs onnx; "
                                           r"the bundle has tensorrt-plan\)$"):
        Grader(root, backend="onnxruntime", trust=None, verify="off")
    exe = Path(sys.executable).with_name("edgeretina")
    result = subprocess.run([str(exe), "grade", str(photos[0]), "--bundle", str(root)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {expected}"
