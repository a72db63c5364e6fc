from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeretina.cli import app
from edgeretina.cli._options import Backend, BundleOption, ThreadsOption, TrustOption, VerifyOption, enum_value, \
    trust_setting, verify_setting


@app.command(epilog="Example: edgeretina serve --bundle bundle-cpu --host 0.0.0.0 --api-key-file /etc/edgeretina/key")
def serve(
    bundle: BundleOption,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but loopback needs --api-key-file.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port.")] = 8000,
    data: Annotated[Path, typer.Option(
        "--data", help="Folder of the results store (results.sqlite3, files/) and of uploads being graded.")] = Path("edgeretina-data"),
    workers: Annotated[int, typer.Option(
        "--workers", min=1, help="Inference threads in front of the one grader (not processes).")] = 1,
    queue_size: Annotated[int, typer.Option(
        "--queue-size", min=1, help="Requests that may wait for a worker; beyond that the answer is 503 + Retry-After.")] = 32,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", min=1, help="Requests graded in one model call; 1 turns micro-batching off.")] = 8,
    batch_wait_ms: Annotated[float, typer.Option(
        "--batch-wait-ms", min=0, help="How long a worker waits for a batch to fill.")] = 5.0,
    timeout_s: Annotated[float, typer.Option("--timeout-s", help="Per-request grading timeout (then 504).")] = 30.0,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Request body limit in MiB (then 413).")] = 32.0,
    api_key_file: Annotated[Optional[Path], typer.Option(
        "--api-key-file", help="File holding the API key (one line, 16+ characters); clients send "
                               "'Authorization: Bearer KEY' or 'X-API-Key: KEY'.")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option(
        "--cors-origin", help="Allow browser pages from this origin (repeatable); no CORS without it.")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option(
        "--allowed-host", help="A Host name a loopback service answers besides localhost/127.0.0.1/::1 (repeatable).")] = None,
    backend: Annotated[Optional[Backend], typer.Option("--backend", help="Inference backend (default: the installed one that best fits the bundle).")] = None,
    threads: ThreadsOption = None,
    device: Annotated[Optional[str], typer.Option("--device", help="Backend device (as for grade).")] = None,
    trust: TrustOption = None,
    verify: VerifyOption = True,
) -> None:
    """Serve grading over HTTP: POST /v1/grade, result history, /healthz, /readyz, /metrics; docs at /docs."""
    from edgeretina.serve import require_extra
    from edgeretina.serve.config import ServeConfig

    # every setting is checked (the API key rule included) before FastAPI is imported or a port is bound
    config = ServeConfig(bundle=bundle, host=host, port=port, data=data, workers=workers, queue_size=queue_size,
                         max_batch=max_batch, batch_wait_ms=batch_wait_ms, timeout_s=timeout_s,
                         max_upload_mb=max_upload_mb, api_key_file=api_key_file, cors_origins=tuple(cors_origin or ()),
                         allowed_hosts=tuple(allowed_host or ()),
                         backend=enum_value(backend), threads=threads, device=device, trust=trust_setting(trust),
                         verify=verify_setting(verify))
    require_extra()
    import uvicorn

    from edgeretina.serve.app import create_app

    _log_service_messages()
    application = create_app(config)   # opens the results store: a damaged one stops here
    typer.echo(f"edgeretina serve: {bundle} on http://{host}:{port} (API docs at /docs, results in {data})", err=True)
    uvicorn.run(application, host=config.host, port=config.port, log_level="info", server_header=False)


def _log_service_messages() -> None:
    """The service's own lines (bundle loaded, or why not) beside uvicorn's, in its format."""
    logger = logging.getLogger("edgeretina.serve")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
