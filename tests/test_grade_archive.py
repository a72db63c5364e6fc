"""grade-archive (issue 16): an archive graded by a pool of Ray actors, resumable, into Parquet.

Real Ray (a local cluster of 2 CPUs for the module, shut down at the end), the suite's tiny ONNX bundle, ~200
small phantom photographs with bad files mixed in. The interruption is real: the command runs in a subprocess
(a second driver on the same cluster) and is SIGKILLed once about half of its parts exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray.data")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from edgeretina.archive import ArchiveConfig, grade_archive, require_extra  # noqa: E402
from edgeretina.archive.sources import MISSING, expand_sources  # noqa: E402
from edgeretina.errors import ArchiveError, BundleError, MissingDependencyError  # noqa: E402

PHOTOS = 190
SIZE = 160
BATCH = 4


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray of 2 CPUs for the module; its address lets a second driver (the CLI subprocess) join it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """~200 files in four kinds of source: a folder of phantom photographs, a glob, a manifest CSV (relative
    paths, one missing file) and a folder holding a 2-frame DICOM without a suffix. Returns (sources, bad)."""
    from edgeretina.phantom import PhantomConfig, generate_dataset
    from edgeretina.phantom.dicom_files import image_dataset, save
    from edgeretina.phantom.render import render_case

    root = tmp_path_factory.mktemp("archive")
    generate_dataset(root / "phantom", n=PHOTOS, seed=5, config=PhantomConfig(size=SIZE), workers=2)
    bad = root / "bad"
    (bad / "deep").mkdir(parents=True)
    photo = next((root / "phantom" / "images").glob("*.jpg")).read_bytes()
    (bad / "deep" / "empty.png").write_bytes(b"")
    (bad / "deep" / "text.png").write_text("not a picture")
    (bad / "truncated.jpg").write_bytes(photo[: len(photo) // 3])
    (bad / "grey.png").write_bytes(_png(np.full((SIZE, SIZE, 3), 128, np.uint8)))      # decodes: ungradable
    (root / "list.csv").write_text("path\nbad/truncated.jpg\nbad/grey.png\nbad/gone.jpg\n")
    frames = [render_case(seed, PhantomConfig(size=SIZE, camera_variation=0.0)).image for seed in (7, 8)]
    save(image_dataset(frames), root / "dicom" / "1.2.840.99.1")
    sources = (str(root / "phantom" / "images"), str(bad / "deep" / "*.png"), str(root / "list.csv"),
               str(root / "dicom"))
    errors = {str(bad / "deep" / "empty.png"), str(bad / "deep" / "text.png"), str(bad / "truncated.jpg"),
              str(bad / "gone.jpg")}
    return sources, errors


def test_an_interrupted_run_resumes_and_every_image_has_one_row_graded_as_grade_does(
        ray_cluster, archive, onnx_bundle, tmp_path):
    from edgeretina.runtime.grader import Grader

    sources, errors = archive
    files = [item.file for item in expand_sources(sources)]
    assert len(files) == PHOTOS + 2 + 3 + 1
    out = tmp_path / "out"

    # 1. a real interruption: the CLI as a second driver on this cluster, killed when about half its parts exist
    killed_at = _run_and_kill_halfway(sources, onnx_bundle, out, ray_cluster, parts_wanted=len(files) // BATCH // 2)
    first = _part_rows(out)
    done_before = {row["file"] for row in first}
    assert 0 < len(done_before) < len(files), f"not interrupted halfway: {len(done_before)} of {len(files)} files"
    assert not (out / "results.parquet").exists()
    assert killed_at >= 1

    # 2. the rerun grades only the rest
    summary = grade_archive(ArchiveConfig(sources=sources, bundle=onnx_bundle, out=out, workers=2, batch_size=8))
    saved = json.loads((out / "summary.json").read_text())
    assert saved["skipped_files"] == summary.skipped_files == len(done_before)
    assert saved["graded_files"] == len(files) - len(done_before)
    assert len(_part_rows(out)) == len(first) + summary.graded_images      # nothing graded twice
    assert saved["workers"] == 2 and saved["bundle_sha256"] == summary.bundle_sha256

    # 3. exactly one row per image: a photograph or a failed file one, the DICOM one per frame
    results = pq.read_table(out / "results.parquet").to_pylist()
    keys = [(row["file"], row["frame"]) for row in results]
    assert len(keys) == len(set(keys)) == len(files) + 1 == saved["images"]
    assert {row["file"] for row in results} == set(files)
    dicom_rows = [row for row in results if row["frames"]]
    assert [(row["frame"], row["frames"]) for row in dicom_rows] == [(1, 2), (2, 2)]

    # 4. bad files are rows with their error; the grey picture decodes and is refused, not failed
    by_file = {row["file"]: row for row in results}
    assert {f for f, row in by_file.items() if row["error"]} == errors
    assert "file not found" in by_file[next(f for f in errors if f.endswith("gone.jpg"))]["error"]
    grey = next(row for f, row in by_file.items() if f.endswith("grey.png"))
    assert grey["error"] is None and grey["screening"] == "ungradable"

    # 5. the same grades as `edgeretina grade` (an in-process Grader on the same bundle and files)
    expected = {(r.file, (r.dicom or {}).get("frame")): r for r in Grader(onnx_bundle, threads=1).grade(files)}
    assert set(expected) == set(keys)
    for row in results:
        record = expected[(row["file"], row["frame"])]
        assert (row["grade"], row["screening"], row["gradable"]) == (record.grade, record.screening, record.gradable)
        assert (row["error"] is None) == (record.error is None)
        if record.probabilities is not None:
            np.testing.assert_allclose(row["probabilities"], record.probabilities, atol=1e-5)
            assert abs(row["referable_probability"] - record.referable_probability) <= 1e-5
            assert row["neighbor_ids"] == [n["case_id"] for n in record.neighbors]

    # 6. the summary counts the merged results; every row names the bundle and where it was verified
    assert sum(saved["screening"].values()) + saved["errors"] == saved["images"]
    assert sum(saved["grades"].values()) == saved["screening"]["negative"] + saved["screening"]["referable"]
    assert {row["bundle_sha256"] for row in results} == {_sha256(onnx_bundle / "manifest.json")}
    assert saved["cpu_classes"] and all(row["cpu_class"] in saved["cpu_classes"] for row in results)

    # 7. a finished archive reruns without grading anything
    again = grade_archive(ArchiveConfig(sources=sources, bundle=onnx_bundle, out=out, workers=2))
    assert (again.graded_files, again.skipped_files, again.images) == (0, len(files), len(files) + 1)

    # 8. --retry-errors grades the failed files again; the results keep only their latest rows
    retried = grade_archive(ArchiveConfig(sources=sources, bundle=onnx_bundle, out=out, workers=1, retry_errors=True))
    assert (retried.graded_files, retried.skipped_files) == (len(errors), len(files) - len(errors))
    merged = pq.read_table(out / "results.parquet").to_pylist()
    assert sorted((r["file"], r["frame"] or 0) for r in merged) == sorted((f, fr or 0) for f, fr in keys)
    assert sum(r["file"] in errors for r in _part_rows(out)) == 2 * len(errors)     # both gradings kept in parts


def test_a_worker_that_fails_verification_on_its_machine_fails_the_job_with_the_reason(
        ray_cluster, archive, onnx_bundle, tmp_path):
    """Hashes intact (the driver's strict load passes), reference outputs wrong: only the worker's own run of the
    export gate on its CPU can refuse it, before it grades anything."""
    bundle = _wrong_reference_outputs(onnx_bundle, tmp_path / "bundle")
    out = tmp_path / "out"
    with pytest.raises(ArchiveError, match=r"worker on .+ \((?:x86|arm)[^)]*\) refused the bundle: .*failed "
                                           r"on-device verification.*embedding_cosine"):
        grade_archive(ArchiveConfig(sources=archive[0][:1], bundle=bundle, out=out, workers=1))
    assert not list((out / "parts").glob("*.parquet"))
    # and with verification off the same bundle grades
    summary = grade_archive(ArchiveConfig(sources=archive[0][3:], bundle=bundle, out=out, workers=1, verify="off"))
    assert summary.images == 2 and summary.errors == 0


def test_sources_expand_folders_globs_manifests_and_uris(tmp_path):
    from edgeretina.archive.sources import read_manifest

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ("a.jpg", "sub/b.PNG", "sub/c.tif", "notes.txt", "sub/d.jpg.part"):
        (photos / name).write_bytes(b"x" * 3)
    os.utime(photos / "a.jpg", ns=(1, 123_456_789))
    pq.write_table(pa.table({"Image": ["photos/a.jpg", str(photos / "sub" / "c.tif"), None]}), tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("\ufeffid,path\n1,photos/sub/b.PNG\n2,nowhere.jpg\n")

    items = expand_sources([str(photos), str(tmp_path / "m.csv"), str(tmp_path / "m.parquet")])
    assert [i.file for i in items] == [str(photos / "a.jpg"), str(photos / "sub" / "b.PNG"),
                                       str(photos / "sub" / "c.tif"), str(tmp_path / "nowhere.jpg")]
    assert items[0].key == (str(photos / "a.jpg"), 3, 123_456_789)
    assert (items[-1].bytes, items[-1].mtime_ns) == (MISSING, MISSING)

    # the same files through pyarrow's filesystems: a folder URI, a glob URI and a manifest URI
    uri = photos.as_uri()
    assert [i.file for i in expand_sources([uri])] == [f"{uri}/a.jpg", f"{uri}/sub/b.PNG", f"{uri}/sub/c.tif"]
    assert [i.key for i in expand_sources([f"{uri}/sub/*.tif"])] == [(f"{uri}/sub/c.tif", 3, items[2].mtime_ns)]
    assert [i.file for i in expand_sources([(tmp_path / "m.csv").as_uri()])] == [f"{uri}/sub/b.PNG",
                                                                                  f"{tmp_path.as_uri()}/nowhere.jpg"]
    with pytest.raises(Exception, match="no path column"):
        read_manifest(b"id,grade\n1,2\n", "labels.csv")


def test_a_uri_source_is_fetched_by_the_worker_and_named_by_its_uri(ray_cluster, archive, onnx_bundle, tmp_path):
    """file:// goes the way s3:// would: a manifest read with pyarrow, each file copied onto the worker, graded,
    its rows named by the URI; a listed file the worker cannot read is an error row, the job goes on."""
    from edgeretina.runtime.grader import Grader

    sources, _ = archive
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(next(Path(sources[0]).glob("*.jpg")).read_bytes())
    shutil.copy(next(Path(sources[3]).iterdir()), folder / "scan.dcm")
    (folder / "list.csv").write_text("path\nphoto.jpg\nscan.dcm\ngone.jpg\n")

    summary = grade_archive(ArchiveConfig(sources=((folder / "list.csv").as_uri(),), bundle=onnx_bundle,
                                          out=tmp_path / "out", workers=1, batch_size=8))
    rows = {(r["file"], r["frame"]): r for r in pq.read_table(tmp_path / "out" / "results.parquet").to_pylist()}
    uri = folder.as_uri()
    assert set(rows) == {(f"{uri}/photo.jpg", None), (f"{uri}/scan.dcm", 1), (f"{uri}/scan.dcm", 2),
                         (f"{uri}/gone.jpg", None)}
    photo = rows[(f"{uri}/photo.jpg", None)]
    local = Grader(onnx_bundle, threads=1).grade([folder / "photo.jpg"])[0]
    assert photo["error"] is None and photo["read_ms"] is not None
    assert (photo["screening"], photo["grade"]) == (local.screening, local.grade)
    assert rows[(f"{uri}/scan.dcm", 2)]["error"] is None and rows[(f"{uri}/scan.dcm", 2)]["frames"] == 2
    assert "not readable from its filesystem" in rows[(f"{uri}/gone.jpg", None)]["error"]
    assert summary.errors == 1 and summary.images == 4


def test_a_shipped_bundle_is_written_once_per_machine_and_still_loaded_strictly(ray_cluster, onnx_bundle, tmp_path,
                                                                               monkeypatch):
    """A worker whose machine lacks the driver's path grades from the bytes the driver put in the object store."""
    import ray

    from edgeretina.archive.worker import WorkerSetup, bundle_here, bundle_payload, materialise_bundle
    from edgeretina.bundle import load_bundle
    from edgeretina.runtime.grader import Grader

    monkeypatch.setenv("EDGERETINA_CACHE_DIR", str(tmp_path / "cache"))
    sha = _sha256(onnx_bundle / "manifest.json")
    payload = bundle_payload(onnx_bundle, load_bundle(onnx_bundle))
    setup = WorkerSetup(bundle_path=str(tmp_path / "not-on-this-machine"), bundle_sha256=sha,
                        bundle_payload=(ray.put(payload),), backend=None, device=None, threads=1, verify="off",
                        trust_keys=None, trust_source="", batch_size=4)
    here = bundle_here(setup)
    assert here == tmp_path / "cache" / "archive-bundles" / sha
    assert sorted(p.name for p in here.iterdir()) == sorted(payload["files"])
    assert Grader(here, threads=1, verify="off").bundle.manifest.artifacts
    assert materialise_bundle(payload, sha) == here                 # once per machine: found, not rewritten
    # what arrives is hashed like any bundle: damaged bytes are refused
    model = payload["files"]["model.onnx"]
    damaged = {**payload, "files": {**payload["files"], "model.onnx": model[:-1] + bytes([model[-1] ^ 0xFF])}}
    with pytest.raises(BundleError, match="sha256"):
        Grader(materialise_bundle(damaged, "0" * 64), threads=1, verify="off")


def test_a_file_that_crashes_the_grader_is_its_own_error_row_and_the_batch_goes_on(archive, onnx_bundle, tmp_path):
    """What the grader does not turn into an error record itself (a crash in its pipeline) must not take the batch,
    the worker or the job with it: the batch is graded again file by file."""
    from edgeretina.archive.worker import grade_items
    from edgeretina.runtime.grader import Grader

    class CrashesOnOneFile(Grader):
        def _load(self, source):
            if source.ref.path.endswith("crash.jpg"):
                raise RuntimeError("decoder crashed")
            return super()._load(source)

    photos = sorted(Path(archive[0][0]).glob("*.jpg"))[:2]
    shutil.copy(photos[0], tmp_path / "crash.jpg")
    files = [str(photos[0]), str(tmp_path / "crash.jpg"), str(photos[1])]
    rows = grade_items(CrashesOnOneFile(onnx_bundle, threads=1), [{"file": f, "bytes": 1, "mtime_ns": 2} for f in files],
                       8, {"bundle_sha256": "s", "node": "n", "cpu_class": "c"}, None)
    assert [row["file"] for row in rows] == files
    assert rows[1]["error"] == "internal error while grading: RuntimeError: decoder crashed"
    expected = Grader(onnx_bundle, threads=1).grade([files[0], files[2]])
    assert [(r["grade"], r["screening"], r["error"]) for r in (rows[0], rows[2])] == \
        [(e.grade, e.screening, e.error) for e in expected]


def test_help_leaves_ray_unloaded_and_a_missing_extra_names_scale(cli, monkeypatch, tmp_path):
    code = ("import sys; from edgeretina.cli import main; sys.argv = ['edgeretina', 'grade-archive', '--help']\n"
            "try: main()\nexcept SystemExit: pass\n"
            "sys.exit(1 if {'ray', 'pyarrow'} & set(sys.modules) else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "--ray-address" in done.stdout and "--threads-per-worker" in done.stdout
    assert "Example: edgeretina grade-archive" in done.stdout

    monkeypatch.setitem(sys.modules, "ray", None)                   # import ray -> ImportError
    with pytest.raises(MissingDependencyError, match=r"edgeretina\[scale\]"):
        require_extra()
    code, _, err = cli("grade-archive", tmp_path, "--bundle", tmp_path, "--out", tmp_path / "out")
    assert code == 1 and "pip install 'edgeretina[scale]'" in err


# ------------------------------------------------------------------------------------------------ helpers

def _run_and_kill_halfway(sources, bundle: Path, out: Path, address: str, parts_wanted: int) -> int:
    command = [sys.executable, "-m", "edgeretina", "grade-archive", *sources, "--bundle", str(bundle), "--out",
               str(out), "--ray-address", address, "--workers", "2", "--batch-size", str(BATCH),
               "--part-rows", str(BATCH)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            parts = len(list((out / "parts").glob("part-*.parquet")))
            if parts >= parts_wanted:
                process.kill()
                process.wait()
                return parts
            time.sleep(0.01)
        output = process.stdout.read().decode(errors="replace") if process.poll() is not None else ""
        pytest.fail(f"the run ended (exit {process.poll()}) before it could be interrupted:\n{output[-3000:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _part_rows(out: Path) -> list[dict]:
    return [row for path in sorted((out / "parts").glob("part-*.parquet")) for row in pq.read_table(path).to_pylist()]


def _wrong_reference_outputs(bundle: Path, copy: Path) -> Path:
    """A copy whose reference.npz holds wrong torch outputs, with the manifest's hash of it updated."""
    shutil.copytree(bundle, copy)
    path = copy / "reference.npz"
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    arrays["torch__embedding"] = np.roll(arrays["torch__embedding"], 1, axis=1)
    arrays["torch__ordinal_logits"] = arrays["torch__ordinal_logits"] + 5.0
    np.savez_compressed(path, **arrays)
    manifest = json.loads((copy / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        if artifact["file"] == "reference.npz":
            artifact.update(sha256=_sha256(path), bytes=path.stat().st_size)
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return copy


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _png(rgb: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", rgb)
    assert ok
    return data.tobytes()
