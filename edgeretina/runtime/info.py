"""What a bundle holds and whether it can be trusted here: manifest summary plus full verification.

Unlike ``load_bundle`` (which stops at the first problem), ``inspect_bundle`` checks every artifact and
lists every problem, so one look tells everything that is wrong with a bundle.
"""

from __future__ import annotations


import json
import os
from dataclasses import asdict, dataclass, field

from edgeretina.bundle import (SCHEMA_VERSION, Artifact, Bundle, Manifest, artifact_problem, load_bundle,
                               reference_problems)
from edgeretina.errors import BackendError, BundleError
from edgeretina.runtime.backends import is_installed, model_artifact, registered_backends
from edgeretina.runtime.verify import verified_here
from edgeretina.signing import SignatureStatus, TrustList, check_signature, resolve_trust
from edgeretina.text_tables import table_lines


@dataclass
class ArtifactCheck:
    file: str
    format: str
    role: str
    precision: str
    target: str
    bytes: int
    sha256_ok: bool
    problem: str | None = None


@dataclass
class BundleInfo:
    path: str
    schema_version: int
    edgeretina_version: str
    created: str
    model: dict
    outputs: dict
    grading: dict
    bank: dict | None
    export: dict
    artifacts: list[ArtifactCheck]
    backends: dict[str, str]              # backend -> "runs it" | "not installed" | "cannot run these formats"
    problems: list[str] = field(default_factory=list)
    signature: SignatureStatus | None = None
    # where the bundle was proven: the export machine's CPU class, and this device's cached `verify` results
    exported_on: dict = field(default_factory=dict)
    verified_here: list[dict] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "verified": self.verified}

    def raise_if_tampered(self) -> None:
        if self.problems:
            raise BundleError(f"bundle {self.path} failed verification: " + "; ".join(self.problems))


def inspect_bundle(path: str | os.PathLike,
                   trust: TrustList | str | os.PathLike | None = "environment") -> BundleInfo:
    """Summarise and fully verify a bundle. A malformed manifest or unknown schema raises BundleError;
    artifact problems (missing, resized, sha256 mismatch) are collected in ``problems``. A failed export
    gate is shown, not counted as a problem: it says how faithful the artifact is, not that it was altered.
    ``trust`` (as for Grader) is the trust list the signature is checked against; a signature it refuses
    (unsigned, unknown key, malformed, not verifying) is a problem. Without a trust list it is only shown."""
    bundle = load_bundle(path, verify=False)
    manifest = bundle.manifest
    checks = [_check_artifact(bundle, artifact) for artifact in manifest.artifacts]
    signature = check_signature(bundle, resolve_trust(trust), name=str(path))
    return BundleInfo(path=str(path), schema_version=manifest.schema_version,
                      edgeretina_version=manifest.edgeretina_version, created=manifest.created,
                      model=manifest.model, outputs=manifest.outputs, grading=manifest.grading, bank=manifest.bank,
                      export=manifest.export, artifacts=checks, backends=_backends_for(manifest),
                      problems=[c.problem for c in checks if c.problem] + reference_problems(manifest)
                      + ([signature.reason] if signature.trusted is False else []),
                      signature=signature, exported_on=(manifest.export.get("verify") or {}).get("exported_on", {}),
                      verified_here=[_verification_summary(entry) for entry in verified_here(bundle)])


def _verification_summary(entry: dict) -> dict:
    return {"cpu_class": (entry.get("cpu") or {}).get("class"), "cpu": (entry.get("cpu") or {}).get("model"),
            "backend": entry.get("backend"), "backend_version": entry.get("backend_version"),
            "device": entry.get("device"), "passed": entry.get("passed"), "when": entry.get("created")}


def _check_artifact(bundle: Bundle, artifact: Artifact) -> ArtifactCheck:
    problem = artifact_problem(bundle.root, artifact)
    return ArtifactCheck(file=artifact.file, format=artifact.format, role=artifact.role,
                         precision=artifact.precision, target=artifact.target, bytes=artifact.bytes,
                         sha256_ok=problem is None, problem=problem)


def _backends_for(manifest: Manifest) -> dict[str, str]:
    return {backend: _backend_status(manifest, backend) for backend in registered_backends()}


def _backend_status(manifest: Manifest, backend: str) -> str:
    try:
        model_artifact(manifest, backend)
    except BackendError:
        return "cannot run these formats"
    return "runs it" if is_installed(backend) else "not installed"


def _gates(export: dict) -> dict[str, dict]:
    gate = export.get("gate") or {}
    return {name: value for name, value in gate.items() if isinstance(value, dict)}


def _artifact_table(artifacts) -> list[str]:
    return table_lines([(f"{'✓' if a.sha256_ok else '✗'} {a.file}", a.format, a.role, a.precision, _size(a.bytes),
                         a.problem or "sha256 ok") for a in artifacts],
                       ("left", "left", "left", "left", "right", "left"))


def format_info(info: BundleInfo) -> str:
    """A terminal summary, one fact per line, ✓/✗ for every check."""
    model, grading, bank, export = info.model, info.grading, info.bank, info.export
    backbone = (model.get("arch") or {}).get("backbone", {})
    lines = [f"bundle     {info.path}",
             f"schema     {info.schema_version} (this edgeretina reads {SCHEMA_VERSION}), "
             f"made by edgeretina {info.edgeretina_version} on {info.created}",
             f"model      {backbone.get('name', '?')}, input {model.get('input_size')} px, "
             f"embedding {model.get('embed_dim')}",
             "outputs    " + ", ".join(f"{n} {_shape(info.outputs.get('shapes', {}).get(n))}"
                                      for n in info.outputs.get("names", [])),
             f"grading    {grading.get('scale')} thresholds {_floats(grading.get('thresholds', []))}, "
             f"temperature {grading.get('temperature', 0):.3f}, referable when P(grade >= "
             f"{grading.get('referable_min_grade')}) >= {grading.get('referable_threshold')}"]
    if bank:
        lines.append(f"bank       {bank.get('count')} cases x {bank.get('dim')} ({bank.get('dtype')}, "
                     f"{bank.get('metric')}, k={bank.get('k')}), grades {bank.get('label_counts')}")
    lines.append("artifacts")
    lines.extend("  " + line for line in _artifact_table(info.artifacts))
    lines.append(f"export     target {export.get('target')}: " + " -> ".join(export.get("steps", [])))
    quantization = export.get("quantization") or {}
    if quantization.get("scheme") or quantization.get("tool"):
        lines.append(f"  scheme   {quantization.get('scheme') or quantization.get('tool')} "
                     f"({quantization.get('reason') or quantization.get('mode', '')})")
    for backend, settings in (export.get("runtime") or {}).items():
        lines.append(f"  runtime  {backend}: " + ", ".join(f"{k} {v}" for k, v in settings.items()))
    for name, gate in _gates(export).items():
        lines.append(f"  {'✓' if gate.get('passed') else '✗'} gate {name}")
        for check, result in (gate.get("checks") or {}).items():
            lines.append(f"      {'✓' if result.get('passed') else '✗'} {check} {result.get('value')} "
                         f"(threshold {result.get('threshold')})")
    lines.append("backends   " + ", ".join(f"{b}: {s}" for b, s in info.backends.items()))
    lines.extend(_verification_lines(info))
    if info.signature is not None:
        lines.append("signature  " + _signature_line(info.signature))
    lines.append("verified   ✓ every artifact matches its sha256" if info.verified
                 else "verified   ✗ " + "; ".join(info.problems))
    return "\n".join(lines)


def _verification_lines(info: BundleInfo) -> list[str]:
    valid = ((info.export.get("quantization") or {}).get("portability") or {}).get("valid_cpu_classes")
    lines = [f"cpu        exported and gated on {info.exported_on.get('cpu_class', 'an unrecorded CPU class')}"
             + (f"; INT8 valid for {', '.join(valid)}" if valid else "")]
    for v in info.verified_here:
        lines.append(f"  {'✓' if v['passed'] else '✗'} verified here: {v['backend']} {v['backend_version']} "
                     f"({v['device']}) on {v['cpu']} ({v['cpu_class']}), {v['when']}")
    if not info.verified_here:
        lines.append("  - not verified on this device yet (`edgeretina verify`; grade and watch verify on first use)")
    return lines


def _signature_line(status: SignatureStatus) -> str:
    mark = {True: "✓", False: "✗", None: "-"}[status.trusted]   # None: no trust list to check against
    return f"{mark} {status.reason}"


def info_json(info: BundleInfo) -> str:
    return json.dumps(info.to_dict(), indent=2)


def _shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]" if shape else "?"


def _floats(values) -> str:
    return "[" + ", ".join(f"{float(v):.3g}" for v in values) + "]"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


__all__ = ["BundleInfo", "ArtifactCheck", "inspect_bundle", "format_info", "info_json"]
