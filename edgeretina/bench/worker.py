"""One benchmark configuration (bundle x backend x threads x batch) in its own process.

`python -m edgeretina.bench.worker --bundle B --backend X --threads T --batch N --images LIST`

A process per configuration keeps peak memory honest (VmHWM is this process only) and keeps one
backend's thread pools and caches away from the next. The worker loads the bundle, grades once cold,
then answers requests from the parent, one JSON line in and one JSON line out, so the parent can
alternate between configurations in rounds:
  {"op": "runs", "n": K}   -> {"latencies_ms": [...], "with_overlay_ms": [...], "stages": [{stage: ms per image}, ...]}
  {"op": "fidelity"}       -> {"files": [...], "grades": [...], "embeddings": [[...], ...]}
  {"op": "stop"}           -> {"peak_rss_mb": ...}
The first line it writes is {"ready": ...} or {"error": "..."}. Torch-free: it runs on the runtime alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO


def peak_rss_mb() -> float:
    """VmHWM (peak resident set) of this process from /proc/self/status, in MB; 0.0 where there is no /proc."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    return 0.0


class Worker:
    def __init__(self, bundle: str, backend: str, threads: int, batch: int, images: list[str]):
        from edgeretina.preprocess import expand_frames
        from edgeretina.runtime.grader import Grader

        started = time.perf_counter()
        self.grader = Grader(bundle, backend=backend, threads=threads)
        self.load_s = time.perf_counter() - started
        self.batch = batch
        # one entry per image graded: a multi-frame DICOM is one per frame, so a batch of N is N images
        self.images = expand_frames(images)
        self._next = 0

    def cold_first_ms(self) -> float:
        started = time.perf_counter()
        list(self.grader.grade_iter(self.images[:1], batch_size=1))
        return (time.perf_counter() - started) * 1000.0

    def _next_batch(self) -> list:
        """The next `batch` images, cycling through the set, so every run sees different photographs."""
        paths = [self.images[(self._next + i) % len(self.images)] for i in range(self.batch)]
        self._next = (self._next + self.batch) % len(self.images)
        return paths

    def timed_runs(self, n: int) -> dict:
        from edgeretina.runtime.overlay import render_overlay

        latencies, with_overlay, stages = [], [], []
        for _ in range(n):
            paths = self._next_batch()
            started = time.perf_counter()
            graded = list(self.grader.grade_iter(paths, batch_size=self.batch))
            latencies.append((time.perf_counter() - started) * 1000.0)
            overlays_ms = 0.0
            for item in graded:
                timings = dict(item.record.timings_ms)
                # Saliency rendering lives beside the grader (an app renders it on demand): timed on
                # its own, outside the end-to-end latency.
                if item.geometry is not None and item.image is not None and item.overlay_map is not None:
                    t0 = time.perf_counter()
                    render_overlay(item.image, item.overlay_map, item.geometry)   # the lesion map's making counts
                    timings["overlay"] = (time.perf_counter() - t0) * 1000.0
                    overlays_ms += timings["overlay"]
                stages.append(timings)
            with_overlay.append(latencies[-1] + overlays_ms)
        return {"latencies_ms": latencies, "with_overlay_ms": with_overlay, "stages": stages}

    def fidelity(self) -> dict:
        """Grades and embeddings of every gradable image, from the grader's own pipeline."""
        files, grades, embeddings = self.grader.grades_and_embeddings(self.images, batch_size=self.batch)
        return {"files": files, "grades": grades, "embeddings": embeddings.tolist()}


def _requests(stream: TextIO) -> Iterator[dict]:
    for line in stream:
        if line.strip():
            yield json.loads(line)


def serve(args: argparse.Namespace, reply: TextIO) -> int:
    from edgeretina.errors import EdgeRetinaError

    def send(message: dict) -> None:
        reply.write(json.dumps(message) + "\n")
        reply.flush()

    images = [line for line in Path(args.images).read_text().splitlines() if line]
    try:
        worker = Worker(args.bundle, args.backend, args.threads, args.batch, images)
        cold_ms = worker.cold_first_ms()
    except EdgeRetinaError as exc:
        send({"error": str(exc)})
        return 1
    grader = worker.grader
    send({"ready": True, "load_s": worker.load_s, "cold_ms": cold_ms, "precision": grader.precision,
          "runner": grader.runner.describe(), "knn_scorer": grader.bank.scorer.name if grader.bank is not None else None})
    for request in _requests(sys.stdin):
        op = request.get("op")
        try:
            if op == "runs":
                send(worker.timed_runs(int(request["n"])))
            elif op == "fidelity":
                send(worker.fidelity())
            elif op == "stop":
                send({"peak_rss_mb": peak_rss_mb()})
                return 0
            else:
                send({"error": f"unknown request {op!r}"})
        except EdgeRetinaError as exc:
            send({"error": str(exc)})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--images", required=True, help="text file, one image path per line")
    args = parser.parse_args(argv)
    # stdout carries the protocol alone: anything a backend prints goes to stderr.
    reply = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr
    os.dup2(sys.stderr.fileno(), 1)
    return serve(args, reply)


if __name__ == "__main__":
    sys.exit(main())
