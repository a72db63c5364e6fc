"""Damaged files at scale (issue 12): decode -> field of view -> quality -> preprocess on mutated JPEG, PNG, TIFF
and DICOM files, in worker processes, so that a crash or a hang is counted instead of ending the run.

The cases: the seed files of `edgeretina.phantom.damage` (one small phantom photograph as JPEG baseline 4:2:0,
progressive and with restart markers; PNG 8-bit, 16-bit and palette; TIFF raw, LZW and deflate; DICOM native RGB
and JPEG baseline YBR_FULL_422), each case 1-3 random damages of one seed (`damage.mutate`: bit flips, byte
overwrites, zero runs, truncation, insertions, duplicated or removed segments, header field edits, PNG CRCs
repaired half of the time) drawn from a numpy Generator seeded with `--seed` and the format, so a run is
reproducible case for case (the cases one run gets through depend on the machine's speed).

Each case is written to a file and run the way `Grader._load` runs a file (`iter_sources` -> `ImageSource.decode`
-> `detect_fov` -> `assess_quality`, then `prepare` for every photo, gradable or not) by one of `--workers`
worker processes (forkserver: a worker holds only the modules the pipeline needs). Counted per format:

- `graded`: every image of the file came out sane (RGB uint8 photo, finite field of view, a quality verdict, the
  model input at its size); `refused`: the library's decode errors (ImageDecodeError, DicomError,
  MissingDependencyError), by message prefix (`refused_by_message`, numbers as N);
- `unexpected`: any other exception, by type and message (`unexpected_by_type`); `insane`: an output check failed;
- `crashes`: the worker died with the case (a signal such as SIGSEGV, or an exit); `hangs`: the case ran over
  `--timeout` seconds, the worker was killed and replaced. Every crash, hang, insane output and each distinct
  unexpected exception saves its file under OUT/reproducers/;
- seconds per case in the worker (median, p99, max; the slowest case named), and the peak RSS of the format's
  workers: `ru_maxrss` (kibibytes on Linux, reported in MiB), with an idle worker's beside it (a worker starts from
  the forkserver's resident modules, so the difference is what the cases added).

Writes OUT/fuzz_decode.json: machine (CPU model, `cpu_class`, cores, library versions), settings (and the load
average before and after), per-format counts and totals. Exit 0, or 1 with `--check` when any crash, hang,
unexpected exception or insane output was seen.

`--self-check` first runs one case that kills its worker (SIGSEGV) and one that sleeps past a 2 s timeout, and
records (apart from the formats' counts) that the harness counted both and went on.

Usage: python benchmarks/fuzz_decode.py --out DIR [--seconds-per-format 45] [--formats jpeg,png,tiff,dicom]
       [--workers N] [--timeout 10] [--seed 0] [--max-cases N] [--self-check] [--check]
About 4 x --seconds-per-format (3 minutes at the defaults), plus a few seconds per format to start workers.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import re
import shutil
import statistics
import sys
import time
from collections import Counter
from multiprocessing.connection import wait
from pathlib import Path
from typing import Iterator

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

#: what the workers load before forking, so that a replaced worker starts in milliseconds
PRELOAD = ["numpy", "cv2", "PIL.Image", "edgeretina.preprocess", "edgeretina.quality"]
#: package versions that decide what a damaged file does (the decoders)
CODECS = ("numpy", "pillow", "opencv-python-headless", "simplejpeg", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg",
          "pylibjpeg-openjpeg")
MAX_REPRODUCERS = 20        # per format and kind: enough to debug, not a disk full of one bug


# ------------------------------------------------------------------------------------------- worker side

#: with --self-check, a worker given these bytes dies of SIGSEGV / sleeps past any timeout
SELF_CHECK = {"crash": b"edgeretina fuzz self-check: crash", "hang": b"edgeretina fuzz self-check: hang"}


def _worker(conn, fmt: str, scratch: str, self_check: bool = False) -> None:
    """Runs cases sent over ``conn`` until it is closed: (case id, bytes) in, a result dict out. What the codecs
    print on descriptor 2 (libtiff, OpenCV: a line per damaged file) is discarded once the worker is ready."""
    import resource
    import warnings

    import cv2

    from edgeretina.phantom import damage

    warnings.simplefilter("ignore")     # Pillow on damaged files: corrupt EXIF, tags past the end, bomb warnings
    cv2.setNumThreads(1)                # the grader's IMAGE_THREADS
    path = Path(scratch) / f"worker-{os.getpid()}{damage.SUFFIX[fmt]}"
    for data in damage.seed_files(fmt).values():   # load every decoder once: the idle RSS below includes them
        _run_case(path, data)
    conn.send({"ready": True, "idle_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    while True:
        try:
            case_id, data = conn.recv()
        except EOFError:
            return
        if self_check and data == SELF_CHECK["crash"]:
            import signal

            os.kill(os.getpid(), signal.SIGSEGV)
        if self_check and data == SELF_CHECK["hang"]:
            time.sleep(3600)
        started = time.perf_counter()
        result = _run_case(path, data)
        result.update(case=case_id, seconds=time.perf_counter() - started,
                      rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        conn.send(result)


def _run_case(path: Path, data: bytes) -> dict:
    """One file through the runtime's per-image steps. outcome: graded | refused | unexpected | insane."""
    import traceback

    from edgeretina.errors import ImageDecodeError, MissingDependencyError
    from edgeretina.preprocess import PreprocessConfig, detect_fov, iter_sources, prepare
    from edgeretina.quality import assess_quality

    config = PreprocessConfig()
    path.write_bytes(data)
    outcomes, refusal = [], None
    try:
        for source in iter_sources([path]):
            try:
                rgb = source.decode(config.decode_max_side)
            except (ImageDecodeError, MissingDependencyError) as exc:
                refusal = refusal or str(exc).replace(str(path), "FILE")
                outcomes.append("refused")
                continue
            fov = detect_fov(rgb)
            report = assess_quality(rgb, fov)
            prepared, geometry = prepare(rgb, config, fov)
            problem = _insane(rgb, fov, report, prepared, geometry, config)
            if problem:
                return {"outcome": "insane", "message": problem}
            outcomes.append("graded")
    except Exception as exc:  # noqa: BLE001 - the point: anything but the library's errors is a finding
        return {"outcome": "unexpected", "type": type(exc).__name__, "message": str(exc)[:300],
                "traceback": traceback.format_exc(limit=-6)[-3000:]}
    if not outcomes:
        return {"outcome": "insane", "message": "the file gave no image: it would have no record"}
    if "graded" in outcomes:
        return {"outcome": "graded", "images": len(outcomes)}
    return {"outcome": "refused", "images": len(outcomes), "message": refusal or "no image"}


def _insane(rgb, fov, report, prepared, geometry, config) -> str | None:
    from edgeretina.preprocess import MAX_PIXELS
    from edgeretina.quality import REASONS

    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3):
        return f"decoded {type(rgb).__name__} {getattr(rgb, 'dtype', '')} {getattr(rgb, 'shape', '')}"
    if not 1 <= rgb.shape[0] * rgb.shape[1] <= MAX_PIXELS:
        return f"decoded {rgb.shape}"
    if not np.isfinite([fov.cx, fov.cy, fov.radius, fov.fraction_visible]).all() or not 0 <= fov.fraction_visible <= 1:
        return f"field of view {fov}"
    if report.gradable != (not report.reasons) or not set(report.reasons) <= set(REASONS) or not 0 <= report.score <= 1:
        return f"quality {report.gradable} {report.reasons} {report.score}"
    if not all(np.isfinite(v) for v in report.measures.values()):
        return f"quality measures {report.measures}"
    if prepared.shape != (config.image_size, config.image_size, 3) or prepared.dtype != np.uint8:
        return f"prepared {prepared.dtype} {prepared.shape}"
    if tuple(geometry.original_size) != tuple(rgb.shape[:2]):
        return f"geometry {geometry.original_size} for {rgb.shape}"
    return None


# ------------------------------------------------------------------------------------------- parent side

class Worker:
    """One worker process and the case it is running."""

    def __init__(self, ctx, fmt: str, scratch: Path, self_check: bool = False):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, fmt, str(scratch), self_check), daemon=True)
        self.process.start()
        child.close()
        self.case: dict | None = None
        self.started = 0.0
        self.ready = False

    def send(self, case: dict) -> None:
        self.case, self.started = case, time.perf_counter()
        self.conn.send((case["id"], case["data"]))

    def stop(self, kill: bool = False) -> int | None:
        if kill:
            self.process.kill()
        self.conn.close()
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        return self.process.exitcode


def message_prefix(message: str) -> str:
    """The kind of refusal: the message up to its details (parenthesis, colon, quote), numbers as N."""
    head = re.split(r"[(:'\"]", message, maxsplit=1)[0].strip()
    return re.sub(r"\d+", "N", head) or message[:60]


class FormatRun:
    """The counts of one format."""

    def __init__(self, fmt: str, out: Path):
        self.fmt, self.out = fmt, out
        self.counts = Counter()
        self.refused = Counter()
        self.unexpected: dict[str, dict] = {}
        self.operators = Counter()
        self.seeds = Counter()
        self.seconds: list[float] = []
        self.slowest: dict | None = None
        self.peak_rss_kib, self.idle_rss_kib = 0, []
        self.peak_case: dict | None = None
        self.findings: list[dict] = []
        self.restarts = 0

    def record(self, case: dict, result: dict) -> None:
        self.counts["cases"] += 1
        self.counts[result["outcome"]] += 1
        self.counts["images"] += result.get("images", 1)
        self.seconds.append(result["seconds"])
        if self.slowest is None or result["seconds"] > self.slowest["seconds"]:
            self.slowest = {**_describe(case), "seconds": round(result["seconds"], 5), "outcome": result["outcome"],
                            "message": result.get("message", "")[:200]}
        if result["rss_kib"] > self.peak_rss_kib:
            self.peak_rss_kib = result["rss_kib"]
            self.peak_case = {**_describe(case), "outcome": result["outcome"],
                              "message": result.get("message", "")[:200]}
        if result["outcome"] == "refused":
            self.refused[message_prefix(result["message"])] += 1
        elif result["outcome"] == "unexpected":
            key = f"{result['type']}: {message_prefix(result['message'])}"
            if key not in self.unexpected:
                self.unexpected[key] = {"count": 0, "message": result["message"], "traceback": result["traceback"],
                                        "reproducer": self.save(case, "unexpected"), **_describe(case)}
            self.unexpected[key]["count"] += 1
        elif result["outcome"] == "insane":
            self.finding(case, "insane", result["message"])

    def finding(self, case: dict, kind: str, what: str) -> None:
        """A crash, a hang or an insane output: counted, and its file kept."""
        if kind != "insane":
            self.counts["cases"] += 1
            self.counts[kind] += 1
        self.findings.append({"kind": kind, "what": what, "reproducer": self.save(case, kind), **_describe(case)})

    def save(self, case: dict, kind: str) -> str | None:
        if sum(1 for f in self.findings if f["kind"] == kind) >= MAX_REPRODUCERS:
            return None
        from edgeretina.phantom import damage

        folder = self.out / "reproducers"
        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(case["data"]).hexdigest()[:12]
        path = folder / f"{self.fmt}-{kind}-{case['seed']}-{digest}{damage.SUFFIX[self.fmt]}"
        path.write_bytes(case["data"])
        what = "\n".join([f"seed {case['seed']}", *case["operations"]])
        path.with_suffix(path.suffix + ".txt").write_text(what + "\n")
        return str(path.relative_to(self.out))

    def summary(self, seconds: float) -> dict:
        times = np.array(self.seconds) if self.seconds else np.zeros(1)
        return {
            "cases": self.counts["cases"], "images": self.counts["images"], "graded": self.counts["graded"],
            "refused": self.counts["refused"], "crashes": self.counts["crash"], "hangs": self.counts["hang"],
            "unexpected": self.counts["unexpected"], "insane": self.counts["insane"],
            "refused_by_message": dict(self.refused.most_common()),
            "unexpected_by_type": self.unexpected,
            "findings": self.findings,
            "seconds_per_case": {"median": round(float(np.median(times)), 5),
                                 "p99": round(float(np.percentile(times, 99)), 5), "max": round(float(times.max()), 5)},
            "slowest_case": self.slowest,
            "peak_rss_mib": round(self.peak_rss_kib / 1024, 1),
            "idle_worker_rss_mib": round(statistics.median(self.idle_rss_kib) / 1024, 1) if self.idle_rss_kib else None,
            "peak_rss_case": self.peak_case,
            "worker_restarts": self.restarts,
            "cases_per_seed": dict(self.seeds), "operations": dict(self.operators.most_common()),
            "wall_s": round(seconds, 1),
        }


def _describe(case: dict) -> dict:
    return {"case": case["id"], "seed": case["seed"], "operations": case["operations"]}


def random_cases(fmt: str, seed: int, seconds: float, max_cases: int, run: FormatRun) -> Iterator[dict]:
    """Damaged seeds of ``fmt`` for ``seconds`` (or ``max_cases`` cases), from a Generator seeded by (seed, format)."""
    from edgeretina.phantom import damage

    seeds = damage.seed_files(fmt)
    names = sorted(seeds)
    rng = np.random.default_rng([seed, damage.FORMATS.index(fmt)])
    deadline = time.perf_counter() + seconds
    made = 0
    while time.perf_counter() < deadline and not (max_cases and made >= max_cases):
        name = names[int(rng.integers(len(names)))]
        data, operations = damage.mutate(seeds[name], rng)
        made += 1
        run.seeds[name] += 1
        run.operators.update(op.split("(")[0] for op in operations)
        yield {"id": made, "seed": name, "data": data, "operations": operations}


def fuzz_format(ctx, fmt: str, cases: Iterator[dict], run: FormatRun, workers: int, timeout: float, scratch: Path,
                self_check: bool = False) -> dict:
    """Runs ``cases`` on a pool of ``workers`` fresh worker processes; a case whose worker dies is a crash, one
    over ``timeout`` seconds a hang (its worker killed); either way the worker is replaced and the run goes on."""
    pool = [Worker(ctx, fmt, scratch, self_check) for _ in range(workers)]
    started = time.perf_counter()

    def next_case() -> dict | None:
        return next(cases, None)

    def replace(worker: Worker, kill: bool) -> Worker:
        worker.stop(kill=kill)
        run.restarts += 1
        fresh = Worker(ctx, fmt, scratch, self_check)
        pool[pool.index(worker)] = fresh
        return fresh

    pending = True
    while pool:
        for worker in list(pool):
            if worker.ready and worker.case is None:
                case = next_case() if pending else None
                if case is None:
                    pending = False
                    worker.stop()
                    pool.remove(worker)
                else:
                    worker.send(case)
        if not pool:
            break
        ready = wait([w.conn for w in pool] + [w.process.sentinel for w in pool], timeout=0.2)
        now = time.perf_counter()
        for worker in list(pool):
            message = None
            try:
                if worker.conn in ready or worker.conn.poll():
                    message = worker.conn.recv()
            except (EOFError, OSError):     # the worker died: below
                message = None
            if message is not None:
                if message.get("ready"):
                    worker.ready = True
                    run.idle_rss_kib.append(message["idle_rss_kib"])
                else:
                    run.record(worker.case, message)
                    worker.case = None
                continue
            if not worker.process.is_alive():
                code = worker.process.exitcode
                if worker.case is None and not worker.ready:
                    raise RuntimeError(f"a {fmt} worker died while starting (exit code {code})")
                if worker.case is not None:
                    by_signal = f" (signal {-code})" if code and code < 0 else ""
                    run.finding(worker.case, "crash", f"worker exit code {code}{by_signal}")
                replace(worker, kill=False)
            elif worker.case is not None and now - worker.started > timeout:
                run.finding(worker.case, "hang", f"over {timeout:g} s")
                replace(worker, kill=True)
    return run.summary(time.perf_counter() - started)


def self_check(ctx, scratch: Path) -> dict:
    """Three JPEG cases on one worker: its seed, one that kills the worker (SIGSEGV), one that sleeps past a
    2 s timeout. Counted like any other cases, apart from the formats' counts: the harness sees both."""
    from edgeretina.phantom import damage

    seed = damage.seed_files("jpeg")["baseline_420"]
    cases = iter([{"id": 1, "seed": "baseline_420", "data": seed, "operations": []},
                  {"id": 2, "seed": "self-check", "data": SELF_CHECK["crash"], "operations": ["SIGSEGV"]},
                  {"id": 3, "seed": "self-check", "data": SELF_CHECK["hang"], "operations": ["sleep 3600 s"]},
                  {"id": 4, "seed": "baseline_420", "data": seed, "operations": []}])
    summary = fuzz_format(ctx, "jpeg", cases, FormatRun("jpeg", scratch), 1, 2.0, scratch, self_check=True)
    passed = (summary["crashes"], summary["hangs"], summary["graded"], summary["worker_restarts"]) == (1, 1, 2, 2)
    print(f"self-check: crash counted {summary['crashes']}, hang counted {summary['hangs']}, graded after them "
          f"{summary['graded']}: {'ok' if passed else 'FAILED'}", flush=True)
    return {"passed": passed, "crashes": summary["crashes"], "hangs": summary["hangs"], "graded": summary["graded"],
            "worker_restarts": summary["worker_restarts"],
            "findings": [{"kind": f["kind"], "what": f["what"]} for f in summary["findings"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for fuzz_decode.json and reproducers/")
    parser.add_argument("--seconds-per-format", type=float, default=45.0)
    parser.add_argument("--formats", default="jpeg,png,tiff,dicom")
    parser.add_argument("--workers", type=int, default=max(1, min(os.cpu_count() or 1, 8)))
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds after which a case counts as a hang")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-cases", type=int, default=0, help="stop a format after this many cases (0: time only)")
    parser.add_argument("--self-check", action="store_true", help="first show that a crash and a hang are counted: "
                        "one case kills its worker with SIGSEGV, one sleeps past a 2 s timeout (recorded apart)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on any crash, hang, unexpected error or insane output")
    args = parser.parse_args(argv)

    from edgeretina.atomic import write_json_atomic
    from edgeretina.bench import machine_info
    from edgeretina.bench.machine import library_versions
    from edgeretina.cpu import cpu_class
    from edgeretina.errors import MissingDependencyError
    from edgeretina.phantom import damage

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(damage.FORMATS))
    if unknown:
        parser.error(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(damage.FORMATS)}")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.out / ".scratch"
    scratch.mkdir(exist_ok=True)
    started, load_before = time.perf_counter(), os.getloadavg()
    results, skipped = {}, {}
    try:
        check = self_check(ctx, scratch) if args.self_check else None
        for fmt in formats:
            try:
                damage.seed_files(fmt)
            except MissingDependencyError as exc:     # DICOM without the dicom extra
                print(f"{fmt}: skipped ({exc})", flush=True)
                skipped[fmt] = str(exc)
                continue
            print(f"{fmt}: {args.seconds_per_format:g} s, {args.workers} worker(s) ...", flush=True)
            run = FormatRun(fmt, args.out)
            cases = random_cases(fmt, args.seed, args.seconds_per_format, args.max_cases, run)
            results[fmt] = fuzz_format(ctx, fmt, cases, run, args.workers, args.timeout, scratch)
            r = results[fmt]
            print(f"  {r['cases']} cases: {r['graded']} graded, {r['refused']} refused, crashes {r['crashes']}, "
                  f"hangs {r['hangs']}, unexpected {r['unexpected']}, insane {r['insane']}; per case median "
                  f"{1e3 * r['seconds_per_case']['median']:.1f} ms, max {r['seconds_per_case']['max']:.2f} s; "
                  f"peak RSS {r['peak_rss_mib']} MiB (idle worker {r['idle_worker_rss_mib']})", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    keys = ("cases", "images", "graded", "refused", "crashes", "hangs", "unexpected", "insane")
    totals = {key: sum(r[key] for r in results.values()) for key in keys}
    totals["peak_rss_mib"] = max((r["peak_rss_mib"] for r in results.values()), default=0.0)
    totals["max_seconds_per_case"] = max((r["seconds_per_case"]["max"] for r in results.values()), default=0.0)
    result = {
        "machine": {**machine_info(), "cpu_class": cpu_class(), "codecs": library_versions(CODECS)},
        "settings": {"seconds_per_format": args.seconds_per_format, "formats": formats, "workers": args.workers,
                     "timeout_s": args.timeout, "seed": args.seed, "max_cases": args.max_cases,
                     "seed_size_px": damage.SEED_SIZE, "seed_case": damage.SEED_CASE,
                     "seed_files": {fmt: {name: len(data) for name, data in damage.seed_files(fmt).items()}
                                    for fmt in results},
                     "skipped_formats": skipped,
                     "pipeline": "iter_sources -> ImageSource.decode(decode_max_side 1024) -> detect_fov -> "
                                 "assess_quality -> prepare(224 px), OpenCV 1 thread",
                     "rss_unit": "MiB (ru_maxrss, KiB on Linux, / 1024), per worker process",
                     "date": time.strftime("%Y-%m-%d"),
                     "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "self_check": check,
        "formats": results,
        "totals": totals,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(args.out / "fuzz_decode.json", result)
    print(f"{result['machine']['cpu']} ({result['machine']['cpu_class']}): {totals['cases']} cases, crashes "
          f"{totals['crashes']}, hangs {totals['hangs']}, unexpected {totals['unexpected']}, "
          f"insane {totals['insane']}, "
          f"peak RSS {totals['peak_rss_mib']} MiB; wrote {args.out / 'fuzz_decode.json'}")
    bad = totals["crashes"] + totals["hangs"] + totals["unexpected"] + totals["insane"]
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
