"""Where the workers run: a Ray started in this process, or a cluster this process joins as a driver.

Without an address: $RAY_ADDRESS when it is set (what `ray job submit` gives its entrypoint), else a local Ray
with every CPU of this machine (``ray.init(num_cpus=os.cpu_count())``), no dashboard, shut down at the end.
``auto`` joins the cluster this machine belongs to (`ray start --head` / `ray start --address=...`), HOST:PORT
(or ray://HOST:10001) a given one. A Ray this process already runs (a test, a notebook) is used as it is and
left running.

Quiet: Ray's own console output (worker output, Ray Data's operator logs, the C++ core's warnings, the
tracebacks its driver threads forward) goes to Ray's session log files only, because the console is the
progress display and a failure is one error line; set EDGERETINA_DEBUG=1 to see all of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

from edgeretina.archive.config import LOCAL
from edgeretina.errors import ArchiveError
from edgeretina.native_output import native_stderr_to_log

_WORKER_REFUSAL = re.compile(r"ArchiveError: (.+)")


@dataclass
class RaySession:
    address: str            # "local" when started here
    started_here: bool      # we own it: nothing else can join or grow it, and we shut it down
    cpus: float             # the cluster's CPUs when the run started
    nodes: int


def resolve_address(address: str | None) -> str:
    if address:
        return address
    return os.environ.get("RAY_ADDRESS") or LOCAL


@contextlib.contextmanager
def ray_session(address: str | None, log: Callable[[str], None] = lambda _: None) -> Iterator[RaySession]:
    """Ray for the length of the block (see the module docstring). Raises ArchiveError when it cannot start or
    join one. Joining an address nobody answers at takes as long as Ray keeps retrying (about a minute)."""
    import ray

    debug = bool(os.environ.get("EDGERETINA_DEBUG"))
    if ray.is_initialized():
        yield _describe(ray, "(this process's Ray)", started_here=False)
        return
    resolved = resolve_address(address)
    log(f"starting a local Ray with {os.cpu_count()} CPU(s)" if resolved == LOCAL
        else f"joining the Ray cluster at {resolved}")
    if resolved != LOCAL:
        _check_reachable(resolved)
    if not debug:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")   # the C++ core's console warnings
    options = dict(include_dashboard=False, log_to_driver=debug, logging_level=logging.INFO if debug else logging.ERROR)
    try:
        with _native_lines_dropped(debug):      # the core's start-up lines, printed by C++ straight to fd 2
            if resolved == LOCAL:
                ray.init(address=LOCAL, num_cpus=os.cpu_count(), **options)
            else:
                ray.init(address=resolved, **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ArchiveError(f"cannot start or join Ray at {resolved}: {_first_line(exc)}") from None
    try:
        quiet_ray_data(debug)
        with contextlib.nullcontext() if debug else _ray_threads_muted():
            yield _describe(ray, resolved, started_here=resolved == LOCAL)
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) nobody listens at fails now, in one line: ray.init would retry for
    minutes, silently once its own warnings are off. ``auto`` is left to Ray (it fails fast when no cluster runs)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ArchiveError(f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one there with "
                           f"`ray start --head`, or leave --ray-address out to use a local Ray") from None


@contextlib.contextmanager
def _native_lines_dropped(debug: bool) -> Iterator[None]:
    if debug:
        yield
        return
    logger = logging.getLogger("edgeretina.archive.ray")
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
        logger.propagate = False
    with native_stderr_to_log(logger):
        yield


class _MutedForRayThreads:
    """sys.stdout/sys.stderr as they were, except for what Ray's own driver threads print (``ray_listen_error_messages``
    forwards every failed actor task's traceback, e.g. each retry of a worker that refused the bundle): the reason
    reaches the user once, as our error line, and the whole story stays in Ray's session logs."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        if threading.current_thread().name.startswith("ray_"):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _ray_threads_muted() -> Iterator[None]:
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _MutedForRayThreads(sys.stdout), _MutedForRayThreads(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def _describe(ray, address: str, started_here: bool) -> RaySession:
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    return RaySession(address=address, started_here=started_here,
                      cpus=float(ray.cluster_resources().get("CPU", 0.0)), nodes=len(nodes))


def quiet_ray_data(debug: bool = False) -> None:
    """Ray Data without its progress bars and console logs (they stay in the session's ray-data.log)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False   # the progress lines are ours
    if debug:
        return
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":             # the session log file keeps everything
            handler.setLevel(logging.CRITICAL)


def job_failure(exc: BaseException) -> ArchiveError:
    """The one line a failed Ray job comes down to: a worker's refusal of the bundle (ArchiveError raised in its
    constructor, which Ray wraps in ActorDiedError with the worker's traceback), else Ray's first line."""
    refusals = _WORKER_REFUSAL.findall(str(exc))
    if refusals:
        return ArchiveError(refusals[-1].strip())
    return ArchiveError(f"the Ray job failed: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
