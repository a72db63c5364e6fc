"""How fast and how faithful each exported artifact is, measured the same way for all of them.

Each configuration (bundle x backend x threads x batch) runs in its own worker process
(`edgeretina.runtime.bench_worker`): its peak memory is its own, and one backend's thread pools never
warm the next. The parent alternates between the workers in rounds and pools each worker's rounds,
so drift of the machine (thermal, neighbours) hits every configuration alike. Ratios and fidelity are
against a reference bundle (normally the FP32 ONNX export) measured in the same run.

Per row: model file size, load time, cold first image, latency p50/p90/p99 of one `grade_iter` call on
`batch` images from decode to records (for batch 1 that is the end-to-end time per image), throughput,
peak RSS (VmHWM of the worker), a per-image stage breakdown (decode, quality, preprocess, inference,
postprocess incl. KNN, overlay = saliency rendering timed separately), and with a reference:
speedup, grade agreement, 1 - QWK between reference and candidate grades, embedding cosine.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from edgeretina.atomic import write_json_atomic
from edgeretina.bundle import load_bundle
from edgeretina.cpu import cpu_info
from edgeretina.dataset import IMAGE_SUFFIXES, read_labels
from edgeretina.errors import ConfigError, EdgeRetinaError
from edgeretina.metrics import quadratic_weighted_kappa
from edgeretina.runtime.backends import formats_for

STAGES = ("decode", "quality", "preprocess", "inference", "postprocess", "knn", "overlay")
LIBRARIES = ("numpy", "onnxruntime", "openvino", "opencv-python-headless", "opencv-python", "tensorrt")


@dataclass
class BenchConfig:
    """What to measure. runs = timed runs per configuration, spread over `rounds` rounds."""

    bundles: list[Path]
    reference: Path | None = None
    backends: list[str] = field(default_factory=lambda: ["onnxruntime"])
    threads: list[int] = field(default_factory=lambda: [1])
    batches: list[int] = field(default_factory=lambda: [1])
    images: Path | None = None          # folder or labels.csv; None = phantom photographs
    runs: int = 30
    warmup: int = 5
    rounds: int = 5
    phantom_count: int = 16
    phantom_size: int = 768

    def __post_init__(self) -> None:
        if not self.bundles and self.reference is None:
            raise ConfigError("bench needs at least one bundle")
        for name, values in (("threads", self.threads), ("batch", self.batches)):
            if not values or any(v < 1 for v in values):
                raise ConfigError(f"--{name} values must be integers >= 1, got {values}")
        if not self.backends:
            raise ConfigError("bench needs at least one backend")
        if self.runs < 1 or self.rounds < 1 or self.warmup < 0:
            raise ConfigError("runs and rounds must be >= 1 and warmup >= 0")
        self.rounds = min(self.rounds, self.runs)


@dataclass(frozen=True)
class Setup:
    bundle: Path
    backend: str
    threads: int
    batch: int

    @property
    def name(self) -> str:
        return f"{self.bundle.name}/{self.backend} t{self.threads} b{self.batch}"


@dataclass
class BenchResult:
    rows: list[dict]
    machine: dict
    config: dict

    def to_dict(self) -> dict:
        return {"machine": self.machine, "config": self.config, "rows": self.rows}


# ---------------------------------------------------------------- images

def resolve_images(images: Path | None, scratch: Path, count: int, size: int) -> list[Path]:
    """A folder's images, a labels.csv's images, or phantom photographs rendered once into scratch."""
    if images is None:
        return render_phantom_images(scratch, count, size)
    images = Path(images)
    if images.is_dir():
        found = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif images.suffix.lower() == ".csv":
        found = [item.path for item in read_labels(images)]
    else:
        raise ConfigError(f"--images must be a folder of images or a labels.csv, got {images}")
    if not found:
        raise ConfigError(f"no images in {images}")
    return found


def render_phantom_images(folder: Path, count: int, size: int) -> list[Path]:
    from edgeretina.phantom import PhantomConfig, render_case

    config = PhantomConfig(size=size)
    paths = []
    for seed in range(count):
        path = folder / f"phantom_{seed:03d}.jpg"
        case = render_case(seed, config)
        if not cv2.imwrite(str(path), np.ascontiguousarray(case.image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 92]):
            raise EdgeRetinaError(f"could not write {path}")
        paths.append(path)
    return paths


# ---------------------------------------------------------------- workers

class WorkerProcess:
    """The parent's handle on one configuration's worker: JSON lines over stdin/stdout."""

    def __init__(self, setup: Setup, image_list: Path, log_path: Path):
        self.setup = setup
        self.stderr_path = log_path
        env = dict(os.environ, OMP_NUM_THREADS=str(setup.threads))
        command = [sys.executable, "-m", "edgeretina.runtime.bench_worker", "--bundle", str(setup.bundle),
                   "--backend", setup.backend, "--threads", str(setup.threads), "--batch", str(setup.batch),
                   "--images", str(image_list)]
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=stderr, text=True, env=env)

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            raise EdgeRetinaError(f"worker exited ({self.process.returncode}): {self._last_stderr_line()}")
        message = json.loads(line)
        if "error" in message:
            raise EdgeRetinaError(message["error"])
        return message

    def request(self, **message) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        return self.receive()

    def stop(self) -> float:
        try:
            return float(self.request(op="stop")["peak_rss_mb"])
        finally:
            self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def _last_stderr_line(self) -> str:
        lines = [ln for ln in self.stderr_path.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else "no message"


@dataclass
class _Measured:
    setup: Setup
    worker: WorkerProcess | None = None
    skipped: str | None = None
    ready: dict = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    with_overlay_ms: list[float] = field(default_factory=list)   # the same calls plus rendering their overlays
    stages: list[dict] = field(default_factory=list)
    fidelity: dict | None = None
    peak_rss_mb: float = 0.0


# ---------------------------------------------------------------- the run

def run_bench(config: BenchConfig, log: Callable[[str], None] = lambda _: None) -> BenchResult:
    """Measure every configuration; returns the rows (skipped ones say why) and the machine.

    Raises ConfigError for bad options or images; a backend or bundle that cannot run becomes a
    skipped row, never an exception.
    """
    bundles = _bundle_list(config)
    setups = [Setup(b, be, t, n) for b, be, t, n in
              itertools.product(bundles, config.backends, config.threads, config.batches)]
    with tempfile.TemporaryDirectory(prefix="edgeretina-bench-") as tmp:
        scratch = Path(tmp)
        images = resolve_images(config.images, scratch, config.phantom_count, config.phantom_size)
        image_list = scratch / "images.txt"
        image_list.write_text("".join(f"{p.resolve()}\n" for p in images))
        measured = [_Measured(s, skipped=_cannot_run(s)) for s in setups]
        try:
            _start_workers(measured, image_list, scratch, log)
            _measure_rounds(measured, config, log)
            if config.reference is not None:
                _collect(measured, _ask_fidelity)
            _collect(measured, _stop_worker)
        finally:
            for m in measured:
                if m.worker is not None:
                    m.worker.close()
    rows = [_row(m) for m in measured]
    if config.reference is not None:
        _add_reference_ratios(rows, measured, config.reference.resolve())
    return BenchResult(rows=rows, machine=machine_info(), config=_config_dict(config, len(images)))


def _bundle_list(config: BenchConfig) -> list[Path]:
    bundles = [Path(b).resolve() for b in config.bundles]
    if config.reference is not None and config.reference.resolve() not in bundles:
        bundles.insert(0, config.reference.resolve())
    return list(dict.fromkeys(bundles))


def _cannot_run(setup: Setup) -> str | None:
    """Why this configuration cannot run, found without starting a worker (None = try it)."""
    try:
        backend_formats = formats_for(setup.backend)
        formats = {a.format for a in load_bundle(setup.bundle, verify=False).manifest.artifacts_with_role("model")}
    except EdgeRetinaError as exc:
        return str(exc)
    if not formats & set(backend_formats):
        return f"{setup.backend} runs {', '.join(backend_formats)}; the bundle has {', '.join(sorted(formats))}"
    return None


def _start_workers(measured: list[_Measured], image_list: Path, scratch: Path, log) -> None:
    """One at a time, so that load and cold-start times are not measured against each other."""
    for index, m in enumerate(measured):
        if m.skipped:
            log(f"skip {m.setup.name}: {m.skipped}")
            continue
        log(f"load {m.setup.name}")
        m.worker = WorkerProcess(m.setup, image_list, scratch / f"worker-{index}.log")
        try:
            m.ready = m.worker.receive()
        except EdgeRetinaError as exc:
            _skip(m, str(exc))


def _measure_rounds(measured: list[_Measured], config: BenchConfig, log) -> None:
    live = [m for m in measured if m.worker is not None]
    for m in live:
        try:
            if config.warmup:
                m.worker.request(op="runs", n=config.warmup)
        except EdgeRetinaError as exc:
            _skip(m, str(exc))
    per_round = [config.runs // config.rounds + (i < config.runs % config.rounds) for i in range(config.rounds)]
    for index, n in enumerate(per_round):
        log(f"round {index + 1}/{config.rounds}: {n} run(s) per configuration")
        live = [m for m in measured if m.worker is not None]
        # Rotate the order each round: nobody always runs right after the same neighbour.
        shift = index % len(live) if live else 0
        for m in live[shift:] + live[:shift]:
            try:
                reply = m.worker.request(op="runs", n=n)
            except EdgeRetinaError as exc:
                _skip(m, str(exc))
                continue
            m.latencies_ms += reply["latencies_ms"]
            m.with_overlay_ms += reply["with_overlay_ms"]
            m.stages += reply["stages"]


def _collect(measured: list[_Measured], action) -> None:
    for m in measured:
        if m.worker is None:
            continue
        try:
            action(m)
        except EdgeRetinaError as exc:
            _skip(m, str(exc))


def _ask_fidelity(m: _Measured) -> None:
    m.fidelity = m.worker.request(op="fidelity")


def _stop_worker(m: _Measured) -> None:
    m.peak_rss_mb = m.worker.stop()
    m.worker = None


def _skip(m: _Measured, reason: str) -> None:
    m.skipped = reason
    if m.worker is not None:
        m.worker.close()
        m.worker = None


# ---------------------------------------------------------------- rows

def _row(m: _Measured) -> dict:
    s = m.setup
    row = {"bundle": s.bundle.name, "path": str(s.bundle), "backend": s.backend, "threads": s.threads, "batch": s.batch}
    if m.skipped:
        return row | {"skipped": m.skipped}
    lat = np.asarray(m.latencies_ms, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(lat, [50, 90, 99]))
    return row | {
        "precision": m.ready.get("precision"),
        "scheme": quantization_scheme(s.bundle, m.ready.get("precision")),
        "compute_precision": m.ready.get("runner", {}).get("inference_precision"),   # OpenVINO: what it ran in
        "knn_scorer": m.ready.get("knn_scorer"),
        "size_mb": round(model_size_bytes(s.bundle, s.backend) / 1e6, 3),
        "load_s": round(m.ready["load_s"], 3),
        "cold_ms": round(m.ready["cold_ms"], 2),
        "p50_ms": round(p50, 3), "p90_ms": round(p90, 3), "p99_ms": round(p99, 3),
        "p50_with_overlay_ms": round(float(np.median(m.with_overlay_ms)), 3),
        "runs": len(lat),
        # Images over the time spent grading them: batch / mean latency.
        "throughput_ips": round(s.batch * len(lat) / (lat.sum() / 1000.0), 2),
        "peak_rss_mb": m.peak_rss_mb,
        "stages_ms": _stage_medians(m.stages),
    }


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


def _stage_medians(stages: list[dict]) -> dict[str, float]:
    medians = {}
    for stage in STAGES:
        values = [t[stage] for t in stages if stage in t]
        if values:
            medians[stage] = round(float(np.median(values)), 3)
    return medians


def model_size_bytes(bundle: Path, backend: str) -> int:
    """Bytes of what the backend loads: the model artifact it picks, plus separate weights (IR .bin)."""
    manifest = load_bundle(bundle, verify=False).manifest
    model = next(a for a in manifest.artifacts_with_role("model") if a.format in formats_for(backend))
    weights = manifest.artifacts_with_role("weights") if model.format == "openvino-ir" else []
    return model.bytes + sum(a.bytes for a in weights)


def _add_reference_ratios(rows: list[dict], measured: list[_Measured], reference: Path) -> None:
    """Speedup and fidelity of every row against the reference bundle at the same threads and batch,
    run with the first listed backend that could run it."""
    for row, m in zip(rows, measured):
        if "skipped" in row:
            continue
        ref_index = next((i for i, r in enumerate(measured) if r.setup.bundle == reference and not r.skipped
                          and r.setup.threads == m.setup.threads and r.setup.batch == m.setup.batch), None)
        if ref_index is None:
            continue
        ref_row, ref = rows[ref_index], measured[ref_index]
        row["reference"] = f"{ref_row['bundle']}/{ref_row['backend']}"
        row["speedup_vs_reference"] = round(ref_row["p50_ms"] / row["p50_ms"], 3)
        if ref.fidelity is not None and m.fidelity is not None:
            row |= fidelity_vs_reference(ref.fidelity, m.fidelity)


def fidelity_vs_reference(reference: dict, candidate: dict) -> dict:
    """Grade agreement, 1 - QWK and mean embedding cosine over the images both graded."""
    ref_index = {f: i for i, f in enumerate(reference["files"])}
    pairs = [(ref_index[f], i) for i, f in enumerate(candidate["files"]) if f in ref_index]
    if not pairs:
        return {"agreement": None, "qwk_proxy_delta": None, "cosine": None}
    ref_grades = np.array([reference["grades"][r] for r, _ in pairs])
    grades = np.array([candidate["grades"][c] for _, c in pairs])
    a = np.array([reference["embeddings"][r] for r, _ in pairs], dtype=np.float64)
    b = np.array([candidate["embeddings"][c] for _, c in pairs], dtype=np.float64)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"agreement": round(float((ref_grades == grades).mean()), 4),
            "qwk_proxy_delta": round(1.0 - float(quadratic_weighted_kappa(ref_grades, grades)), 4),
            "cosine": round(float(cosine.mean()), 6),
            "fidelity_images": len(pairs)}


def _config_dict(config: BenchConfig, image_count: int) -> dict:
    return {"runs": config.runs, "warmup": config.warmup, "rounds": config.rounds, "images": image_count,
            "image_source": str(config.images) if config.images else f"phantom {config.phantom_size}px JPEG",
            "reference": str(config.reference) if config.reference else None}


# ---------------------------------------------------------------- machine

def machine_info() -> dict:
    """CPU model, the ISA flags that decide INT8/BF16 speed, cores and library versions."""
    model, flags = cpu_info()
    return {"cpu": model, "machine": platform.machine(), "cpu_flags": list(flags),
            "cores": os.cpu_count(), "python": platform.python_version(), "libraries": _library_versions()}


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


# ---------------------------------------------------------------- output

_COLUMNS = (("bundle", "bundle", "{}"), ("backend", "backend", "{}"), ("precision", "prec", "{}"),
            ("scheme", "scheme", "{}"), ("compute_precision", "computes", "{}"),
            ("threads", "thr", "{}"), ("batch", "batch", "{}"), ("size_mb", "MB", "{:.2f}"),
            ("load_s", "load s", "{:.2f}"), ("cold_ms", "cold ms", "{:.1f}"), ("p50_ms", "p50 ms", "{:.2f}"),
            ("p90_ms", "p90 ms", "{:.2f}"), ("p99_ms", "p99 ms", "{:.2f}"),
            ("p50_with_overlay_ms", "+overlay", "{:.2f}"), ("throughput_ips", "img/s", "{:.1f}"),
            ("peak_rss_mb", "RSS MB", "{:.0f}"), ("speedup_vs_reference", "speedup", "{:.2f}x"),
            ("agreement", "agree", "{:.3f}"), ("qwk_proxy_delta", "1-QWK", "{:.3f}"), ("cosine", "cosine", "{:.5f}"))


def format_table(result: BenchResult) -> str:
    """Aligned text table, one line per row, then the stage breakdown and skipped rows."""
    header = [title for _, title, _ in _COLUMNS]
    body = [[_cell(row, key, fmt) for key, _, fmt in _COLUMNS] for row in result.rows if "skipped" not in row]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [header, *body]]
    lines.append("")
    lines.append("per-image stage medians, ms (" + ", ".join(STAGES) + "):")
    for row in result.rows:
        if "skipped" not in row:
            stages = row["stages_ms"]
            lines.append(f"  {row['bundle']}/{row['backend']} t{row['threads']} b{row['batch']}: "
                         + "  ".join(f"{s} {stages[s]:.2f}" for s in STAGES if s in stages)
                         + (f"  (knn: {row['knn_scorer']})" if row.get("knn_scorer") else ""))
    for row in result.rows:
        if "skipped" in row:
            lines.append(f"skipped {row['bundle']}/{row['backend']} t{row['threads']} b{row['batch']}: {row['skipped']}")
    m = result.machine
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['cpu_flags']) or '-'}; "
                 + ", ".join(f"{k} {v}" for k, v in m["libraries"].items()))
    return "\n".join(lines)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def write_results(result: BenchResult, out: Path) -> tuple[Path, Path]:
    """bench.json (atomic) and bench.png (latency vs fidelity, one point per row) into out."""
    from edgeretina.runtime.overlay import write_png

    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(out / "bench.json", result.to_dict())
    png_path = write_png(out / "bench.png", draw_scatter(result.rows))
    return json_path, png_path


def draw_scatter(rows: list[dict], width: int = 960, height: int = 640) -> np.ndarray:
    """RGB plot, OpenCV only: x = p50 latency (log scale), y = grade agreement with the reference
    (rows without a reference sit on the top line, marked 'no ref')."""
    canvas = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 80, width - 30, 40, height - 60
    points = [r for r in rows if "skipped" not in r]
    cv2.rectangle(canvas, (left, top), (right, bottom), (0, 0, 0), 1)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(canvas, "latency vs fidelity (vs reference)", (left, 25), font, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, "p50 ms per call (log)", (width // 2 - 90, height - 15), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, "agreement", (5, top - 10), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    if not points:
        return canvas
    logs = np.log10([max(r["p50_ms"], 1e-3) for r in points])
    lo, hi = float(logs.min()) - 0.1, float(logs.max()) + 0.1
    agreements = [r.get("agreement") for r in points]
    y_lo = min([a for a in agreements if a is not None] + [1.0]) - 0.05
    y_hi = 1.0 + 0.1 * (1.0 - y_lo)      # headroom: perfect agreement is common and should not sit on the frame
    for value in (lo, hi):
        x = left + int((value - lo) / (hi - lo) * (right - left))
        cv2.putText(canvas, f"{10 ** value:.1f}", (x - 15, bottom + 20), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for value in (y_lo, 1.0):
        y = bottom - int((value - y_lo) / (y_hi - y_lo) * (bottom - top))
        cv2.putText(canvas, f"{value:.2f}", (15, y + 5), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    bundles = list(dict.fromkeys(r["bundle"] for r in points))
    for number, (r, lg, agreement) in enumerate(zip(points, logs, agreements), start=1):
        x = left + int((lg - lo) / (hi - lo) * (right - left))
        y = bottom - int(((agreement if agreement is not None else 1.0) - y_lo) / (y_hi - y_lo) * (bottom - top))
        colour = palette[bundles.index(r["bundle"]) % len(palette)]
        cv2.circle(canvas, (x, y), 6, colour, -1, cv2.LINE_AA)
        # Numbers beside the dots and names in a legend: points of one artifact often overlap.
        cv2.putText(canvas, str(number), (x - 4, y - 10 - 12 * (number % 2)), font, 0.45, colour, 1, cv2.LINE_AA)
        cosine = r.get("cosine")
        legend = (f"{number}: {r['bundle']}/{r['backend']} t{r['threads']} b{r['batch']}  p50 {r['p50_ms']:.1f} ms"
                  + (f"  agree {agreement:.3f}  cos {cosine:.4f}" if agreement is not None else "  (no reference)"))
        cv2.putText(canvas, legend, (left + 10, top + 100 + 18 * number), font, 0.42, colour, 1, cv2.LINE_AA)
    return canvas
