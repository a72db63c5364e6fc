"""The ICDR grade and the DME flag, computed from the lesions that were actually placed.

International Clinical Diabetic Retinopathy scale (Wilkinson et al., Ophthalmology 2003;110:1677):
0 no apparent retinopathy; 1 mild NPDR: microaneurysms only; 2 moderate NPDR: more than just
microaneurysms but less than severe; 3 severe NPDR: any of more than 20 intraretinal haemorrhages in each
of 4 quadrants, definite venous beading in 2+ quadrants, prominent IRMA in 1+ quadrant (the "4-2-1
rule"), and no signs of PDR; 4 PDR: neovascularisation and/or vitreous/preretinal haemorrhage.
The phantom draws no venous beading or IRMA, so severe NPDR is the haemorrhage criterion alone.
"""

from __future__ import annotations

import math

from edgeretina.grades import LESION_CODES
from edgeretina.phantom.anatomy import Anatomy
from edgeretina.phantom.lesions import PlacedLesion, fovea_quadrant

SEVERE_HAEMORRHAGES_PER_QUADRANT = 20  # severe needs MORE than this many in every quadrant
DME_RADIUS_DD = 1.0  # hard exudate within 1 DD of the fovea centre: the usual screening DME proxy


def count_lesions(placed: list[PlacedLesion]) -> dict[str, int]:
    counts = dict.fromkeys(LESION_CODES, 0)
    for lesion in placed:
        counts[lesion.code] += 1
    return counts


def haemorrhages_per_quadrant(placed: list[PlacedLesion], anatomy: Anatomy) -> list[int]:
    """Intraretinal haemorrhages in each quadrant around the fovea (see lesions.fovea_quadrant)."""
    per_quadrant = [0, 0, 0, 0]
    for lesion in placed:
        if lesion.code == "HE":
            per_quadrant[fovea_quadrant(anatomy, lesion.x, lesion.y)] += 1
    return per_quadrant


def icdr_grade(counts: dict[str, int], haemorrhages_by_quadrant: list[int]) -> int:
    if counts["NV"] > 0 or counts["PRH"] > 0:
        return 4
    if min(haemorrhages_by_quadrant) > SEVERE_HAEMORRHAGES_PER_QUADRANT:
        return 3
    if counts["HE"] > 0 or counts["EX"] > 0 or counts["CWS"] > 0:
        return 2
    if counts["MA"] > 0:
        return 1
    return 0


def has_dme(placed: list[PlacedLesion], anatomy: Anatomy) -> bool:
    limit = DME_RADIUS_DD * anatomy.dd
    return any(lesion.code == "EX" and math.dist((lesion.x, lesion.y), anatomy.fovea) <= limit
               for lesion in placed)


def grade_placed(placed: list[PlacedLesion], anatomy: Anatomy) -> tuple[int, bool, dict[str, int]]:
    """(ICDR grade, DME flag, counts per lesion code) of what was placed."""
    counts = count_lesions(placed)
    return icdr_grade(counts, haemorrhages_per_quadrant(placed, anatomy)), has_dme(placed, anatomy), counts
