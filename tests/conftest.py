"""Shared fixtures: one tiny phantom dataset, one tiny trained model and its bundle per test session.

Everything is real (open_clip tower, torch training, ONNX export, onnxruntime) but tiny: 64 px input,
a few dozen phantom photographs, two epochs.
"""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# On-device verification results are cached per user; the suite keeps its own (fresh every run).
os.environ["EDGERETINA_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgeretina-test-cache-")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("EDGERETINA_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow test: set EDGERETINA_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def torch_threads_restored():
    """For a test that sets torch's process-wide thread count itself (train() puts the caller's back on its
    own): later tests get theirs back."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def phantom_train(tmp_path_factory):
    from edgeretina.phantom import PhantomConfig, generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("phantom_train"), n=60, seed=11,
                            config=PhantomConfig(size=192), workers=2)


@pytest.fixture(scope="session")
def phantom_test(tmp_path_factory):
    from edgeretina.phantom import PhantomConfig, generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("phantom_test"), n=12, seed=12,
                            config=PhantomConfig(size=192), workers=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(phantom_train, tmp_path_factory):
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.loop import TrainConfig, train
    from edgeretina.training.model import ModelConfig

    out = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    # lr 1e-4: at 1e-3 the tiny ViT's embeddings collapse (mean pairwise cosine 0.997, top-10 neighbours
    # 6e-6 apart: ties any change of float kernels reorders); at 1e-4 they keep their spread (0.969, 2e-4)
    config = TrainConfig(data=phantom_train, out=out, epochs=2, batch_size=16, val_fraction=0.2, lr=1e-4,
                         model=ModelConfig(backbone=BackboneConfig(image_size=64)), workers=1)
    return train(config, log=lambda _: None, show_progress=False)


@pytest.fixture(scope="session")
def tiny_rn_checkpoint(phantom_train, tmp_path_factory):
    """The demo's tower (a tiny CLIP ModifiedResNet) after one epoch: the CNN routes of pruning and INT8."""
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.loop import TrainConfig, train
    from edgeretina.training.model import ModelConfig

    out = tmp_path_factory.mktemp("rn") / "checkpoint.pt"
    config = TrainConfig(data=phantom_train, out=out, epochs=1, batch_size=16, val_fraction=0.2, workers=1,
                         model=ModelConfig(backbone=BackboneConfig(name="edgeretina-tiny-rn", image_size=64)))
    return train(config, log=lambda _: None, show_progress=False).checkpoint


@pytest.fixture(scope="session")
def onnx_bundle(tiny_checkpoint, phantom_test, tmp_path_factory):
    from edgeretina.export import ExportConfig, export

    out = tmp_path_factory.mktemp("bundles") / "tiny-onnx"
    return export(ExportConfig(checkpoint=tiny_checkpoint.checkpoint, out=out, reference_images=phantom_test,
                               reference_count=8), log=lambda _: None)


@pytest.fixture
def cli():
    """Run `edgeretina ARGS...` in this process: (exit code, stdout, stderr) (tests/_cli.py)."""
    from _cli import run_cli

    return run_cli


@pytest.fixture
def insert_step(monkeypatch):
    """insert_step(target, after, step): run `step` right after `after` in a target, for this test only
    (how the gate tests break an artifact on purpose)."""
    from edgeretina.export import targets

    def insert(target: str, after, step) -> None:
        steps = list(targets.TARGETS[target])
        steps.insert(steps.index(after) + 1, step)
        monkeypatch.setitem(targets.TARGETS, target, steps)

    return insert
