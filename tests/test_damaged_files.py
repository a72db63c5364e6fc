"""Damaged files say so (issue 12, part 4).

A JPEG whose entropy-coded data is corrupt used to decode partly grey, be judged ``no_field_of_view``, and
have libjpeg's warning printed into the middle of the results table. Now: corrupt image data is an error
record that names the codec's finding; what codec libraries print goes to the log (``--log``, watch's
OUT/watch.log), never to the console or a results table; files that are merely unusual still decode.

The photograph is the public-domain ``skimage.data.retina()``; the model is the tiny test bundle.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from edgeretina.errors import ImageDecodeError
from edgeretina.preprocess import decode_image
from edgeretina.runtime import Grader

skimage_data = pytest.importorskip("skimage.data")

CORRUPT_JPEG = r"^truncated or corrupt image \(libjpeg: Corrupt JPEG data: premature end of data segment\)"
CORRUPT_TIFF = r"^truncated or corrupt image \(libtiff: decoding error\)"


def _codec_lines(log: Path) -> list[str]:
    """What the C libraries printed, as the log has it: libtiff's words about the damaged TIFF below (e.g.
    "LZWDecode: Not enough data at scanline 217", or "tempfile.tif: Using code not yet in table")."""
    marker = " WARNING edgeretina.native: "
    return [line.split(marker, 1)[1] for line in log.read_text().splitlines() if marker in line]


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    return cv2.resize(skimage_data.retina(), (704, 704), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def jpeg(retina) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(retina).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def _scan_start(jpeg: bytes) -> int:
    """Offset of the first byte of entropy-coded data (after the Start-Of-Scan segment)."""
    sos = jpeg.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(jpeg[sos + 2: sos + 4], "big")


def _damaged_jpeg(jpeg: bytes, how: str) -> bytes:
    """Damage in the middle of the scan; each file keeps its SOI, headers and end marker, so only the
    decoder can tell."""
    data = bytearray(jpeg)
    middle = (_scan_start(jpeg) + len(jpeg)) // 2
    if how == "marker_in_scan":      # a stray restart marker: libjpeg stops decoding the scan there
        data[middle: middle + 20] = b"\xff\xd0" * 10
    elif how == "cut_then_end":      # a copy that stopped half-way, closed with an end marker
        data = data[:middle] + b"\xff\xd9"
    elif how == "zeroed_block":      # a run of zeros (a bad sector)
        data[middle: middle + 64] = bytes(64)
        data[middle + 64: middle + 66] = b"\xff\xd1"
    return bytes(data)


def _damaged_tiff(retina: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(retina).save(buffer, "TIFF", compression="tiff_lzw")
    data = bytearray(buffer.getvalue())
    data[len(data) // 2: len(data) // 2 + 500] = bytes(500)
    return bytes(data)


# ---- decode ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["marker_in_scan", "cut_then_end", "zeroed_block"])
def test_corrupt_jpeg_data_is_an_error_naming_libjpeg(jpeg, how):
    damaged = _damaged_jpeg(jpeg, how)
    lenient = cv2.imdecode(np.frombuffer(damaged, np.uint8), cv2.IMREAD_COLOR)
    assert lenient is not None and lenient.shape == (704, 704, 3)   # what a lenient decoder makes of it
    with pytest.raises(ImageDecodeError, match=CORRUPT_JPEG):
        decode_image(damaged)
    with pytest.raises(ImageDecodeError, match=CORRUPT_JPEG):
        decode_image(damaged, max_side=176)  # the reduced-scale decode is just as strict


def test_unusual_but_whole_jpegs_still_decode(retina, jpeg):
    """Strictness refuses damaged data only: padding before the end marker, bytes after it (a camera's
    trailer), restart markers, progressive and 4:4:4 encodings give the photo's pixels."""
    expected = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    np.testing.assert_array_equal(decode_image(jpeg[:-2] + b"\x00\x00" + jpeg[-2:]), expected)
    np.testing.assert_array_equal(decode_image(jpeg + b"CAMERA-TRAILER\x00" * 8), expected)
    for params in ({"progressive": True}, {"subsampling": 0}, {"restart_marker_blocks": 4}):
        buffer = io.BytesIO()
        Image.fromarray(retina).save(buffer, "JPEG", quality=92, **params)
        data = buffer.getvalue()
        np.testing.assert_array_equal(decode_image(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_corrupt_tiff_data_is_an_error_naming_libtiff(retina):
    with pytest.raises(ImageDecodeError, match=CORRUPT_TIFF):
        decode_image(_damaged_tiff(retina))


def _interlaced_png(rgb: np.ndarray) -> bytes:
    """An Adam7-interlaced 8-bit RGB PNG, written by hand (Pillow and OpenCV write only non-interlaced ones)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        sub = np.ascontiguousarray(rgb[y0::dy, x0::dx])
        if sub.size:
            raw += b"".join(b"\x00" + row.tobytes() for row in sub)
    height, width = rgb.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 1)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def test_pixel_data_short_of_the_rows_the_header_claims_is_refused(retina):
    """A PNG whose zlib stream closes early, and an interlaced one, and a TIFF with a strip less than it claims:
    Pillow decodes them with the missing rows black; decode_image refuses them. Whole files decode."""
    small = np.ascontiguousarray(retina[::4, ::4])
    interlaced = _interlaced_png(small)
    assert interlaced[28] == 1
    np.testing.assert_array_equal(decode_image(interlaced), small)
    pixels_end = interlaced.index(b"IEND") - 4
    idat = interlaced.index(b"IDAT")
    raw = zlib.decompress(interlaced[idat + 4: pixels_end - 4])
    short = zlib.compress(raw[: len(raw) * 9 // 10])          # a whole zlib stream, 10 % of the pixel data short
    body = b"IDAT" + short
    cut = interlaced[: idat - 4] + struct.pack(">I", len(short)) + body + struct.pack(">I", zlib.crc32(body)) \
        + interlaced[pixels_end:]
    with pytest.raises(ImageDecodeError, match=r"^truncated or corrupt image \(PNG pixel data ends early"):
        decode_image(cut)
    buffer = io.BytesIO()
    Image.fromarray(small).save(buffer, "TIFF")        # uncompressed
    edited = bytearray(buffer.getvalue())   # ImageLength doubled: the strips then cover half the rows
    ifd = int.from_bytes(edited[4:8], "little")
    for i in range(int.from_bytes(edited[ifd: ifd + 2], "little")):
        entry = ifd + 2 + 12 * i
        if int.from_bytes(edited[entry: entry + 2], "little") == 257:      # ImageLength
            kind = int.from_bytes(edited[entry + 2: entry + 4], "little")
            width = 2 if kind == 3 else 4
            edited[entry + 8: entry + 8 + width] = (small.shape[0] * 2).to_bytes(width, "little")
    with pytest.raises(ImageDecodeError, match=r"^truncated or corrupt image \(TIFF strips cover \d+ of "
                                               + str(small.shape[0] * 2) + r" rows\)"):
        decode_image(bytes(edited))


# ---- grading -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory, retina, jpeg) -> Path:
    d = tmp_path_factory.mktemp("damaged")
    (d / "a_good.jpg").write_bytes(jpeg)
    (d / "b_damaged.jpg").write_bytes(_damaged_jpeg(jpeg, "marker_in_scan"))
    (d / "c_damaged.tif").write_bytes(_damaged_tiff(retina))
    png = io.BytesIO()
    Image.fromarray(retina).save(png, "PNG")
    (d / "d_truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) * 2 // 3])
    return d


EXPECTED_ERRORS = {"b_damaged.jpg": CORRUPT_JPEG, "c_damaged.tif": CORRUPT_TIFF,
                   "d_truncated.png": r"^truncated or corrupt image"}


def test_a_damaged_file_is_an_error_record_never_a_field_of_view_guess(onnx_bundle, folder):
    records = {Path(r.file).name: r for r in Grader(onnx_bundle, threads=1).grade(sorted(folder.iterdir()))}
    assert records["a_good.jpg"].error is None and records["a_good.jpg"].grade in range(5)
    for name, message in EXPECTED_ERRORS.items():
        record = records[name]
        assert record.error is not None and re.match(message, record.error), (name, record.error)
        assert record.quality is None and record.gradable is None and record.grade is None, (name, record)


def _cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("edgeretina")
    env = {key: value for key, value in os.environ.items() if key not in ("EDGERETINA_DEBUG", "PYTHONWARNINGS")}
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)


def test_grade_keeps_codec_messages_out_of_the_console_and_the_table(onnx_bundle, folder, tmp_path):
    log = tmp_path / "grade.log"
    table = _cli("grade", folder, "--bundle", onnx_bundle, "--log", log)
    assert table.returncode == 3 and table.stderr == "", table.stderr            # 3: some files failed
    lines = table.stdout.rstrip("\n").splitlines()
    names = sorted(p.name for p in folder.iterdir())
    assert len(lines) == 1 + len(names), table.stdout                           # header + one row per file
    assert [line.split()[0] for line in lines[1:]] == names, table.stdout
    said = _codec_lines(log)                                                     # the codec's words: in the log
    assert said and not any(line in table.stdout for line in said), (said, table.stdout)

    as_json = _cli("grade", folder, "--bundle", onnx_bundle, "--json")           # no --log: dropped, not shown
    assert as_json.returncode == 3 and as_json.stderr == "", as_json.stderr
    records = {Path(r["file"]).name: r for r in json.loads(as_json.stdout)}
    assert sorted(records) == names
    for name, message in EXPECTED_ERRORS.items():
        assert re.match(message, records[name]["error"]), records[name]


def test_watch_writes_codec_messages_to_its_log(onnx_bundle, folder, tmp_path):
    out = tmp_path / "graded"
    done = _cli("watch", folder, "--bundle", onnx_bundle, "--out", out, "--once", "--interval", "0.05",
                "--no-overlays")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    said = _codec_lines(out / "watch.log")
    assert said and not any(line in done.stdout for line in said), (said, done.stdout)
    assert "graded 4 image(s), 3 error(s)" in done.stdout, done.stdout
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(Path(r["source"]["path"]).name for r in records) == sorted(p.name for p in folder.iterdir())


def test_log_option_must_name_a_file_in_an_existing_folder(onnx_bundle, folder, tmp_path):
    for bad, says in ((tmp_path, "is a folder"), (tmp_path / "missing" / "x.log", "does not exist")):
        done = _cli("grade", folder, "--bundle", onnx_bundle, "--log", bad)
        assert done.returncode == 1 and done.stdout == "" and says in done.stderr, done.stderr


# ---- the capture itself ------------------------------------------------------------------------------------

def test_native_stderr_goes_to_the_log_and_python_stderr_still_reaches_the_console(tmp_path):
    """Bytes written to descriptor 2 (as a C library does) become log records; Python's sys.stderr keeps
    writing to the real stderr, and descriptor 2 is restored after the block."""
    log = tmp_path / "native.log"
    script = textwrap.dedent(f"""
        import logging, os, sys, threading
        from edgeretina.native_output import native_stderr_to_log
        logging.basicConfig(filename={str(log)!r}, level=logging.INFO, format="%(name)s|%(message)s")
        with native_stderr_to_log():
            os.write(2, b"libfoo: premature end\\n")
            threads = [threading.Thread(target=os.write, args=(2, b"from a worker thread\\n")) for _ in range(3)]
            [t.start() for t in threads]; [t.join() for t in threads]
            print("python says hello", file=sys.stderr)
            os.write(2, b"libbar: no newline at the end")
        os.write(2, b"after the block\\n")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "python says hello\nafter the block\n"
    lines = log.read_text().splitlines()
    assert sorted(lines) == sorted(["edgeretina.native|libfoo: premature end",
                                    "edgeretina.native|libbar: no newline at the end",
                                    *["edgeretina.native|from a worker thread"] * 3])
