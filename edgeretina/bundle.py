"""The exported bundle: a directory (or a .zip of one) with manifest.json and the artifacts it names.

Loading is strict: an unknown schema version, a missing file, a size or sha256 mismatch, or a file name
that points outside the bundle is an error, never a guess. Nothing here unpickles or evaluates anything.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import atexit
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from edgeretina import __version__
from edgeretina.atomic import write_json_atomic
from edgeretina.errors import BundleError, ConfigError
from edgeretina.grades import GradingConfig
from edgeretina.preprocess import PreprocessConfig

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Artifact:
    file: str          # name relative to the bundle root (POSIX, no "..")
    format: str        # "onnx", "npz", "openvino-ir", "tensorrt-plan", "script", ...
    role: str          # "model", "bank", "weights", "build-script"
    precision: str     # "fp32", "fp16", "int8", "n/a"
    target: str        # export target that produced it
    sha256: str
    bytes: int


@dataclass
class Manifest:
    model: dict[str, Any]       # arch (backbone config), input_size, preprocess (PreprocessConfig dict), embed_dim
    outputs: dict[str, Any]     # names, shapes (with "B" for the dynamic batch)
    grading: dict[str, Any]     # GradingConfig dict
    saliency: dict[str, Any]    # grid [h, w], method
    artifacts: list[Artifact]
    export: dict[str, Any]      # target, steps, calibration, gate
    bank: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION
    edgeretina_version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["artifacts"] = [asdict(a) for a in self.artifacts]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        version = data.get("schema_version")
        if version != SCHEMA_VERSION or isinstance(version, bool):   # True == 1 in Python
            raise BundleError(f"unknown manifest schema_version {version!r} (this edgeretina reads {SCHEMA_VERSION})")
        required = ("model", "outputs", "grading", "saliency", "artifacts", "export")
        missing = [key for key in required if key not in data]
        if missing:
            raise BundleError(f"manifest is missing {', '.join(missing)}")
        try:
            artifacts = [_artifact(a) for a in data["artifacts"]]
        except TypeError as exc:
            raise BundleError(f"malformed artifact entry in manifest: {exc}") from None
        known = {f for f in cls.__dataclass_fields__}
        manifest = cls(**{k: v for k, v in data.items() if k in known and k != "artifacts"}, artifacts=artifacts)
        manifest.check_sections()
        return manifest

    def check_sections(self) -> None:
        """Parse the typed sections once: a malformed one fails at load, as one BundleError."""
        _ = self.grading_config, self.preprocess_config

    @property
    def grading_config(self) -> GradingConfig:
        return _parse_section("grading", GradingConfig.from_dict, self.grading)

    @property
    def preprocess_config(self) -> PreprocessConfig:
        model = self.model if isinstance(self.model, dict) else {}
        if "preprocess" not in model:
            raise BundleError("manifest section model.preprocess is missing: the bundle does not say how to "
                              "prepare images for its model")
        return _parse_section("model.preprocess", PreprocessConfig.from_dict, model["preprocess"])

    def artifact(self, role: str, *, fmt: str | None = None) -> Artifact:
        for art in self.artifacts:
            if art.role == role and (fmt is None or art.format == fmt):
                return art
        raise BundleError(f"bundle has no {role} artifact" + (f" in format {fmt}" if fmt else ""))

    def artifacts_with_role(self, role: str) -> list[Artifact]:
        return [a for a in self.artifacts if a.role == role]


def _parse_section(name: str, parse: Callable[[Any], Any], data: Any):
    """The typed config of one manifest section; whatever is wrong with it is one BundleError."""
    if not isinstance(data, dict):
        raise BundleError(f"manifest section {name} must be an object, not {type(data).__name__}")
    try:
        return parse(data)
    except KeyError as exc:
        raise BundleError(f"manifest section {name} is missing {exc}") from None
    except (ValueError, TypeError, ConfigError) as exc:
        raise BundleError(f"manifest section {name} is malformed: {exc}") from None


_ARTIFACT_TYPES = {"file": str, "format": str, "role": str, "precision": str, "target": str, "sha256": str,
                   "bytes": int}


def _artifact(entry: Any) -> Artifact:
    """One manifest artifact entry, its fields type-checked (TypeError: the caller says which entry)."""
    artifact = Artifact(**entry)
    for name, kind in _ARTIFACT_TYPES.items():
        value = getattr(artifact, name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TypeError(f"{name} must be {kind.__name__}, not {type(value).__name__} ({value!r})")
    return artifact


@dataclass
class Bundle:
    root: Path
    manifest: Manifest

    def path(self, artifact: Artifact) -> Path:
        return self.root / artifact.file


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe_artifact(root: Path, file: str, *, fmt: str, role: str, precision: str, target: str) -> Artifact:
    """Hash a file already written into the bundle directory and describe it for the manifest."""
    path = Path(root) / _safe_name(file)
    return Artifact(file=file, format=fmt, role=role, precision=precision, target=target,
                    sha256=sha256_file(path), bytes=path.stat().st_size)


def save_manifest(root: Path, manifest: Manifest) -> Path:
    target = Path(root) / MANIFEST_NAME
    write_json_atomic(target, manifest.to_dict())
    return target


def load_bundle(path: str | os.PathLike, *, verify: bool = True) -> Bundle:
    """Open a bundle directory or .zip; with verify (the default) check every artifact's size and sha256.

    Raises BundleError naming the first problem found.
    """
    root = Path(path)
    if not root.exists():
        raise BundleError(f"bundle not found: {root}")
    if root.is_file():
        root = _extract_zip(root)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{root} is not a bundle: no {MANIFEST_NAME}")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{manifest_path} does not hold a JSON object")
    manifest = Manifest.from_dict(data)
    bundle = Bundle(root=root, manifest=manifest)
    if verify:
        verify_bundle(bundle)
    return bundle


def verify_bundle(bundle: Bundle) -> None:
    problems = [p for art in bundle.manifest.artifacts if (p := artifact_problem(bundle.root, art))]
    problems += reference_problems(bundle.manifest)
    if problems:
        raise BundleError("bundle verification failed: " + "; ".join(problems))


def reference_problems(manifest: Manifest) -> list[str]:
    """Files other manifest sections name (the feature bank, the verification reference set) must be
    artifacts, whose names and sha256 are checked: else the runtime would read an unverified file, possibly
    one outside the bundle. The one rule for load_bundle and `edgeretina info`."""
    listed = {art.file for art in manifest.artifacts}
    named = {"bank file": _field(manifest.bank, "file"),
             "reference set": _field(manifest.export.get("verify") if isinstance(manifest.export, dict) else None,
                                     "reference_set")}
    problems = []
    for what, name in named.items():
        if name is None:
            continue
        try:
            _safe_name(str(name))
        except BundleError as exc:
            problems.append(f"{what}: {exc}")
            continue
        if name not in listed:
            problems.append(f"{what} {name!r} is not one of the bundle's verified artifacts")
    return problems


def _field(section: Any, key: str) -> Any:
    return section.get(key) if isinstance(section, dict) else None


def artifact_problem(root: Path, art: Artifact) -> str | None:
    """What is wrong with one artifact on disk (name outside the bundle, missing, resized, sha256
    mismatch), or None: the one wording of these problems for load_bundle and `edgeretina info`."""
    try:
        path = root / _safe_name(art.file)
    except BundleError as exc:
        return str(exc)
    if not path.is_file():
        return f"missing file {art.file}"
    size = path.stat().st_size
    if size != art.bytes:
        return f"{art.file} has {size} bytes, manifest says {art.bytes}"
    if sha256_file(path) != art.sha256:
        return f"{art.file} sha256 mismatch (file changed after export)"
    return None


def _safe_name(name: str) -> str:
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or "\\" in name:
        raise BundleError(f"artifact name {name!r} points outside the bundle")
    return name


def zip_bundle(root: Path, out: Path) -> Path:
    """Write a .zip of a bundle directory atomically."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(Path(root).rglob("*")):
            if file.is_file():
                zf.write(file, file.relative_to(root).as_posix())
    os.replace(tmp, out)
    return out


def _extract_zip(path: Path) -> Path:
    """Unpack a zipped bundle to a private temp dir that lives as long as the process. Member names are
    checked before anything is written; a zip that cannot be unpacked leaves nothing behind."""
    if not zipfile.is_zipfile(path):
        raise BundleError(f"{path} is neither a bundle directory nor a zip file")
    target = Path(tempfile.mkdtemp(prefix="edgeretina-bundle-"))
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                _safe_name(name.rstrip("/"))
            zf.extractall(target)
    except BundleError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as exc:   # corrupt member, or a name clash with a file
        shutil.rmtree(target, ignore_errors=True)
        raise BundleError(f"{path.name} cannot be unpacked as a bundle: {exc}") from None
    atexit.register(shutil.rmtree, target, True)
    return target
