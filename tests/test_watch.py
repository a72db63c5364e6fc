"""The hot folder, for real: files arrive while the watcher runs, it restarts, it crashes mid-line."""

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from edgeretina.dataset import read_labels
from edgeretina.runtime import Grader
from edgeretina.runtime.watch import RESULTS_NAME, Watcher, WatchConfig, repair_torn_tail, watch

INTERVAL = 0.05


@pytest.fixture(scope="module")
def grader(onnx_bundle):
    return Grader(onnx_bundle, threads=1)


@pytest.fixture(scope="module")
def photos(phantom_test):
    return [Path(item.path) for item in read_labels(phantom_test)]


def _config(tmp_path, onnx_bundle, **overrides) -> WatchConfig:
    options = dict(folder=tmp_path / "camera", bundle=onnx_bundle, out=tmp_path / "out", interval=INTERVAL,
                   undecodable_grace_s=2.0)
    options.update(overrides)
    Path(options["folder"]).mkdir(exist_ok=True)
    return WatchConfig(**options)


def _records(config: WatchConfig) -> list[dict]:
    return [json.loads(line) for line in (config.out / RESULTS_NAME).read_text().splitlines()]


def _recorded_paths(config: WatchConfig) -> Counter:
    return Counter(r["source"]["path"] for r in _records(config))


def _image_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg")}


def _start(watcher: Watcher) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    return thread, stop


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the watcher"
        time.sleep(0.05)


def test_files_arriving_while_it_runs_are_graded_once_when_complete(tmp_path, onnx_bundle, grader, photos):
    config = _config(tmp_path, onnx_bundle)
    camera = config.folder
    watcher = Watcher(config, grader)
    thread, stop = _start(watcher)
    seen_while_stalled = {}

    def camera_writes():
        for photo in photos[:3]:
            shutil.copy(photo, camera / photo.name)
            time.sleep(0.1)
        (camera / "eye2").mkdir()
        shutil.copy(photos[3], camera / "eye2" / photos[3].name)
        data = photos[4].read_bytes()
        with open(camera / "slow.jpg", "wb") as fh:   # a camera that stalls half-way through a file
            fh.write(data[: len(data) // 2])
            fh.flush()
            time.sleep(0.6)                             # many polls see a stable, truncated file
            seen_while_stalled.update(watcher._undecodable_since)
            fh.write(data[len(data) // 2:])

    writer = threading.Thread(target=camera_writes)
    writer.start()
    writer.join()
    _wait_for(lambda: (config.out / RESULTS_NAME).exists() and len(_records(config)) >= 5)
    time.sleep(10 * INTERVAL)   # would a duplicate follow?
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    records = _records(config)
    assert _recorded_paths(config) == Counter(_image_files(camera))   # every file exactly once
    assert [key.path for key in seen_while_stalled] == ["slow.jpg"]   # tried, failed to decode, held back
    slow = next(r for r in records if r["source"]["path"] == "slow.jpg")
    assert slow["error"] is None and slow["source"]["bytes"] == len(photos[4].read_bytes())
    assert slow["screening"] in ("negative", "referable", "ungradable")
    for record in records:
        assert {"file", "grade", "probabilities", "neighbors", "graded_at", "source"} <= set(record)
        if record["screening"] != "ungradable":
            assert Path(record["overlay"]).is_file()
    assert len(list((config.out / "cards").glob("*.png"))) == len(records)


def test_restart_in_the_middle_grades_nothing_twice_and_misses_nothing(tmp_path, onnx_bundle, grader, photos):
    config = _config(tmp_path, onnx_bundle, overlays=False)
    for photo in photos[:6]:
        shutil.copy(photo, config.folder / photo.name)
    stop = threading.Event()
    seen = []

    def stop_after_three(record):
        seen.append(record)
        if len(seen) == 3:
            stop.set()

    first = Watcher(config, grader).run(stop, stop_after_three)
    assert first.graded == 3 and len(_records(config)) == 3
    for photo in photos[6:9]:   # more photos arrive while it is down
        shutil.copy(photo, config.folder / photo.name)
    second = watch(_config(tmp_path, onnx_bundle, overlays=False, once=True), threading.Event())
    assert second.graded == 6
    assert _recorded_paths(config) == Counter(_image_files(config.folder))
    third = watch(_config(tmp_path, onnx_bundle, overlays=False, once=True), threading.Event())
    assert third.graded == 0


def test_a_torn_last_line_is_repaired_and_that_image_graded_again(tmp_path, onnx_bundle, grader, photos):
    config = _config(tmp_path, onnx_bundle, overlays=False, once=True)
    for photo in photos[:2]:
        shutil.copy(photo, config.folder / photo.name)
    Watcher(config, grader).run(threading.Event())
    results = config.out / RESULTS_NAME
    data = results.read_bytes()
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    torn_path = json.loads(data[last_start:])["source"]["path"]
    results.write_bytes(data[: last_start + 40])   # the crash hit in the middle of the last record
    summary = Watcher(config, grader).run(threading.Event())
    assert summary.graded == 1 and summary.records[0]["source"]["path"] == torn_path
    assert results.read_bytes().endswith(b"\n")
    assert _recorded_paths(config) == Counter(_image_files(config.folder))


def test_repair_torn_tail_keeps_whole_lines(tmp_path):
    results = tmp_path / RESULTS_NAME
    results.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    assert repair_torn_tail(results) is True
    assert results.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    assert repair_torn_tail(results) is False
    results.write_bytes(b'{"c": ')
    repair_torn_tail(results)
    assert results.read_bytes() == b""


def test_a_bad_file_gets_one_error_record_and_the_watch_goes_on(tmp_path, onnx_bundle, grader, photos):
    config = _config(tmp_path, onnx_bundle, undecodable_grace_s=0.3)
    (config.folder / "notes.jpg").write_text("not a photograph\n")
    (config.folder / "empty.jpg").write_bytes(b"")
    shutil.copy(photos[0], config.folder / photos[0].name)
    thread, stop = _start(Watcher(config, grader))
    _wait_for(lambda: (config.out / RESULTS_NAME).exists() and len(_records(config)) >= 3)
    time.sleep(0.5)   # many more polls: the bad files must not be recorded again
    stop.set()
    thread.join(timeout=10)
    errors = {r["source"]["path"]: r["error"] for r in _records(config) if r["error"]}
    assert set(errors) == {"notes.jpg", "empty.jpg"}
    assert "not an image" in errors["notes.jpg"] and "empty" in errors["empty.jpg"]
    assert _recorded_paths(config) == Counter(_image_files(config.folder))
    again = Watcher(WatchConfig(**{**config.__dict__, "once": True}), grader).run(threading.Event())
    assert again.graded == 0


def test_cli_watch_stops_cleanly_on_sigterm(tmp_path, onnx_bundle, photos):
    camera, out = tmp_path / "camera", tmp_path / "out"
    camera.mkdir()
    shutil.copy(photos[0], camera / photos[0].name)
    command = [sys.executable, "-c", "from edgeretina.cli import main; main()", "watch", str(camera),
               "--bundle", str(onnx_bundle), "--out", str(out), "--interval", "0.05", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: (out / RESULTS_NAME).exists() and (out / RESULTS_NAME).read_text().count("\n") == 1)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "graded 1 image(s), 0 error(s)" in output
    assert (out / "cards").is_dir() and (out / "overlays").is_dir()


def test_a_second_watcher_on_the_same_out_is_refused(tmp_path, onnx_bundle, grader):
    from edgeretina.errors import ConfigError

    config = _config(tmp_path, onnx_bundle)
    thread, stop = _start(Watcher(config, grader))
    _wait_for(lambda: (config.out / ".watch.lock").exists())
    time.sleep(0.1)
    try:
        with pytest.raises(ConfigError, match="another watcher"):
            Watcher(WatchConfig(**{**config.__dict__, "once": True}), grader).run(threading.Event())
    finally:
        stop.set()
        thread.join(timeout=10)
