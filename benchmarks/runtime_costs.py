"""What the image stages of the runtime cost on this machine, against the targets the unit tests used to assert.

Unit tests no longer time anything or read memory (their bounds depended on the machine and its load); they
check the behaviour behind each target instead (that a huge header is refused before a pixel is decoded, that
a huge JPEG is graded from a reduced decode). The numbers live here:

- `header_refusal_ms`: `decode_image` refusing a PNG whose header claims 12000 x 11000 / 30000 x 30000 px:
  < 1000 ms (tests/test_preprocess.py);
- `decode_prepare_ms`: `decode_image` + `prepare` (224 px) of the 1411 px retina photo as a JPEG, q 95:
  < 100 ms (tests/test_preprocess.py);
- `quality_ms`: `assess_quality` of the decoded 1411 px photo, its field of view given: < 50 ms
  (tests/test_quality.py);
- `huge_jpeg_peak_rss_mb`: peak RSS (VmHWM) of a fresh process grading one 12000 x 9000 JPEG: < 400 MB
  (tests/test_bad_input.py).

Times are medians of `--runs` interleaved rounds (`edgeretina.timing.interleaved_median_ms`) on the OpenCV
thread count the grader uses (`IMAGE_THREADS`, 1). The peak RSS is the median of `--rss-runs` fresh processes
(each imports only the runtime, builds a `Grader` with one thread and grades the photo; on-device verification
off: it runs once per bundle and device, and its cost is not the photo's); the same with the
reduced decode switched off (`decode_max_side=0`) is recorded beside it, without a target, as what the
reduction saves. The bundle matters little for that (the model is small next to the photo): by default a
random-weight tiny ViT at 64 px, the shape of the test suite's bundle, is built into a temporary folder.

Writes OUT.json: machine (CPU model, `cpu_class`, flags, cores, library versions), settings (with the load
average before and after: other processes on the machine slow the times), measures, and one
row per target with its value, limit and pass/fail. Prints the rows; exits 0 unless `--check` is given and a
target is missed. Not a unit test: run it by hand on each machine class and commit the JSON under
benchmarks/results/<date>-<machine>/.

Usage: python benchmarks/runtime_costs.py OUT.json [--bundle BUNDLE] [--runs 30] [--rss-runs 3]
       [--huge 12000x9000] [--check]
20-40 s on 2 cores (building the tiny bundle included; each huge-photo process 1-3 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")       # before numpy and onnxruntime, like knn.py
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

HEADER_TEST = "tests/test_preprocess.py::test_decode_refuses_huge_images_from_the_header"
#: (measure, limit, unit, the unit test the bound came from)
TARGETS = (
    ("header_refusal_ms.12000x11000", 1000.0, "ms", HEADER_TEST),
    ("header_refusal_ms.30000x30000", 1000.0, "ms", HEADER_TEST),
    ("decode_prepare_ms", 100.0, "ms", "tests/test_preprocess.py (was test_decode_and_prepare_are_fast)"),
    ("quality_ms", 50.0, "ms", "tests/test_quality.py (was test_quality_is_fast)"),
    ("huge_jpeg_peak_rss_mb", 400.0, "MB", "tests/test_bad_input.py::test_huge_jpeg_is_graded_from_a_reduced_decode"),
)

# Runs in a fresh interpreter: the runtime only (no torch), one photo, then the peak resident set from the kernel.
# VmHWM, not ru_maxrss: the latter survives exec and would include the parent's peak.
_GRADE_ONE = """
import json, re, sys
from pathlib import Path
from edgeretina.runtime import Grader
grader = Grader(sys.argv[1], threads=1, trust=None, verify="off")
if sys.argv[3] == "full":
    import dataclasses
    grader.preprocess = dataclasses.replace(grader.preprocess, decode_max_side=0)
graded = next(grader.grade_iter([sys.argv[2]]))
hwm = int(re.search(r"VmHWM:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"error": graded.record.error, "gradable": graded.record.gradable, "grade": graded.record.grade,
                  "decoded_shape": list(graded.image.shape) if graded.image is not None else None,
                  "peak_rss_mb": hwm / 1024}))
"""


def refuse(data: bytes) -> None:
    from edgeretina.errors import ImageDecodeError
    from edgeretina.preprocess import decode_image

    try:
        decode_image(data)
    except ImageDecodeError as exc:
        if not str(exc).startswith("image too large"):
            raise
        return
    raise AssertionError("a huge header was decoded")


def time_image_stages(retina: np.ndarray, runs: int) -> dict:
    """Median ms of each stage on the 1411 px photo, interleaved, OpenCV on the grader's thread count."""
    import warnings

    from PIL import Image

    from edgeretina.phantom.damage import png_header_only
    from edgeretina.preprocess import PreprocessConfig, decode_image, detect_fov, prepare
    from edgeretina.quality import assess_quality
    from edgeretina.runtime.grader import IMAGE_THREADS
    from edgeretina.timing import interleaved_median_ms

    cv2.setNumThreads(IMAGE_THREADS)
    ok, buf = cv2.imencode(".jpg", retina[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    jpeg = buf.tobytes()
    decoded, config, fov = decode_image(jpeg), PreprocessConfig(), detect_fov(retina)
    headers = {f"{w}x{h}": png_header_only(w, h) for w, h in ((12_000, 11_000), (30_000, 30_000))}
    calls = {
        "decode_ms": lambda: decode_image(jpeg),
        "prepare_ms": lambda: prepare(decoded, config),
        "decode_prepare_ms": lambda: prepare(decode_image(jpeg), config),
        "quality_ms": lambda: assess_quality(retina, fov),
        **{f"header_refusal_ms.{name}": (lambda data=data: refuse(data)) for name, data in headers.items()},
    }
    with warnings.catch_warnings():   # Pillow warns of a decompression bomb above 89 MP before we refuse
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        medians = interleaved_median_ms(calls, runs)
    measures = {name: round(ms, 3) for name, ms in medians.items() if not name.startswith("header")}
    measures["header_refusal_ms"] = {name.split(".", 1)[1]: round(ms, 4) for name, ms in medians.items()
                                     if name.startswith("header")}
    return measures


def write_huge_jpeg(retina: np.ndarray, path: Path, width: int, height: int) -> Path:
    """The retina photo at `height` px, centred in a black `width` x `height` frame (a wide sensor)."""
    side = min(width, height)
    frame = np.zeros((height, width, 3), np.uint8)
    x0, y0 = (width - side) // 2, (height - side) // 2
    frame[y0:y0 + side, x0:x0 + side] = cv2.resize(retina[..., ::-1], (side, side), interpolation=cv2.INTER_LINEAR)
    if not cv2.imwrite(str(path), frame, [cv2.IMWRITE_JPEG_QUALITY, 80]):
        raise RuntimeError(f"could not write {path}")
    return path


def grade_in_fresh_process(bundle: Path, photo: Path, decode: str) -> dict:
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", _GRADE_ONE, str(bundle), str(photo), decode],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"grading {photo} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_memory(bundle: Path, photo: Path, runs: int) -> dict:
    reduced = [grade_in_fresh_process(bundle, photo, "reduced") for _ in range(runs)]
    full = [grade_in_fresh_process(bundle, photo, "full") for _ in range(runs)]
    first = reduced[0]
    if first["error"] or not first["gradable"]:
        raise RuntimeError(f"the huge photo was not graded: {first}")
    return {
        "huge_jpeg_peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in reduced), 1),
        "huge_jpeg_peak_rss_mb_runs": [round(r["peak_rss_mb"], 1) for r in reduced],
        "huge_jpeg_decoded_shape": first["decoded_shape"],
        "huge_jpeg_full_decode_peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in full), 1),
        "huge_jpeg_full_decoded_shape": full[0]["decoded_shape"],
    }


def build_tiny_bundle(folder: Path) -> Path:
    """A random-weight tiny ViT at 64 px with a 60-case bank, exported to ONNX (gate off: random weights)."""
    import torch

    from edgeretina.export import ExportConfig, export
    from edgeretina.grades import NUM_GRADES, GradingConfig
    from edgeretina.preprocess import PreprocessConfig
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.checkpoint import Checkpoint, TrainingBank, save_checkpoint
    from edgeretina.training.model import GraderModel, ModelConfig

    torch.manual_seed(0)
    model = GraderModel(ModelConfig(backbone=BackboneConfig(image_size=64))).eval()
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((60, model.backbone.embed_dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    bank = TrainingBank(embeddings, rng.integers(0, NUM_GRADES, 60), [f"case-{i:03d}" for i in range(60)])
    checkpoint = save_checkpoint(folder / "tiny.pt", Checkpoint(
        model=model, preprocess=PreprocessConfig(image_size=64), grading=GradingConfig(), bank=bank,
        summary={"note": "random weights (seed 0) for benchmarks/runtime_costs.py; not a grader"}))
    return export(ExportConfig(checkpoint=checkpoint, out=folder / "bundle", reference_count=4, gate="off"),
                  log=lambda _: None)


def check_targets(measures: dict) -> list[dict]:
    rows = []
    for name, limit, unit, source in TARGETS:
        value = measures
        for part in name.split("."):
            value = value[part]
        rows.append({"measure": name, "value": value, "limit": limit, "unit": unit, "passed": bool(value < limit),
                     "from": source})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--bundle", type=Path, help="bundle to grade the huge photo with (default: a tiny random one)")
    parser.add_argument("--runs", type=int, default=30, help="interleaved rounds of the timed stages")
    parser.add_argument("--rss-runs", type=int, default=3, help="fresh processes per peak-memory measure")
    parser.add_argument("--huge", default="12000x9000", help="WIDTHxHEIGHT of the huge JPEG")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.huge.lower().split("x"))

    from skimage import data as skimage_data

    from edgeretina.atomic import write_json_atomic
    from edgeretina.bench import machine_info
    from edgeretina.cpu import cpu_class
    from edgeretina.preprocess import MAX_PIXELS

    if width * height > MAX_PIXELS:
        parser.error(f"--huge {args.huge} is over MAX_PIXELS ({MAX_PIXELS}): it would be refused, not graded")
    retina = skimage_data.retina()
    started, load_before = time.perf_counter(), os.getloadavg()
    measures = time_image_stages(retina, args.runs)
    with tempfile.TemporaryDirectory(prefix="runtime-costs-") as scratch:
        scratch = Path(scratch)
        bundle = args.bundle or build_tiny_bundle(scratch)
        photo = write_huge_jpeg(retina, scratch / "huge.jpg", width, height)
        measures.update(peak_memory(bundle, photo, args.rss_runs))
    targets = check_targets(measures)
    result = {
        "machine": {**machine_info(), "cpu_class": cpu_class()},
        "settings": {"runs": args.runs, "rss_runs": args.rss_runs, "huge": [width, height],
                     "bundle": str(args.bundle) if args.bundle else "random-weight tiny ViT, 64 px (built)",
                     "photo": "skimage.data.retina(), 1411 px, JPEG q 95", "opencv_threads": 1,
                     "date": time.strftime("%Y-%m-%d"),
                     # 1-minute load average before and after: on a shared machine, read the times with it
                     "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "measures": measures,
        "targets": targets,
        "passed": all(row["passed"] for row in targets),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(args.out, result)
    print(f"{result['machine']['cpu']} ({result['machine']['cpu_class']}), {os.cpu_count()} cores")
    for row in targets:
        print(f"{'PASS' if row['passed'] else 'FAIL'}  {row['measure']:<32} {row['value']:>10} {row['unit']:<2}"
              f"  (target < {row['limit']:g})")
    print(f"full-size decode instead: peak {measures['huge_jpeg_full_decode_peak_rss_mb']} MB "
          f"(decoded {measures['huge_jpeg_full_decoded_shape']} instead of {measures['huge_jpeg_decoded_shape']})")
    return 0 if result["passed"] or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
