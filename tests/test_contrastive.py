"""The contrastive image-text stage (training/contrastive.py) and its captions (training/captions.py).

Real towers, tiny: 24 phantom photographs of 64 px, the tiny ViT preset at 64 px, fp32, a few steps.
Floats are compared with tolerances (the CPU class changes between machines).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from edgeretina.dataset import LabeledImage, read_labels
from edgeretina.errors import ConfigError, DatasetError
from edgeretina.grades import LESION_CODES, LESIONS
from edgeretina.training.backbone import BackboneConfig
from edgeretina.training.captions import COUNT_NOUNS, GRADE_PHRASES, TEMPLATES, caption, caption_facts
from edgeretina.training.model import ModelConfig

TINY_VIT = ModelConfig(backbone=BackboneConfig(name="edgeretina-tiny-vit", image_size=64))
SEED = 3


@pytest.fixture(scope="module")
def phantom24(tmp_path_factory):
    from edgeretina.phantom import PhantomConfig, generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("contrastive24"), n=24, seed=21, config=PhantomConfig(size=64),
                            workers=1)


def _mentions(text: str, code: str) -> bool:
    """Whether a caption names lesion `code` (a haemorrhage is not a preretinal haemorrhage)."""
    singular, plural = COUNT_NOUNS[code]
    guard = r"(?<!preretinal )" if code == "HE" else ""
    return re.search(guard + rf"\b({re.escape(plural)}|{re.escape(singular)})\b", text) is not None


def _item(grade: int, case_id: str = "c1", **extra: str) -> LabeledImage:
    from pathlib import Path

    return LabeledImage(path=Path(f"/data/{case_id}.png"), case_id=case_id, grade=grade, extra=extra)


# --- captions -------------------------------------------------------------------------------------------


def test_phantom_captions_name_the_lesions_present_and_none_absent(phantom24):
    items = read_labels(phantom24)
    seen_present = set()
    for item in items:
        text = caption(item)
        assert GRADE_PHRASES[item.grade] in text
        for code in LESION_CODES:
            count = int(item.extra[f"n_{code}"])
            assert _mentions(text, code) == (count > 0), (code, count, text)
            if count:
                seen_present.add(code)
                assert re.search(rf"\b{count} {re.escape(COUNT_NOUNS[code][count != 1])}\b", text), (code, text)
        assert ("near the fovea" in text) == (item.extra["dme"] == "1"), text
    assert len(seen_present) >= 3          # the check saw several lesion types, not only absences


def test_caption_wording_and_determinism():
    item = _item(2, n_MA="6", n_HE="3", n_EX="2", n_CWS="0", n_NV="0", n_PRH="0", dme="1")
    assert caption_facts(item).findings() == ("moderate non-proliferative diabetic retinopathy: 6 microaneurysms, "
                                              "3 haemorrhages, 2 hard exudates, some near the fovea")
    assert caption(item, seed=5) == caption(item, seed=5)
    templates = {caption(_item(2, f"case{i}", n_MA="1"), seed=0).split(" with ")[0] for i in range(30)}
    assert len(templates) > 1             # the seeded choice spreads over the templates
    assert set(COUNT_NOUNS) == set(LESION_CODES) and len(GRADE_PHRASES) == 5 and len(TEMPLATES) >= 2
    assert {lesion.code for lesion in LESIONS} == set(COUNT_NOUNS)


def test_captions_from_other_labels_and_without_labels():
    assert caption_facts(_item(0)).findings() == "no diabetic retinopathy"      # grade-only
    healthy = _item(0, **{f"n_{c}": "0" for c in LESION_CODES})
    assert caption(healthy).endswith("no diabetic retinopathy: no visible lesions")
    severe = "severe non-proliferative diabetic retinopathy"
    assert caption(_item(3, dme_risk="2")).endswith(f"{severe}: hard exudates near the fovea")
    assert caption(_item(3, dme_risk="0")).endswith("severe non-proliferative diabetic retinopathy")
    assert caption(_item(4, adjudicated_dme="1")).endswith("proliferative diabetic retinopathy: diabetic macular oedema")
    assert caption(_item(1, n_MA="1.0", n_HE="")).endswith(": 1 microaneurysm")
    with pytest.raises(DatasetError, match="n_HE"):
        caption(_item(1, n_HE="many"))
    with pytest.raises(DatasetError, match="dme_risk 7"):
        caption(_item(1, dme_risk="7"))


def test_captions_need_no_torch():
    import subprocess
    import sys

    code = ("import sys; from edgeretina.training.captions import caption; "
            "assert 'torch' not in sys.modules, 'captions imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the loss -------------------------------------------------------------------------------------------


def test_infonce_equals_the_hand_computed_value_and_open_clips():
    from open_clip.loss import ClipLoss

    from edgeretina.training.contrastive import contrastive_loss

    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits 2 * [[1, .6], [0, .8]]: rows (image->text) and columns (text->image), each -log softmax of its pair
    expected = (math.log1p(math.exp(-0.8)) + math.log1p(math.exp(-1.6))
                + math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.4))) / 4
    assert float(contrastive_loss(image, text, 2.0)) == pytest.approx(expected, abs=1e-6)
    assert float(contrastive_loss(image, text, 2.0, torch.eye(2, dtype=torch.bool))) == pytest.approx(expected, abs=1e-6)
    rng = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8, generator=rng), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(6, 8, generator=rng), dim=-1)
    assert float(contrastive_loss(a, b, 14.3)) == pytest.approx(float(ClipLoss()(a, b, 14.3)), abs=1e-5)


def test_infonce_treats_captions_with_the_same_findings_as_positives():
    from edgeretina.training.contrastive import contrastive_loss

    image = torch.eye(3)
    text = torch.eye(3)
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    # logits = diag(1): a row's softmax is e/(e+2) on its diagonal, 1/(e+2) elsewhere
    e = math.e
    pair_row = -(0.5 * math.log(e / (e + 2)) + 0.5 * math.log(1 / (e + 2)))
    alone_row = -math.log(e / (e + 2))
    expected = (2 * pair_row + alone_row) / 3      # both directions alike: the matrix is symmetric
    assert float(contrastive_loss(image, text, 1.0, same)) == pytest.approx(expected, abs=1e-6)
    # groups of unequal size and unrelated embeddings: each direction's targets normalised per its own row
    logits_text = torch.tensor([[0.9, 0.1], [0.2, 0.7], [0.4, 0.5]])
    img = torch.nn.functional.normalize(logits_text, dim=-1)
    same3 = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    txt = torch.nn.functional.normalize(torch.tensor([[0.3, 0.8], [0.6, 0.2], [0.1, 0.9]]), dim=-1)
    logits = 3.0 * img @ txt.t()
    by_hand = 0.0
    for matrix in (logits, logits.t()):
        log_p = torch.log_softmax(matrix, dim=1)
        for i in range(3):
            positives = [j for j in range(3) if same3[i, j]]
            by_hand += -sum(float(log_p[i, j]) for j in positives) / len(positives) / 3
    assert float(contrastive_loss(img, txt, 3.0, same3)) == pytest.approx(by_hand / 2, abs=1e-6)


# --- the stage ------------------------------------------------------------------------------------------


def test_text_encoder_reproduces_the_models_prototypes():
    from edgeretina.training.factory import build_text_encoder
    from edgeretina.training.model import GraderModel
    from edgeretina.training.prompts import load_prompts

    torch.manual_seed(SEED)
    model = GraderModel(TINY_VIT)
    text = build_text_encoder(TINY_VIT.backbone, seed=SEED)
    encoded = text.encode_groups(load_prompts().groups())
    assert torch.allclose(encoded[:5], model.grade_prototypes, atol=1e-5)
    assert torch.allclose(encoded[5:], model.lesion_prototypes, atol=1e-5)
    other = build_text_encoder(TINY_VIT.backbone, seed=SEED + 1).encode_groups(load_prompts().groups())
    assert not torch.allclose(other[:5], model.grade_prototypes, atol=1e-2)


@pytest.fixture(scope="module")
def pretrained_run(phantom24, tmp_path_factory):
    from edgeretina.training.loop import TrainConfig, train

    out = tmp_path_factory.mktemp("contrastive_run") / "model.pt"
    lines: list[str] = []
    # one batch of every training image per step, no augmentation: the step losses are comparable (full-batch
    # steps; here the loss went 3.26 -> 2.84 over 6 steps, seeds 3 and 5 alike)
    config = TrainConfig(data=phantom24, out=out, model=TINY_VIT, epochs=1, batch_size=32, val_fraction=0.2,
                         augment=False, seed=SEED, threads=2, workers=1, contrastive_epochs=6,
                         contrastive_lr=1e-4, lr=1e-4)
    return train(config, log=lines.append, show_progress=False), lines


def test_the_stage_lowers_its_loss_and_reencodes_the_prototypes(pretrained_run):
    from edgeretina.training.checkpoint import load_checkpoint
    from edgeretina.training.model import GraderModel

    result, lines = pretrained_run
    ckpt = load_checkpoint(result.checkpoint)
    record = ckpt.summary["contrastive"]
    assert record["epochs"] == 6 and record["steps"] == 6 and record["seconds"] >= 0
    assert np.isfinite(record["loss_first"]) and record["loss_last"] < record["loss_first"] - 0.15, record
    assert sum(line.startswith("contrastive epoch ") for line in lines) == 6
    torch.manual_seed(SEED)
    initial = GraderModel(TINY_VIT)             # what the run built before the stage
    trained = ckpt.model
    for name in ("grade_prototypes", "lesion_prototypes"):
        after = getattr(trained, name)
        assert torch.allclose(after.norm(dim=-1), torch.ones(len(after)), atol=1e-4)
        assert (after - getattr(initial, name)).abs().max() > 1e-3, name
    assert len(ckpt.summary["history"]) == 1    # the grading epoch ran after the stage
    assert not any("does not reproduce" in line for line in lines)


def test_the_reencoded_prototypes_come_from_the_adapted_text_tower(phantom24, torch_threads_restored):
    """The stage alone, on a model built as the loop builds it: it changes the image tower and writes the
    adapted text tower's encoding of the prompts into the prototypes."""
    from edgeretina.preprocess import PreprocessConfig
    from edgeretina.training.contrastive import pretrain_contrastive
    from edgeretina.training.data import prepare_images
    from edgeretina.training.distributed import DistributedContext
    from edgeretina.training.freezing import freeze_backbone
    from edgeretina.training.loop import TrainConfig
    from edgeretina.training.model import GraderModel

    config = TrainConfig(data=phantom24, out=phantom24.parent / "unused.pt", model=TINY_VIT, batch_size=12,
                         augment=True, seed=SEED, contrastive_epochs=1, contrastive_lr=3e-4)
    torch.set_num_threads(2)
    torch.manual_seed(SEED)
    model = GraderModel(TINY_VIT)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = freeze_backbone(model.backbone, None)
    items = read_labels(phantom24)[:16]
    preprocess = PreprocessConfig(image_size=64, mean=tuple(model.backbone.mean), std=tuple(model.backbone.std))
    data = prepare_images(items, preprocess, workers=1)
    lines: list[str] = []
    record = pretrain_contrastive(model, items, data, preprocess, config, plan, DistributedContext(), lines.append)
    assert record["steps"] == 1 and len(lines) == 1 and "contrastive epoch 1/1: loss" in lines[0]
    after = model.state_dict()
    changed = [k for k in before if k.startswith("backbone.") and not torch.allclose(before[k], after[k])]
    assert changed, "the image tower did not change"
    assert not torch.allclose(before["projection.weight"], after["projection.weight"])
    assert (after["grade_prototypes"] - before["grade_prototypes"]).abs().max() > 1e-4
    assert torch.equal(before["coral_bias"], after["coral_bias"])     # the grading heads are not its business


def test_the_stage_is_refused_where_it_cannot_run(phantom24, tmp_path):
    from edgeretina.training.contrastive import pretrain_contrastive
    from edgeretina.training.distributed import DistributedContext
    from edgeretina.training.loop import TrainConfig

    timm = ModelConfig(backbone=BackboneConfig(name="timm/test_vit"))
    with pytest.raises(ConfigError, match="text tower"):
        TrainConfig(data=phantom24, out=tmp_path / "m.pt", model=timm, contrastive_epochs=1)
    TrainConfig(data=phantom24, out=tmp_path / "m.pt", model=timm)              # off: a timm tower is fine
    with pytest.raises(ConfigError, match="contrastive_epochs"):
        TrainConfig(data=phantom24, out=tmp_path / "m.pt", contrastive_epochs=-1)
    with pytest.raises(ConfigError, match="contrastive_lr"):
        TrainConfig(data=phantom24, out=tmp_path / "m.pt", contrastive_epochs=1, contrastive_lr=0.0)
    from edgeretina.training.factory import build_text_encoder
    with pytest.raises(ConfigError, match="without a text tower"):
        build_text_encoder(timm.backbone)
    config = TrainConfig(data=phantom24, out=tmp_path / "m.pt", model=TINY_VIT, contrastive_epochs=1)
    with pytest.raises(ConfigError, match="torchrun"):
        pretrain_contrastive(None, [], None, None, config, None, DistributedContext(rank=0, world_size=2),
                             lambda _: None)
    off = TrainConfig(data=phantom24, out=tmp_path / "m.pt", model=TINY_VIT)
    assert pretrain_contrastive(None, [], None, None, off, None, DistributedContext(), lambda _: None) is None
