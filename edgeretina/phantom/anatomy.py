"""The healthy posterior pole: where the disc and fovea are, and the reflectance of the fundus.

Proportions (all relative to the optic disc diameter, DD ~ 1.8 mm, the unit clinicians use):
- field of view: a 45 deg camera sees ~13 mm of retina (~0.29 mm per degree in an emmetropic eye),
  so the disc is ~1/7 of the field diameter (1/6.4 at 40 deg, 1/8 at 50 deg); disc sizes vary
  by about +-10 % between eyes (disc area 1.6-3.0 mm^2).
- the disc is slightly taller than wide (vertical 1.9 mm, horizontal 1.75 mm; Jonas et al. 1988)
  with a central cup of cup-to-disc ratio 0.2-0.55 in healthy eyes.
- the fovea lies ~2.5 DD (4.5 mm) temporal to the disc centre and ~6 deg below the horizontal through
  it (Rohrschneider 2004, IOVS 45:3257); the darker macula is ~1.5-2 DD across, the foveola ~0.2 DD.
- a macula-centred screening field puts the fovea near the centre of the image (EyePACS, UK NSC).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from edgeretina.phantom.camera import Camera
from edgeretina.phantom.draw import Canvas, smooth_noise

DISC_MM = 1.8
RETINA_MM_PER_DEG = 0.288
DISC_FOVEA_DD = 2.5
FOVEA_BELOW_DISC_DEG = 6.3


@dataclass(frozen=True)
class Anatomy:
    eye: int                  # 0 right eye (OD, disc on the image's right), 1 left eye (OS)
    dd: float                 # optic disc diameter in pixels
    disc_x: float
    disc_y: float
    fovea_x: float
    fovea_y: float
    cup_ratio: float
    pigmentation: float       # 0 blond (pale orange, choroidal vessels show) .. 1 heavily pigmented
    fundus_rgb: tuple[float, float, float]

    @property
    def disc(self) -> tuple[float, float]:
        return self.disc_x, self.disc_y

    @property
    def fovea(self) -> tuple[float, float]:
        return self.fovea_x, self.fovea_y

    @property
    def temporal(self) -> tuple[float, float]:
        """Unit vector from the disc towards the fovea."""
        dx, dy = self.fovea_x - self.disc_x, self.fovea_y - self.disc_y
        n = math.hypot(dx, dy)
        return dx / n, dy / n

    def as_record(self) -> dict[str, float]:
        return {"eye": float(self.eye), "dd_px": self.dd, "disc_x": self.disc_x, "disc_y": self.disc_y,
                "fovea_x": self.fovea_x, "fovea_y": self.fovea_y, "cup_ratio": self.cup_ratio,
                "pigmentation": self.pigmentation}


def sample_anatomy(rng: np.random.Generator, camera: Camera) -> Anatomy:
    fov_diameter_mm = camera.field_deg * RETINA_MM_PER_DEG
    dd = 2 * camera.fov_radius * DISC_MM / fov_diameter_mm * float(np.clip(rng.normal(1, 0.07), 0.85, 1.15))
    eye = int(rng.integers(0, 2))
    side = -1.0 if eye == 0 else 1.0  # right eye: the fovea is to the left of the disc in the image
    angle = math.radians(rng.normal(FOVEA_BELOW_DISC_DEG, 3.0))
    distance = DISC_FOVEA_DD * dd * rng.normal(1.0, 0.05)
    to_fovea = (side * distance * math.cos(angle), distance * math.sin(angle))
    # Macula-centred fields put the fovea near the centre; some are framed half way towards the disc.
    towards_disc = rng.uniform(0.0, 0.2) if rng.random() < 0.75 else rng.uniform(0.3, 0.55)
    fovea_x = camera.fov_cx + towards_disc * to_fovea[0] + rng.normal(0, 0.15) * dd
    fovea_y = camera.fov_cy + towards_disc * to_fovea[1] + rng.normal(0, 0.15) * dd
    pigmentation = float(rng.beta(2.0, 2.0))
    return Anatomy(
        eye=eye, dd=dd, disc_x=fovea_x - to_fovea[0], disc_y=fovea_y - to_fovea[1],
        fovea_x=fovea_x, fovea_y=fovea_y, cup_ratio=float(rng.uniform(0.2, 0.55)),
        pigmentation=pigmentation, fundus_rgb=_fundus_colour(rng, pigmentation),
    )


def _fundus_colour(rng: np.random.Generator, pigmentation: float) -> tuple[float, float, float]:
    """Orange-red in blond fundi, darker brown-red with more melanin."""
    light = np.array([0.93, 0.47, 0.20])
    dark = np.array([0.60, 0.24, 0.10])
    rgb = light + pigmentation * (dark - light)
    rgb *= np.exp(rng.normal(0, [0.04, 0.08, 0.15]))
    return tuple(float(c) for c in rgb)


def render_fundus(rng: np.random.Generator, camera: Camera, anatomy: Anatomy) -> Canvas:
    """Reflectance of the healthy fundus without vessels (illumination is the camera's business)."""
    canvas = Canvas(_background(rng, camera, anatomy))
    _draw_fovea(rng, canvas, anatomy)
    _draw_disc(rng, canvas, anatomy)
    return canvas


def _background(rng: np.random.Generator, camera: Camera, anatomy: Anatomy) -> np.ndarray:
    """Choroidal texture and macular pigment: low-frequency, so drawn on a quarter-size grid."""
    lh, lw = max(16, camera.height // 4), max(16, camera.width // 4)
    fx, fy = anatomy.fovea_x * lw / camera.width, anatomy.fovea_y * lh / camera.height
    texture = 1.0 + 0.05 * smooth_noise(rng, (lh, lw), 5) + 0.03 * smooth_noise(rng, (lh, lw), 16)
    low = texture[None] * np.asarray(anatomy.fundus_rgb, np.float32)[:, None, None]
    # Blond fundi show the choroidal vessels as orange stripes on darker interspaces ("tigroid").
    tigroid = (1.0 - anatomy.pigmentation) ** 2 * rng.uniform(0.0, 0.5)
    if tigroid > 0.02:
        stripes = _choroidal_stripes(rng, (lh, lw), (fx, fy), anatomy.dd * lw / camera.width)
        low *= 1.0 - tigroid * stripes[None] * np.float32([0.25, 0.45, 0.4])[:, None, None]
    # Macular pigment (lutein) absorbs blue and some green: the macula looks darker and browner.
    ys, xs = np.ogrid[:lh, :lw]
    sigma = 0.75 * anatomy.dd * lw / camera.width
    macula = np.exp(-((xs - fx) ** 2 + (ys - fy) ** 2) / (2 * sigma * sigma)).astype(np.float32)
    strength = rng.uniform(0.35, 0.7)
    low *= 1.0 - strength * macula[None] * np.float32([0.28, 0.5, 0.55])[:, None, None]
    planes = np.empty((3, camera.height, camera.width), np.float32)
    for plane, small in zip(planes, low.astype(np.float32)):
        cv2.resize(small, (camera.width, camera.height), dst=plane, interpolation=cv2.INTER_LINEAR)
    return planes


def _choroidal_stripes(rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float],
                       dd: float) -> np.ndarray:
    """Dark interspaces between choroidal vessels, which run outwards from the posterior pole:
    smooth noise laid out in polar coordinates (fine across the angle, coarse along the radius), its
    angle warped so the stripes meander, and faded near the fovea where macular pigment hides them."""
    h, w = shape
    polar = smooth_noise(rng, (192, 40), 48)
    ys, xs = np.mgrid[:h, :w].astype(np.float32)
    dx, dy = xs - np.float32(centre[0]), ys - np.float32(centre[1])
    radius = np.hypot(dx, dy)
    angle = (np.arctan2(dy, dx) + np.pi) * np.float32(polar.shape[0] / (2 * np.pi))
    angle += 6.0 * smooth_noise(rng, shape, 3)
    noise = cv2.remap(polar, radius * np.float32(polar.shape[1] / np.hypot(h, w)), angle, cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_WRAP)
    return np.exp(-(noise / 0.45) ** 2) * np.minimum(1.0, radius / np.float32(1.5 * dd))


def _draw_fovea(rng: np.random.Generator, canvas: Canvas, anatomy: Anatomy) -> None:
    """A small darker foveola, with the bright foveal reflex of younger eyes in some."""
    sigma = 0.12 * anatomy.dd
    box, xs, ys = _box_grid(canvas, anatomy.fovea_x, anatomy.fovea_y, 3 * sigma)
    if box is None:
        return
    r2 = xs * xs + ys * ys
    spot = np.exp(-r2 / (2 * sigma * sigma))
    reflex_sigma = max(0.6, 0.02 * anatomy.dd)
    reflex = np.exp(-r2 / (2 * reflex_sigma ** 2)) * (rng.uniform(0.2, 0.5) if rng.random() < 0.6 else 0.0)
    for plane, k, r in zip(canvas.planes, (0.18, 0.35, 0.35), (1.0, 1.0, 0.8)):
        plane[box] *= 1.0 - k * spot
        plane[box] += r * reflex


def _draw_disc(rng: np.random.Generator, canvas: Canvas, anatomy: Anatomy) -> None:
    """Yellow-pink neuroretinal rim around a paler cup, soft edged, slightly taller than wide."""
    radius = anatomy.dd / 2
    box, xs, ys = _box_grid(canvas, anatomy.disc_x, anatomy.disc_y, 1.6 * radius)
    if box is None:
        return
    ellipse = np.sqrt((xs / (0.955 * radius)) ** 2 + (ys / (1.045 * radius)) ** 2)
    rim = np.clip((1.0 - ellipse) / 0.16 + 0.5, 0.0, 1.0)
    halo = np.clip((1.25 - ellipse) / 0.25, 0.0, 1.0) * rng.uniform(0.0, 0.25)
    # The cup sits a little temporal of the disc centre.
    tx, ty = anatomy.temporal
    cx, cy = xs - 0.08 * radius * tx, ys - 0.08 * radius * ty
    cup_r = anatomy.cup_ratio * radius
    cup = np.clip((1.0 - np.sqrt((cx / (0.9 * cup_r)) ** 2 + (cy / cup_r) ** 2)) / 0.35, 0.0, 1.0) * rim
    # The rim is orange-pink to pale yellow; the cup, without nerve fibres, is the palest part.
    pink = rng.uniform(0.0, 1.0)
    brightness = rng.uniform(0.9, 1.05)
    rim_colour = (brightness, (0.7 - 0.1 * pink) * brightness, (0.45 - 0.07 * pink) * brightness)
    for plane, halo_c, rim_c, cup_c in zip(canvas.planes, (0.95, 0.62, 0.38), rim_colour, (1.08, 0.96, 0.78)):
        region = plane[box]
        region += halo * (halo_c - region)
        region += rim * (rim_c - region)
        region += cup * (cup_c - region)


def _box_grid(canvas: Canvas, cx: float, cy: float, half: float):
    """The slices of the square around (cx, cy) and the pixel offsets from its centre (float32)."""
    h, w = canvas.shape
    x0, x1 = max(0, int(cx - half)), min(w, int(cx + half) + 2)
    y0, y1 = max(0, int(cy - half)), min(h, int(cy + half) + 2)
    if x0 >= x1 or y0 >= y1:
        return None, None, None
    xs = (np.arange(x0, x1, dtype=np.float32) - np.float32(cx))[None, :]
    ys = (np.arange(y0, y1, dtype=np.float32) - np.float32(cy))[:, None]
    return (slice(y0, y1), slice(x0, x1)), xs, ys
