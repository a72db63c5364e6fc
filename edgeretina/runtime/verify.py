"""`verify`: re-run the export gate's checks on the device that runs the bundle.

The bundle's reference set (reference.npz) holds a few held-out inputs and torch's outputs on them. The
device runs its own backend on them — its CPU class, its kernels, its runtime settings — and compares with
the same checks (edgeretina.fidelity) and the thresholds the export recorded. A grader verifies once per
bundle x backend x device x CPU (cached, runtime/device_cache.py) and refuses to grade when it fails.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from edgeretina.bundle import MANIFEST_NAME, Bundle
from edgeretina.cpu import cpu_fingerprint
from edgeretina.errors import BundleError, ConfigError, VerificationError
from edgeretina.fidelity import Check, GateThresholds, checks_table, compare, cosine
from edgeretina.preprocess import normalize
from edgeretina.reference_set import load_reference_set
from edgeretina.runtime import device_cache
from edgeretina.runtime.backends.base import Runner
from edgeretina.runtime.knn import FeatureBank

VERIFY_MODES = ("cached", "always", "off")
CACHE_KIND = "verified"
# backend -> the module whose version decides its kernels (a new release may compute differently)
_BACKEND_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt"}


@dataclass
class VerifyReport:
    bundle: str
    manifest_sha256: str
    backend: str
    backend_version: str
    device: str | None
    threads: int | None
    cpu: dict
    images: int
    checks: list[dict]                      # name, value, threshold, higher_is_better, passed
    passed: bool
    drift_from_export: dict = field(default_factory=dict)   # this device vs the artifact on the export machine
    seconds: float = 0.0
    created: str = ""
    cached: bool = False

    def failed_checks(self) -> list[dict]:
        return [c for c in self.checks if not c["passed"]]

    def to_dict(self) -> dict:
        return asdict(self)


def manifest_sha256(bundle: Bundle) -> str:
    return hashlib.sha256((bundle.root / MANIFEST_NAME).read_bytes()).hexdigest()


def verify_on_device(bundle: Bundle, runner: Runner, backend: str, bank: FeatureBank | None = None) -> VerifyReport:
    """Run `runner` on the bundle's reference set and compare with the recorded torch outputs.

    bank: the feature bank as the device searches it (for the neighbour check). Raises BundleError
    when the bundle has no reference set or its manifest does not describe one."""
    started = time.perf_counter()
    manifest = bundle.manifest
    spec = manifest.export.get("verify")
    if not isinstance(spec, dict) or "reference_set" not in spec:
        raise BundleError("bundle has no reference set for on-device verification (exported by an older "
                          "edgeretina): re-export it, or grade with verification off")
    reference = load_reference_set(bundle.root / spec["reference_set"])
    thresholds = _thresholds(spec.get("thresholds") or {})
    inputs = normalize(reference.inputs_u8, manifest.preprocess_config)
    outputs = _one_at_a_time(runner, inputs)
    checks = compare(reference.torch_outputs, outputs, manifest.grading_config, thresholds,
                     bank.embeddings if bank is not None else None)
    return VerifyReport(
        bundle=str(bundle.root), manifest_sha256=manifest_sha256(bundle), backend=backend,
        backend_version=backend_version(backend), device=runner.device, threads=runner.threads,
        cpu=cpu_fingerprint(), images=len(reference),
        checks=[{"name": c.name, "value": round(c.value, 6), "threshold": c.threshold,
                 "higher_is_better": c.higher_is_better, "passed": c.passed} for c in checks],
        passed=all(c.passed for c in checks), drift_from_export=_drift(reference.exported_outputs, outputs),
        seconds=round(time.perf_counter() - started, 3),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def ensure_verified(bundle: Bundle, runner: Runner, backend: str, bank: FeatureBank | None = None,
                    mode: str = "cached", name: str | None = None) -> VerifyReport | None:
    """Verify unless `mode` is "off"; "cached" reuses this device's earlier result for the same bundle,
    backend, device and CPU. name: how messages call the bundle (default: its directory).
    Raises VerificationError (with the failed checks) when it fails."""
    if mode not in VERIFY_MODES:
        raise ConfigError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {mode!r}")
    if mode == "off":
        return None
    report = verification_report(bundle, runner, backend, bank, fresh=mode == "always", name=name)
    if not report.passed:
        raise VerificationError(refusal(report))
    return report


def verification_report(bundle: Bundle, runner: Runner, backend: str, bank: FeatureBank | None = None,
                        fresh: bool = False, name: str | None = None) -> VerifyReport:
    """This device's result for the bundle: the cached one unless `fresh`, else measured now and stored."""
    key = _cache_key(bundle, backend, runner)
    report = None if fresh else _cached_report(key)
    if report is None:
        report = verify_on_device(bundle, runner, backend, bank)
        device_cache.write_entry(CACHE_KIND, key, report.to_dict())
    report.bundle = name or str(bundle.root)
    return report


def _cached_report(key: str) -> VerifyReport | None:
    """This device's stored result, or None (none yet, or written by another edgeretina version)."""
    entry = device_cache.read_entry(CACHE_KIND, key)
    try:
        return VerifyReport(**{**entry, "cached": True}) if entry is not None else None
    except TypeError:
        return None


def verify_here(bundle_path, backend: str | None = None, threads: int | None = None, device: str | None = None,
                trust="environment") -> VerifyReport:
    """`edgeretina verify`: load the bundle as a grader would (trust list included), re-run the checks now,
    and remember the result for later graders on this device. Returns the report, passed or not."""
    from edgeretina.runtime.grader import Grader   # the grader verifies through this module

    grader = Grader(bundle_path, backend=backend, threads=threads, device=device, trust=trust, verify="off")
    return verification_report(grader.bundle, grader.runner, grader.backend, grader.bank, fresh=True,
                               name=str(bundle_path))


def refusal(report: VerifyReport) -> str:
    failed = "; ".join(f"{c['name']} = {c['value']:.5f} (needs {'≥' if c['higher_is_better'] else '≤'} "
                       f"{c['threshold']})" for c in report.failed_checks())
    return (f"bundle {report.bundle} failed on-device verification with {report.backend} on this "
            f"{report.cpu.get('class')} CPU: {failed}. `edgeretina verify {report.bundle}` prints the table; "
            f"--no-verify grades anyway (the results may not match the exported model)")


def verified_here(bundle: Bundle) -> list[dict]:
    """This device's verification results for this exact bundle (any backend)."""
    sha = manifest_sha256(bundle)
    return [entry for entry in device_cache.entries(CACHE_KIND) if entry.get("manifest_sha256") == sha]


def format_report(report: VerifyReport) -> str:
    """The gate's table for this device."""
    cpu = report.cpu
    lines = [f"verify {report.bundle}",
             f"  on {cpu.get('model')} ({cpu.get('class')}; {' '.join(cpu.get('flags', [])) or 'no int8/bf16 flags'}), "
             f"{report.backend} {report.backend_version}, device {report.device}, threads {report.threads or 'default'}",
             f"  {report.images} reference images{' (cached result)' if report.cached else ''}:"]
    checks = [Check(c["name"], c["value"], c["threshold"], c["higher_is_better"]) for c in report.checks]
    lines.extend("  " + line for line in checks_table(checks))
    if report.drift_from_export:
        lines.append("  drift from the export machine's artifact: " +
                     ", ".join(f"{k} {v}" for k, v in report.drift_from_export.items()))
    lines.append(f"  {'PASSED' if report.passed else 'FAILED'}: "
                 + ("this device computes what the export gate accepted" if report.passed
                    else "this device does not reproduce the exported model"))
    return "\n".join(lines)


def report_json(report: VerifyReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


def backend_version(backend: str) -> str:
    module = importlib.import_module(_BACKEND_MODULES.get(backend, backend))
    version = getattr(module, "__version__", None)
    if version is None and hasattr(module, "get_version"):
        version = module.get_version()
    return str(version or "unknown")


def _cache_key(bundle: Bundle, backend: str, runner: Runner) -> str:
    return device_cache.cache_key(manifest_sha256(bundle), backend, backend_version(backend), runner.device,
                                  cpu_fingerprint())


def _one_at_a_time(runner: Runner, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Batch 1, as a camera grades: the first (verifying) run of a grader then peaks no higher than grading.
    ViT-B-16 INT8 on ONNX Runtime, cold `edgeretina grade`: 315 MB peak verifying 5 images as one batch."""
    results = [runner.run(inputs[i:i + 1]) for i in range(len(inputs))]
    return {name: np.concatenate([r[name] for r in results]) for name in results[0]}


def _thresholds(recorded: dict) -> GateThresholds:
    known = {k: v for k, v in recorded.items() if k in GateThresholds.__dataclass_fields__}
    return GateThresholds(**{**known, "max_size_ratio": None})


def _drift(exported: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict:
    if "ordinal_logits" not in exported or "embedding" not in exported:
        return {}
    logit = float(np.abs(np.asarray(exported["ordinal_logits"]) - outputs["ordinal_logits"]).max())
    return {"max_ordinal_logit_change": round(logit, 6),
            "min_embedding_cosine": round(float(cosine(exported["embedding"], outputs["embedding"]).min()), 6)}
