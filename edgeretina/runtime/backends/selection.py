"""Which backend grades a bundle, and which of the bundle's artifacts a backend loads.

The one owner of both rules: the grader, `edgeretina info` and the benchmark all ask here.
"""

from __future__ import annotations

from typing import Iterable

from edgeretina.bundle import Artifact, Manifest
from edgeretina.errors import BackendError
from edgeretina.runtime.backends.registry import formats_for, installed_backends, registered_backends

# How closely an artifact fits the device, best first: a TensorRT plan is built on the device that runs it,
# an OpenVINO IR is compiled for Intel hardware, ONNX is the portable graph every target also ships.
FORMAT_FIT = ("tensorrt-plan", "openvino-ir", "onnx")


def model_artifact(manifest: Manifest, backend: str) -> Artifact:
    """The model artifact `backend` loads from this bundle: of the formats it runs, the one it prefers.

    Raises BackendError for an unknown backend or one that runs none of the bundle's model formats."""
    models = manifest.artifacts_with_role("model")
    for fmt in formats_for(backend):
        for artifact in models:
            if artifact.format == fmt:
                return artifact
    present = ", ".join(sorted({a.format for a in models})) or "no model"
    raise BackendError(f"backend {backend} cannot run this bundle (it runs {', '.join(formats_for(backend))}; "
                       f"the bundle has {present})")


def rank_backends(formats: Iterable[str], installed: Iterable[str]) -> list[str]:
    """The registered backends that run any of `formats`, best first: installed before not installed,
    then the backend whose best format fits the device most closely, then registry order.

    A backend that is not installed stays in the list (last) so that picking it names the extra to install."""
    formats, installed = set(formats), set(installed)
    order = registered_backends()
    fits = {b: _best_fit(formats, formats_for(b)) for b in order}
    runnable = [b for b in order if fits[b] is not None]
    return sorted(runnable, key=lambda b: (b not in installed, fits[b], order.index(b)))


def pick_backend(manifest: Manifest, installed: Iterable[str] | None = None) -> str:
    """The backend that should grade this bundle here (`installed`: default, what imports on this machine).

    Raises BackendError when no registered backend runs the bundle's model formats."""
    formats = {a.format for a in manifest.artifacts_with_role("model")}
    ranked = rank_backends(formats, installed_backends() if installed is None else installed)
    if not ranked:
        raise BackendError(f"no backend runs this bundle's model formats ({', '.join(sorted(formats))})")
    return ranked[0]


def _best_fit(formats: set[str], runs: tuple[str, ...]) -> int | None:
    fits = [FORMAT_FIT.index(f) if f in FORMAT_FIT else len(FORMAT_FIT) for f in runs if f in formats]
    return min(fits) if fits else None
