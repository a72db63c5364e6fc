"""ServeConfig: every setting of the grading service, checked before anything binds or loads.

The one rule that is not a range check: a service that listens beyond this machine (any host but loopback)
needs an API key, so a `--host 0.0.0.0` without `--api-key-file` is refused here, not discovered later by
whoever reaches the port.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from edgeretina.errors import ConfigError
from edgeretina.runtime.verify import VERIFY_MODES
from edgeretina.serve.security import is_loopback, read_api_key
from edgeretina.signing import TrustList

DEFAULT_DATA = Path("edgeretina-data")
MIB = 1024 * 1024


@dataclass
class ServeConfig:
    bundle: Path
    host: str = "127.0.0.1"
    port: int = 8000                      # 0: any free port (tests)
    data: Path = DEFAULT_DATA             # results store (results.sqlite3, files/) and upload staging (tmp/)
    workers: int = 1                      # inference threads in front of the one Grader
    queue_size: int = 32                  # requests waiting for a worker; one more is answered 503
    max_batch: int = 8                    # requests graded in one Grader call; 1: no micro-batching
    batch_wait_ms: float = 5.0            # how long a worker waits for a batch to fill once it holds one request
    timeout_s: float = 30.0               # per request, from the queue to the grade; then 504
    max_upload_mb: float = 32.0           # request body limit, enforced while it streams in; then 413
    api_key_file: Path | None = None      # required when `host` is not loopback
    cors_origins: tuple[str, ...] = ()    # no CORS middleware at all unless origins are given
    allowed_hosts: tuple[str, ...] = ()   # Host names a loopback service answers besides the loopback ones
    backend: str | None = None            # as Grader(...)
    threads: int | None = None            # the backend's own threads per inference
    device: str | None = None
    trust: TrustList | str | os.PathLike | None = "environment"   # as Grader(trust=...)
    verify: str = "cached"                # as Grader(verify=...); /readyz is 200 only for a verified bundle
    api_key: str | None = field(default=None, init=False, repr=False)   # read from api_key_file

    def __post_init__(self) -> None:
        self.bundle, self.data = Path(self.bundle), Path(self.data)
        self.api_key_file = Path(self.api_key_file) if self.api_key_file is not None else None
        self.cors_origins = tuple(self.cors_origins)
        self.allowed_hosts = tuple(self.allowed_hosts)
        for origin in self.cors_origins:
            if origin == "*" or "://" not in origin:
                raise ConfigError(f"--cors-origin must be one origin such as https://viewer.clinic.example, got "
                                  f"{origin!r}")
        _check_int("port", self.port, 0, 65535)
        _check_int("workers", self.workers, 1, 64)
        _check_int("queue_size", self.queue_size, 1, 100_000)
        _check_int("max_batch", self.max_batch, 1, 1024)
        _check_number("batch_wait_ms", self.batch_wait_ms, 0.0, 10_000.0)
        _check_number("timeout_s", self.timeout_s, 0.001, 86_400.0)
        _check_number("max_upload_mb", self.max_upload_mb, 0.001, 4096.0)
        if self.threads is not None:
            _check_int("threads", self.threads, 1, 1024)
        if self.verify not in VERIFY_MODES:
            raise ConfigError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {self.verify!r}")
        if not self.bundle.exists():
            raise ConfigError(f"bundle not found: {self.bundle}")
        if self.api_key_file is not None:
            self.api_key = read_api_key(self.api_key_file)
        elif not is_loopback(self.host):
            raise ConfigError(f"--host {self.host} listens beyond this machine: an API key is required "
                              f"(--api-key-file PATH, one line, e.g. `openssl rand -hex 32 > PATH`), or bind "
                              f"127.0.0.1")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def batch_wait_s(self) -> float:
        return self.batch_wait_ms / 1000.0

    @property
    def staging(self) -> Path:
        """Where uploads wait while they are graded: under the data folder, so a crash leaves nothing in /tmp
        and the service's own start removes what it left (service.py)."""
        return self.data / "tmp"


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer from {low} to {high}, got {value!r}")


def _check_number(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ConfigError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
