"""`edgeretina serve` under load on loopback (issue 15): throughput, latency, lost requests, memory, faults.

The server is the installed `edgeretina serve` in a subprocess (what a user runs), on a free 127.0.0.1 port
with its own --data folder; the clients are asyncio httpx connections in this process posting phantom JPEGs
(or --images DIR) as raw bodies. Every run is bounded in count (--requests) and time (--max-seconds).

Scenarios:
  load      --clients concurrent clients, --requests posts: throughput, p50/p90/p99 latency, status counts,
            lost requests (no answer, or a 2xx whose row or pictures are not in the store afterwards), the
            server's RSS at start / after a quarter of the load / peak / end.
  overload  the same with a queue that is too small (--queue-size 1) and more clients: only 200 and 503 may come
            back (any other 5xx or a dropped connection is a finding), every 503 carries Retry-After, and the
            server's RSS must not grow once warm (end vs a quarter in, and its slope over the second half).
  batching  the load once per --max-batches value (1 = micro-batching off, 8 = the default, 16), each on a fresh
            server, --rounds rounds in rotated order: throughput, p50/p99 and the mean batch the grader saw.
  fault     SIGKILL the server after half the answers (--kills times, evenly spaced), restart it on the same
            data folder, finish the load; then every 2xx id must be served by GET /v1/results/{id}, have its row
            and its pictures (complete PNGs), no PNG under files/ may be half-written, temporary files may sit
            only in picture folders no row names, and the store must open cleanly (quick_check, integrity_check).

Usage:
  python benchmarks/serve_load.py --scenario load --bundle demo-run/bundle --clients 16 --requests 2000 --out OUT.json
Results go to --out as JSON with the machine (CPU model, cpu_class, cores, load average) and print as a table;
--check exits 1 when a scenario's invariants fail. On 2 shared cores the clients compete with the server for the
CPU: read the throughput as that of this machine with its own load generator, not of the service alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "demo-run" / "bundle"
SCENARIOS = ("load", "overload", "batching", "fault")
# per scenario: what a flag left unset means (overload: a queue of one and twice the clients)
SCENARIO_DEFAULTS = {
    "load": {"clients": 16, "requests": 2000, "queue_size": 32},
    "overload": {"clients": 32, "requests": 2000, "queue_size": 1},
    "batching": {"clients": 16, "requests": 2000, "queue_size": 32},
    "fault": {"clients": 16, "requests": 2000, "queue_size": 32},
}
RSS_PERIOD_S = 0.2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"IEND\xaeB`\x82"
TEMP_MARK = ".tmp-"                 # edgeretina/atomic.py: .<name>.tmp-<pid> beside the target
RSS_GROWTH_LIMIT_MIB = 32.0         # overload --check: RSS end minus RSS a quarter in


# the server


@dataclass
class ServerSettings:
    """What `edgeretina serve` is started with (its flags)."""

    bundle: Path
    data: Path
    workers: int = 1
    queue_size: int = 32
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    timeout_s: float = 30.0
    max_upload_mb: float = 32.0
    threads: int | None = None
    verify: bool = True

    def argv(self, port: int) -> list[str]:
        args = ["serve", "--bundle", str(self.bundle), "--host", "127.0.0.1", "--port", str(port),
                "--data", str(self.data), "--workers", str(self.workers), "--queue-size", str(self.queue_size),
                "--max-batch", str(self.max_batch), "--batch-wait-ms", str(self.batch_wait_ms),
                "--timeout-s", str(self.timeout_s), "--max-upload-mb", str(self.max_upload_mb)]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        return args + ([] if self.verify else ["--no-verify"])


def edgeretina_command() -> list[str]:
    """The console script beside this interpreter (what a user runs); `python -m edgeretina` without one."""
    script = Path(sys.executable).with_name("edgeretina")
    return [str(script)] if script.exists() else [sys.executable, "-m", "edgeretina"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`edgeretina serve` in a subprocess, its output in `log`, its RSS sampled every RSS_PERIOD_S.

    start() returns once /readyz says ready (or raises RuntimeError with the log's tail); kill() is SIGKILL,
    stop() SIGTERM (uvicorn's graceful shutdown) then SIGKILL after a grace period."""

    def __init__(self, settings: ServerSettings, log: Path):
        self.settings = settings
        self.log = log
        self.process: subprocess.Popen | None = None
        self.rss = RssSampler()
        self.url = ""
        self.started_s = 0.0            # Popen to ready

    def start(self, ready_timeout_s: float = 300.0) -> "ServerProcess":
        began = time.monotonic()
        for _ in range(3):               # a port taken between free_port() and the bind: try another
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            with open(self.log, "ab") as out:
                self.process = subprocess.Popen(edgeretina_command() + self.settings.argv(port), stdout=out,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if self._wait_ready(began + ready_timeout_s):
                self.started_s = time.monotonic() - began
                self.rss.start(self.process.pid)
                return self
            if "address already in use" not in self.log_tail().lower():
                break
        raise RuntimeError(f"edgeretina serve did not become ready:\n{self.log_tail()}")

    def _wait_ready(self, deadline: float) -> bool:
        import httpx

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                answer = httpx.get(self.url + "/readyz", timeout=5)
                state = answer.json().get("state")
                if answer.status_code == 200 or (state == "unverified" and not self.settings.verify):
                    return True
                if state in ("failed", "unverified"):
                    self.stop()
                    raise RuntimeError(f"the server will not be ready: {answer.json()}")
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.1)
        self.stop()
        return False

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: no shutdown handler, no flush, no atexit -- what a power cut does to the process."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        self.rss.stop()

    def stop(self, grace_s: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            self.rss.stop()
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(30)
        self.rss.stop()
        return code

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def read_rss(pid: int) -> int | None:
    """Resident bytes of `pid` (psutil when installed, else /proc/PID/status VmRSS); None once it is gone."""
    try:
        import psutil

        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return None
    except ImportError:
        pass
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler:
    """(monotonic time, RSS bytes) of one process every RSS_PERIOD_S in a thread of its own."""

    def __init__(self):
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, pid: int) -> None:
        self._thread = threading.Thread(target=self._run, args=(pid,), daemon=True)
        self._thread.start()

    def _run(self, pid: int) -> None:
        while not self._stop.is_set():
            rss = read_rss(pid)
            if rss is None:
                return
            self.samples.append((time.monotonic(), rss))
            self._stop.wait(RSS_PERIOD_S)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def at(self, moment: float) -> int | None:
        """The last sample at or before `moment` (the first one if none is that early)."""
        before = [rss for t, rss in self.samples if t <= moment]
        return before[-1] if before else (self.samples[0][1] if self.samples else None)


# the clients


@dataclass
class LoadPlan:
    clients: int
    requests: int
    max_seconds: float = 900.0
    client_timeout_s: float = 120.0     # well past the server's --timeout-s: a client gives up only on a dead server


@dataclass
class Outcome:
    """One request as the client saw it. status None: no answer (the connection failed or was cut)."""

    index: int
    phase: int
    started: float                       # monotonic
    ended: float
    status: int | None = None
    error: str | None = None             # the exception's type when there was no answer
    result_id: str | None = None         # a 2xx's id
    pictures: tuple[str, ...] = ()       # the kinds a 2xx links to (overlay, card)
    retry_after: str | None = None       # a 503's Retry-After header

    @property
    def latency_s(self) -> float:
        return self.ended - self.started


def load_images(images: Path | None, count: int, size: int, work: Path, seed: int = 15) -> list[tuple[str, bytes]]:
    """(name, bytes) of the photos to post: --images DIR's JPEG/PNG files, or `count` phantom JPEGs of `size` px."""
    if images is None:
        from edgeretina.phantom import PhantomConfig, generate_dataset

        images = generate_dataset(work / "phantom", n=count, seed=seed, config=PhantomConfig(size=size),
                                  workers=1).parent / "images"
    files = sorted(p for p in Path(images).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no .jpg/.jpeg/.png under {images}")
    return [(p.name, p.read_bytes()) for p in files]


def run_load(url: str, images: list[tuple[str, bytes]], plan: LoadPlan, *, phase: int = 0, first_index: int = 0,
             kill_after: int | None = None, kill=None) -> tuple[list[Outcome], float | None]:
    """Post up to plan.requests photos from plan.clients concurrent clients; (outcomes, when kill() ran or None).

    kill_after: once that many answers are in, call kill() (the server dies while the other clients' requests
    are in flight); no client starts a request after it."""
    return asyncio.run(_drive(url, images, plan, phase, first_index, kill_after, kill))


async def _drive(url, images, plan: LoadPlan, phase, first_index, kill_after, kill):
    import httpx

    outcomes: list[Outcome] = []
    state = {"next": 0, "answered": 0, "killed": None}
    deadline = time.monotonic() + plan.max_seconds
    limits = httpx.Limits(max_connections=plan.clients, max_keepalive_connections=plan.clients)

    async def one_client(client: httpx.AsyncClient) -> None:
        while state["next"] < plan.requests and state["killed"] is None and time.monotonic() < deadline:
            index = first_index + state["next"]
            state["next"] += 1
            outcome = await _post(client, images[index % len(images)], index, phase)
            outcomes.append(outcome)
            state["answered"] += outcome.status is not None
            if kill_after is not None and state["killed"] is None and state["answered"] >= kill_after:
                kill()
                state["killed"] = time.monotonic()

    async with httpx.AsyncClient(base_url=url, timeout=plan.client_timeout_s, limits=limits) as client:
        await asyncio.gather(*[one_client(client) for _ in range(plan.clients)])
    return outcomes, state["killed"]


async def _post(client, image: tuple[str, bytes], index: int, phase: int) -> Outcome:
    import httpx

    name, data = image
    started = time.monotonic()
    try:
        answer = await client.post("/v1/grade", content=data, params={"filename": name},
                                   headers={"content-type": "image/jpeg" if name.lower().endswith(("jpg", "jpeg"))
                                            else "image/png"})
    except httpx.HTTPError as exc:
        return Outcome(index, phase, started, time.monotonic(), error=type(exc).__name__)
    outcome = Outcome(index, phase, started, time.monotonic(), status=answer.status_code,
                      retry_after=answer.headers.get("retry-after"))
    if 200 <= answer.status_code < 300:
        try:
            body = answer.json()
            outcome.result_id = body["id"]
            outcome.pictures = tuple(sorted(kind for kind in body["links"] if kind != "self"))
        except (ValueError, KeyError, TypeError):
            outcome.error = "2xx without an id"
    return outcome


def get_results(url: str, ids: list[str], concurrency: int = 16) -> dict[str, int | str]:
    """GET /v1/results/{id} for each id: id -> status (or the exception's type), and whether the body is that id."""
    import httpx

    async def fetch_all() -> dict:
        gate = asyncio.Semaphore(concurrency)
        found: dict[str, int | str] = {}

        async def one(client, result_id):
            async with gate:
                try:
                    answer = await client.get(f"/v1/results/{result_id}")
                    ok = answer.status_code == 200 and answer.json().get("id") == result_id
                    found[result_id] = 200 if ok else answer.status_code if answer.status_code != 200 else "wrong body"
                except httpx.HTTPError as exc:
                    found[result_id] = type(exc).__name__

        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await asyncio.gather(*[one(client, i) for i in ids])
        return found

    return asyncio.run(fetch_all())


def batch_stats(url: str) -> dict:
    """The grader's batches so far, from /metrics: count and mean size."""
    import httpx

    values = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(("edgeretina_batch_size_sum ", "edgeretina_batch_size_count ")):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    count = values.get("edgeretina_batch_size_count", 0.0)
    return {"batches": int(count), "mean_batch": round(values.get("edgeretina_batch_size_sum", 0.0) / count, 2)
            if count else None}


# what came back


def summarize(outcomes: list[Outcome], wall_s: float) -> dict:
    """Counts by status, throughput and latency percentiles (of the 2xx, and of every answer)."""
    statuses = Counter(str(o.status) if o.status is not None else "no answer" for o in outcomes)
    ok = [o.latency_s for o in outcomes if o.status is not None and 200 <= o.status < 300]
    answered = [o.latency_s for o in outcomes if o.status is not None]
    return {"requests": len(outcomes), "wall_s": round(wall_s, 3), "statuses": dict(sorted(statuses.items())),
            "errors": dict(Counter(o.error for o in outcomes if o.error)),
            "ok_per_s": round(len(ok) / wall_s, 2) if wall_s > 0 else None,
            "answers_per_s": round(len(answered) / wall_s, 2) if wall_s > 0 else None,
            "latency_ms_2xx": _percentiles(ok), "latency_ms_all": _percentiles(answered),
            "other_5xx": sum(1 for o in outcomes if o.status is not None and o.status >= 500 and o.status != 503),
            "503_without_retry_after": sum(1 for o in outcomes if o.status == 503 and not o.retry_after)}


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1000.0
    return {"p50": round(float(np.percentile(ms, 50)), 1), "p90": round(float(np.percentile(ms, 90)), 1),
            "p99": round(float(np.percentile(ms, 99)), 1), "max": round(float(ms.max()), 1),
            "mean": round(float(ms.mean()), 1)}


def rss_profile(sampler: RssSampler, load_start: float, load_end: float) -> dict:
    """RSS (MiB) before the load, a quarter into it (warm), its peak, at its end; the slope over its second half."""
    mib = 1024 * 1024
    if not sampler.samples:
        return {}
    during = [(t, rss) for t, rss in sampler.samples if load_start <= t <= load_end]
    quarter = load_start + (load_end - load_start) / 4
    start, warm, end = sampler.at(load_start), sampler.at(quarter), sampler.at(load_end)
    second_half = [(t, rss) for t, rss in during if t >= (load_start + load_end) / 2]
    slope = None
    if len(second_half) >= 5:
        t, rss = np.array(second_half, dtype=float).T
        slope = round(float(np.polyfit(t - t[0], rss / mib, 1)[0]) * 60.0, 2)
    return {"start_mib": round(start / mib, 1), "warm_mib": round(warm / mib, 1),
            "peak_mib": round(max(rss for _, rss in sampler.samples) / mib, 1), "end_mib": round(end / mib, 1),
            "growth_after_warm_mib": round((end - warm) / mib, 1), "second_half_slope_mib_per_min": slope,
            "samples": len(sampler.samples)}


def png_complete(path: Path) -> bool:
    """A whole PNG: the signature, the IEND chunk last, and OpenCV decodes it."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if not (data.startswith(PNG_SIGNATURE) and data.endswith(PNG_END)):
        return False
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is not None


def audit_store(data: Path, answered: list[Outcome]) -> dict:
    """The store after the run, opened as a new process would: every 2xx's row and pictures, every file under
    files/, the database's own checks. Lists are cut to their first 5 entries (counts are whole)."""
    from edgeretina.errors import StoreError
    from edgeretina.runtime.store import DB_NAME, FILES_DIR, ResultStore

    report: dict = {"store_opens": False}
    try:
        store = ResultStore(data)            # runs quick_check and the schema check
    except StoreError as exc:
        report["open_error"] = str(exc)
        return report
    with store:
        report.update(store_opens=True, journal_mode=store.journal_mode(), rows=store.count())
        missing_rows, missing_pictures = [], []
        for outcome in answered:
            row = store.get(outcome.result_id)
            if row is None:
                missing_rows.append(outcome.result_id)
                continue
            for kind in outcome.pictures:
                if kind not in row.pictures or store.picture_path(row.id, kind) is None:
                    missing_pictures.append(f"{row.id}/{kind}")
    with sqlite3.connect(data / DB_NAME) as db:
        report["integrity_check"] = "; ".join(r[0] for r in db.execute("PRAGMA integrity_check").fetchall())
        rows = {r[0]: [p for p in r[1:] if p] for r in db.execute("SELECT id, overlay, card FROM results")}
    db.close()
    report.update(answered_2xx=len(answered), missing_rows=len(missing_rows), missing_rows_first=missing_rows[:5],
                  missing_pictures=len(missing_pictures), missing_pictures_first=missing_pictures[:5],
                  rows_without_a_2xx=len(set(rows) - {o.result_id for o in answered}),
                  rows_naming_a_missing_file=sum(1 for pics in rows.values()
                                                 if any(not (data / p).is_file() for p in pics)))
    report.update(_audit_files(data / FILES_DIR, rows))
    staging = data / "tmp"
    report["staging_leftovers"] = len(list(staging.iterdir())) if staging.is_dir() else 0
    return report


def _audit_files(files: Path, rows: dict[str, list[str]]) -> dict:
    """Every file under files/: PNGs must be whole; temporary files may only sit in folders no row names."""
    bad, temps, temps_in_rows, unexpected, orphans, checked = [], [], [], [], [], 0
    for folder in sorted(p for p in files.iterdir()):
        if not folder.is_dir():
            unexpected.append(folder.name)
            continue
        if folder.name not in rows:
            orphans.append(folder.name)
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(files.parent).as_posix()
            if path.is_dir():
                unexpected.append(relative)
            elif TEMP_MARK in path.name:
                temps.append(relative)
                if folder.name in rows:
                    temps_in_rows.append(relative)
            elif path.suffix == ".png":
                checked += 1
                if not png_complete(path):
                    bad.append(relative)
            else:
                unexpected.append(relative)
    return {"pngs_checked": checked, "bad_pngs": len(bad), "bad_pngs_first": bad[:5], "temp_files": len(temps),
            "temp_files_first": temps[:5], "temp_files_in_row_folders": len(temps_in_rows),
            "orphan_folders": len(orphans), "unexpected_files": len(unexpected), "unexpected_first": unexpected[:5]}


# scenarios


@dataclass
class Run:
    """One server's run: its settings, what the clients saw, its memory, the batches it graded."""

    label: str
    settings: dict
    summary: dict
    rss: dict
    batches: dict = field(default_factory=dict)
    started_s: float = 0.0


def load_once(settings: ServerSettings, images, plan: LoadPlan, work: Path, label: str) -> tuple[Run, list[Outcome]]:
    """A fresh server, one load, the batches from /metrics, a graceful stop."""
    with ServerProcess(settings, work / f"{label}.log") as server:
        began = time.monotonic()
        outcomes, _ = run_load(server.url, images, plan)
        ended = time.monotonic()
        batches = batch_stats(server.url)
        time.sleep(RSS_PERIOD_S * 2)
    run = Run(label, _jsonable(asdict(settings)), summarize(outcomes, ended - began),
              rss_profile(server.rss, began, ended), batches, round(server.started_s, 2))
    return run, outcomes


def scenario_load(settings: ServerSettings, images, plan: LoadPlan, work: Path) -> dict:
    run, outcomes = load_once(settings, images, plan, work, "load")
    audit = audit_store(settings.data, _answered(outcomes))
    lost = (run.summary["statuses"].get("no answer", 0) + run.summary["errors"].get("2xx without an id", 0)
            + audit.get("missing_rows", 0) + audit.get("missing_pictures", 0))
    checks = {"zero_lost": lost == 0, "store_opens": audit["store_opens"],
              "no_5xx": run.summary["other_5xx"] == 0 and run.summary["statuses"].get("503", 0) == 0}
    return {"runs": [asdict(run)], "audit": audit, "lost": lost, "checks": checks}


def scenario_overload(settings: ServerSettings, images, plan: LoadPlan, work: Path) -> dict:
    run, outcomes = load_once(settings, images, plan, work, "overload")
    audit = audit_store(settings.data, _answered(outcomes))
    statuses = set(run.summary["statuses"])
    growth = run.rss.get("growth_after_warm_mib")
    checks = {"only_200_and_503": statuses <= {"200", "503"}, "saw_503": "503" in statuses,
              "retry_after_on_every_503": run.summary["503_without_retry_after"] == 0,
              "zero_lost": audit.get("missing_rows", 1) == 0 and audit.get("missing_pictures", 1) == 0,
              f"rss_growth_after_warm_under_{RSS_GROWTH_LIMIT_MIB:g}_mib": growth is not None
              and growth < RSS_GROWTH_LIMIT_MIB}
    return {"runs": [asdict(run)], "audit": audit, "checks": checks}


def scenario_batching(settings: ServerSettings, images, plan: LoadPlan, work: Path, max_batches: list[int],
                      rounds: int) -> dict:
    """Each --max-batches value once per round on a fresh server, the order rotated per round (drift of the
    machine hits every setting alike), the answers of the rounds pooled per setting."""
    pooled: dict[int, list[tuple[Run, list[Outcome]]]] = {m: [] for m in max_batches}
    for r in range(rounds):
        order = max_batches[r % len(max_batches):] + max_batches[:r % len(max_batches)]
        for max_batch in order:
            one = ServerSettings(**{**asdict(settings), "max_batch": max_batch,
                                    "data": settings.data.with_name(f"{settings.data.name}-b{max_batch}-r{r}")})
            pooled[max_batch].append(load_once(one, images, plan, work, f"batch{max_batch}-round{r}"))
    runs = []
    for max_batch, done in pooled.items():
        outcomes = [o for _, outs in done for o in outs]
        wall = sum(run.summary["wall_s"] for run, _ in done)
        batches = sum(run.batches["batches"] for run, _ in done)
        mean = round(sum(run.batches["batches"] * (run.batches["mean_batch"] or 0) for run, _ in done) / batches, 2) \
            if batches else None
        runs.append({"label": f"max_batch {max_batch}", "max_batch": max_batch, "summary": summarize(outcomes, wall),
                     "batches": {"batches": batches, "mean_batch": mean},
                     "rss_peak_mib": max(run.rss.get("peak_mib", 0) for run, _ in done),
                     "rounds": [asdict(run) for run, _ in done]})
    checks = {"no_5xx": all(r["summary"]["other_5xx"] == 0 for r in runs),
              "zero_lost": all(r["summary"]["statuses"].get("no answer", 0) == 0 for r in runs)}
    return {"runs": runs, "checks": checks}


def scenario_fault(settings: ServerSettings, images, plan: LoadPlan, work: Path, kills: int) -> dict:
    """kill -9 after each (k+1)/(kills+1) of the answers, restart on the same data, finish; then the audit."""
    outcomes: list[Outcome] = []
    phases = []
    for phase in range(kills + 1):
        server = ServerProcess(settings, work / f"fault-{phase}.log").start()
        target = plan.requests * (phase + 1) // (kills + 1) if phase < kills else None
        remaining = LoadPlan(**{**asdict(plan), "requests": plan.requests - len(outcomes)})
        began = time.monotonic()
        done, killed = run_load(server.url, images, remaining, phase=phase, first_index=len(outcomes),
                                kill_after=None if target is None else max(1, target - _answers(outcomes)),
                                kill=server.kill)
        ended = killed or time.monotonic()
        # no answer: cut off by the kill (its request was under way when the server died), else lost
        cut = sum(1 for o in done if o.status is None and killed is not None and o.ended >= killed)
        phases.append({"phase": phase, "started_s": round(server.started_s, 2), "killed": killed is not None,
                       "summary": summarize(done, ended - began), "rss": rss_profile(server.rss, began, ended),
                       "cut_by_the_kill": cut, "lost": sum(1 for o in done if o.status is None) - cut})
        outcomes += done
        if killed is None:
            break                          # the last phase: the server stays up for the GETs below
    answered = _answered(outcomes)
    served = get_results(server.url, [o.result_id for o in answered])
    server.stop()
    audit = audit_store(settings.data, answered)
    not_served = sorted(i for i, status in served.items() if status != 200)
    checks = {"every_2xx_served_after_restart": not not_served, "every_2xx_has_row": audit.get("missing_rows") == 0,
              "every_2xx_has_its_pictures": audit.get("missing_pictures") == 0,
              "no_row_names_a_missing_file": audit.get("rows_naming_a_missing_file") == 0,
              "no_half_written_png": audit.get("bad_pngs") == 0,
              "temp_files_only_where_no_row_points": audit.get("temp_files_in_row_folders") == 0,
              "no_unexpected_files": audit.get("unexpected_files") == 0,
              "store_opens_cleanly": audit["store_opens"] and audit.get("integrity_check") == "ok",
              "no_answer_lost_outside_a_kill": sum(p["lost"] for p in phases) == 0,
              "killed": sum(p["killed"] for p in phases) == kills}
    return {"phases": phases, "audit": audit, "not_served_after_restart": not_served[:5],
            "summary": summarize(outcomes, sum(p["summary"]["wall_s"] for p in phases)), "checks": checks}


def _answered(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.result_id is not None]


def _answers(outcomes: list[Outcome]) -> int:
    return sum(1 for o in outcomes if o.status is not None)


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


# the report


def table(result: dict) -> list[str]:
    from edgeretina.text_tables import table_lines

    header = ("run", "requests", "2xx/s", "p50 ms", "p90 ms", "p99 ms", "statuses", "mean batch", "RSS start/peak/end MiB")
    rows = []
    for run in result.get("runs", []) + result.get("phases", []):
        s, rss = run["summary"], run.get("rss", {})
        lat = s["latency_ms_2xx"]
        label = run.get("label") or f"phase {run['phase']}" + (" (killed)" if run.get("killed") else "")
        rss_text = (f"{rss['start_mib']}/{rss['peak_mib']}/{rss['end_mib']}" if rss
                    else f"-/{run.get('rss_peak_mib', '-')}/-")
        rows.append((label, str(s["requests"]), str(s["ok_per_s"]), str(lat.get("p50", "-")), str(lat.get("p90", "-")),
                     str(lat.get("p99", "-")), " ".join(f"{k}:{v}" for k, v in s["statuses"].items()),
                     str(run.get("batches", {}).get("mean_batch", "-")), rss_text))
    lines = table_lines(rows, ["left"] + ["right"] * 5 + ["left", "right", "right"], header)
    if "audit" in result:
        audit = result["audit"]
        keep = ("store_opens", "integrity_check", "rows", "answered_2xx", "missing_rows", "missing_pictures",
                "rows_without_a_2xx", "rows_naming_a_missing_file", "pngs_checked", "bad_pngs", "temp_files",
                "temp_files_in_row_folders", "orphan_folders", "unexpected_files", "staging_leftovers")
        lines += ["", "store: " + ", ".join(f"{k} {audit[k]}" for k in keep if k in audit)]
    lines += ["", "checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in result["checks"].items())]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=SCENARIOS, default="load")
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: print only)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients (load/batching/fault 16, overload 32)")
    parser.add_argument("--requests", type=int, default=None, help="posts per run (2000)")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="time bound per run")
    parser.add_argument("--images", type=Path, default=None, help="a folder of photos (default: phantom JPEGs)")
    parser.add_argument("--image-count", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=512, help="phantom photo height in px")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--queue-size", type=int, default=None, help="(overload 1, else 32)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-batches", default="1,8,16", help="batching: the --max-batch values compared")
    parser.add_argument("--rounds", type=int, default=1, help="batching: rounds over the values, rotated")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--timeout-s", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=None, help="the backend's threads (default: all cores)")
    parser.add_argument("--kills", type=int, default=1, help="fault: SIGKILLs, evenly spaced over the answers")
    parser.add_argument("--work", type=Path, default=None, help="data folders and server logs (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep --work's data and logs")
    parser.add_argument("--check", action="store_true", help="exit 1 when a check fails")
    args = parser.parse_args()

    defaults = SCENARIO_DEFAULTS[args.scenario]
    work = args.work or Path(tempfile.mkdtemp(prefix="serve-load-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = ServerSettings(bundle=args.bundle.resolve(), data=work / f"data-{args.scenario}", workers=args.workers,
                              queue_size=args.queue_size or defaults["queue_size"], max_batch=args.max_batch,
                              batch_wait_ms=args.batch_wait_ms, timeout_s=args.timeout_s, threads=args.threads)
    plan = LoadPlan(clients=args.clients or defaults["clients"], requests=args.requests or defaults["requests"],
                    max_seconds=args.max_seconds)
    result = run_scenario(args, settings, plan, work)
    for line in table(result):
        print(line)
    if args.out:
        from edgeretina.atomic import write_text_atomic

        write_text_atomic(args.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    elif args.keep:
        print(f"kept {work}")
    if args.check and not all(result["checks"].values()):
        raise SystemExit(1)


def run_scenario(args, settings: ServerSettings, plan: LoadPlan, work: Path) -> dict:
    from edgeretina.bench import machine_info
    from edgeretina.cpu import cpu_class

    images = load_images(args.images, args.image_count, args.image_size, work)
    head = {"scenario": args.scenario, "bundle": str(settings.bundle), "plan": asdict(plan),
            "server": _jsonable(asdict(settings)), "images": {"count": len(images), "mean_kib": round(
                sum(len(d) for _, d in images) / len(images) / 1024, 1), "source": str(args.images or
                                                                                       f"phantom {args.image_size} px")},
            "cpu_class": cpu_class(), "machine": machine_info(), "loadavg_before": os.getloadavg(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if args.scenario == "load":
        body = scenario_load(settings, images, plan, work)
    elif args.scenario == "overload":
        body = scenario_overload(settings, images, plan, work)
    elif args.scenario == "batching":
        body = scenario_batching(settings, images, plan, work, [int(v) for v in args.max_batches.split(",")],
                                 args.rounds)
    else:
        body = scenario_fault(settings, images, plan, work, args.kills)
    return {**head, **body, "loadavg_after": os.getloadavg()}


if __name__ == "__main__":
    main()
