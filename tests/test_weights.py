"""Local weight files: timm and open_clip state dicts, safetensors, wrapped checkpoints, exact fit or an error."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

from edgeretina.errors import CheckpointError  # noqa: E402
from edgeretina.training.backbone import BackboneConfig  # noqa: E402
from edgeretina.training.factory import build_backbone, register_presets  # noqa: E402
from edgeretina.training.weights import read_state_dict  # noqa: E402


def _timm_source(name: str = "test_vit", **kwargs):
    torch.manual_seed(123)
    return timm.create_model(name, **kwargs).eval()


def _pre_logits(model, x):
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _pooled(backbone, x):
    with torch.no_grad():
        return backbone.eval()(x)[0]


def _x(size: int = 160) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(7))


def _build(path, name: str = "timm/test_vit", image_size: int | None = None):
    torch.manual_seed(999)  # another random init than the source: equal outputs mean the weights loaded
    return build_backbone(BackboneConfig(name, pretrained=str(path), image_size=image_size)).visual


def test_a_timm_state_dict_loads_into_its_tower(tmp_path):
    source = _timm_source(num_classes=0)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    torch.testing.assert_close(_pooled(_build(path), _x()), _pre_logits(source, _x()))


def test_a_safetensors_file_loads(tmp_path):
    from safetensors.torch import save_file

    source = _timm_source("test_resnet", num_classes=0)
    path = tmp_path / "resnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    torch.testing.assert_close(_pooled(_build(path, "timm/test_resnet"), _x()), _pre_logits(source, _x()))


@pytest.mark.parametrize("wrap", ["model", "state_dict"])
def test_wrapped_checkpoints_with_module_prefixes_and_a_classifier_head_load(tmp_path, wrap):
    """RETFound's and MAE's {"model": ...}, a training run's {"state_dict": ...}, DDP's module. prefix, and a
    classifier head (here 5 classes) the num_classes=0 tower does not have: the head is dropped, nothing else."""
    source = _timm_source(num_classes=5)
    assert "head.weight" in source.state_dict()
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({wrap: state, "epoch": 7, "optimizer": {"lr": 0.1}}, path)
    torch.testing.assert_close(_pooled(_build(path), _x()), _pre_logits(source, _x()))


def test_position_embeddings_are_resampled_to_the_towers_grid(tmp_path):
    from timm.layers import resample_abs_pos_embed

    source = _timm_source(num_classes=0)              # 160 px: a 10x10 grid
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    backbone = _build(path, image_size=64)           # 4x4
    assert backbone.grid_size == (4, 4)
    tower = backbone.visual
    torch.testing.assert_close(tower.patch_embed.proj.weight, source.patch_embed.proj.weight)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=(4, 4), old_size=(10, 10),
                                      num_prefix_tokens=1)
    torch.testing.assert_close(tower.pos_embed.detach(), expected)


def test_weights_of_another_architecture_are_an_error_listing_the_keys(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(_timm_source("test_resnet", num_classes=0).state_dict(), path)
    with pytest.raises(CheckpointError) as caught:
        _build(path, "timm/test_vit")
    message = str(caught.value)
    assert f"weights {path} do not fit timm/test_vit" in message
    missing = len(timm.create_model("test_vit", num_classes=0).state_dict())
    assert f"{missing} missing (cls_token, pos_embed, patch_embed.proj.weight" in message
    assert "unexpected (conv1.0.weight" in message and "they look like a ResNet with blocks [1, 1, 1, 1]" in message


def test_a_wider_model_of_the_same_family_is_an_error_listing_shapes(tmp_path):
    path = tmp_path / "vit3.pth"
    torch.save(_timm_source("test_vit3", num_classes=0).state_dict(), path)     # width 96, depth 9, MAP head
    with pytest.raises(CheckpointError) as caught:
        _build(path, "timm/test_vit")
    assert "of another shape (pos_embed (1, 101, 96) vs (1, 101, 64), patch_embed.proj.weight" in str(caught.value)
    assert "a timm-layout ViT (width 96, depth 9, patch 16)" in str(caught.value)


def test_one_extra_or_one_missing_key_is_an_error(tmp_path):
    state = _timm_source(num_classes=0).state_dict()
    extra, short = tmp_path / "extra.pth", tmp_path / "short.pth"
    torch.save({**state, "decoder_embed.weight": torch.zeros(4, 4)}, extra)
    torch.save({k: v for k, v in state.items() if k != "norm.weight"}, short)
    with pytest.raises(CheckpointError, match=r"1 unexpected \(decoder_embed\.weight\).*MAE pretraining"):
        _build(extra)
    with pytest.raises(CheckpointError, match=r"1 missing \(norm\.weight\)"):
        _build(short)


def test_unreadable_files_and_non_state_dicts_are_checkpoint_errors(tmp_path):
    garbage, not_tensors = tmp_path / "garbage.pth", tmp_path / "numbers.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    torch.save({"lr": 0.1, "epochs": 3}, not_tensors)
    with pytest.raises(CheckpointError, match="not a readable weights file"):
        read_state_dict(garbage)
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        read_state_dict(not_tensors)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "missing.pth")


def test_open_clip_weights_load_wrapped_and_misfits_name_the_architecture(tmp_path):
    register_presets()
    torch.manual_seed(5)
    source = open_clip.create_model("edgeretina-tiny-vit").eval()
    wrapped = tmp_path / "clip.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, wrapped)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(_pooled(_build(wrapped, "edgeretina-tiny-vit"), x), source.encode_image(x))
    with pytest.raises(CheckpointError, match=r"do not fit edgeretina-tiny-rn: keys .*missing .*unexpected "
                                              r".*an open_clip CLIP model \(ViT image tower\)"):
        _build(wrapped, "edgeretina-tiny-rn")
