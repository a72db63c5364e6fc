"""edgeretina.layouts: each public dataset layout rebuilt in miniature from phantom photographs (the real
file and column names, their known quirks), bad entries skipped and counted, merging, and the
patient-, grade- and source-aware validation split."""

from __future__ import annotations

import json
import math
import random
import shutil
from collections import Counter
from pathlib import Path

import cv2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeretina.dataset import LabeledImage, read_labels
from edgeretina.errors import ConfigError, DatasetError
from edgeretina.layouts import FORMATS, DataSpec, load_data, parse_data_spec, split_items
from edgeretina.phantom import PhantomConfig, generate_dataset


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """12 phantom photographs (64 px): their labels.csv, rows and RGB pixels."""
    labels = generate_dataset(tmp_path_factory.mktemp("phantom"), n=12, seed=3, config=PhantomConfig(size=64), workers=1)
    items = read_labels(labels)
    return {"labels": labels, "items": items, "grades": [i.grade for i in items]}


def _copy(item: LabeledImage, dest: Path) -> Path:
    """The phantom JPEG at `dest`, re-encoded when dest is not a JPEG (the layout's own format)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.suffix.lower() in (".jpg", ".jpeg"):
        shutil.copyfile(item.path, dest)
    else:
        assert cv2.imwrite(str(dest), cv2.imread(str(item.path)))
    return dest


def _write_csv(path: Path, header: list[str], rows: list[list], *, text_header: str | None = None,
               newline: str = "\n", bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = text_header if text_header is not None else ",".join(header)
    body = [",".join(str(v) for v in row) for row in rows]
    path.write_text(("\ufeff" if bom else "") + newline.join([head, *body]) + newline, encoding="utf-8")
    return path


def _reasons(data) -> dict[str, int]:
    return data.summary.skipped_by_reason()


# ---------------------------------------------------------------------------------------------- layouts


def test_formats_are_the_documented_ones():
    assert FORMATS == ("aptos", "eyepacs", "ddr", "idrid", "messidor2", "deepdrid", "phantom", "dicom", "csv")


def test_aptos(phantom, tmp_path):
    root = tmp_path / "aptos"
    ids = [f"{i:03x}c0ffee{i:02d}" for i in range(12)]
    for item, image_id in zip(phantom["items"], ids):
        _copy(item, root / "train_images" / f"{image_id}.png")
    rows = [[i, g] for i, g in zip(ids, phantom["grades"])]
    rows[3][0] += ".png"                                   # an id written with its extension
    rows += [["missing01", 2], [ids[0] + "x", "two"], ["deadbeef", 7]]
    _write_csv(root / "train.csv", ["id_code", "diagnosis"], rows)
    data = load_data([f"aptos:{root}"])
    assert [i.case_id for i in data.items] == ids
    assert [i.grade for i in data.items] == phantom["grades"]
    assert all(i.patient is None and i.source == "aptos" and i.path.suffix == ".png" for i in data.items)
    assert _reasons(data) == {"bad grade": 2, "image not found": 1}
    [line] = data.summary.lines()
    assert line.startswith(f"aptos:{root}: loaded 12 (grades {_counts(phantom['grades'])}); skipped 3: "
                           "2 bad grade, 1 image not found; first missing: ")
    assert line.endswith(str(root.resolve() / "train_images" / "missing01.png"))


def _counts(grades) -> list[int]:
    return [grades.count(g) for g in range(5)]


def test_eyepacs_patients_from_left_and_right(phantom, tmp_path):
    root = tmp_path / "eyepacs"
    names = [f"{10 + i // 2}_{'left' if i % 2 == 0 else 'right'}" for i in range(12)]
    for item, name in zip(phantom["items"], names):
        _copy(item, root / "train" / f"{name}.jpeg")
    rows = [[n, g] for n, g in zip(names, phantom["grades"])] + [["99_left", 0], ["17_right", ""]]
    _write_csv(root / "trainLabels.csv", ["image", "level"], rows, newline="\r\n")
    data = load_data([DataSpec("eyepacs", root)])
    assert [i.patient for i in data.items] == [str(10 + i // 2) for i in range(12)]
    assert [i.extra["eye"] for i in data.items] == ["left", "right"] * 6
    assert [i.grade for i in data.items] == phantom["grades"] and {i.source for i in data.items} == {"eyepacs"}
    assert _reasons(data) == {"bad grade": 1, "image not found": 1}
    assert data.summary.skipped[0].detail.endswith("train/99_left.jpeg")


def test_eyepacs_png_mirror_beside_the_csv(phantom, tmp_path):
    """A re-encoded mirror: the images are .png, in the csv's own folder, and the ids carry .jpeg."""
    root = tmp_path / "mirror"
    for i, item in enumerate(phantom["items"][:4]):
        _copy(item, root / f"{i}_left.png")
    _write_csv(root / "labels.csv", ["image", "level", "Usage"],
               [[f"{i}_left.jpeg", g, "Public"] for i, g in enumerate(phantom["grades"][:4])])
    data = load_data([f"eyepacs:{root / 'labels.csv'}"])
    assert [i.path.name for i in data.items] == [f"{i}_left.png" for i in range(4)]
    assert data.items[0].extra == {"eye": "left", "usage": "Public"}
    assert [i.patient for i in data.items] == ["0", "1", "2", "3"]


def _ddr(phantom, root: Path) -> Path:
    grading = root / "DR_grading"
    splits = ["train"] * 6 + ["valid"] * 3 + ["test"] * 3
    lines: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for n, (item, split) in enumerate(zip(phantom["items"], splits)):
        name = f"007-{n:04d}-000.jpg"
        _copy(item, grading / split / name)
        lines[split].append(f"{name} {item.grade}")
    _copy(phantom["items"][0], grading / "train" / "20170323093305605.jpg")
    lines["train"] += ["20170323093305605.jpg 5", "", "only-a-name.jpg", "gone.jpg 1"]
    for split, text in lines.items():
        (grading / f"{split}.txt").write_text("\n".join(text) + "\n")
    return grading


def test_ddr_folder_counts_ungradable(phantom, tmp_path):
    grading = _ddr(phantom, tmp_path / "DDR-dataset")
    data = load_data([f"ddr:{grading}"])
    assert [i.grade for i in data.items] == phantom["grades"]
    assert [i.extra["split"] for i in data.items] == ["train"] * 6 + ["valid"] * 3 + ["test"] * 3
    assert data.items[7].path == (grading / "valid" / "007-0007-000.jpg").resolve()
    assert _reasons(data) == {"image not found": 1, "malformed line": 1, "ungradable (DDR grade 5)": 1}
    assert "skipped 3: 1 image not found, 1 malformed line, 1 ungradable (DDR grade 5)" in data.summary.lines()[0]
    assert len(load_data([f"ddr:{tmp_path / 'DDR-dataset'}"]).items) == 12       # the folder above DR_grading


def test_ddr_one_list(phantom, tmp_path):
    grading = _ddr(phantom, tmp_path)
    data = load_data([f"ddr:{grading / 'valid.txt'}"])
    assert [i.case_id for i in data.items] == ["007-0006-000", "007-0007-000", "007-0008-000"]
    assert data.summary.skipped == []
    (tmp_path / "bad.txt").write_text("a.jpg 5\nb.jpg 5\nc.jpg 9\n")
    [line] = load_data([f"ddr:{tmp_path / 'bad.txt'}"], allow_empty=True).summary.lines()
    assert line == (f"ddr:{tmp_path / 'bad.txt'}: 0 loaded: all 3 entries skipped: 2 ungradable (DDR grade 5), "
                    f"1 bad grade; first: {tmp_path / 'bad.txt'}:1: ungradable (DDR grade 5)")


def test_idrid_training_and_testing_sets_with_the_real_header(phantom, tmp_path):
    grading = tmp_path / "IDRiD" / "B. Disease Grading"
    sets = {"a. Training Set": phantom["items"][:8], "b. Testing Set": phantom["items"][8:]}
    csvs = {"a. Training Set": "a. IDRiD_Disease Grading_Training Labels.csv",
            "b. Testing Set": "b. IDRiD_Disease Grading_Testing Labels.csv"}
    for folder, items in sets.items():
        rows = []
        for n, item in enumerate(items, start=1):
            _copy(item, grading / "1. Original Images" / folder / f"IDRiD_{n:03d}.jpg")
            rows.append([f"IDRiD_{n:03d}", item.grade, n % 3, "", ""])
        if folder.startswith("a."):
            rows.append(["IDRiD_099", 2, 1, "", ""])         # listed, never shipped
        # the release: a byte-order mark, CRLF, "Risk of macular edema " and trailing empty columns
        _write_csv(grading / "2. Groundtruths" / csvs[folder], [], rows,
                   text_header="Image name,Retinopathy grade,Risk of macular edema ,,", newline="\r\n", bom=True)
    data = load_data([f"idrid:{grading}"])
    assert [i.case_id for i in data.items] == ([f"train/IDRiD_{n:03d}" for n in range(1, 9)] +
                                               [f"test/IDRiD_{n:03d}" for n in range(1, 5)])
    assert [i.grade for i in data.items] == phantom["grades"]
    assert [i.extra["dme_risk"] for i in data.items] == [str(n % 3) for n in range(1, 9)] + [str(n % 3) for n in range(1, 5)]
    # the testing set's IDRiD_001 is its own photograph, not the training set's
    assert data.items[8].path.parent.name == "b. Testing Set" and data.items[0].path.parent.name == "a. Training Set"
    assert _reasons(data) == {"image not found": 1}
    assert len(load_data([f"idrid:{grading.parent}"]).items) == 12


def test_messidor2_ungradable_rows_and_renamed_images(phantom, tmp_path):
    root = tmp_path / "messidor2"
    names = [f"20051020_4380{n}_0100_PP.tif" for n in range(6)] + [f"IM00{n:04d}.JPG" for n in range(6)]
    rows = []
    for item, name, n in zip(phantom["items"], names, range(12)):
        stored = name if name.endswith(".JPG") else name.replace(".tif", ".png")   # the Kaggle mirror's .png
        _copy(item, root / "IMAGES" / stored)
        rows.append([name, item.grade, n % 2, 1])
    rows += [["IM009999.JPG", "", "", 0], ["IM008888.JPG", 1, 0, 1]]
    _write_csv(root / "messidor_data.csv", ["image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"], rows)
    data = load_data([f"messidor2:{root}"])
    assert [i.grade for i in data.items] == phantom["grades"]
    assert [i.extra["adjudicated_dme"] for i in data.items] == [str(n % 2) for n in range(12)]
    assert data.items[0].path.name == "20051020_43800_0100_PP.png" and data.items[6].path.name == "IM000000.JPG"
    assert _reasons(data) == {"image not found": 1, "ungradable (Messidor-2 adjudicated_gradable 0)": 1}


def test_deepdrid_grade_from_the_eyes_own_column(phantom, tmp_path):
    fold = tmp_path / "regular_fundus_images" / "regular-fundus-training"
    header = ["patient_id", "image_id", "image_path", "Overall quality", "left_eye_DR_Level", "right_eye_DR_Level",
              "patient_DR_Level", "Clarity", "Field definition", "Artifact"]
    rows, sources, expected = [], [], []
    for n, item in enumerate(phantom["items"]):
        patient, eye, shot = str(1 + n // 4), "lr"[(n // 2) % 2], 1 + n % 2
        image_id = f"{patient}_{eye}{shot}"
        _copy(item, fold / "Images" / patient / f"{image_id}.jpg")
        left, right = (item.grade, "") if eye == "l" else ("", item.grade)
        rows.append([patient, image_id, f"\\regular-fundus-training\\{patient}\\{image_id}.jpg", 1, left, right, 4, 8, 10, 0])
        sources.append([patient, image_id, f"\\regular-fundus-training\\{patient}\\{image_id}.jpg", "Nicheng" if n < 8 else "Shanghai"])
        expected.append((image_id, item.grade, patient, "left" if eye == "l" else "right"))
    _copy(phantom["items"][0], fold / "Images" / "9" / "9_r3.jpg")
    _copy(phantom["items"][0], fold / "Images" / "9" / "9_l1.jpg")
    rows += [["9", "9_r3", "", 0, 1, "", 1, 8, 8, 1],            # the release's 56_r3: grade in the other eye's column
             ["9", "9_l1", "", 0, 5, "", 5, 1, 1, 10]]           # ungradable
    _write_csv(fold / "regular-fundus-training.csv", header, rows)
    _write_csv(fold / "regular-fundus-source-training.csv", ["patient_id", "image_id", "image_path", "Source"], sources)
    data = load_data([f"deepdrid:{tmp_path}"])
    assert [(i.case_id, i.grade, i.patient, i.extra["eye"]) for i in data.items] == expected
    assert {i.source for i in data.items} == {"deepdrid"}
    assert [i.extra["site"] for i in data.items] == ["Nicheng"] * 8 + ["Shanghai"] * 4
    assert {"split": "training", "overall_quality": "1", "clarity": "8", "patient_dr_level": "4"}.items() <= data.items[0].extra.items()
    assert _reasons(data) == {"no grade for this eye": 1, "ungradable (DeepDRiD grade 5)": 1}
    assert len(load_data([f"deepdrid:{fold / 'regular-fundus-training.csv'}"]).items) == 12


def test_phantom_folder(phantom):
    data = load_data([f"phantom:{phantom['labels'].parent}"])
    assert [i.grade for i in data.items] == phantom["grades"]
    assert {i.source for i in data.items} == {"phantom"} and all(i.patient is None for i in data.items)
    assert {"dme", "seed", "n_MA", "n_PRH"} <= set(data.items[0].extra) and "source" not in data.items[0].extra


def test_csv_with_patients_sources_and_bad_rows(phantom, tmp_path):
    folder = phantom["labels"].parent
    rows = [[f"{folder}/{i.path.relative_to(folder)}", i.grade, f"p{n // 3}", "clinic-a" if n < 6 else ""]
            for n, i in enumerate(phantom["items"])]
    rows += [["nowhere.jpg", 1, "", ""], [rows[0][0], 9, "", ""]]
    _write_csv(tmp_path / "mine.csv", ["path", "grade", "patient", "source"], rows)
    data = load_data([f"csv:{tmp_path / 'mine.csv'}"])
    assert [i.patient for i in data.items] == [f"p{n // 3}" for n in range(12)]
    assert [i.source for i in data.items] == ["clinic-a"] * 6 + ["csv"] * 6
    assert _reasons(data) == {"bad grade": 1, "image not found": 1}
    assert "sources: clinic-a 6, csv 6" in data.summary.lines()[0]


def test_dicom_folder_graded_by_uid(phantom, tmp_path):
    fx = pytest.importorskip("_dicom_fixtures")
    photos = [cv2.cvtColor(cv2.imread(str(i.path)), cv2.COLOR_BGR2RGB) for i in phantom["items"][:3]]
    root = tmp_path / "pacs"
    one = fx.image_dataset([photos[0]], Manufacturer="Topcon", ManufacturerModelName="TRC-NW400")
    stereo = fx.image_dataset(photos[1:3])
    stray = fx.image_dataset([photos[0]])
    fx.save(one, root / "study1" / "IM0001.dcm")
    fx.save(stereo, root / "study2" / "series" / "IM0002")
    fx.save(stray, root / "study3" / "IM0003.dcm")
    (root / "study3" / "broken.dcm").write_bytes(b"not a dicom file at all")
    (root / "README.txt").write_text("exported by the camera")
    uid = lambda ds: ds.SOPInstanceUID  # noqa: E731
    _write_csv(root / "grades.csv", ["sop_instance_uid", "grade", "frame", "patient"],
               [[uid(one), 2, "", ""], [uid(stereo), 3, 2, ""], [uid(stereo), 1, 1, "P-7"],
                [uid(stereo), 4, 3, ""], ["1.2.3.404", 1, "", ""]])
    data = load_data([f"dicom:{root}"])
    assert [(i.grade, i.frame) for i in data.items] == [(2, None), (3, 2), (1, 1)]
    assert data.items[0].path == (root / "study1" / "IM0001.dcm").resolve()
    assert [i.source for i in data.items] == ["Topcon TRC-NW400", "dicom", "dicom"]
    pseudonym = data.items[0].patient
    assert pseudonym.startswith("dicom-") and data.items[1].patient == pseudonym and data.items[2].patient == "P-7"
    assert _reasons(data) == {"bad frame": 1, "no DICOM file with this SOP Instance UID": 1,
                              "no grade for this DICOM file": 1, "not a readable DICOM file": 1}
    report = str(data.summary.to_dict()) + "\n".join(data.summary.lines())
    assert fx.PATIENT["PatientID"] not in report + "".join(str(i.patient) for i in data.items)
    assert len(load_data([f"dicom:{root / 'grades.csv'}"]).items) == 3
    # the stereo file's frames: one with the file's patient (also the first file's), one with P-7: one group
    with pytest.raises(DatasetError, match=r"3 image\(s\) in 1 patient/image group"):
        split_items(data.items, 0.34, 0)


def test_dicom_multi_frame_file_without_a_frame_is_skipped(phantom, tmp_path):
    fx = pytest.importorskip("_dicom_fixtures")
    photos = [cv2.cvtColor(cv2.imread(str(i.path)), cv2.COLOR_BGR2RGB) for i in phantom["items"][:3]]
    root = tmp_path / "pacs"
    single, stereo = fx.image_dataset([photos[0]]), fx.image_dataset(photos[1:3])
    fx.save(single, root / "IM0001.dcm")
    fx.save(stereo, root / "IM0002.dcm")
    _write_csv(root / "grades.csv", ["sop_instance_uid", "grade", "frame"],
               [[single.SOPInstanceUID, 2, ""], [stereo.SOPInstanceUID, 3, ""], [stereo.SOPInstanceUID, 1, 2]])
    data = load_data([f"dicom:{root}"])
    assert [(i.grade, i.frame) for i in data.items] == [(2, None), (1, 2)]
    assert _reasons(data) == {"multi-frame DICOM without a frame": 1}
    (skipped,) = data.summary.skipped
    assert skipped.where == f"{root / 'grades.csv'}:3" and "2 frames: the grades CSV must give the frame" in skipped.detail
    assert "1 multi-frame DICOM without a frame" in data.summary.lines()[0]


# ---------------------------------------------------------------------------------------------- merging


def test_merging_two_specs_and_skipping_duplicates(phantom, tmp_path):
    folder = phantom["labels"].parent
    new = _copy(phantom["items"][5], tmp_path / "elsewhere" / "new.jpg")
    rows = [[str(i.path), i.grade] for i in phantom["items"][:5]] + [[str(new), 4]]   # five the phantom spec has
    _write_csv(tmp_path / "again.csv", ["path", "grade"], rows)
    data = load_data([f"phantom:{folder}", f"csv:{tmp_path / 'again.csv'}"])
    assert len(data.items) == 13 and len({i.path for i in data.items}) == 13
    lines = data.summary.lines()
    assert lines[1] == f"csv:{tmp_path / 'again.csv'}: loaded 1 (grades [0, 0, 0, 0, 1]); skipped 5: 5 duplicate image"
    assert lines[2] == f"total: loaded 13 from 2 specs (grades {_counts(phantom['grades'] + [4])}); skipped 5: 5 duplicate image"
    dup = [s for s in data.summary.skipped if s.reason == "duplicate image"]
    assert len(dup) == 5 and dup[0].detail == f"{phantom['items'][0].path} already loaded from phantom:{folder}"
    as_dict = data.summary.to_dict()
    assert as_dict["loaded"] == 13 and as_dict["specs"][1]["skipped_by_reason"] == {"duplicate image": 5}
    assert as_dict["sources"] == {"phantom": {"loaded": 12, "grade_counts": _counts(phantom["grades"])},
                                  "csv": {"loaded": 1, "grade_counts": [0, 0, 0, 0, 1]}}
    assert len(as_dict["specs"][1]["skipped_examples"]) == 5 and json.loads(json.dumps(as_dict)) == as_dict
    with pytest.raises(DatasetError, match=r"no images loaded from phantom:"):       # the same folder twice
        load_data([f"phantom:{folder}", f"phantom:{folder}"])


def test_merge_keeps_every_source(phantom, tmp_path):
    grading = _ddr(phantom, tmp_path / "ddr")
    data = load_data([f"ddr:{grading}", f"phantom:{phantom['labels'].parent}"])
    assert Counter(i.source for i in data.items) == {"ddr": 12, "phantom": 12}
    assert data.summary.by_source()["ddr"]["grade_counts"] == _counts(phantom["grades"])


# ---------------------------------------------------------------------------------------------- failures


def test_all_images_missing_is_obvious(phantom, tmp_path):
    root = tmp_path / "aptos"
    _write_csv(root / "train.csv", ["id_code", "diagnosis"], [[f"abc{n}", n % 5] for n in range(40)])
    (root / "train_images").mkdir()                                        # there, but empty
    with pytest.raises(DatasetError, match=r"no images loaded from aptos:.*\n.*0 loaded: all 40 images missing; "
                                           r"first missing: .*train_images/abc0\.png"):
        load_data([f"aptos:{root}"])
    data = load_data([f"aptos:{root}"], allow_empty=True)
    assert data.items == [] and data.summary.lines()[0].endswith(str(root.resolve() / "train_images" / "abc0.png"))
    trusted = load_data([f"aptos:{root}"], check_files=False)             # no listing, no existence check
    assert len(trusted.items) == 40 and trusted.items[1].path == root.resolve() / "train_images" / "abc1.png"


@pytest.mark.parametrize("fmt", ["csv", "phantom"])
@pytest.mark.parametrize("header", ["Path,Grade,Patient,Source,Case_ID", " path , grade , PATIENT,source , case id"])
def test_csv_headers_in_other_spellings_load(phantom, tmp_path, fmt, header):
    """What the column check accepts the reader reads: the known columns compare case- and space-insensitively;
    other columns keep their spelling."""
    rows = [[str(i.path), i.grade, f"p{n}", "clinic", f"c{n}", "x"] for n, i in enumerate(phantom["items"][:4])]
    _write_csv(tmp_path / "labels.csv", [], rows, text_header=header + ", Note ")
    data = load_data([f"{fmt}:{tmp_path}"])
    assert [i.grade for i in data.items] == phantom["grades"][:4]
    assert [(i.patient, i.source, i.case_id) for i in data.items] == [(f"p{n}", "clinic", f"c{n}") for n in range(4)]
    assert data.items[0].extra == {" Note ": "x"}
    assert read_labels(tmp_path / "labels.csv")[3].case_id == "c3"


def test_csv_naming_a_column_twice_is_a_dataset_error(tmp_path):
    _write_csv(tmp_path / "labels.csv", ["path", "grade", "Grade"], [["a.jpg", 1, 2]])
    with pytest.raises(DatasetError, match=r"labels\.csv: columns 'grade', 'Grade' all name grade"):
        load_data([f"csv:{tmp_path}"])


@pytest.mark.parametrize("fmt, make, message", [
    ("aptos", lambda r: None, r"no APTOS 2019 labels file \(train\.csv\)"),
    ("aptos", lambda r: _write_csv(r / "train.csv", ["id_code", "grade"], [["a", 1]]),
     r"train\.csv: not a APTOS 2019 labels file: missing column\(s\) 'diagnosis' \(expected columns: id_code, diagnosis"),
    ("eyepacs", lambda r: _write_csv(r / "trainLabels.csv", ["image"], [["1_left"]]), r"trainLabels\.csv: .*'level'"),
    ("ddr", lambda r: None, r"no DDR grading list \(train\.txt, valid\.txt or test\.txt\)"),
    ("idrid", lambda r: None, r"no IDRiD grading labels.*Image name, Retinopathy grade, Risk of macular edema"),
    ("messidor2", lambda r: _write_csv(r / "messidor_data.csv", ["image_id", "adjudicated_dr_grade"], [["a", 1]]),
     r"messidor_data\.csv: .*'adjudicated_gradable'"),
    ("deepdrid", lambda r: None, r"no DeepDRiD labels CSV \(columns patient_id, image_id, left_eye_DR_Level"),
    ("phantom", lambda r: _write_csv(r / "labels.csv", ["file", "grade"], [["a.jpg", 1]]), r"labels\.csv: .*'path'"),
    ("csv", lambda r: (r / "labels.csv").write_bytes(b"path,grade\n\xe9.jpg,1\n"), r"labels\.csv is not UTF-8"),
    ("dicom", lambda r: None, r"no grades CSV for the DICOM files; expected grades\.csv with columns sop_instance_uid,grade"),
])
def test_unusable_labels_file_is_a_dataset_error(tmp_path, fmt, make, message):
    make(tmp_path)
    with pytest.raises(DatasetError, match=message):
        load_data([f"{fmt}:{tmp_path}"])


def test_missing_path_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match=r"--data aptos:.*nothing does not exist"):
        load_data([f"aptos:{tmp_path / 'nothing'}"])


@pytest.mark.parametrize("text, message", [
    (r"C:\data\aptos", r"no format given; write FORMAT:PATH with FORMAT one of aptos, eyepacs, ddr"),
    ("/data/aptos", "no format given"),
    ("aptos", r"no path after the format; write aptos:PATH"),
    ("aptos:", "no path after 'aptos:'"),
    ("eyepac:/x", r"unknown format 'eyepac' \(did you mean eyepacs\?\).*idrid, messidor2"),
    ("imagenet:/x", r"unknown format 'imagenet'; write FORMAT:PATH"),
])
def test_parse_data_spec_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_data_spec(text)


def test_parse_data_spec_reads_windows_paths_and_spellings():
    spec = parse_data_spec(r"aptos:C:\data\aptos")
    assert spec == DataSpec("aptos", Path(r"C:\data\aptos")) and str(spec) == r"aptos:C:\data\aptos"
    assert parse_data_spec(" Messidor-2:/data/m2 ").format == "messidor2"
    assert str(parse_data_spec("ddr:/d/DR_grading")) == "ddr:/d/DR_grading"
    with pytest.raises(ConfigError, match="no dataset given"):
        load_data([])


# ---------------------------------------------------------------------------------------------- split


def _corpus(n: int, *, sources=("a",), patients_per: int = 1, seed: int = 0, weights=(5, 2, 2, 1, 1)) -> list[LabeledImage]:
    rng = random.Random(seed)
    items = []
    for k in range(n):
        source = sources[k % len(sources)]
        patient = f"{source}-{k // patients_per}" if patients_per > 1 else None
        items.append(LabeledImage(Path(f"/{source}/{k}.png"), f"{source}{k}", rng.choices(range(5), weights)[0],
                                  patient=patient, source=source))
    return items


def _linked_groups(items: list[LabeledImage]) -> list[set]:
    """The items' groups by merging every two that share a patient or a file until none do."""
    groups: list[set] = []
    for item in items:
        keys = {("f", str(item.path))} | ({("p", item.patient)} if item.patient else set())
        touching = [g for g in groups if g & keys]
        groups = [g for g in groups if not g & keys] + [keys.union(*touching)]
    return groups


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 11), st.sampled_from(["aptos", "ddr", "dicom"]),
                               st.booleans(), st.integers(1, 2), st.integers(0, 29)), min_size=2, max_size=60),
       fraction=st.floats(0.05, 0.6), seed=st.integers(0, 2**32 - 1))
def test_split_never_puts_a_patient_or_a_file_on_both_sides(spec, fraction, seed):
    """Files are shared by several items (frames), with the same patient, another one or none."""
    items = [LabeledImage(Path(f"/x/{file}.dcm"), str(k), grade, frame=frame, source=source,
                          patient=f"p{patient}" if has_patient else None)
             for k, (grade, patient, source, has_patient, frame, file) in enumerate(spec)]
    if len(_linked_groups(items)) < 2 or math.floor(fraction * len(items) + 0.5) == 0:
        with pytest.raises(DatasetError):
            split_items(items, fraction, seed)
        return
    try:
        train, val = split_items(items, fraction, seed)
    except DatasetError as exc:                      # only when the patients cannot leave training non-empty
        assert "training side would be empty" in str(exc)
        return
    assert val and train and sorted(map(id, train + val)) == sorted(map(id, items))
    assert not {i.patient for i in train if i.patient} & {i.patient for i in val if i.patient}
    assert not {i.path for i in train} & {i.path for i in val}       # every item's file, with a patient or not
    shuffled = items[::-1]
    assert {id(i) for i in split_items(shuffled, fraction, seed)[1]} == {id(i) for i in val}   # order-free
    assert split_items(items, fraction, seed) == (train, val)                                  # deterministic


@pytest.mark.parametrize("seed", range(6))
def test_split_keeps_both_eyes_together_and_follows_the_grades(seed):
    items = _corpus(800, patients_per=2, seed=seed)
    train, val = split_items(items, 0.2, seed)
    assert not {i.patient for i in train} & {i.patient for i in val}
    assert abs(len(val) - 160) <= 2
    for grade, total in Counter(i.grade for i in items).items():
        assert abs(sum(i.grade == grade for i in val) - 0.2 * total) <= 0.06 * total + 2, grade


@pytest.mark.parametrize("seed", range(5))
def test_split_is_stratified_by_grade(seed):
    items = _corpus(1000, seed=seed)
    _, val = split_items(items, 0.2, seed)
    for grade, total in Counter(i.grade for i in items).items():
        assert abs(sum(i.grade == grade for i in val) - 0.2 * total) <= 1, (grade, total)


@pytest.mark.parametrize("seed", range(5))
def test_split_takes_from_every_source(seed):
    big, small = _corpus(900, sources=("eyepacs",), seed=seed), _corpus(60, sources=("idrid",), seed=seed + 50)
    tiny = _corpus(6, sources=("dicom",), seed=seed + 99)
    items = big + small + tiny
    train, val = split_items(items, 0.1, seed)
    by_source = Counter(i.source for i in val)
    assert abs(by_source["eyepacs"] - 90) <= 1 and abs(by_source["idrid"] - 6) <= 1
    assert by_source["dicom"] in (0, 1) and Counter(i.source for i in train)["dicom"] >= 5
    assert {i.source for i in train} == {"eyepacs", "idrid", "dicom"}


def test_split_depends_on_the_seed():
    items = _corpus(200)
    vals = {tuple(sorted(i.case_id for i in split_items(items, 0.2, seed)[1])) for seed in range(5)}
    assert len(vals) == 5


def test_split_frames_of_one_file_stay_together():
    items = [LabeledImage(Path(f"/s/{k // 2}.dcm"), str(k), k % 5, frame=1 + k % 2) for k in range(40)]
    train, val = split_items(items, 0.25, 1)
    assert not {i.path for i in train} & {i.path for i in val}


@pytest.mark.parametrize("seed", range(6))
def test_split_frames_of_one_file_stay_together_whatever_their_patients(seed):
    """Frame 1 of each file names a patient, frame 2 another one or none; patient q{k} also has a photograph:
    file, both patients and the photograph are one group."""
    items = []
    for k in range(20):
        dcm = Path(f"/s/{k}.dcm")
        items += [LabeledImage(dcm, f"{k}#1", k % 5, frame=1, patient=f"p{k}"),
                  LabeledImage(dcm, f"{k}#2", k % 5, frame=2, patient=f"q{k}" if k % 2 else None),
                  LabeledImage(Path(f"/s/{k}.png"), f"{k}.png", k % 5, patient=f"q{k}" if k % 2 else f"p{k}")]
    train, val = split_items(items, 0.25, seed)
    for k in range(20):
        assert len({side for side, part in (("t", train), ("v", val)) for i in part
                    if i.case_id.split("#")[0].split(".")[0] == str(k)}) == 1, k
    assert len(val) % 3 == 0 and abs(len(val) - 15) <= 3


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, True, "0.2"])
def test_split_fraction_must_be_between_0_and_1(fraction):
    with pytest.raises(ConfigError, match="val_fraction"):
        split_items(_corpus(20), fraction, 0)


def test_split_impossible_is_a_dataset_error():
    one_patient = [LabeledImage(Path(f"/p/{k}.png"), str(k), k % 5, patient="same") for k in range(10)]
    with pytest.raises(DatasetError, match=r"too few images for a validation split of 0\.2: 10 image\(s\) in 1 "):
        split_items(one_patient, 0.2, 0)
    with pytest.raises(DatasetError, match="too few images"):
        split_items(_corpus(2), 0.2, 0)                       # 0.4 of an image
    two_patients = [LabeledImage(Path(f"/p/{k}.png"), str(k), 0, patient=f"p{k % 2}") for k in range(10)]
    with pytest.raises(DatasetError, match="training side would be empty"):
        split_items(two_patients, 0.9, 0)


def test_split_of_loaded_layouts(phantom, tmp_path):
    """End to end: a merged corpus splits with the patients of EyePACS whole."""
    root = tmp_path / "eyepacs"
    names = [f"{10 + i // 2}_{'left' if i % 2 == 0 else 'right'}" for i in range(12)]
    for item, name in zip(phantom["items"], names):
        _copy(item, root / "train" / f"{name}.jpeg")
    _write_csv(root / "trainLabels.csv", ["image", "level"], [[n, g] for n, g in zip(names, phantom["grades"])])
    data = load_data([f"eyepacs:{root}", f"phantom:{phantom['labels'].parent}"])
    for seed in range(8):
        train, val = split_items(data.items, 0.25, seed)
        assert len(train) + len(val) == 24 and {i.source for i in val} == {"eyepacs", "phantom"}
        assert not {i.patient for i in train if i.patient} & {i.patient for i in val if i.patient}
