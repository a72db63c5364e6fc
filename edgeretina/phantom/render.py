"""Render one phantom case: camera -> anatomy -> vessels -> lesions -> sensor, then grade it."""

from __future__ import annotations

import numpy as np

from edgeretina.errors import ConfigError
from edgeretina.phantom.anatomy import render_fundus, sample_anatomy
from edgeretina.phantom.camera import expose, fov_mask, sample_camera
from edgeretina.phantom.config import PhantomCase, PhantomConfig
from edgeretina.phantom.framing import apply_fault, choose_framing, decorate, draw_lid, field_mask, frame, put_lid
from edgeretina.phantom.grading import grade_placed
from edgeretina.phantom.lesions import OVER_VESSELS, UNDER_VESSELS, LesionScene, composite, lesion_masks
from edgeretina.phantom.pathology import place_lesions, sample_target_grade
from edgeretina.phantom.vessels import draw_vessels, grow_vessels


def render_case(seed: int, config: PhantomConfig = PhantomConfig(), *, lesions: bool = True) -> PhantomCase:
    """Draw the synthetic fundus photograph of one seed; the same seed and config give the same pixels.

    lesions=False renders the same eye through the same camera without any lesion (a healthy twin,
    grade 0): a paired reference for measuring what the lesions change. With the fault ``lid_artefact``
    the eyelid in front of the field (framing.Lid) is recorded in ``surround["lid"]``.
    Raises ConfigError for a seed that is not an integer >= 0.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"phantom seed must be an integer >= 0, got {seed!r}")
    # Independent streams, so that the twin without lesions keeps the same anatomy, camera and noise. The
    # framing has a stream of its own, spawned last: a standard-framed photograph has the pixels it had
    # before framings existed.
    camera_rng, anatomy_rng, vessel_rng, lesion_rng, sensor_rng, framing_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6))
    framing = config.framing if config.framing != "mixed" else choose_framing(framing_rng, config.camera_variation)
    camera = sample_camera(camera_rng, config.size, config.camera_variation, degrade=config.faults == "mixed")
    camera, surround = frame(framing_rng, framing, camera)
    anatomy = sample_anatomy(anatomy_rng, camera)  # depends on where the field is, not on the sensor
    fault = config.faults if config.faults not in ("mixed", "none") else None
    strength, lid = None, None
    if fault is not None:
        camera, strength = apply_fault(framing_rng, fault, camera, anatomy, config.fault_strength)
    if fault == "lid_artefact":
        lid = draw_lid(framing_rng, camera, strength)
    canvas = render_fundus(anatomy_rng, camera, anatomy)
    vessels = grow_vessels(vessel_rng, camera, anatomy)

    scene = LesionScene(lesion_rng, camera, anatomy, vessels)
    target_grade = sample_target_grade(lesion_rng, config.grade_weights)
    if lesions:
        place_lesions(scene, target_grade)
    composite(canvas, scene, UNDER_VESSELS)
    draw_vessels(canvas, vessels)
    composite(canvas, scene, OVER_VESSELS)

    circle = fov_mask(camera)
    lit = field_mask(camera, surround, circle)
    light = lit if lid is None else put_lid(canvas, camera, lid, lit)
    image = decorate(expose(canvas, camera, sensor_rng, light), lit, surround, framing_rng)
    grade, dme, counts = grade_placed(scene.placed, anatomy)
    return PhantomCase(
        image=image, masks=lesion_masks(scene, circle), grade=grade, dme=dme, counts=counts,
        fov=(camera.fov_cx, camera.fov_cy, camera.fov_radius), camera=camera.as_record(),
        anatomy=anatomy.as_record(), framing=framing,
        surround=surround.as_record() if lid is None else {**surround.as_record(), "lid": lid.as_record()}, fault=fault,
        fault_strength=strength,
    )
