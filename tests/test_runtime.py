import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeretina.dataset import read_labels
from edgeretina.runtime import Grader
from edgeretina.runtime.batch import expand_inputs, grade_paths
from edgeretina.training.checkpoint import load_checkpoint
from edgeretina.training.loop import predict
from edgeretina.preprocess import decode_image, prepare
from edgeretina.runtime.postprocess import grade_results

RECORD_KEYS = {"file", "gradable", "quality", "grade", "probabilities", "referable", "neighbors", "error"}


def test_runtime_import_leaves_torch_out():
    code = ("import sys, edgeretina.runtime, edgeretina.runtime.batch, edgeretina.runtime.report, edgeretina.cli, "
            "edgeretina.runtime.backends.onnxruntime, edgeretina.runtime.backends.openvino, "
            "edgeretina.runtime.backends.tensorrt; "
            "heavy = [m for m in ('torch', 'open_clip', 'onnx', 'edgeretina.training', 'edgeretina.export') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def grader(onnx_bundle):
    return Grader(onnx_bundle, threads=1)


def test_grades_match_torch_on_the_same_photos(grader, tiny_checkpoint, phantom_test):
    items = read_labels(phantom_test)
    records = grader.grade([i.path for i in items])
    ckpt = load_checkpoint(tiny_checkpoint.checkpoint)
    gradable = [(i, r) for i, r in zip(items, records) if r.gradable]
    assert gradable, "the quality gate rejected every phantom photograph"
    prepared = np.stack([prepare(decode_image(i.path), ckpt.preprocess)[0] for i, _ in gradable])
    expected = grade_results(predict(ckpt.model, prepared, ckpt.preprocess)["ordinal_logits"], ckpt.grading)
    assert [r.grade for _, r in gradable] == [e.grade for e in expected]
    assert grader.grading == ckpt.grading and ckpt.grading.target_sensitivity == 0.87
    for _, record in gradable:
        assert RECORD_KEYS <= set(record.to_dict())
        assert record.error is None and record.screening in ("negative", "referable")
        assert len(record.probabilities) == 5 and sum(record.probabilities) == pytest.approx(1.0, abs=1e-5)
        # the operating point calibration chose for the target sensitivity, carried by the manifest
        assert record.referable == (record.referable_probability >= ckpt.grading.referable_threshold)
        assert len(record.neighbors) == grader.k
        assert record.neighbors[0]["case_id"].startswith("phantom_s11_")   # from the training bank
        assert {"decode", "quality", "preprocess", "inference"} <= set(record.timings_ms)


@pytest.fixture()
def bad_files(tmp_path, phantom_test):
    good = read_labels(phantom_test)[0].path
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is a text file, not a photograph\n")
    data = Path(good).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return good, [tmp_path / "empty.jpg", tmp_path / "notes.jpg", tmp_path / "truncated.jpg", tmp_path / "missing.jpg"]


def test_bad_files_get_error_records_and_the_batch_goes_on(grader, bad_files):
    good, bad = bad_files
    records = grader.grade([bad[0], good, bad[1], bad[2], bad[3], good], batch_size=4)
    assert len(records) == 6
    errors = {Path(r.file).name: r.error for r in records if r.error}
    assert set(errors) == {"empty.jpg", "notes.jpg", "truncated.jpg", "missing.jpg"}
    assert "empty" in errors["empty.jpg"]
    assert "not an image" in errors["notes.jpg"]
    assert "truncated" in errors["truncated.jpg"]
    assert "not found" in errors["missing.jpg"]
    graded = [r for r in records if not r.error]
    assert len(graded) == 2 and graded[0].grade == graded[1].grade
    assert all(r.grade is None and r.probabilities is None for r in records if r.error)


def test_real_fundus_photograph_with_overlay(grader, tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    photo = tmp_path / "retina.jpg"
    rgb = skimage_data.retina()
    cv2.imwrite(str(photo), rgb[..., ::-1])
    records = grade_paths(grader, [photo], overlays=tmp_path / "overlays")
    record = records[0]
    assert record.error is None and record.gradable, record.quality
    assert record.grade in range(5) and len(record.neighbors) == grader.k
    overlay = cv2.imread(record.overlay)
    assert overlay is not None and overlay.shape[:2] == rgb.shape[:2]
    assert not np.array_equal(overlay[..., ::-1], decode_image(photo))   # something was drawn


def test_expand_inputs(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/1.jpg", "a/2.PNG", "a/notes.txt", "3.tif"):
        (tmp_path / name).write_bytes(b"x")
    found = expand_inputs([tmp_path / "a", str(tmp_path / "*.tif"), tmp_path / "missing.jpg", tmp_path / "a"])
    names = [Path(p).name for p in found]
    assert names == ["1.jpg", "2.PNG", "3.tif", "missing.jpg"]


def _cli(*args, cwd=None):
    exe = Path(sys.executable).with_name("edgeretina")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


def test_cli_lists_the_commands():
    result = _cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("synth", "train", "export", "grade", "demo"):
        assert command in result.stdout


def test_cli_grade_json_csv_and_exit_code(onnx_bundle, bad_files, tmp_path):
    good, bad = bad_files
    out_csv = tmp_path / "results.csv"
    result = _cli("grade", good, bad[1], "--bundle", onnx_bundle, "--json", "--csv", out_csv)
    assert result.returncode == 3, result.stderr               # one file failed
    records = json.loads(result.stdout)
    assert [r["error"] is None for r in records] == [True, False]
    assert out_csv.read_text().count("\n") == 3


def test_cli_error_is_one_line(tmp_path):
    result = _cli("grade", "x.jpg", "--bundle", tmp_path / "nope")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: bundle not found")
    assert "Traceback" not in result.stderr


def test_cli_refuses_a_malformed_manifest_section_in_one_line(onnx_bundle, bad_files, tmp_path):
    """A grading section without its thresholds is a bundle error at load, not a KeyError traceback."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(onnx_bundle, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    del manifest["grading"]["thresholds"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    result = _cli("grade", bad_files[0], "--bundle", broken)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: manifest section grading is missing 'thresholds'"


def test_records_carry_a_knn_vote(grader, phantom_test):
    record = grader.grade([read_labels(phantom_test)[0].path])[0]
    votes = {}
    for n in record.neighbors:
        votes[n["grade"]] = votes.get(n["grade"], 0.0) + max(n["similarity"], 0.0)
    assert record.knn_grade == max(votes, key=votes.get)
    assert record.lesions is None                          # this model has no lesion head


def test_lesion_presence_is_the_sigmoid_of_the_strongest_patch():
    from edgeretina.runtime.grader import lesion_presence

    logits = np.full((6, 4, 4), -6.0, np.float32)
    logits[2, 1, 3] = 3.0                                   # one patch with a hard exudate
    lesions = lesion_presence(logits)
    assert [entry["code"] for entry in lesions] == ["MA", "HE", "EX", "CWS", "NV", "PRH"]
    assert lesions[2]["probability"] == pytest.approx(1 / (1 + np.exp(-3.0)), abs=1e-4)
    assert all(entry["probability"] < 0.01 for i, entry in enumerate(lesions) if i != 2)


def test_grade_and_watch_render_a_record_the_same_way(grader, bad_files):
    from edgeretina.runtime.report import format_table, one_line, summary_cells

    good, bad = bad_files
    records = grader.grade([good, bad[0]])
    table = format_table(records).splitlines()
    assert table[0].split() == ["file", "result", "grade", "P(referable)"]
    for record, row in zip(records, table[1:]):
        cells = summary_cells(record.to_dict())
        assert all(cell.split()[0] in row for cell in cells if cell)       # the table shows the same cells
        assert one_line("cam/x.jpg", record.to_dict()).startswith(f"cam/x.jpg: {cells[0]}")
    assert summary_cells(records[1].to_dict())[0] == "error"


def test_a_picture_that_cannot_be_written_keeps_the_grade(grader, bad_files, tmp_path):
    from edgeretina.runtime.batch import grade_paths

    blocked = tmp_path / "overlays"
    blocked.write_text("a file where the overlay folder should be")
    records = grade_paths(grader, [bad_files[0]], overlays=blocked, cards=tmp_path / "cards")
    assert records[0].grade is not None and records[0].overlay is None
    assert records[0].error.startswith("graded, but the overlay could not be written")
    assert len(list((tmp_path / "cards").glob("*_card.png"))) == 1       # the card is still written


def test_when_both_pictures_fail_the_record_names_both_and_the_table_keeps_the_grade(grader, bad_files, tmp_path):
    from edgeretina.runtime.batch import grade_paths
    from edgeretina.runtime.report import one_line, summary_cells

    (tmp_path / "overlays").write_text("a file where the overlay folder should be")
    (tmp_path / "cards").write_text("a file where the card folder should be")
    record = grade_paths(grader, [bad_files[0]], overlays=tmp_path / "overlays", cards=tmp_path / "cards")[0]
    assert record.grade is not None and record.screening in ("negative", "referable")
    first, second = record.error.split("; ")
    assert first.startswith("graded, but the overlay could not be written: ")
    assert second.startswith("the report card could not be written: ")
    result, what, referable = summary_cells(record.to_dict())
    assert result == record.screening and referable == f"{record.referable_probability:.3f}"
    assert what == f"{record.grade} {record.grade_name} ({record.error})"
    assert one_line("cam/x.jpg", record.to_dict()).startswith(f"cam/x.jpg: {record.screening} {record.grade} ")
