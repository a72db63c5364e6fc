"""What the benchmark reads from a bundle's manifest: whether a backend runs it, what export chose,
and how many bytes the backend loads."""

from __future__ import annotations

from pathlib import Path

from edgeretina.bundle import load_bundle
from edgeretina.errors import EdgeRetinaError
from edgeretina.runtime.backends import model_artifact


def cannot_run(bundle: Path, backend: str) -> str | None:
    """Why this backend cannot run this bundle, found without starting a worker (None = try it)."""
    try:
        model_artifact(load_bundle(bundle, verify=False).manifest, backend)
    except EdgeRetinaError as exc:
        return str(exc)
    return None


def quantization_scheme(bundle: Path, precision: str | None) -> str:
    """What export chose, from the manifest: e.g. "ORT dynamic U8S8", "NNCF INT8", "ORT static QDQ -> IR"."""
    quantization = load_bundle(bundle, verify=False).manifest.export.get("quantization", {})
    if quantization.get("library") == "onnxruntime.quantization":
        return f"ORT {quantization.get('scheme', '?')} {'U8S8' if quantization.get('activations') == 'uint8' else 'S8S8'}"
    if quantization.get("tool") == "nncf":
        return "NNCF INT8"
    if str(quantization.get("tool", "")).startswith("onnxruntime.quantization ->"):
        return "ORT static QDQ -> IR"
    return quantization.get("mode") or (precision or "?")


def model_size_bytes(bundle: Path, backend: str) -> int:
    """Bytes of what the backend loads: the model artifact it picks, plus separate weights (IR .bin)."""
    manifest = load_bundle(bundle, verify=False).manifest
    model = model_artifact(manifest, backend)
    weights = manifest.artifacts_with_role("weights") if model.format == "openvino-ir" else []
    return model.bytes + sum(a.bytes for a in weights)
