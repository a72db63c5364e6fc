"""benchmarks/training_ablation.py: what each study's arms set, and the paired differences it reports."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "training_ablation.py"


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("benchmarks_training_ablation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_each_arm_sets_only_its_option(ablation):
    side = ablation.STUDIES["side-connection"]
    assert side.arms[0] == "off"
    assert side.options("off") == ({"lesion_to_grade": False}, {})
    assert side.options("on") == ({"lesion_to_grade": True}, {})
    generation = ablation.STUDIES["lesion-generation"]
    assert generation.options("off") == ({}, {})
    pasted, kept = generation.options("paste")[1]["lesion_generation"], generation.options("paste-keep-grade")[1]["lesion_generation"]
    assert pasted.probability == kept.probability == ablation.LESION_GENERATION_PROBABILITY > 0
    assert (pasted.raise_grade, kept.raise_grade) == (True, False)


def test_the_arms_build_valid_training_configs(ablation, tmp_path):
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.loop import TrainConfig
    from edgeretina.training.model import ModelConfig

    for study in ablation.STUDIES.values():
        for arm in study.arms:
            model_options, train_options = study.options(arm)
            model = ModelConfig(backbone=BackboneConfig(name=ablation.ARCH, image_size=64), lesion_head=True,
                                **model_options)
            TrainConfig(data=(f"phantom:{tmp_path}",), out=tmp_path / "x.pt", model=model, **train_options)


def test_differences_are_paired_by_seed_against_the_first_arm(ablation):
    rows = [{"seed": 0, "arm": "off", "qwk": 0.70, "auc": 0.90}, {"seed": 0, "arm": "paste", "qwk": 0.75, "auc": 0.88},
            {"seed": 0, "arm": "paste-keep-grade", "qwk": 0.60, "auc": 0.91},
            {"seed": 1, "arm": "off", "qwk": 0.80, "auc": 0.95}, {"seed": 1, "arm": "paste", "qwk": 0.70, "auc": 0.96},
            {"seed": 2, "arm": "paste", "qwk": 0.99, "auc": 0.99}]          # seed 2 has no reference: unpaired
    summary = ablation.summarise(rows, ("off", "paste", "paste-keep-grade"))
    assert summary["reference"] == "off"
    paste = summary["differences"]["paste - off"]
    assert paste["paired_seeds"] == [0, 1]
    assert paste["qwk"]["per_seed"] == pytest.approx({"0": 0.05, "1": -0.10})
    assert paste["qwk"]["mean"] == pytest.approx(-0.025) and paste["qwk"]["positive"] == 1
    assert paste["auc"]["per_seed"] == pytest.approx({"0": -0.02, "1": 0.01})
    kept = summary["differences"]["paste-keep-grade - off"]
    assert kept["paired_seeds"] == [0] and kept["qwk"]["sd"] is None
    assert summary["arms"]["paste"]["qwk"]["n"] == 3 and summary["side_weights"] is None
    assert any("paste - off" in line for line in ablation.table({"runs": [dict(r, epochs=1, seconds=1) for r in rows],
                                                                  "summary": summary}))
