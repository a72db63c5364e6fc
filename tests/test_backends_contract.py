"""One contract every inference backend keeps (STYLE.md 11), subclassed per backend.

A backend subclass names itself and the artifact format it runs; the contract checks outputs against the
bundle manifest, dynamic batch, dtypes, determinism, input validation, and that `Grader(bundle,
backend=...)` grades the phantom test set like onnxruntime, the reference runner.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _backend_agreement import assert_same_grades_where_clear_cut, clear_cut

from edgeretina.bundle import load_bundle
from edgeretina.dataset import read_labels
from edgeretina.errors import BackendError, EdgeRetinaError, MissingDependencyError
from edgeretina.runtime import Grader
from edgeretina.runtime.backends import create_runner, formats_for


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _gpu_present() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


def _input_size(bundle) -> int:
    return int(bundle.manifest.model["input_size"])


def _images(bundle, batch: int, seed: int = 0) -> np.ndarray:
    size = _input_size(bundle)
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="session")
def reference_records(onnx_bundle, phantom_test):
    paths = [item.path for item in read_labels(phantom_test)]
    return Grader(onnx_bundle, backend="onnxruntime", threads=1).grade(paths)


class BackendContract:
    """What every runner must do. Subclasses set `backend`, and override `bundle` when the backend
    needs an artifact the plain onnx bundle lacks (TensorRT plan)."""

    backend: str

    @pytest.fixture(scope="class")
    @classmethod
    def bundle(cls, onnx_bundle):
        return load_bundle(onnx_bundle)

    @pytest.fixture(scope="class")
    @classmethod
    def runner(cls, bundle):
        formats = set(formats_for(cls.backend))
        artifact = next(a for a in bundle.manifest.artifacts_with_role("model") if a.format in formats)
        return create_runner(cls.backend, bundle.path(artifact), threads=1)

    @pytest.mark.parametrize("batch", [1, 3])
    def test_outputs_match_manifest_names_and_shapes(self, runner, bundle, batch):
        outputs = runner.run(_images(bundle, batch))
        declared = bundle.manifest.outputs
        assert set(declared["names"]) <= set(outputs)
        for name in declared["names"]:
            expected = [batch if isinstance(dim, str) else dim
                        for dim in declared["shapes"][name]]
            assert list(outputs[name].shape) == expected, name

    def test_outputs_are_float32(self, runner, bundle):
        outputs = runner.run(_images(bundle, 2))
        assert all(value.dtype == np.float32 for value in outputs.values())

    def test_deterministic_and_batch_independent(self, runner, bundle):
        images = _images(bundle, 3, seed=5)
        first, second = runner.run(images), runner.run(images)
        single = runner.run(images[1:2])
        for name, value in first.items():
            np.testing.assert_array_equal(value, second[name])
            # batching may change kernels (and bf16 on OpenVINO), not the answer
            np.testing.assert_allclose(single[name][0], value[1], rtol=2e-2, atol=2e-2)

    @pytest.mark.parametrize("bad", ["float64", "uint8", "no_batch_axis", "one_channel"])
    def test_rejects_wrong_dtype_and_shape(self, runner, bundle, bad):
        size = _input_size(bundle)
        images = {"float64": np.zeros((1, 3, size, size), np.float64),
                  "uint8": np.zeros((1, 3, size, size), np.uint8),
                  "no_batch_axis": np.zeros((3, size, size), np.float32),
                  "one_channel": np.zeros((1, 1, size, size), np.float32)}[bad]
        with pytest.raises(BackendError, match="expected float32"):
            runner.run(images)

    def test_grades_like_torch_on_the_shipped_reference_set(self, runner, bundle):
        """The oracle is torch, not another backend: the export picks clear-cut reference images (away
        from every CORAL threshold), so the grades must match exactly on every CPU class."""
        from edgeretina.grades import ordinal_grades
        from edgeretina.preprocess import normalize
        from edgeretina.reference_set import REFERENCE_SET_FILE, load_reference_set

        reference = load_reference_set(bundle.root / REFERENCE_SET_FILE)
        outputs = runner.run(normalize(reference.inputs_u8, bundle.manifest.preprocess_config))
        thresholds = bundle.manifest.grading_config.thresholds
        assert len(reference) >= 2
        np.testing.assert_array_equal(ordinal_grades(outputs["ordinal_logits"], thresholds),
                                      ordinal_grades(reference.torch_outputs["ordinal_logits"], thresholds))

    def test_grades_like_onnxruntime(self, bundle, phantom_test, reference_records, onnx_bundle):
        if self.backend == "onnxruntime":
            pytest.skip("onnxruntime is the reference here; test_grades_like_torch_on_the_shipped_reference_set covers it")
        paths = [item.path for item in read_labels(phantom_test)]
        records = Grader(bundle, backend=self.backend, threads=1).grade(paths)
        assert [r.error for r in records] == [None] * len(paths)
        assert_same_grades_where_clear_cut(records, reference_records, clear_cut(onnx_bundle, paths))
        for got, want in zip(records, reference_records):
            if want.referable_probability is not None:
                assert got.referable_probability == pytest.approx(want.referable_probability, abs=0.03)


class TestOnnxRuntime(BackendContract):
    backend = "onnxruntime"


@pytest.mark.skipif(not _installed("openvino"), reason="openvino is not installed")
class TestOpenVino(BackendContract):
    backend = "openvino"


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not (_installed("tensorrt") and _gpu_present()), reason="needs tensorrt and an NVIDIA GPU")
class TestTensorRt(BackendContract):
    backend = "tensorrt"

    @pytest.fixture(scope="class")
    @classmethod
    def bundle(cls, tiny_checkpoint, phantom_test, tmp_path_factory):
        from edgeretina.export import ExportConfig, export
        from edgeretina.runtime.backends.tensorrt_build import build_engine

        out = tmp_path_factory.mktemp("bundles") / "tiny-jetson"
        root = export(ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=out, target="jetson",
                                   reference_images=phantom_test, reference_count=8), log=lambda _: None)
        build_engine(root, precision="fp16", log=lambda _: None)
        return load_bundle(root)


# ---- choosing a backend -----------------------------------------------------------------------------------

def test_unknown_backend_is_a_clear_error(onnx_bundle):
    with pytest.raises(BackendError, match=r"unknown backend 'coreml' \(choose onnxruntime, tensorrt, openvino\)"):
        Grader(onnx_bundle, backend="coreml")


def test_backend_that_cannot_run_the_bundle_says_what_it_runs(onnx_bundle):
    with pytest.raises(BackendError, match="backend tensorrt cannot run this bundle .*tensorrt-plan"):
        Grader(onnx_bundle, backend="tensorrt")


def test_unknown_device_is_a_backend_error(onnx_bundle):
    with pytest.raises(BackendError, match="unknown device 'tpu'"):
        Grader(onnx_bundle, backend="onnxruntime", device="tpu")


def test_unavailable_device_is_a_backend_error(onnx_bundle):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA provider installed here")
    with pytest.raises(BackendError, match="CUDAExecutionProvider is not available"):
        Grader(onnx_bundle, backend="onnxruntime", device="cuda")


def test_unreadable_model_is_a_backend_error(tmp_path):
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not a protobuf")
    with pytest.raises(BackendError, match="onnxruntime could not load model.onnx"):
        create_runner("onnxruntime", broken)


@pytest.mark.skipif(_installed("tensorrt"), reason="tensorrt is installed here")
def test_missing_backend_package_names_the_extra(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0")
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgeretina\[jetson\]'"):
        create_runner("tensorrt", plan)


def test_missing_backend_package_through_the_grader(onnx_bundle, tmp_path):
    """A bundle whose only model is a plan, on a machine without tensorrt: the install hint, not a crash."""
    if _installed("tensorrt"):
        pytest.skip("tensorrt is installed here")
    from edgeretina.bundle import describe_artifact, save_manifest

    root = tmp_path / "plan-only"
    shutil.copytree(onnx_bundle, root)
    (root / "model.plan").write_bytes(b"\0" * 16)
    manifest = load_bundle(root).manifest
    manifest.artifacts = [a for a in manifest.artifacts if a.role != "model"] + [
        describe_artifact(root, "model.plan", fmt="tensorrt-plan", role="model", precision="fp16", target="jetson")]
    save_manifest(root, manifest)
    with pytest.raises(MissingDependencyError, match="edgeretina\\[jetson\\]"):
        Grader(root, backend="tensorrt")
    with pytest.raises(EdgeRetinaError):          # auto-pick finds nothing that runs a plan here
        Grader(root)
    assert json.loads((root / "manifest.json").read_text())["artifacts"]


def test_cli_backend_device_threads_options(onnx_bundle, phantom_test):
    import os
    import subprocess
    import sys

    image = read_labels(phantom_test)[0].path
    exe = Path(sys.executable).with_name("edgeretina")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def cli(*args):
        return subprocess.run([str(exe), "grade", str(image), "--bundle", str(onnx_bundle), *args],
                              capture_output=True, text=True, env=env)

    ok = cli("--backend", "onnxruntime", "--device", "cpu", "--threads", "1", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)[0]["error"] is None
    bad = cli("--device", "tpu")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0 and "unknown device 'tpu'" in bad.stderr, bad.stderr
    # --backend has a fixed set of values: a typo is a usage error (exit 2) that lists the choices
    typo = cli("--backend", "coreml")
    assert typo.returncode == 2 and typo.stdout == "" and "Traceback" not in typo.stderr
    assert "'coreml' is not one of 'onnxruntime'" in typo.stderr, typo.stderr


# ---- which backend, which artifact (runtime/backends/selection.py) -----------------------------------------

def _manifest(*formats: str):
    from edgeretina.bundle import Artifact, Manifest

    files = {"onnx": "model.onnx", "tensorrt-plan": "model.plan", "openvino-ir": "model.xml"}
    artifacts = [Artifact(file=files[f], format=f, role="model", precision="fp16", target="t", sha256="0", bytes=1)
                 for f in formats]
    return Manifest(model={}, outputs={}, grading={}, saliency={}, artifacts=artifacts, export={})


def test_a_jetson_bundle_with_a_plan_grades_on_tensorrt_where_tensorrt_is_installed():
    from edgeretina.runtime.backends import pick_backend, rank_backends

    jetson = _manifest("onnx", "tensorrt-plan")            # after build-engine: the ONNX graph and the plan
    assert pick_backend(jetson, installed={"onnxruntime", "openvino", "tensorrt"}) == "tensorrt"
    assert pick_backend(jetson, installed={"onnxruntime"}) == "onnxruntime"
    assert rank_backends({"onnx", "tensorrt-plan"}, {"onnxruntime", "tensorrt"}) == ["tensorrt", "onnxruntime", "openvino"]


def test_the_pick_keeps_onnxruntime_for_onnx_and_openvino_for_ir():
    from edgeretina.runtime.backends import pick_backend

    everything = {"onnxruntime", "openvino", "tensorrt"}
    assert pick_backend(_manifest("onnx"), installed=everything) == "onnxruntime"
    assert pick_backend(_manifest("onnx", "openvino-ir"), installed=everything) == "openvino"
    assert pick_backend(_manifest("onnx"), installed={"openvino"}) == "openvino"


def test_a_format_nothing_installed_runs_picks_the_backend_that_names_its_extra():
    from edgeretina.runtime.backends import pick_backend

    assert pick_backend(_manifest("tensorrt-plan"), installed={"onnxruntime"}) == "tensorrt"
    with pytest.raises(BackendError, match="no backend runs this bundle's model formats"):
        pick_backend(_manifest())


def test_installed_backends_are_what_imports_here_not_the_registry():
    from edgeretina.runtime.backends import installed_backends, registered_backends

    assert registered_backends() == ["onnxruntime", "tensorrt", "openvino"]
    installed = installed_backends()
    assert "onnxruntime" in installed
    assert ("tensorrt" in installed) == _installed("tensorrt")
    assert ("openvino" in installed) == _installed("openvino")


def test_model_artifact_takes_the_format_the_backend_prefers():
    from edgeretina.runtime.backends import model_artifact

    both = _manifest("onnx", "openvino-ir")                 # the manifest lists the ONNX graph first
    assert model_artifact(both, "openvino").format == "openvino-ir"
    assert model_artifact(both, "onnxruntime").format == "onnx"
    with pytest.raises(BackendError, match=r"backend tensorrt cannot run this bundle \(it runs tensorrt-plan; "
                                           r"the bundle has onnx, openvino-ir\)"):
        model_artifact(both, "tensorrt")


# ---- the TensorRT engine: built and checked through the one CLI ---------------------------------------------

def test_tensorrt_build_and_runner_modules_load_without_tensorrt():
    import subprocess
    import sys

    code = ("import sys, edgeretina.runtime.backends.tensorrt, edgeretina.runtime.backends.tensorrt_build; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.skipif(_installed("tensorrt"), reason="tensorrt is installed here")
def test_build_script_check_command_names_the_jetson_extra(tmp_path):
    """build_engine.sh checks its plan with `edgeretina check-engine`: without tensorrt, one line naming the extra."""
    import subprocess
    import sys

    script = (Path(__file__).resolve().parents[1] / "edgeretina" / "export" / "templates" / "build_engine.sh").read_text()
    assert "from edgeretina.cli import main; main()' check-engine model.plan" in script
    done = subprocess.run([sys.executable, "-c", "from edgeretina.cli import main; main()", "check-engine",
                           str(tmp_path / "model.plan"), str(tmp_path / "in.npy"), str(tmp_path / "out.npz"),
                           "--write-info", str(tmp_path / "engine.json")], capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert "pip install 'edgeretina[jetson]'" in done.stderr and done.stderr.strip().count("\n") == 0
    assert not (tmp_path / "engine.json").exists()
