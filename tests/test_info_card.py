"""`edgeretina info` (summary + full verification) and the per-image report card."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeretina.dataset import read_labels
from edgeretina.runtime import Grader
from edgeretina.runtime.batch import grade_paths
from edgeretina.runtime.card import HEIGHT, WIDTH, heading, quality_lines, render_card, write_card_png
from edgeretina.runtime.info import format_info, inspect_bundle

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from edgeretina.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


def test_watch_info_and_card_leave_torch_out():
    code = ("import sys, edgeretina.runtime.watch, edgeretina.runtime.info, edgeretina.runtime.card; "
            "heavy = [m for m in ('torch', 'onnx', 'open_clip') if m in sys.modules]; sys.exit(1 if heavy else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_info_summarises_and_verifies_a_bundle(onnx_bundle):
    info = inspect_bundle(onnx_bundle)
    assert info.verified and all(a.sha256_ok for a in info.artifacts)
    assert info.backends["onnxruntime"] == "runs it"
    text = format_info(info)
    for expected in ("edgeretina-tiny-vit", "input 64 px", "ordinal_logits [B, 4]", "temperature",
                     "P(grade >= 2)", "✓ model.onnx", "fp32", "target onnx", "✓ gate", "verified   ✓"):
        assert expected in text, expected
    result = _cli("info", str(onnx_bundle), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["verified"] is True and data["bank"]["count"] > 0
    assert {a["file"] for a in data["artifacts"]} >= {"model.onnx", "bank.npz"}


def test_info_exits_1_on_a_tampered_bundle(onnx_bundle, tmp_path):
    tampered = Path(shutil.copytree(onnx_bundle, tmp_path / "tampered"))
    bank = tampered / "bank.npz"
    data = bytearray(bank.read_bytes())
    data[-10] ^= 0xFF                       # same size, different content: only the sha256 can tell
    bank.write_bytes(bytes(data))
    info = inspect_bundle(tampered)
    assert not info.verified and "bank.npz sha256 mismatch" in info.problems[0]
    result = _cli("info", str(tampered))
    assert result.returncode == 1
    assert "✗ bank.npz" in result.stdout and "sha256 mismatch" in result.stderr


def test_info_and_load_report_an_artifact_problem_in_the_same_words(onnx_bundle, tmp_path):
    """One owner of the artifact checks (bundle.artifact_problem): a Windows-style escape is caught by both."""
    from edgeretina.bundle import load_bundle
    from edgeretina.errors import BundleError

    bundle = Path(shutil.copytree(onnx_bundle, tmp_path / "escape"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artifacts"].append({**manifest["artifacts"][0], "file": "sub\\..\\..\\outside.onnx", "role": "extra"})
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    info = inspect_bundle(bundle)
    assert info.problems == ["artifact name 'sub\\\\..\\\\..\\\\outside.onnx' points outside the bundle"]
    with pytest.raises(BundleError) as raised:
        load_bundle(bundle)
    assert info.problems[0] in str(raised.value)


def test_info_says_a_plan_needs_tensorrt_installed(onnx_bundle, tmp_path):
    import importlib.util

    bundle = Path(shutil.copytree(onnx_bundle, tmp_path / "with-plan"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artifacts"].append({**manifest["artifacts"][0], "file": "model.plan", "format": "tensorrt-plan"})
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    backends = inspect_bundle(bundle).backends
    assert backends["onnxruntime"] == "runs it"
    assert backends["tensorrt"] == ("runs it" if importlib.util.find_spec("tensorrt") else "not installed")


def test_info_refuses_an_unknown_schema(onnx_bundle, tmp_path):
    bundle = Path(shutil.copytree(onnx_bundle, tmp_path / "future"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = _cli("info", str(bundle))
    assert result.returncode == 1 and "schema_version" in result.stderr


@pytest.fixture(scope="module")
def graded_pair(onnx_bundle, phantom_test, tmp_path_factory):
    """One gradable phantom photo and one too dark to grade."""
    photo = read_labels(phantom_test)[0].path
    dark = tmp_path_factory.mktemp("dark") / "dark.jpg"
    cv2.imwrite(str(dark), (cv2.imread(str(photo)) * 0.05).astype(np.uint8))
    graded = list(Grader(onnx_bundle, threads=1).grade_iter([photo, dark]))
    assert graded[0].record.gradable and graded[1].record.gradable is False
    return graded


def _read_png(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = cv2.imread(str(path))
    assert image is not None
    return image


def test_cards_for_a_gradable_and_an_ungradable_photo(graded_pair, tmp_path):
    gradable, ungradable = graded_pair
    thumbnails = {gradable.record.neighbors[0]["case_id"]: gradable.image}
    for name, graded in (("gradable", gradable), ("ungradable", ungradable)):
        card = _read_png(write_card_png(tmp_path / f"{name}.png", graded, thumbnails))
        assert card.shape == (HEIGHT, WIDTH, 3)
        assert 600 <= WIDTH <= 2000 and 300 <= HEIGHT <= 1200
        assert card.std() > 20                     # something was drawn, not a blank canvas
    # The two cards differ where the overlay goes: a heat map for one, a grey "not graded" tile for the other.
    assert not np.array_equal(render_card(gradable)[60:360, 360:660], render_card(ungradable)[60:360, 360:660])


def test_card_says_the_score_and_what_failed_not_every_measure(graded_pair):
    gradable, ungradable = graded_pair
    quality = gradable.record.quality
    assert quality_lines(quality) == [f"gradability score {quality['score']:.2f}, limited by {quality['limited_by']}"]
    quality = ungradable.record.quality
    lines = quality_lines(quality)
    assert quality["triggers"] and len(lines) == 1 + len(quality["triggers"])
    assert lines[0].startswith(f"gradability score {quality['score']:.2f}")
    for line, trigger in zip(lines[1:], quality["triggers"]):
        assert line == f"{trigger['measure']} = {trigger['value']:.3g}   fails {trigger['rule']}"
    assert [t["reason"] for t in quality["triggers"]] == ["no_field_of_view", "too_dark"]   # a 5 % exposure
    assert quality_lines(None) == []


def test_card_heading_names_the_dicom_frame_and_eye(onnx_bundle, phantom_test, tmp_path):
    fx = pytest.importorskip("_dicom_fixtures")
    photos = [cv2.imread(str(item.path))[..., ::-1] for item in read_labels(phantom_test)[:3]]
    stereo = fx.save(fx.per_frame_laterality(fx.image_dataset(photos), ["R", "L", "R"]), tmp_path / "stereo.dcm")
    single = fx.save(fx.image_dataset(photos[:1]), tmp_path / "single.dcm")
    records = grade_paths(Grader(onnx_bundle, threads=1), [stereo, single, read_labels(phantom_test)[0].path],
                          cards=tmp_path / "cards")
    assert [heading(r) for r in records] == [
        "stereo.dcm  (frame 1/3, right eye)", "stereo.dcm  (frame 2/3, left eye)", "stereo.dcm  (frame 3/3, right eye)",
        "single.dcm  (eye not recorded)", Path(read_labels(phantom_test)[0].path).name]
    assert len(list((tmp_path / "cards").glob("*.png"))) == 5


def test_a_card_for_a_file_that_failed_to_decode(onnx_bundle, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a photograph")
    graded = next(Grader(onnx_bundle, threads=1).grade_iter([broken]))
    card = render_card(graded)
    assert card.shape == (HEIGHT, WIDTH, 3) and card.dtype == np.uint8


def test_grade_writes_cards_beside_overlays(onnx_bundle, phantom_test, tmp_path):
    photos = [item.path for item in read_labels(phantom_test)[:3]]
    records = grade_paths(Grader(onnx_bundle, threads=1), photos, overlays=tmp_path / "overlays",
                          cards=tmp_path / "cards")
    assert all(r.error is None for r in records)
    cards = sorted((tmp_path / "cards").glob("*_card.png"))
    assert len(cards) == 3
    for card in cards:
        _read_png(card)
    # beside them, one overlay per photo, named like its card and drawn on the original photograph
    overlays = sorted((tmp_path / "overlays").glob("*_saliency.png"))
    assert [o.name.replace("_saliency", "_card") for o in overlays] == [c.name for c in cards]
    assert [r.overlay for r in records] == [str(o) for o in overlays]
    for overlay, photo in zip(overlays, photos):
        assert _read_png(overlay).shape[:2] == cv2.imread(str(photo)).shape[:2]
