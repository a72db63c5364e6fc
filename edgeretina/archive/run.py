"""grade-archive: list the sources, skip what the output folder already holds, grade the rest on Ray, merge.

The flow, in named steps:
1. ``expand_sources``: every file with its key (file, bytes, mtime_ns), on the driver;
2. the bundle, loaded strictly here (hashes, trust list) so a damaged or untrusted bundle fails before Ray starts;
3. ``read_state``: the files the parts already hold for this bundle are skipped;
4. the rest as a Ray Dataset of keys -> ``map_batches(GradeWorker)`` on a fixed pool of actors (one Grader each,
   verified on its machine) -> ``iter_batches`` on the driver, each arriving table buffered into part files;
5. ``merge_results`` -> results.parquet and summary.json, both written atomically.
Nothing is graded when nothing is left to grade: a finished archive reruns in the time it takes to list it.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

from edgeretina.archive.cluster import RaySession, job_failure, ray_session
from edgeretina.archive.config import RESULTS_NAME, SUMMARY_NAME, LOCK_NAME, ArchiveConfig
from edgeretina.archive.parts import (OutputLock, PartWriter, merge_results, read_state, remove_stale_temporaries,
                                      run_id, write_results)
from edgeretina.archive.sources import ArchiveItem, expand_sources
from edgeretina.archive.summary import count_results
from edgeretina.archive.worker import GradeWorker, WorkerSetup, bundle_payload, trust_keys
from edgeretina.atomic import write_json_atomic
from edgeretina.bundle import load_bundle
from edgeretina.errors import ArchiveError
from edgeretina.runtime.verify import manifest_sha256
from edgeretina.signing import enforce_trust, resolve_trust

MAX_BLOCKS = 10_000      # input blocks of the dataset: about one per batch, fewer for huge archives


@dataclass
class ArchiveProgress:
    files_done: int
    files_total: int
    images: int            # rows: a DICOM file gives one per frame
    errors: int
    elapsed_s: float

    @property
    def rate(self) -> float:
        """Images per second since grading started."""
        return self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        if self.files_done == 0 or self.elapsed_s <= 0:
            return None
        return (self.files_total - self.files_done) * self.elapsed_s / self.files_done


@dataclass
class ArchiveSummary:
    bundle: str
    bundle_sha256: str
    out: str
    files: int                        # in the sources
    images: int                       # rows of results.parquet
    screening: dict[str, int]         # negative / referable / ungradable
    grades: dict[str, int]            # "0".."4"
    errors: int
    skipped_files: int                # already graded by this bundle: not graded again
    graded_files: int                 # graded by this run
    graded_images: int
    graded_errors: int
    throughput_images_per_s: float    # this run's images over its grading time (first dispatch to last row)
    grading_s: float
    wall_time_s: float                # the whole run, listing and Ray's start included
    workers: int
    threads_per_worker: int
    batch_size: int
    ray: dict = field(default_factory=dict)          # address, nodes, cpus
    nodes: dict[str, int] = field(default_factory=dict)   # rows per machine that graded them
    cpu_classes: list[str] = field(default_factory=list)  # CPU classes the bundle was verified on
    parts: int = 0
    unreadable_parts: list[str] = field(default_factory=list)
    started: str = ""
    finished: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def run_archive(config: ArchiveConfig, on_progress: Callable[[ArchiveProgress], None] | None = None,
                log: Callable[[str], None] | None = None) -> ArchiveSummary:
    """Grade ``config.sources`` into ``config.out``; see the module docstring. Raises ArchiveError (no images,
    folder busy, too few CPUs, a worker refused the bundle), BundleError/SignatureError (the bundle, checked
    here first), DatasetError (an unreadable manifest). KeyboardInterrupt (and SIGTERM, in the main thread)
    writes the buffered rows as a part before it propagates: a rerun continues from there."""
    log = log or (lambda _: None)
    started, started_at = time.perf_counter(), _now()
    config.parts.mkdir(parents=True, exist_ok=True)
    with OutputLock(config.out / LOCK_NAME):
        remove_stale_temporaries(config.parts)
        items = expand_sources(config.sources)
        if not items:
            raise ArchiveError(f"no images found in {', '.join(config.sources)}")
        bundle = load_bundle(config.bundle)                     # sha256 of every artifact, before Ray starts
        trust = resolve_trust(config.trust)
        enforce_trust(bundle, trust, name=str(config.bundle))
        sha = manifest_sha256(bundle)
        state = read_state(config.parts, sha, config.retry_errors)
        todo = [item for item in items if item.key not in state.done]
        log(f"{len(items)} file(s) in the sources; {len(items) - len(todo)} already graded with bundle "
            f"{sha[:12]}, {len(todo)} to grade")
        graded = _grade(config, bundle, sha, trust, todo, on_progress, log) if todo else _Graded()
        results = merge_results(config.parts, sha, [item.key for item in items])
        write_results(config.out / RESULTS_NAME, results)
        summary = _summarise(config, sha, items, len(todo), graded, results, state.unreadable)
        summary.wall_time_s, summary.started = round(time.perf_counter() - started, 3), started_at
        write_json_atomic(config.out / SUMMARY_NAME, summary.to_dict())
        return summary


def _summarise(config: ArchiveConfig, sha: str, items: list[ArchiveItem], todo: int, graded: "_Graded", results,
               unreadable: list[str]) -> ArchiveSummary:
    counts = count_results(results)
    return ArchiveSummary(
        bundle=str(config.bundle), bundle_sha256=sha, out=str(config.out), files=len(items), images=results.num_rows,
        screening=counts.screening, grades=counts.grades, errors=counts.errors, skipped_files=len(items) - todo,
        graded_files=graded.files, graded_images=graded.rows, graded_errors=graded.errors,
        throughput_images_per_s=round(graded.rows / graded.seconds, 3) if graded.seconds > 0 else 0.0,
        grading_s=round(graded.seconds, 3), wall_time_s=0.0, workers=graded.workers,
        threads_per_worker=config.threads_per_worker, batch_size=config.batch_size, ray=graded.ray,
        nodes=counts.nodes, cpu_classes=counts.cpu_classes, parts=len(list(config.parts.glob("part-*.parquet"))),
        unreadable_parts=unreadable, finished=_now())


@dataclass
class _Graded:
    files: int = 0
    rows: int = 0
    errors: int = 0
    seconds: float = 0.0
    workers: int = 0
    ray: dict = field(default_factory=dict)


def _grade(config: ArchiveConfig, bundle, sha: str, trust, todo: list[ArchiveItem],
           on_progress, log) -> _Graded:
    import ray

    writer = PartWriter(config.parts, run_id(), config.part_rows, config.part_seconds)
    graded = _Graded()
    with ray_session(config.ray_address, log) as session, _sigterm_as_interrupt():   # after ray.init: it sets its own
        graded.workers = _worker_count(config, session)
        graded.ray = {"address": session.address, "nodes": session.nodes, "cpus": session.cpus}
        log(f"Ray at {session.address}: {session.nodes} node(s), {session.cpus:g} CPU(s); {graded.workers} worker(s) "
            f"x {config.threads_per_worker} thread(s), batches of {config.batch_size}")
        # shipped unless this process started the Ray itself: a cluster's other nodes do not see our files
        payload = () if session.started_here else (ray.put(bundle_payload(config.bundle, bundle)),)
        setup = WorkerSetup(bundle_path=str(config.bundle.resolve()), bundle_sha256=sha, bundle_payload=payload,
                            backend=config.backend, device=config.device, threads=config.threads_per_worker,
                            verify=config.verify, trust_keys=trust_keys(trust),
                            trust_source=getattr(trust, "source", ""), batch_size=config.batch_size)
        began = time.perf_counter()
        done_files: set[str] = set()
        try:
            for table in _stream(todo, setup, graded.workers, config):
                writer.add(table)
                files = table.column("file").to_pylist()
                done_files.update(files)
                graded.rows += table.num_rows
                graded.errors += table.num_rows - table.column("error").null_count
                graded.files = len(done_files)
                if on_progress:
                    on_progress(ArchiveProgress(graded.files, len(todo), graded.rows, graded.errors,
                                                time.perf_counter() - began))
        finally:
            writer.flush()           # Ctrl-C, SIGTERM or a failed job: what arrived is kept
            graded.seconds = time.perf_counter() - began
    return graded


def _stream(todo: list[ArchiveItem], setup: WorkerSetup, workers: int, config: ArchiveConfig) -> Iterator:
    """The result tables as workers finish them (streaming execution: the first arrive while the rest grade)."""
    import ray
    import ray.data

    blocks = max(1, min(MAX_BLOCKS, math.ceil(len(todo) / config.batch_size)))
    # a worker that refuses the bundle fails the job at its first death (worker.py), whatever this Ray's default
    ray.data.DataContext.get_current().max_consecutive_actor_init_deaths = 0
    dataset = ray.data.from_items([item.to_dict() for item in todo], override_num_blocks=blocks)
    graded = dataset.map_batches(GradeWorker, fn_constructor_args=(setup,), batch_size=config.batch_size,
                                 batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
                                 num_cpus=config.threads_per_worker)
    try:
        yield from graded.iter_batches(batch_size=None, batch_format="pyarrow")
    except ray.exceptions.RayError as exc:
        raise job_failure(exc) from None
    except Exception as exc:   # noqa: BLE001 - Ray Data wraps worker failures in its own exception types
        if type(exc).__module__.startswith("ray"):
            raise job_failure(exc) from None
        raise


def _worker_count(config: ArchiveConfig, session: RaySession) -> int:
    """--workers, else as many as the cluster's CPUs hold; a local Ray too small for them is an error (it would
    wait for CPUs that never come), a cluster may still be growing (autoscaler)."""
    fits = int(session.cpus // config.threads_per_worker)
    workers = config.workers or max(1, fits)
    if session.started_here and workers * config.threads_per_worker > session.cpus:
        raise ArchiveError(f"{workers} worker(s) x {config.threads_per_worker} thread(s) need "
                           f"{workers * config.threads_per_worker} CPUs; this machine's Ray has {session.cpus:g}")
    return workers


class _sigterm_as_interrupt:
    """SIGTERM (``ray job stop``, a scheduler's kill) ends the run like Ctrl-C: the buffered rows are written.
    Installed once Ray runs, because ray.init installs a handler of its own that just dies."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
