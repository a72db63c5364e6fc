"""The grading actor: one Grader per Ray worker, built (and the bundle verified) before it grades anything.

``GradeWorker`` is the callable class `map_batches` runs in an actor pool. Its constructor is where the bundle
is checked *on that worker's machine*: the Grader loads it strictly (every artifact's size and sha256), enforces
the driver's trust list (signed bundles), and re-runs the export gate on the reference set with this machine's
CPU and backend (``verify``, cached per machine like `grade`). Any refusal raises ArchiveError naming the
machine, its CPU class and the reason; the actor dies in its creation task, and Ray Data fails the job at the
first such death (max_consecutive_actor_init_deaths = 0) before a single image is graded by it.

Where the bundle comes from on a worker: the driver's path when it holds the same manifest there (one machine,
or a shared filesystem); otherwise the bytes the driver put in Ray's object store, written once per machine
under the edgeretina cache (``archive-bundles/<manifest sha256>/``). Either way the Grader hashes what it loads.

``__call__`` never raises for an image: a file that cannot be fetched, decoded or graded is a row with its
error. When the grader fails on a batch in a way it does not turn into records itself, the batch is graded one
file at a time so that one file's failure stays that file's row.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import time
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgeretina.archive.rows import error_row, record_row, rows_table
from edgeretina.archive.sources import filesystem, is_uri
from edgeretina.bundle import MANIFEST_NAME, Bundle
from edgeretina.cpu import cpu_class
from edgeretina.errors import ArchiveError, BundleError, EdgeRetinaError
from edgeretina.runtime import device_cache
from edgeretina.signing import SIGNATURE_NAME, TrustList

CACHE_KIND = "archive-bundles"
ZIP_NAME = "bundle.zip"


@dataclass(frozen=True)
class WorkerSetup:
    bundle_path: str                   # the bundle on the driver's machine
    bundle_sha256: str                 # of its manifest.json: what every worker must load
    bundle_payload: tuple              # (ObjectRef of bundle_payload(...),): nested, so Ray hands it over unresolved
    backend: str | None
    device: str | None
    threads: int
    verify: str
    trust_keys: tuple[bytes, ...] | None   # the driver's trust list as raw Ed25519 keys (keys do not pickle)
    trust_source: str
    batch_size: int


class GradeWorker:
    def __init__(self, setup: WorkerSetup):
        self.setup = setup
        self.identity = {"bundle_sha256": setup.bundle_sha256, "node": socket.gethostname(), "cpu_class": cpu_class()}
        self.grader = open_grader(setup, self.identity)
        self.scratch: Path | None = None        # remote files while they are graded; made for the first URI

    def __call__(self, batch):
        """pyarrow Table (file, bytes, mtime_ns) -> pyarrow Table of result rows (row_schema)."""
        items = batch.select(["file", "bytes", "mtime_ns"]).to_pylist()
        if self.scratch is None and any(is_uri(item["file"]) for item in items):
            self.scratch = Path(tempfile.mkdtemp(prefix="edgeretina-archive-"))
            weakref.finalize(self, shutil.rmtree, self.scratch, True)
        return rows_table(grade_items(self.grader, items, self.setup.batch_size, self.identity, self.scratch))


# ------------------------------------------------------------------------------------------------ grading

def grade_items(grader, items: list[dict], batch_size: int, identity: dict, scratch: Path | None) -> list[dict]:
    """Rows for ``items`` (one per photograph, one per DICOM frame, one error row per file that gave none)."""
    staged, rows = [], []
    for index, item in enumerate(items):
        local, read_ms, error = _stage(item["file"], scratch, index)
        if error is not None:
            rows.append(error_row(item, error, identity))
        else:
            staged.append((item, local, read_ms))
    try:
        rows += _grade_staged(grader, staged, batch_size, identity)
    except Exception:   # noqa: BLE001 - the grader failed beyond its own error records: isolate the file
        for one in staged:
            rows += _grade_one(grader, one, identity)
    finally:
        for item, local, _ in staged:
            if local != item["file"]:
                Path(local).unlink(missing_ok=True)
    return rows


def _grade_staged(grader, staged: list[tuple], batch_size: int, identity: dict) -> list[dict]:
    by_path = {local: (item, read_ms) for item, local, read_ms in staged}
    rows = []
    for graded in grader.grade_iter([local for _, local, _ in staged], batch_size):
        record = graded.record.to_dict()
        item, read_ms = by_path[record["file"]]
        if read_ms is not None:
            record["timings_ms"]["read"] = read_ms
        if record.get("error") and record["file"] != item["file"]:
            record["error"] = record["error"].replace(record["file"], item["file"])   # the URI, not our temp file
        rows.append(record_row(record, item, identity))
    return rows


def _grade_one(grader, one: tuple, identity: dict) -> list[dict]:
    item = one[0]
    try:
        return _grade_staged(grader, [one], 1, identity)
    except Exception as exc:   # noqa: BLE001 - one file's failure is that file's row, never the job's
        return [error_row(item, f"internal error while grading: {type(exc).__name__}: {exc}", identity)]


def _stage(file: str, scratch: Path, index: int) -> tuple[str, float | None, str | None]:
    """(local path, ms spent fetching, error): a local file as it is, a URI copied into ``scratch``."""
    if not is_uri(file):
        return file, None, None
    started = time.perf_counter()
    local = scratch / f"{index:06d}-{PurePosixPath(file).name or 'file'}"
    try:
        fs, path = filesystem(file)
        with fs.open_input_stream(path) as source, open(local, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
    except Exception as exc:   # noqa: BLE001 - pyarrow raises OSError, ArrowException, FileNotFoundError ...
        local.unlink(missing_ok=True)
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return "", None, f"not readable from its filesystem ({message})"
    return str(local), round((time.perf_counter() - started) * 1000.0, 3), None


# ------------------------------------------------------------------------------------------------ the bundle

def open_grader(setup: WorkerSetup, identity: dict):
    """The Grader on this worker, or ArchiveError saying which machine refused the bundle and why."""
    from edgeretina.runtime.grader import Grader
    from edgeretina.runtime.verify import manifest_sha256

    where = f"worker on {identity['node']} ({identity['cpu_class']})"
    try:
        path = bundle_here(setup)
        grader = Grader(path, backend=setup.backend, threads=setup.threads, device=setup.device,
                        trust=trust_list(setup.trust_keys, setup.trust_source), verify=setup.verify)
    except EdgeRetinaError as exc:
        raise ArchiveError(f"{where} refused the bundle: {exc}") from None
    if manifest_sha256(grader.bundle) != setup.bundle_sha256:
        raise ArchiveError(f"{where} loaded a bundle with another manifest than the driver's ({path})")
    return grader


def bundle_here(setup: WorkerSetup) -> Path:
    """The driver's bundle path where it holds the same manifest on this machine, else the shipped copy."""
    local = Path(setup.bundle_path)
    if _manifest_sha256(local) == setup.bundle_sha256:
        return local
    if not setup.bundle_payload:
        raise BundleError(f"bundle {local} is not on this machine (or holds another manifest), and none was shipped")
    import ray

    return materialise_bundle(ray.get(setup.bundle_payload[0]), setup.bundle_sha256)


def bundle_payload(path: Path, bundle: Bundle) -> dict:
    """What travels to workers without the driver's filesystem: the zip as it is, or the manifest, every artifact
    it names and the signature. Names were checked by the strict load (no absolute paths, no '..')."""
    if path.is_file():
        return {"kind": "zip", "files": {ZIP_NAME: path.read_bytes()}}
    names = [MANIFEST_NAME, *(artifact.file for artifact in bundle.manifest.artifacts)]
    if (path / SIGNATURE_NAME).is_file():
        names.append(SIGNATURE_NAME)
    return {"kind": "dir", "files": {name: (path / name).read_bytes() for name in dict.fromkeys(names)}}


def materialise_bundle(payload: dict, sha256: str) -> Path:
    """Write a shipped bundle once per machine (cache/archive-bundles/<sha256>/, renamed into place whole, so
    workers racing here find either nothing or all of it) and return what Grader should load."""
    target = device_cache.cache_root() / CACHE_KIND / sha256
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{sha256[:12]}-", dir=target.parent))
        try:
            for name, data in payload["files"].items():
                destination = staging / _safe_relative(name)
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(data)
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target / ZIP_NAME if payload["kind"] == "zip" else target


def _safe_relative(name: str) -> PurePosixPath:
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise BundleError(f"shipped bundle names a file outside it: {name!r}")
    return relative


def _manifest_sha256(path: Path) -> str | None:
    """sha256 of the manifest a bundle directory or zip holds; None when there is none to read here."""
    try:
        if path.is_dir():
            return hashlib.sha256((path / MANIFEST_NAME).read_bytes()).hexdigest()
        with zipfile.ZipFile(path) as zf:
            return hashlib.sha256(zf.read(MANIFEST_NAME)).hexdigest()
    except (OSError, KeyError, zipfile.BadZipFile):
        return None


# ------------------------------------------------------------------------------------------------ trust

def trust_keys(trust: TrustList | None) -> tuple[bytes, ...] | None:
    """The trust list as raw public keys, to send to workers."""
    if trust is None:
        return None
    from cryptography.hazmat.primitives import serialization

    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    return tuple(key.public_bytes(*raw) for key in trust.keys.values())


def trust_list(keys: tuple[bytes, ...] | None, source: str) -> TrustList | None:
    if keys is None:
        return None
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return TrustList([ed25519.Ed25519PublicKey.from_public_bytes(raw) for raw in keys], source=source)
