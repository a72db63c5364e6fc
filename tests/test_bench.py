"""edgeretina bench: real worker processes on the tiny bundle, few runs (the numbers are not the point
here; their shape, order and bookkeeping are)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from edgeretina.errors import ConfigError
from edgeretina.bench import BenchConfig, fidelity_vs_reference, format_table, run_bench, write_results

REQUIRED = ("bundle", "backend", "precision", "threads", "batch", "size_mb", "p50_ms", "p90_ms", "p99_ms",
            "throughput_ips", "peak_rss_mb", "speedup_vs_reference", "agreement", "cosine")


@pytest.fixture(scope="module")
def bench_result(onnx_bundle, phantom_test):
    config = BenchConfig(bundles=[Path(onnx_bundle)], reference=Path(onnx_bundle),
                         backends=["onnxruntime", "openvino", "tensorrt"], threads=[1, 2], batches=[1],
                         images=Path(phantom_test), runs=6, warmup=1, rounds=2)
    return run_bench(config)


def _measured(result):
    return [r for r in result.rows if "skipped" not in r]


def test_rows_have_the_required_keys_and_sane_values(bench_result):
    rows = _measured(bench_result)
    assert {(r["backend"], r["threads"]) for r in rows} == {(b, t) for b in ("onnxruntime", "openvino") for t in (1, 2)}
    for row in rows:
        assert set(REQUIRED) <= set(row), row
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["p50_with_overlay_ms"] > row["p50_ms"]               # the same calls plus rendering
        assert row["peak_rss_mb"] > 0 and row["size_mb"] > 0 and row["runs"] == 6
        assert row["load_s"] > 0 and row["cold_ms"] > 0
        # throughput = batch / mean latency: near batch / median for a stable run
        assert 0.3 < row["throughput_ips"] / (row["batch"] * 1000.0 / row["p50_ms"]) < 3.0
        assert {"decode", "quality", "preprocess", "inference", "postprocess", "knn", "overlay"} <= set(row["stages_ms"])
        assert 0.9 <= row["agreement"] <= 1.0 and row["cosine"] > 0.99
        assert row["scheme"] == "fp32" and row["knn_scorer"] == "onnxruntime-int8-prefilter"
        assert (row["compute_precision"] is None) == (row["backend"] == "onnxruntime")   # OpenVINO says what it ran in


def test_reference_ratios_are_one_for_the_reference_itself(bench_result):
    for row in _measured(bench_result):
        if row["backend"] == "onnxruntime":
            assert row["reference"] == f"{row['bundle']}/onnxruntime"
            assert row["speedup_vs_reference"] == 1.0
            assert row["agreement"] == 1.0 and row["qwk_proxy_delta"] == 0.0
            assert row["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_a_backend_that_cannot_run_is_a_skipped_row_with_the_reason(bench_result):
    skipped = [r for r in bench_result.rows if "skipped" in r]
    assert {r["backend"] for r in skipped} == {"tensorrt"}
    assert all("tensorrt-plan" in r["skipped"] for r in skipped)
    assert "skipped" in format_table(bench_result)


def test_json_and_png_are_written(bench_result, tmp_path):
    pytest.importorskip("matplotlib", reason="the plot is the optional `plot` extra")
    json_path, png_path = write_results(bench_result, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["rows"] == bench_result.rows
    assert data["machine"]["cores"] >= 1 and "numpy" in data["machine"]["libraries"]
    image = cv2.imread(str(png_path))
    assert image is not None and image.shape[2] == 3
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_a_worker_that_fails_becomes_a_skipped_row(onnx_bundle, phantom_test, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(onnx_bundle, broken)
    with open(broken / "model.onnx", "r+b") as fh:   # sha256 no longer matches: the worker's strict load fails
        fh.seek(100)
        fh.write(b"\0" * 16)
    config = BenchConfig(bundles=[broken], backends=["onnxruntime", "nosuch"], images=Path(phantom_test),
                         runs=1, warmup=0, rounds=1)
    rows = run_bench(config).rows
    assert len(rows) == 2 and all("skipped" in r for r in rows)
    assert "sha256" in rows[0]["skipped"] and "nosuch" in rows[1]["skipped"]


def test_fidelity_counts_only_images_both_graded():
    reference = {"files": ["a", "b", "c"], "grades": [0, 2, 4], "embeddings": [[1, 0], [0, 1], [1, 1]]}
    candidate = {"files": ["b", "c"], "grades": [2, 3], "embeddings": [[0, 2], [1, -1]]}
    fidelity = fidelity_vs_reference(reference, candidate)
    assert fidelity["agreement"] == 0.5 and fidelity["fidelity_images"] == 2
    assert fidelity["cosine"] == pytest.approx(0.5)
    assert 0.0 < fidelity["qwk_proxy_delta"] <= 2.0


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError):
        BenchConfig(bundles=[Path("x")], threads=[0])
    with pytest.raises(ConfigError):
        BenchConfig(bundles=[])


def test_cli_json_rows(onnx_bundle, phantom_test):
    exe = Path(sys.executable).with_name("edgeretina")
    result = subprocess.run([str(exe), "bench", str(onnx_bundle), "--backend", "onnxruntime", "--threads", "1",
                             "--images", str(phantom_test), "--runs", "2", "--warmup", "0", "--rounds", "1", "--json"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 1 and rows[0]["p50_ms"] > 0 and "speedup_vs_reference" not in rows[0]


def test_bench_modules_leave_torch_out():
    code = ("import sys, edgeretina.bench, edgeretina.bench.worker; "
            "heavy = [m for m in ('torch', 'onnx', 'open_clip') if m in sys.modules]; sys.exit(1 if heavy else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_an_images_folder_is_searched_with_its_subfolders(phantom_test, tmp_path):
    from edgeretina.bench.images import resolve_images

    from edgeretina.dataset import read_labels

    photos = [Path(item.path) for item in read_labels(phantom_test)]
    folder = tmp_path / "camera"
    (folder / "2024" / "left").mkdir(parents=True)
    shutil.copy(photos[0], folder / photos[0].name)
    shutil.copy(photos[1], folder / "2024" / "left" / photos[1].name)
    (folder / "2024" / "notes.txt").write_text("not a photo")
    found = resolve_images(folder, tmp_path, count=0, size=0)
    assert found == [folder / "2024" / "left" / photos[1].name, folder / photos[0].name]


def _hand_made_result():
    from edgeretina.bench import BenchResult

    row = {"bundle": "tiny", "path": "/b/tiny", "backend": "onnxruntime", "threads": 1, "batch": 1,
           "precision": "fp32", "scheme": "fp32", "compute_precision": None, "knn_scorer": "numpy-float32",
           "size_mb": 1.5, "load_s": 0.2, "cold_ms": 12.0, "p50_ms": 3.0, "p90_ms": 3.5, "p99_ms": 4.0,
           "p50_with_overlay_ms": 3.6, "runs": 6, "throughput_ips": 330.0, "peak_rss_mb": 120.0,
           "stages_ms": {"decode": 1.0, "inference": 1.5}}
    skipped = {"bundle": "tiny", "path": "/b/tiny", "backend": "tensorrt", "threads": 1, "batch": 1,
               "skipped": "backend tensorrt cannot run this bundle [it runs tensorrt-plan]"}
    machine = {"cpu": "Test CPU", "cores": 2, "cpu_flags": ["avx2"], "libraries": {"numpy": "2.0"}}
    return BenchResult(rows=[row, skipped], machine=machine, config={})


def test_the_table_is_one_line_per_row_with_every_column():
    lines = format_table(_hand_made_result()).splitlines()
    header = next(line for line in lines if "p50 ms" in line)
    assert all(title in header for title in ("bundle", "prec", "MB", "p99 ms", "img/s", "RSS MB", "1-QWK", "cosine"))
    row = next(line for line in lines if line.lstrip().startswith("tiny "))
    assert "3.00" in row and "330.0" in row and row.rstrip().endswith("-")     # no reference: fidelity columns "-"
    assert any("tiny/onnxruntime t1 b1" in line and "numpy-float32" in line for line in lines)   # stage medians
    assert "skipped tiny/tensorrt t1 b1: backend tensorrt cannot run this bundle [it runs tensorrt-plan]" in lines
    assert lines[-1].startswith("machine: Test CPU, 2 cores, flags avx2")


def test_without_matplotlib_the_plot_is_skipped_and_bench_json_still_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    said = []
    json_path, png_path = write_results(_hand_made_result(), tmp_path / "out", log=said.append)
    assert png_path is None and not (tmp_path / "out" / "bench.png").exists()
    assert json.loads(json_path.read_text())["rows"][0]["p50_ms"] == 3.0
    assert said == ["plot skipped: matplotlib is not installed (needed for the latency vs fidelity plot): "
                    "pip install 'edgeretina[plot]'"]


def test_the_worker_fidelity_is_the_graders_own_pipeline(onnx_bundle, phantom_test):
    import numpy as np

    from edgeretina.dataset import read_labels
    from edgeretina.runtime import Grader

    paths = [str(item.path) for item in read_labels(phantom_test)]
    grader = Grader(onnx_bundle, threads=1)
    files, grades, embeddings = grader.grades_and_embeddings(paths + ["/no/such/photo.jpg"], batch_size=3)
    records = [r for r in grader.grade(paths) if r.gradable]
    assert files == [r.file for r in records] and grades == [r.grade for r in records]
    assert embeddings.dtype == np.float32 and embeddings.shape[0] == len(files)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-3)
