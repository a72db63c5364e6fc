"""Fuzzing decode -> field of view -> quality -> preprocess (issue 12): damaged JPEG, PNG, TIFF and DICOM files.

For any damage hypothesis draws from ``edgeretina.phantom.damage`` (bit flips, overwrites, zero runs,
truncation, insertions, duplicated or removed segments, header field edits, on a PNG its CRCs repaired) of a
seed file of a phantom photograph, the file goes through the runtime's own steps (``Grader._load``:
``iter_sources`` -> ``ImageSource.decode`` -> ``detect_fov`` -> ``assess_quality``, then ``prepare``, here
for every photo, gradable or not) and either comes out sane (an RGB uint8 photo of the size its header
says, a finite field of view, a quality verdict, the model input at ``image_size``) or raises
ImageDecodeError (DicomError for DICOM) with one of the documented messages; nothing else.

Hangs: hypothesis' deadline per case (FUZZ_DEADLINE_S), and a watchdog (``Watchdog``) that ends the process,
naming the case and with every thread's traceback, when one case runs for HANG_S: a decoder stuck in C never
returns to be timed.
Besides the random search, a deterministic sweep sets every header field of every seed to each of its edge
values, one at a time. Memory: a header claiming more than MAX_PIXELS is refused under an address-space cap
far below what the claim needs; a header claiming just under the limit stays within BYTES_PER_CLAIMED_PIXEL
of address space.

Budget: EDGERETINA_FUZZ_EXAMPLES random cases per format (default 300; the whole file ~25 s on 2 cores), the
same cases every run (derandomized, no example database): raise it for a longer local run, and
EDGERETINA_FUZZ_HANG_S (default 120) with it if a slow machine needs it. The long run, with crashes and hangs
counted in worker processes, is benchmarks/fuzz_decode.py.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeretina.errors import DicomError, ImageDecodeError, MissingDependencyError
from edgeretina.phantom import damage
from edgeretina.preprocess import (MAX_PIXELS, FieldOfView, PreprocessConfig, decode_image, detect_fov, iter_sources,
                                   normalize, prepare)
from edgeretina.quality import REASONS, QualityReport, assess_quality

# Pillow warns about what it skips in a damaged file (corrupt EXIF, tags past the end); 89-120 MP claims warn too
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:PIL"),
              pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]

FUZZ_EXAMPLES = int(os.environ.get("EDGERETINA_FUZZ_EXAMPLES", "300"))
#: one case takes 1-10 ms; a header claiming ~100 MP takes up to ~1 s to refuse (libjpeg on a progressive scan)
FUZZ_DEADLINE_S = 10.0
HANG_S = float(os.environ.get("EDGERETINA_FUZZ_HANG_S", "120"))
#: the runtime's preprocessing (decode_max_side 1024), at the default model size
CONFIG = PreprocessConfig()
#: what decode_image's docstring promises its messages start with (DICOM has its own, DicomError)
DECODE_MESSAGES = ("file not found", "empty file", "not an image (", "truncated or corrupt image", "image too large (")

FUZZ = settings(max_examples=FUZZ_EXAMPLES, derandomize=True, database=None,
                deadline=timedelta(seconds=FUZZ_DEADLINE_S), print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _seeds(fmt: str) -> dict[str, bytes]:
    if fmt == "dicom":
        pytest.importorskip("pydicom")
    return damage.seed_files(fmt)


class Watchdog:
    """Ends the test process when one case runs for HANG_S: a decoder stuck in C never returns to hypothesis, whose
    deadline is only checked afterwards. It writes which case hung and every thread's traceback to the terminal
    (pytest's capture would lose them with the process). faulthandler's own timer, a few seconds later, is the
    backstop for a hang that holds the GIL."""

    def __init__(self, stream):
        self.stream = stream

    @contextlib.contextmanager
    def case(self, what: str):
        faulthandler.dump_traceback_later(HANG_S + 5, exit=True, file=self.stream)
        timer = threading.Timer(HANG_S, self._hung, args=(what,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            faulthandler.cancel_dump_traceback_later()

    def _hung(self, what: str) -> None:
        self.stream.write(f"\n{what} ran for {HANG_S:g} s: a hang. Every thread:\n")
        self.stream.flush()
        faulthandler.dump_traceback(file=self.stream, all_threads=True)
        os._exit(70)


@pytest.fixture
def watchdog(capsys):
    with capsys.disabled():       # the terminal's descriptor, not pytest's capture file
        terminal = os.fdopen(os.dup(2), "w")
    yield Watchdog(terminal)
    terminal.close()


class Damaged:
    """A damaged file: which seed and what was done to it (what hypothesis prints for a failing case; not a
    dataclass, whose fields hypothesis would print, all of the file's bytes included)."""

    def __init__(self, fmt: str, seed: str, operations: tuple[str, ...], data: bytes):
        self.fmt, self.seed, self.operations, self.data = fmt, seed, operations, data

    def __repr__(self) -> str:
        return f"Damaged({self.fmt}/{self.seed}, {len(self.data)} bytes: {'; '.join(self.operations)})"


_POSITIONS = 1024   # half the positions fall in the first KiB, where the headers are


def _position(draw, data: bytes) -> int:
    n = max(len(data), 1)
    return draw(st.integers(0, min(n, _POSITIONS) - 1) | st.integers(0, n - 1))


def _payload(draw) -> bytes:
    return draw(st.sampled_from(damage.TOKENS) | st.binary(min_size=1, max_size=16))


def _operation(draw, operator: str, data: bytes) -> tuple[bytes, str]:
    if not data:
        return data, "(nothing left)"
    if operator == "flip_bits":
        bits = draw(st.lists(st.integers(0, 8 * len(data) - 1), min_size=1, max_size=8))
        return damage.flip_bits(data, bits), f"flip_bits({bits})"
    if operator in ("overwrite", "insert"):
        at, value = _position(draw, data), _payload(draw)
        return getattr(damage, operator)(data, at, value), f"{operator}({at}, {value!r})"
    if operator == "zero_run":
        at, length = _position(draw, data), draw(st.integers(1, 256))
        return damage.zero_run(data, at, length), f"zero_run({at}, {length})"
    if operator == "truncate":
        length = draw(st.integers(0, len(data) - 1))
        return damage.truncate(data, length), f"truncate({length})"
    if operator in ("duplicate_segment", "remove_segment"):
        parts = damage.segments(data)
        if parts and draw(st.booleans()):
            name, start, end = draw(st.sampled_from(parts))
            length = end - start
        else:
            name, start, length = "bytes", _position(draw, data), draw(st.integers(1, 512))
        if operator == "remove_segment":
            return damage.remove_segment(data, start, length), f"remove_segment({start}, {length}) [{name}]"
        at = _position(draw, data)
        return damage.duplicate_segment(data, start, length, at), f"duplicate_segment({start}, {length}, {at}) [{name}]"
    fields = damage.header_fields(data)
    if not fields:
        return _operation(draw, "overwrite", data)
    field = draw(st.sampled_from(fields))
    values = st.sampled_from(field.candidates()) if field.candidates() else st.just(field.original)
    if field.encoding in ("be", "le"):
        values |= st.integers(0, (1 << (8 * field.size)) - 1)
    elif field.encoding == "is":
        values |= st.integers(-1, 2**31 - 1)
    value = draw(values)
    return damage.set_field(data, field, value), f"set_field({field.name}, {value!r})"


@st.composite
def damaged(draw, fmt: str, seeds: dict[str, bytes]) -> Damaged:
    name = draw(st.sampled_from(sorted(seeds)))
    data, done = seeds[name], []
    for _ in range(draw(st.integers(1, 3))):
        data, what = _operation(draw, draw(st.sampled_from(damage.OPERATORS)), data)
        done.append(what)
    if fmt == "png" and draw(st.booleans()):
        data = damage.repair_png_crcs(data)
        done.append("repair_png_crcs()")
    return Damaged(fmt, name, tuple(done), data)


def grade_like_the_runtime(path: Path, fmt: str) -> list[str]:
    """What ``Grader._load`` does with a file, one outcome per image ("graded" or "refused: ..."), with every
    output checked. Exceptions other than the library's decode errors propagate."""
    outcomes = []
    for source in iter_sources([path]):
        try:
            rgb = source.decode(CONFIG.decode_max_side)
        except (ImageDecodeError, MissingDependencyError) as exc:
            _check_refusal(exc, fmt)
            outcomes.append(f"refused: {exc}")
            continue
        fov = detect_fov(rgb)
        report = assess_quality(rgb, fov)
        prepared, geometry = prepare(rgb, CONFIG, fov)
        _check_outputs(rgb, fov, report, prepared, geometry)
        _check_decoded_size(path.read_bytes(), fmt, rgb.shape[:2], source.ref.frame)
        outcomes.append("graded")
    assert outcomes, "a file gave no image: it would have no record at all"
    return outcomes


def _check_refusal(exc: Exception, fmt: str) -> None:
    message = str(exc)
    assert message, f"{type(exc).__name__} without a message"
    if isinstance(exc, MissingDependencyError):      # a DICOM syntax whose plugin is not installed here
        assert fmt == "dicom" and exc.extra == "dicom", message
    elif fmt == "dicom":
        assert isinstance(exc, DicomError), f"{type(exc).__name__} from a .dcm file: {message}"
    elif not isinstance(exc, DicomError):            # damage can put 'DICM' at byte 128 of any file
        assert message.startswith(DECODE_MESSAGES), f"undocumented decode error: {message}"


def _check_outputs(rgb, fov, report, prepared, geometry) -> None:
    assert isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, rgb
    height, width = rgb.shape[:2]
    assert 1 <= height * width <= MAX_PIXELS and rgb.flags.c_contiguous and rgb.flags.writeable
    assert isinstance(fov, FieldOfView) and np.isfinite([fov.cx, fov.cy, fov.radius, fov.fraction_visible]).all(), fov
    assert 0.0 <= fov.fraction_visible <= 1.0 and fov.radius > 0 and (fov.found or fov.fraction_visible == 0.0), fov
    assert isinstance(report, QualityReport) and report.gradable == (not report.reasons), report
    assert set(report.reasons) <= set(REASONS) and 0.0 <= report.score <= 1.0, report
    assert all(np.isfinite(v) for v in report.measures.values()), report.measures
    assert prepared.shape == (CONFIG.image_size, CONFIG.image_size, 3) and prepared.dtype == np.uint8
    assert geometry.original_size == (height, width) and np.isfinite(normalize(prepared, CONFIG)).all()


def _check_decoded_size(data: bytes, fmt: str, shape: tuple[int, int], frame: int | None) -> None:
    """The photo has the size its header says; a JPEG (also inside a DICOM) may come at 1/2, 1/4 or 1/8 of it
    (the reduced decode); an EXIF orientation of 5-8 swaps the sides."""
    header = _header_size(data, fmt)
    if header is None:
        return
    (height, width), swap, jpeg = header
    allowed = {(height, width)} | ({(width, height)} if swap else set())
    if jpeg:
        allowed |= {(-(-h // r), -(-w // r)) for h, w in list(allowed) for r in (2, 4, 8)}
    assert tuple(shape) in allowed, f"decoded {shape[1]} x {shape[0]}, the header says {width} x {height}"


def _header_size(data: bytes, fmt: str):
    """((height, width), orientation swaps the sides, may be a reduced JPEG decode), or None when unreadable."""
    if fmt == "dicom" or data[128:132] == b"DICM":
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            syntax = str(ds.file_meta.TransferSyntaxUID)
            return (int(ds.Rows), int(ds.Columns)), False, syntax.startswith("1.2.840.10008.1.2.4.5")
        except Exception:  # noqa: BLE001 - the size check is only for headers pydicom reads
            return None
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size
    except Exception:  # noqa: BLE001 - OpenCV's TIFF reader took it, or the header is gone
        return None
    try:
        swap = int(im.getexif().get(0x0112, 1)) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - as decode_image: a broken EXIF is no orientation
        swap = False
    return (height, width), swap, im.format == "JPEG"


# ------------------------------------------------------------------------------------------- the seeds

@pytest.mark.parametrize("fmt", damage.FORMATS)
def test_every_seed_decodes_to_the_phantom_photo(fmt, tmp_path):
    """The fuzz starts from files that grade: each seed decodes to the phantom photograph (exactly, where
    the format is lossless), and its header fields are found where they are."""
    photo = damage.seed_photo()
    lossless = {"rgb8", "rgb16", "raw", "lzw", "deflate", "native_rgb"}
    for name, data in _seeds(fmt).items():
        path = tmp_path / f"{name}{damage.SUFFIX[fmt]}"
        path.write_bytes(data)
        assert grade_like_the_runtime(path, fmt) == ["graded"], name
        rgb = next(iter_sources([path])).decode()
        assert rgb.shape == photo.shape, name
        if name in lossless:
            np.testing.assert_array_equal(rgb, photo, err_msg=name)
        else:
            assert np.abs(rgb.astype(int) - photo).mean() < 6, name
        sizes, aliases = {}, {"ImageWidth": "width", "Columns": "width", "ImageLength": "height", "Rows": "height"}
        for field in damage.header_fields(data):
            part = field.name.rpartition(".")[2]
            part = aliases.get(part, part)
            if part in ("width", "height"):
                sizes[part] = field.original
        assert sizes == {"width": photo.shape[1], "height": photo.shape[0]}, (name, sizes)


def test_header_edits_and_crc_repair_reach_past_the_header():
    """A PNG chunk edited by set_field keeps a valid CRC (else every PNG case would stop at the checksum), and
    a field edit lands where the parsers say it is."""
    from PIL import Image

    data = _seeds("png")["rgb8"]
    height = next(f for f in damage.header_fields(data) if f.name == "IHDR.height")
    shorter = damage.set_field(data, height, 100)
    assert Image.open(io.BytesIO(shorter)).size == (160, 100)
    assert damage.repair_png_crcs(shorter) == shorter
    assert damage.repair_png_crcs(damage.flip_bits(shorter, [8 * 40])) != damage.flip_bits(shorter, [8 * 40])
    jpeg = _seeds("jpeg")["restart_markers"]
    names = {f.name.split("#")[0] + "." + f.name.rpartition(".")[2] for f in damage.header_fields(jpeg)}
    assert {"SOF0.width", "SOF0.height", "DRI.restart_interval", "SOS.components"} <= names
    assert Image.open(io.BytesIO(damage.claim_size(jpeg, 300, 200))).size == (300, 200)


# ----------------------------------------------------------------------------------------- the fuzzing

@pytest.mark.parametrize("fmt", damage.FORMATS)
def test_damaged_files_grade_or_raise_the_library_errors(fmt, tmp_path, watchdog):
    seeds = _seeds(fmt)
    path = tmp_path / f"case{damage.SUFFIX[fmt]}"
    outcomes: dict[str, int] = {}

    @FUZZ
    @given(case=damaged(fmt, seeds))
    def check(case: Damaged) -> None:
        path.write_bytes(case.data)
        with watchdog.case(f"{case!r} (the file: {path})"):
            for outcome in grade_like_the_runtime(path, fmt):
                key = "graded" if outcome == "graded" else "refused"
                outcomes[key] = outcomes.get(key, 0) + 1

    check()
    # the property means something only if the cases reach both ends: some damage is graded, some refused
    assert outcomes.get("graded", 0) > 0 and outcomes.get("refused", 0) > 0, outcomes


@pytest.mark.parametrize("fmt", damage.FORMATS)
def test_every_header_field_at_its_edge_values_grades_or_is_refused(fmt, tmp_path, watchdog):
    """The systematic complement of the random search: every header field of every seed (not the segment lengths)
    set to each of its edge values (0, 1, 2, the original's neighbours and double, the top of its range, every
    choice of a DICOM string), one at a time. All failures are collected and reported together."""
    path = tmp_path / f"edge{damage.SUFFIX[fmt]}"
    failures, cases = [], 0
    for name, data in _seeds(fmt).items():
        for field in damage.header_fields(data):
            if field.name.endswith(".length"):
                continue
            for value in field.edges():
                path.write_bytes(damage.set_field(data, field, value))
                cases += 1
                try:
                    with watchdog.case(f"{fmt}/{name} with {field.name} = {value!r} (the file: {path})"):
                        grade_like_the_runtime(path, fmt)
                except Exception as exc:  # noqa: BLE001 - collected: every failing edit is reported at once
                    failures.append(f"{name} {field.name}={value!r}: {type(exc).__name__}: {exc}"[:300])
    assert cases > 50 and not failures, "\n".join([f"{len(failures)} of {cases} edits:", *failures[:30]])


# ------------------------------------------------------------------------------------ what the fuzz found

@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 1), (1, 160), (160, 1), (640, 1), (2, 3000), (3000, 2),
                                   (10, 5000)])
def test_slivers_and_single_pixels_are_no_field_of_view_not_a_crash(shape):
    """decode_image returns any size a header says, down to 1 x 1 (a PNG with IHDR height 1, a DICOM with
    Columns 1: both found by the fuzz). The gate used to raise ValueError below 2 px and cv2.error where the
    short side was under the FOV detector's subsampling step (2 x 3000), which ended a grading run."""
    rgb = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    fov = detect_fov(rgb)
    report = assess_quality(rgb, fov)
    prepared, geometry = prepare(rgb, CONFIG, fov)
    _check_outputs(rgb, fov, report, prepared, geometry)
    assert not fov.found and not report.gradable and "no_field_of_view" in report.reasons
    for config in (PreprocessConfig(ben_graham=True), PreprocessConfig(crop_to_fov=False, image_size=16)):
        assert prepare(rgb, config)[0].shape == (config.image_size, config.image_size, 3)
    with pytest.raises(ValueError, match="empty image"):
        detect_fov(rgb[:0])


@pytest.mark.parametrize("fmt, field, value", [("png", "IHDR.height", 1), ("dicom", "Columns", 1),
                                               ("tiff", "ImageLength", 1)])
def test_a_one_pixel_high_or_wide_file_is_an_ungradable_record(fmt, field, value, tmp_path):
    data = _seeds(fmt)["rgb8" if fmt == "png" else "native_rgb" if fmt == "dicom" else "raw"]
    data = damage.set_field(data, next(f for f in damage.header_fields(data) if f.name == field), value)
    path = tmp_path / f"sliver{damage.SUFFIX[fmt]}"
    path.write_bytes(data)
    assert grade_like_the_runtime(path, fmt) == ["graded"]
    rgb = next(iter_sources([path])).decode()
    assert 1 in rgb.shape[:2] and assess_quality(rgb).reasons[0] == "no_field_of_view"


@pytest.mark.parametrize("fmt, seed, field", [("png", "rgb8", "IHDR.height"), ("png", "rgb16", "IHDR.height"),
                                              ("png", "palette", "IHDR.height"), ("tiff", "raw", "ImageLength")])
def test_a_header_claiming_more_rows_than_the_data_holds_is_refused(fmt, seed, field):
    """Found by the benchmark (png rgb8, IHDR height 10240: graded, 10080 rows black): a header that claims 320 rows
    over the 160 its data holds decodes to 320 rows, the last 160 zeros (black; palette entry 0 on a palette PNG), a
    silently partial photograph where decode_image promises "truncation is an error, never a silently grey image".
    Now refused by counting the PNG's inflated bytes and the TIFF strips' rows (preprocess/formats.py); LZW and
    deflate TIFF strips are refused by libtiff, JPEG by strict libjpeg, DICOM by its pixel data length."""
    data = _seeds(fmt)[seed]
    data = damage.set_field(data, next(f for f in damage.header_fields(data) if f.name == field), 320)
    try:
        rgb = decode_image(data)
    except ImageDecodeError as exc:
        rgb, message = None, str(exc)
    assert rgb is None, f"decoded {rgb.shape[1]} x {rgb.shape[0]}, rows 160-319 all {np.unique(rgb[160:])}"
    assert message.startswith("truncated or corrupt image"), message


# --------------------------------------------------------------------------------------------- memory

#: Address space one image may take while it is decoded and judged, per pixel its header claims: the seeds with
#: headers claiming 10950 x 10950 px over 160 px of data reach 4.0 B per claimed pixel (462 MiB, Pillow's RGBX
#: image; x86-avx2, Pillow 13); a photo decoded at full size also takes the RGB array and the gate's copies.
BYTES_PER_CLAIMED_PIXEL = 16
#: Headroom for a case refused from its header: no pixel buffer, only Python objects and the file.
REFUSAL_HEADROOM = 64 << 20

_UNDER_A_CAP = textwrap.dedent("""
    import json, re, resource, sys, warnings
    warnings.simplefilter("ignore")   # Pillow's DecompressionBombWarning above 89 MP, before our refusal
    import cv2
    cv2.setNumThreads(1)              # the grader's IMAGE_THREADS; no thread pool may start under the cap
    from edgeretina.errors import EdgeRetinaError
    from edgeretina.phantom import damage
    from edgeretina.preprocess import PreprocessConfig, detect_fov, decode_image, prepare
    from edgeretina.quality import assess_quality

    def vm(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) << 10

    claims, headroom, formats = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    seeds = {f"{fmt}/{name}": data for fmt in formats for name, data in damage.seed_files(fmt).items()}
    for data in seeds.values():       # every decoder loaded and used once before the cap
        rgb = decode_image(data, 1024)
        prepare(rgb, PreprocessConfig(), detect_fov(rgb)); assess_quality(rgb)
    base = vm("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (base + headroom, resource.RLIM_INFINITY))
    results = {}
    for name, data in seeds.items():
        for width, height in claims:
            try:
                rgb = decode_image(damage.claim_size(data, width, height), 1024)
                fov = detect_fov(rgb)
                assess_quality(rgb, fov); prepare(rgb, PreprocessConfig(), fov)
                outcome = f"graded {rgb.shape[1]} x {rgb.shape[0]}"
            except EdgeRetinaError as exc:
                outcome = str(exc)
            except MemoryError:
                outcome = "MemoryError"
            results[f"{name} {width}x{height}"] = outcome
    print(json.dumps({"results": results, "peak_over_base": vm("VmPeak") - base}))
""")


def _under_a_cap(claims: list[tuple[int, int]], headroom: int) -> dict:
    formats = [fmt for fmt in damage.FORMATS if fmt != "dicom" or _has_pydicom()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _UNDER_A_CAP, json.dumps(claims), str(headroom), ",".join(formats)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["results"]) == len(claims) * (11 if "dicom" in formats else 9)
    return result


def _has_pydicom() -> bool:
    import importlib.util

    return importlib.util.find_spec("pydicom") is not None


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_AS")


@linux_only
def test_headers_claiming_more_than_max_pixels_are_refused_before_allocating():
    """Every seed with its header claiming 12000 x 12000 (over MAX_PIXELS, under Pillow's own 179 MP bomb
    limit, so only our check refuses it) or 65535 x 65535: refused as too large with at most 64 MiB more
    address space than before, where the claimed pixels alone would need 432 MB / 12.9 GB."""
    result = _under_a_cap([(12_000, 12_000), (65_535, 65_535)], REFUSAL_HEADROOM)
    for case, outcome in result["results"].items():
        assert outcome.startswith("image too large"), (case, outcome)


@linux_only
def test_a_header_claiming_just_under_max_pixels_stays_within_its_memory_bound():
    """Just under the limit (10950 x 10950 = 119.9 MP over 160 px of data), decoding and judging each seed takes
    at most BYTES_PER_CLAIMED_PIXEL of address space per claimed pixel (1.9 GB): every case ends in a decode
    error or a graded photo, none in a MemoryError."""
    claim = (10_950, 10_950)
    assert claim[0] * claim[1] <= MAX_PIXELS
    headroom = BYTES_PER_CLAIMED_PIXEL * claim[0] * claim[1]
    result = _under_a_cap([claim], headroom)
    for case, outcome in result["results"].items():
        assert outcome != "MemoryError" and not outcome.startswith("image too large"), (case, outcome)
    assert 0 <= result["peak_over_base"] <= headroom
