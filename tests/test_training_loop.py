"""The loop's features: per-grade balanced batches, early stopping, resumable epochs, deterministic seeds,
frozen backbone blocks and the frozen-backbone feature cache.

Everything trains the demo's tower (edgeretina-tiny-rn) at 64 px on 40 phantom photographs of 64 px
(34 train, 6 validation), batch 10 (2 of each grade), fp32, one thread: about a second an epoch here.
Float comparisons use tolerances (the CPU class changes between machines); "same" means within 1e-5.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from edgeretina.errors import ConfigError
from edgeretina.training.backbone import BackboneConfig
from edgeretina.training.checkpoint import load_checkpoint
from edgeretina.training.data import PerGradeBatchSampler, WeightedBatchSampler
from edgeretina.training.model import GraderModel, ModelConfig
from edgeretina.training.resume import resume_path

MODEL = ModelConfig(backbone=BackboneConfig(name="edgeretina-tiny-rn", image_size=64))


@pytest.fixture(scope="module")
def phantom40(tmp_path_factory):
    from edgeretina.phantom import PhantomConfig, generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("loop40"), n=40, seed=5, config=PhantomConfig(size=64), workers=1)


def _config(labels, out, **overrides):
    from edgeretina.training.loop import TrainConfig

    settings = dict(data=labels, out=out, epochs=3, batch_size=10, lr=1e-3, seed=0, model=MODEL, workers=1,
                    threads=1, precision="fp32")
    settings.update(overrides)
    return TrainConfig(**settings)


class _Interrupted(Exception):
    pass


def _train(config, interrupt_after: int | None = None, capture_epoch: int | None = None):
    """Run train(); returns (checkpoint, log lines, model state right after `capture_epoch`, read back from the
    resume file the loop writes just before it logs that epoch). interrupt_after: crash right after that
    epoch's resume file is written (the log line that follows it raises)."""
    from edgeretina.training.loop import train

    lines, captured = [], {}

    def log(message: str) -> None:
        lines.append(message)
        if capture_epoch is not None and message.startswith(f"epoch {capture_epoch}:"):
            captured.update(torch.load(resume_path(config.out), weights_only=True)["model"])
        if interrupt_after is not None and message.startswith(f"epoch {interrupt_after}:"):
            raise _Interrupted(message)

    result = train(config, log=log, show_progress=False)
    return load_checkpoint(result.checkpoint), lines, captured


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


# ------------------------------------------------------------------ samplers

GRADES = np.array([0] * 23 + [1] * 5 + [2] * 9 + [3] * 1 + [4] * 7)


def test_per_grade_batches_hold_n_images_of_every_grade():
    sampler = PerGradeBatchSampler(GRADES, per_grade=3, seed=4)
    batches = list(sampler.batches(epoch=0))
    assert sampler.steps_per_epoch == len(batches) == math.ceil(23 / 3)
    assert sampler.batch_size == 15
    for batch in batches:
        assert np.bincount(GRADES[batch], minlength=5).tolist() == [3, 3, 3, 3, 3]
    drawn = np.concatenate(batches)
    largest = np.flatnonzero(GRADES == 0)
    assert set(drawn[GRADES[drawn] == 0]) == set(largest)                      # every image of it, once ...
    assert np.bincount(drawn[GRADES[drawn] == 0], minlength=len(GRADES))[largest].max() <= 2  # ... (+1 top-up)
    # rarer grades cycle: each round through a grade is a permutation of all its images
    grade2 = drawn[GRADES[drawn] == 2]
    for start in range(0, len(grade2) - 9 + 1, 9):
        assert sorted(grade2[start:start + 9]) == sorted(np.flatnonzero(GRADES == 2))


def test_per_grade_schedule_is_a_function_of_seed_and_epoch():
    def schedule(seed, epoch):
        return np.concatenate(list(PerGradeBatchSampler(GRADES, 3, seed).batches(epoch)))

    assert np.array_equal(schedule(4, 0), schedule(4, 0))
    assert not np.array_equal(schedule(4, 0), schedule(4, 1))
    assert not np.array_equal(schedule(4, 0), schedule(5, 0))


def test_per_grade_sampler_uses_only_the_grades_present():
    grades = np.array([0, 0, 0, 0, 3, 3])
    sampler = PerGradeBatchSampler(grades, per_grade=2, seed=0)
    assert sampler.grades_present == [0, 3] and sampler.batch_size == 4 and sampler.steps_per_epoch == 2
    assert all(np.bincount(grades[b], minlength=5)[[0, 3]].tolist() == [2, 2] for b in sampler.batches(0))


def test_weighted_sampler_state_restores_its_draws():
    sampler = WeightedBatchSampler(GRADES, 8, np.random.default_rng(0))
    state = sampler.state_dict()
    first = np.concatenate(list(sampler.batches(0)))
    sampler.load_state_dict(state)
    assert np.array_equal(np.concatenate(list(sampler.batches(0))), first)
    assert len(first) == 8 * math.ceil(len(GRADES) / 8)


# ------------------------------------------------------------------ early stopping

def test_early_stopping_rule_counts_epochs_without_a_large_enough_rise():
    from edgeretina.training.loop import EarlyStopping

    rule = EarlyStopping(patience=2, min_delta=0.01)
    assert rule.update(0.50) and not rule.should_stop
    assert not rule.update(0.505) and not rule.should_stop        # a rise below min_delta does not count
    assert rule.update(0.60)
    assert not rule.update(0.60) and not rule.should_stop
    assert not rule.update(0.59) and rule.should_stop
    assert not EarlyStopping(patience=None).should_stop


def test_training_stops_early_and_records_why(phantom40, tmp_path):
    """A frozen backbone (features cached) and lr 1e-9: the predictions, so the validation QWK, never change,
    so with patience 2 the run stops after epoch 3 of 8, keeping epoch 1."""
    ckpt, lines, _ = _train(_config(phantom40, tmp_path / "stop.pt", epochs=8, lr=1e-9, patience=2,
                                    trainable_blocks=0, augment=False))
    stopped = ckpt.summary["stopped"]
    assert stopped["reason"] == "early_stopping" and stopped["after_epoch"] == 3
    assert ckpt.summary["schedule"]["epochs_run"] == 3 and ckpt.summary["best_epoch"] == 1
    assert any(line.startswith("early stopping after epoch 3") for line in lines), lines
    assert stopped["message"] in lines


def test_a_run_that_completes_says_so(phantom40, tmp_path):
    """resume=True with no resume file starts afresh (a job script may always pass it)."""
    ckpt, lines, _ = _train(_config(phantom40, tmp_path / "done.pt", epochs=1, trainable_blocks=0, augment=False,
                                    resume=True))
    assert f"resume: no resume file at {resume_path(tmp_path / 'done.pt')}; starting afresh" in lines
    assert ckpt.summary["stopped"]["reason"] == "completed" and ckpt.summary["schedule"]["resumed_from_epoch"] is None
    assert not resume_path(tmp_path / "done.pt").exists()            # removed once the checkpoint is written


def test_cli_choices_are_the_loops():
    from edgeretina.cli.train import Device, Sampler
    from edgeretina.training.data import SAMPLERS
    from edgeretina.training.loop import DEVICES

    assert tuple(m.value for m in Sampler) == SAMPLERS and tuple(m.value for m in Device) == DEVICES


def test_bad_loop_settings_are_config_errors(tmp_path):
    for bad in (dict(sampler="random"), dict(patience=0), dict(per_grade=0), dict(trainable_blocks=-1),
                dict(min_delta=-0.1), dict(device="tpu")):
        with pytest.raises(ConfigError):
            _config(tmp_path / "x.csv", tmp_path / "y.pt", **bad)


# ------------------------------------------------------------------ resume and seeds

@pytest.fixture(scope="module")
def uninterrupted(phantom40, tmp_path_factory):
    """3 epochs, fine-tuning everything with augmentation on: what a resumed run must reproduce."""
    out = tmp_path_factory.mktemp("whole") / "a.pt"
    return _train(_config(phantom40, out), capture_epoch=3)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(uninterrupted, phantom40, tmp_path):
    config = _config(phantom40, tmp_path / "b.pt")
    with pytest.raises(_Interrupted):
        _train(config, interrupt_after=2)
    saved = resume_path(config.out)
    assert saved.is_file() and not config.out.exists()
    payload = torch.load(saved, weights_only=True)                # plain containers and tensors only
    assert payload["epoch"] == 2 and len(payload["history"]) == 2
    resumed, lines, after_3 = _train(dataclasses.replace(config, resume=True), capture_epoch=3)
    whole, _, whole_after_3 = uninterrupted
    assert any(line.startswith(f"resume: continuing from {saved} after epoch 2") for line in lines)
    assert resumed.summary["schedule"]["resumed_from_epoch"] == 2
    assert _max_difference(after_3, whole_after_3) < 1e-5           # the weights after epoch 3
    assert _max_difference(resumed.model.state_dict(), whole.model.state_dict()) < 1e-5   # the checkpoint
    for a, b in zip(resumed.summary["history"], whole.summary["history"], strict=True):
        assert a["val_qwk"] == pytest.approx(b["val_qwk"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert not saved.exists()


def test_resuming_with_other_settings_is_refused(phantom40, tmp_path):
    config = _config(phantom40, tmp_path / "c.pt", epochs=2, trainable_blocks=0, augment=False)
    with pytest.raises(_Interrupted):
        _train(config, interrupt_after=1)
    with pytest.raises(ConfigError, match=r"lr: 0\.001 then, 0\.002 now"):
        _train(dataclasses.replace(config, lr=2e-3, resume=True))
    from edgeretina.errors import CheckpointError
    with pytest.raises(CheckpointError, match="resume file not found"):
        _train(dataclasses.replace(config, resume=tmp_path / "nothing.resume.pt"))


def test_a_resume_file_older_than_a_setting_resumes_at_its_default_and_refuses_a_change(tmp_path):
    """A file written before contrastive_epochs / contrastive_lr / augmentation.gamma existed lacks them:
    the run it records behaved as their defaults, so only a changed value is a mismatch."""
    from edgeretina.training.resume import ResumeState, load_resume_state, run_fingerprint, save_resume_state

    def fingerprint(config):
        return run_fingerprint(config, ["a", "b"], ["c"], [0, 2], [1], world_size=1, cached=False)

    config = _config(tmp_path / "labels.csv", tmp_path / "c.pt")
    old = fingerprint(config)
    del old["defaults"], old["settings"]["contrastive_epochs"], old["settings"]["contrastive_lr"]
    del old["settings"]["augmentation"]["gamma"]
    path = save_resume_state(tmp_path / "c.resume.pt", ResumeState(
        epoch=1, model={}, optimizer={}, scheduler={}, scaler=None, best_qwk=0.5, best_epoch=1, best_state=None,
        history=[], stopping_best=0.5, epochs_without_improvement=0, planned_epochs=3, elapsed_seconds=1.0,
        rng={}, sampler={}, fingerprint=old))
    assert load_resume_state(path, fingerprint(config)).epoch == 1
    for changed, message in [(dict(contrastive_epochs=1), r"contrastive_epochs: None then, 1 now"),
                             (dict(contrastive_lr=3e-5), r"contrastive_lr: None then, 3e-05 now"),
                             (dict(augmentation=dataclasses.replace(config.augmentation, gamma=0.3)),
                              r"augmentation: \{.*\} then")]:
        with pytest.raises(ConfigError, match=message):
            load_resume_state(path, fingerprint(dataclasses.replace(config, **changed)))


def test_same_seed_gives_the_same_weights_and_another_seed_other_weights(uninterrupted, phantom40, tmp_path):
    again, _, again_after_3 = _train(_config(phantom40, tmp_path / "again.pt"), capture_epoch=3)
    whole, _, whole_after_3 = uninterrupted
    assert _max_difference(again_after_3, whole_after_3) < 1e-5
    assert again.summary["history"][0]["loss"] == pytest.approx(whole.summary["history"][0]["loss"], rel=1e-5)
    other, _, other_after_1 = _train(_config(phantom40, tmp_path / "other.pt", epochs=1, seed=1), capture_epoch=1)
    torch.manual_seed(0)
    assert _max_difference(other_after_1, GraderModel(MODEL).state_dict()) > 1e-3
    assert _max_difference(other_after_1, whole_after_3) > 1e-3
    assert other.summary["history"][0]["loss"] != pytest.approx(whole.summary["history"][0]["loss"], rel=1e-3)


# ------------------------------------------------------------------ freezing

def _towers():
    from open_clip.timm_model import TimmModel

    from edgeretina.training.backbone import VisionBackbone

    torch.manual_seed(0)
    rn = GraderModel(MODEL).backbone
    vit = GraderModel(ModelConfig(backbone=BackboneConfig(image_size=64))).backbone
    timm_vit = VisionBackbone(TimmModel("test_vit", embed_dim=32, image_size=64, pool="", proj="linear"))
    timm_cnn = VisionBackbone(TimmModel("test_convnext", embed_dim=32, image_size=64, pool="avg", proj="linear"))
    return {"resnet": rn, "vit": vit, "timm-vit": timm_vit, "timm-convnext": timm_cnn}


@pytest.fixture(scope="module")
def towers():
    return _towers()


@pytest.mark.parametrize("kind, blocks", [("resnet", 4), ("vit", 6), ("timm-vit", None), ("timm-convnext", None)])
def test_tower_parts_cover_every_parameter_once(towers, kind, blocks):
    from edgeretina.training.freezing import tower_parts

    parts = tower_parts(towers[kind].visual)
    if blocks is not None:
        assert len(parts.blocks) == blocks
    assert len(parts.blocks) >= 2

    def ids(items):
        return [id(p) for item in items for p in ([item] if isinstance(item, torch.nn.Parameter) else item.parameters())]

    covered = ids(parts.stem) + ids(parts.blocks) + ids(parts.head)
    assert sorted(covered) == sorted(id(p) for p in towers[kind].visual.parameters())


@pytest.mark.parametrize("kind", ["resnet", "vit", "timm-vit", "timm-convnext"])
def test_trainable_blocks_sets_requires_grad(towers, kind):
    from edgeretina.training.freezing import freeze_backbone, tower_parts

    backbone = towers[kind]
    parts = tower_parts(backbone.visual)

    def trainable(items):
        return {p.requires_grad for item in items
                for p in ([item] if isinstance(item, torch.nn.Parameter) else item.parameters())}

    try:
        plan = freeze_backbone(backbone, 0)
        assert plan.backbone_frozen and not any(p.requires_grad for p in backbone.parameters())
        plan = freeze_backbone(backbone, 1)
        assert trainable(parts.blocks[-1:] + parts.head) == {True}
        assert trainable(parts.stem + parts.blocks[:-1]) == {False}
        assert 0 < plan.trainable_backbone_parameters < plan.backbone_parameters
        assert freeze_backbone(backbone, len(parts.blocks)).fine_tunes_everything
        assert freeze_backbone(backbone, None).fine_tunes_everything
    finally:
        freeze_backbone(backbone, None)


def test_frozen_parts_stay_in_eval_mode_and_keep_their_batchnorm_statistics(phantom40, tmp_path):
    """trainable_blocks=1 on the ResNet: after training, everything but layer4 and the attention pool is
    bit-for-bit the seeded initialisation — weights and BatchNorm running statistics (eval mode) — while
    layer4 learned and the logged parameter count says so."""
    ckpt, lines, _ = _train(_config(phantom40, tmp_path / "tb1.pt", epochs=1, trainable_blocks=1))
    torch.manual_seed(0)
    start = GraderModel(MODEL).state_dict()
    trained = ckpt.model.state_dict()
    frozen = [k for k in start if k.startswith("backbone.visual.") and not k.startswith(
        ("backbone.visual.layer4.", "backbone.visual.attnpool."))]
    assert any("running_mean" in k for k in frozen)
    assert all(torch.equal(start[k], trained[k]) for k in frozen)
    assert not torch.equal(start["backbone.visual.layer4.0.conv1.weight"], trained["backbone.visual.layer4.0.conv1.weight"])
    assert not torch.equal(start["backbone.visual.layer4.0.bn1.running_mean"], trained["backbone.visual.layer4.0.bn1.running_mean"])
    assert any(line.startswith("trainable: the last 1 of 4 backbone blocks") for line in lines), lines


def test_keep_frozen_in_eval_after_train(towers):
    from edgeretina.training.freezing import freeze_backbone, keep_frozen_in_eval

    backbone = towers["resnet"]
    try:
        plan = freeze_backbone(backbone, 2)
        backbone.train()
        keep_frozen_in_eval(plan)
        assert not backbone.visual.bn1.training and not backbone.visual.layer2[0].bn1.training
        assert backbone.visual.layer3[0].bn1.training and backbone.visual.attnpool.training
    finally:
        freeze_backbone(backbone, None)
        backbone.train()


# ------------------------------------------------------------------ feature cache

def test_cached_and_uncached_frozen_backbone_training_agree(phantom40, tmp_path):
    """Frozen backbone, no augmentation, same seed: training the heads from cached backbone outputs gives
    what running the backbone every step gives (same losses, same head weights after the last epoch)."""
    settings = dict(epochs=2, trainable_blocks=0, augment=False)
    cached, cached_lines, cached_after = _train(_config(phantom40, tmp_path / "cached.pt", **settings), capture_epoch=2)
    direct, direct_lines, direct_after = _train(_config(phantom40, tmp_path / "direct.pt", cache_features=False,
                                                        **settings), capture_epoch=2)
    assert cached.summary["schedule"]["feature_cache"] and not direct.summary["schedule"]["feature_cache"]
    assert any(line.startswith("feature cache:") for line in cached_lines)
    assert not any(line.startswith("feature cache:") for line in direct_lines)
    assert _max_difference(cached_after, direct_after) < 1e-5
    assert _max_difference(cached.model.state_dict(), direct.model.state_dict()) < 1e-5
    for a, b in zip(cached.summary["history"], direct.summary["history"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    torch.manual_seed(0)
    start = GraderModel(MODEL).state_dict()
    assert all(torch.equal(start[k], cached_after[k]) for k in start if k.startswith("backbone."))
    assert not torch.equal(start["coral_weight.weight"], cached_after["coral_weight.weight"])
    # the checkpoint keeps its bank in float16: embeddings 1e-6 apart may round one float16 step apart
    assert np.allclose(cached.bank.embeddings, direct.bank.embeddings, rtol=2 ** -10, atol=2 ** -24)


# ------------------------------------------------------------------ freezing timm/ towers (timm models used directly)

@pytest.fixture(scope="module")
def timm_towers():
    from edgeretina.training.factory import build_backbone

    torch.manual_seed(0)
    return {name: build_backbone(BackboneConfig(name=f"timm/{name}", image_size=64)).visual
            for name in ("test_vit", "test_resnet")}


def _trainable_names(backbone) -> set[str]:
    return {name for name, p in backbone.visual.named_parameters() if p.requires_grad}


def _top_level(names) -> set[str]:
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_a_timm_tower_frozen_whole_trains_nothing_and_stays_in_eval(timm_towers, name):
    from edgeretina.training.freezing import freeze_backbone, keep_frozen_in_eval

    backbone = timm_towers[name]
    try:
        plan = freeze_backbone(backbone, 0)
        assert plan.backbone_frozen and plan.total_blocks == _BLOCKS[name] and _trainable_names(backbone) == set()
        backbone.train()
        keep_frozen_in_eval(plan)
        assert not any(m.training for m in backbone.visual.modules())
    finally:
        freeze_backbone(backbone, None)
        backbone.train()


# the trained parts with trainable_blocks=1: the last block and the parameters after it
_LAST_BLOCK_AND_HEAD = {"test_vit": ({"blocks.5", "norm", "fc_norm", "head"}, {"patch_embed", "cls_token", "pos_embed"}),
                        "test_resnet": ({"layer4", "fc"}, {"conv1", "bn1", "layer1", "layer3"})}
_BLOCKS = {"test_vit": 6, "test_resnet": 4}


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_a_timm_tower_trains_its_last_block_and_head_and_keeps_the_rest_in_eval(timm_towers, name):
    from edgeretina.training.freezing import freeze_backbone, keep_frozen_in_eval

    backbone = timm_towers[name]
    tower = backbone.visual
    trained_prefixes, frozen_parts = _LAST_BLOCK_AND_HEAD[name]
    try:
        plan = freeze_backbone(backbone, 1)
        trainable = _trainable_names(backbone)
        assert trainable and 0 < plan.trainable_backbone_parameters < plan.backbone_parameters
        expected = {n for n, _ in tower.named_parameters() if n.startswith(tuple(p + "." for p in trained_prefixes))
                    or n in trained_prefixes}
        assert trainable == expected
        assert not frozen_parts & _top_level(trainable)
        backbone.train()
        keep_frozen_in_eval(plan)
        last_block = tower.blocks[-1] if name == "test_vit" else tower.layer4
        assert last_block.training and all(m.training for m in last_block.modules())
        for part in frozen_parts - {"cls_token", "pos_embed"}:
            assert not any(m.training for m in getattr(tower, part).modules()), part
        assert freeze_backbone(backbone, _BLOCKS[name]).fine_tunes_everything
    finally:
        freeze_backbone(backbone, None)
        backbone.train()


def test_towers_of_unknown_blocks_freeze_whole_and_are_named_by_module_when_refused():
    from types import SimpleNamespace

    from edgeretina.training.freezing import freeze_backbone

    backbone = SimpleNamespace(visual=torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    assert freeze_backbone(backbone, 0).backbone_frozen
    with pytest.raises(ConfigError, match=r"torch\.nn\.modules\.container\.Sequential tower"):
        freeze_backbone(backbone, 1)


def test_structured_pruning_names_a_timm_vision_transformer_by_module(timm_towers):
    from types import SimpleNamespace

    from edgeretina.training.prune import ChannelPruning, prune_structure

    with pytest.raises(ConfigError, match=r"not timm\.models\.vision_transformer\.VisionTransformer"):
        prune_structure(SimpleNamespace(backbone=timm_towers["test_vit"]), ChannelPruning(mlp_ratio=0.5))
