"""Retinal arterioles and venules growing out of the optic disc as recursive branching curves.

Widths at the disc margin: major venules ~130 um (~DD/13), arterioles ~100 um (~DD/18), an
arteriole-to-venule ratio of ~0.7 as in healthy eyes. At each bifurcation the widths follow Murray's
law (w_parent^3 = w_a^3 + w_b^3) and vessels taper slowly in between. The temporal arcades follow the
parabola a = c b^2 around the macula (a along the disc-fovea axis, b across it) that passes ~2 DD
above and below the fovea; macular branches converge on the fovea but the vessels a fundus camera
resolves end ~0.5 DD (~1 mm) from its centre (the capillary-free zone itself is ~0.5 mm across).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from edgeretina.phantom.anatomy import Anatomy
from edgeretina.phantom.camera import Camera
from edgeretina.phantom.draw import SHIFT, Canvas, blur, fixed

VEIN_WIDTH_DD = 1 / 13
ARTERY_WIDTH_DD = 1 / 18
MIN_WIDTH_DD = 1 / 75        # ~25 um: smaller vessels are not resolved by a fundus camera
ARCADE_C_DD = 0.625          # a = c b^2 with a, b in DD: 2 DD off-axis at 2.5 DD along it
MACULAR_END_DD = 0.5         # visible vessels stop this far from the fovea centre
STEP_DD = 0.125
MAX_DEPTH = 4
EDGE_BLUR_DD = 0.005         # optical softening of vessel edges (~0.35 px at 512 px)

# Fraction of light absorbed per channel (R, G, B) at full opacity: blood absorbs green most.
VEIN_ABSORPTION = (0.36, 0.64, 0.55)
ARTERY_ABSORPTION = (0.2, 0.48, 0.42)
ARTERY = 0
VEIN = 1


@dataclass
class _Vessel:
    x: float
    y: float
    heading: float
    width: float
    length: float             # remaining length budget in px
    depth: int
    kind: int
    arcade_side: float = 0.0  # +-1 for a temporal arcade trunk (which side of the disc-fovea axis), else 0
    arcade_c: float = 0.0
    to_fovea: bool = False    # a macular branch that heads for the fovea
    curvature: float = 0.0


@dataclass
class VesselMap:
    artery: np.ndarray        # uint8 HxW opacity, 255 = opaque
    vein: np.ndarray
    reflex: np.ndarray        # uint8 HxW central light reflex of the larger arterioles
    opacity: np.ndarray       # uint8 HxW, the larger of the two opacities
    # x, y, width of points along the major vessels, where NVE, CWS and PRH like to sit
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))


def grow_vessels(rng: np.random.Generator, camera: Camera, anatomy: Anatomy) -> VesselMap:
    segments: list[tuple[float, float, float, float, float, int]] = []
    for vessel in _trunks(rng, anatomy):
        _grow(rng, vessel, camera, anatomy, segments)
    return _rasterise(segments, camera, anatomy)


def draw_vessels(canvas: Canvas, vessels: VesselMap) -> None:
    canvas.darken(vessels.vein, VEIN_ABSORPTION)
    canvas.darken(vessels.artery, ARTERY_ABSORPTION)
    canvas.brighten(vessels.reflex, 0.45)


def _trunks(rng: np.random.Generator, anatomy: Anatomy) -> list[_Vessel]:
    dd = anatomy.dd
    tx, ty = anatomy.temporal
    temporal = math.atan2(ty, tx)
    # The normal that points down the image; "superior" vessels go the other way.
    down = temporal + math.pi / 2 if math.sin(temporal + math.pi / 2) > 0 else temporal - math.pi / 2
    trunks = []
    for kind, width in ((VEIN, VEIN_WIDTH_DD * dd), (ARTERY, ARTERY_WIDTH_DD * dd)):
        for side in (-1.0, 1.0):  # superior, inferior
            across = down if side > 0 else down + math.pi
            trunks.append(_Vessel(
                anatomy.disc_x, anatomy.disc_y, _turn_towards(across, temporal, rng.uniform(0.05, 0.3)),
                width * rng.uniform(0.92, 1.08), 12 * dd, 0, kind,
                arcade_side=side, arcade_c=ARCADE_C_DD / dd * rng.uniform(0.8, 1.25)))
            # Nasal trunks: smaller, fanning out up and down on the side away from the fovea.
            nasal = _turn_towards(temporal + math.pi, across, rng.uniform(0.6, 1.1))
            trunks.append(_Vessel(anatomy.disc_x, anatomy.disc_y, nasal, width * rng.uniform(0.65, 0.8),
                                  8 * dd, 1, kind, curvature=rng.normal(0, 0.03)))
        # Small papillomacular vessels towards the macula, and one running straight nasally.
        for _ in range(int(rng.integers(0, 3))):
            heading = temporal + rng.choice((-1.0, 1.0)) * rng.uniform(0.2, 0.6)
            trunks.append(_Vessel(anatomy.disc_x, anatomy.disc_y, heading, width * rng.uniform(0.25, 0.4),
                                  rng.uniform(1.0, 2.0) * dd, 2, kind))
        trunks.append(_Vessel(anatomy.disc_x, anatomy.disc_y, temporal + math.pi + rng.normal(0, 0.3),
                              width * rng.uniform(0.35, 0.5), 5 * dd, 2, kind))
    return trunks


def _turn_towards(heading: float, target: float, amount: float) -> float:
    return heading + math.copysign(amount, _wrap(target - heading))


def _grow(rng, root: _Vessel, camera: Camera, anatomy: Anatomy, segments: list) -> None:
    """Walk each vessel in short steps, spawning side branches; an explicit stack, not recursion."""
    dd = anatomy.dd
    step = STEP_DD * dd
    min_width = MIN_WIDTH_DD * dd
    fov_r2 = (camera.fov_radius * 1.03) ** 2
    macula2 = (MACULAR_END_DD * dd) ** 2
    stack = [root]
    while stack:
        v = stack.pop()
        next_branch = _branch_spacing(rng, v, dd)
        travelled = 0.0
        while v.length > 0 and v.width >= min_width:
            v.heading += rng.normal(0.0, 0.07) + v.curvature + _steer(v, anatomy)
            nx, ny = v.x + step * math.cos(v.heading), v.y + step * math.sin(v.heading)
            segments.append((v.x, v.y, nx, ny, v.width, v.kind))
            v.x, v.y = nx, ny
            v.length -= step
            travelled += step
            v.width *= 0.985
            if (nx - camera.fov_cx) ** 2 + (ny - camera.fov_cy) ** 2 > fov_r2:
                break
            if (nx - anatomy.fovea_x) ** 2 + (ny - anatomy.fovea_y) ** 2 < macula2:
                break
            if travelled >= next_branch and v.depth < MAX_DEPTH:
                stack.append(_branch(rng, v, anatomy))
                travelled, next_branch = 0.0, _branch_spacing(rng, v, dd)


def _branch_spacing(rng, v: _Vessel, dd: float) -> float:
    return rng.uniform(0.5, 1.1) * dd if v.depth == 0 else rng.uniform(0.4, 1.0) * dd


def _branch(rng, parent: _Vessel, anatomy: Anatomy) -> _Vessel:
    ratio = rng.uniform(0.5, 0.8)
    child_width = parent.width * ratio
    # Murray's law: the parent continues with what is left of the cube of its width.
    parent.width = (parent.width ** 3 - child_width ** 3) ** (1 / 3)
    to_fovea_side = _fovea_side(parent, anatomy)
    side = rng.choice((-1.0, 1.0))
    heading = parent.heading + side * rng.uniform(0.55, 1.1)
    macular = parent.arcade_side != 0 and side == to_fovea_side
    return _Vessel(parent.x, parent.y, heading, child_width,
                   rng.uniform(2.0, 5.0) * anatomy.dd * math.sqrt(ratio), parent.depth + 1, parent.kind,
                   to_fovea=macular or parent.to_fovea, curvature=rng.normal(0, 0.02))


def _fovea_side(v: _Vessel, anatomy: Anatomy) -> float:
    """+1 if the fovea is counter-clockwise of the vessel's heading (image coordinates), else -1."""
    fx, fy = anatomy.fovea_x - v.x, anatomy.fovea_y - v.y
    cross = math.cos(v.heading) * fy - math.sin(v.heading) * fx
    return 1.0 if cross > 0 else -1.0


def _steer(v: _Vessel, anatomy: Anatomy) -> float:
    """Heading correction: arcade trunks follow their parabola, macular branches aim at the fovea."""
    if v.arcade_side != 0:
        target = _arcade_heading(v, anatomy)
        return 0.35 * _wrap(target - v.heading)
    if v.to_fovea:
        target = math.atan2(anatomy.fovea_y - v.y, anatomy.fovea_x - v.x)
        return 0.12 * _wrap(target - v.heading)
    # Other branches drift away from the fovea rather than crossing the macula.
    dx, dy = v.x - anatomy.fovea_x, v.y - anatomy.fovea_y
    if dx * dx + dy * dy < (1.6 * anatomy.dd) ** 2:
        return 0.1 * _wrap(math.atan2(dy, dx) - v.heading)
    return 0.0


def _arcade_heading(v: _Vessel, anatomy: Anatomy) -> float:
    tx, ty = anatomy.temporal
    nx, ny = -ty, tx
    px, py = v.x - anatomy.disc_x, v.y - anatomy.disc_y
    a = px * tx + py * ty                  # along the disc-fovea axis
    signed_b = px * nx + py * ny           # across it
    if abs(signed_b) < 1e-6:
        signed_b = math.cos(v.heading) * nx + math.sin(v.heading) * ny
    b_sign, b = math.copysign(1.0, signed_b), abs(signed_b)
    error = (a - v.arcade_c * b * b) / anatomy.dd
    # Tangent of the parabola, bent back towards it when the vessel has drifted off.
    da, db = 2 * v.arcade_c * b - 0.8 * error, 1.0
    dx = da * tx + db * b_sign * nx
    dy = da * ty + db * b_sign * ny
    return math.atan2(dy, dx)


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2 * math.pi) - math.pi


def _rasterise(segments: list, camera: Camera, anatomy: Anatomy) -> VesselMap:
    shape = (camera.height, camera.width)
    layers = [np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)]
    reflex = np.zeros(shape, np.uint8)
    vein_width = VEIN_WIDTH_DD * anatomy.dd
    reflex_min = anatomy.dd / 25
    # Thin first: anti-aliased OpenCV lines overwrite, so a thick parent must be drawn over its thin
    # children at the branch point, not the other way round.
    points = []
    for x0, y0, x1, y1, width, kind in sorted(segments, key=lambda s: s[4]):
        thickness = max(1, int(round(width)))
        # Thin vessels hold less blood: less contrast, and sub-pixel ones are drawn 1 px but fainter.
        opacity = (1.0 - math.exp(-2.9 * width / vein_width)) * min(1.0, width / thickness)
        p0, p1 = fixed(x0, y0), fixed(x1, y1)
        cv2.line(layers[kind], p0, p1, int(255 * opacity), thickness, cv2.LINE_AA, SHIFT)
        if kind == ARTERY and width > reflex_min:
            cv2.line(reflex, p0, p1, int(255 * min(1.0, width / (3 * reflex_min)) * 0.6),
                     max(1, int(round(width / 4))), cv2.LINE_AA, SHIFT)
        if width > anatomy.dd / 30:
            points.append((x1, y1, width))
    artery, vein, reflex = (blur(layer, EDGE_BLUR_DD * anatomy.dd) for layer in (*layers, reflex))
    return VesselMap(artery=artery, vein=vein, reflex=reflex, opacity=np.maximum(artery, vein),
                     points=np.asarray(points, np.float32).reshape(-1, 3))
