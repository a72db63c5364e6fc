"""One uploaded photo, from the request to a file in a staging folder: raw body or multipart field `file`.

The size limit is enforced while the body streams in: a declared Content-Length over it is refused before one
byte is read (a client that sent `Expect: 100-continue` then never sends the body), and a body without one
(chunked) is counted chunk by chunk and refused as soon as it passes the limit. Nothing is held in memory
beyond one chunk (a multipart file part goes through Starlette's spooled file, 1 MB in memory at most). What
is left unread of a refused body uvicorn reads and drops after the response, so the client sees the 413.

The type is sniffed from the bytes (sniff.py); the file is named by the service, with the sniffed type's
suffix. The client's file name is kept only as text, for the record.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request

from edgeretina.serve.sniff import KINDS, SNIFF_BYTES, ImageKind, describe_head, sniff

UPLOAD_FIELD = "file"
DEFAULT_NAME = "upload"
MAX_NAME_LENGTH = 255


class UploadRejected(Exception):
    """The request's body is not one photo the service can take: `status` says which HTTP answer."""

    def __init__(self, status: int, detail: str):
        self.status = status
        self.detail = detail
        super().__init__(detail)


class _BodyTooLarge(Exception):
    pass


@dataclass
class Upload:
    path: Path           # the staged file, named by the service
    name: str            # the client's file name (text only), or DEFAULT_NAME
    kind: ImageKind
    bytes: int


async def receive_upload(request: Request, folder: Path, max_bytes: int, name: str | None = None) -> Upload:
    """Stream the request's photo into `folder` and check what it is. Raises UploadRejected: 413 (too large),
    400 (empty, or multipart without a `file` field), 415 (not JPEG, PNG, TIFF or DICOM)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise UploadRejected(413, _too_large(max_bytes))
    limited = Request(request.scope, _limited(request.receive, max_bytes))
    target = folder / "upload"
    try:
        if _is_multipart(request):
            size, given = await _receive_multipart(limited, target)
        else:
            size, given = await _receive_raw(limited, target), None
    except _BodyTooLarge:
        raise UploadRejected(413, _too_large(max_bytes)) from None
    except MultiPartException as exc:
        raise UploadRejected(400, f"malformed multipart body: {exc}") from None
    except ClientDisconnect:
        raise UploadRejected(400, "the client disconnected before the body was complete") from None
    if size == 0:
        raise UploadRejected(400, f"empty upload: send the photo as the request body or as multipart field "
                                  f"`{UPLOAD_FIELD}`")
    with open(target, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    kind = sniff(head)
    if kind is None:
        accepted = ", ".join(k.name for k in KINDS)
        raise UploadRejected(415, f"not a photo this service grades ({accepted} expected; the upload starts "
                                  f"with {describe_head(head)}); the type is read from the bytes, not the name")
    staged = target.rename(target.with_suffix(kind.suffix))
    return Upload(path=staged, name=_display_name(name or given), kind=kind, bytes=size)


def _limited(receive, max_bytes: int):
    """`receive` that raises _BodyTooLarge once the body passes max_bytes."""
    seen = 0

    async def limited_receive():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                raise _BodyTooLarge()
        return message

    return limited_receive


async def _receive_raw(request: Request, target: Path) -> int:
    size = 0
    with open(target, "wb") as fh:
        async for chunk in request.stream():
            fh.write(chunk)   # one chunk (<= 64 KiB from uvicorn) into the page cache: no thread hop
            size += len(chunk)
    return size


async def _receive_multipart(request: Request, target: Path) -> tuple[int, str | None]:
    async with request.form(max_files=1, max_fields=8) as form:
        part = form.get(UPLOAD_FIELD)
        if not isinstance(part, UploadFile):
            raise UploadRejected(400, f"the multipart body has no file field `{UPLOAD_FIELD}`")
        # a part over 1 MB was spooled to disk by Starlette: copy it off the event loop
        return await run_in_threadpool(_copy_to, part.file, target), part.filename


def _copy_to(source, target: Path) -> int:
    with open(target, "wb") as fh:
        shutil.copyfileobj(source, fh)
        return fh.tell()


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def _display_name(name: str | None) -> str:
    """The client's name as text for the record: control characters dropped, length bounded."""
    cleaned = "".join(ch for ch in (name or "") if ch.isprintable()).strip()
    return cleaned[:MAX_NAME_LENGTH] or DEFAULT_NAME


def _too_large(max_bytes: int) -> str:
    return f"upload larger than the service's limit of {max_bytes / (1024 * 1024):g} MiB (--max-upload-mb)"
