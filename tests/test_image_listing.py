"""preprocess/files.py: list_images, the one rule for which files of a folder are images."""

from __future__ import annotations

import pytest

from edgeretina.errors import DatasetError
from edgeretina.preprocess import list_images


@pytest.fixture
def photo_tree(tmp_path):
    for name in ("b.jpg", "a.PNG", "notes.txt", "sub/c.tif", "sub/deeper/d.jpeg", "sub-x/e.bmp"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()          # a directory with an image suffix is not an image
    return tmp_path


def relative(paths, root):
    return [p.relative_to(root).as_posix() for p in paths]


def test_list_images_recurses_into_subfolders_by_default(photo_tree):
    # the bug: a non-recursive listing (bench --images DIR) missed sub/c.tif and sub/deeper/d.jpeg
    assert relative(list_images(photo_tree), photo_tree) == [
        "a.PNG", "b.jpg", "sub/c.tif", "sub/deeper/d.jpeg", "sub-x/e.bmp",
    ]


def test_list_images_top_level_only_when_asked(photo_tree):
    assert relative(list_images(photo_tree, recursive=False), photo_tree) == ["a.PNG", "b.jpg"]


def test_list_images_order_is_by_path_parts_and_repeatable(photo_tree):
    # "sub/..." before "sub-x/...": folders group together whatever the byte order of "/" and "-"
    first, second = list_images(str(photo_tree)), list_images(photo_tree)
    assert first == second
    assert relative(first, photo_tree).index("sub/deeper/d.jpeg") < relative(first, photo_tree).index("sub-x/e.bmp")


def test_list_images_rejects_a_missing_folder_or_a_file(tmp_path):
    with pytest.raises(DatasetError):
        list_images(tmp_path / "missing")
    (tmp_path / "one.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError):
        list_images(tmp_path / "one.jpg")


@pytest.mark.parametrize("name", ["scan.dcm.part", "1.2.840.99.tmp", "scan.dcm.crdownload", "scan.dcm~"])
def test_a_dicom_still_being_copied_is_not_listed_until_renamed(tmp_path, name):
    """A half-copied DICOM carries its marker from the first bytes; its temporary name keeps it out."""
    partial = tmp_path / name
    partial.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    assert list_images(tmp_path) == []
    final = partial.rename(tmp_path / "scan")          # renamed when complete: no suffix, found by its marker
    assert list_images(tmp_path) == [final]
