"""What C libraries print goes to a log, not to the console.

Codec libraries (libtiff inside Pillow, OpenCV, the DICOM pixel-data plugins) write warnings about damaged
files straight to file descriptor 2 ("LZWDecode: Not enough data at scanline 85"), bypassing Python. In a
terminal they land in the middle of a results table. ``native_stderr_to_log`` points descriptor 2 at a
pipe for the duration of a command and forwards each line to the ``edgeretina.native`` logger, while
Python's own ``sys.stderr`` (error lines, progress, tracebacks) keeps writing to the real stderr.

Process-wide by nature (a descriptor has no notion of threads): the CLI commands that decode images use it
(``grade``, ``watch``, ``bench``); a library caller decides for its own process.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from collections.abc import Iterator

NATIVE_LOGGER = "edgeretina.native"

#: How long closing waits for the last lines; a child process still holding the pipe must not stall exit.
_DRAIN_TIMEOUT_S = 2.0


@contextlib.contextmanager
def native_stderr_to_log(logger: logging.Logger | None = None) -> Iterator[None]:
    """Within the block, bytes written to descriptor 2 by native code become log records (WARNING) of
    ``logger`` (default ``edgeretina.native``), one per line. Nothing is captured when descriptor 2 is not
    open (a daemon) or when ``sys.stderr`` does not write to it (pytest's capture, a notebook)."""
    logger = logger or logging.getLogger(NATIVE_LOGGER)
    saved = _dup_stderr()
    if saved is None:
        yield
        return
    python_stderr = sys.stderr
    python_stderr.flush()
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = _text_stream(saved, python_stderr)
    forwarder = threading.Thread(target=_forward_lines, args=(read_end, logger), name="native-stderr", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = python_stderr
        os.dup2(saved, 2)  # closes the pipe's write end: the forwarder reads the rest, then end of file
        os.close(saved)
        forwarder.join(_DRAIN_TIMEOUT_S)


def _dup_stderr() -> int | None:
    try:
        if sys.stderr is None or sys.stderr.fileno() != 2:
            return None
        return os.dup(2)
    except (OSError, ValueError, io.UnsupportedOperation, AttributeError):
        return None


def _text_stream(fd: int, like: io.TextIOBase) -> io.TextIOWrapper:
    """A line-buffered text stream on a copy of ``fd``, with the encoding and error handler of ``like``."""
    raw = os.fdopen(os.dup(fd), "wb", buffering=0)
    return io.TextIOWrapper(raw, encoding=getattr(like, "encoding", None) or "utf-8",
                            errors=getattr(like, "errors", None) or "backslashreplace", line_buffering=True)


def _forward_lines(read_end: int, logger: logging.Logger) -> None:
    with os.fdopen(read_end, "rb") as pipe:
        for raw in pipe:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                logger.warning("%s", line)
