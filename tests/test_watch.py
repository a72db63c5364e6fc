"""The hot folder, for real: files arrive while the watcher runs, it restarts, it crashes mid-line."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
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


class CountingWatcher(Watcher):
    """The real watcher, counting its polls: "would a duplicate follow?" waits for polls, not seconds."""

    polls = 0

    def poll(self, done):
        ready = super().poll(done)
        self.polls += 1
        return ready


def _wait_for_more_polls(watcher: CountingWatcher, n: int = 3) -> None:
    """n more polls: every file ready at the first of them has been through a whole poll-and-grade cycle
    since (a file graded twice would have been recorded again by then), however slow the machine."""
    start = watcher.polls
    _wait_for(lambda: watcher.polls >= start + n)


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
    # grace far beyond any stall this test makes: the half-written file can only be held back, never recorded
    config = _config(tmp_path, onnx_bundle, undecodable_grace_s=600.0)
    camera = config.folder
    watcher = CountingWatcher(config, grader)
    thread, stop = _start(watcher)
    for photo in photos[:3]:
        shutil.copy(photo, camera / photo.name)
        time.sleep(0.1)                                 # the camera's pace; nothing is asserted on it
    (camera / "eye2").mkdir()
    shutil.copy(photos[3], camera / "eye2" / photos[3].name)
    data = photos[4].read_bytes()
    with open(camera / "slow.jpg", "wb") as fh:       # a camera that stalls half-way through a file
        fh.write(data[: len(data) // 2])
        fh.flush()
        # the stall lasts until the watcher has seen the truncated file stable, tried it and held it back
        _wait_for(lambda: any(key.path == "slow.jpg" for key in dict(watcher._undecodable_since)))
        seen_while_stalled = dict(watcher._undecodable_since)
        fh.write(data[len(data) // 2:])
    _wait_for(lambda: (config.out / RESULTS_NAME).exists() and len(_records(config)) >= 5)
    _wait_for_more_polls(watcher)   # would a duplicate follow?
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    records = _records(config)
    assert _recorded_paths(config) == Counter(_image_files(camera))   # every file exactly once
    assert [key.path for key in seen_while_stalled] == ["slow.jpg"]   # tried, failed to decode, held back
    assert all(key.bytes == len(data) // 2 for key in seen_while_stalled)
    slow = next(r for r in records if r["source"]["path"] == "slow.jpg")
    assert slow["error"] is None and slow["source"]["bytes"] == len(data)
    direct = grader.grade([camera / "slow.jpg"])[0]                  # the whole photo, graded directly
    assert direct.error is None
    assert (slow["screening"], slow["grade"]) == (direct.screening, direct.grade)
    assert slow["probabilities"] == pytest.approx(direct.probabilities, abs=1e-6)
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
    watcher = CountingWatcher(config, grader)
    thread, stop = _start(watcher)
    _wait_for(lambda: (config.out / RESULTS_NAME).exists() and len(_records(config)) >= 3)
    # The bad files must not be recorded again. Were they retried, the retry would start on the next poll,
    # be held back for the grace period (the watcher's clock), then be recorded on a later poll: wait for
    # each of those in turn, so a slow machine delays the check instead of passing it early.
    _wait_for_more_polls(watcher, 2)
    time.sleep(config.undecodable_grace_s)
    _wait_for_more_polls(watcher)
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
    # results.jsonl is opened only once the lock is held (the lock file itself exists a moment earlier)
    _wait_for(lambda: (config.out / RESULTS_NAME).exists())
    try:
        with pytest.raises(ConfigError, match="another watcher"):
            Watcher(WatchConfig(**{**config.__dict__, "once": True}), grader).run(threading.Event())
    finally:
        stop.set()
        thread.join(timeout=10)


# --- configuration and the folder ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("interval", 0, "interval must be a positive, finite number of seconds, got 0"),
    ("interval", -1.0, "interval must be a positive, finite number of seconds, got -1.0"),
    ("interval", float("nan"), "interval must be a positive, finite number of seconds, got nan"),
    ("interval", float("inf"), "interval must be a positive, finite number of seconds, got inf"),
    ("interval", "1", "interval must be a positive, finite number of seconds, got '1'"),
    ("undecodable_grace_s", -0.5, "undecodable_grace_s must be a number of seconds >= 0, got -0.5"),
    ("undecodable_grace_s", float("nan"), "undecodable_grace_s must be a number of seconds >= 0, got nan"),
    ("batch_size", 0, "batch_size must be an integer >= 1, got 0"),
    ("batch_size", 2.0, "batch_size must be an integer >= 1, got 2.0"),
    ("batch_size", True, "batch_size must be an integer >= 1, got True"),
    ("verify", "sometimes", "verify must be one of cached, always, off, not 'sometimes'"),
])
def test_each_invalid_setting_is_refused_with_its_own_message(tmp_path, field, value, message):
    from edgeretina.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        WatchConfig(folder=tmp_path, bundle=tmp_path / "bundle", out=tmp_path / "out", **{field: value})
    assert str(refused.value) == message
    assert not (tmp_path / "out").exists()


def test_the_edges_of_the_valid_settings_are_accepted(tmp_path):
    config = WatchConfig(folder=tmp_path, bundle=tmp_path / "b", out=tmp_path / "o", interval=1e-3,
                         undecodable_grace_s=0, batch_size=1, verify="off")
    assert (config.interval, config.undecodable_grace_s, config.batch_size) == (1e-3, 0, 1)
    assert WatchConfig(folder=tmp_path, bundle=tmp_path / "b", out=tmp_path / "o",
                       undecodable_grace_s=float("inf")).undecodable_grace_s == float("inf")   # wait forever


def test_a_missing_watch_folder_is_refused_before_anything_is_loaded_or_written(tmp_path):
    from edgeretina.errors import ConfigError

    not_a_folder = tmp_path / "camera.jpg"
    not_a_folder.write_bytes(b"a file, not a folder")
    for folder in (tmp_path / "unmounted-sd-card", not_a_folder):
        # the bundle does not exist either: the folder is checked first, and OUT is not created
        config = WatchConfig(folder=folder, bundle=tmp_path / "no-bundle", out=tmp_path / "out", once=True)
        with pytest.raises(ConfigError, match=rf"^watch folder not found: {folder}$"):
            watch(config, threading.Event())
        assert not (tmp_path / "out").exists()


# --- what is and is not a photograph ------------------------------------------------------------------------------

def test_hidden_temporary_and_own_output_files_are_never_graded(tmp_path, onnx_bundle, grader, photos):
    """Dot files and folders (rsync's .name.XXXX, macOS ._name, sync tools' .folders), partial-download
    suffixes, and OUT itself inside the hot folder (its overlays and cards are PNGs) are not photographs."""
    camera = tmp_path / "camera"
    config = _config(tmp_path, onnx_bundle, out=camera / "results", once=True)
    shutil.copy(photos[0], camera / "IMG_0001.jpg")
    shutil.copy(photos[1], camera / "IMG_0006.JPG")                      # upper-case suffix: a photograph
    shutil.copy(photos[2], camera / ".IMG_0002.jpg.Xa3f9")               # rsync's temporary name
    shutil.copy(photos[2], camera / ".IMG_0002.jpg")                     # a hidden file, a real photo inside
    (camera / "._IMG_0001.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")   # macOS resource fork
    (camera / ".sync").mkdir()
    shutil.copy(photos[3], camera / ".sync" / "IMG_0003.jpg")            # a hidden folder
    shutil.copy(photos[4], camera / "IMG_0004.jpg.tmp")                  # a camera's file while it writes
    shutil.copy(photos[5], camera / "IMG_0005.jpg.part")
    (camera / "notes.txt").write_text("not a photograph")
    first = Watcher(config, grader).run(threading.Event())
    assert sorted(r["source"]["path"] for r in first.records) == ["IMG_0001.jpg", "IMG_0006.JPG"]
    assert first.errors == 0
    assert len(list((camera / "results" / "overlays").glob("*.png"))) == 2   # PNGs now inside the hot folder
    again = Watcher(config, grader).run(threading.Event())
    assert again.graded == 0 and _recorded_paths(config) == Counter(["IMG_0001.jpg", "IMG_0006.JPG"])


# --- a file rewritten after it was graded -------------------------------------------------------------------------

def _overlay_of(grader: Grader, photo: Path) -> np.ndarray:
    """The overlay the grader's own pipeline draws for a photograph (RGB)."""
    from edgeretina.runtime.overlay import render_overlay

    graded = next(grader.grade_iter([photo], batch_size=1))
    return render_overlay(graded.image, graded.saliency, graded.geometry)


def test_a_file_rewritten_after_grading_is_graded_again_and_both_versions_kept(tmp_path, onnx_bundle, grader,
                                                                               photos):
    """The camera saves a retake under the same name. The new content is a new photograph: it is graded
    and recorded; the first record stays, and each record's overlay shows the photograph it graded."""
    config = _config(tmp_path, onnx_bundle)
    target = config.folder / "IMG_0001.jpg"
    first_photo, retake = photos[0], photos[1]
    assert first_photo.read_bytes() != retake.read_bytes()
    shutil.copy(first_photo, target)
    watcher = CountingWatcher(config, grader)
    thread, stop = _start(watcher)
    try:
        _wait_for(lambda: (config.out / RESULTS_NAME).exists() and len(_records(config)) == 1)
        before = target.stat()
        tmp = config.folder / ".IMG_0001.jpg.tmp"                       # the camera writes aside, then renames
        shutil.copy(retake, tmp)
        os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))   # a clock step later
        os.replace(tmp, target)
        _wait_for(lambda: len(_records(config)) >= 2)
        _wait_for_more_polls(watcher)   # and no third record follows
    finally:
        stop.set()
        thread.join(timeout=10)
    first, second = _records(config)
    assert [r["source"]["path"] for r in (first, second)] == ["IMG_0001.jpg", "IMG_0001.jpg"]
    assert first["source"]["bytes"] == len(first_photo.read_bytes())
    assert second["source"]["bytes"] == len(retake.read_bytes())
    assert second["source"]["mtime_ns"] == before.st_mtime_ns + 1_000_000_000
    for record, photo in ((first, first_photo), (second, retake)):
        direct = grader.grade([photo])[0]
        assert record["error"] is None and record["grade"] == direct.grade
        assert record["probabilities"] == pytest.approx(direct.probabilities, abs=1e-6)
    assert Path(first["overlay"]).name == "IMG_0001_saliency.png"
    assert Path(second["overlay"]).name == f"IMG_0001@{second['source']['mtime_ns']}_saliency.png"
    for record, photo, other in ((first, first_photo, retake), (second, retake, first_photo)):
        written = cv2.imread(record["overlay"])[..., ::-1].astype(np.int16)
        assert np.abs(written - _overlay_of(grader, photo)).max() <= 1             # its own photograph
        assert np.abs(written - _overlay_of(grader, other)).mean() > 5             # not the other one
    assert len(list((config.out / "cards").glob("IMG_0001*_card.png"))) == 2
    restart = Watcher(WatchConfig(**{**config.__dict__, "once": True}), grader).run(threading.Event())
    assert restart.graded == 0


# --- pictures that cannot be written ------------------------------------------------------------------------------

@pytest.mark.parametrize("blocked", ["overlay", "report card"])
def test_a_picture_that_cannot_be_written_still_gets_the_record_with_the_failure(tmp_path, onnx_bundle, grader,
                                                                                 photos, blocked):
    """A directory where the overlay file should go, or a file where the cards folder should go (what a
    read-only or full OUT does to one write, and what works as root too): the grade is recorded anyway,
    with the missing picture named in `error`; the other picture is still written."""
    config = _config(tmp_path, onnx_bundle, once=True)
    shutil.copy(photos[0], config.folder / "IMG_0001.jpg")
    if blocked == "overlay":
        (config.out / "overlays" / "IMG_0001_saliency.png").mkdir(parents=True)
    else:
        config.out.mkdir()
        (config.out / "cards").write_text("a file where the cards folder should be")
    summary = Watcher(config, grader).run(threading.Event())
    [record] = _records(config)                                             # on disk, not only in memory
    direct = grader.grade([config.folder / "IMG_0001.jpg"])[0]
    assert record["grade"] == direct.grade and record["screening"] == direct.screening
    assert record["probabilities"] == pytest.approx(direct.probabilities, abs=1e-6)
    assert record["error"].startswith(f"graded, but the {blocked} could not be written: ")
    assert summary.graded == 1 and summary.errors == 1 and summary.records[0]["error"] == record["error"]
    if blocked == "overlay":
        assert record["overlay"] is None
        assert len(list((config.out / "cards").glob("*_card.png"))) == 1
    else:
        assert Path(record["overlay"]).is_file()
    again = Watcher(config, grader).run(threading.Event())
    assert again.graded == 0                                              # recorded means done: no retry loop


# --- the results file: a short append, foreign lines ---------------------------------------------------------------

FOREIGN = (b"# results of the morning clinic, exported by the PACS bridge\n"
           + b'{"note": "' + b"x" * 60_000 + b'"}\n')                       # ~60 kB: room for the lock and cache


def test_a_short_append_stops_the_watcher_and_the_restart_records_every_image_once(tmp_path, onnx_bundle, grader,
                                                                                   photos):
    """A real short write: the watcher runs under a file-size limit (RLIMIT_FSIZE) that lets only 100
    bytes of its first record reach results.jsonl, as a full disk would. It must stop with an error
    saying so; the restart cuts the fragment off, and every image ends up recorded exactly once."""
    import resource

    camera, out = tmp_path / "camera", tmp_path / "out"
    camera.mkdir()
    out.mkdir()
    for photo in photos[:2]:
        shutil.copy(photo, camera / photo.name)
    results = out / RESULTS_NAME
    results.write_bytes(FOREIGN)
    limit = len(FOREIGN) + 100

    def limit_file_size():   # in the child only; Python ignores SIGXFSZ, so the write comes back short
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    command = [sys.executable, "-c", "from edgeretina.cli import main; main()", "watch", str(camera),
               "--bundle", str(onnx_bundle), "--out", str(out), "--once", "--no-overlays", "--threads", "1"]
    crashed = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit_file_size, timeout=120,
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONWARNINGS": "ignore"})
    assert crashed.returncode == 1, crashed.stdout + crashed.stderr
    last_line = crashed.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: results could not be appended \(100 of \d+ bytes written\)", last_line), crashed.stderr
    data = results.read_bytes()
    assert len(data) == limit and data.startswith(FOREIGN) and data[len(FOREIGN):].startswith(b'{"file":')
    assert "graded" not in crashed.stdout                                  # nothing was reported as recorded

    config = WatchConfig(folder=camera, bundle=onnx_bundle, out=out, interval=INTERVAL, once=True, overlays=False)
    restart = Watcher(config, grader).run(threading.Event())
    assert restart.graded == 2 and restart.errors == 0
    data = results.read_bytes()
    assert data.startswith(FOREIGN) and data.endswith(b"\n")               # the fragment cut, the rest kept
    records = [json.loads(line) for line in data[len(FOREIGN):].splitlines()]
    assert Counter(r["source"]["path"] for r in records) == Counter(_image_files(camera))   # each exactly once
    assert Watcher(config, grader).run(threading.Event()).graded == 0


def test_foreign_lines_in_the_results_file_are_skipped_and_kept(tmp_path, onnx_bundle, grader, photos):
    """Other tools' lines in results.jsonl: not UTF-8, not JSON, JSON that is not an object, objects that
    are not our records, and records whose source has the wrong types. None stops the watcher, none
    counts as an image done, and all are kept as they were."""
    config = _config(tmp_path, onnx_bundle, once=True, overlays=False)
    for name, photo in (("a.jpg", photos[0]), ("b.jpg", photos[1]), ("c.jpg", photos[2])):
        shutil.copy(photo, config.folder / name)
    Watcher(config, grader).run(threading.Event())
    ours = {r["source"]["path"]: r for r in _records(config)}
    b, c = ours["b.jpg"]["source"], ours["c.jpg"]["source"]
    foreign = [
        b"\xff\xfe\x00binary junk from a crashed copy tool",
        b"plain text: operator changed shift",
        b"",
        b"[1, 2, 3]",
        b"null",
        b'"just a string"',
        b'{"note": "not a record"}',
        b'{"source": "b.jpg"}',
        b'{"source": {"path": "b.jpg"}}',
        json.dumps({"source": {**b, "bytes": str(b["bytes"])}}).encode(),        # the right number, as text
        json.dumps({"source": {**b, "mtime_ns": True}}).encode(),
        b'{"source": {"path": "b.jpg", "bytes": 1e400, "mtime_ns": 1}}',          # overflows int()
        json.dumps({"source": {**c, "path": ["c.jpg"]}}).encode(),
    ]
    a_line = next(line for line in (config.out / RESULTS_NAME).read_bytes().splitlines()
                  if json.loads(line)["source"]["path"] == "a.jpg")
    original = b"\n".join(foreign[:6] + [a_line] + foreign[6:]) + b"\n"       # only a.jpg's record is ours
    (config.out / RESULTS_NAME).write_bytes(original)
    summary = Watcher(config, grader).run(threading.Event())
    assert sorted(r["source"]["path"] for r in summary.records) == ["b.jpg", "c.jpg"]
    assert (config.out / RESULTS_NAME).read_bytes().startswith(original)      # every foreign line kept, in place
    assert Watcher(config, grader).run(threading.Event()).graded == 0
