"""The backbone: tower adapters, factory, shapes, joint-space equivalence with open_clip, timm towers, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from edgeretina.errors import ConfigError  # noqa: E402
from edgeretina.training.backbone import BackboneConfig, VisionBackbone  # noqa: E402
from edgeretina.training.factory import (PRESET_DIR, build_backbone, check_quick_gelu, preset_names,  # noqa: E402
                                        register_presets)

TEXTS = ["a fundus photograph of a healthy retina", "a fundus photograph with microaneurysms"]
slow = pytest.mark.skipif(os.environ.get("EDGERETINA_SLOW") != "1", reason="slow: set EDGERETINA_SLOW=1")


def _reference_and_build(name: str, image_size: int | None, texts=TEXTS):
    """open_clip's own model and our build from the same seed: the weights are identical."""
    register_presets()
    torch.manual_seed(0)
    reference = open_clip.create_model(name, force_image_size=image_size).eval()
    torch.manual_seed(0)
    build = build_backbone(BackboneConfig(name, image_size=image_size), texts)
    build.visual.eval()
    return reference, build


def _images(backbone: VisionBackbone, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, backbone.image_size, backbone.image_size, generator=torch.Generator().manual_seed(1))


# --- presets and configs -------------------------------------------------------------------------

def test_presets_register_idempotently_and_tokenize_offline():
    register_presets()
    register_presets()
    assert set(preset_names()) == {"edgeretina-tiny-vit", "edgeretina-tiny-rn"}
    assert set(preset_names()) <= set(open_clip.list_models())
    paths = getattr(open_clip.factory, "_MODEL_CONFIG_PATHS", None)
    if paths is not None:
        assert sum(1 for p in paths if str(p) == str(PRESET_DIR)) == 1
    for name in preset_names():
        tokenizer = open_clip.get_tokenizer(name)
        assert isinstance(tokenizer, open_clip.SimpleTokenizer)  # bundled BPE, no hub
        assert tuple(tokenizer(TEXTS).shape) == (2, 77)


def test_config_round_trip_and_strictness():
    config = BackboneConfig("ViT-B-16", pretrained="/weights/clip.pt", image_size=384)
    assert BackboneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert BackboneConfig.from_dict({}) == BackboneConfig()
    with pytest.raises(ConfigError, match="unknown backbone config keys"):
        BackboneConfig.from_dict({"name": "ViT-B-16", "img_size": 224})
    for bad in ({"name": ""}, {"image_size": 8}, {"image_size": True}, {"image_size": "224"}, {"pretrained": ""}):
        with pytest.raises(ConfigError):
            BackboneConfig.from_dict(bad)


def test_unsupported_tower_is_a_config_error():
    with pytest.raises(ConfigError, match="unsupported image tower Linear"):
        VisionBackbone(torch.nn.Linear(4, 4))


def test_unknown_name_lists_close_names():
    with pytest.raises(ConfigError, match="ViT-B-16"):
        build_backbone(BackboneConfig("ViT-B-61"))
    with pytest.raises(ConfigError, match="edgeretina-tiny-vit"):
        build_backbone(BackboneConfig("edgeretina-tiny-vti"))


OFFLINE_TAG_SCRIPT = """
import json, sys, time
from edgeretina.errors import ConfigError
from edgeretina.training.backbone import BackboneConfig
from edgeretina.training.factory import build_backbone
results = []
for name, tag in (("RN50-quickgelu", "openai"), ("timm/test_vit", "timm")):
    start = time.perf_counter()
    try:
        build_backbone(BackboneConfig(name, pretrained=tag))
    except ConfigError as error:
        results.append([time.perf_counter() - start, str(error)])
    else:
        sys.exit(f"no ConfigError for {name}")
print(json.dumps(results))
"""


def test_an_unreachable_hub_tag_fails_in_seconds_naming_the_fix(tmp_path):
    """Offline, open_clip's download of a tag's weights retries for ~45 s (46.7 s measured for RN50/openai, x86-avx2)
    and ends in a message about connections. The factory answers first: not cached (an empty HF_HOME) and no hub
    (HF_HUB_OFFLINE) is a ConfigError within 5 s that says how to get the weights here; timm's hub weights of a
    timm/ tower (pretrained="timm") likewise."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path),
           "TORCH_HOME": str(tmp_path / "torch")}
    done = subprocess.run([sys.executable, "-c", OFFLINE_TAG_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (clip_seconds, clip_message), (timm_seconds, timm_message) = json.loads(done.stdout.strip().splitlines()[-1])
    assert clip_seconds < 5.0 and timm_seconds < 5.0
    assert clip_message.startswith("pretrained 'openai' of 'RN50-quickgelu' is an open_clip hub tag"), clip_message
    assert "HF_HUB_OFFLINE" in clip_message and "--pretrained /path/to/" in clip_message
    assert "open_clip.create_model('RN50-quickgelu', pretrained='openai')" in clip_message
    assert timm_message.startswith("pretrained 'timm' of timm/test_vit means timm's hub weights"), timm_message
    assert "HF_HUB_OFFLINE" in timm_message and "--pretrained /path/to/" in timm_message
    assert "timm.create_model('test_vit', pretrained=True)" in timm_message


def test_openai_weights_in_a_gelu_config_are_an_error_naming_the_quickgelu_twin():
    """OpenAI's CLIP weights were trained with QuickGELU; open_clip only warns when a GELU config loads them.
    The check reads the configs only: it answers before any download (no network here)."""
    with pytest.raises(ConfigError, match=r"trained with QuickGELU, but the 'ViT-B-16' config uses GELU") as caught:
        build_backbone(BackboneConfig("ViT-B-16", pretrained="openai"))
    assert "use backbone 'ViT-B-16-quickgelu' with pretrained 'openai'" in str(caught.value)
    with pytest.raises(ConfigError, match="ViT-B-32-quickgelu"):
        check_quick_gelu("ViT-B-32", "laion400m_e31")          # LAION-400M ViT-B/32 was trained with QuickGELU
    check_quick_gelu("ViT-B-16-quickgelu", "openai")            # matching activations pass
    check_quick_gelu("ViT-B-32", "laion2b_s34b_b79k")


def test_bad_pretrained_image_size_and_texts_are_config_errors():
    with pytest.raises(ConfigError, match="neither a file nor an open_clip tag"):
        build_backbone(BackboneConfig("edgeretina-tiny-vit", pretrained="no-such-tag"))
    with pytest.raises(ConfigError, match="multiple of 16"):
        build_backbone(BackboneConfig("edgeretina-tiny-vit", image_size=100))
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_backbone(BackboneConfig("edgeretina-tiny-rn", image_size=80))
    with pytest.raises(ConfigError, match="not one string"):
        build_backbone(BackboneConfig("edgeretina-tiny-vit", image_size=32), "one string")


# --- shapes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, image_size, grid", [
    ("edgeretina-tiny-vit", None, (14, 14)),
    ("edgeretina-tiny-vit", 64, (4, 4)),
    ("edgeretina-tiny-rn", 64, (2, 2)),
    ("edgeretina-tiny-rn", 96, (3, 3)),
])
def test_shapes_and_grid(name, image_size, grid):
    torch.manual_seed(0)
    build = build_backbone(BackboneConfig(name, image_size=image_size), TEXTS)
    backbone = build.visual
    assert backbone.image_size == (image_size or 224)
    assert backbone.grid_size == grid
    assert backbone.embed_dim == 128
    pooled, tokens = backbone(_images(backbone, 3))
    assert tuple(pooled.shape) == (3, 128)
    assert tuple(tokens.shape) == (3, grid[0] * grid[1], 128)
    assert tuple(build.text_embeddings.shape) == (2, 128)
    assert torch.allclose(build.text_embeddings.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not build.text_embeddings.requires_grad


def test_no_texts_gives_no_text_embeddings_and_empty_texts_an_empty_matrix():
    assert build_backbone(BackboneConfig("edgeretina-tiny-rn", image_size=64)).text_embeddings is None
    empty = build_backbone(BackboneConfig("edgeretina-tiny-rn", image_size=64), []).text_embeddings
    assert tuple(empty.shape) == (0, 128)


# --- the joint space is open_clip's --------------------------------------------------------------

@pytest.mark.parametrize("name, image_size", [("edgeretina-tiny-vit", 64), ("edgeretina-tiny-rn", 64)])
def test_pooled_and_text_match_open_clip(name, image_size):
    reference, build = _reference_and_build(name, image_size)
    backbone = build.visual
    x = _images(backbone)
    with torch.no_grad():
        pooled, _ = backbone(x)
        expected = reference.encode_image(x)
        expected_text = reference.encode_text(open_clip.get_tokenizer(name)(TEXTS), normalize=True)
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(build.text_embeddings, expected_text)
    preprocess = open_clip.get_model_preprocess_cfg(reference)
    assert backbone.mean == tuple(preprocess["mean"]) and backbone.std == tuple(preprocess["std"])
    assert backbone.mean == open_clip.OPENAI_DATASET_MEAN and backbone.std == open_clip.OPENAI_DATASET_STD


def test_vit_tokens_are_open_clips_normalised_patch_tokens_through_proj():
    reference, build = _reference_and_build("edgeretina-tiny-vit", 64, texts=None)
    backbone = build.visual
    x = _images(backbone)
    with torch.no_grad():
        pooled, tokens = backbone(x)
        last = reference.visual.forward_intermediates(
            x, indices=1, normalize_intermediates=True, output_fmt="NLC")["image_intermediates"][-1]
        expected = last @ reference.visual.proj
    torch.testing.assert_close(tokens, expected)
    assert not torch.allclose(tokens.mean(dim=1), pooled, atol=1e-3)  # class token != mean of patches


def test_resnet_tokens_are_the_values_the_attention_pool_mixes():
    """With uniform attention (zero queries) the pool output is the mean of the query token's value and
    the tokens: the tokens are exactly the attention pool's value embeddings (MaskCLIP)."""
    torch.manual_seed(0)
    backbone = build_backbone(BackboneConfig("edgeretina-tiny-rn", image_size=96)).visual.eval()
    pool = backbone.visual.attnpool
    with torch.no_grad():
        pool.q_proj.weight.zero_()
        pool.q_proj.bias.zero_()
        x = _images(backbone)
        pooled, tokens = backbone(x)
        features = backbone.visual.forward_intermediates(x, indices=[4], intermediates_only=True)
        layer4 = features["image_intermediates"][-1]
        query_value = pool.c_proj(pool.v_proj(layer4.mean(dim=(2, 3)) + pool.positional_embedding[0]))
    expected = (query_value + tokens.sum(dim=1)) / (tokens.shape[1] + 1)
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-5)


def test_forward_in_eval_mode_with_grad_backpropagates():
    for name in preset_names():
        backbone = build_backbone(BackboneConfig(name, image_size=64)).visual.eval()
        pooled, tokens = backbone(_images(backbone))
        (pooled.sum() + tokens.sum()).backward()
        assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)


# --- weights from a local file ------------------------------------------------------------------

@pytest.mark.parametrize("name, image_size, grid", [("edgeretina-tiny-vit", 96, (6, 6)),
                                                    ("edgeretina-tiny-rn", 64, (2, 2))])
def test_local_checkpoint_loads_and_resizes_position_embeddings(tmp_path, name, image_size, grid):
    register_presets()
    torch.manual_seed(123)
    source = open_clip.create_model(name).eval()
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)

    native = build_backbone(BackboneConfig(name, pretrained=str(path))).visual.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(native(x)[0], source.encode_image(x))

    resized = build_backbone(BackboneConfig(name, pretrained=str(path), image_size=image_size)).visual.eval()
    assert resized.grid_size == grid and resized.image_size == image_size
    torch.testing.assert_close(resized.visual.conv1.weight, source.visual.conv1.weight)
    pooled, tokens = resized(torch.randn(1, 3, image_size, image_size))
    assert tuple(tokens.shape) == (1, grid[0] * grid[1], 128) and torch.isfinite(pooled).all()


# --- timm towers (tiny timm test architectures, registered for these tests only) ----------------

_TIMM_TOWERS = {
    # name: (timm model, timm_pool, timm_proj, embed_dim)
    "edgeretina-test-timm-resnet": ("test_resnet", "avg", "linear", 32),     # CNN, linear projection
    "edgeretina-test-timm-vit-map": ("test_vit3", "map", "none", 96),        # SigLIP-like MAP head
}


@pytest.fixture(scope="module")
def timm_towers(tmp_path_factory):
    timm = pytest.importorskip("timm")
    if not {spec[0] for spec in _TIMM_TOWERS.values()} <= set(timm.list_models("test_*")):
        pytest.skip("this timm has no tiny test architectures")
    folder = tmp_path_factory.mktemp("timm_configs")
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
    for name, (model, pool, proj, dim) in _TIMM_TOWERS.items():
        vision_cfg = {"timm_model_name": model, "timm_model_pretrained": False, "timm_pool": pool,
                      "timm_proj": proj, "image_size": 160}
        (folder / f"{name}.json").write_text(json.dumps({"embed_dim": dim, "vision_cfg": vision_cfg,
                                                         "text_cfg": text_cfg}))
    open_clip.add_model_config(folder)
    return list(_TIMM_TOWERS)


def test_timm_towers_match_open_clip(timm_towers):
    for name in timm_towers:
        reference, build = _reference_and_build(name, None)
        backbone = build.visual
        assert backbone.kind == "timm"
        assert backbone.grid_size == ((5, 5) if "resnet" in name else (10, 10))
        x = _images(backbone)
        with torch.no_grad():
            pooled, tokens = backbone(x)
            torch.testing.assert_close(pooled, reference.encode_image(x))
        assert tuple(tokens.shape) == (2, backbone.grid_size[0] * backbone.grid_size[1], _TIMM_TOWERS[name][3])
        if "resnet" in name:  # average pooling then a linear projection: tokens average to the pooled output
            torch.testing.assert_close(tokens.mean(dim=1), pooled, rtol=1e-4, atol=1e-5)


# --- timm models as towers (timm/<name>: no text tower) ------------------------------------------

def _timm_reference(name: str, image_size: int | None = None):
    """timm's own model and our timm/ build from the same seed: the weights are identical."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    takes_size = image_size is not None and name.startswith("test_vit")    # a CNN takes any size as it is
    reference = timm.create_model(name, num_classes=0, **({"img_size": image_size} if takes_size else {})).eval()
    torch.manual_seed(0)
    build = build_backbone(BackboneConfig(f"timm/{name}", image_size=image_size), TEXTS)
    build.visual.eval()
    return reference, build


@pytest.mark.parametrize("name, image_size, grid", [("test_vit", None, (10, 10)), ("test_vit", 64, (4, 4)),
                                                    ("test_resnet", 64, (2, 2)), ("test_convnext", 96, (3, 3))])
def test_timm_tower_shapes_and_no_text_tower(name, image_size, grid):
    build = build_backbone(BackboneConfig(f"timm/{name}", image_size=image_size), TEXTS)
    backbone = build.visual
    assert build.text_embeddings is None and build.has_text_tower is False
    assert backbone.kind == "timm" and backbone.token_path.startswith("timm-direct")
    assert backbone.grid_size == grid and backbone.image_size == (image_size or 160)
    pooled, tokens = backbone(_images(backbone))
    assert tuple(pooled.shape) == (2, backbone.embed_dim)
    assert tuple(tokens.shape) == (2, grid[0] * grid[1], backbone.embed_dim)


def test_timm_vit_pooled_is_timms_pre_logits_and_tokens_its_patch_tokens():
    reference, build = _timm_reference("test_vit", 64)
    backbone = build.visual
    x = _images(backbone)
    with torch.no_grad():
        pooled, tokens = backbone(x)
        features = reference.forward_features(x)
        expected = reference.forward_head(features, pre_logits=True)
    torch.testing.assert_close(pooled, expected)
    torch.testing.assert_close(tokens, features[:, reference.num_prefix_tokens:])   # normed, after the class token
    assert not torch.allclose(tokens.mean(dim=1), pooled, atol=1e-3)


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext"])
def test_timm_cnn_tokens_are_the_map_through_the_head(name):
    """Average pooling, then per-channel ops (ConvNeXt: a LayerNorm after the pool): tokens are the
    per-position head; for a plain ResNet (pool then identity) they average to the pooled output."""
    reference, build = _timm_reference(name, 96)
    backbone = build.visual
    x = _images(backbone)
    with torch.no_grad():
        pooled, tokens = backbone(x)
        torch.testing.assert_close(pooled, reference.forward_head(reference.forward_features(x), pre_logits=True))
    if name == "test_resnet":
        torch.testing.assert_close(tokens.mean(dim=1), pooled, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["test_vit", "resnet18"])
def test_timm_tower_mean_std_and_size_come_from_timms_data_config(name):
    """test_vit's config says mean = std = 0.5 at 160 px, resnet18's ImageNet's at 224: neither is CLIP's."""
    timm = pytest.importorskip("timm")
    expected = timm.data.resolve_model_data_config(timm.create_model(name, num_classes=0))
    backbone = build_backbone(BackboneConfig(f"timm/{name}")).visual
    assert backbone.mean == tuple(expected["mean"]) and backbone.std == tuple(expected["std"])
    assert backbone.image_size == expected["input_size"][-1]
    assert backbone.mean != open_clip.OPENAI_DATASET_MEAN
    resized = build_backbone(BackboneConfig(f"timm/{name}", image_size=64)).visual
    assert resized.image_size == 64 and resized.mean == backbone.mean


def test_timm_names_sizes_and_weights_are_checked():
    with pytest.raises(ConfigError, match="timm/test_vit"):
        build_backbone(BackboneConfig("timm/test_vti"))
    with pytest.raises(ConfigError, match="multiple of 16"):
        build_backbone(BackboneConfig("timm/test_vit", image_size=100))
    with pytest.raises(ConfigError, match="multiple of 32"):
        build_backbone(BackboneConfig("timm/test_resnet", image_size=80))
    with pytest.raises(ConfigError, match="neither a file nor 'timm'"):
        build_backbone(BackboneConfig("timm/test_vit", pretrained="/no/such/weights.pt"))


def test_a_text_less_tower_learns_orthonormal_prototypes_that_get_gradients_and_round_trip():
    from edgeretina.training.model import GraderModel, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(backbone=BackboneConfig("timm/test_vit", image_size=64))
    model = GraderModel(config)
    parameters = dict(model.named_parameters())
    assert "grade_prototypes" in parameters and "lesion_prototypes" in parameters
    both = torch.cat([model.grade_prototypes, model.lesion_prototypes]).detach()
    torch.testing.assert_close(both @ both.T, torch.eye(len(both)), atol=1e-5, rtol=0)
    out = model(torch.randn(2, 3, 64, 64))
    (out["prototype_logits"].logsumexp(dim=1).sum() + out["saliency_logits"].sum()).backward()
    assert model.grade_prototypes.grad is not None and float(model.grade_prototypes.grad.abs().sum()) > 0
    restored = GraderModel(config, for_checkpoint=True)
    restored.load_state_dict(model.state_dict())
    torch.testing.assert_close(restored.grade_prototypes, model.grade_prototypes)


@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_a_timm_tower_exports_to_onnx_and_runs_like_torch(tmp_path, name):
    ort = pytest.importorskip("onnxruntime")
    from edgeretina.training.model import ExportWrapper, GraderModel, ModelConfig

    torch.manual_seed(0)
    model = GraderModel(ModelConfig(backbone=BackboneConfig(f"timm/{name}", image_size=64), lesion_head=True)).eval()
    wrapper = ExportWrapper(model).eval()
    names = list(wrapper.names)
    path = tmp_path / "model.onnx"
    with torch.enable_grad(), warnings.catch_warnings():   # as edgeretina.export does (TorchScript exporter, opset 17)
        warnings.simplefilter("ignore")                      # tracer warnings about timm's shape checks
        torch.onnx.export(wrapper, (torch.randn(2, 3, 64, 64),), str(path), input_names=["image"],
                          output_names=names, dynamic_axes={"image": {0: "B"}, **{n: {0: "B"} for n in names}},
                          opset_version=17, dynamo=False)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip(names, session.run(names, {"image": x.numpy()})))
    with torch.no_grad():
        expected = wrapper(x)
    for output, want in zip(names, expected):
        assert got[output].shape == tuple(want.shape), output
        assert float(abs(got[output] - want.numpy()).max()) < 1e-4, output


# --- reference architectures (slow) --------------------------------------------------------------

@slow
@pytest.mark.slow
@pytest.mark.parametrize("name, grid, dim", [("ViT-B-16", (14, 14), 512), ("ViT-B-32", (7, 7), 512),
                                             ("RN50", (7, 7), 1024)])
def test_reference_architectures_random_init(name, grid, dim):
    build = build_backbone(BackboneConfig(name), TEXTS)
    backbone = build.visual.eval()
    assert backbone.grid_size == grid and backbone.embed_dim == dim and backbone.image_size == 224
    with torch.no_grad():
        pooled, tokens = backbone(torch.randn(1, 3, 224, 224))
    assert tuple(pooled.shape) == (1, dim) and tuple(tokens.shape) == (1, grid[0] * grid[1], dim)
    assert tuple(build.text_embeddings.shape) == (2, dim)
