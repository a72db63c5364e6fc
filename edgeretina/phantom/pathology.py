"""Which lesions a case gets: sample a target ICDR grade, then place lesions typical of it.

The target only steers the placement; the label is computed afterwards from what was placed
(grading.py), so a lesion that could not be placed in the visible field never counts.
Moderate cases hold at most 15 haemorrhages, so they can never reach the severe criterion by chance.
"""

from __future__ import annotations

import numpy as np

from edgeretina.phantom.grading import SEVERE_HAEMORRHAGES_PER_QUADRANT
from edgeretina.phantom.lesions import (
    LesionScene,
    place_cotton_wool_spots,
    place_exudate_clusters,
    place_haemorrhages,
    place_microaneurysms,
    place_neovascularisation,
    place_preretinal_haemorrhage,
)


def sample_target_grade(rng: np.random.Generator, weights: tuple[float, ...]) -> int:
    p = np.asarray(weights, np.float64)
    return int(rng.choice(len(p), p=p / p.sum()))


def place_lesions(scene: LesionScene, target_grade: int) -> None:
    {0: lambda s: None, 1: _mild, 2: _moderate, 3: _severe_background, 4: _proliferative}[target_grade](scene)


def _mild(scene: LesionScene) -> None:
    # A handful of microaneurysms: present at full resolution, nearly gone at 224 px.
    place_microaneurysms(scene, int(scene.rng.integers(1, 9)))


def _moderate(scene: LesionScene) -> None:
    rng = scene.rng
    place_microaneurysms(scene, int(rng.integers(2, 21)))
    pattern = rng.choice(["haemorrhages", "exudates", "cotton_wool"], p=[0.6, 0.25, 0.15])
    if pattern == "haemorrhages":
        place_haemorrhages(scene, int(rng.integers(4, 16)))
        if rng.random() < 0.4:
            place_exudate_clusters(scene, int(rng.integers(1, 3)))
        if rng.random() < 0.3:
            place_cotton_wool_spots(scene, int(rng.integers(1, 4)))
    elif pattern == "exudates":
        place_haemorrhages(scene, int(rng.integers(0, 5)))
        place_exudate_clusters(scene, int(rng.integers(1, 4)))
        if rng.random() < 0.2:
            place_cotton_wool_spots(scene, int(rng.integers(1, 3)))
    else:
        place_haemorrhages(scene, int(rng.integers(1, 7)))
        place_cotton_wool_spots(scene, int(rng.integers(2, 6)))
        if rng.random() < 0.3:
            place_exudate_clusters(scene, 1)


def _severe_background(scene: LesionScene) -> None:
    """Haemorrhages in every quadrant beyond the 4-2-1 threshold, with the company they keep."""
    rng = scene.rng
    for quadrant in range(4):
        n = SEVERE_HAEMORRHAGES_PER_QUADRANT + int(rng.integers(4, 20))
        place_haemorrhages(scene, n, quadrant=quadrant, max_dd=1 / 6, min_dd=1 / 16)
    place_microaneurysms(scene, int(rng.integers(10, 41)))
    if rng.random() < 0.5:
        place_exudate_clusters(scene, int(rng.integers(1, 4)))
    if rng.random() < 0.6:
        place_cotton_wool_spots(scene, int(rng.integers(1, 7)))


def _proliferative(scene: LesionScene) -> None:
    rng = scene.rng
    if rng.random() < 0.35:
        _severe_background(scene)
    else:
        place_microaneurysms(scene, int(rng.integers(5, 31)))
        place_haemorrhages(scene, int(rng.integers(4, 21)))
        if rng.random() < 0.5:
            place_exudate_clusters(scene, int(rng.integers(1, 3)))
        if rng.random() < 0.5:
            place_cotton_wool_spots(scene, int(rng.integers(1, 5)))
    signs = rng.choice(["nv", "prh", "both"], p=[0.45, 0.2, 0.35])
    if signs in ("nv", "both"):
        place_neovascularisation(scene, at_disc=rng.random() < 0.5)
        if rng.random() < 0.3:
            place_neovascularisation(scene, at_disc=False)
    if signs in ("prh", "both"):
        place_preretinal_haemorrhage(scene)
