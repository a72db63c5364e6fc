"""preprocess.py: decoding every format and failure, field-of-view detection, prepare/normalise,
mapping maps back onto the photo, and the config's round trip."""

from __future__ import annotations

import io
import json
import struct

import cv2
import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageFile, ImageOps

from edgeretina import preprocess as pp
from edgeretina.errors import ConfigError, ImageDecodeError
from edgeretina.phantom.damage import png_header_only
from edgeretina.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    FieldOfView,
    Geometry,
    PreprocessConfig,
    decode_image,
    detect_fov,
    map_to_original,
    normalize,
    prepare,
    preprocess,
)
from edgeretina.preprocess.fov import _fraction_inside
from edgeretina.preprocess.transform import _disc_mask

skimage_data = pytest.importorskip("skimage.data")


# ---------------------------------------------------------------------------------------------
# helpers


def pattern(h: int = 60, w: int = 80) -> np.ndarray:
    """RGB uint8 with a distinct value in every channel and a marker in the top-left corner."""
    y, x = np.mgrid[:h, :w]
    rgb = np.stack([(x * 3) % 256, (y * 4) % 256, ((x + y) * 2) % 256], axis=-1).astype(np.uint8)
    rgb[:8, :8] = (255, 0, 0)
    return rgb


def fundus_disc(h, w, cx, cy, r, *, texture=True, vignetting=0.35, seed=0, background=0, ss=4):
    """A synthetic fundus-like photo: anti-aliased disc (centre/radius in continuous pixel
    coordinates), orange-red, darker towards the rim, with a few dark 'vessels' and noise."""
    rng = np.random.default_rng(seed)
    canvas = np.zeros((h * ss, w * ss), np.uint8)
    cv2.circle(canvas, (int(round(cx * ss * 16)), int(round(cy * ss * 16))), int(round(r * ss * 16)), 255, -1,
               lineType=cv2.LINE_AA, shift=4)
    mask = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    rho = np.sqrt((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) / r
    light = 1.0 - vignetting * np.minimum(rho, 1.0) ** 2
    img = np.array([205.0, 95.0, 55.0], np.float32) * light[..., None]
    if texture:
        for _ in range(12):
            p0 = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
            p1 = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
            cv2.line(img, p0, p1, (120.0, 40.0, 25.0), max(1, int(r / 120)), lineType=cv2.LINE_AA)
        img += rng.normal(0, 2.0, img.shape).astype(np.float32)
    out = img * mask[..., None] + background * (1.0 - mask[..., None])
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, ext: str, **params) -> bytes:
    flags = []
    if ext == ".jpg":
        flags = [cv2.IMWRITE_JPEG_QUALITY, params.get("quality", 95)]
    ok, buf = cv2.imencode(ext, rgb[..., ::-1] if rgb.ndim == 3 else rgb, flags)
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    return skimage_data.retina()


# ---------------------------------------------------------------------------------------------
# decode: formats


def test_decode_png_exact_and_path_equals_bytes(tmp_path):
    rgb = pattern()
    path = tmp_path / "a.png"
    path.write_bytes(encode(rgb, ".png"))
    out = decode_image(path)
    assert out.dtype == np.uint8 and out.shape == (60, 80, 3) and out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, rgb)
    np.testing.assert_array_equal(decode_image(str(path)), rgb)
    np.testing.assert_array_equal(decode_image(path.read_bytes()), rgb)


@pytest.mark.parametrize("ext", [".bmp", ".tif"])
def test_decode_lossless_formats_exact(tmp_path, ext):
    rgb = pattern()
    path = tmp_path / f"a{ext}"
    path.write_bytes(encode(rgb, ext))
    np.testing.assert_array_equal(decode_image(path), rgb)


def test_decode_jpeg_rgb_and_gray(tmp_path):
    rgb = cv2.GaussianBlur(pattern(120, 160), (0, 0), 2)  # smooth: JPEG keeps it close
    out = decode_image(encode(rgb, ".jpg"))
    assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb).mean() < 3
    gray = rgb[..., 1]
    out = decode_image(encode(gray, ".jpg"))
    assert out.shape == (120, 160, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert np.abs(out[..., 0].astype(int) - gray).mean() < 3


def test_decode_grayscale_png_becomes_three_channels():
    gray = pattern()[..., 1]
    out = decode_image(encode(gray, ".png"))
    assert out.shape == (60, 80, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_decode_16_bit_is_scaled_not_clipped(ext):
    rgb16 = np.zeros((4, 5, 3), np.uint16)
    rgb16[0, :, 0] = [0, 1000, 32768, 40000, 65535]
    rgb16[1, :, 1] = [256, 511, 512, 65280, 65535]
    rgb16[2:] = 20000
    out = decode_image(encode(rgb16, ext))
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 3, 128, 156, 255])  # high byte (clipping would give 255s)
    np.testing.assert_array_equal(out[1, :, 1], [1, 1, 2, 255, 255])
    assert (out[2:] == 78).all()
    gray16 = (np.arange(20, dtype=np.uint32).reshape(4, 5) * 3400).astype(np.uint16)
    out = decode_image(encode(gray16, ext))
    assert out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out[..., 0], gray16 >> 8)
    np.testing.assert_array_equal(out[..., 2], gray16 >> 8)


def test_decode_float_rgb_tiff_that_pillow_cannot_identify():
    rgb = pattern(20, 30)
    ok, buf = cv2.imencode(".tif", (rgb[..., ::-1].astype(np.float32) / 255.0))
    assert ok
    out = decode_image(buf.tobytes())
    assert np.abs(out.astype(int) - rgb).max() <= 1


def test_decode_rgba_composited_on_black():
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :4, 3] = 255
    rgba[:, 4:8, 3] = 128
    rgba[:, 8:, 3] = 0
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    out = decode_image(buf.getvalue())
    assert out.shape == (10, 12, 3)
    assert (out[:, :4] == (200, 100, 50)).all()
    assert np.abs(out[:, 4:8].astype(int) - (100, 50, 25)).max() <= 1
    assert (out[:, 8:] == 0).all()


def test_decode_palette_and_palette_with_transparency():
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[:, :5] = (10, 200, 30)
    rgb[:, 5:] = (240, 20, 90)
    im = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert im.mode == "P"
    buf = io.BytesIO()
    im.save(buf, "PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue()), rgb)
    # make the second colour transparent: it must come out black
    index = im.getpixel((7, 0))
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=index)
    out = decode_image(buf.getvalue())
    assert (out[:, :5] == (10, 200, 30)).all() and (out[:, 5:] == 0).all()


def test_decode_cmyk_jpeg():
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:16] = (200, 80, 40)
    rgb[16:] = (30, 140, 220)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=95)
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "CMYK"
    out = decode_image(buf.getvalue())
    assert out.shape == (32, 48, 3)
    assert np.abs(out[4:12].astype(int) - (200, 80, 40)).max() <= 6
    assert np.abs(out[20:28].astype(int) - (30, 140, 220)).max() <= 6


def test_decode_applies_exif_orientation_6_on_jpeg():
    rgb = np.zeros((60, 100, 3), np.uint8)  # landscape as stored
    rgb[:20, :20] = (255, 255, 255)  # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(buf.getvalue())
    assert out.shape == (100, 60, 3)  # portrait once displayed
    assert out[:20, -20:].mean() > 200  # stored top-left ends up at the top-right
    assert out[-20:, :20].mean() < 30


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_every_exif_orientation_matches_pillow(orientation):
    rgb = pattern(30, 50)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB"))
    np.testing.assert_array_equal(decode_image(buf.getvalue()), expected)


# ---------------------------------------------------------------------------------------------
# decode: failures


def test_decode_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="^empty file"):
        decode_image(path)


def test_decode_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is a text file, not a photograph\n")
    with pytest.raises(ImageDecodeError, match=r"^not an image \(looks like text\)"):
        decode_image(path)
    with pytest.raises(ImageDecodeError, match=r"^not an image \("):
        decode_image(bytes(range(256)) * 4)


def test_decode_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageDecodeError, match="^file not found"):
        decode_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(tmp_path)


@pytest.mark.parametrize("cut", ["half", "no_eoi", "header_only"])
def test_decode_truncated_jpeg_raises(retina, cut):
    data = encode(retina, ".jpg", quality=90)
    n = {"half": len(data) // 2, "no_eoi": len(data) - 2, "header_only": 700}[cut]
    with pytest.raises(ImageDecodeError, match="^truncated or corrupt image"):
        decode_image(data[:n])


def test_decode_truncated_even_if_pillow_is_told_to_tolerate_it(retina, monkeypatch):
    """Another library may set Pillow's global LOAD_TRUNCATED_IMAGES; we still refuse."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    jpeg = encode(retina, ".jpg", quality=90)
    png = encode(retina[:200, :200], ".png")
    for data in (jpeg[: len(jpeg) // 2], png[: len(png) // 2]):
        with pytest.raises(ImageDecodeError, match="^truncated or corrupt image"):
            decode_image(data)


def test_decode_truncated_png_raises():
    data = encode(pattern(200, 200), ".png")
    with pytest.raises(ImageDecodeError, match="^truncated or corrupt image"):
        decode_image(data[: len(data) * 2 // 3])


def test_decode_jpeg_with_trailing_bytes_is_fine():
    rgb = pattern()
    data = encode(rgb, ".jpg") + b"\x00" * 64 + b"camera trailer \xff\xda with a stray SOS"
    assert decode_image(data).shape == (60, 80, 3)


def test_decode_truncated_jpeg_with_a_complete_thumbnail_inside_raises(retina):
    """The thumbnail's own SOS/EOI (inside an APPn segment) must not make a cut photo look complete."""
    thumbnail = encode(retina[::16, ::16], ".jpg")
    body = b"edgeretina-test\x00" + thumbnail
    app15 = b"\xff\xef" + struct.pack(">H", len(body) + 2) + body
    photo = encode(retina, ".jpg", quality=90)
    data = photo[:2] + app15 + photo[2:]
    assert decode_image(data).shape == retina.shape  # complete: fine
    with pytest.raises(ImageDecodeError, match="^truncated or corrupt image"):
        decode_image(data[: len(data) * 3 // 4])


@pytest.fixture
def pixel_decodes(monkeypatch) -> list[str]:
    """Every pixel decode decode_image can start: Pillow's ImageFile.load (which np.asarray and convert call
    too), libjpeg-turbo through simplejpeg and OpenCV's imdecode, each recorded and then run for real."""
    calls: list[str] = []
    pillow_load, opencv_decode, turbo_decode = ImageFile.ImageFile.load, cv2.imdecode, simplejpeg.decode_jpeg

    def load(self, *args, **kwargs):
        calls.append(f"Pillow {self.format}")
        return pillow_load(self, *args, **kwargs)

    def imdecode(*args, **kwargs):
        calls.append("OpenCV")
        return opencv_decode(*args, **kwargs)

    def decode_jpeg(*args, **kwargs):
        calls.append("libjpeg-turbo")
        return turbo_decode(*args, **kwargs)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(cv2, "imdecode", imdecode)
    monkeypatch.setattr(simplejpeg, "decode_jpeg", decode_jpeg)
    return calls


def test_pixel_decodes_are_seen(pixel_decodes):
    """The spy of the next test sees the three decoders (else its empty list would prove nothing)."""
    png, jpeg = encode(pattern(), ".png"), encode(pattern(), ".jpg")
    decode_image(png)
    assert set(pixel_decodes) == {"Pillow PNG"}   # load() is called more than once; all but the first return
    pixel_decodes.clear()
    decode_image(jpeg)
    assert pixel_decodes == ["libjpeg-turbo"]
    pixel_decodes.clear()
    float_tiff = cv2.imencode(".tiff", pattern().astype(np.float32) / 255)[1].tobytes()   # a TIFF Pillow cannot read
    assert decode_image(float_tiff).shape[2] == 3 and pixel_decodes == ["OpenCV"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own, above 89 MP
@pytest.mark.parametrize("size", [(12_000, 11_000), (30_000, 30_000)])
def test_decode_refuses_huge_images_from_the_header(size, pixel_decodes):
    """120 < 132 MP < Pillow's own limit, and 900 MP beyond it: both refused before decoding a pixel (how
    long that takes is in benchmarks/runtime_costs.py)."""
    with pytest.raises(ImageDecodeError, match=r"^image too large \("):
        decode_image(png_header_only(*size))
    assert pixel_decodes == []


def test_decode_message_names_the_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty.png"):
        decode_image(path)


# ---------------------------------------------------------------------------------------------
# field of view


FOV_CASES = {
    # name: (height, width, cx, cy, r)
    "centred_square": (1000, 1000, 500.0, 500.0, 470.0),
    "offset": (1000, 1000, 430.3, 561.7, 380.0),
    "black_borders_4_3": (900, 1200, 600.0, 450.0, 420.0),
    "cut_top_bottom_4_3": (900, 1200, 612.0, 455.0, 540.0),
    "cut_heavily_16_9": (720, 1280, 640.0, 360.0, 520.0),
    "cut_left_right_portrait": (1200, 900, 450.0, 600.0, 520.0),
    "small_image": (240, 320, 160.0, 120.0, 110.0),
}


@pytest.mark.parametrize("name", list(FOV_CASES))
def test_detect_fov_synthetic(name):
    h, w, cx, cy, r = FOV_CASES[name]
    img = fundus_disc(h, w, cx, cy, r, seed=len(name))
    fov = detect_fov(img)
    assert fov.found
    assert abs(fov.cx - cx) < 0.02 * r and abs(fov.cy - cy) < 0.02 * r and abs(fov.radius - r) < 0.02 * r, fov
    expected_visible = _fraction_inside(cx, cy, r, w, h)
    assert fov.fraction_visible == pytest.approx(expected_visible, abs=0.02)


def test_fraction_inside_matches_geometry():
    assert _fraction_inside(50, 50, 40, 100, 100) == pytest.approx(1.0)
    assert _fraction_inside(0, 50, 40, 100, 100) == pytest.approx(0.5, abs=1e-3)  # half outside
    assert _fraction_inside(0, 0, 40, 100, 100) == pytest.approx(0.25, abs=1e-3)
    # circle cut by two horizontal lines at distance d = r/2 from the centre
    d = 0.5
    cap = np.arccos(d) - d * np.sqrt(1 - d * d)
    assert _fraction_inside(100, 50, 100, 200, 100) == pytest.approx(1 - 2 * cap / np.pi, abs=1e-3)


def test_detect_fov_survives_jpeg_dark_photo_label_and_flat_cuts():
    h, w, cx, cy, r = 900, 1200, 590.0, 452.0, 430.0
    img = fundus_disc(h, w, cx, cy, r, seed=3)
    img = (img.astype(np.float32) * 0.2).astype(np.uint8)  # very dark exposure
    cv2.putText(img, "OD 2026-11-21", (20, 60), cv2.FONT_HERSHEY_SIMPLEX, 1.5, (255, 255, 255), 3)  # burnt-in label
    img[: int(cy - 0.8 * r)] = 0  # flat mask inside the image above and below (some cameras)
    img[int(cy + 0.8 * r):] = 0
    img = decode_image(encode(img, ".jpg", quality=70))
    fov = detect_fov(img)
    assert fov.found
    assert abs(fov.cx - cx) < 0.02 * r and abs(fov.cy - cy) < 0.02 * r and abs(fov.radius - r) < 0.02 * r, fov


def test_detect_fov_real_fundus(retina):
    fov = detect_fov(retina)
    # the field of view of skimage's retina: columns 8..1401, rows 5..1400 (measured by hand)
    assert fov.found and fov.fraction_visible > 0.99
    assert fov.cx == pytest.approx(705, abs=7) and fov.cy == pytest.approx(703, abs=7)
    assert fov.radius == pytest.approx(697, abs=7)


@pytest.mark.parametrize("name", ["black", "uniform", "noise", "astronaut", "coffee", "rocket"])
def test_detect_fov_rejects_non_fundus(name):
    if name == "black":
        img = np.zeros((480, 640, 3), np.uint8)
    elif name == "uniform":
        img = np.full((480, 640, 3), (190, 80, 50), np.uint8)
    elif name == "noise":
        img = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    else:
        img = getattr(skimage_data, name)()
    fov = detect_fov(img)
    assert not fov.found and fov.fraction_visible == 0.0
    h, w = img.shape[:2]
    assert (fov.cx, fov.cy, fov.radius) == (w / 2, h / 2, min(h, w) / 2)  # neutral fallback


def test_detect_fov_rejects_bad_input():
    with pytest.raises(ValueError):
        detect_fov(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError):
        detect_fov(np.zeros((10, 10, 3), np.float32))


# ---------------------------------------------------------------------------------------------
# prepare / normalize / preprocess


def test_prepare_crops_to_the_fov_and_masks_outside():
    h, w, cx, cy, r = 900, 1200, 640.0, 430.0, 400.0
    img = fundus_disc(h, w, cx, cy, r, background=12, texture=False)
    out, geo = prepare(img, PreprocessConfig())
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert geo.original_size == (900, 1200) and geo.fov.found
    x0, y0, x1, y1 = geo.crop_box
    assert x1 - x0 == y1 - y0 and abs((x0 + x1) / 2 - cx) <= 1.5 and abs((y0 + y1) / 2 - cy) <= 1.5
    assert abs((x1 - x0) - 2 * r) <= 0.02 * 2 * r
    # the disc touches the four sides of the square; the corners are outside it and zeroed
    assert out[112, 3].mean() > 60 and out[112, -4].mean() > 60 and out[3, 112].mean() > 60 and out[-4, 112].mean() > 60
    assert (out[:10, :10] == 0).all() and (out[-10:, -10:] == 0).all()
    unmasked, _ = prepare(img, PreprocessConfig(mask_outside_fov=False))
    assert abs(unmasked[:10, :10].astype(int).mean() - 12) <= 1  # the dark grey background is kept
    np.testing.assert_array_equal(unmasked[100:124, 100:124], out[100:124, 100:124])


def test_prepare_pads_a_cut_off_circle_with_black():
    h, w, cx, cy, r = 900, 1200, 600.0, 450.0, 560.0  # top and bottom cut off by the sensor
    img = fundus_disc(h, w, cx, cy, r, texture=False)
    out, geo = prepare(img, PreprocessConfig(image_size=256, mask_outside_fov=False))
    x0, y0, x1, y1 = geo.crop_box
    assert y0 < 0 and y1 > h  # the square extends beyond the image
    band = int(round((0 - y0) / (y1 - y0) * 256))  # rows that came from above the image
    assert band > 10 and (out[: band - 1] == 0).all() and (out[-band + 1 :] == 0).all()
    assert out[band + 3 : -band - 3, 128, 0].min() > 100


def test_prepare_falls_back_to_the_centred_square():
    img = skimage_data.coffee()  # 400 x 600, not a fundus
    out, geo = prepare(img, PreprocessConfig(image_size=100))
    assert not geo.fov.found
    assert geo.crop_box == (100.0, 0.0, 500.0, 400.0)
    expected = cv2.resize(img[:, 100:500], (100, 100), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - expected).mean() < 1.0  # nothing masked


def test_prepare_is_deterministic_and_reuses_a_given_fov(retina, monkeypatch):
    config = PreprocessConfig()
    a, geo_a = prepare(retina, config)
    b, geo_b = prepare(retina.copy(), config)
    np.testing.assert_array_equal(a, b)
    assert geo_a == geo_b

    def no_detection(_):
        raise AssertionError("detect_fov must not run when a fov is given")

    monkeypatch.setattr(pp, "detect_fov", no_detection)
    c, geo_c = prepare(retina, config, fov=geo_a.fov)
    np.testing.assert_array_equal(a, c)
    assert geo_c == geo_a


def test_prepare_enlarges_small_photos():
    img = fundus_disc(120, 160, 80.0, 60.0, 55.0)
    out, geo = prepare(img, PreprocessConfig(image_size=224))
    assert out.shape == (224, 224, 3) and geo.fov.found


def test_prepare_without_fov_crop_uses_centred_square_but_still_masks():
    h, w, cx, cy, r = 600, 800, 400.0, 300.0, 250.0
    img = fundus_disc(h, w, cx, cy, r, texture=False, background=12)
    out, geo = prepare(img, PreprocessConfig(image_size=120, crop_to_fov=False))
    assert geo.crop_box == (100.0, 0.0, 700.0, 600.0)
    assert (out[:5, :5] == 0).all()  # outside the circle: masked
    assert out[60, 60].mean() > 60


def test_ben_graham_centres_the_fundus_on_grey_without_a_rim(retina):
    inside = _disc_mask(224, 112, 112, 108)
    # a flat field comes out flat grey up to the rim: the black outside does not leak into the
    # local average (the classic recipe makes a bright ring there)
    flat = fundus_disc(600, 600, 300.0, 300.0, 280.0, texture=False, vignetting=0.0)
    out, _ = prepare(flat, PreprocessConfig(ben_graham=True))
    assert np.abs(out[inside].astype(int) - 128).max() <= 4
    assert (out[~_disc_mask(224, 112, 112, 113)] == 0).all()
    # smooth vignetting is (nearly: a quadratic keeps 4 * sigma^2 * curvature) removed
    shaded = fundus_disc(600, 600, 300.0, 300.0, 280.0, texture=False, vignetting=0.5)
    centre = _disc_mask(224, 112, 112, 90)
    plain, _ = prepare(shaded, PreprocessConfig())
    out, _ = prepare(shaded, PreprocessConfig(ben_graham=True))
    assert np.ptp(plain[centre][:, 0]) > 60
    assert np.ptp(out[centre][:, 0]) <= 16 and np.abs(out[centre].astype(int) - 128).max() <= 12
    real, _ = prepare(retina, PreprocessConfig(ben_graham=True))
    assert abs(real[inside].mean() - 128) < 8 and real[inside].std() > 8  # vessels survive
    plain, _ = prepare(retina, PreprocessConfig())
    assert not np.array_equal(real, plain)


def test_prepare_rejects_bad_arrays():
    with pytest.raises(ValueError, match="RGB uint8"):
        prepare(np.zeros((50, 50, 4), np.uint8), PreprocessConfig())


def test_normalize_numerics_shapes_and_layout():
    config = PreprocessConfig()
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 16, 20, 3), dtype=np.uint8)
    out = normalize(batch, config)
    assert out.shape == (3, 3, 16, 20) and out.dtype == np.float32 and out.flags.c_contiguous
    mean, std = np.array(CLIP_MEAN), np.array(CLIP_STD)
    expected = ((batch / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, expected, atol=2e-6)
    single = normalize(batch[1], config)
    assert single.shape == (3, 16, 20) and single.flags.c_contiguous
    np.testing.assert_array_equal(single, out[1])
    corners = normalize(np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8), config)
    np.testing.assert_allclose(corners[:, 0, 0], -mean / std, rtol=1e-6)
    np.testing.assert_allclose(corners[:, 0, 1], (1 - mean) / std, rtol=1e-6)
    custom = PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    np.testing.assert_allclose(normalize(np.full((1, 1, 3), 255, np.uint8), custom), 1.0)
    with pytest.raises(ValueError):
        normalize(batch.astype(np.float32), config)
    with pytest.raises(ValueError):
        normalize(batch[..., :2], config)


def test_preprocess_is_prepare_then_normalize(retina):
    config = PreprocessConfig(image_size=160)
    x, geo = preprocess(retina, config)
    prepared, geo2 = prepare(retina, config)
    assert x.shape == (3, 160, 160) and x.dtype == np.float32
    np.testing.assert_array_equal(x, normalize(prepared, config))
    assert geo == geo2


def test_jpeg_fast_path_gives_pillows_pixels(retina):
    """A 1411 px JPEG goes through libjpeg-turbo directly (the fast path; its speed is measured in
    benchmarks/runtime_costs.py): the same pixels as Pillow's decode, and so the same model input."""
    data = encode(retina, ".jpg", quality=95)
    pillow = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    decoded = decode_image(data)
    np.testing.assert_array_equal(decoded, pillow)
    config = PreprocessConfig()
    prepared, geometry = prepare(decoded, config)
    expected, expected_geometry = prepare(pillow, config)
    assert prepared.shape == (224, 224, 3) and geometry == expected_geometry
    np.testing.assert_array_equal(prepared, expected)


# ---------------------------------------------------------------------------------------------
# map_to_original


def test_map_to_original_round_trip_of_a_marked_region():
    """Mark a square in the photo, find it in the model input, map that mask back: same place."""
    h, w, cx, cy, r = 900, 1200, 610.0, 440.0, 520.0
    photo = fundus_disc(h, w, cx, cy, r, texture=False)
    marked = np.zeros((h, w), bool)
    marked[300:420, 700:860] = True
    photo[marked] = (30, 200, 250)  # a cyan patch: unique in a fundus
    prepared, geo = prepare(photo, PreprocessConfig())
    in_model = ((prepared[..., 2] > 150) & (prepared[..., 0] < 100)).astype(np.float32)
    assert 0.01 < in_model.mean() < 0.1
    back = map_to_original(in_model, geo, interpolation="nearest")
    assert back.shape == (h, w) and back.dtype == np.float32
    found = back > 0.5
    iou = (found & marked).sum() / (found | marked).sum()
    assert iou > 0.95


def test_map_to_original_places_grid_cells_on_the_crop_box():
    h, w, cx, cy, r = 900, 1200, 640.0, 430.0, 400.0
    _, geo = prepare(fundus_disc(h, w, cx, cy, r), PreprocessConfig())
    x0, y0, x1, y1 = geo.crop_box
    cell = (x1 - x0) / 14
    grid = np.zeros((14, 14), np.float32)
    grid[4:7, 8:10] = 1.0  # rows 4-6, columns 8-9
    back = map_to_original(grid, geo, interpolation="nearest")
    ys, xs = np.nonzero(back > 0.5)
    assert abs(xs.min() + 0.5 - (x0 + 8 * cell)) <= 1 and abs(xs.max() + 0.5 - (x0 + 10 * cell)) <= 1
    assert abs(ys.min() + 0.5 - (y0 + 4 * cell)) <= 1 and abs(ys.max() + 0.5 - (y0 + 7 * cell)) <= 1


def test_map_to_original_is_zero_outside_crop_and_fov():
    h, w, cx, cy, r = 900, 1200, 640.0, 430.0, 400.0
    _, geo = prepare(fundus_disc(h, w, cx, cy, r), PreprocessConfig())
    ones = np.ones((14, 14), np.float32)
    for interpolation in ("linear", "nearest", "cubic"):
        back = map_to_original(ones, geo, interpolation=interpolation)
        yy, xx = np.mgrid[:h, :w]
        d = np.hypot(xx + 0.5 - geo.fov.cx, yy + 0.5 - geo.fov.cy)
        assert np.allclose(back[d < geo.fov.radius - 1], 1.0, atol=1e-4)
        assert (back[d > geo.fov.radius + 1] == 0).all()


def test_map_to_original_with_a_fractional_box_matches_the_whole_pixel_path():
    fov = FieldOfView(cx=50.0, cy=50.0, radius=40.0, found=True, fraction_visible=1.0)
    grid = np.arange(49, dtype=np.float32).reshape(7, 7)
    whole = map_to_original(grid, Geometry((100, 100), (10.0, 10.0, 90.0, 90.0), fov))
    shifted = map_to_original(grid, Geometry((100, 100), (10.0 + 1e-6, 10.0, 90.0 + 1e-6, 90.0), fov))
    assert np.abs(whole - shifted).max() < 1e-3
    not_found = FieldOfView(cx=50.0, cy=50.0, radius=50.0, found=False, fraction_visible=0.0)
    back = map_to_original(np.ones((2, 2)), Geometry((100, 100), (10.0, 10.0, 90.0, 90.0), not_found))
    assert back[10:90, 10:90].min() == 1.0 and back[:10].max() == 0.0  # no FOV: only the crop limits it


def test_map_to_original_rejects_bad_arguments():
    geo = Geometry((10, 10), (0.0, 0.0, 10.0, 10.0), FieldOfView(5, 5, 5, False, 0.0))
    with pytest.raises(ConfigError):
        map_to_original(np.ones((2, 2)), geo, interpolation="lanczos")
    with pytest.raises(ValueError):
        map_to_original(np.ones((2, 2, 2)), geo)


# ---------------------------------------------------------------------------------------------
# PreprocessConfig


def test_config_round_trip_through_json():
    config = PreprocessConfig(image_size=384, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), ben_graham=True,
                              ben_graham_sigma=0.02, crop_to_fov=False, mask_outside_fov=False)
    d = json.loads(json.dumps(config.to_dict()))
    assert d["mean"] == [0.5, 0.4, 0.3]
    assert PreprocessConfig.from_dict(d) == config
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()
    assert PreprocessConfig().mean == CLIP_MEAN and PreprocessConfig().std == CLIP_STD
    assert isinstance(PreprocessConfig.from_dict({"mean": [0.1, 0.2, 0.3]}).mean, tuple)


@pytest.mark.parametrize("bad", [
    {"image_size": 224, "colour": "rgb"},   # unknown key
    {"image_size": 0},
    {"image_size": "224"},
    {"image_size": 224.0},
    {"image_size": True},
    {"mean": [0.5, 0.5]},
    {"std": [0.2, 0.0, 0.2]},
    {"std": [0.2, float("nan"), 0.2]},
    {"mean": ["0.5", "0.5", "0.5"]},
    {"mean": "abc"},
    {"ben_graham": "yes"},
    {"ben_graham_sigma": 0.0},
    {"crop_to_fov": 1},
])
def test_config_is_strict(bad):
    with pytest.raises(ConfigError):
        PreprocessConfig.from_dict(bad)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        PreprocessConfig().image_size = 100  # type: ignore[misc]


def test_grid_presence_marks_the_cells_that_hold_a_lesion():
    from edgeretina.preprocess import grid_presence

    rgb = np.zeros((400, 600, 3), np.uint8)
    cv2.circle(rgb, (300, 200), 190, (200, 90, 60), -1)
    geometry = prepare(rgb, PreprocessConfig(image_size=224))[1]
    mask = np.zeros((400, 600), np.uint8)
    mask[30:32, 300:302] = 255                       # a 2-pixel microaneurysm near the top centre
    cells = grid_presence(mask, geometry, (7, 7))
    assert cells.sum() == 1 and cells[0, 3]
    assert not grid_presence(np.zeros_like(mask), geometry, (7, 7)).any()
    with pytest.raises(ValueError):
        grid_presence(mask[:10], geometry, (7, 7))


def test_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    rgb = np.zeros((2400, 3200, 3), np.uint8)
    cv2.circle(rgb, (1600, 1200), 1150, (190, 90, 50), -1)
    path = tmp_path / "big.jpg"
    cv2.imwrite(str(path), rgb[..., ::-1])
    full = decode_image(path)
    half = decode_image(path, max_side=1024)          # 3200 // 2 >= 1024 but 3200 // 4 < 1024
    assert full.shape == (2400, 3200, 3) and half.shape == (1200, 1600, 3)
    assert decode_image(path, max_side=400).shape == (300, 400, 3)      # 1/8
    assert decode_image(path, max_side=4000).shape == full.shape        # never upscales
    small = cv2.resize(full, (1600, 1200), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - half.astype(int)).mean() < 2.0   # same picture
    # the FOV found on the reduced image is the same circle, scaled
    fov_full, fov_half = pp.detect_fov(full), pp.detect_fov(half)
    assert fov_half.radius == pytest.approx(fov_full.radius / 2, rel=0.02)
    with pytest.raises(ConfigError):
        PreprocessConfig(decode_max_side=-1)
