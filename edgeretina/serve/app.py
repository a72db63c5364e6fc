"""The HTTP API: ``create_app(config)`` -> a FastAPI app (uvicorn runs it; tests run it in a thread).

Routes (the OpenAPI page at /docs lists them with their answers):
  POST /v1/grade                        one photo (raw body or multipart field `file`) -> its record
  GET  /v1/results                      history, newest first (since, screening, limit)
  GET  /v1/results/{id}                 one stored result
  GET  /v1/results/{id}/overlay.png     its saliency overlay; .../card.png its report card
  GET  /healthz  /readyz  /metrics      alive; loaded and verified (else 503 and why); Prometheus text
  GET  /                                the web page (static/index.html; its script and style under /static/)

A result is the record `edgeretina grade --json` gives, plus `id`, `created`, `origin`, `file_name`,
`bundle_sha256` and `links` (self, overlay, card); its `overlay` is the overlay's link. With an API key
configured every /v1 route and /metrics need it; /healthz, /readyz, the page and the docs do not.
"""

from __future__ import annotations

import json
import math
from contextlib import asynccontextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from edgeretina import __version__
from edgeretina.errors import ConfigError, StoreError
from edgeretina.runtime.store import MAX_LIMIT, PICTURES, StoredResult
from edgeretina.serve.config import ServeConfig
from edgeretina.serve.metrics import CONTENT_TYPE, MetricsMiddleware
from edgeretina.serve.queue import QueueClosed, QueueFull
from edgeretina.serve.security import CrossSiteGuard, allowed_hosts, api_key_dependency
from edgeretina.serve.service import GradeTimeout, GradingService, NotReady
from edgeretina.serve.sniff import KINDS
from edgeretina.serve.upload import UPLOAD_FIELD, UploadRejected, receive_upload

STATIC = Path(__file__).with_name("static")
PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_ERROR = {"content": {"application/json": {"example": {"detail": "why"}}}}


class Screening(str, Enum):
    negative = "negative"
    referable = "referable"
    ungradable = "ungradable"


class StrictJSONResponse(JSONResponse):
    """JSON without NaN or Infinity (not JSON; browsers' parsers reject them): a non-finite number is null."""

    def render(self, content: Any) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def create_app(config: ServeConfig, service: GradingService | None = None) -> FastAPI:
    """The app for `config`. Opens the results store now (StoreError before anything binds); the grader
    loads in the background once the app starts (lifespan), and /readyz tells when it is ready."""
    service = service or GradingService(config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    app = FastAPI(title="edgeretina grading service", version=__version__, lifespan=lifespan,
                  description="Diabetic-retinopathy grading of fundus photographs with an exported, verified bundle.",
                  default_response_class=StrictJSONResponse)
    app.state.service = service
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    hosts = allowed_hosts(config.host, config.allowed_hosts)
    if hosts is not None:       # loopback, no key: refuse DNS-rebound names (security.allowed_hosts)
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    app.add_middleware(CrossSiteGuard, cors_origins=config.cors_origins)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)   # added last: outermost, sees every answer
    auth = [Depends(api_key_dependency(config.api_key))] if config.api_key else []
    _add_probe_routes(app, service, auth)
    _add_grade_route(app, service, auth)
    _add_result_routes(app, service, auth)
    return app


def _add_probe_routes(app: FastAPI, service: GradingService, auth: list) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return _page_file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def page_asset(name: str) -> Response:
        return _page_file(name)

    @app.get("/healthz", summary="Alive: the process answers (says nothing about the bundle)")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Ready: the bundle is loaded and verified on this device",
             responses={503: {"description": "Not ready, and why", **_ERROR}})
    async def readyz() -> Response:
        ready, body = service.readiness()
        return StrictJSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", dependencies=auth, response_class=PlainTextResponse,
             summary="Prometheus metrics (text exposition format 0.0.4)")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)


_GRADE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": [UPLOAD_FIELD],
                                       "properties": {UPLOAD_FIELD: {"type": "string", "format": "binary"}}}},
    **{kind.media_type: {"schema": {"type": "string", "format": "binary"}} for kind in KINDS},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}}}


def _add_grade_route(app: FastAPI, service: GradingService, auth: list) -> None:
    config = service.config

    @app.post("/v1/grade", dependencies=auth, openapi_extra=_GRADE_BODY,
              summary="Grade one fundus photograph (JPEG, PNG, TIFF or DICOM)",
              description="The photo as the raw request body, or as multipart field `file`. Its type is read from "
                          "its bytes. The answer is committed to the results store before it is sent.",
              responses={400: {"description": "Empty or malformed body", **_ERROR},
                         401: {"description": "API key missing or wrong", **_ERROR},
                         413: {"description": "Body over --max-upload-mb", **_ERROR},
                         415: {"description": "Not JPEG, PNG, TIFF or DICOM", **_ERROR},
                         422: {"description": "The image does not decode (the decoder's reason)", **_ERROR},
                         503: {"description": "Queue full or bundle not loaded (Retry-After)", **_ERROR},
                         504: {"description": "Not graded within --timeout-s", **_ERROR}})
    async def grade(request: Request, filename: str | None = Query(
            None, max_length=1024, description="The photo's name for the record, for a raw body "
                                               "(multipart sends its own)")) -> Response:
        try:
            service.require_loaded()
        except NotReady as exc:
            raise _unavailable(exc.reason, exc.retry_after_s) from None
        stage = service.new_stage()    # microseconds, and in this task: a cancelled await cannot leak it
        try:
            try:
                upload = await receive_upload(request, stage, config.max_upload_bytes, filename)
            except UploadRejected as exc:
                raise HTTPException(exc.status, exc.detail) from None
            try:
                graded = await service.grade(upload.path)
            except QueueFull as exc:
                raise _unavailable(str(exc), exc.retry_after_s) from None
            except QueueClosed as exc:
                raise _unavailable(str(exc), None) from None
            except GradeTimeout as exc:
                raise HTTPException(504, str(exc)) from None
            try:
                outcome = await run_in_threadpool(service.store_graded, graded, upload.path, upload.name)
            except StoreError as exc:   # graded, but not committed: the client must not think it was
                raise HTTPException(500, f"graded, but the result could not be stored: {exc}") from None
        finally:
            await run_in_threadpool(service.remove_stage, stage)
        if not outcome.rows:
            failure = outcome.failed[0] if outcome.failed else {"error": "nothing to grade in the upload",
                                                                "decoded": False}
            # a file that does not decode is the client's (422); one that decoded and still failed is ours (500)
            raise HTTPException(422 if not failure["decoded"] else 500, failure["error"])
        root = request.scope.get("root_path", "")
        body = result_view(outcome.rows[0], root)
        if len(outcome.rows) > 1 or outcome.failed:
            body["frames"] = [_frame_summary(row, root) for row in outcome.rows] + \
                             [{"frame": f["frame"], "error": f["error"]} for f in outcome.failed]
        return StrictJSONResponse(body)


def _add_result_routes(app: FastAPI, service: GradingService, auth: list) -> None:
    store = service.store

    @app.get("/v1/results", dependencies=auth, summary="History of stored results, newest first")
    async def history(request: Request,
                      since: str | None = Query(None, description="Only results created at or after this ISO 8601 "
                                                                  "time (UTC when it has no zone)"),
                      screening: Screening | None = Query(None, description="Only this screening outcome"),
                      limit: int = Query(50, ge=1, le=MAX_LIMIT)) -> Response:
        try:
            rows = await run_in_threadpool(store.query, since, screening.value if screening else None, limit)
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from None
        root = request.scope.get("root_path", "")
        return StrictJSONResponse({"results": [result_view(row, root) for row in rows], "count": len(rows)})

    @app.get("/v1/results/{result_id}", dependencies=auth, summary="One stored result",
             responses={404: {"description": "No such result", **_ERROR}})
    async def result(request: Request, result_id: str) -> Response:
        row = await run_in_threadpool(store.get, result_id)
        if row is None:
            raise HTTPException(404, f"no result {result_id}")
        return StrictJSONResponse(result_view(row, request.scope.get("root_path", "")))

    for kind in PICTURES:
        _add_picture_route(app, store, kind, auth)


def _add_picture_route(app: FastAPI, store, kind: str, auth: list) -> None:
    async def picture(result_id: str) -> Response:
        path = await run_in_threadpool(store.picture_path, result_id, kind)
        if path is None:
            raise HTTPException(404, f"no {kind} for result {result_id}")
        # a stored picture never changes: its id names it
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=31536000, immutable"})

    app.add_api_route(f"/v1/results/{{result_id}}/{kind}.png", picture, methods=["GET"], dependencies=auth,
                      response_class=FileResponse, summary=f"The result's {kind} (PNG)",
                      responses={200: {"content": {"image/png": {}}}, 404: {"description": f"No {kind}", **_ERROR}})


def _page_file(name: str) -> Response:
    """One of the page's own files, by name from a fixed list (never a path a client chose); the page may
    load nothing but itself, this service's answers and the blob: URLs it makes of the pictures."""
    media_type = PAGE_FILES.get(name)
    if media_type is None or not (STATIC / name).is_file():
        raise HTTPException(404, f"no page file {name}")
    return FileResponse(STATIC / name, media_type=media_type, headers={"Content-Security-Policy": PAGE_POLICY})


def result_view(row: StoredResult, root_path: str = "") -> dict:
    """A stored result as the API shows it: the record, its id and provenance, and links to its pictures."""
    base = f"{root_path}/v1/results/{row.id}"
    links = {"self": base, **{kind: f"{base}/{kind}.png" for kind in PICTURES if kind in row.pictures}}
    return {**row.record, "overlay": links.get("overlay"), "id": row.id, "created": row.created,
            "origin": row.origin, "file_name": row.file_name, "bundle_sha256": row.bundle_sha256, "links": links}


def _frame_summary(row: StoredResult, root_path: str) -> dict:
    view = result_view(row, root_path)
    return {"frame": (row.record.get("dicom") or {}).get("frame"), "id": row.id, "screening": row.screening,
            "grade": row.grade, "links": view["links"]}


def _unavailable(reason: str, retry_after_s: int | None) -> HTTPException:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return HTTPException(503, reason, headers=headers)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
