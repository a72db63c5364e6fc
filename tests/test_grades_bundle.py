import json
import zipfile

import numpy as np
import pytest

from edgeretina.bundle import (MANIFEST_NAME, Manifest, describe_artifact, load_bundle, save_manifest, zip_bundle)
from edgeretina.errors import BundleError
from edgeretina.grades import GRADES, LESION_CODES, GradingConfig, grade_texts, is_referable
from edgeretina.preprocess import PreprocessConfig


def test_icdr_scale_and_referable_rule():
    assert [g.value for g in GRADES] == [0, 1, 2, 3, 4]
    assert [is_referable(g) for g in range(5)] == [False, False, True, True, True]
    assert len(set(grade_texts())) == 5
    assert LESION_CODES == ("MA", "HE", "EX", "CWS", "NV", "PRH")
    with pytest.raises(ValueError):
        is_referable(5)


def test_grading_config_round_trip_and_validation():
    cfg = GradingConfig(thresholds=(0.1, -0.2, 0.3, 0.0), temperature=1.5, referable_threshold=0.3)
    assert GradingConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError):
        GradingConfig(thresholds=(0.0, 0.0))
    with pytest.raises(ValueError):
        GradingConfig(temperature=0.0)


def _make_bundle(root):
    root.mkdir()
    (root / "model.onnx").write_bytes(b"not really a graph, but hashed all the same")
    np.savez(root / "bank.npz", embeddings=np.zeros((2, 4), np.float16))
    artifacts = [describe_artifact(root, "model.onnx", fmt="onnx", role="model", precision="fp32", target="onnx"),
                 describe_artifact(root, "bank.npz", fmt="npz", role="bank", precision="fp16", target="onnx")]
    manifest = Manifest(model={"input_size": 224, "preprocess": PreprocessConfig().to_dict()}, outputs={},
                        grading=GradingConfig().to_dict(), saliency={},
                        artifacts=artifacts, export={"target": "onnx"}, bank={"file": "bank.npz"})
    save_manifest(root, manifest)
    return root


def test_bundle_loads_and_verifies(tmp_path):
    bundle = load_bundle(_make_bundle(tmp_path / "b"))
    assert bundle.manifest.artifact("model").format == "onnx"
    assert bundle.path(bundle.manifest.artifact("bank")).is_file()


def test_zipped_bundle_loads(tmp_path):
    root = _make_bundle(tmp_path / "b")
    archive = zip_bundle(root, tmp_path / "b.zip")
    assert zipfile.is_zipfile(archive)
    assert load_bundle(archive).manifest.artifact("model").sha256 == load_bundle(root).manifest.artifact("model").sha256


def test_tampered_artifact_is_refused(tmp_path):
    root = _make_bundle(tmp_path / "b")
    data = bytearray((root / "model.onnx").read_bytes())
    data[0] ^= 0xFF
    (root / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch"):
        load_bundle(root)


def test_missing_artifact_is_refused(tmp_path):
    root = _make_bundle(tmp_path / "b")
    (root / "bank.npz").unlink()
    with pytest.raises(BundleError, match="missing file bank.npz"):
        load_bundle(root)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(schema_version=99), "schema_version 99"),
    (lambda m: m.pop("grading"), "missing grading"),
    (lambda m: m["artifacts"][0].update(file="../outside.onnx"), "outside the bundle"),
    # every section parses into its typed config at load: one BundleError with the reason, no KeyError
    (lambda m: m["grading"].pop("thresholds"), "section grading is missing 'thresholds'"),
    (lambda m: m["grading"].update(temperature=-1), "section grading is malformed: temperature must be positive"),
    (lambda m: m["grading"].update(thresholds="high"), "section grading is malformed"),
    (lambda m: m.update(grading=[0.1, 0.2]), "section grading must be an object, not list"),
    (lambda m: m["model"]["preprocess"].update(crop="maybe"), "section model.preprocess is malformed: unknown"),
    (lambda m: m["model"].pop("preprocess"), "section model.preprocess is missing"),
])
def test_bad_manifest_is_refused(tmp_path, change, message):
    root = _make_bundle(tmp_path / "b")
    data = json.loads((root / MANIFEST_NAME).read_text())
    change(data)
    (root / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(BundleError, match=message):
        load_bundle(root)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(BundleError, match="neither a bundle directory nor a zip"):
        load_bundle(tmp_path / "file.txt")


def test_cpu_precision_class_is_the_bf16_and_amx_subset_of_the_flags():
    from edgeretina.cpu import cpu_flags, precision_class

    assert precision_class(["avx2", "avx512_bf16", "amx_int8"]) == ["avx512_bf16", "amx_int8"]
    assert precision_class(["avx2"]) == []
    assert set(precision_class()) <= set(cpu_flags())


@pytest.mark.parametrize("flags, machine, expected", [
    (["avx2"], "x86_64", "x86-avx2"),
    (["avx2", "avx512f"], "x86_64", "x86-avx512"),
    (["avx2", "avx_vnni"], "x86_64", "x86-avx-vnni"),
    (["avx2", "avx512f", "avx512_vnni", "avx512_bf16"], "x86_64", "x86-avx512-vnni"),
    (["avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_bf16"], "x86_64", "x86-amx"),
    (["asimd", "asimddp"], "aarch64", "arm64-dotprod"),
    (["asimd", "asimddp", "i8mm"], "aarch64", "arm64-i8mm"),
])
def test_cpu_class_names_the_best_int8_dot_product_unit(flags, machine, expected):
    from edgeretina.cpu import cpu_class

    assert cpu_class(flags, machine) == expected


def test_int8_validity_excludes_the_saturating_classes_only_for_full_8_bit_weights():
    from edgeretina.cpu import ALL_CPU_CLASSES, SATURATING_CPU_CLASSES, cpu_class, int8_validity

    assert int8_validity(7)["valid_cpu_classes"] == list(ALL_CPU_CLASSES)
    eight = int8_validity(8)["valid_cpu_classes"]
    assert "x86-avx2" not in eight and "x86-avx512" not in eight and "x86-avx512-vnni" in eight
    assert set(eight) | set(SATURATING_CPU_CLASSES) == set(ALL_CPU_CLASSES)
    assert 2 * 255 * 64 <= 32767 < 2 * 255 * 127          # the int16 pair sum of vpmaddubsw: 7 bits fit, 8 do not
    assert int8_validity(7)["measured_on"] == [cpu_class()]
