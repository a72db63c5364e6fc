"""The benchmark scripts end to end on tiny inputs: benchmarks/reference.py on the tiny preset (the real run
builds ViT-B-16 and ViT-S-16), knn.py on a small bank, runtime_costs.py on a small "huge" photo, fuzz_decode.py
on a few dozen damaged files per format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeretina.bundle import load_bundle

pytest.importorskip("openvino")
pytest.importorskip("nncf")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reference.py"


def _reference_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmarks_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--arch", "edgeretina-tiny-vit",
                           "--bank-size", "500", "--calibration-count", "8", "--reference-count", "4"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_reference_and_best_cpu_bundles_are_built_and_linked(reference_dir):
    reference = load_bundle(reference_dir / "reference-fp32")
    assert reference.manifest.artifact("model").precision == "fp32"
    assert (reference_dir / "best-cpu").resolve() == (reference_dir / "edgeretina-tiny-vit" / "best-cpu").resolve()
    best = load_bundle(reference_dir / "best-cpu")
    chosen = json.loads((reference_dir / "edgeretina-tiny-vit" / "best-cpu.json").read_text())["chosen_target"]
    assert best.manifest.artifact("model").precision == ("fp32" if chosen == "onnx" else "int8")
    assert (reference.manifest.bank["dtype"], reference.manifest.bank["k"], reference.manifest.bank["count"]) == ("int8", 10, 500)


def test_the_choice_is_the_fastest_faithful_candidate_and_is_recorded(reference_dir):
    FAITHFUL_COSINE = _reference_script().FAITHFUL_COSINE
    choice = json.loads((reference_dir / "edgeretina-tiny-vit" / "best-cpu.json").read_text())
    timed, cosines = choice["inference_ms_1_thread"], choice["min_embedding_cosine"]
    assert set(timed) == set(cosines) == {"cpu", "openvino", "onnx"} and all(ms > 0 for ms in timed.values())
    assert cosines["onnx"] >= FAITHFUL_COSINE                     # FP32 is always a faithful candidate
    faithful = [name for name in timed if cosines[name] >= FAITHFUL_COSINE]
    assert choice["chosen_target"] == min(faithful, key=timed.get)
    assert ("FP32 ships" in choice["note"]) == (choice["chosen_target"] == "onnx")
    folder = "reference-fp32" if choice["chosen_target"] == "onnx" else f"candidates/{choice['chosen_target']}"
    chosen = load_bundle(reference_dir / "edgeretina-tiny-vit" / folder)
    best = load_bundle(reference_dir / "best-cpu")
    assert best.manifest.artifact("model").sha256 == chosen.manifest.artifact("model").sha256
    assert json.loads((reference_dir / "choices.json").read_text())[0]["arch"] == "edgeretina-tiny-vit"


def test_random_bank_is_unit_norm(reference_dir):
    with np.load(reference_dir / "reference-fp32" / "bank.npz") as data:
        rows = data["embeddings"].astype(np.float32) * data["scales"][:, None] + data["offset"]
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=5e-3)


def test_knn_benchmark_times_both_scorers_and_they_agree(tmp_path):
    out = tmp_path / "knn.json"
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("knn.py")), str(out), "--count", "600", "--dim", "64",
                           "--runs", "20"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["median_ms"]) == {"onnxruntime-int8-prefilter", "numpy-float32"}
    assert all(isinstance(ms, float) and ms > 0 for ms in result["median_ms"].values())
    assert result["same_neighbours"] is True and result["bank_bytes_on_disk"] > 600 * 64
    assert result["machine"]["cpu"] and isinstance(result["exhaustive_fallbacks"], int)


def test_runtime_costs_benchmark_records_every_target(tmp_path, onnx_bundle):
    """benchmarks/runtime_costs.py (the timing and memory bounds unit tests no longer assert) on a small
    "huge" photo: it writes every measure, the machine and one row per target. Whether a target is met is
    the benchmark's business: nothing here depends on how fast this machine is."""
    out = tmp_path / "runtime_costs.json"
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("runtime_costs.py")), str(out), "--bundle",
                           str(onnx_bundle), "--runs", "2", "--rss-runs", "1", "--huge", "2400x1800"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["machine"]["cpu"] and result["machine"]["cpu_class"] and result["machine"]["cpu_flags"] is not None
    assert result["settings"]["huge"] == [2400, 1800] and result["settings"]["runs"] == 2
    m = result["measures"]
    assert set(m["header_refusal_ms"]) == {"12000x11000", "30000x30000"}
    timed = [*m["header_refusal_ms"].values(), m["decode_ms"], m["prepare_ms"], m["decode_prepare_ms"], m["quality_ms"]]
    assert all(isinstance(ms, float) and ms > 0 for ms in timed), m
    # the photo was really graded, from a 1/2-scale decode (2400 // 2 >= 1024 > 2400 // 4), and at full size
    assert m["huge_jpeg_decoded_shape"] == [900, 1200, 3] and m["huge_jpeg_full_decoded_shape"] == [1800, 2400, 3]
    assert 0 < m["huge_jpeg_peak_rss_mb"] == m["huge_jpeg_peak_rss_mb_runs"][0]
    assert m["huge_jpeg_full_decode_peak_rss_mb"] > 0
    rows = result["targets"]
    assert [r["measure"] for r in rows] == ["header_refusal_ms.12000x11000", "header_refusal_ms.30000x30000",
                                            "decode_prepare_ms", "quality_ms", "huge_jpeg_peak_rss_mb"]
    for row in rows:
        assert set(row) == {"measure", "value", "limit", "unit", "passed", "from"}
        assert row["passed"] == (row["value"] < row["limit"]) and row["from"].startswith("tests/")
    assert result["passed"] == all(r["passed"] for r in rows)
    assert (m["quality_ms"], m["huge_jpeg_peak_rss_mb"]) == (rows[3]["value"], rows[4]["value"])


def test_fuzz_benchmark_counts_every_case_and_sees_crashes_and_hangs(tmp_path):
    """benchmarks/fuzz_decode.py on 40 damaged files per format: every case lands in exactly one count, none is a
    crash, hang or unexpected exception, and its self-check shows that a worker killed by SIGSEGV and a case past
    the timeout are counted (and the run goes on) rather than ending it."""
    formats = ["jpeg", "png", "tiff"] + (["dicom"] if _has("pydicom") else [])
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("fuzz_decode.py")), "--out", str(tmp_path),
                           "--seconds-per-format", "60", "--max-cases", "40", "--workers", "2", "--self-check",
                           "--formats", ",".join(formats), "--check"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "fuzz_decode.json").read_text())
    assert result["machine"]["cpu"] and result["machine"]["cpu_class"] and result["machine"]["codecs"]["pillow"]
    assert result["self_check"]["passed"] and [f["kind"] for f in result["self_check"]["findings"]] == ["crash", "hang"]
    assert list(result["formats"]) == formats and result["settings"]["timeout_s"] == 10.0
    for fmt, counts in result["formats"].items():
        assert counts["cases"] == 40 == sum(counts[k] for k in ("graded", "refused", "crashes", "hangs", "unexpected",
                                                                "insane")), (fmt, counts)
        assert (counts["crashes"], counts["hangs"], counts["unexpected"], counts["insane"]) == (0, 0, 0, 0), counts
        assert counts["refused"] == sum(counts["refused_by_message"].values()) and counts["graded"] > 0, counts
        times = counts["seconds_per_case"]
        assert 0 < times["median"] <= times["p99"] <= times["max"] == counts["slowest_case"]["seconds"], times
        assert counts["peak_rss_mib"] >= counts["idle_worker_rss_mib"] > 0
    totals = result["totals"]
    assert totals["cases"] == 40 * len(formats) and totals["crashes"] == totals["hangs"] == 0
    assert not (tmp_path / ".scratch").exists() and not (tmp_path / "reproducers").exists()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_training_report_measures_calibration_and_the_feature_cache(tmp_path, tiny_checkpoint, phantom_train):
    """benchmarks/training_report.py on the session's tiny checkpoint: the 'after' numbers use the
    checkpoint's own calibration, the 'before' ones the plain CORAL rule, and cached and uncached heads-only
    training end with the same weights."""
    from edgeretina.training.checkpoint import load_checkpoint

    out = tmp_path / "training.json"
    done = subprocess.run([sys.executable, str(SCRIPT.with_name("training_report.py")), str(out),
                           "--checkpoint", str(tiny_checkpoint.checkpoint), "--data", f"phantom:{phantom_train.parent}",
                           "--cache-images", "30", "--cache-size", "64", "--cache-epochs", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    calibration = result["calibration"]
    assert calibration["grading"] == load_checkpoint(tiny_checkpoint.checkpoint).grading.to_dict()
    assert calibration["n"] == 60
    for side in ("before", "after"):
        assert set(calibration[side]) == {"qwk", "ece_ordinal", "ece_prototype", "referable_sensitivity",
                                          "referable_specificity"}
        assert 0.0 <= calibration[side]["ece_ordinal"] <= 1.0
    cache = result["feature_cache"]
    assert cache["images"] == 30 and cache["cached"]["train_seconds"] > 0 and cache["uncached"]["train_seconds"] > 0
    assert cache["max_weight_difference"] < 1e-4
    assert result["machine"]["cpu"] and result["cpu_class"]
