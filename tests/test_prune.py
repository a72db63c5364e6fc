"""Structured pruning and 2:4 sparsity: real open_clip towers, real ONNX export and onnxruntime."""

import json

import numpy as np
import pytest
import torch

from edgeretina.bundle import load_bundle
from edgeretina.errors import ConfigError
from edgeretina.export import ExportConfig, export
from edgeretina.export import targets as targets_module
from edgeretina.export.bank import write_bank
from edgeretina.export.onnx_steps import check_onnx, export_onnx_fp32, ship_onnx
from edgeretina.export.prune import PruneConfig, make_prune_step
from edgeretina.export.reference import load_reference
from edgeretina.preprocess import normalize
from edgeretina.runtime.backends import create_runner
from edgeretina.training.checkpoint import load_checkpoint
from edgeretina.training.loop import predict, predict_normalized
from edgeretina.training.prune import (ChannelPruning, DistillConfig, apply_24_sparsity, count_macs, count_parameters,
                                       is_24_sparse, prune_structure, recalibrate_batchnorm, sparsity_targets)

VIT_TOKENS, VIT_WIDTH, VIT_HIDDEN, VIT_LAYERS = 17, 192, 768, 6    # tiny ViT at 64 px: 4x4 patches + class


def test_vit_mlp_pruning_removes_the_expected_compute(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint.checkpoint).model.eval()
    x = torch.randn(2, 3, 64, 64)
    shapes = {k: v.shape for k, v in model(x).items()}
    params, macs = count_parameters(model), count_macs(model, 64)
    prune_structure(model, ChannelPruning(mlp_ratio=0.5))
    kept = VIT_HIDDEN // 2
    removed = VIT_HIDDEN - kept
    assert params - count_parameters(model) == VIT_LAYERS * removed * (VIT_WIDTH + 1 + VIT_WIDTH)
    assert macs - count_macs(model, 64) == VIT_LAYERS * VIT_TOKENS * 2 * VIT_WIDTH * removed
    assert all(b.mlp.c_fc.out_features == kept for b in model.backbone.visual.transformer.resblocks)
    assert {k: v.shape for k, v in model(x).items()} == shapes


def test_resnet_bottleneck_pruning_removes_the_expected_compute(tiny_rn_checkpoint):
    from open_clip.modified_resnet import Bottleneck

    model = load_checkpoint(tiny_rn_checkpoint).model.eval()
    x = torch.randn(2, 3, 64, 64)
    shapes = {k: v.shape for k, v in model(x).items()}
    blocks = [(b.conv1.in_channels, b.conv1.out_channels) for b in model.modules() if isinstance(b, Bottleneck)]
    params, macs = count_parameters(model), count_macs(model, 64)
    structure = prune_structure(model, ChannelPruning(conv_ratio=0.5))
    # conv1 (in x p), conv2 (3x3, p x p), conv3 (p x 4p), bn1 + bn2 (weight and bias)
    expected = sum(cin * (p - p // 2) + 9 * (p * p - (p // 2) ** 2) + 4 * p * (p - p // 2) + 4 * (p - p // 2)
                   for cin, p in blocks)
    assert params - count_parameters(model) == expected
    assert [b["inner"] for b in structure["blocks"]] == [[p, p // 2] for _, p in blocks]
    assert count_macs(model, 64) < 0.75 * macs
    assert {k: v.shape for k, v in model(x).items()} == shapes


def test_24_masks_zero_two_of_every_four_input_weights():
    conv = torch.nn.Conv2d(8, 4, 3)
    linear = torch.nn.Linear(12, 5)
    block = torch.nn.Sequential(conv, torch.nn.Flatten(), linear)
    masks = apply_24_sparsity(block)
    assert set(masks) == {"0.weight", "2.weight"}
    assert is_24_sparse(conv.weight) and is_24_sparse(linear.weight)
    assert not is_24_sparse(conv.weight.permute(1, 0, 2, 3).reshape(4, 8, 3, 3) + 1.0)
    # along the input dimension: conv groups are 4 input channels at one (out, kh, kw) position
    groups = conv.weight.permute(0, 2, 3, 1).reshape(-1, 4)
    assert ((groups == 0).sum(dim=1) == 2).all()


def _prune_export(checkpoint, out, reference, prune_config, monkeypatch, gate="fail", log=lambda _: None):
    """Export with the given pruning options (the shipped `--prune` path, with defaults, is in
    test_cli_export.py); the pruned torch model and the reference inputs are captured for comparison."""
    captured = []
    steps = [load_reference, make_prune_step(prune_config),
             lambda ctx: captured.append((ctx.checkpoint.model, ctx.reference_inputs)),
             export_onnx_fp32, check_onnx, targets_module.gate_onnx_fp32, ship_onnx, write_bank]
    monkeypatch.setitem(targets_module.TARGETS, "onnx", steps)
    bundle = export(ExportConfig(checkpoint=checkpoint, out=out, reference_images=reference, reference_count=8,
                                 gate=gate), log=log)
    return bundle, captured[0]


def _check_bundle_matches_pruned_model(bundle, model, inputs):
    expected = predict_normalized(model, inputs)
    got = create_runner("onnxruntime", bundle / "model.onnx").run(inputs)
    for name in ("ordinal_logits", "embedding", "saliency"):
        np.testing.assert_allclose(got[name], expected[name], atol=2e-4, rtol=1e-3, err_msg=name)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["export"]["gate"]["onnx-fp32"]["passed"] is True
    return manifest["export"]["pruning"]


def test_pruned_vit_with_24_sparsity_exports_and_records(tiny_checkpoint, phantom_test, tmp_path, monkeypatch):
    config = PruneConfig(mlp_ratio=0.5, semi_structured_24=True, recovery_steps=8, recovery_images=8, batch_size=4)
    bundle, (model, inputs) = _prune_export(tiny_checkpoint.checkpoint, tmp_path / "vit", phantom_test, config,
                                            monkeypatch, gate="warn")
    info = _check_bundle_matches_pruned_model(bundle, model, inputs)
    load_bundle(bundle)
    assert info["params"]["after"] < info["params"]["before"]
    assert info["macs"]["after"] < 0.75 * info["macs"]["before"]
    assert info["onnx_bytes"]["after"] < 0.8 * info["onnx_bytes"]["before"]
    # the masks survived the fine-tune: every sparsified weight still has >= 2 zeros per group of 4
    targets = sparsity_targets(model.backbone)
    assert len(targets) >= 4 * VIT_LAYERS and all(is_24_sparse(w) for w in targets.values())
    assert info["sparsity_24"]["satisfied"] == info["sparsity_24"]["layers"] == sorted(targets)
    assert info["recovery"]["loss_last"] < info["recovery"]["loss_first"]
    # Fidelity to the unpruned model is gated (recorded under "pruned") and kept before/after recovery. The
    # representation checks pass clearly (x86-avx2: embedding cosine 0.953 vs 0.9, saliency 0.998 vs 0.7, knn
    # 0.71 vs 0.5). The grade checks are not asserted: the two-epoch ViT's logits sit within ~0.1 of its
    # thresholds, so 2:4 sparsity moves grades by the fixture (agreement 1.0 on the standard-framing phantoms,
    # 0.25 once the framing presets joined the camera mix). Warn mode records the outcome either way.
    gate = json.loads((bundle / "manifest.json").read_text())["export"]["gate"]["pruned"]
    assert gate["mode"] == "warn" and gate["passed"] == all(c["passed"] for c in gate["checks"].values())
    assert all(gate["checks"][name]["passed"] for name in ("embedding_cosine", "saliency_correlation", "knn_overlap"))
    fidelity = info["fidelity"]["after_recovery"]
    assert {"grade_agreement", "embedding_cosine", "saliency_correlation"} <= set(fidelity)
    assert fidelity["embedding_cosine"] >= info["fidelity"]["before_recovery"]["embedding_cosine"] - 1e-3


def test_pruned_resnet_exports_and_matches_onnxruntime(tiny_rn_checkpoint, phantom_test, tmp_path, monkeypatch):
    config = PruneConfig(conv_ratio=0.5, recovery_steps=5, recovery_images=8, batch_size=4)
    lines = []
    bundle, (model, inputs) = _prune_export(tiny_rn_checkpoint, tmp_path / "rn", phantom_test, config,
                                            monkeypatch, gate="warn", log=lines.append)
    info = _check_bundle_matches_pruned_model(bundle, model, inputs)
    assert info["structure"]["kind"] == "resnet-bottleneck"
    assert info["params"]["after"] < info["params"]["before"]
    assert info["onnx_bytes"]["after"] < info["onnx_bytes"]["before"]
    # Halving a one-epoch ResNet's bottlenecks with 5 recovery steps moves its embedding and saliency far
    # from the unpruned model's (x86-avx2: cosine 0.51 vs 0.9 needed, saliency 0.20 vs 0.7): warn mode
    # records the failure, says so, and ships the pruned export, which still matches its own torch model.
    gate = json.loads((bundle / "manifest.json").read_text())["export"]["gate"]["pruned"]
    assert gate["mode"] == "warn" and gate["passed"] is False
    assert gate["checks"]["embedding_cosine"]["passed"] is False
    assert gate["checks"]["saliency_correlation"]["passed"] is False
    assert "gate failed for pruned, continuing because --gate warn" in lines


def test_prune_config_is_validated():
    with pytest.raises(ConfigError):
        PruneConfig(mlp_ratio=0.0)
    with pytest.raises(ConfigError):
        PruneConfig(recovery_steps=-1)
    with pytest.raises(ConfigError):
        PruneConfig(recovery_images=0)
    with pytest.raises(ConfigError):
        ChannelPruning(conv_ratio=1.5)
    with pytest.raises(ConfigError):
        DistillConfig(lr=0.0)
    config = PruneConfig(mlp_ratio=0.25, recovery_steps=3, batch_size=2, lr=1e-3)
    assert config.channels == ChannelPruning(mlp_ratio=0.25, conv_ratio=0.5)
    assert config.distillation == DistillConfig(steps=3, batch_size=2, lr=1e-3)
    assert set(config.to_dict()) == {"mlp_ratio", "conv_ratio", "semi_structured_24", "recovery_steps",
                                     "recovery_images", "batch_size", "lr"}


def test_predict_normalized_is_predict_on_normalised_inputs(tiny_checkpoint):
    """One owner for running the model over a set: the pruning step's reference outputs are loop.predict's."""
    ckpt = load_checkpoint(tiny_checkpoint.checkpoint)
    size = ckpt.preprocess.image_size
    images = np.random.default_rng(0).integers(0, 256, (5, size, size, 3), dtype=np.uint8)
    expected = predict(ckpt.model, images, ckpt.preprocess, batch_size=2)
    got = predict_normalized(ckpt.model, normalize(images, ckpt.preprocess), batch_size=3)
    assert set(got) == set(expected) == set(ckpt.model.output_names)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5, rtol=1e-4, err_msg=name)


def test_batchnorm_recalibration_skips_a_model_without_batchnorm():
    calls = []
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.register_forward_hook(lambda *_: calls.append(1))
    recalibrate_batchnorm(model, torch.zeros(6, 4), batch_size=2)
    assert calls == []
    with_bn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    recalibrate_batchnorm(with_bn, torch.randn(6, 3, 2, 2) + 5.0, batch_size=4)
    assert not with_bn.training and with_bn[1].running_mean.abs().sum() > 0
