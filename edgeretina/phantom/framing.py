"""How a camera's export frames the field of view, and the named faults a photograph can be forced to have.

Real fundus-camera exports do not all show a centred circle on black. Folders of camera output show (and
each preset below renders one of them):

- ``standard``: the phantom's own framing (camera.py): a centred circle on black, in a square, 5:4 or
  4:3 image, on many wide sensors cut off at the top and bottom.
- ``grey_frame``: the circle offset inside a larger frame that is not black (a sensor black level or a
  digital fill of luminance 15-40, slightly tinted, sometimes a little noisy).
- ``notch``: a square orientation marker on the edge of the field: a dark notch cut into the circle, or
  a small lit tab sticking out of it.
- ``cut_sides``: the circle larger than the image, cut off at the left and right as well as at the top
  and bottom (or at the left and right only, in a narrow crop); 78-95 % of it stays inside.
- ``side_bar``: a bright vertical bar beside the field (a grey wedge, a colour strip or a white panel
  edge, 2-10 % of the image width; sometimes two), in a wide export.
- ``burned_text``: text burned into the frame beside the field (date, patient number, eye, field angle),
  drawn with ``cv2.putText`` as camera software does (2-7 lines, cap height 2-5 % of the image height).
- ``small_field``: a field that fills under half of the image (diameter 44-74 % of the image height).
- ``export_panel``: all of it at once, as viewer exports look: a wide grey frame, the field offset to one
  side, text in the panel, often a bar and a notch.

The presets change where the field lies and what surrounds it; the sensor (exposure, blur, noise ...) is
sampled as for any photograph, so each preset shows the same spread of ordinary camera variation.
``DEFAULT_FRAMING_MIX`` says how often each appears in the default camera mix.

Faults (``FAULTS``) force one strong degradation on a photograph, with its strength drawn from a stated
range: the test instrument for the quality gate (benchmarks/quality_gate.py). The ranges are what the
gate must refuse; milder versions of the same faults, which a grader still accepts, are the camera's own
``degraded`` photographs (camera.py). ``lid_artefact`` is not a sensor setting but an eyelid in the light path
(``Lid``, ``draw_lid``): a dark, soft-edged band entering the field from its top or bottom, in some photographs
with a bright rim along the lid margin and blurred eyelashes across the field; the camera's own mix never draws
it, and a milder one is a ``fault_strength`` below the range.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cv2
import numpy as np

from edgeretina.phantom.camera import Camera, fraction_inside
from edgeretina.phantom.draw import SHIFT, fixed_points

#: Share of each framing in the default camera mix (at camera_variation = 1; at lower variation the
#: non-standard shares shrink in proportion, and at 0 every photograph is ``standard``). Mostly the
#: existing framing, so that the test fixtures drawn from the default mix change little: of the 72
#: fixture photographs (tests/conftest.py, seeds 11 and 12) 18 get a new framing (16 of the 60 training
#: ones, 2 of the 12 test ones), the others keep their pixels exactly; of the demo's 300 held-out
#: photographs 59.
DEFAULT_FRAMING_MIX: dict[str, float] = {
    "standard": 0.80,
    "grey_frame": 0.04,
    "notch": 0.03,
    "cut_sides": 0.03,
    "side_bar": 0.025,
    "burned_text": 0.03,
    "small_field": 0.025,
    "export_panel": 0.02,
}


@dataclass(frozen=True)
class Bar:
    x0: float
    x1: float
    y0: float
    y1: float
    top: tuple[float, float, float]      # RGB 0-255 at y0
    bottom: tuple[float, float, float]   # RGB at y1 (a grey wedge when they differ)


@dataclass(frozen=True)
class Text:
    text: str
    x: int              # bottom-left corner of the text, as cv2.putText wants
    y: int
    scale: float
    thickness: int
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class Surround:
    """What the export draws around the field of view (pixel coordinates of the photograph)."""

    level: tuple[float, float, float] = (0.0, 0.0, 0.0)  # frame colour (RGB, 0-255) outside the field
    noise: float = 0.0                                    # sd of the frame, 8-bit levels
    notch_angle: float = 0.0                              # radians, 0 = right, pi/2 = bottom
    notch_side: float = 0.0                               # px; 0 = no notch
    notch_tab: bool = False                               # a lit tab outside the rim, not a dark notch
    bars: tuple[Bar, ...] = ()
    texts: tuple[Text, ...] = ()

    def as_record(self) -> dict:
        return dataclasses.asdict(self)


STANDARD = Surround()

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def choose_framing(rng: np.random.Generator, variation: float, mix: dict[str, float] | None = None) -> str:
    """A framing name drawn from ``mix`` (default: DEFAULT_FRAMING_MIX); ``standard`` at variation 0."""
    mix = mix or DEFAULT_FRAMING_MIX
    names = list(mix)
    weights = np.array([mix[n] for n in names], np.float64)
    if rng.random() >= variation:  # the ideal (and a partly ideal) camera keeps its own framing
        return "standard"
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def frame(rng: np.random.Generator, name: str, camera: Camera) -> tuple[Camera, Surround]:
    """The camera with the framing's geometry, and what surrounds its field (``standard``: unchanged).

    The sensor was sampled for a standard field; a framing that draws the field larger or smaller scales
    the defocus with it (blur is a property of the optics, the same share of the eye at any magnification).
    """
    framed, surround = _PRESETS[name](rng, camera)
    if framed.fov_radius != camera.fov_radius:
        framed = dataclasses.replace(framed, blur_sigma=camera.blur_sigma * framed.fov_radius / camera.fov_radius)
    return framed, surround


def _standard(rng, camera):
    return camera, STANDARD


def _grey_frame(rng, camera):
    camera = _offset_field(rng, camera, aspect=float(rng.choice((1.25, 4 / 3, 1.5))), radius=(0.38, 0.47))
    return camera, Surround(level=_grey_level(rng), noise=float(rng.uniform(0.0, 2.5)))


def _notch(rng, camera):
    radius = camera.fov_radius
    for _ in range(20):  # a marker on the part of the rim that lies inside the image
        angle = float(rng.choice((-math.pi / 2, 0.0, math.pi, rng.uniform(-math.pi, math.pi))))
        x = camera.fov_cx + radius * math.cos(angle)
        y = camera.fov_cy + radius * math.sin(angle)
        margin = 0.05 * camera.height
        if margin < x < camera.width - margin and margin < y < camera.height - margin:
            break
    level = _grey_level(rng) if rng.random() < 0.5 else (0.0, 0.0, 0.0)
    return camera, Surround(level=level, notch_angle=angle, notch_side=float(rng.uniform(0.035, 0.07) * 2 * radius),
                            notch_tab=bool(rng.random() < 0.3))


def _cut_sides(rng, camera):
    h = camera.height
    if rng.random() < 0.7:  # cut on all four sides: the circle is wider and taller than the image
        width = int(round(h * float(rng.choice((1.0, 1.25)))))
        low, high = 0.5 * max(width, h) + 0.01 * h, 0.75 * h
    else:                   # a narrow crop: cut at the left and right only
        width = int(round(h * rng.uniform(0.8, 0.88)))
        low, high = 0.5 * width + 0.02 * h, 0.48 * h
    for _ in range(50):
        radius = float(rng.uniform(low, high))
        cx = width / 2 + rng.normal(0, 0.01) * h
        cy = h / 2 + rng.normal(0, 0.01) * h
        visible = fraction_inside(cx, cy, radius, width, h)
        if 0.78 <= visible <= 0.95:
            break
    camera = dataclasses.replace(camera, width=width, fov_cx=float(cx), fov_cy=float(cy), fov_radius=radius,
                                 cut_off=bool(radius > h / 2))
    return camera, Surround(level=_grey_level(rng) if rng.random() < 0.3 else (0.0, 0.0, 0.0))


def _side_bar(rng, camera):
    camera = _offset_field(rng, camera, aspect=float(rng.uniform(1.35, 1.6)), radius=(0.42, 0.47), to_side=True)
    level = _grey_level(rng) if rng.random() < 0.5 else (0.0, 0.0, 0.0)
    bars = (_bar(rng, camera),) if rng.random() < 0.7 else (_bar(rng, camera), _bar(rng, camera))
    return camera, Surround(level=level, bars=bars)


def _burned_text(rng, camera):
    if rng.random() < 0.5:
        camera = _offset_field(rng, camera, aspect=float(rng.choice((4 / 3, 1.5))), radius=(0.4, 0.47), to_side=True)
    level = _grey_level(rng) if rng.random() < 0.5 else (0.0, 0.0, 0.0)
    return camera, Surround(level=level, texts=_texts(rng, camera, int(rng.integers(2, 8))))


def _small_field(rng, camera):
    camera = _offset_field(rng, camera, aspect=float(rng.choice((1.0, 1.25, 4 / 3, 1.5))), radius=(0.22, 0.37))
    level = _grey_level(rng) if rng.random() < 0.5 else (0.0, 0.0, 0.0)
    texts = _texts(rng, camera, int(rng.integers(1, 4))) if rng.random() < 0.5 else ()
    return camera, Surround(level=level, texts=texts)


def _export_panel(rng, camera):
    camera = _offset_field(rng, camera, aspect=float(rng.uniform(1.5, 1.78)), radius=(0.36, 0.46), to_side=True)
    surround = Surround(level=_grey_level(rng), noise=float(rng.uniform(0.0, 1.5)),
                        bars=(_bar(rng, camera),) if rng.random() < 0.5 else (),
                        texts=_texts(rng, camera, int(rng.integers(3, 7))))
    if rng.random() < 0.5:
        angle = float(rng.choice((-math.pi / 2, 0.0, math.pi)))
        surround = dataclasses.replace(surround, notch_angle=angle,
                                       notch_side=float(rng.uniform(0.035, 0.07) * 2 * camera.fov_radius))
    return camera, surround


_PRESETS = {
    "standard": _standard, "grey_frame": _grey_frame, "notch": _notch, "cut_sides": _cut_sides,
    "side_bar": _side_bar, "burned_text": _burned_text, "small_field": _small_field, "export_panel": _export_panel,
}
FRAMINGS: tuple[str, ...] = tuple(_PRESETS)
assert set(DEFAULT_FRAMING_MIX) == set(FRAMINGS)


def _grey_level(rng) -> tuple[float, float, float]:
    """A frame that is not black: luminance 15-40, tinted by a few percent per channel."""
    level = rng.uniform(15.0, 40.0)
    tint = np.exp(rng.normal(0, 0.04, 3))
    tint /= 0.299 * tint[0] + 0.587 * tint[1] + 0.114 * tint[2]  # keeps the luminance at `level`
    return tuple(float(level * t) for t in tint)


def _offset_field(rng, camera: Camera, aspect: float, radius: tuple[float, float], to_side: bool = False) -> Camera:
    """A wider image with the whole circle inside it, off the image centre (to one side: room for a panel)."""
    h = camera.height
    width = int(round(h * aspect))
    r = float(rng.uniform(*radius)) * h
    margin = 0.02 * h
    left, right = r + margin, width - r - margin
    if to_side:  # within 8 % of the height of the left or the right edge
        cx = left + rng.uniform(0, 0.08 * h) if rng.random() < 0.5 else right - rng.uniform(0, 0.08 * h)
    else:
        cx = rng.uniform(left, max(left, right))
    top, bottom = r + margin, h - r - margin
    cy = rng.uniform(top, bottom) if bottom > top else h / 2
    return dataclasses.replace(camera, width=width, fov_cx=float(cx), fov_cy=float(cy), fov_radius=r, cut_off=False)


def _bar(rng, camera: Camera) -> Bar:
    """A bright vertical bar in the widest free strip beside the field."""
    h, w = camera.height, camera.width
    left_room = camera.fov_cx - camera.fov_radius
    right_room = w - (camera.fov_cx + camera.fov_radius)
    bar_w = rng.uniform(0.02, 0.1) * w
    gap = rng.uniform(0.02, 0.08) * h
    if right_room >= left_room:
        x0 = camera.fov_cx + camera.fov_radius + gap + rng.uniform(0, max(0.0, right_room - gap - bar_w))
    else:
        x0 = camera.fov_cx - camera.fov_radius - gap - bar_w - rng.uniform(0, max(0.0, left_room - gap - bar_w))
    x0 = float(np.clip(x0, 0, w - bar_w))
    full = rng.random() < 0.6
    y0 = 0.0 if full else rng.uniform(0.0, 0.3) * h
    y1 = float(h) if full else y0 + rng.uniform(0.4, 0.7) * h
    kind = rng.random()
    if kind < 0.4:    # white panel edge
        top = bottom = (250.0, 250.0, 250.0)
    elif kind < 0.75:  # grey wedge, white to dark
        top, bottom = (255.0, 255.0, 255.0), (40.0, 40.0, 40.0)
    else:              # a colour strip
        top = tuple(float(c) for c in rng.uniform(150, 255, 3))
        bottom = top
    return Bar(x0=x0, x1=x0 + bar_w, y0=y0, y1=y1, top=top, bottom=bottom)


_LINES = ("{date}", "ID {pid:07d}", "{eye}", "{deg} deg", "FLASH {flash}", "EDGECAM F-{model}", "{time}")


def _texts(rng, camera: Camera, count: int) -> tuple[Text, ...]:
    """Lines of burned-in text at places beside the field (corners of the frame, or the side panel)."""
    h, w = camera.height, camera.width
    values = {"date": f"2026-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}", "pid": int(rng.integers(0, 10**7)),
              "eye": str(rng.choice(("OD", "OS", "R", "L"))), "deg": int(rng.choice((40, 45, 50))),
              "flash": int(rng.integers(10, 100)), "model": int(rng.integers(1, 9)),
              "time": f"{rng.integers(7, 19):02d}:{rng.integers(0, 60):02d}"}
    lines = [_LINES[i].format(**values) for i in rng.permutation(len(_LINES))[:count]]
    cap = rng.uniform(0.022, 0.05) * h        # cap height of the font
    scale = cap / 22.0                        # FONT_HERSHEY_SIMPLEX: ~22 px cap height at scale 1
    thickness = max(1, int(round(scale * rng.uniform(1.2, 2.2))))
    colour = tuple(int(c) for c in (rng.choice(((255, 255, 255), (255, 255, 0), (0, 255, 0), (200, 200, 200)))))
    step = cap * 1.7
    texts = []
    corners = list(rng.permutation(4))
    placed: list[tuple[float, float, float, float]] = []
    for line in lines:
        (tw, th), base = cv2.getTextSize(line, _FONT, scale, thickness)
        for corner in corners + [int(c) for c in rng.permutation(4)]:
            right, bottom = corner % 2 == 1, corner >= 2
            margin = 0.02 * h
            x = w - margin - tw if right else margin
            stacked = _count(placed, corner)
            y = (h - margin - stacked * step) if bottom else (margin + th + stacked * step)
            box = (x, y - th, x + tw, y + base)
            if box[0] >= 0 and box[2] <= w and box[1] >= 0 and box[3] <= h and _clear_of_field(box, camera, 0.02 * h):
                placed.append((*box, corner))
                texts.append(Text(line, int(round(x)), int(round(y)), float(scale), thickness, colour))
                break
    return tuple(texts)


def _count(placed, corner) -> int:
    return sum(1 for p in placed if p[4] == corner)


def _clear_of_field(box, camera: Camera, gap: float) -> bool:
    """The box's nearest point to the circle's centre lies more than `gap` outside the circle."""
    x0, y0, x1, y1 = box
    nx = min(max(camera.fov_cx, x0), x1)
    ny = min(max(camera.fov_cy, y0), y1)
    return math.hypot(nx - camera.fov_cx, ny - camera.fov_cy) > camera.fov_radius + gap


def field_mask(camera: Camera, surround: Surround, circle: np.ndarray) -> np.ndarray:
    """Where the camera lights the retina: the circle (``circle``, float32 0-1) with the notch cut out of it
    or the tab added to it."""
    if surround.notch_side <= 0:
        return circle
    s, a = surround.notch_side, surround.notch_angle
    # the marker is a square on the rim, its sides along and across the radius
    inner, outer = (camera.fov_radius - 0.5 * s, camera.fov_radius + s) if surround.notch_tab else \
        (camera.fov_radius - s, camera.fov_radius + 2.0)
    u = np.array([math.cos(a), math.sin(a)])
    v = np.array([-u[1], u[0]])
    centre = np.array([camera.fov_cx, camera.fov_cy])
    corners = [centre + u * d + v * t for d, t in ((inner, -s / 2), (outer, -s / 2), (outer, s / 2), (inner, s / 2))]
    square = np.zeros(circle.shape, np.uint8)
    cv2.fillPoly(square, [fixed_points(np.array(corners))], 255, lineType=cv2.LINE_AA, shift=SHIFT)
    square = square.astype(np.float32) * (1.0 / 255.0)
    return np.maximum(circle, square) if surround.notch_tab else circle * (1.0 - square)


def decorate(image: np.ndarray, lit: np.ndarray, surround: Surround, rng: np.random.Generator) -> np.ndarray:
    """Draw the frame, bars and text of the export onto the exposed photograph (uint8 RGB, changed copy)."""
    if surround == STANDARD:
        return image
    out = image.astype(np.float32)
    level = np.asarray(surround.level, np.float32)
    if level.any() or surround.noise > 0:
        outside = (1.0 - lit)[..., None]
        fill = np.broadcast_to(level, out.shape).copy()
        if surround.noise > 0:
            fill += rng.normal(0.0, surround.noise, out.shape[:2])[..., None].astype(np.float32)
        out += outside * fill
    for bar in surround.bars:
        y0, y1 = int(round(bar.y0)), int(round(bar.y1))
        x0, x1 = int(round(bar.x0)), int(round(bar.x1))
        t = np.linspace(0.0, 1.0, max(1, y1 - y0), dtype=np.float32)[:, None, None]
        out[y0:y1, x0:x1] = (1 - t) * np.float32(bar.top) + t * np.float32(bar.bottom)
    image = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    for text in surround.texts:
        cv2.putText(image, text.text, (text.x, text.y), _FONT, text.scale, text.colour, text.thickness, cv2.LINE_AA)
    return image


# ---- faults ---------------------------------------------------------------------------------------------------

#: name -> (camera parameter, low, high): the strength is drawn uniformly from [low, high].
#: blur_sigma is in pixels per 512 px of image height at the standard field size (diameter 0.92 of the
#: height, as camera.py draws it), scaled with the field's diameter: the same share of the eye at any
#: magnification (2.5 px of a 471 px field: 7.4 px of retina.jpg's 1394 px field).
#: gain is an exposure error relative to a correctly metered exposure of this eye (see metered_gain): a
#: darkly pigmented fundus photographed at 2.5 times the phantom's unmetered exposure is only as bright as
#: a blond one at 1.4 times, and a grader would not call it over-exposed.
#: lid_cover is the share of the visible field behind the margin of an eyelid in the light path (Lid,
#: draw_lid), as a drooping upper lid or a lower lid riding up hides it: 0.12-0.2 is an eighth to a fifth of the
#: retina in the photograph; the camera's other settings stay those of an ordinary photograph. Larger lids are
#: drawn as well (fault_strength), but the field-of-view detection then often refuses the circle (its bright
#: region no longer fills it), and the gate says no_field_of_view instead (benchmarks/quality_gate.py).
FAULTS: dict[str, tuple[str, float, float]] = {
    "defocus": ("blur_sigma", 2.5, 4.0),
    "under_exposed": ("gain", 0.10, 0.25),
    "over_exposed": ("gain", 2.5, 4.0),
    "heavy_haze": ("haze", 0.6, 0.85),
    "strong_noise": ("noise_sigma", 0.12, 0.2),
    "lid_artefact": ("lid_cover", 0.12, 0.2),
}

#: The mean luma (0-255) of a correctly exposed field: that of the public reference photograph
#: skimage.data.retina() (120.6 inside 90 % of its radius), which the quality thresholds were first set on.
METERED_LUMA = 120.0
# Mean field luma at gain 1 over 255 * luma(fundus colour x white balance): vignetting, vessels, disc and
# macula together. Measured on 80 standard phantoms (256 px, faults="none"): median 0.80 (5-95 %: 0.76-0.86).
_FIELD_LUMA_FACTOR = 0.80


def metered_gain(camera: Camera, fundus_rgb: tuple[float, float, float]) -> float:
    """The gain an exposure meter would choose for this eye: its field's mean luma at METERED_LUMA."""
    r, g, b = fundus_rgb[0] * camera.wb_r, fundus_rgb[1] * camera.wb_g, fundus_rgb[2] * camera.wb_b
    return METERED_LUMA / (255.0 * _FIELD_LUMA_FACTOR * (0.299 * r + 0.587 * g + 0.114 * b))


def apply_fault(rng: np.random.Generator, name: str, camera: Camera, anatomy,
                strength: float | None = None) -> tuple[Camera, float]:
    """The camera with the fault forced on it, and the fault's strength (in the units of FAULTS; drawn
    from the fault's range unless given)."""
    parameter, low, high = FAULTS[name]
    drawn = float(rng.uniform(low, high))
    strength = drawn if strength is None else float(strength)
    if parameter == "lid_cover":  # not a sensor setting: the lid is drawn in front of the field (draw_lid)
        return dataclasses.replace(camera, degraded=True), strength
    value = strength
    if parameter == "blur_sigma":  # per 512 px of image height for a standard field (0.92 of the height)
        value *= 2.0 * camera.fov_radius / (0.92 * 512.0)
    elif parameter == "gain":
        value *= metered_gain(camera, anatomy.fundus_rgb)
    return dataclasses.replace(camera, **{parameter: value}, degraded=True), strength


# ---- the eyelid in the light path (fault lid_artefact) --------------------------------------------------------

#: The reflectance the lid margin's tear meniscus and lit eyelashes are blended towards: a whitish glint
#: (the fundus itself is orange-red, 0.5-0.8 in red and well under 0.5 in green and blue).
GLINT = (0.95, 0.9, 0.78)


@dataclass(frozen=True)
class Lash:
    points: tuple[tuple[float, float], ...]   # the streak's centre line (px), a curved stroke
    width: float                              # px, before the blur


@dataclass(frozen=True)
class Lid:
    """An eyelid in the light path of the camera (fault ``lid_artefact``), as real photographs show it when the
    patient does not open wide or the lower lid rides up: a dark band entering the field from its top (upper
    lid) or bottom (lower lid), its margin a gentle arc that reaches furthest into the field near the middle,
    soft because the lid is far out of focus; in some photographs a bright reflective rim along the margin (the
    tear meniscus) and eyelashes across the field beside it, blurred dark or lit streaks.

    All lengths in pixels of the photograph; R is the field's radius."""

    side: int               # -1 upper lid (the band enters from the top), +1 lower lid (from the bottom)
    cover: float            # share of the visible field behind the margin: the fault's strength
    x0: float               # where the margin reaches furthest into the field
    edge: float             # the margin's y at x0 (solved for the cover)
    curvature: float        # the margin falls back towards the lid by curvature * R at R from x0
    tilt: float             # the margin's slope (dy / dx) at x0
    softness: float         # scale of the penumbra across the margin (logistic), px
    transmission: float     # share of the light that still reaches the retina behind the lid
    rim: float = 0.0        # strength of the bright rim along the margin (blend towards GLINT), 0 = none
    rim_width: float = 0.0  # its sd, px
    lashes: tuple[Lash, ...] = ()
    lash_blur: float = 0.0     # Gaussian sd of the out-of-focus lashes, px
    lash_opacity: float = 0.0  # how much light a (dark) lash takes, or how far a lit one is blended to GLINT
    bright_lashes: bool = False

    def as_record(self) -> dict:
        return dataclasses.asdict(self)

    def margin(self, x: np.ndarray, radius: float) -> np.ndarray:
        """The y of the lid margin at column x."""
        u = x - self.x0
        return self.edge + self.side * self.curvature * u * u / radius + self.tilt * u

    def distance(self, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
        """Signed distance from the margin, positive on the lit side (approximately perpendicular)."""
        u = x - self.x0
        slope = 2.0 * self.side * self.curvature * u / radius + self.tilt
        return -self.side * (y - self.margin(x, radius)) / np.sqrt(1.0 + slope * slope)


def draw_lid(rng: np.random.Generator, camera: Camera, cover: float) -> Lid:
    """An eyelid hiding the share ``cover`` of the visible field (circle and image): where its margin lies,
    how dark and soft its shadow is, and whether a bright rim and eyelashes come with it."""
    r = camera.fov_radius
    side = -1 if rng.random() < 0.75 else 1     # the upper lid droops far more often than the lower one rides up
    x0 = camera.fov_cx + float(rng.uniform(-0.3, 0.3)) * r
    curvature = float(rng.uniform(0.15, 0.6))
    tilt = float(rng.uniform(-0.15, 0.15))
    softness = float(rng.uniform(0.02, 0.05)) * 2 * r
    transmission = float(rng.uniform(0.03, 0.3))
    rim = float(rng.uniform(0.2, 0.6)) if rng.random() < 0.4 else 0.0
    rim_width = float(rng.uniform(0.008, 0.02)) * 2 * r if rim else 0.0
    # the margin's height that puts `cover` of the visible field behind it: every field point is covered from
    # a margin height q on, so the height is a quantile of q (on a grid of about 128 rows)
    step = max(1, camera.height // 128)
    ys, xs = np.mgrid[0:camera.height:step, 0:camera.width:step].astype(np.float64)
    inside = (xs - camera.fov_cx) ** 2 + (ys - camera.fov_cy) ** 2 <= r * r
    u = xs[inside] - x0
    q = ys[inside] - side * curvature * u * u / r - tilt * u
    edge = float(np.quantile(q, cover if side < 0 else 1.0 - cover))
    lid = Lid(side=side, cover=float(cover), x0=x0, edge=edge, curvature=curvature, tilt=tilt, softness=softness,
              transmission=transmission, rim=rim, rim_width=rim_width)
    if rng.random() < 0.6:
        lashes = tuple(_lash(rng, lid, camera) for _ in range(int(rng.integers(3, 10))))
        lid = dataclasses.replace(lid, lashes=lashes, lash_blur=float(rng.uniform(0.006, 0.016)) * 2 * r,
                                  lash_opacity=float(rng.uniform(0.3, 0.7)), bright_lashes=bool(rng.random() < 0.35))
    return lid


def _lash(rng, lid: Lid, camera: Camera) -> Lash:
    """One eyelash: a curved stroke from just behind the lid margin into the field."""
    r = camera.fov_radius
    x = camera.fov_cx + float(rng.uniform(-0.7, 0.7)) * r
    y = float(lid.margin(np.float64(x), r))
    slope = 2.0 * lid.side * lid.curvature * (x - lid.x0) / r + lid.tilt
    normal = -lid.side * np.array([-slope, 1.0]) / math.hypot(slope, 1.0)   # towards the lit side
    start = np.array([x, y]) - normal * float(rng.uniform(0.0, 1.5)) * lid.softness
    angle = float(rng.uniform(-0.7, 0.7))
    c, s = math.cos(angle), math.sin(angle)
    direction = np.array([c * normal[0] - s * normal[1], s * normal[0] + c * normal[1]])
    length = float(rng.uniform(0.12, 0.3)) * 2 * r
    end = start + direction * length
    bend = np.array([-direction[1], direction[0]]) * float(rng.uniform(-0.25, 0.25)) * length
    control = 0.5 * (start + end) + bend
    t = np.linspace(0.0, 1.0, 16)[:, None]
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t * t * end   # a quadratic Bezier
    return Lash(points=tuple((float(px), float(py)) for px, py in points),
                width=float(rng.uniform(0.005, 0.012)) * 2 * r)


def lid_light(camera: Camera, lid: Lid) -> tuple[np.ndarray, np.ndarray]:
    """What the lid does to the photograph: ``shade`` (float32 HxW, the share of the light that reaches the
    retina and comes back past the lid and its dark lashes) and ``glint`` (float32 HxW 0-1, how far the
    reflectance is blended towards GLINT: the bright rim and lit lashes)."""
    h, w, r = camera.height, camera.width, camera.fov_radius
    x = np.arange(w, dtype=np.float32)[None, :]
    y = np.arange(h, dtype=np.float32)[:, None]
    d = lid.distance(x, y, np.float32(r)).astype(np.float32)
    across = np.clip(d / np.float32(lid.softness), -30.0, 30.0)
    shade = np.float32(lid.transmission) + np.float32(1.0 - lid.transmission) / (1.0 + np.exp(-across))
    glint = np.zeros((h, w), np.float32)
    if lid.rim > 0:  # centred one penumbra into the lit side, where the margin catches the flash
        z = (d - np.float32(lid.softness)) / np.float32(lid.rim_width)
        glint = np.float32(lid.rim) * np.exp(np.float32(-0.5) * z * z)
    if lid.lashes:
        ink = np.zeros((h, w), np.uint8)
        for lash in lid.lashes:
            cv2.polylines(ink, [fixed_points(np.array(lash.points))], False, 255,
                          thickness=max(1, int(round(lash.width))), lineType=cv2.LINE_AA, shift=SHIFT)
        streaks = cv2.GaussianBlur(ink.astype(np.float32) * np.float32(lid.lash_opacity / 255.0), (0, 0),
                                   max(0.5, lid.lash_blur))
        if lid.bright_lashes:
            np.maximum(glint, streaks, out=glint)
        else:
            shade *= 1.0 - streaks
    return shade.astype(np.float32), glint


def put_lid(canvas, camera: Camera, lid: Lid, lit: np.ndarray) -> np.ndarray:
    """Blend the lid's glints into the reflectance (changed in place) and return the light that reaches the
    retina: ``lit`` (the lit field) shaded by the lid."""
    shade, glint = lid_light(camera, lid)
    if glint.any():
        scratch = canvas.scratch
        for plane, c in zip(canvas.planes, GLINT):
            np.subtract(np.float32(c), plane, out=scratch)
            scratch *= glint
            plane += scratch
    return lit * shade
