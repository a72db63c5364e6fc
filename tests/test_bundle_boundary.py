"""Every refusal at the bundle boundary (edgeretina/bundle.py): what a device relies on before it runs a model.

Bundles are built by hand (a few bytes of "model", a tiny bank), so the whole file runs in seconds. Zipped
bundles are extracted under a per-test temp root (tempfile.tempdir), so a test can see every file the
extraction wrote, and that nothing landed beside the extraction folder.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgeretina.bundle import (MANIFEST_NAME, Artifact, Manifest, artifact_problem, describe_artifact, load_bundle,
                               save_manifest, verify_bundle, zip_bundle)
from edgeretina.errors import BackendError, BundleError
from edgeretina.grades import GradingConfig
from edgeretina.preprocess import PreprocessConfig

MODEL_BYTES = b"a stand-in for a graph, hashed all the same"


def _build(root: Path, *, model: bool = True) -> Path:
    """A minimal valid bundle directory: model.onnx (unless model=False) and bank.npz, both hashed."""
    root.mkdir(parents=True)
    artifacts = []
    if model:
        (root / "model.onnx").write_bytes(MODEL_BYTES)
        artifacts.append(describe_artifact(root, "model.onnx", fmt="onnx", role="model", precision="fp32",
                                           target="onnx"))
    np.savez(root / "bank.npz", embeddings=np.zeros((2, 4), np.float16))
    artifacts.append(describe_artifact(root, "bank.npz", fmt="npz", role="bank", precision="fp16", target="onnx"))
    manifest = Manifest(model={"input_size": 64, "preprocess": PreprocessConfig().to_dict()}, outputs={},
                        grading=GradingConfig().to_dict(), saliency={}, artifacts=artifacts,
                        export={"target": "onnx"}, bank={"file": "bank.npz"})
    save_manifest(root, manifest)
    return root


def _manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST_NAME).read_text())


def _rewrite(root: Path, change) -> Path:
    data = _manifest(root)
    change(data)
    (root / MANIFEST_NAME).write_text(json.dumps(data))
    return root


def _zip(path: Path, members: list[tuple[str, bytes]], symlinks: dict[str, str] | None = None) -> Path:
    """A zip with exactly these members (names written as given, unlike zip_bundle); symlinks: name -> target,
    stored the way `zip --symlinks` stores them (S_IFLNK mode, the target as the member's data)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _bundle_members(root: Path) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(root.iterdir())]


@pytest.fixture
def extract_root(tmp_path, monkeypatch):
    """The folder zipped bundles are extracted under in this test (tempfile.mkdtemp's parent)."""
    root = tmp_path / "extract"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


# --- zip members --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("evil", ["../evil", "{tmp}/evil-abs", "sub/../../evil", "..\\evil", "./", "/"])
def test_zip_member_outside_the_extraction_folder_is_refused_before_anything_is_written(tmp_path, extract_root,
                                                                                       evil):
    """The names are checked before extraction starts: not even the valid members (manifest, model) that come
    before the bad one are written, and nothing lands beside the extraction folder."""
    members = _bundle_members(_build(tmp_path / "b")) + [(evil.format(tmp=tmp_path), b"payload")]
    archive = _zip(tmp_path / "evil.zip", members)
    with pytest.raises(BundleError, match=r"artifact name .* points outside the bundle"):
        load_bundle(archive)
    assert _files_under(extract_root) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "evil.zip", "extract"]


def test_zip_symlink_member_is_extracted_as_a_plain_file_not_followed(tmp_path, extract_root):
    """zipfile writes a symlink entry as a regular file holding the link text. A manifest that pins the
    contents of the file the link points at is therefore refused: the link is never followed."""
    root = _build(tmp_path / "b")
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"what the attacker wants graded, somewhere else on the device")
    link_text = str(outside)
    _rewrite(root, lambda m: m["artifacts"][0].update(
        sha256=hashlib.sha256(outside.read_bytes()).hexdigest(), bytes=outside.stat().st_size))
    members = [(n, d) for n, d in _bundle_members(root) if n != "model.onnx"]
    archive = _zip(tmp_path / "link.zip", members, symlinks={"model.onnx": link_text})
    with pytest.raises(BundleError, match=f"model.onnx has {len(link_text)} bytes, "
                                          f"manifest says {outside.stat().st_size}"):
        load_bundle(archive)
    (extracted,) = extract_root.glob("edgeretina-bundle-*/model.onnx")
    assert not extracted.is_symlink()
    assert extracted.read_bytes() == link_text.encode()


@pytest.mark.parametrize("kind", ["symlink-dir", "file-then-child"])
def test_zip_with_colliding_members_is_refused_with_a_bundle_error(tmp_path, extract_root, kind):
    members = _bundle_members(_build(tmp_path / "b"))
    if kind == "symlink-dir":
        archive = tmp_path / "c.zip"
        with zipfile.ZipFile(archive, "w") as zf:             # the link first, then a member "through" it
            info = zipfile.ZipInfo("lnk")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, str(tmp_path))
            for name, data in members + [("lnk/evil", b"x")]:
                zf.writestr(name, data)
    else:
        archive = _zip(tmp_path / "c.zip", members + [("a", b"x"), ("a/b", b"y")])
    with pytest.raises(BundleError):
        load_bundle(archive)
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("damage", ["bad-crc", "truncated"])
def test_corrupt_zip_is_refused_with_a_bundle_error(tmp_path, extract_root, damage):
    archive = tmp_path / "b.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in _bundle_members(_build(tmp_path / "b")):
            zf.writestr(name, data)
    data = bytearray(archive.read_bytes())
    if damage == "bad-crc":
        data[data.find(MODEL_BYTES)] ^= 0x01          # stored, so the model's bytes sit in the archive as they are
    else:
        data = data[:40] + data[-22:]                 # keep the end-of-central-directory record: still "a zip"
    archive.write_bytes(bytes(data))
    assert zipfile.is_zipfile(archive)
    with pytest.raises(BundleError):
        load_bundle(archive)


def test_refused_zip_leaves_no_extraction_folder_behind(tmp_path, extract_root):
    archive = _zip(tmp_path / "evil.zip", _bundle_members(_build(tmp_path / "b")) + [("../evil", b"x")])
    with pytest.raises(BundleError, match="points outside the bundle"):
        load_bundle(archive)
    assert list(extract_root.iterdir()) == []


def test_zip_bundle_writes_relative_posix_members_that_load_back(tmp_path, extract_root):
    root = _build(tmp_path / "b")
    archive = zip_bundle(root, tmp_path / "b.zip")
    with zipfile.ZipFile(archive) as zf:
        assert zf.namelist() == ["bank.npz", "manifest.json", "model.onnx"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temp file left
    bundle = load_bundle(archive)
    assert bundle.root.parent == extract_root
    assert bundle.path(bundle.manifest.artifact("model")).read_bytes() == MODEL_BYTES


def test_zipped_bundle_with_an_artifact_changed_inside_the_zip_is_refused(tmp_path, extract_root):
    """Same size, one byte different: only the sha256 can tell, and it does after extraction too."""
    members = [(n, d if n != "model.onnx" else d[:-1] + b"!") for n, d in _bundle_members(_build(tmp_path / "b"))]
    with pytest.raises(BundleError, match=r"^bundle verification failed: model.onnx sha256 mismatch"):
        load_bundle(_zip(tmp_path / "b.zip", members))


# --- artifacts on disk ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, size", [(lambda b: b + b"x", len(MODEL_BYTES) + 1),
                                          (lambda b: b[:10], 10), (lambda b: b"", 0)])
def test_artifact_whose_size_differs_from_the_manifest_is_refused(tmp_path, change, size):
    root = _build(tmp_path / "b")
    (root / "model.onnx").write_bytes(change(MODEL_BYTES))
    with pytest.raises(BundleError, match=f"^bundle verification failed: model.onnx has {size} bytes, "
                                          f"manifest says {len(MODEL_BYTES)}$"):
        load_bundle(root)


@pytest.mark.parametrize("sha", ["0" * 64, hashlib.sha256(MODEL_BYTES).hexdigest().upper(), ""])
def test_manifest_sha256_that_does_not_match_the_file_is_refused(tmp_path, sha):
    """The file is intact; the manifest's hash is not (zeros, the right hash in upper case, empty)."""
    root = _rewrite(_build(tmp_path / "b"), lambda m: m["artifacts"][0].update(sha256=sha))
    with pytest.raises(BundleError, match="^bundle verification failed: model.onnx sha256 mismatch"):
        load_bundle(root)


def test_verification_names_every_broken_artifact_and_load_without_verify_does_not_check(tmp_path):
    root = _build(tmp_path / "b")
    (root / "model.onnx").write_bytes(b"")
    (root / "bank.npz").unlink()
    expected = (f"bundle verification failed: model.onnx has 0 bytes, manifest says {len(MODEL_BYTES)}; "
                "missing file bank.npz")
    with pytest.raises(BundleError) as info:
        load_bundle(root)
    assert str(info.value) == expected
    unverified = load_bundle(root, verify=False)
    with pytest.raises(BundleError) as again:
        verify_bundle(unverified)
    assert str(again.value) == expected


def test_artifact_problem_is_none_for_an_intact_artifact_and_a_directory_is_missing(tmp_path):
    root = _build(tmp_path / "b")
    model = load_bundle(root).manifest.artifact("model")
    assert artifact_problem(root, model) is None
    (root / "sub").mkdir()
    assert artifact_problem(root, Artifact(**{**model.__dict__, "file": "sub"})) == "missing file sub"


@pytest.mark.parametrize("name", ["../outside.bin", "sub/../../outside.bin", "{outside}", "..\\outside.bin",
                                  "sub\\model.onnx", "", "."])
def test_artifact_name_pointing_outside_the_bundle_is_refused_even_when_the_file_matches(tmp_path, name):
    """A real file with the right size and sha256 sits where the name points: refused for the name alone."""
    outside = tmp_path / "outside.bin"
    outside.write_bytes(MODEL_BYTES)
    root = _build(tmp_path / "b")
    (root / "sub").mkdir()
    (root / "sub" / "model.onnx").write_bytes(MODEL_BYTES)
    name = name.format(outside=outside)
    _rewrite(root, lambda m: m["artifacts"][0].update(file=name))
    with pytest.raises(BundleError, match=f"^bundle verification failed: artifact name {re.escape(repr(name))} "
                                          "points outside the bundle$"):
        load_bundle(root)


@pytest.mark.parametrize("bank_file", ["../outside.npz", "/etc/passwd"])
def test_bank_file_outside_the_bundle_is_refused(tmp_path, bank_file):
    """The grader reads manifest.bank.file: a name outside the bundle would be read unverified."""
    root = _rewrite(_build(tmp_path / "b"), lambda m: m.update(bank={"file": bank_file}))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(root)


def test_files_other_sections_name_must_be_verified_artifacts(tmp_path):
    """Inside the bundle but not among the hashed artifacts: the bank, or the verification reference set."""
    root = _build(tmp_path / "b")
    (root / "other.npz").write_bytes(b"not hashed by the manifest")
    bank = _rewrite(root, lambda m: m.update(bank={"file": "other.npz"}))
    with pytest.raises(BundleError, match="bank file 'other.npz' is not one of the bundle's verified artifacts"):
        load_bundle(bank)
    from edgeretina.runtime.info import inspect_bundle

    info = inspect_bundle(bank, trust=None)            # `edgeretina info` says so too, not "verified ✓"
    assert not info.verified and "bank file 'other.npz' is not one of" in "; ".join(info.problems)
    reference = _rewrite(_build(tmp_path / "c"), lambda m: m["export"].update(verify={"reference_set": "../r.npz"}))
    with pytest.raises(BundleError, match="reference set: artifact name '../r.npz' points outside the bundle"):
        load_bundle(reference)


# --- the manifest itself ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["{not json", '{"schema_version": 1,}', "", b"\xff\xfe{}"])
def test_manifest_that_is_not_valid_json_is_refused(tmp_path, text):
    root = _build(tmp_path / "b")
    path = root / MANIFEST_NAME
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(BundleError, match=f"^{path} is not valid JSON: "):
        load_bundle(root)


@pytest.mark.parametrize("value", [[], [{"schema_version": 1}], "manifest", 1, None])
def test_manifest_that_is_json_but_not_an_object_is_refused(tmp_path, value):
    root = _build(tmp_path / "b")
    path = root / MANIFEST_NAME
    path.write_text(json.dumps(value))
    with pytest.raises(BundleError, match=f"^{path} does not hold a JSON object$"):
        load_bundle(root)


@pytest.mark.parametrize("version", [0, 2, "1", None, 1.5, [1]])
def test_unknown_schema_version_is_refused(tmp_path, version):
    root = _rewrite(_build(tmp_path / "b"), lambda m: m.update(schema_version=version))
    with pytest.raises(BundleError, match=rf"^unknown manifest schema_version {re.escape(repr(version))} "
                                          r"\(this edgeretina reads 1\)$"):
        load_bundle(root)


def test_missing_schema_version_is_refused(tmp_path):
    root = _rewrite(_build(tmp_path / "b"), lambda m: m.pop("schema_version"))
    with pytest.raises(BundleError, match=r"^unknown manifest schema_version None"):
        load_bundle(root)


def test_boolean_schema_version_is_refused(tmp_path):
    root = _rewrite(_build(tmp_path / "b"), lambda m: m.update(schema_version=True))
    with pytest.raises(BundleError, match="unknown manifest schema_version True"):
        load_bundle(root)


def test_manifest_missing_several_sections_names_them_all(tmp_path):
    root = _rewrite(_build(tmp_path / "b"), lambda m: [m.pop(k) for k in ("artifacts", "export", "outputs")])
    with pytest.raises(BundleError, match="^manifest is missing outputs, artifacts, export$"):
        load_bundle(root)


def _drop(field):
    return lambda a: a.pop(field)


@pytest.mark.parametrize("change, message", [
    (_drop("sha256"), "missing 1 required positional argument: 'sha256'"),
    (_drop("bytes"), "missing 1 required positional argument: 'bytes'"),
    (_drop("file"), "missing 1 required positional argument: 'file'"),
    (lambda a: a.update(url="http://example.invalid/model.onnx"), "unexpected keyword argument 'url'"),
])
def test_artifact_entry_with_a_missing_or_extra_field_is_refused(tmp_path, change, message):
    root = _rewrite(_build(tmp_path / "b"), lambda m: change(m["artifacts"][0]))
    with pytest.raises(BundleError, match=rf"^malformed artifact entry in manifest: .*{message}"):
        load_bundle(root)


@pytest.mark.parametrize("artifacts", ["model.onnx", ["model.onnx"], [None], [["model.onnx", "onnx"]], None, 3,
                                       {"file": "model.onnx"}])
def test_artifacts_that_are_not_a_list_of_objects_are_refused(tmp_path, artifacts):
    root = _rewrite(_build(tmp_path / "b"), lambda m: m.update(artifacts=artifacts))
    with pytest.raises(BundleError, match="^malformed artifact entry in manifest: "):
        load_bundle(root)


@pytest.mark.parametrize("value", [7, None, ["model.onnx"]])
def test_artifact_entry_whose_file_is_not_a_string_is_refused_as_malformed(tmp_path, value):
    root = _rewrite(_build(tmp_path / "b"), lambda m: m["artifacts"][0].update(file=value))
    with pytest.raises(BundleError, match="malformed artifact entry"):
        load_bundle(root)


def test_artifact_entry_whose_bytes_is_a_string_is_refused_as_malformed(tmp_path):
    root = _rewrite(_build(tmp_path / "b"), lambda m: m["artifacts"][0].update(bytes=str(len(MODEL_BYTES))))
    with pytest.raises(BundleError, match="malformed artifact entry"):
        load_bundle(root)


# --- no model artifact: the runtime's answer ----------------------------------------------------------------------

def test_grader_refuses_a_bundle_without_a_model_artifact_with_a_backend_error(tmp_path):
    """load_bundle accepts it (the manifest is consistent); the Grader stops at backend selection with a
    BackendError, before any runner, bank or verification is touched."""
    from edgeretina.runtime.grader import Grader

    root = _build(tmp_path / "b", model=False)
    manifest = load_bundle(root).manifest
    with pytest.raises(BundleError, match="^bundle has no model artifact$"):
        manifest.artifact("model")
    with pytest.raises(BackendError, match=r"^no backend runs this bundle's model formats \(\)$"):
        Grader(root, trust=None, verify="off")
    with pytest.raises(BackendError, match=r"^backend onnxruntime cannot run this bundle \(it runs onnx; "
                                           r"the bundle has no model\)$"):
        Grader(root, backend="onnxruntime", trust=None, verify="off")


def test_grader_refuses_a_bundle_whose_only_model_is_in_a_format_no_backend_runs(tmp_path):
    from edgeretina.runtime.grader import Grader

    root = _rewrite(_build(tmp_path / "b"), lambda m: m["artifacts"][0].update(format="pickle"))
    with pytest.raises(BackendError, match=r"^no backend runs this bundle's model formats \(pickle\)$"):
        Grader(root, trust=None, verify="off")
