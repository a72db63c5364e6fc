"""Multi-process training: `torchrun --nproc_per_node 2 --standalone -m edgeretina train ...` on gloo (CPU).

Two real torchrun runs on 40 phantom photographs of 64 px, tiny-rn at 64 px, 2 epochs, one thread per
process (~20 s each here, most of it two interpreters importing torch and open_clip):
- fine-tuning everything with augmentation: it completes, rank 0 alone prints and writes, and the checkpoint
  loads and grades like a one-process checkpoint;
- a frozen backbone without augmentation, 1 image of each grade per batch (5 images: shares of 3 and 2):
  nothing differs between processes but the split of each batch, so the 2-process run must end with the
  weights of the 1-process run — the shares are disjoint and complete and the loss weighting makes DDP's
  gradient the whole batch's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeretina.dataset import read_labels
from edgeretina.training.checkpoint import load_checkpoint
from edgeretina.training.data import prepare_images
from edgeretina.training.distributed import DistributedContext, init_from_env, loss_weight, rank_share

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--image-size", "64", "--epochs", "2", "--threads", "1", "--batch-size", "10", "--precision", "fp32"]


@pytest.fixture(scope="module")
def phantom40(tmp_path_factory):
    from edgeretina.phantom import PhantomConfig, generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("ddp40"), n=40, seed=5, config=PhantomConfig(size=64), workers=1)


def _torchrun(labels: Path, out: Path, *options: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "edgeretina", "train", str(labels), "--out", str(out), *COMMON, *options]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150, cwd=out.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _grades_a_few(ckpt, labels: Path) -> dict[str, np.ndarray]:
    from edgeretina.training.loop import predict

    prepared = prepare_images(read_labels(labels)[:4], ckpt.preprocess, workers=1)
    return predict(ckpt.model, prepared.images, ckpt.preprocess)


def test_torchrun_trains_and_rank_zero_writes_a_checkpoint_that_grades(phantom40, tmp_path):
    done = _torchrun(phantom40, tmp_path / "ddp.pt")
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and printed[0]["checkpoint"] == str(tmp_path / "ddp.pt")    # rank 0 alone
    assert done.stderr.count("distributed: 2 processes, backend gloo") == 1
    assert done.stderr.count("epoch 2:") == 1
    ckpt = load_checkpoint(tmp_path / "ddp.pt")
    assert ckpt.summary["schedule"]["processes"] == 2 and ckpt.summary["schedule"]["epochs_run"] == 2
    assert ckpt.summary["stopped"]["reason"] == "completed"
    assert ckpt.bank is not None and len(ckpt.bank.case_ids) == ckpt.summary["train"]["n"]
    assert not (tmp_path / "ddp.resume.pt").exists()
    out = _grades_a_few(ckpt, phantom40)
    assert out["ordinal_logits"].shape == (4, 4) and np.isfinite(out["ordinal_logits"]).all()
    assert out["saliency"].shape[0] == 4


def test_two_processes_train_what_one_process_trains(phantom40, tmp_path):
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.loop import TrainConfig, train
    from edgeretina.training.model import ModelConfig

    options = ["--no-augment", "--trainable-blocks", "0", "--per-grade", "1"]
    _torchrun(phantom40, tmp_path / "two.pt", *options)
    one = train(TrainConfig(data=phantom40, out=tmp_path / "one.pt", epochs=2, batch_size=10, per_grade=1,
                            threads=1, workers=1, precision="fp32", augment=False, trainable_blocks=0,
                            model=ModelConfig(backbone=BackboneConfig(name="edgeretina-tiny-rn", image_size=64))),
                log=lambda _: None, show_progress=False)
    two, one = load_checkpoint(tmp_path / "two.pt"), load_checkpoint(one.checkpoint)
    assert two.summary["schedule"]["feature_cache"] and two.summary["schedule"]["batch"] == 5
    a, b = one.model.state_dict(), two.model.state_dict()
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()) < 1e-5
    for x, y in zip(one.summary["history"], two.summary["history"], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)         # all-reduced: the whole batch's mean
    np.testing.assert_allclose(_grades_a_few(two, phantom40)["ordinal_logits"],
                               _grades_a_few(one, phantom40)["ordinal_logits"], atol=1e-5)


def test_rank_shares_are_disjoint_and_cover_the_batch():
    batch = np.arange(100, 107)
    shares = [rank_share(batch, DistributedContext(rank=r, world_size=3)) for r in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == batch.tolist()
    assert [len(s) for s in shares] == [3, 2, 2]
    # each share's mean loss, weighted, averaged over the processes (DDP) = the batch's mean
    losses = np.random.default_rng(0).random(7)
    weighted = [loss_weight(len(s), 7, DistributedContext(rank=r, world_size=3)) * losses[s - 100].mean()
                for r, s in enumerate(shares)]
    assert np.mean(weighted) == pytest.approx(losses.mean())
    assert rank_share(batch, DistributedContext()) is batch and loss_weight(3, 7, DistributedContext()) == 1.0


def test_without_torchrun_there_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_from_env()
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main, ctx.owns_group) == (0, 1, None, True, False)
    monkeypatch.setenv("WORLD_SIZE", "two")
    from edgeretina.errors import ConfigError
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        init_from_env()
