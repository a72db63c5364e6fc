"""Training is shown to learn (and to be reproducible), the loop's model selection, time budget and
`val_labels` do what they say, and every error branch of dataset.read_labels names its problem.

Everything is tiny: 64 px phantom photographs (48 to train, 24 held out), the tiny ViT preset at 64 px.

What "learns" can mean at this size (measured on this shared 2-core box; tiny ViT from random init,
64 px, batch 16, lr 1e-3): the training loss falls, clearly and for every seed, but nothing measured on
held-out photographs improves over the untrained model within seconds of training:
- held-out QWK / accuracy (thresholds 0, and calibrated): 0.0 / -0.13 / 0.18 trained vs -0.06 / 0.0
  untrained over seeds 0, 1 and 4-15 epochs, 60 train / 40 held-out; any-DR AUC 0.37-0.51 either way;
  a 0-vs-4-only, ideal-camera phantom set: held-out AUC 0.72-0.74 trained vs 0.28-0.66 untrained (too
  uneven to assert); 96/128 px phantoms (128 px input: 57 s per run) no better;
- held-out grader_loss (eval mode, no augmentation), 48 train / 24 held-out, 6 epochs, seeds 0/1/2:
  untrained 1.617 / 1.736 / 1.829, trained 2.051 / 1.926 / 1.608 (worse for two seeds);
- epoch-mean training loss, same runs: 2.035 -> 1.565, 1.948 -> 1.482, 1.884 -> 1.580 (first epoch ->
  min of the last two: ratios 0.77, 0.76, 0.80), which is what the learning test asserts (< 0.9).
A held-out improvement needs more data, pixels or epochs than a 90 s file on 2 cores allows; the
fastest settings measured are those above (6 epochs of 48 images: ~2-5 s uncontended).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeretina.dataset import read_labels
from edgeretina.errors import DatasetError
from edgeretina.training.backbone import BackboneConfig
from edgeretina.training.checkpoint import load_checkpoint
from edgeretina.training.model import GraderModel, ModelConfig

MODEL = ModelConfig(backbone=BackboneConfig(image_size=64))
EPOCHS = 6
SEED = 0


def _quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def small_train(tmp_path_factory):
    from edgeretina.phantom import PhantomConfig, generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("learn_train"), n=48, seed=31,
                            config=PhantomConfig(size=64), workers=1)


@pytest.fixture(scope="module")
def small_heldout(tmp_path_factory):
    from edgeretina.phantom import PhantomConfig, generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("learn_heldout"), n=24, seed=32,
                            config=PhantomConfig(size=64), workers=1)


def _config(labels, out, **overrides):
    from edgeretina.training.loop import TrainConfig

    settings = dict(labels=labels, out=out, epochs=EPOCHS, batch_size=16, val_fraction=0.2, lr=1e-3,
                    seed=SEED, model=MODEL, workers=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def _train(config):
    from edgeretina.training.loop import train

    return load_checkpoint(train(config, log=_quiet, show_progress=False).checkpoint)


@pytest.fixture(scope="module")
def learned(small_train, tmp_path_factory):
    return _train(_config(small_train, tmp_path_factory.mktemp("learned") / "a.pt"))


def test_training_lowers_the_training_loss_clearly(learned):
    """The epoch-mean loss of the last two epochs sits clearly below the first epoch's (measured ratios
    0.77 / 0.76 / 0.80 for seeds 0 / 1 / 2; a broken update, lr 0 or no optimizer step, stays near 1).
    The held-out loss is reported, not asserted: it does not improve at this size (module docstring)."""
    torch.manual_seed(SEED)
    untrained = GraderModel(MODEL)
    assert torch.equal(untrained.grade_prototypes, learned.model.grade_prototypes)   # the start train() used
    history = [epoch["loss"]["total"] for epoch in learned.summary["history"]]
    assert len(history) == EPOCHS
    assert min(history[-2:]) < 0.9 * history[0], history
    assert any(not torch.equal(v, untrained.state_dict()[k]) for k, v in learned.model.state_dict().items())


def test_same_seed_gives_the_same_training_run(learned, small_train, tmp_path):
    again = _train(_config(small_train, tmp_path / "b.pt"))
    first = [epoch["loss"]["total"] for epoch in learned.summary["history"]]
    second = [epoch["loss"]["total"] for epoch in again.summary["history"]]
    np.testing.assert_allclose(second, first, rtol=0, atol=1e-6)
    a, b = learned.model.state_dict(), again.model.state_dict()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-6


def test_checkpoint_holds_the_best_validation_epoch_not_the_last(small_train, tmp_path, monkeypatch):
    """The loop keeps the weights of the epoch with the highest validation QWK. Real QWKs of a tiny model
    are mostly 0.0 (ties), so the per-epoch QWKs are scripted (0.1, 0.9, 0.2) and the weights after each
    epoch recorded: the checkpoint must hold epoch 2's."""
    from edgeretina.training import loop

    scripted = iter([0.1, 0.9, 0.2])
    real_report, real_epoch = loop.grading_report, loop._train_epoch
    calls = {"n": 0}

    def report(y_true, y_pred, *args, **kwargs):
        calls["n"] += 1
        result = real_report(y_true, y_pred, *args, **kwargs)
        if calls["n"] <= 3:                      # the three per-epoch reports; the 4th is after calibration
            result = {**result, "qwk": next(scripted)}
        return result

    states = []

    def epoch(model, *args, **kwargs):
        losses = real_epoch(model, *args, **kwargs)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return losses

    monkeypatch.setattr(loop, "grading_report", report)
    monkeypatch.setattr(loop, "_train_epoch", epoch)
    ckpt = _train(_config(small_train, tmp_path / "best.pt", epochs=3))
    assert [e["val_qwk"] for e in ckpt.summary["history"]] == [0.1, 0.9, 0.2]
    saved = ckpt.model.state_dict()
    differs = lambda state: any(not torch.equal(saved[k], state[k]) for k in state)   # noqa: E731
    assert len(states) == 3
    assert not differs(states[1])
    assert differs(states[2]) and differs(states[0])


def test_time_budget_stops_training_after_the_first_epoch(small_train, tmp_path):
    """max_minutes=1e-6 (60 microseconds) is spent before the first epoch ends, whatever the CPU: the
    loop trains that one epoch (the minimum), says so, and records one epoch of the five planned."""
    from edgeretina.training.loop import train

    messages = []
    result = train(_config(small_train, tmp_path / "budget.pt", epochs=5, max_minutes=1e-6),
                   log=messages.append, show_progress=False)
    summary = load_checkpoint(result.checkpoint).summary
    assert summary["schedule"]["epochs_run"] == 1
    assert [e["epoch"] for e in summary["history"]] == [1]
    assert "time budget of 1e-06 min: training 1 of 5 epochs" in messages
    assert "time budget of 1e-06 min reached after epoch 1" in messages


def test_val_labels_are_the_validation_set_and_all_of_labels_trains(small_train, small_heldout, tmp_path):
    ckpt = _train(_config(small_train, tmp_path / "val.pt", epochs=1, val_labels=small_heldout))
    heldout = read_labels(small_heldout)
    train_items = read_labels(small_train)
    counts = np.bincount([item.grade for item in heldout], minlength=5).tolist()
    assert ckpt.summary["val"] == {"n": 24, "grade_counts": counts}
    assert ckpt.summary["train"]["n"] == len(train_items) == 48          # no split taken from labels
    assert ckpt.summary["train"]["labels"] == str(small_train)
    assert ckpt.bank is not None and sorted(ckpt.bank.case_ids) == sorted(i.case_id for i in train_items)


# ---------------------------------------------------------------- dataset.read_labels error branches

def _write(folder, text: str | bytes, image: bool = True):
    if image:
        (folder / "a.png").write_bytes(b"not decoded by read_labels")
    path = folder / "labels.csv"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text, message", [
    ("path,case_id\na.png,x\n", r"labels\.csv: missing column\(s\) grade$"),
    ("case_id,grade\nx,1\n", r"labels\.csv: missing column\(s\) path$"),
    ("case_id\nx\n", r"missing column\(s\) path, grade$"),
    ("", r"missing column\(s\) path, grade$"),                                  # no header at all
    ("path,grade\n", r"labels\.csv: no rows$"),
    ("path,grade\na.png,1\na.png,two\n", r"labels\.csv:3: grade 'two' is not an integer"),
    ("path,grade\na.png,\n", r"labels\.csv:2: grade '' is not an integer"),
    ("path,grade\na.png\n", r"labels\.csv:2: grade None is not an integer"),   # short row
    ("path,grade\na.png,1.5\n", r"labels\.csv:2: grade '1\.5' is not an integer"),
    ("path,grade\na.png,5\n", r"labels\.csv:2: grade 5 outside 0\.\.4"),
    ("path,grade\na.png,-1\n", r"labels\.csv:2: grade -1 outside 0\.\.4"),
    ("path,grade\na.png,0\nmissing.png,4\n", r"labels\.csv:3: image not found: .*missing\.png"),
], ids=["no-grade-column", "no-path-column", "no-columns", "empty-file", "no-rows", "grade-word",
        "grade-empty", "grade-absent", "grade-float", "grade-above-4", "grade-negative", "image-missing"])
def test_read_labels_names_each_problem(tmp_path, text, message):
    with pytest.raises(DatasetError, match=message):
        read_labels(_write(tmp_path, text))


def test_read_labels_missing_file_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match=r"labels file not found: .*nothing\.csv"):
        read_labels(tmp_path / "nothing.csv")
    with pytest.raises(DatasetError, match="labels file not found"):   # a folder is not a labels file
        read_labels(tmp_path)


def test_read_labels_without_file_check_accepts_a_missing_image(tmp_path):
    """The image-exists branch is the only one check_files switches off."""
    items = read_labels(_write(tmp_path, "path,grade,case_id\nmissing.png,4,\n", image=False), check_files=False)
    assert [(i.path, i.case_id, i.grade) for i in items] == [((tmp_path / "missing.png").resolve(), "missing", 4)]
    with pytest.raises(DatasetError, match="outside 0..4"):
        read_labels(_write(tmp_path, "path,grade\nmissing.png,7\n", image=False), check_files=False)


def test_read_labels_short_row_without_path_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match=r"labels\.csv:2: no image path"):
        read_labels(_write(tmp_path, "grade,path\n2\n"))


def test_read_labels_non_utf8_file_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match=r"labels\.csv is not UTF-8 text"):
        read_labels(_write(tmp_path, b"path,grade\n\xe9.png,2\n"))
