"""Who may call the service: an API key, required whenever the service listens beyond this machine.

A key is a secret in a file (``--api-key-file``), never on the command line (where `ps` shows it to every
user). Clients send it as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``; it is compared with
``hmac.compare_digest``, whose time does not depend on where the first wrong byte is.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

from edgeretina.errors import ConfigError

MIN_KEY_LENGTH = 16          # a key short enough to guess is a password; `openssl rand -hex 32` gives 64
API_KEY_HEADER = "X-API-Key"


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the service on this machine: 127.0.0.0/8, ::1 or `localhost`. Any other
    name may resolve to an outside address, and 0.0.0.0 / :: listen on every interface."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def read_api_key(path: str | os.PathLike) -> str:
    """The key in `path` (one line; surrounding whitespace dropped). Raises ConfigError when it cannot be read,
    is empty, shorter than MIN_KEY_LENGTH, or holds more than one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read the API key file {path}: {reason}") from None
    key = text.strip()
    if not key:
        raise ConfigError(f"the API key file {path} is empty")
    if "\n" in key or "\r" in key:
        raise ConfigError(f"the API key file {path} must hold one line (the key), not several")
    if len(key) < MIN_KEY_LENGTH:
        raise ConfigError(f"the API key in {path} is {len(key)} characters; use at least {MIN_KEY_LENGTH} "
                          f"(e.g. `openssl rand -hex 32 > {path.name}`)")
    return key


def key_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison; a missing key never matches."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def api_key_dependency(expected: str):
    """A FastAPI dependency that answers 401 unless the request carries `expected` in either header. Declared
    through FastAPI's security classes, so the OpenAPI page offers both schemes under "Authorize"."""
    from fastapi import HTTPException, Security
    from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
    header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="X-API-Key: KEY")

    async def require_api_key(credentials: HTTPAuthorizationCredentials | None = Security(bearer),
                              api_key: str | None = Security(header)) -> None:
        given = [key for key in (credentials.credentials if credentials is not None else None, api_key) if key]
        if not any(key_matches(key, expected) for key in given):
            detail = "API key not accepted" if given else "API key missing"
            raise HTTPException(status_code=401, detail=f"{detail}: send Authorization: Bearer KEY or "
                                                        f"{API_KEY_HEADER}: KEY",
                                headers={"WWW-Authenticate": "Bearer"})

    return require_api_key


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def allowed_hosts(bind_host: str, extra: tuple[str, ...] = ()) -> list[str] | None:
    """The Host header values a keyless (loopback) service answers: the loopback names, the bound address
    and `extra` (--allowed-host). A web page whose domain an attacker re-points at 127.0.0.1 (DNS rebinding)
    is then refused: its requests carry the attacker's name. None (no check) when the service listens beyond
    loopback: the API key guards it there, and the names clients use for it are the site's to choose."""
    if not is_loopback(bind_host):
        return None
    return sorted({*LOOPBACK_NAMES, bind_host.strip(), *extra})


class CrossSiteGuard:
    """ASGI middleware: a POST that a browser sends from another site is refused with 403 before any body is
    read. A form or `fetch(..., {mode: "no-cors"})` on any page the technician has open could otherwise make
    the loopback service (no key there) grade and store a photo — a cross-site request needs no CORS
    preflight. Browsers mark such requests (`Origin`, `Sec-Fetch-Site`); camera software and curl send
    neither and pass. An origin listed in --cors-origin is allowed."""

    def __init__(self, app, cors_origins: tuple[str, ...] = ()):
        self.app = app
        self.cors_origins = {origin.rstrip("/").lower() for origin in cors_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST" and self._cross_site(scope):
            from starlette.responses import JSONResponse

            response = JSONResponse({"detail": "cross-site request refused: this service grades requests from "
                                               "its own page, API clients, or a --cors-origin"}, status_code=403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _cross_site(self, scope) -> bool:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        origin = headers.get("origin", "").rstrip("/").lower()
        if origin and origin in self.cors_origins:
            return False
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            return True
        if not origin:
            return False          # no browser's cross-origin request: curl, camera software
        if origin == "null":
            return True           # a sandboxed frame or a file:// page
        return origin.split("://", 1)[-1] != headers.get("host", "").lower()
