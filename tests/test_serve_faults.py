"""The grading service as a process, under overload and under kill -9 (issue 15), at the size of a unit test.

A real `edgeretina serve` subprocess with the tiny bundle, driven by benchmarks/serve_load.py's clients and
audited by its store audit (the full-size runs are that script's; these are the same checks on a few hundred
requests): a queue of one under 8 busy clients answers only 200 or 503 (+ Retry-After), and a server killed
with SIGKILL in the middle of the load loses no answered result and leaves no half-written file.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_load.py"


def _serve_load():
    spec = importlib.util.spec_from_file_location("benchmarks_serve_load", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sl = _serve_load()


@pytest.fixture(scope="module")
def images(phantom_test) -> list[tuple[str, bytes]]:
    return sl.load_images(Path(phantom_test).parent / "images", 0, 0, Path("."))


def _settings(bundle, data: Path, **overrides):
    return sl.ServerSettings(bundle=Path(bundle), data=data, threads=1, **overrides)


def test_a_queue_too_small_answers_only_200_or_503_with_retry_after(onnx_bundle, images, tmp_path):
    settings = _settings(onnx_bundle, tmp_path / "data", queue_size=1, max_batch=1)
    with sl.ServerProcess(settings, tmp_path / "serve.log") as server:
        outcomes, _ = sl.run_load(server.url, images, sl.LoadPlan(clients=8, requests=320, max_seconds=40))
    summary = sl.summarize(outcomes, 1.0)
    assert set(summary["statuses"]) <= {"200", "503"}, (summary, server.log_tail())
    assert summary["statuses"].get("200", 0) >= 1 and summary["statuses"].get("503", 0) >= 1, summary
    refused = [o for o in outcomes if o.status == 503]
    assert all(o.retry_after is not None and int(o.retry_after) >= 1 for o in refused)
    audit = sl.audit_store(settings.data, sl._answered(outcomes))
    assert audit["store_opens"] and audit["rows"] == summary["statuses"]["200"]     # a 503 stores nothing
    assert audit["missing_rows"] == audit["missing_pictures"] == audit["bad_pngs"] == 0, audit
    assert audit["staging_leftovers"] == 0, audit                  # every request removed its upload


def test_kill_9_mid_load_loses_no_answered_result_and_no_file(onnx_bundle, images, tmp_path):
    settings = _settings(onnx_bundle, tmp_path / "data")
    plan = sl.LoadPlan(clients=8, requests=120, max_seconds=40)
    first = sl.ServerProcess(settings, tmp_path / "first.log").start()
    before, killed = sl.run_load(first.url, images, plan, kill_after=50, kill=first.kill)
    assert killed is not None and first.process.returncode == -9
    cut = [o for o in before if o.status is None]
    assert sum(o.status == 200 for o in before) >= 50 and cut, "the kill must land while requests are in flight"
    assert all(o.ended >= killed for o in cut), "a request failed before the kill"

    with sl.ServerProcess(settings, tmp_path / "second.log") as second:      # the same --data
        rest = sl.LoadPlan(clients=4, requests=20, max_seconds=40)
        after, _ = sl.run_load(second.url, images, rest, phase=1, first_index=len(before))
        assert [o.status for o in after] == [200] * len(after), second.log_tail()
        answered = sl._answered(before + after)
        served = sl.get_results(second.url, [o.result_id for o in answered])
        assert set(served.values()) == {200}, served
    audit = sl.audit_store(settings.data, answered)
    assert audit["store_opens"] and audit["integrity_check"] == "ok" and audit["journal_mode"] == "wal"
    assert audit["missing_rows"] == 0 and audit["missing_pictures"] == 0, audit
    assert audit["rows_naming_a_missing_file"] == 0 and audit["bad_pngs"] == 0, audit
    assert audit["pngs_checked"] >= len(answered) and audit["unexpected_files"] == 0, audit
    assert audit["temp_files_in_row_folders"] == 0, audit
    # the uploads the kill cut off are not left lying about: the restarted service removed them
    assert audit["staging_leftovers"] == 0, audit


def test_a_start_sweeps_the_uploads_of_dead_requests_and_keeps_a_live_siblings(onnx_bundle, tmp_path):
    """Two services on one data folder: the one starting removes a stage folder nobody holds (its process
    died) at once, and keeps the stage the other one's request holds."""
    from edgeretina.serve.config import ServeConfig
    from edgeretina.serve.service import GradingService

    config = ServeConfig(bundle=onnx_bundle, port=0, data=tmp_path / "data", threads=1)
    sibling = GradingService(config)
    live = sibling.new_stage()
    (live / "upload.jpg").write_bytes(b"a photo being graded")
    dead = config.staging / "abandoned"           # what a killed process leaves: nobody holds its lock
    dead.mkdir()
    (dead / "upload.jpg").write_bytes(b"a photo nobody will grade")
    starting = GradingService(config)
    starting.start()
    try:
        assert not dead.exists() and (live / "upload.jpg").is_file()
        sibling.remove_stage(live)
        assert list(config.staging.iterdir()) == []
    finally:
        starting.wait_loaded(60)
        starting.close()
        sibling.store.close()
