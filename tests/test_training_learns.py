"""Training is shown to learn on photographs it never saw (and to be reproducible), the loop's model
selection, time budget and `val_labels` do what they say, and every error branch of dataset.read_labels
names its problem.

The learning test trains the demo's tower (`edgeretina-tiny-rn`, a tiny CLIP ModifiedResNet, from random
init) at 64 px input on 96 phantom photographs of 64 px (phantom seed 11; 82 train after the 15 %
validation split), batch 8, lr 1e-3, 6 epochs (66 steps), fp32, one thread, and grades 48 held-out
phantoms (phantom seed 12) with the trained and with the untrained model (the same seed's
initialisation). A tiny ViT from random init does not get there in seconds (it stays at the class
prior, demo.py DEMO_ARCH); this ResNet does.

Measured on cpu class x86-avx2 (AMD EPYC Zen 3, 2 shared vCPUs), torch 1 thread, fp32. Held-out numbers
untrained -> trained; QWK at the CORAL rule (thresholds 0) / with the checkpoint's calibrated thresholds;
referable AUC of the "grade > 1" logit; CORAL loss (binary cross-entropy of the 4 cumulative logits):

    phantom seeds 11/12 (the test's), model seeds 0 / 1 / 2 / 3 / 4:
      QWK@0        0.0 -> 0.764 / 0.827 / 0.800 / 0.775 / 0.821   (calibrated 0.753 / 0.824 / 0.799 / 0.760 / 0.690)
      ref. AUC     0.414 / 0.645 / 0.435 / 0.374 / 0.462  ->  0.962 / 0.988 / 0.981 / 0.969 / 0.972
      CORAL loss   0.590 / 0.590 / 0.586 / 0.588 / 0.586  ->  0.393 / 0.365 / 0.377 / 0.395 / 0.374
      train loss   first epoch -> min of the last two: 1.602 -> 0.967, 1.437 -> 1.125, 1.621 -> 1.031 (seeds 0-2)
    phantom seeds 21/22, model seeds 0-4:  QWK@0 0.0 -> 0.72-0.83, ref. AUC 0.41-0.74 -> 0.92-0.98,
      CORAL loss 0.645-0.649 -> 0.36-0.43
    phantom seeds 31/32, model seeds 0-4:  QWK@0 0.0 -> 0.73-0.84, ref. AUC 0.41-0.67 -> 0.91-0.99,
      CORAL loss 0.614-0.619 -> 0.36-0.42
  Over these 15 runs: trained QWK@0 >= 0.72 (untrained always 0.0: it predicts one grade), trained AUC >=
  0.905 and at least 0.18 above the untrained one, CORAL loss ratio trained / untrained <= 0.68. The test
  asserts QWK@0 gain >= 0.4, AUC >= 0.80 and >= untrained + 0.1, loss ratio < 0.85, train-loss ratio < 0.9.

Cheaper settings measured and rejected (seeds 0-2 or 0-4, phantom seeds 11/12): batch 16 for 6 epochs
(36 steps; 64 or 128 px phantoms) reaches AUC 0.83-0.998 but held-out CORAL loss is worse than untrained
for two seeds of five; batch 16 for 4 epochs (24 steps), or 64 train photographs at batch 16, does not
learn (AUC 0.48-0.66, QWK 0.0-0.14); batch 8 for 4 epochs (44 steps) or 64 photographs at batch 8 learn,
with less margin (QWK@0 0.54-0.84, AUC 0.87-1.0). One run of the test's settings: 5-8 s of training
alone, 12-14 s with the other agents' load on both cores.

The other tests reuse the same photographs and tower (fewer epochs); everything trains with threads=1,
and train() puts the caller's thread count back.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeretina.dataset import read_labels
from edgeretina.errors import DatasetError
from edgeretina.grades import REFERABLE_MIN_GRADE, ordinal_grades
from edgeretina.metrics import quadratic_weighted_kappa, roc_auc
from edgeretina.training.backbone import BackboneConfig
from edgeretina.training.checkpoint import load_checkpoint
from edgeretina.training.data import prepare_images
from edgeretina.training.losses import coral_loss
from edgeretina.training.model import GraderModel, ModelConfig

MODEL = ModelConfig(backbone=BackboneConfig(name="edgeretina-tiny-rn", image_size=64))
EPOCHS = 6
BATCH = 8
SEED = 0
N_TRAIN, N_HELDOUT = 96, 48


def _quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def small_train(tmp_path_factory):
    from edgeretina.phantom import PhantomConfig, generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("learn_train"), n=N_TRAIN, seed=11,
                            config=PhantomConfig(size=64), workers=1)


@pytest.fixture(scope="module")
def small_heldout(tmp_path_factory):
    from edgeretina.phantom import PhantomConfig, generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("learn_heldout"), n=N_HELDOUT, seed=12,
                            config=PhantomConfig(size=64), workers=1)


def _config(labels, out, **overrides):
    from edgeretina.training.loop import TrainConfig

    settings = dict(data=labels, out=out, epochs=EPOCHS, batch_size=BATCH, lr=1e-3, seed=SEED, model=MODEL,
                    workers=1, threads=1, precision="fp32")
    settings.update(overrides)
    return TrainConfig(**settings)


def _train(config):
    from edgeretina.training.loop import train

    return load_checkpoint(train(config, log=_quiet, show_progress=False).checkpoint)


def _heldout(model, preprocess, labels, thresholds=(0.0,) * 4) -> dict:
    """The model's held-out grading, through the training package's own prepare + predict."""
    from edgeretina.training.loop import predict

    prepared = prepare_images(read_labels(labels), preprocess, workers=1)
    logits = predict(model, prepared.images, preprocess)["ordinal_logits"]
    grades = prepared.grades
    return {"logits": logits,
            "qwk": quadratic_weighted_kappa(grades, ordinal_grades(logits, list(thresholds))),
            "referable_auc": roc_auc((grades >= REFERABLE_MIN_GRADE).astype(int), logits[:, REFERABLE_MIN_GRADE - 1]),
            "coral_loss": float(coral_loss(torch.from_numpy(logits).float(), torch.from_numpy(grades)))}


@pytest.fixture(scope="module")
def learned(small_train, tmp_path_factory):
    return _train(_config(small_train, tmp_path_factory.mktemp("learned") / "a.pt"))


def test_training_beats_the_untrained_model_on_held_out_photographs(learned, small_heldout):
    """Held-out QWK, referable AUC and ordinal loss of the trained model are clearly better than those of
    the same model before training (margins from the measurements in the module docstring)."""
    torch.manual_seed(SEED)
    untrained = GraderModel(MODEL)
    assert torch.equal(untrained.grade_prototypes, learned.model.grade_prototypes)   # the start train() used
    before = _heldout(untrained, learned.preprocess, small_heldout)
    after = _heldout(learned.model, learned.preprocess, small_heldout)
    shipped = _heldout(learned.model, learned.preprocess, small_heldout, learned.grading.thresholds)
    report = {k: (round(before[k], 3), round(after[k], 3)) for k in ("qwk", "referable_auc", "coral_loss")}
    assert after["qwk"] >= before["qwk"] + 0.4, report
    assert shipped["qwk"] >= before["qwk"] + 0.4, (shipped["qwk"], report)       # with calibrated thresholds
    assert after["referable_auc"] >= 0.8 and after["referable_auc"] >= before["referable_auc"] + 0.1, report
    assert after["coral_loss"] < 0.85 * before["coral_loss"], report
    history = [epoch["loss"]["total"] for epoch in learned.summary["history"]]
    assert len(history) == EPOCHS
    assert min(history[-2:]) < 0.9 * history[0], history


def test_same_seed_gives_the_same_training_run(learned, small_train, small_heldout, tmp_path):
    again = _train(_config(small_train, tmp_path / "b.pt"))
    assert again.summary["history"] == learned.summary["history"]          # every epoch's losses and val QWK
    assert again.summary["val_metrics"] == learned.summary["val_metrics"]
    assert again.grading.thresholds == learned.grading.thresholds
    a, b = learned.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(_heldout(again.model, again.preprocess, small_heldout)["logits"],
                                  _heldout(learned.model, learned.preprocess, small_heldout)["logits"])


def test_a_different_seed_gives_a_different_run(small_train, tmp_path):
    """The seed reaches the initialisation and the batches: seeds 0 and 1 start and end apart."""
    first = _train(_config(small_train, tmp_path / "s0.pt", epochs=1))
    second = _train(_config(small_train, tmp_path / "s1.pt", epochs=1, seed=SEED + 1))
    assert first.summary["schedule"]["seed"] == SEED and second.summary["schedule"]["seed"] == SEED + 1
    assert not torch.equal(first.model.grade_prototypes, second.model.grade_prototypes)
    assert first.summary["history"][0]["loss"] != second.summary["history"][0]["loss"]


def test_checkpoint_holds_the_best_validation_epoch_not_the_last(small_train, tmp_path, monkeypatch):
    """The loop keeps the weights of the epoch with the highest validation QWK. Real QWKs are noisy and
    often tie at this size, so the per-epoch QWKs are scripted (0.1, 0.9, 0.2) and the weights after each
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
    ckpt = _train(_config(small_train, tmp_path / "val.pt", epochs=1, val_data=small_heldout))
    heldout = read_labels(small_heldout)
    train_items = read_labels(small_train)
    counts = np.bincount([item.grade for item in heldout], minlength=5).tolist()
    assert ckpt.summary["val"] == {"n": N_HELDOUT, "grade_counts": counts}
    assert ckpt.summary["train"]["n"] == len(train_items) == N_TRAIN          # no split taken from labels
    assert ckpt.summary["train"]["data"] == [f"csv:{small_train}"]
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
