"""Phantom fundus photographs: synthetic colour fundus images with lesion masks and ICDR grades.

A test instrument for training and testing DR graders without patient data. Each case is drawn from a
seed: camera framing and sensor (camera.py) -> healthy anatomy (anatomy.py, vessels.py) -> lesions for a
sampled target grade (pathology.py, lesions.py) -> the ICDR grade and DME flag computed from the lesions
actually placed (grading.py). Proportions follow the optic disc diameter (DD ~ 1.8 mm); the modules say
where each number comes from.

    from edgeretina.phantom import PhantomConfig, render_case, generate_dataset
    case = render_case(7)                                   # one PhantomCase, deterministic by seed
    framed = render_case(7, PhantomConfig(framing="export_panel"))   # a named framing (framing.py)
    labels = generate_dataset("data/phantom", n=2000, seed=0, config=PhantomConfig(size=512))
"""

from edgeretina.phantom.config import DEFAULT_GRADE_WEIGHTS, PhantomCase, PhantomConfig
from edgeretina.phantom.framing import DEFAULT_FRAMING_MIX, FAULTS, FRAMINGS
from edgeretina.phantom.dataset import LABEL_COLUMNS, case_id, case_seed, generate_dataset
from edgeretina.phantom.render import render_case

__all__ = [
    "DEFAULT_FRAMING_MIX",
    "DEFAULT_GRADE_WEIGHTS",
    "FAULTS",
    "FRAMINGS",
    "LABEL_COLUMNS",
    "PhantomCase",
    "PhantomConfig",
    "case_id",
    "case_seed",
    "generate_dataset",
    "render_case",
]
