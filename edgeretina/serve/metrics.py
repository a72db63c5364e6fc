"""Prometheus metrics, written by hand in the text exposition format (0.0.4): no client library for a dozen
lines of counters.

What a dashboard of a screening service needs: requests by route, method and status; graded images by
screening outcome (and uploads refused as undecodable); request latency as a histogram; the queue's depth and
capacity and how many requests it turned away; how big the grader's batches are (what micro-batching buys).
Routes are labelled by their template (``/v1/results/{result_id}``), never by the raw path, so the label set
stays small whatever clients send.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from typing import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
UNMATCHED_ROUTE = "unmatched"   # 404s: any path at all, one label


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)   # the last one: above every bucket (+Inf only)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            out.append(f"{name}_bucket{_labels({**labels, 'le': _number(bound)})} {cumulative}")
        out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {self.count}")
        out.append(f"{name}_sum{_labels(labels)} {_number(self.sum)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class Metrics:
    """Thread-safe counters; `render` reads the live gauges (queue depth ...) through `gauges`."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]] | None = None):
        """gauges: metric name -> (help text, a function returning its current value)."""
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, str]] = Counter()
        self._latency: dict[str, Histogram] = {}
        self._outcomes: Counter[str] = Counter()
        self._rejected = 0
        self._batches = Histogram(BATCH_BUCKETS)
        self._gauges = dict(gauges or {})

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(route, method, str(status))] += 1
            self._latency.setdefault(route, Histogram(LATENCY_BUCKETS_S)).observe(seconds)

    def count_outcome(self, screening: str) -> None:
        with self._lock:
            self._outcomes[screening] += 1

    def count_rejected(self) -> None:
        with self._lock:
            self._rejected += 1

    def observe_batch(self, size: int, seconds: float = 0.0, waited_s: float = 0.0) -> None:
        with self._lock:
            self._batches.observe(size)

    def render(self) -> str:
        with self._lock:
            lines = _header("edgeretina_http_requests_total", "counter", "HTTP requests by route, method and status.")
            lines += [f"edgeretina_http_requests_total{_labels({'route': r, 'method': m, 'status': s})} {n}"
                      for (r, m, s), n in sorted(self._requests.items())]
            lines += _header("edgeretina_http_request_duration_seconds", "histogram",
                             "Time from the request's arrival to its response, by route.")
            for route, histogram in sorted(self._latency.items()):
                lines += histogram.lines("edgeretina_http_request_duration_seconds", {"route": route})
            lines += _header("edgeretina_grade_outcomes_total", "counter",
                             "Graded images by screening outcome (error: uploads that did not decode, not stored).")
            lines += [f"edgeretina_grade_outcomes_total{_labels({'screening': s})} {n}"
                      for s, n in sorted(self._outcomes.items())]
            lines += _header("edgeretina_queue_rejected_total", "counter",
                             "Requests answered 503 because the grading queue was full.")
            lines.append(f"edgeretina_queue_rejected_total {self._rejected}")
            lines += _header("edgeretina_batch_size", "histogram", "Images per grader call (micro-batching).")
            lines += self._batches.lines("edgeretina_batch_size", {})
            gauges = list(self._gauges.items())
        for name, (help_text, read) in gauges:   # outside the lock: a gauge may take locks of its own
            lines += _header(name, "gauge", help_text)
            lines.append(f"{name} {_number(float(read()))}")
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Pure ASGI: times every HTTP request and counts it under its route template and final status. Outermost,
    so it also sees the answers that never reach a route (404, a body refused as too large)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500   # an exception before any response: the server answers 500

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            self.metrics.observe_request(route, scope.get("method", ""), status, time.perf_counter() - started)


def _header(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(int(value)) if float(value).is_integer() else repr(float(value))
