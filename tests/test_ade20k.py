"""ADE20K conversion, checked on three real validation samples from the dev kit."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segmodel.ade20k import convert_ade20k
from segmodel.classes import ade150_to_project_lut, class_names
from segmodel.errors import DataError

SAMPLES = Path(__file__).parent / "data" / "ade20k_samples"
NAMES = ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
# ADE_val_00000003: 150-class value -> project id (car, signboard, bus, streetlight, van).
SAMPLE3_THINGS = {21: 9, 44: 25, 81: 50, 88: 56, 103: 65}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("ade")
    return out, convert_ade20k(SAMPLES, out)


def _annotation(out: Path, name: str) -> Image.Image:
    return Image.open(out / "annotations" / "validation" / f"{name}.png")


def test_flat_folder_becomes_validation_list(converted: tuple[Path, dict[str, int]]) -> None:
    out, stats = converted
    assert stats == {"validation": 3}
    assert not (out / "train.txt").exists()
    lines = (out / "val.txt").read_text().splitlines()
    assert lines == [f"images/validation/{n}.jpg annotations/validation/{n}.png" for n in NAMES]
    for line in lines:
        image_rel, annotation_rel = line.split(" ")
        assert (out / image_rel).read_bytes() == (SAMPLES / Path(image_rel).name).read_bytes()
        assert (out / annotation_rel).is_file()


def test_annotations_are_rgb_with_ids_in_red(converted: tuple[Path, dict[str, int]]) -> None:
    out, _ = converted
    for name in NAMES:
        with _annotation(out, name) as annotation, Image.open(SAMPLES / f"{name}.jpg") as image:
            assert annotation.mode == "RGB"
            assert annotation.size == image.size
            rgb = np.asarray(annotation)
        assert not rgb[..., 1].any() and not rgb[..., 2].any()


def test_sample3_maps_things_and_voids_the_rest(converted: tuple[Path, dict[str, int]]) -> None:
    out, _ = converted
    original = np.asarray(Image.open(SAMPLES / "ADE_val_00000003.png"))
    with _annotation(out, "ADE_val_00000003") as annotation:
        ids = np.asarray(annotation)[..., 0]
    assert set(np.unique(ids).tolist()) == {0, 9, 25, 50, 56, 65}
    for ade150, project in SAMPLE3_THINGS.items():
        expected = original == ade150
        assert expected.sum() > 0
        assert np.array_equal(ids == project, expected), (ade150, project)
    is_thing = np.isin(original, list(SAMPLE3_THINGS))
    assert not ids[~is_thing].any()
    assert (ids == 0).sum() == original.size - is_thing.sum()


@pytest.mark.parametrize("name", NAMES[:2])
def test_samples_without_things_are_all_void(converted: tuple[Path, dict[str, int]], name: str) -> None:
    out, _ = converted
    with _annotation(out, name) as annotation:
        assert not np.asarray(annotation).any()


def test_lut() -> None:
    lut = ade150_to_project_lut()
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert lut[8] == 1 and class_names()[1] == "bed"
    assert lut[150] == 100 and class_names()[100] == "flag"
    assert lut[1] == 0  # wall is stuff
    assert lut[0] == 0 and not lut[151:].any()
    assert sorted(lut[lut > 0].tolist()) == list(range(1, 101))


def test_class_names() -> None:
    names = class_names()
    assert len(names) == 101 and names[0] == "void" and len(set(names)) == 101
    assert class_names(4) == ["void", "class1", "class2", "class3"]


def test_standard_layout_with_missing_split(tmp_path: Path) -> None:
    root = tmp_path / "ADEChallengeData2016"
    (root / "images" / "training").mkdir(parents=True)
    (root / "annotations" / "training").mkdir(parents=True)
    for name in NAMES[2:]:
        (root / "images" / "training" / f"{name}.jpg").write_bytes((SAMPLES / f"{name}.jpg").read_bytes())
        (root / "annotations" / "training" / f"{name}.png").write_bytes((SAMPLES / f"{name}.png").read_bytes())
    out = tmp_path / "out"
    assert convert_ade20k(root, out) == {"training": 1}
    assert (out / "train.txt").read_text() == (
        "images/training/ADE_val_00000003.jpg annotations/training/ADE_val_00000003.png\n"
    )
    assert not (out / "val.txt").exists()


def test_no_data_names_root_and_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        convert_ade20k(tmp_path, tmp_path / "out")
    assert str(tmp_path) in str(error.value)
    assert "images/{training,validation}" in str(error.value)


def test_image_without_annotation_is_reported(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes((SAMPLES / "ADE_val_00000003.jpg").read_bytes())
    with pytest.raises(DataError, match="has no annotation"):
        convert_ade20k(tmp_path, tmp_path / "out")
