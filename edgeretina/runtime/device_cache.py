"""Results measured once on this device and kept: on-device verification, runtime settings re-measured on a
CPU class other than the export machine's. JSON files under the user cache directory, written atomically.

Location: $EDGERETINA_CACHE_DIR, else $XDG_CACHE_HOME/edgeretina, else ~/.cache/edgeretina. A cache that
cannot be written (read-only file system) costs a re-measurement next time, never a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from edgeretina.atomic import write_json_atomic


def cache_root() -> Path:
    explicit = os.environ.get("EDGERETINA_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgeretina"


def cache_key(*parts: object) -> str:
    """A file-name-safe digest of the parts (JSON-encoded, so dicts and lists are keyed by value)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def read_entry(kind: str, key: str) -> dict | None:
    path = cache_root() / kind / f"{key}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_entry(kind: str, key: str, data: dict) -> bool:
    """Store `data`; False when the cache cannot be written."""
    path = cache_root() / kind / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
    except OSError:
        return False
    return True


def entries(kind: str) -> list[dict]:
    folder = cache_root() / kind
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            found.append(data)
    return found
