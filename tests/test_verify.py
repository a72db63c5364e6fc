"""On-device verification: every bundle ships a reference set, `verify` re-runs the gate on this device,
graders verify once (cached) and refuse a bundle this device does not reproduce."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgeretina.bundle import MANIFEST_NAME, load_bundle
from edgeretina.cpu import cpu_class
from edgeretina.dataset import read_labels
from edgeretina.errors import BundleError, VerificationError
from edgeretina.export import ExportConfig, export
from edgeretina.export.reference_set import MAX_INPUT_BYTES, _clear_cut_images
from edgeretina.export.targets import gate_onnx_fp32
from edgeretina.fidelity import FP32_THRESHOLDS
from edgeretina.reference_set import load_reference_set
from edgeretina.runtime import device_cache
from edgeretina.runtime.backends.onnxruntime import OnnxRuntimeRunner
from edgeretina.runtime.grader import Grader
from edgeretina.runtime.verify import format_report, verified_here, verify_here, verify_on_device


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A cache of this test's own, so 'cached' means cached by this test."""
    monkeypatch.setenv("EDGERETINA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def corrupt_reference_bundle(tiny_checkpoint, phantom_test, tmp_path_factory):
    """A bundle whose shipped reference outputs are wrong (written after the gate, so the export passes):
    what a device sees when the reference set does not describe the model it ships with."""
    from edgeretina.export import targets

    def corrupt_reference_outputs(ctx):
        ctx.reference_outputs = {**ctx.reference_outputs,
                                 "embedding": np.roll(ctx.reference_outputs["embedding"], 1, axis=1),
                                 "ordinal_logits": ctx.reference_outputs["ordinal_logits"] + 5.0}

    steps = list(targets.TARGETS["onnx"])
    steps.insert(steps.index(gate_onnx_fp32) + 1, corrupt_reference_outputs)
    saved = targets.TARGETS["onnx"]
    targets.TARGETS["onnx"] = steps
    try:
        out = tmp_path_factory.mktemp("corrupt") / "bundle"
        return export(ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=out, reference_images=phantom_test,
                                   reference_count=8), log=lambda _: None)
    finally:
        targets.TARGETS["onnx"] = saved


def _photo(phantom_test) -> Path:
    return read_labels(phantom_test)[0].path


def _cli(*args):
    exe = Path(sys.executable).with_name("edgeretina")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("EDGERETINA_DEBUG", None)
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env)


def test_every_bundle_ships_a_small_reference_set(onnx_bundle):
    bundle = load_bundle(onnx_bundle)
    spec = bundle.manifest.export["verify"]
    reference = load_reference_set(onnx_bundle / spec["reference_set"])
    assert (onnx_bundle / "reference.npz").stat().st_size < 1_000_000
    assert bundle.manifest.artifact("reference-set").file == "reference.npz"    # hashed like every artifact
    assert 2 <= len(reference) == spec["images"] <= 8 and reference.inputs_u8.dtype == np.uint8
    assert reference.inputs_u8.shape[1:] == (64, 64, 3)
    assert set(reference.torch_outputs) == set(bundle.manifest.outputs["names"])
    assert set(reference.exported_outputs) == set(bundle.manifest.outputs["names"])
    assert spec["thresholds"]["embedding_cosine"] == FP32_THRESHOLDS.embedding_cosine   # the gate's own bar
    assert spec["exported_on"]["cpu_class"] == cpu_class()


def test_reference_images_are_the_ones_farthest_from_a_threshold():
    logits = np.array([[0.05, -3, -3, -3], [2.0, 1.5, -2.0, -3.0], [1.0, 0.52, -1.0, -3.0], [3.0, 3.0, 3.0, 2.9]])
    ctx = SimpleNamespace(reference_outputs={"ordinal_logits": logits},
                          checkpoint=SimpleNamespace(grading=SimpleNamespace(thresholds=[0.0, 0.5, 0.0, 0.0])))
    # margins: 0.05, 1.0, 0.02, 2.9 -> the two clearest are images 3 and 1, returned in input order
    assert _clear_cut_images(ctx, 2).tolist() == [1, 3]
    assert MAX_INPUT_BYTES < 1_000_000


def test_verify_passes_here_and_graders_reuse_the_cached_result(onnx_bundle, own_cache, phantom_test):
    report = verify_here(onnx_bundle)
    assert report.passed and not report.cached and {c["name"] for c in report.checks} >= {
        "grade_agreement", "embedding_cosine", "saliency_correlation", "knn_overlap"}
    assert report.cpu["class"] == cpu_class() and report.backend == "onnxruntime"
    assert report.drift_from_export["min_embedding_cosine"] > 0.9999       # same machine, same kernels
    assert "PASSED" in format_report(report) and "✗" not in format_report(report)
    grader = Grader(onnx_bundle, threads=1)
    assert grader.verification.cached and grader.verification.passed
    assert [e["backend"] for e in verified_here(grader.bundle)] == ["onnxruntime"]
    assert grader.grade([_photo(phantom_test)])[0].error is None


def test_info_lists_where_the_bundle_was_exported_and_verified(onnx_bundle, own_cache):
    from edgeretina.runtime.info import format_info, inspect_bundle

    assert inspect_bundle(onnx_bundle, trust=None).verified_here == []
    verify_here(onnx_bundle)
    info = inspect_bundle(onnx_bundle, trust=None)
    assert info.exported_on["cpu_class"] == cpu_class()
    assert [(v["backend"], v["cpu_class"], v["passed"]) for v in info.verified_here] == [("onnxruntime", cpu_class(), True)]
    assert "✓ verified here: onnxruntime" in format_info(info)


def test_the_first_grader_on_a_device_verifies_and_writes_the_cache(onnx_bundle, own_cache):
    grader = Grader(onnx_bundle, threads=1)
    assert grader.verification.passed and not grader.verification.cached
    assert len(device_cache.entries("verified")) == 1
    assert Grader(onnx_bundle, threads=1).verification.cached


def test_corrupt_reference_outputs_fail_verify_with_a_table(corrupt_reference_bundle, own_cache):
    report = verify_here(corrupt_reference_bundle)
    table = format_report(report)
    assert not report.passed
    failed = {c["name"] for c in report.failed_checks()}
    assert {"grade_agreement", "embedding_cosine"} <= failed
    assert "✗ embedding_cosine" in table and "FAILED" in table and cpu_class() in table


def test_a_grader_refuses_a_bundle_that_fails_here_and_says_how_to_override(corrupt_reference_bundle, own_cache,
                                                                           phantom_test, monkeypatch):
    from edgeretina.runtime import verify as verify_module

    runs = []
    real = verify_module.verify_on_device
    monkeypatch.setattr(verify_module, "verify_on_device", lambda *a, **k: runs.append(1) or real(*a, **k))
    with pytest.raises(VerificationError, match="embedding_cosine.*--no-verify"):
        Grader(corrupt_reference_bundle, threads=1)
    with pytest.raises(VerificationError):            # the cached failure refuses again, without re-running
        Grader(corrupt_reference_bundle, threads=1)
    assert len(runs) == 1
    record = Grader(corrupt_reference_bundle, threads=1, verify="off").grade([_photo(phantom_test)])[0]
    assert record.error is None and record.grade is not None


def test_cli_verify_and_grade_refuse_then_override(corrupt_reference_bundle, onnx_bundle, own_cache, phantom_test):
    good = _cli("verify", onnx_bundle, "--threads", "1")
    assert good.returncode == 0 and "PASSED" in good.stdout, good.stderr
    bad = _cli("verify", corrupt_reference_bundle, "--threads", "1")
    assert bad.returncode == 1 and "✗ embedding_cosine" in bad.stdout and "FAILED" in bad.stdout
    refused = _cli("grade", _photo(phantom_test), "--bundle", corrupt_reference_bundle, "--threads", "1")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 1 and len(lines) == 1 and "failed on-device verification" in lines[0]
    forced = _cli("grade", _photo(phantom_test), "--bundle", corrupt_reference_bundle, "--no-verify", "--json")
    assert forced.returncode == 0 and json.loads(forced.stdout)[0]["grade"] is not None


class CoarseInputRunner(OnnxRuntimeRunner):
    """The real ONNX Runtime runner with a lossy input option (inputs rounded to steps of 0.5, as a backend
    that feeds the model in too low a precision would): the kind of backend setting verify must catch."""

    def _infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return super()._infer(np.round(images * 2.0) / 2.0)


def test_a_backend_option_that_breaks_fidelity_fails_verify(onnx_bundle, own_cache):
    bundle = load_bundle(onnx_bundle)
    faithful = verify_on_device(bundle, OnnxRuntimeRunner(onnx_bundle / "model.onnx", threads=1), "onnxruntime")
    lossy = verify_on_device(bundle, CoarseInputRunner(onnx_bundle / "model.onnx", threads=1), "onnxruntime")
    assert faithful.passed
    assert not lossy.passed and "embedding_cosine" in {c["name"] for c in lossy.failed_checks()}


def test_a_bundle_without_a_reference_set_is_refused_unless_verification_is_off(onnx_bundle, own_cache, tmp_path,
                                                                               phantom_test):
    old = tmp_path / "old"
    shutil.copytree(onnx_bundle, old)
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    del manifest["export"]["verify"]                 # as exported before on-device verification existed
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no reference set"):
        Grader(old, threads=1)
    assert Grader(old, threads=1, verify="off").grade([_photo(phantom_test)])[0].error is None


def test_an_unwritable_cache_costs_a_re_run_not_a_failure(onnx_bundle, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("EDGERETINA_CACHE_DIR", str(blocker))
    assert Grader(onnx_bundle, threads=1).verification.passed
    assert not Grader(onnx_bundle, threads=1).verification.cached


def test_openvino_precision_recorded_on_another_cpu_class_is_re_measured_here(onnx_bundle, own_cache):
    from edgeretina.cpu import has_native_bf16
    from edgeretina.runtime.backends.openvino import OpenVinoRunner

    # a precision class no CPU reports (it names a flag precision_class() never returns)
    elsewhere = {"inference_precision_hint": "bf16", "cpu_precision_class": ["amx_bf16", "some_future_unit"]}
    runner = OpenVinoRunner(onnx_bundle / "model.onnx", threads=1, settings=elsewhere)
    assert runner.describe()["precision_hint_source"] == "re-measured on this CPU class (cached)"
    assert runner.measured_precision_hint() is None             # the recorded one is not applied blindly
    if not has_native_bf16():
        assert runner.inference_precision() in ("f32", "float32")     # nothing but f32 to choose from
    else:
        assert len(device_cache.entries("openvino-precision")) == 1
