"""The seed's data format: every bad input names list file, line, path and problem; decoding rules."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segmodel.data import SegmentationDataset, epoch_order, normalised_batch, to_tensors
from segmodel.samples import check_dataset, load_sample
from segmodel.errors import DataError
from segmodel.lists import read_list
from segmodel.synthetic import generate


def _rgb(h: int = 32, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _annotation(h: int = 32, w: int = 40, top: int = 5) -> np.ndarray:
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[: h // 2, :, 0] = top
    a[h // 2 :, : w // 2, 0] = 1
    return a


def _pair(root: Path, name: str, h: int = 32, w: int = 40, top: int = 5) -> tuple[str, str]:
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "ann").mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb(h, w)).save(root / "img" / f"{name}.jpg", quality=95)
    Image.fromarray(_annotation(h, w, top)).save(root / "ann" / f"{name}.png")
    return f"img/{name}.jpg", f"ann/{name}.png"


def _list(root: Path, lines: list[str], name: str = "list.txt") -> Path:
    p = root / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


def _load_only(list_file: Path, num_classes: int = 101) -> None:
    for s in read_list(list_file):
        load_sample(s, 64, 64, num_classes)


def _assert_names(err: DataError, list_file: Path, line: int | None, path: Path | None, *problem: str) -> None:
    msg = str(err)
    assert str(list_file) in msg, msg
    assert err.list_file == list_file
    if line is not None:
        assert f"{list_file}:{line}:" in msg, msg
        assert err.line == line
    if path is not None:
        assert str(path) in msg, msg
        assert err.path == path
    for word in problem:
        assert word in msg.lower(), msg


# --- bad inputs ---------------------------------------------------------------------------------


def test_a_normalised_batch_is_the_seeds_images_stacked_bit_for_bit() -> None:
    """Every byte value in every channel (the 16x16 batch holds each one three times per channel),
    and odd sizes (vector bodies and scalar tails alike)."""
    values = np.arange(256, dtype=np.uint8)
    for h, w in ((16, 16), (7, 13), (1, 1)):
        rgb = np.stack([np.roll(values, 85 * c)[np.arange(3 * h * w) % 256].reshape(3, h, w) for c in range(3)], axis=-1)
        labels = np.zeros((3, h, w), np.uint8)
        expected = torch.stack([to_tensors(rgb[i], labels[i])[0] for i in range(3)])
        got = normalised_batch(rgb)
        assert got.dtype == torch.float32 and got.is_contiguous() and torch.equal(got, expected)


def test_missing_image(tmp_path: Path) -> None:
    good = _pair(tmp_path, "a")
    lf = _list(tmp_path, ["# header", " ".join(good), "", "img/missing.jpg ann/a.png"])
    with pytest.raises(DataError) as info:
        _load_only(lf)
    _assert_names(info.value, lf, 4, tmp_path / "img" / "missing.jpg", "does not exist")


def test_missing_annotation(tmp_path: Path) -> None:
    img, _ = _pair(tmp_path, "a")
    lf = _list(tmp_path, [f"{img} ann/missing.png"])
    with pytest.raises(DataError) as info:
        _load_only(lf)
    _assert_names(info.value, lf, 1, tmp_path / "ann" / "missing.png", "does not exist")


def test_unreadable_image(tmp_path: Path) -> None:
    _, ann = _pair(tmp_path, "a")
    bad = tmp_path / "img" / "garbage.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    lf = _list(tmp_path, ["", f"img/garbage.jpg {ann}"])
    with pytest.raises(DataError) as info:
        _load_only(lf)
    _assert_names(info.value, lf, 2, bad, "unreadable")


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_truncated_image(tmp_path: Path, fmt: str) -> None:
    _, ann = _pair(tmp_path, "a", 64, 64)
    full = tmp_path / f"full.{fmt}"
    Image.fromarray(_rgb(64, 64)).save(full)
    data = full.read_bytes()
    cut = tmp_path / "img" / f"cut.{fmt}"
    cut.write_bytes(data[: len(data) // 2])
    lf = _list(tmp_path, [f"img/cut.{fmt} {ann}"])
    with pytest.raises(DataError) as info:
        _load_only(lf)
    _assert_names(info.value, lf, 1, cut, "truncated")


def test_annotation_size_differs(tmp_path: Path) -> None:
    img, _ = _pair(tmp_path, "a", 32, 40)
    Image.fromarray(_annotation(32, 41)).save(tmp_path / "ann" / "wide.png")
    lf = _list(tmp_path, [f"{img} ann/wide.png"])
    with pytest.raises(DataError) as info:
        _load_only(lf)
    _assert_names(info.value, lf, 1, tmp_path / "ann" / "wide.png", "size", "41x32", "40x32")


def test_class_id_too_large(tmp_path: Path) -> None:
    img, ann = _pair(tmp_path, "a", top=120)
    lf = _list(tmp_path, [f"{img} {ann}"])
    with pytest.raises(DataError) as info:
        _load_only(lf, num_classes=101)
    _assert_names(info.value, lf, 1, tmp_path / ann, "class id 120", "100")
    _load_only(lf, num_classes=121)  # fine with enough classes


def test_class_id_at_the_limit_is_fine(tmp_path: Path) -> None:
    img, ann = _pair(tmp_path, "a", top=100)
    _load_only(_list(tmp_path, [f"{img} {ann}"]), num_classes=101)


def test_empty_list_file(tmp_path: Path) -> None:
    lf = _list(tmp_path, ["", "# only a comment", "   ", "#another"])
    with pytest.raises(DataError) as info:
        read_list(lf)
    _assert_names(info.value, lf, None, None, "no samples")
    assert info.value.line is None


def test_list_file_does_not_exist(tmp_path: Path) -> None:
    lf = tmp_path / "absent.txt"
    with pytest.raises(DataError) as info:
        read_list(lf)
    _assert_names(info.value, lf, None, None, "does not exist")
    with pytest.raises(DataError):
        SegmentationDataset(lf)


def test_list_file_not_utf8(tmp_path: Path) -> None:
    lf = tmp_path / "latin1.txt"
    lf.write_bytes("img/caf\u00e9.jpg ann/caf\u00e9.png\n".encode("latin-1"))
    with pytest.raises(DataError) as info:
        read_list(lf)
    _assert_names(info.value, lf, None, None, "utf-8")


def test_three_fields(tmp_path: Path) -> None:
    img, ann = _pair(tmp_path, "a")
    lf = _list(tmp_path, [f"{img} {ann}", f"{img} {ann} extra"])
    with pytest.raises(DataError) as info:
        read_list(lf)
    _assert_names(info.value, lf, 2, None, "3 fields")


def test_single_path_without_images_folder(tmp_path: Path) -> None:
    img, _ = _pair(tmp_path, "a")
    lf = _list(tmp_path, [img])  # img/a.jpg: no 'images' folder to map
    with pytest.raises(DataError) as info:
        read_list(lf)
    _assert_names(info.value, lf, 1, tmp_path / img, "annotation")


# --- good inputs --------------------------------------------------------------------------------


def test_single_path_ade_layout(tmp_path: Path) -> None:
    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    Image.fromarray(_rgb()).save(tmp_path / "images" / "training" / "X.jpg")
    Image.fromarray(_annotation()[..., 0]).save(tmp_path / "annotations" / "training" / "X.png")
    lf = _list(tmp_path, ["images/training/X.jpg"])
    (s,) = read_list(lf)
    assert s.image == tmp_path / "images" / "training" / "X.jpg"
    assert s.annotation == tmp_path / "annotations" / "training" / "X.png"
    assert s.line == 1 and s.list_file == lf
    rgb, lab = load_sample(s, 64, 80, 101)
    assert rgb.shape == (64, 80, 3) and lab.shape == (64, 80)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_image_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    _, ann = _pair(tmp_path, "a")
    img = Image.fromarray(_rgb()).convert(mode)
    ext = "png" if mode in ("RGBA", "P") else "jpg"
    img.save(tmp_path / "img" / f"m.{ext}")
    assert Image.open(tmp_path / "img" / f"m.{ext}").mode == mode
    (s,) = read_list(_list(tmp_path, [f"img/m.{ext} {ann}"]))
    rgb, lab = load_sample(s, 64, 64, 101)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert lab.shape == (64, 64) and lab.dtype == np.uint8
    if mode == "L":
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_rgb_annotation_uses_r_channel_and_nearest(tmp_path: Path) -> None:
    h, w = 37, 53
    rng = np.random.default_rng(3)
    r = rng.choice(np.array([0, 3, 17, 42, 99], dtype=np.uint8), size=(h, w))
    ann = np.stack([r, np.full((h, w), 200, np.uint8), np.full((h, w), 250, np.uint8)], axis=-1)
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    Image.fromarray(_rgb(h, w)).save(tmp_path / "img" / "a.jpg")
    Image.fromarray(ann).save(tmp_path / "ann" / "a.png")
    (s,) = read_list(_list(tmp_path, ["img/a.jpg ann/a.png"]))
    for height, width in [(64, 64), (96, 128), (20, 30)]:
        _, lab = load_sample(s, height, width, 101)  # G=200 and B=250 would fail the class check
        assert lab.shape == (height, width)
        assert set(np.unique(lab)) <= {0, 3, 17, 42, 99}
    # same size: exactly the R channel
    _, lab = load_sample(s, h, w, 101)
    assert np.array_equal(lab, r)


def test_grayscale_annotation(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    Image.fromarray(_rgb()).save(tmp_path / "img" / "a.jpg")
    gray = _annotation()[..., 0]
    Image.fromarray(gray).save(tmp_path / "ann" / "a.png")
    (s,) = read_list(_list(tmp_path, ["img/a.jpg ann/a.png"]))
    _, lab = load_sample(s, 32, 40, 101)
    assert np.array_equal(lab, gray)


def test_dataset_tensors(tmp_path: Path) -> None:
    lists = generate(tmp_path, train=3, val=1, size=64)
    ds = SegmentationDataset(lists["train"], 64, 96, 101)
    assert len(ds) == 3
    x, y = ds[0]
    assert x.shape == (3, 64, 96) and x.dtype.is_floating_point
    assert y.shape == (64, 96) and y.dtype == torch.int64


def test_check_dataset_reports_every_error(tmp_path: Path) -> None:
    g1 = _pair(tmp_path, "good1")
    g2 = _pair(tmp_path, "good2")
    big = _pair(tmp_path, "big", top=120)
    lf = _list(
        tmp_path,
        [
            " ".join(g1),
            f"img/missing.jpg {g1[1]}",
            " ".join(big),
            "# comment",
            " ".join(g2),
            f"{g2[0]} ann/missing.png",
        ],
    )
    count, errors = check_dataset(lf, num_classes=101)
    assert count == 5
    assert len(errors) == 3
    assert [e.line for e in errors] == [2, 3, 6]
    assert errors[0].path == tmp_path / "img" / "missing.jpg"
    assert "class id 120" in str(errors[1])
    assert errors[2].path == tmp_path / "ann" / "missing.png"
    assert all(str(lf) in str(e) for e in errors)


def test_check_dataset_malformed_lines_do_not_stop_it(tmp_path: Path) -> None:
    """Malformed lines and bad samples, all reported in one pass, in line order, with a count."""
    g1 = _pair(tmp_path, "good1")
    g2 = _pair(tmp_path, "good2")
    lf = _list(tmp_path, [f"{g1[0]} {g1[1]} extra", " ".join(g1), "flat.jpg", f"img/missing.jpg {g1[1]}",
                          " ".join(g2), "a b c d"])
    count, errors = check_dataset(lf)
    assert count == 6
    assert [e.line for e in errors] == [1, 3, 4, 6]
    assert "got 3 fields" in str(errors[0]) and "images" in str(errors[1]) and "got 4 fields" in str(errors[3])
    assert errors[2].path == tmp_path / "img" / "missing.jpg"
    with pytest.raises(DataError, match="list.txt:1: "):
        read_list(lf)  # jobs still refuse the file at its first bad line


def test_data_check_command_reports_every_problem(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from scheduler.cli import main

    g1 = _pair(tmp_path, "good1")
    lf = _list(tmp_path, ["x y z", " ".join(g1), "img/nope.jpg ann/nope.png", "1 2 3 4"])
    result = CliRunner().invoke(main, ["data", "check", str(lf)])
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == "4 samples checked, 3 bad"
    assert all(f"list.txt:{n}: " in result.output for n in (1, 3, 4))


def test_check_dataset_bad_list_file(tmp_path: Path) -> None:
    count, errors = check_dataset(tmp_path / "absent.txt")
    assert count == 0 and len(errors) == 1 and "does not exist" in str(errors[0])


def test_check_dataset_clean(tmp_path: Path) -> None:
    lists = generate(tmp_path, train=4, val=2, size=64)
    assert check_dataset(lists["train"]) == (4, [])
    assert check_dataset(lists["val"]) == (2, [])


# --- epoch order and synthetic data -------------------------------------------------------------


def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    n = 50
    orders = {e: epoch_order(n, 7, e) for e in range(4)}
    for order in orders.values():
        assert sorted(order.tolist()) == list(range(n))
    assert len({tuple(o.tolist()) for o in orders.values()}) == 4  # differs across epochs
    assert not np.array_equal(epoch_order(n, 8, 0), orders[0])  # and across seeds
    assert np.array_equal(epoch_order(n, 7, 2), orders[2])
    code = (
        "import numpy as np; from segmodel.data import epoch_order; "
        "np.random.seed(123); print(' '.join(str(e) for e in "
        f"[*epoch_order({n}, 7, 0), -1, *epoch_order({n}, 7, 3)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    expected = [*orders[0].tolist(), -1, *orders[3].tolist()]
    assert [int(v) for v in out] == expected


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_generate_is_byte_identical_for_a_seed(tmp_path: Path) -> None:
    a = _hashes(Path(generate(tmp_path / "a", train=6, val=2, size=64, seed=5)["train"]).parent)
    b = _hashes(Path(generate(tmp_path / "b", train=6, val=2, size=64, seed=5)["train"]).parent)
    c = _hashes(Path(generate(tmp_path / "c", train=6, val=2, size=64, seed=6)["train"]).parent)
    assert len(a) == 6 * 2 + 2 * 2 + 2
    assert a == b
    assert a.keys() == c.keys()
    differing = [k for k in a if a[k] != c[k]]
    assert len(differing) >= 6 * 2  # every image and annotation
    assert check_dataset(tmp_path / "a" / "train.txt", num_classes=11) == (6, [])


# --- palette annotations and decompression bombs ------------------------------------------------


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_annotation_reads_the_palette_colours_r_channel(tmp_path: Path, transparency: bool) -> None:
    """A 'P' PNG stores palette indices; the class is the R of the colour each index stands for."""
    h, w = 32, 40
    indices = np.random.default_rng(5).integers(0, 4, size=(h, w), dtype=np.uint8)
    colours = [(0, 0, 0), (7, 200, 10), (3, 1, 250), (42, 42, 42)]  # index i -> class colours[i][0]
    ann = Image.fromarray(indices, mode="P")
    ann.putpalette([c for rgb in colours for c in rgb] + [255, 255, 255] * (256 - len(colours)))
    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    Image.fromarray(_rgb(h, w)).save(tmp_path / "img" / "a.jpg")
    ann.save(tmp_path / "ann" / "a.png", **({"transparency": 0} if transparency else {}))
    assert Image.open(tmp_path / "ann" / "a.png").mode == "P"
    (s,) = read_list(_list(tmp_path, ["img/a.jpg ann/a.png"]))
    _, lab = load_sample(s, h, w, 101)
    expected = np.array([c[0] for c in colours], dtype=np.uint8)[indices]
    assert np.array_equal(lab, expected)


def _bomb(path: Path, side: int) -> None:
    """A PNG of side x side pixels: a few hundred KB on disk, gigabytes once decoded."""
    Image.new("1", (side, side)).save(path)


@pytest.mark.parametrize("side,what", [(14_000, "error"), (10_000, "warning")])
def test_decompression_bombs_are_data_errors_naming_the_file(tmp_path: Path, side: int, what: str) -> None:
    """Over Image.MAX_IMAGE_PIXELS PIL warns, over twice that it raises: both refused, per file."""
    assert side * side > Image.MAX_IMAGE_PIXELS * (2 if what == "error" else 1)
    good = _pair(tmp_path, "good")
    _pair(tmp_path, "victim")
    _bomb(tmp_path / "img" / "victim.jpg", side)
    lf = _list(tmp_path, [" ".join(good), "img/victim.jpg ann/victim.png", " ".join(good)])
    with pytest.raises(DataError) as info:
        _load_only(lf)
    _assert_names(info.value, lf, 2, tmp_path / "img" / "victim.jpg", "decompression bomb")
    count, errors = check_dataset(lf)
    assert count == 3 and len(errors) == 1 and errors[0].line == 2


def test_data_check_reports_bombs_without_a_traceback(tmp_path: Path) -> None:
    _pair(tmp_path, "a")
    _pair(tmp_path, "b")
    _bomb(tmp_path / "img" / "a.jpg", 14_000)
    _bomb(tmp_path / "ann" / "b.png", 10_000)
    lf = _list(tmp_path, ["img/a.jpg ann/a.png", "img/b.jpg ann/b.png"])
    r = subprocess.run([sys.executable, "-m", "scheduler.cli", "data", "check", str(lf)], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, r.stderr
    assert f"{lf}:1: {tmp_path / 'img' / 'a.jpg'}:" in lines[0] and "decompression bomb" in lines[0]
    assert f"{lf}:2: {tmp_path / 'ann' / 'b.png'}:" in lines[1] and "decompression bomb" in lines[1]
    assert "2 samples checked, 2 bad" in r.stdout
