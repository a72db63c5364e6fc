"""The grading service without HTTP: one Grader, the batching queue in front of it, the results store behind it.

Threading model. The event loop only moves bytes (uploads in, JSON and PNGs out). ``workers`` threads take
batches from the queue and call the ONE Grader (decode, quality gate, preprocessing, one forward pass, KNN);
when there are several, their forward passes take turns on the runner (_SerializedRunner) while their decoding
and preprocessing overlap. Rendering the overlay and the report card and committing the row run in Starlette's
thread pool, outside the workers, so the next batch is being graded meanwhile.

The grader is loaded (and verified on this device) in a thread of its own after start: the port answers at
once, /healthz says alive, /readyz says why it is not ready yet, or why it never will be.

Error rows: an upload that does not decode is answered 422 with the decoder's reason and NOT stored. Nothing
was graded; the client has the reason; a history of screenings is not an access log, and a row would be a
second copy of someone else's bad bytes' name. (watch does store its error rows: a file in a hot folder has
no one to answer to, so its row is the report.) A multi-frame DICOM whose frames partly fail stores the
frames that were graded and lists the others, with their errors, in the answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeretina.errors import EdgeRetinaError, ServeError
from edgeretina.runtime.grader import GradedImage, Grader, GradeRecord
from edgeretina.runtime.store import ResultStore, StoredResult
from edgeretina.runtime.verify import manifest_sha256
from edgeretina.runtime.visuals import CARD_SUFFIX, write_visuals
from edgeretina.serve.config import ServeConfig
from edgeretina.serve.metrics import Metrics
from edgeretina.serve.queue import BatchingQueue, QueueFull

try:
    import fcntl   # POSIX (the devices this runs on are Linux); without it the sweep keeps to the age rule
except ImportError:   # pragma: no cover
    fcntl = None

log = logging.getLogger("edgeretina.serve")

LOADING_RETRY_AFTER_S = 5
STALE_STAGING_S = 3600.0     # what the locks do not settle (a .new- folder, a stray file) is a leftover this old
_NEW_STAGE = ".new-"         # a stage folder's name until its lock is held (the sweep leaves these to the age rule)


class NotReady(ServeError):
    """No grader yet (loading: retry_after_s is set) or none at all (the bundle failed: it is None)."""

    def __init__(self, reason: str, retry_after_s: int | None):
        self.reason = reason
        self.retry_after_s = retry_after_s
        super().__init__(reason)


class GradeTimeout(ServeError):
    """The image was not graded within the request timeout."""


@dataclass
class GradeOutcome:
    rows: list[StoredResult] = field(default_factory=list)      # graded and committed, in frame order
    failed: list[dict] = field(default_factory=list)            # {"frame", "error", "decoded"} not stored


class GradingService:
    def __init__(self, config: ServeConfig):
        """Opens the results store now (a damaged store is a StoreError before anything binds); the grader
        loads after start()."""
        self.config = config
        self.store = ResultStore(config.data)
        self.staging = config.staging
        self.staging.mkdir(parents=True, exist_ok=True)
        self.metrics = Metrics(gauges={
            "edgeretina_queue_depth": ("Requests waiting for a grading worker.", lambda: self.queue.depth),
            "edgeretina_queue_capacity": ("Requests that may wait before the service answers 503.",
                                          lambda: self.queue.capacity),
            "edgeretina_ready": ("1 when the bundle is loaded and verified on this device.",
                                 lambda: float(self.readiness()[0])),
        })
        self.queue: BatchingQueue[Path, list[GradedImage]] = BatchingQueue(
            self._grade_batch, capacity=config.queue_size, workers=config.workers, max_batch=config.max_batch,
            batch_wait_s=config.batch_wait_s, on_batch=self.metrics.observe_batch)
        self.grader: Grader | None = None
        self.bundle_sha256: str | None = None
        self.state = "loading"                       # "loading" | "ready" | "failed"
        self.reason = "loading the bundle and verifying it on this device"
        self._loaded = threading.Event()
        self._closing = False
        self._stage_locks: dict[Path, int] = {}      # stage folder -> the open descriptor holding its flock

    # lifecycle

    def start(self) -> None:
        self._sweep_staging()
        threading.Thread(target=self._load, name="edgeretina-load", daemon=True).start()

    def wait_loaded(self, timeout_s: float | None = None) -> bool:
        """Block until the grader is loaded or failed to; whether that happened in time."""
        return self._loaded.wait(timeout_s)

    def close(self) -> None:
        self._closing = True
        self.queue.close()
        self.store.close()

    def _load(self) -> None:
        config = self.config
        try:
            grader = Grader(config.bundle, backend=config.backend, threads=config.threads, device=config.device,
                            trust=config.trust, verify=config.verify)
            if config.workers > 1:
                grader.runner = _SerializedRunner(grader.runner)
            self.bundle_sha256 = manifest_sha256(grader.bundle)
            self.grader = grader
            if not self._closing:
                self.queue.start()
                self.state = "ready"
                log.info("grading with %s (%s, %s)", config.bundle, grader.backend, grader.precision)
        except Exception as exc:   # any failure: the service stays up and says why at /readyz
            self.reason = str(exc) if isinstance(exc, EdgeRetinaError) else f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            log.error("the bundle could not be loaded: %s", self.reason)
        finally:
            self._loaded.set()

    def readiness(self) -> tuple[bool, dict]:
        """(ready, what /readyz says): ready only with the grader loaded AND verified on this device."""
        if self.state != "ready":
            return False, {"ready": False, "state": self.state, "reason": self.reason}
        grader = self.grader
        report = grader.verification
        # the bundle's name, not its path: /readyz answers without a key, and the server's layout is nobody's business
        about = {"bundle": self.config.bundle.name, "bundle_sha256": self.bundle_sha256, "backend": grader.backend,
                 "precision": grader.precision}
        if report is None:
            return False, {"ready": False, "state": "unverified", **about,
                           "reason": "on-device verification is off (--no-verify): this device has not been shown "
                                     "to reproduce the bundle's reference outputs; grading works, readiness does not"}
        return True, {"ready": True, "state": "ready", **about,
                      "verified": {"cpu_class": report.cpu.get("class"), "backend_version": report.backend_version,
                                   "cached": report.cached}}

    def require_loaded(self) -> None:
        if self.state == "loading":
            raise NotReady(self.reason, LOADING_RETRY_AFTER_S)
        if self.state == "failed":
            raise NotReady(f"the bundle could not be loaded: {self.reason}", None)

    # one request

    def new_stage(self) -> Path:
        """A private folder for one request's upload and pictures; the caller gives it back to remove_stage.

        The folder is flock-ed for as long as its request holds it, and the kernel drops that lock when the
        process dies, however it dies: the next start (of this service or of another one on the same data
        folder) removes every folder it can lock, at once, and leaves the others, which are live requests of a
        running sibling. It is created under a dot-name and renamed once locked, so no sweep ever sees it
        unlocked."""
        if fcntl is None:
            return Path(tempfile.mkdtemp(dir=self.staging))
        fresh = Path(tempfile.mkdtemp(prefix=_NEW_STAGE, dir=self.staging))
        fd = os.open(fresh, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stage = fresh.with_name(fresh.name[len(_NEW_STAGE):])
            os.rename(fresh, stage)
        except BaseException:
            os.close(fd)
            shutil.rmtree(fresh, ignore_errors=True)
            raise
        self._stage_locks[stage] = fd
        return stage

    def remove_stage(self, stage: Path) -> None:
        """Remove a request's stage folder (its upload and pictures), then drop its lock."""
        shutil.rmtree(stage, ignore_errors=True)
        fd = self._stage_locks.pop(stage, None)
        if fd is not None:
            os.close(fd)

    async def grade(self, path: Path) -> list[GradedImage]:
        """Queue one staged file and wait for its graded images (a DICOM: one per frame). Raises QueueFull
        (counted), QueueClosed, GradeTimeout."""
        try:
            future = self.queue.submit(path)
        except QueueFull:
            self.metrics.count_rejected()
            raise
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.config.timeout_s)
        except asyncio.TimeoutError:
            self.queue.cancel(future)
            raise GradeTimeout(f"not graded within {self.config.timeout_s:g} s (--timeout-s)") from None

    def store_graded(self, graded: list[GradedImage], staged: Path, name: str) -> GradeOutcome:
        """Render each graded image's overlay and card beside the staged upload, then commit its row (pictures
        first, store.py). Images that were not graded are returned in `failed`, not stored. Staging paths in
        messages become the client's file name."""
        outcome = GradeOutcome()
        stage = staged.parent
        multi = len(graded) > 1
        for image in graded:
            record = image.record
            frame = (record.dicom or {}).get("frame")
            record.file = name
            if record.screening is None:
                outcome.failed.append({"frame": frame, "error": _scrub(record.error, staged, name),
                                       "decoded": image.image is not None})
                self.metrics.count_outcome("error")
                continue
            stem = f"frame{frame}" if multi and frame is not None else "image"
            write_visuals(image, stem, stage, stage)
            pictures = {"overlay": Path(record.overlay)} if record.overlay else {}
            card = stage / f"{stem}{CARD_SUFFIX}"
            if card.is_file():
                pictures["card"] = card
            record.overlay = None    # a staging path means nothing to a client: the links say where it is
            record.error = _scrub(record.error, staged, name)
            row = self.store.add(record.to_dict(), origin="serve", file_name=name,
                                 bundle_sha256=self.bundle_sha256, pictures=pictures)
            outcome.rows.append(row)
            self.metrics.count_outcome(row.screening)
        return outcome

    def _grade_batch(self, paths: list[Path]) -> list[list[GradedImage]]:
        """The queue's `process`: one Grader call for the whole batch, its images grouped back by file. When
        the call raises (a decoder's own exception on a malformed file, which the Grader does not turn into
        an error record), each file is graded alone, so only the file that raises becomes an error record:
        one bad upload never fails the requests batched with it."""
        files = [str(path) for path in paths]
        try:
            return self._grade_files(files)
        except Exception:
            if len(files) == 1:
                return [[_failed_image(files[0], *sys.exc_info()[:2])]]
        return [self._grade_alone(file) for file in files]

    def _grade_files(self, files: list[str]) -> list[list[GradedImage]]:
        groups: dict[str, list[GradedImage]] = {file: [] for file in files}
        for image in self.grader.grade_iter(files, batch_size=self.config.max_batch):
            groups[image.record.file].append(image)
        return [groups[file] for file in files]

    def _grade_alone(self, file: str) -> list[GradedImage]:
        try:
            return self._grade_files([file])[0]
        except Exception as exc:
            log.warning("grading %s raised %s: %s", file, type(exc).__name__, exc)
            return [_failed_image(file, type(exc), exc)]

    def _sweep_staging(self) -> None:
        """Remove upload folders a crashed run left behind (uploads are patients' photos: none should linger):
        every stage folder no live process holds locked (new_stage), and anything else once it is old."""
        cutoff = time.time() - max(STALE_STAGING_S, 2 * self.config.timeout_s)
        for entry in self.staging.iterdir():
            try:
                if _abandoned_stage(entry) or entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            except OSError:
                pass   # another service on the same data folder removed it first


class _SerializedRunner:
    """One forward pass at a time on a runner shared by several workers: OpenVINO's infer request and a
    TensorRT execution context are not re-entrant, and ONNX Runtime runs on the same cores would only
    interleave. The workers' decoding, quality checks, preprocessing and KNN still overlap."""

    def __init__(self, runner):
        self._runner = runner
        self._lock = threading.Lock()

    def run(self, images):
        with self._lock:
            return self._runner.run(images)

    def __getattr__(self, name):
        return getattr(self._runner, name)


def _abandoned_stage(entry: Path) -> bool:
    """A locked-stage folder whose lock nobody holds: its request died with its process."""
    # a dot-named folder nobody holds was left between its creation and its lock (new_stage): abandoned too
    if fcntl is None or entry.is_symlink() or not entry.is_dir():
        return False
    fd = os.open(entry, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _scrub(message: str | None, staged: Path, name: str) -> str | None:
    """The message with the staging path replaced by the client's file name (no server paths in answers)."""
    if not message:
        return message
    return message.replace(str(staged), name).replace(os.fspath(staged.parent), "")


def _failed_image(file: str, kind: type, exc: BaseException) -> GradedImage:
    """An error record for a file whose grading raised: the client gets 422 with the reason, nothing is stored."""
    return GradedImage(record=GradeRecord(file=file, error=f"could not be graded ({kind.__name__}: {exc})"))
