"""The prompts file: validation, the packaged descriptions, and prototypes as averaged text embeddings."""

from __future__ import annotations

import json

import pytest

from edgeretina.errors import ConfigError
from edgeretina.grades import LESION_CODES, NUM_GRADES
from edgeretina.training.prompts import DEFAULT_PROMPTS_FILE, Prompts, load_prompts

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")


def _write(tmp_path, data, name: str = "prompts.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _valid() -> dict:
    return {"_about": "comments are keys starting with _",
            "grades": {str(g): [f"grade {g} one", f"grade {g} two"] for g in range(NUM_GRADES)},
            "lesions": {code: [f"{code} lesion"] for code in reversed(LESION_CODES)}}   # file order is free


# --- the packaged file ---------------------------------------------------------------------------

def test_the_packaged_prompts_describe_every_grade_and_lesion_in_clinical_terms():
    prompts = load_prompts()
    assert prompts.source == str(DEFAULT_PROMPTS_FILE)
    assert len(prompts.grades) == NUM_GRADES and all(len(g) >= 4 for g in prompts.grades)
    assert len(prompts.lesions) == len(LESION_CODES) and all(len(group) >= 3 for group in prompts.lesions)
    text = [" ".join(group).lower() for group in prompts.grades]
    assert "microaneurysms only" in text[1]
    assert "more than just microaneurysms but less than severe" in text[2]
    assert "4-2-1 rule" in text[3] and "venous beading" in text[3]
    assert "neovascularisation" in text[4] and "vitreous" in text[4]
    lesions = dict(zip(LESION_CODES, (" ".join(group).lower() for group in prompts.lesions)))
    assert "microaneurysm" in lesions["MA"] and "cotton wool" in lesions["CWS"] and "new vessels" in lesions["NV"]
    assert all(len(d.split()) <= 40 for group in prompts.groups() for d in group)   # well inside 77 tokens
    assert len(prompts.groups()) == NUM_GRADES + len(LESION_CODES)


# --- validation ----------------------------------------------------------------------------------

def test_a_valid_file_reads_in_icdr_and_lesion_code_order(tmp_path):
    prompts = load_prompts(_write(tmp_path, _valid()))
    assert isinstance(prompts, Prompts)
    assert prompts.grades[3] == ("grade 3 one", "grade 3 two")
    assert prompts.lesions == tuple((f"{code} lesion",) for code in LESION_CODES)


@pytest.mark.parametrize("change, where", [
    (lambda d: d["grades"].pop("3"), r"'grades': missing keys \['3'\]"),
    (lambda d: d["grades"].update({"5": ["x"]}), r"'grades': missing keys \[\], unknown keys \['5'\]"),
    (lambda d: d["lesions"].pop("NV"), r"'lesions': missing keys \['NV'\]"),
    (lambda d: d["lesions"].update({"DRUSEN": ["x"]}), r"unknown keys \['DRUSEN'\]"),
    (lambda d: d["grades"].update({"2": []}), r"grades\.2: need a non-empty list"),
    (lambda d: d["grades"].update({"2": "one string"}), r"grades\.2: need a non-empty list"),
    (lambda d: d["grades"].update({"1": ["fine", "  "]}), r"grades\.1\[1\]: a description must be a non-empty"),
    (lambda d: d["lesions"].update({"MA": [3]}), r"lesions\.MA\[0\]: a description must be a non-empty"),
    (lambda d: d.pop("lesions"), r"top level: missing keys \['lesions'\]"),
    (lambda d: d.update({"grade": {}}), r"top level: missing keys \[\], unknown keys \['grade'\]"),
    (lambda d: d.update({"grades": ["a"]}), r"'grades' must be an object"),
])
def test_a_bad_file_is_a_config_error_naming_the_file_and_key(tmp_path, change, where):
    data = _valid()
    change(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError, match=f"prompts file {path}.*{where}"):
        load_prompts(path)


def test_missing_unreadable_and_non_object_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="prompts file not found"):
        load_prompts(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_prompts(_write(tmp_path, '{"grades": [', "broken.json"))
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_prompts(_write(tmp_path, ["a", "b"], "list.json"))


# --- prototypes: the normalised mean of normalised description embeddings ------------------------

def _tiny_text_model():
    from edgeretina.training.factory import register_presets

    register_presets()
    torch.manual_seed(0)
    return open_clip.create_model("edgeretina-tiny-vit", force_image_size=32).eval()


def test_each_prototype_is_the_normalised_mean_of_its_normalised_description_embeddings():
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.factory import build_backbone

    prompts = load_prompts()
    reference = _tiny_text_model()
    torch.manual_seed(0)
    build = build_backbone(BackboneConfig("edgeretina-tiny-vit", image_size=32), prompts.groups())
    tokenizer = open_clip.get_tokenizer("edgeretina-tiny-vit")
    expected, first_only = [], []
    with torch.no_grad():
        for group in prompts.groups():
            embeddings = torch.nn.functional.normalize(reference.encode_text(tokenizer(list(group))), dim=-1)
            mean = embeddings.mean(dim=0)
            expected.append(mean / mean.norm())
            first_only.append(embeddings[0])
    expected = torch.stack(expected)
    assert tuple(build.text_embeddings.shape) == (NUM_GRADES + len(LESION_CODES), 128)
    torch.testing.assert_close(build.text_embeddings, expected, atol=1e-5, rtol=1e-5)
    assert float((build.text_embeddings - torch.stack(first_only)).abs().max()) > 1e-2   # truly an average


def test_grader_model_takes_its_prototypes_from_the_prompts_file(tmp_path):
    from edgeretina.training.backbone import BackboneConfig
    from edgeretina.training.model import GraderModel, ModelConfig

    config = ModelConfig(backbone=BackboneConfig("edgeretina-tiny-vit", image_size=32))
    path = _write(tmp_path, _valid())
    torch.manual_seed(0)
    custom = GraderModel(config, prompts_file=path)
    torch.manual_seed(0)
    packaged = GraderModel(config)
    reference = _tiny_text_model()
    tokenizer = open_clip.get_tokenizer("edgeretina-tiny-vit")
    with torch.no_grad():
        one = torch.nn.functional.normalize(reference.encode_text(tokenizer(["grade 0 one", "grade 0 two"])), dim=-1)
        lesion = torch.nn.functional.normalize(reference.encode_text(tokenizer([f"{LESION_CODES[0]} lesion"])), dim=-1)
    torch.testing.assert_close(custom.grade_prototypes[0], one.mean(0) / one.mean(0).norm(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(custom.lesion_prototypes[0], lesion[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(custom.grade_prototypes, packaged.grade_prototypes, atol=1e-3)
    assert "grade_prototypes" not in dict(custom.named_parameters())      # a text tower's prototypes stay frozen
    with pytest.raises(ConfigError, match="prompts file not found"):
        GraderModel(config, prompts_file=tmp_path / "missing.json")


def test_orthonormal_prototypes_are_seeded_orthonormal_rows():
    from edgeretina.training.prompts import orthonormal_prototypes

    a = orthonormal_prototypes(11, 64, torch.Generator().manual_seed(3))
    b = orthonormal_prototypes(11, 64, torch.Generator().manual_seed(3))
    c = orthonormal_prototypes(11, 64, torch.Generator().manual_seed(4))
    assert tuple(a.shape) == (11, 64) and torch.equal(a, b) and not torch.allclose(a, c)
    torch.testing.assert_close(a @ a.T, torch.eye(11), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="at least 11 dims"):
        orthonormal_prototypes(11, 8)
