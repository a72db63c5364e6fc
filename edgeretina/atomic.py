"""Write files so that a reader never sees half of one: write a temp file beside it, fsync, rename."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object], mode: int | None = None) -> Path:
    """Run `write(fh)` on a temporary binary file beside `path`, then rename it into place: a writer that
    streams (torch.save) needs no copy of the whole content in memory. On any error the temporary goes.
    mode: the file's permission bits from the moment it exists (e.g. 0o600 for a private key)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with _create(tmp, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """mode: the file's permission bits from the moment it exists (e.g. 0o600 for a private key)."""
    return write_atomic(path, lambda fh: fh.write(data), mode)


def _create(tmp: Path, mode: int | None):
    if mode is None:
        return open(tmp, "wb")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.fchmod(fd, mode)   # os.open's mode is reduced by the umask; make it exactly `mode`
    return os.fdopen(fd, "wb")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")
