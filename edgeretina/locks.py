"""One writer per folder: an exclusive, non-blocking flock on a lock file, released when the process dies."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


class ExclusiveLock:
    """`with ExclusiveLock(path, refused):` holds an flock on `path` (created if missing); when another process
    holds it, raises `refused(path)` at once (POSIX; the devices this runs on are Linux). Closing releases it."""

    def __init__(self, path: str | os.PathLike, refused: Callable[[Path], Exception]):
        self.path = Path(path)
        self.refused = refused
        self.fd: int | None = None

    def __enter__(self) -> "ExclusiveLock":
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise self.refused(self.path) from None
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)
