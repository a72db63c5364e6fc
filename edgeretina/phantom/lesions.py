"""Diabetic retinopathy lesions: where they go, what they look like, and their masks.

Sizes are in optic disc diameters (DD ~ 1.8 mm), the unit of the ETDRS standard photographs and of
the ICDR scale (Wilkinson et al., Ophthalmology 2003):
- microaneurysm (MA): 10-100 um; those a camera resolves are ~30-90 um, i.e. ~1/60-1/20 DD.
  At 512 px that is 1-3 px, at 224 px 0.5-1.5 px: grade 1 is hard by design, as in real photographs.
- dot/blot haemorrhage (HE): up to ~1/4 DD (ETDRS standard photograph 2A shows blots of ~1/8-1/4 DD);
  flame haemorrhages lie in the nerve fibre layer, ~1/5-1/2 DD long and 3-4 times longer than wide,
  oriented along the fibres.
- hard exudate (EX): sharp yellow deposits ~1/40-1/12 DD each, clustered in plaques or circinate rings
  (~0.3-0.8 DD radius) around leaking microaneurysms in the posterior pole.
- cotton-wool spot (CWS): pale fluffy nerve fibre layer infarcts ~1/4-1/2 DD, mostly within ~3 DD of the
  disc along the arcades.
- neovascularisation (NV): fine (~20-40 um, ~1/60 DD) tangled loops on or within 1 DD of the disc (NVD;
  ETDRS standard photograph 10A shows NVD covering ~1/4-1/3 of the disc area) or elsewhere next to a
  major vessel (NVE, ~1/4-1/2 DD patches), sometimes with a whitish fibrous veil.
- preretinal haemorrhage (PRH): a large dark red pool, 1-3 DD, boat-shaped with a flat top where blood
  settles under gravity; some cases also get a diffuse vitreous haemorrhage veil.

Each placed lesion is recorded with its position; only lesions whose centre lies inside the visible
field of view (inside the circle and inside the image) are placed, counted and graded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from edgeretina.grades import LESION_CODES
from edgeretina.phantom.anatomy import Anatomy
from edgeretina.phantom.camera import Camera
from edgeretina.phantom.draw import ONE, SHIFT, Canvas, blur, bounding_box, fixed, fixed_points, smooth_noise
from edgeretina.phantom.vessels import VesselMap

# Compositing stages: deep lesions lie under the retinal vessels, the rest over them.
UNDER_VESSELS = 0
OVER_VESSELS = 1
MASK_LEVEL = 64  # ink value from which a pixel belongs to the lesion's mask (~50 % coverage)


@dataclass(frozen=True)
class PlacedLesion:
    code: str
    x: float
    y: float


@dataclass
class _Layer:
    """A uint8 ink layer that lesions are drawn on (255 = opaque), and how it is composited."""
    code: str | None              # which mask it contributes to (None: appearance only)
    stage: int
    op: str                       # "darken" (absorbs light like blood) or "paint" (opaque material)
    colour: tuple[float, float, float]
    blur_dd: float                # edge softness in DD
    ink: np.ndarray


@dataclass
class LesionScene:
    rng: np.random.Generator
    camera: Camera
    anatomy: Anatomy
    vessels: VesselMap
    placed: list[PlacedLesion] = field(default_factory=list)
    layers: dict[str, _Layer] = field(default_factory=dict)

    @property
    def dd(self) -> float:
        return self.anatomy.dd

    def layer(self, name: str, code: str | None, stage: int, op: str, colour, blur_dd: float) -> np.ndarray:
        if name not in self.layers:
            ink = np.zeros((self.camera.height, self.camera.width), np.uint8)
            self.layers[name] = _Layer(code, stage, op, colour, blur_dd, ink)
        return self.layers[name].ink

    def visible(self, x: float, y: float, margin: float = 1.5) -> bool:
        cam = self.camera
        inside = (x - cam.fov_cx) ** 2 + (y - cam.fov_cy) ** 2 <= (cam.fov_radius - margin) ** 2
        return inside and margin <= x <= cam.width - 1 - margin and margin <= y <= cam.height - 1 - margin

    def sample_point(self, *, near: tuple[float, float] | None = None, sigma: float = 0.0,
                     quadrant: int | None = None, off_vessels: float = 1.0, off_disc: float = 0.7,
                     tries: int = 4) -> tuple[float, float] | None:
        """A random visible point; None when no candidate passes (e.g. a quadrant cut off the image).

        near/sigma: Gaussian around a point, else uniform over the field of view.
        quadrant: 0..3 = (below fovea) * 2 + (right of fovea), the quadrants of the 4-2-1 rule.
        off_vessels: reject points where the vessel opacity exceeds this (MAs sit between vessels).
        off_disc: minimum distance from the disc centre in DD.
        """
        cam, rng = self.camera, self.rng
        for _ in range(tries):
            if near is None:
                xs = cam.fov_cx + rng.uniform(-1, 1, 64) * cam.fov_radius
                ys = cam.fov_cy + rng.uniform(-1, 1, 64) * cam.fov_radius
            else:
                xs = near[0] + rng.normal(0, sigma, 64)
                ys = near[1] + rng.normal(0, sigma, 64)
            for x, y in zip(xs.tolist(), ys.tolist()):
                if self._acceptable(x, y, quadrant, off_vessels, off_disc):
                    return x, y
        return None

    def _acceptable(self, x, y, quadrant, off_vessels, off_disc) -> bool:
        if not self.visible(x, y, margin=max(1.5, 0.05 * self.dd)):
            return False
        a = self.anatomy
        if quadrant is not None and quadrant != fovea_quadrant(a, x, y):
            return False
        if (x - a.disc_x) ** 2 + (y - a.disc_y) ** 2 < (off_disc * self.dd) ** 2:
            return False
        return off_vessels >= 1.0 or self.vessels.opacity[int(y), int(x)] <= 255 * off_vessels

    def record(self, code: str, x: float, y: float) -> None:
        self.placed.append(PlacedLesion(code, x, y))

    def fibre_direction(self, x: float, y: float) -> float:
        """Angle of the nerve fibres at a point: arcuate around the fovea temporally, radial nasally.

        Fibres from the disc arc around the macula along parabolas a = k b^2 (a along the disc-fovea
        axis, b across it), whose direction at (a, b) is (2a, b).
        """
        anatomy = self.anatomy
        tx, ty = anatomy.temporal
        nx, ny = -ty, tx
        px, py = x - anatomy.disc_x, y - anatomy.disc_y
        a, b = px * tx + py * ty, px * nx + py * ny
        da = 2 * a if a > 0 else a
        return math.atan2(da * ty + b * ny, da * tx + b * nx)


def fovea_quadrant(anatomy: Anatomy, x: float, y: float) -> int:
    return int(y > anatomy.fovea_y) * 2 + int(x > anatomy.fovea_x)


# -- placing ------------------------------------------------------------------------------------------

def place_microaneurysms(scene: LesionScene, n: int, near=None, sigma_dd: float = 1.6) -> None:
    """Tiny round dark red dots, mostly in the posterior pole around the macula."""
    ink = scene.layer("MA", "MA", UNDER_VESSELS, "darken", (0.42, 0.8, 0.7), 0.006)
    rng, dd = scene.rng, scene.dd
    for _ in range(n):
        centre = near or (scene.anatomy.fovea if rng.random() < 0.7 else None)
        point = scene.sample_point(near=centre, sigma=sigma_dd * dd, off_vessels=0.25)
        if point is None:
            continue
        diameter = dd / rng.uniform(20, 60)
        cv2.circle(ink, fixed(*point), max(ONE // 2, int(diameter / 2 * ONE)),
                   int(255 * rng.uniform(0.8, 1.0)), -1, cv2.LINE_AA, SHIFT)
        _mark_centre(ink, point)
        scene.record("MA", *point)


def place_haemorrhages(scene: LesionScene, n: int, *, quadrant: int | None = None,
                       posterior_share: float = 0.6, max_dd: float = 0.25, min_dd: float = 1 / 10) -> None:
    """Dot/blot haemorrhages (irregular dark red patches) and some flame haemorrhages along fibres."""
    ink = scene.layer("HE", "HE", UNDER_VESSELS, "darken", (0.42, 0.82, 0.74), 0.012)
    rng, dd = scene.rng, scene.dd
    for _ in range(n):
        near = scene.anatomy.fovea if quadrant is None and rng.random() < posterior_share else None
        point = scene.sample_point(near=near, sigma=1.6 * dd, quadrant=quadrant, off_vessels=0.6)
        if point is None:
            continue
        size = dd * math.exp(rng.uniform(math.log(min_dd), math.log(max_dd)))
        opacity = rng.uniform(0.75, 1.0)
        near_disc = math.dist(point, scene.anatomy.disc) < 3 * dd
        if near_disc and rng.random() < 0.35:
            _draw_flame(ink, rng, point, size, scene.fibre_direction(*point), opacity)
        else:
            _draw_blot(ink, rng, point, size, opacity)
        _mark_centre(ink, point)
        scene.record("HE", *point)


def place_exudate_clusters(scene: LesionScene, n_clusters: int) -> None:
    """Hard exudates in circinate rings or plaques around a leaking spot in the posterior pole."""
    ink = scene.layer("EX", "EX", UNDER_VESSELS, "paint", (1.0, 0.9, 0.45), 0.005)
    rng, dd = scene.rng, scene.dd
    for _ in range(n_clusters):
        centre = scene.sample_point(near=scene.anatomy.fovea, sigma=1.3 * dd)
        if centre is None:
            continue
        if rng.random() < 0.5:
            radius, count = rng.uniform(0.3, 0.8) * dd, int(rng.integers(10, 32))
            start, span = rng.uniform(0, 2 * math.pi), rng.uniform(math.pi, 2 * math.pi)
            angles = start + rng.uniform(0, span, count)
            radii = radius * rng.normal(1.0, 0.08, count)
            xs, ys = centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)
            place_microaneurysms(scene, int(rng.integers(1, 4)), near=centre, sigma_dd=0.15)
        else:
            count, spread = int(rng.integers(6, 26)), rng.uniform(0.1, 0.35) * dd
            xs, ys = centre[0] + rng.normal(0, spread, count), centre[1] + rng.normal(0, spread, count)
        for x, y in zip(xs.tolist(), ys.tolist()):
            if not scene.visible(x, y) or math.dist((x, y), scene.anatomy.disc) < 0.7 * dd:
                continue
            diameter = dd / rng.uniform(12, 40)
            axes = (max(ONE // 2, int(diameter / 2 * ONE * rng.uniform(0.8, 1.3))),
                    max(ONE // 2, int(diameter / 2 * ONE)))
            cv2.ellipse(ink, fixed(x, y), axes, rng.uniform(0, 180), 0, 360,
                        int(255 * rng.uniform(0.8, 1.0)), -1, cv2.LINE_AA, SHIFT)
            _mark_centre(ink, (x, y))
            scene.record("EX", x, y)


def place_cotton_wool_spots(scene: LesionScene, n: int) -> None:
    """Pale fluffy patches elongated along the nerve fibres, near the disc and the arcades."""
    ink = scene.layer("CWS", "CWS", OVER_VESSELS, "paint", (0.97, 0.93, 0.84), 0.05)
    rng, dd = scene.rng, scene.dd
    for _ in range(n):
        point = scene.sample_point(near=_near_arcade(scene), sigma=0.4 * dd, off_disc=0.9)
        if point is None:
            continue
        size = dd * rng.uniform(0.25, 0.5)
        direction = math.degrees(scene.fibre_direction(*point))
        for _ in range(int(rng.integers(2, 5))):
            offset = rng.normal(0, 0.15 * size, 2)
            axes = (int(size / 2 * rng.uniform(0.6, 1.0) * ONE), int(size / 2 * rng.uniform(0.35, 0.6) * ONE))
            cv2.ellipse(ink, fixed(point[0] + offset[0], point[1] + offset[1]), axes,
                        direction + rng.normal(0, 15), 0, 360, int(255 * rng.uniform(0.6, 0.85)), -1,
                        cv2.LINE_AA, SHIFT)
        _mark_centre(ink, point)
        scene.record("CWS", *point)


def place_neovascularisation(scene: LesionScene, at_disc: bool) -> None:
    """A tangle of fine new vessel loops on the disc (NVD) or beside a major vessel (NVE)."""
    rng, dd = scene.rng, scene.dd
    if at_disc:
        centre = scene.sample_point(near=scene.anatomy.disc, sigma=0.2 * dd, off_disc=0.0)
        spread = rng.uniform(0.5, 0.9) * dd
    else:
        centre = scene.sample_point(near=_near_arcade(scene, min_dd=1.2), sigma=0.15 * dd, off_disc=1.0)
        spread = rng.uniform(0.3, 0.55) * dd
    if centre is None:
        return
    if rng.random() < 0.35:  # fibrous tissue accompanying the new vessels
        veil = scene.layer("NV_veil", None, OVER_VESSELS, "paint", (0.92, 0.86, 0.78), 0.08)
        cv2.ellipse(veil, fixed(*centre), (int(spread * ONE), int(spread * 0.7 * ONE)), rng.uniform(0, 180),
                    0, 360, int(255 * rng.uniform(0.25, 0.45)), -1, cv2.LINE_AA, SHIFT)
    ink = scene.layer("NV", "NV", OVER_VESSELS, "darken", (0.3, 0.72, 0.62), 0.004)
    thickness = max(1, int(round(dd / 70)))
    for curve in _vessel_net(rng, centre, spread, dd):
        cv2.polylines(ink, [fixed_points(curve)], False, int(255 * rng.uniform(0.65, 0.95)), thickness,
                      cv2.LINE_AA, SHIFT)
    _mark_centre(ink, centre)
    scene.record("NV", *centre)


def place_preretinal_haemorrhage(scene: LesionScene) -> None:
    """A pool of blood in front of the retina: flat-topped where it settles under gravity ("boat-shaped"),
    denser at the bottom, sometimes with a diffuse vitreous haemorrhage around it."""
    rng, dd = scene.rng, scene.dd
    centre = scene.sample_point(near=_near_arcade(scene), sigma=0.5 * dd, off_disc=1.5)
    if centre is None:
        return
    ink = scene.layer("PRH", "PRH", OVER_VESSELS, "darken", (0.45, 0.9, 0.85), 0.02)
    width = rng.uniform(1.0, 2.6) * dd
    depth = width * rng.uniform(0.35, 0.65)
    # The lower half of an irregular ellipse, closed by the flat fluid level on top.
    angles = np.linspace(0, math.pi, 32)
    wobble = 1.0 + 0.08 * smooth_noise(rng, (32, 1), 4)[:, 0].clip(-2, 2)
    top = centre[1] - depth / 3
    xs = centre[0] + width / 2 * np.cos(angles) * wobble
    ys = top + depth * np.sin(angles) * wobble
    pool = np.zeros_like(ink)
    cv2.fillPoly(pool, [fixed_points(np.stack([xs, ys], 1))], 255, cv2.LINE_AA, SHIFT)
    box = bounding_box(pool)
    if box is not None:
        rows = np.linspace(0.7, 1.0, box[0].stop - box[0].start, dtype=np.float32)[:, None]
        density = pool[box] * rows * np.float32(rng.uniform(0.85, 0.98))
        np.maximum(ink[box], density.astype(np.uint8), out=ink[box])
    if rng.random() < 0.3:
        haze = scene.layer("PRH_vitreous", "PRH", OVER_VESSELS, "darken", (0.4, 0.72, 0.7), 0.35)
        cv2.circle(haze, fixed(*centre), int(rng.uniform(1.2, 2.5) * dd * ONE), int(255 * rng.uniform(0.5, 0.8)),
                   -1, cv2.LINE_AA, SHIFT)
    _mark_centre(ink, centre)
    scene.record("PRH", *centre)


def _draw_blot(ink, rng, point, size, opacity) -> None:
    """One to four overlapping ellipses: round dots when small, irregular blots when larger."""
    parts = 1 if size < 3.0 else int(rng.integers(1, 5))  # tiny ones are plain round dots
    for _ in range(parts):
        offset = rng.normal(0, 0.18 * size, 2) if parts > 1 else (0.0, 0.0)
        axes = (max(ONE // 2, int(size / 2 * rng.uniform(0.7, 1.0) * ONE)),
                max(ONE // 2, int(size / 2 * rng.uniform(0.55, 0.9) * ONE)))
        cv2.ellipse(ink, fixed(point[0] + offset[0], point[1] + offset[1]), axes, rng.uniform(0, 180),
                    0, 360, int(255 * opacity), -1, cv2.LINE_AA, SHIFT)


def _draw_flame(ink, rng, point, size, direction, opacity) -> None:
    """Splinter-shaped streaks along the fibres, feathered at the ends."""
    length = max(size, 3.0) * rng.uniform(1.2, 2.0)
    angle = math.degrees(direction)
    for _ in range(int(rng.integers(2, 5))):
        offset = rng.normal(0, 0.12 * length, 2)
        axes = (int(length / 2 * rng.uniform(0.6, 1.0) * ONE), max(ONE // 2, int(length / 8 * ONE)))
        cv2.ellipse(ink, fixed(point[0] + offset[0], point[1] + offset[1]), axes, angle + rng.normal(0, 6),
                    0, 360, int(255 * opacity * rng.uniform(0.7, 1.0)), -1, cv2.LINE_AA, SHIFT)


def _vessel_net(rng, centre, spread, dd) -> list[np.ndarray]:
    """New vessels form a fine net of small loops: scattered nodes, each joined to its nearest
    neighbours by gently bent curves (a quadratic Bezier bowed sideways by a random amount)."""
    n = int(rng.integers(24, 45))
    nodes = np.asarray(centre) + rng.normal(0, 0.45 * spread, (n, 2))
    distance = np.hypot(*(nodes[:, None, :] - nodes[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(distance, np.inf)
    edges = {tuple(sorted((i, int(j)))) for i in range(n) for j in np.argsort(distance[i])[:3]}
    t = np.linspace(0, 1, 8)[:, None]
    curves = []
    for i, j in sorted(edges):
        p0, p2 = nodes[i], nodes[j]
        normal = np.array([p0[1] - p2[1], p2[0] - p0[0]])
        p1 = (p0 + p2) / 2 + normal * rng.normal(0, 0.5)
        curves.append((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2)
    return curves


def _near_arcade(scene: LesionScene, min_dd: float = 0.8, max_dd: float = 4.0) -> tuple[float, float] | None:
    """A point on a major vessel between min_dd and max_dd from the disc (None: anywhere)."""
    points = scene.vessels.points
    if len(points) == 0:
        return None
    distance = np.hypot(points[:, 0] - scene.anatomy.disc_x, points[:, 1] - scene.anatomy.disc_y)
    candidates = points[(distance > min_dd * scene.dd) & (distance < max_dd * scene.dd)]
    if len(candidates) == 0:
        return None
    x, y, _ = candidates[scene.rng.integers(len(candidates))]
    return float(x), float(y)


def _mark_centre(ink: np.ndarray, point: tuple[float, float]) -> None:
    """Sub-pixel lesions must still own their centre pixel, so that a counted lesion has a mask."""
    x, y = int(round(point[0])), int(round(point[1]))
    ink[y, x] = max(ink[y, x], MASK_LEVEL)


# -- compositing and masks ----------------------------------------------------------------------------

def composite(canvas: Canvas, scene: LesionScene, stage: int) -> None:
    for layer in scene.layers.values():
        if layer.stage != stage:
            continue
        alpha = blur(layer.ink, layer.blur_dd * scene.dd)
        if layer.code == "CWS":
            alpha = _fluffy(scene, alpha)
        if layer.op == "darken":
            canvas.darken(alpha, layer.colour)
        else:
            canvas.paint(alpha, layer.colour)


def _fluffy(scene: LesionScene, alpha: np.ndarray) -> np.ndarray:
    """Cotton-wool spots are a soft, uneven whiteness rather than a flat disc."""
    box = bounding_box(alpha)
    if box is None:
        return alpha
    h, w = alpha[box].shape
    texture = 0.7 + 0.3 * np.clip(smooth_noise(scene.rng, (h, w), max(2.0, h / (0.12 * scene.dd))), -1, 1)
    out = alpha.copy()
    out[box] = (alpha[box] * texture).astype(np.uint8)
    return out


def lesion_masks(scene: LesionScene, field_of_view: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 0/255 mask per lesion code, restricted to the field of view."""
    shape = (scene.camera.height, scene.camera.width)
    masks = {code: np.zeros(shape, np.uint8) for code in LESION_CODES}
    inside = field_of_view >= 0.5
    for layer in scene.layers.values():
        if layer.code is not None:
            masks[layer.code][(layer.ink >= MASK_LEVEL) & inside] = 255
    return masks
