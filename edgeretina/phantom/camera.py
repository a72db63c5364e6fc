"""The fundus camera: framing (image size, field-of-view circle, field angle) and the sensor chain
(illumination falloff, exposure, white balance, cataract haze, defocus, noise, JPEG quality).

Most photographs get mild, realistic variation; a small fraction is strongly degraded the way real
screening photographs are (under/over exposed, out of focus, hazy, noisy, heavily compressed). The
label never changes with the camera: judging gradability is the quality module's job.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from edgeretina.phantom.draw import ONE, Canvas, fixed

# Share of photographs that are strongly degraded at camera_variation = 1.
DEGRADED_FRACTION = 0.08
# Image aspects (width / height) of common fundus cameras: square crops, 5:4 and 4:3 sensors.
ASPECTS = (1.0, 1.25, 4.0 / 3.0)
ASPECT_WEIGHTS = (0.5, 0.15, 0.35)
# Share of wide (non-square) photographs whose field-of-view circle is cut at the top and bottom,
# as many desktop cameras do to fill a 4:3 sensor.
CUT_OFF_FRACTION_OF_WIDE = 0.55


@dataclass(frozen=True)
class Camera:
    height: int
    width: int
    fov_cx: float
    fov_cy: float
    fov_radius: float
    field_deg: float          # field angle of the camera (45 deg is the screening standard)
    cut_off: bool             # top and bottom of the field-of-view circle are outside the image
    vignetting: float         # relative brightness lost at the rim of the field
    vignetting_power: float
    illumination_tilt: float  # amplitude of a linear brightness gradient across the field
    illumination_angle: float
    gain: float               # exposure multiplier
    wb_r: float
    wb_g: float
    wb_b: float
    haze: float               # cataract / dirty-lens veil, 0 none .. ~0.5 dense
    blur_sigma: float         # defocus, Gaussian sigma in pixels
    noise_sigma: float        # sensor noise at full signal, fraction of full scale
    jpeg_quality: int
    degraded: bool

    def as_record(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def sample_camera(rng: np.random.Generator, size: int, variation: float, degrade: bool = True) -> Camera:
    """Framing and sensor settings of one photograph; variation 0 gives the ideal camera.

    degrade=False: never one of the strongly degraded photographs (the draw that would choose one is
    still made, so the ordinary photographs of both settings agree up to that point)."""
    v = variation
    scale = size / 512.0  # pixel quantities below are tuned at 512 px and scale with the image
    aspect = float(rng.choice(ASPECTS, p=ASPECT_WEIGHTS)) if rng.random() < v else 1.0
    width = int(round(size * aspect))
    cut_off = aspect > 1.0 and rng.random() < CUT_OFF_FRACTION_OF_WIDE
    if cut_off:
        radius = size * rng.uniform(0.53, min(0.62, aspect / 2 - 0.02))
    else:
        radius = size * (0.46 + v * rng.uniform(-0.03, 0.03))
    # Centring errors stay small enough that a cut-off field is cut at both the top and the bottom.
    cx = width / 2 + v * float(np.clip(rng.normal(0, 0.012), -0.025, 0.025)) * size
    cy = size / 2 + v * float(np.clip(rng.normal(0, 0.012), -0.025, 0.025)) * size
    field_deg = float(rng.choice((40.0, 45.0, 50.0), p=(0.15, 0.7, 0.15))) if rng.random() < v else 45.0

    degraded = rng.random() < DEGRADED_FRACTION * v and degrade
    gain = math.exp(rng.normal(0, 0.12 * v))
    wb = np.exp(rng.normal(0, 0.05 * v, size=3))
    wb /= wb[1]  # white balance is relative to green
    haze = 0.0
    blur = abs(rng.normal(0, 0.45 * v)) * scale
    noise = rng.uniform(0.002, 0.012) * v
    quality = int(round(95 - v * rng.uniform(0, 20)))
    if degraded:
        gain, haze, blur, noise, quality = _degrade(rng, gain, blur, noise, quality, scale)
    return Camera(
        height=size, width=width, fov_cx=cx, fov_cy=cy, fov_radius=radius, field_deg=field_deg,
        cut_off=bool(cut_off),
        vignetting=0.32 + v * rng.uniform(0, 0.25), vignetting_power=rng.uniform(2.0, 3.0),
        illumination_tilt=v * rng.uniform(0, 0.18), illumination_angle=rng.uniform(0, 2 * math.pi),
        gain=gain, wb_r=float(wb[0]), wb_g=1.0, wb_b=float(wb[2]), haze=haze,
        blur_sigma=blur, noise_sigma=noise, jpeg_quality=quality, degraded=bool(degraded),
    )


def _degrade(rng, gain, blur, noise, quality, scale):
    """Pick one or two strong faults, as a real bad photograph usually has."""
    faults = rng.choice(["exposure", "focus", "haze", "noise"], size=rng.integers(1, 3), replace=False)
    haze = 0.0
    if "exposure" in faults:
        gain = math.exp(rng.choice([-1, 1]) * rng.uniform(0.5, 0.9))
    if "focus" in faults:
        blur = rng.uniform(1.8, 4.0) * scale
    if "haze" in faults:
        haze = rng.uniform(0.25, 0.5)
    if "noise" in faults:
        noise = rng.uniform(0.03, 0.06)
        quality = int(rng.integers(25, 50))
    return gain, haze, blur, noise, quality


def fov_mask(camera: Camera) -> np.ndarray:
    """float32 HxW, 1 inside the field-of-view circle, anti-aliased edge, 0 outside."""
    mask = np.zeros((camera.height, camera.width), np.uint8)
    cv2.circle(mask, fixed(camera.fov_cx, camera.fov_cy), int(round(camera.fov_radius * ONE)), 255,
               thickness=-1, lineType=cv2.LINE_AA, shift=4)
    return mask.astype(np.float32) * (1.0 / 255.0)


def fraction_inside(cx: float, cy: float, r: float, width: float, height: float) -> float:
    """Share of the circle's area inside the image [0, W] x [0, H] (midpoint rule over 1024 strips)."""
    n = 1024
    xs = cx - r + (np.arange(n) + 0.5) * (2 * r / n)
    half = np.sqrt(np.maximum(r * r - (xs - cx) ** 2, 0.0))
    chord = np.clip(np.minimum(cy + half, height) - np.maximum(cy - half, 0.0), 0.0, None)
    return float(np.sum(chord * ((xs >= 0) & (xs <= width))) * (2 * r / n) / (math.pi * r * r))


def illumination(camera: Camera) -> np.ndarray:
    """float32 HxW relative brightness: vignetting towards the rim plus a gentle tilt, 1 at the centre."""
    # The field is smooth, so compute it on a quarter-size grid and upsample.
    lh, lw = max(8, camera.height // 4), max(8, camera.width // 4)
    ys = (np.arange(lh, dtype=np.float32) + 0.5) * (camera.height / lh) - camera.fov_cy
    xs = (np.arange(lw, dtype=np.float32) + 0.5) * (camera.width / lw) - camera.fov_cx
    xs, ys = xs[None, :] / camera.fov_radius, ys[:, None] / camera.fov_radius
    rho = np.sqrt(xs * xs + ys * ys)
    light = 1.0 - camera.vignetting * np.minimum(rho, 1.1) ** camera.vignetting_power
    tilt = math.cos(camera.illumination_angle) * xs + math.sin(camera.illumination_angle) * ys
    light = light * (1.0 + camera.illumination_tilt * tilt)
    return cv2.resize(light.astype(np.float32), (camera.width, camera.height), interpolation=cv2.INTER_LINEAR)


def expose(canvas: Canvas, camera: Camera, rng: np.random.Generator, lit: np.ndarray | None = None) -> np.ndarray:
    """Photograph the retina (its reflectance, changed in place) -> uint8 HxWx3 RGB as the sensor records it.

    lit: where the retina is lit (float32 HxW, 0-1); default the field-of-view circle."""
    light = illumination(camera)
    light *= fov_mask(camera) if lit is None else lit
    scratch = canvas.scratch
    gains = (camera.wb_r * camera.gain, camera.wb_g * camera.gain, camera.wb_b * camera.gain)
    for plane, gain in zip(canvas.planes, gains):
        np.multiply(light, np.float32(gain), out=scratch)
        plane *= scratch
    if camera.haze > 0:
        # Light scattered by a cloudy lens: a warm veil that flattens contrast and lifts the dark parts
        # of the field, strongest where the illumination is.
        for plane, veil in zip(canvas.planes, (0.75, 0.55, 0.35)):
            plane *= np.float32(1.0 - camera.haze)
            np.multiply(light, np.float32(veil * camera.haze * camera.gain), out=scratch)
            plane += scratch
    if camera.blur_sigma > 0.3:
        for plane in canvas.planes:
            cv2.GaussianBlur(plane, (0, 0), camera.blur_sigma, dst=plane)
    if camera.noise_sigma > 0:
        _add_sensor_noise(canvas, camera.noise_sigma, rng)
    channels = []
    for plane in canvas.planes:
        np.maximum(plane, 0.0, out=plane)
        channels.append(cv2.convertScaleAbs(plane, alpha=255.0))  # rounds and saturates at 255
    return cv2.merge(channels)


def _add_sensor_noise(canvas: Canvas, sigma: float, rng: np.random.Generator) -> None:
    """Shot noise that grows with the square root of the signal, over a read-noise floor.

    OpenCV's generator is several times faster than numpy's for a full frame; it is seeded from the
    case's own stream so the pixels stay deterministic.
    """
    cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
    noise, amplitude = canvas.scratch, np.empty_like(canvas.scratch)
    for plane in canvas.planes:
        cv2.randn(noise, 0.0, 1.0)
        np.maximum(plane, 0.0, out=amplitude)
        amplitude += 0.01
        np.sqrt(amplitude, out=amplitude)
        amplitude *= np.float32(sigma)
        amplitude *= noise
        plane += amplitude
