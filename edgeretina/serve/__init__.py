"""The grading service: `edgeretina serve`, an HTTP API (FastAPI + uvicorn) in front of ONE Grader.

Built on the runtime, never imported by it. One file per concern: ``config`` (ServeConfig, validated before
anything binds), ``security`` (API keys, the loopback rule), ``sniff`` (image type from the bytes),
``upload`` (a request body to a file, size-limited while it streams), ``queue`` (the bounded batching queue in
front of the grader), ``service`` (grader lifecycle, queue, results store: the service without HTTP),
``metrics`` (Prometheus text) and ``app`` (routes: ``create_app(config)``).

Only ``app`` and ``upload`` import FastAPI/Starlette; ``require_extra()`` says which package of the [serve]
extra is missing before anything imports them.
"""

from __future__ import annotations

import importlib

from edgeretina.errors import MissingDependencyError

# (module, package to install): python-multipart parses multipart uploads
_EXTRA = (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart"))


def require_extra() -> None:
    """Raise MissingDependencyError naming the [serve] extra when one of its packages is not installed."""
    for module, package in _EXTRA:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingDependencyError(package, "serve", "edgeretina serve") from None
