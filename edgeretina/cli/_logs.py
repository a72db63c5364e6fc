"""Where warnings go while a command decodes images: to a log file, never into its output.

Codec libraries print about damaged files (libtiff's "Not enough data at scanline ...") and Pillow warns
through Python's warnings (DecompressionBombWarning); in a terminal both landed in the middle of the results
table. Within ``warnings_to_log`` they are records of the ``edgeretina`` and ``py.warnings`` loggers, written
to the --log file (appended) or dropped. What a damaged file means for its result is in its record anyway
("truncated or corrupt image (libjpeg: ...)"); the log keeps the libraries' own words.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.errors import ConfigError
from edgeretina.native_output import native_stderr_to_log

LogOption = Annotated[Optional[Path], typer.Option(
    "--log", help="Append warnings (codec messages about damaged files, library warnings) to this file; "
                  "without it they are not shown. Results never contain them.")]

_LOGGERS = ("edgeretina", "py.warnings")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def warnings_to_log(log_file: Path | None, create_folder: bool = False) -> Iterator[None]:
    """create_folder: make the log file's folder first (a command's own output folder, e.g. watch's --out)."""
    handler = _handler(log_file, create_folder)
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    before = [(logger, logger.propagate, logger.level) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False  # the root logger (and its last-resort stderr handler) never sees them
        logger.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        with native_stderr_to_log():
            yield
    finally:
        logging.captureWarnings(False)
        for logger, propagate, level in before:
            logger.removeHandler(handler)
            logger.propagate, logger.level = propagate, level
        handler.close()


def _handler(log_file: Path | None, create_folder: bool) -> logging.Handler:
    if log_file is None:
        return logging.NullHandler()
    if create_folder:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create folder {log_file.parent}: {e.strerror or e}") from None
    if log_file.is_dir():
        raise ConfigError(f"--log must name a file, {log_file} is a folder")
    if not log_file.parent.is_dir():
        raise ConfigError(f"--log: folder {log_file.parent} does not exist")
    handler = logging.FileHandler(log_file, encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter(_FORMAT))
    return handler
