"""The results store for real: SQLite on disk, pictures beside it, reopened, damaged, shared with `watch`."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeretina.errors import ConfigError, StoreError
from edgeretina.runtime.store import DB_NAME, ResultStore, canonical_time

PNG = b"\x89PNG\r\n\x1a\n"


def _record(screening="negative", grade=0, **extra) -> dict:
    record = {"file": "eye.jpg", "screening": screening, "grade": grade, "probabilities": [0.9, 0.1, 0, 0, 0],
              "error": None}
    record.update(extra)
    return record


def _png(path: Path, value: int = 128) -> Path:
    ok, data = cv2.imencode(".png", np.full((8, 8, 3), value, np.uint8))
    path.write_bytes(data.tobytes())
    return path


@pytest.fixture
def store(tmp_path):
    with ResultStore(tmp_path / "data") as opened:
        yield opened


def test_a_result_and_its_pictures_are_stored_and_read_back(store, tmp_path):
    overlay, card = _png(tmp_path / "o.png", 10), _png(tmp_path / "c.png", 20)
    added = store.add(_record("referable", 3, probabilities=[0.0, 0.1, 0.2, 0.6, 0.1]), origin="serve",
                      file_name="../patient 7.jpg", bundle_sha256="ab" * 32,
                      pictures={"overlay": overlay, "card": card})
    got = store.get(added.id)
    assert got == added
    assert len(got.id) == 32 and int(got.id, 16) >= 0
    assert (got.origin, got.file_name, got.screening, got.grade, got.bundle_sha256) == \
           ("serve", "../patient 7.jpg", "referable", 3, "ab" * 32)
    assert got.record["probabilities"] == [0.0, 0.1, 0.2, 0.6, 0.1]
    # copies under files/<id>/, named by kind: nothing of the client's name reaches the disk
    assert got.pictures == {"overlay": f"files/{got.id}/overlay.png", "card": f"files/{got.id}/card.png"}
    assert store.picture_path(got.id, "overlay").read_bytes() == overlay.read_bytes()
    assert store.picture_path(got.id, "card").read_bytes() == card.read_bytes()
    assert sorted(p.name for p in (store.root / "files" / got.id).iterdir()) == ["card.png", "overlay.png"]
    assert not list(store.root.rglob("patient*"))
    assert store.get("0" * 32) is None and store.get("../../etc/passwd") is None
    assert store.picture_path(got.id, "counterfactual") is None


def test_opening_sweeps_old_picture_folders_without_a_row_and_keeps_young_ones(tmp_path):
    import os

    with ResultStore(tmp_path / "data") as store:
        kept = store.add(_record(), origin="serve", file_name="a.jpg", pictures={"card": _png(tmp_path / "c.png")})
    files = tmp_path / "data" / "files"
    old_orphan, young_orphan, stranger = files / ("a" * 32), files / ("b" * 32), files / "not-an-id"
    for folder in (old_orphan, young_orphan, stranger):
        folder.mkdir()
        _png(folder / "card.png")
    two_hours_ago = time.time() - 7200
    for folder in (old_orphan, stranger, files / kept.id):
        os.utime(folder, (two_hours_ago, two_hours_ago))
    with ResultStore(tmp_path / "data") as reopened:
        assert reopened.swept == 1
        assert not old_orphan.exists()                                  # a crash's leftovers, an hour gone
        assert young_orphan.is_dir() and stranger.is_dir()              # may be about to commit; not ours
        assert reopened.picture_path(kept.id, "card").is_file()         # a row names it: never swept


def test_history_is_newest_first_and_filters_by_time_screening_and_limit(store):
    added = []
    for screening, grade in [("negative", 0), ("referable", 2), ("ungradable", None), ("negative", 1)]:
        added.append(store.add(_record(screening, grade), origin="serve", file_name=f"{screening}.jpg"))
        time.sleep(0.002)
    newest_first = [r.id for r in reversed(added)]
    assert [r.id for r in store.query()] == newest_first
    assert [r.id for r in store.query(screening="negative")] == [added[3].id, added[0].id]
    assert [r.id for r in store.query(screening="ungradable")] == [added[2].id]
    assert [r.id for r in store.query(since=added[1].created)] == newest_first[:3]
    # the same instant written in another zone, and a naive time read as UTC, select the same rows
    moment = dt.datetime.fromisoformat(added[1].created)
    assert [r.id for r in store.query(since=moment.astimezone(dt.timezone(dt.timedelta(hours=5))).isoformat())] \
           == newest_first[:3]
    assert [r.id for r in store.query(since=moment.replace(tzinfo=None).isoformat())] == newest_first[:3]
    assert [r.id for r in store.query(limit=2)] == newest_first[:2]
    assert [r.id for r in store.query(since=added[1].created, screening="negative")] == [added[3].id]
    assert store.query(origin="watch") == []
    for bad in (dict(limit=0), dict(limit=1001), dict(screening="maybe"), dict(since="yesterday"),
                dict(origin="camera")):
        with pytest.raises(ConfigError):
            store.query(**bad)


def test_the_store_is_in_wal_mode_and_survives_a_restart(tmp_path):
    root = tmp_path / "data"
    with ResultStore(root) as store:
        assert store.journal_mode() == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2   # FULL: committed is on disk
        first = store.add(_record(), origin="watch", file_name="a.jpg", pictures={"card": _png(tmp_path / "c.png")})
    with sqlite3.connect(root / DB_NAME) as raw:     # WAL is a property of the file, not of our connection
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with ResultStore(root) as reopened:
        assert reopened.get(first.id) == first
        assert reopened.picture_path(first.id, "card").is_file()
        second = reopened.add(_record("referable", 4), origin="serve", file_name="b.jpg")
        assert [r.id for r in reopened.query()] == [second.id, first.id]


def test_the_pictures_are_on_disk_before_the_row_is_committed(store, tmp_path):
    """Watch the insert itself: a trigger calls back into Python at the moment the row goes in."""
    seen = []

    def files_exist(overlay, card):
        seen.append(all((store.root / p).is_file() for p in (overlay, card)))
        return 1

    store._db.create_function("files_exist", 2, files_exist)
    store._db.execute("CREATE TEMP TRIGGER watch_insert BEFORE INSERT ON results "
                      "BEGIN SELECT files_exist(NEW.overlay, NEW.card); END")
    store.add(_record(), origin="serve", file_name="x.jpg",
              pictures={"overlay": _png(tmp_path / "o.png"), "card": _png(tmp_path / "c.png")})
    assert seen == [True]


def test_a_picture_that_cannot_be_stored_leaves_no_row_and_no_files(store, tmp_path):
    with pytest.raises(StoreError, match="not found"):
        store.add(_record(), origin="serve", file_name="x.jpg", pictures={"overlay": tmp_path / "missing.png"})
    (tmp_path / "a_dir.png").mkdir()
    with pytest.raises(StoreError):
        store.add(_record(), origin="serve", file_name="x.jpg",
                  pictures={"card": _png(tmp_path / "c.png"), "overlay": tmp_path / "a_dir.png"})
    assert store.count() == 0
    assert list((store.root / "files").iterdir()) == []
    with pytest.raises(ConfigError):
        store.add(_record(), origin="camera", file_name="x.jpg")


def test_a_row_that_cannot_be_committed_leaves_no_files(store, tmp_path):
    """The insert fails after the pictures were copied in (a constraint the row breaks): they are removed."""
    store._db.execute("CREATE TEMP TRIGGER refuse BEFORE INSERT ON results BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
    with pytest.raises(StoreError, match="disk says no"):
        store.add(_record(), origin="serve", file_name="x.jpg", pictures={"card": _png(tmp_path / "c.png")})
    store._db.execute("DROP TRIGGER refuse")
    assert store.count() == 0
    assert list((store.root / "files").iterdir()) == []


def test_an_idempotency_key_gives_one_row(store, tmp_path):
    first = store.add(_record(), origin="watch", file_name="a.jpg", key="k1", pictures={"card": _png(tmp_path / "c.png")})
    again = store.add(_record("referable", 3), origin="watch", file_name="a.jpg", key="k1",
                      pictures={"card": _png(tmp_path / "c2.png")})
    assert again == first and store.count() == 1
    assert len(list((store.root / "files").iterdir())) == 1   # the second call copied nothing
    other = store.add(_record(), origin="watch", file_name="a.jpg", key="k2")
    assert other.id != first.id and store.count() == 2


@pytest.mark.parametrize("damage", ["garbage", "torn page", "foreign schema", "future schema"])
def test_a_damaged_or_foreign_store_is_a_store_error(tmp_path, damage):
    root = tmp_path / "data"
    with ResultStore(root) as store:
        for i in range(300):     # enough rows for several pages, so a damaged page is not the header
            store.add(_record(note="x" * 200), origin="serve", file_name=f"{i}.jpg")
    db = root / DB_NAME
    assert not Path(f"{db}-wal").exists()     # checkpointed at close: the damage below is not masked by a WAL
    if damage == "garbage":
        db.write_bytes(b"this is not a database, it is a text file\n" * 100)
    elif damage == "torn page":
        data = bytearray(db.read_bytes())
        page = 4096
        data[3 * page:3 * page + 512] = b"\xde\xad\xbe\xef" * 128   # the middle of a b-tree page
        db.write_bytes(bytes(data))
    elif damage == "foreign schema":
        db.unlink()
        with sqlite3.connect(db) as other:
            other.execute("CREATE TABLE photos (name TEXT)")
    else:
        with sqlite3.connect(db) as other:
            other.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError) as info:
        ResultStore(root)
    assert str(db) in str(info.value)


def test_times_are_canonical_utc_with_fixed_width():
    assert canonical_time("2026-05-09T09:35:00+02:00") == "2026-05-09T07:35:00.000000Z"
    assert canonical_time("2026-05-09T07:35:00Z") == "2026-05-09T07:35:00.000000Z"
    assert canonical_time("2026-05-09") == "2026-05-09T00:00:00.000000Z"
    assert len(canonical_time(None)) == len("2026-05-09T07:35:00.000000Z")
    with pytest.raises(ConfigError, match="ISO 8601"):
        canonical_time("last tuesday")


def test_watch_writes_its_records_to_the_store_once(onnx_bundle, phantom_test, tmp_path):
    """`watch --store`: one row per record (origin watch, pictures copied in), results.jsonl unchanged; a
    restart grades nothing twice, and a crash between the row and the line re-grades into the same row."""
    import threading

    from edgeretina.dataset import read_labels
    from edgeretina.runtime import Grader
    from edgeretina.runtime.watch import RESULTS_NAME, Watcher, WatchConfig

    camera, out, data = tmp_path / "camera", tmp_path / "out", tmp_path / "data"
    camera.mkdir()
    photos = [Path(item.path) for item in read_labels(phantom_test)][:3]
    for photo in photos:
        (camera / photo.name).write_bytes(photo.read_bytes())
    (camera / "broken.jpg").write_bytes(photos[0].read_bytes()[:500])
    config = WatchConfig(folder=camera, bundle=onnx_bundle, out=out, interval=0.05, once=True, store=data,
                         undecodable_grace_s=0.0)
    grader = Grader(onnx_bundle, threads=1)

    def watch(config):   # a run of `edgeretina watch --once --store DATA` (without its signal handlers)
        return Watcher(config, grader).run(threading.Event())

    summary = watch(config)
    lines = [json.loads(line) for line in (out / RESULTS_NAME).read_text().splitlines()]
    assert summary.graded == 4 and len(lines) == 4
    with ResultStore(data) as store:
        rows = {row.file_name: row for row in store.query()}
        assert set(rows) == {line["source"]["path"] for line in lines}
        for line in lines:
            row = rows[line["source"]["path"]]
            assert row.origin == "watch" and row.record == line and row.screening == line["screening"]
            assert len(row.bundle_sha256) == 64
        broken = rows["broken.jpg"]
        assert broken.screening is None and "truncated" in broken.error and broken.pictures == {}
        for photo in photos:
            assert set(rows[photo.name].pictures) == {"overlay", "card"}
            assert store.picture_path(rows[photo.name].id, "card").read_bytes()[:8] == PNG
    assert watch(config).graded == 0                       # restart: nothing new
    results = out / RESULTS_NAME
    kept = results.read_text().splitlines()[:-1]           # the last line lost, its row committed
    results.write_text("\n".join(kept) + "\n")
    assert watch(config).graded == 1
    assert len(results.read_text().splitlines()) == 4
    with ResultStore(data) as store:
        assert store.count() == 4
