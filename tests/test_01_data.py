"""Tests for stage 1 (01_data.py): labels, bad input, transforms, CutMix, where the data is, loaders.

Every test reaches the stage through the `stage01` fixture, so a learner can run them against
their own file:  Q2L_STAGE_01=my_data.py python -m pytest tests/test_01_data.py
All data is tiny and written into tmp_path; nothing here needs COCO or the network. The built-in
set's generator is tested in test_tools_data.py, the corrupt-data corpus in test_data_corpus.py.
"""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import conftest
import numpy as np
import pytest
import torch
from PIL import Image

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

# A hand-written COCO file: category ids out of order and not contiguous (3, 7, 50, 90), "spoon"
# (50) on no image, image 100 without annotations, a duplicated box, image id 7 = category id 7.
CATEGORIES = [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"},
              {"id": 50, "name": "spoon"}]
IMAGES = [{"id": 42, "file_name": "a.png"}, {"id": 7, "file_name": "b.png"},
          {"id": 100, "file_name": "c.png"}, {"id": 8, "file_name": "d.png"}]
ANNOTATIONS = [(1, 42, 3), (2, 42, 3), (3, 42, 90), (4, 7, 7), (5, 8, 90), (6, 8, 3), (7, 8, 7)]
# rows a, b, c, d; columns car (3), train (7), spoon (50), toothbrush (90)
EXPECTED = [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1]]


def write_coco(root, images=IMAGES, annotations=ANNOTATIONS, categories=CATEGORIES, size=(16, 12)):
    """Write a COCO-format dataset: image i is a flat PNG of colour (40 i, 200 - 40 i, 90)."""
    image_dir = Path(root) / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.new("RGB", size, (40 * i, 200 - 40 * i, 90)).save(image_dir / image["file_name"])
    anns = [{"id": a, "image_id": i, "category_id": c, "bbox": [0, 0, 1, 1]} for a, i, c in annotations]
    ann_file = Path(root) / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return image_dir, ann_file


@pytest.fixture
def tiny(tmp_path):
    return write_coco(tmp_path)


def test_labels_match_hand_written_annotations(stage01, tiny):
    ds = stage01.CocoMultiLabel(*tiny)
    assert ds.cat_ids == [3, 7, 50, 90]
    assert ds.class_names == ["car", "train", "spoon", "toothbrush"]
    assert ds.image_ids == [42, 7, 100, 8]
    assert [p.name for p in ds.image_paths] == ["a.png", "b.png", "c.png", "d.png"]
    assert ds.labels.dtype == torch.float32
    torch.testing.assert_close(ds.labels, torch.tensor(EXPECTED, dtype=torch.float32), rtol=0, atol=0)
    image, target = ds[3]  # no transform: the decoded RGB image
    assert image.mode == "RGB" and image.size == (16, 12)
    torch.testing.assert_close(target, torch.tensor([1.0, 1.0, 0.0, 1.0]), rtol=0, atol=0)


def test_drop_empty_removes_images_without_annotations(stage01, tiny):
    ds = stage01.CocoMultiLabel(*tiny, drop_empty=True)
    assert ds.image_ids == [42, 7, 8]
    assert [p.name for p in ds.image_paths] == ["a.png", "b.png", "d.png"]
    torch.testing.assert_close(ds.labels, torch.tensor([EXPECTED[i] for i in (0, 1, 3)], dtype=torch.float32),
                               rtol=0, atol=0)
    assert "1 without annotations dropped" in ds.summary()


def test_summary_counts(stage01, tiny):
    text = stage01.CocoMultiLabel(*tiny).summary()
    assert "4; 1 without annotations kept as all-negative" in text
    assert "3..90" in text  # category ids, in order
    assert "7 -> 6 positive labels" in text  # the duplicated car box is one label
    assert "1.50 per image (at most 3)" in text  # (2 + 1 + 0 + 3) / 4
    assert "no positives    spoon" in text


def test_dataset_returns_normalised_tensors(stage01, tiny):
    ds = stage01.CocoMultiLabel(*tiny, transform=stage01.build_transforms(24, train=True))
    image, target = ds[0]
    assert image.shape == (3, 24, 24) and image.dtype == torch.float32
    assert target.shape == (4,) and target.dtype == torch.float32


# ----------------------------------------------------------------------------- bad input: tolerant by default, strict on request
@pytest.mark.hardening  # the data policy (tolerant, strict on request), not the lesson
def test_missing_images_are_skipped_and_reported(stage01, tmp_path):
    images = [{"id": i, "file_name": f"{i}.png"} for i in range(5)]
    image_dir, ann_file = write_coco(tmp_path, images=images, annotations=[(1, 0, 3), (2, 3, 7)])
    for i in (1, 2, 4):
        (image_dir / f"{i}.png").unlink()
    ds = stage01.CocoMultiLabel(image_dir, ann_file)
    assert ds.image_ids == [0, 3] and [p.name for p in ds.image_paths] == ["0.png", "3.png"]
    torch.testing.assert_close(ds.labels, torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]]), rtol=0, atol=0)
    assert ds.skipped["missing_files"] == ["1.png", "2.png", "4.png"]
    with pytest.raises(ValueError):
        stage01.CocoMultiLabel(image_dir, ann_file, strict=True)


@pytest.mark.hardening
def test_missing_images_messages(stage01, tmp_path):
    images = [{"id": i, "file_name": f"{i}.png"} for i in range(5)]
    image_dir, ann_file = write_coco(tmp_path, images=images, annotations=[])
    for i in (1, 2, 4):
        (image_dir / f"{i}.png").unlink()
    assert "missing files: 3 (1.png, 2.png, 4.png)" in stage01.CocoMultiLabel(image_dir, ann_file).summary()
    with pytest.raises(stage01.DataError, match=r"strict.*missing files: 3 \(1\.png, 2\.png, 4\.png\)"):
        stage01.CocoMultiLabel(image_dir, ann_file, strict=True)
    with pytest.raises(stage01.DataError, match=r"image folder .*nowhere does not exist"):
        stage01.CocoMultiLabel(tmp_path / "nowhere", ann_file)
    for i in (0, 3):
        (image_dir / f"{i}.png").unlink()
    with pytest.raises(stage01.DataError, match=r"no image left: none of its 5 images is in"):
        stage01.CocoMultiLabel(image_dir, ann_file)


@pytest.mark.hardening  # the data policy (tolerant, strict on request), not the lesson
@pytest.mark.parametrize("bad, field", [((8, 42, 999), "category_id"), ((8, 555, 3), "image_id")])
def test_annotation_with_unknown_id_is_skipped(stage01, tmp_path, bad, field):
    image_dir, ann_file = write_coco(tmp_path, annotations=ANNOTATIONS + [bad])
    ds = stage01.CocoMultiLabel(image_dir, ann_file)
    torch.testing.assert_close(ds.labels, torch.tensor(EXPECTED, dtype=torch.float32), rtol=0, atol=0)
    assert ds.skipped[f"unknown_{field}"] == [f"annotation 8: {field} {bad[1] if field == 'image_id' else bad[2]}"]
    assert sum(map(len, ds.skipped.values())) == 1
    with pytest.raises(ValueError, match=f"annotation 8: {field}"):
        stage01.CocoMultiLabel(image_dir, ann_file, strict=True)


@pytest.mark.hardening  # the data policy (tolerant, strict on request), not the lesson
@pytest.mark.parametrize("section, duplicate", [("images", {"id": 7, "file_name": "a.png"}),
                                                 ("categories", {"id": 50, "name": "fork"})])
def test_duplicate_ids_are_rejected_naming_the_id(stage01, tmp_path, section, duplicate):
    image_dir, ann_file = write_coco(tmp_path)
    data = json.loads(ann_file.read_text())
    data[section].append(duplicate)
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"'{section}' lists id {duplicate['id']} more than once"):
        stage01.CocoMultiLabel(image_dir, ann_file)


@pytest.mark.hardening
def test_malformed_or_truncated_json(stage01, tiny):
    image_dir, ann_file = tiny
    text = ann_file.read_text()
    ann_file.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{ann_file.name}: not valid JSON .*truncated"):
        stage01.CocoMultiLabel(image_dir, ann_file)
    ann_file.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        stage01.CocoMultiLabel(image_dir, ann_file)
    ann_file.write_text(json.dumps({"images": {"1": "a.png"}, "annotations": [], "categories": CATEGORIES}))
    with pytest.raises(ValueError, match="'images' must be a list, got a dict"):
        stage01.CocoMultiLabel(image_dir, ann_file)
    with pytest.raises(ValueError, match=r"annotation file .*absent\.json does not exist"):
        stage01.CocoMultiLabel(image_dir, ann_file.with_name("absent.json"))


@pytest.mark.hardening
def test_json_without_categories_or_with_incomplete_entries(stage01, tiny):
    image_dir, ann_file = tiny
    data = json.loads(ann_file.read_text())
    ann_file.write_text(json.dumps({k: v for k, v in data.items() if k != "categories"}))
    with pytest.raises(ValueError, match=rf"{ann_file.name}: 'categories' must be a list, got nothing"):
        stage01.CocoMultiLabel(image_dir, ann_file)
    ann_file.write_text(json.dumps({**data, "categories": []}))
    with pytest.raises(ValueError, match="'categories' is empty"):
        stage01.CocoMultiLabel(image_dir, ann_file)
    ann_file.write_text(json.dumps({**data, "images": []}))
    with pytest.raises(ValueError, match="'images' is empty"):
        stage01.CocoMultiLabel(image_dir, ann_file)
    data["images"][2]["id"] = "100"
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"images\[2\] has 'id' = '100'; expected an integer"):
        stage01.CocoMultiLabel(image_dir, ann_file)
    data["images"][2]["id"] = 100
    del data["annotations"][1]["image_id"]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotations\[1\] has no 'image_id' field"):
        stage01.CocoMultiLabel(image_dir, ann_file)


def write_bad_images(image_dir):
    (image_dir / "b.png").write_bytes(b"")  # zero bytes
    (image_dir / "c.png").write_bytes(b"this is not an image")
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "JPEG")
    (image_dir / "d.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # truncated


@pytest.mark.hardening  # the data policy (tolerant, strict on request), not the lesson
def test_corrupt_images_raise_when_strict(stage01, tiny):
    image_dir, ann_file = tiny
    write_bad_images(image_dir)
    ds = stage01.CocoMultiLabel(image_dir, ann_file, strict=True)
    for index, name in [(1, r"b\.png"), (2, r"c\.png"), (3, r"d\.png")]:
        with pytest.raises(ValueError, match=name):
            ds[index]


@pytest.mark.hardening
def test_corrupt_image_messages(stage01, tiny):
    image_dir, ann_file = tiny
    write_bad_images(image_dir)
    ds = stage01.CocoMultiLabel(image_dir, ann_file, strict=True)
    for index, problem in [(1, r"b\.png: the file is empty \(0 bytes\)"), (2, r"c\.png: cannot be decoded"),
                           (3, r"d\.png: cannot be decoded")]:
        with pytest.raises(ValueError, match=problem):
            ds[index]


@pytest.mark.hardening  # the data policy (tolerant, strict on request), not the lesson
def test_corrupt_training_image_is_reported_replaced_and_counted(stage01, tiny):
    image_dir, ann_file = tiny
    (image_dir / "b.png").write_bytes(b"")
    ds = stage01.CocoMultiLabel(image_dir, ann_file)
    with pytest.warns(RuntimeWarning, match=r"b\.png"):
        image, target = ds[1]
    assert image.getpixel((0, 0)) == (80, 120, 90)  # c.png, the next image, with its own labels
    torch.testing.assert_close(target, torch.tensor(EXPECTED[2], dtype=torch.float32), rtol=0, atol=0)
    ds[1]  # met again: still one bad file
    assert ds.bad_count == 1 and ds.skipped["undecodable"] == ["b.png"]
    ds.reset_bad_count()
    assert ds.bad_count == 0 and ds.skipped["undecodable"] == []


@pytest.mark.hardening  # the data policy (tolerant, strict on request), not the lesson
def test_corrupt_validation_image_is_left_out_not_substituted(stage01, tiny):
    image_dir, ann_file = tiny
    (image_dir / "b.png").write_bytes(b"")
    ds = stage01.CocoMultiLabel(image_dir, ann_file, transform=stage01.build_transforms(8, train=False),
                                substitute=False)
    with pytest.warns(RuntimeWarning, match=r"b\.png"):
        image, target = ds[1]
    assert image.shape == (3, 8, 8)
    assert bool((target == -1).all()), "unknown targets: every metric leaves this image out"
    torch.testing.assert_close(ds[2][1], torch.tensor(EXPECTED[2], dtype=torch.float32), rtol=0, atol=0)
    assert ds.bad_count == 1


@pytest.mark.hardening  # the data policy (tolerant, strict on request), not the lesson
@pytest.mark.parametrize("substitute", [True, False])
def test_bad_count_counts_files_across_worker_processes(stage01, tiny, substitute):
    image_dir, ann_file = tiny
    write_bad_images(image_dir)  # b, c, d bad
    ds = stage01.CocoMultiLabel(image_dir, ann_file, transform=stage01.build_transforms(8, train=False),
                                substitute=substitute)
    loader = stage01.build_loader(ds, batch_size=1, train=False, workers=2, pin_memory=False)
    targets = torch.cat([y for _, y in loader])
    assert len(targets) == 4
    assert ds.bad_count == 3  # files, not decode attempts (b alone was tried past b, c, d)
    assert sorted(ds.skipped["undecodable"]) == ["b.png", "c.png", "d.png"]
    if not substitute:
        assert bool((targets[1:] == -1).all()) and bool((targets[0] >= 0).all())


def test_starting_an_epoch_leaves_the_callers_rng_alone(stage01, tiny):
    """Exact resume needs the training loop's torch RNG (dropout) to be untouched by the loader."""
    image_dir, ann_file = tiny
    ds = stage01.CocoMultiLabel(image_dir, ann_file, transform=stage01.build_transforms(8, train=True))
    for train in (True, False):
        loader = stage01.build_loader(ds, batch_size=2, train=train, workers=0, pin_memory=False)
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        list(loader)
        assert torch.equal(torch.rand(3), expected), f"train={train}: the loader advanced the torch RNG"


# ----------------------------------------------------------------------------- transforms
def test_transform_shapes_dtypes_and_ranges(stage01):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    low, high = (0 - MEAN) / STD, (1 - MEAN) / STD
    for train in (True, False):
        x = stage01.build_transforms(32, train=train)(image)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert bool(((x >= low - 1e-5) & (x <= high + 1e-5)).all())
    white = stage01.build_transforms(32, train=False)(Image.new("RGB", (7, 5), "white"))
    torch.testing.assert_close(white, high.expand(3, 32, 32), rtol=0, atol=1e-6)


def test_normalisation_matches_torchvision(stage01):
    from torchvision import transforms as T

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (7, 7, 3), dtype=np.uint8))
    expected = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(T.ToTensor()(image))
    x = stage01.build_transforms(7, train=False)(image)  # already 7 x 7: the resize changes nothing
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    assert x.is_contiguous()


def test_cutout_zeroes_one_square(stage01):
    image = Image.new("RGB", (32, 32), (200, 100, 50))  # never the mean colour, so never 0 anywhere
    colour = (torch.tensor([200, 100, 50])[:, None, None] / 255 - MEAN) / STD
    with_cutout = stage01.build_transforms(32, train=True, randaugment=False, hflip=False, cutout=True)
    areas = []
    for seed in range(24):
        torch.manual_seed(seed)
        x = with_cutout(image)
        zero = (x == 0).all(0)  # (S, S)
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        box = zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert bool(box.all()), "the zeroed pixels form one rectangle"
        areas.append(int(zero.sum()))
        torch.testing.assert_close(x[:, ~zero], colour.flatten(1).expand(3, int((~zero).sum())), rtol=0, atol=1e-6)
    assert min(areas) >= 8 * 8 and max(areas) == 16 * 16  # half the side, clipped at the edges
    without = stage01.build_transforms(32, train=True, randaugment=False, hflip=False, cutout=False)
    assert not bool((without(image) == 0).any())


@pytest.mark.parametrize("mode, pixel, expected", [
    ("L", 77, (77, 77, 77)),
    ("CMYK", (255, 0, 0, 0), (0, 255, 255)),
    ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent: the white background
    ("RGBA", (255, 0, 0, 128), (255, 127, 127)),  # half: composited
    ("LA", (0, 255), (0, 0, 0)),
    ("I;16", 65535, (255, 255, 255)),  # 16-bit grey is rescaled, not clipped
    ("I;16", 32896, (128, 128, 128)),
])
def test_image_modes_become_rgb(stage01, tmp_path, mode, pixel, expected):
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    Image.new(mode, (3, 2), pixel).save(path)
    image = stage01.load_image(path)
    assert image.mode == "RGB" and image.size == (3, 2)
    assert all(abs(a - b) <= 1 for a, b in zip(image.getpixel((1, 1)), expected, strict=True))


def test_palette_images_with_and_without_transparency(stage01, tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png")
    image.save(tmp_path / "t.png", transparency=0)  # palette entry 0 is transparent
    plain, clear = stage01.load_image(tmp_path / "p.png"), stage01.load_image(tmp_path / "t.png")
    assert [plain.getpixel((x, 0)) for x in (0, 1)] == [(10, 20, 30), (200, 0, 0)]
    assert [clear.getpixel((x, 0)) for x in (0, 1)] == [(255, 255, 255), (200, 0, 0)]


def test_exif_orientation_is_respected(stage01, tmp_path):
    stored = Image.new("RGB", (32, 16), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image = stage01.load_image(tmp_path / "phone.jpg")
    assert image.size == (16, 32)  # upright: taller than wide, red on top
    red, blue = image.getpixel((8, 6)), image.getpixel((8, 26))
    assert red[0] > 200 and red[2] < 50 and blue[2] > 200 and blue[0] < 50


# ----------------------------------------------------------------------------- CutMix
def test_cutmix_lambda_is_the_pasted_area_and_targets_mix_by_area(stage01):
    B, S = 6, 20
    images = torch.arange(1.0, B + 1)[:, None, None, None].expand(B, 3, S, S).contiguous()  # (B, 3, S, S)
    targets = torch.eye(B)  # (B, K = B): image i has label i only
    cutmix = stage01.CutMix(alpha=1.0, prob=1.0)
    for seed in range(20):
        mixed, soft = cutmix(images, targets, torch.Generator().manual_seed(seed))
        assert mixed.shape == images.shape and soft.shape == targets.shape
        for i in range(B):
            kept = float((mixed[i] == i + 1).float().mean())  # share of image i still showing
            torch.testing.assert_close(soft[i, i], torch.tensor(kept), rtol=0, atol=1e-6)
            if kept < 1:
                j = int(mixed[i][mixed[i] != i + 1][0]) - 1  # the image pasted in
                torch.testing.assert_close(soft[i, j], torch.tensor(1 - kept), rtol=0, atol=1e-6)
        torch.testing.assert_close(soft.sum(1), torch.ones(B), rtol=0, atol=1e-6)
    assert torch.equal(images, torch.arange(1.0, B + 1)[:, None, None, None].expand(B, 3, S, S))  # input kept


def test_cutmix_shared_unknown_probability_and_generator(stage01):
    images = torch.randn(4, 3, 8, 8)
    targets = torch.tensor([[1.0, -1, 0], [1, 0, 0], [1, 1, 0], [1, 0, -1]])  # label 0 in every image
    state = torch.get_rng_state()
    mixed, soft = stage01.CutMix(prob=1.0)(images, targets, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state), "only the given generator is used"
    assert torch.equal(soft[:, 0], torch.ones(4))  # a label shared by both images stays 1
    assert bool((soft[targets < 0] == -1).all())  # unknown stays unknown
    again = stage01.CutMix(prob=1.0)(images, targets, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], mixed) and torch.equal(again[1], soft)
    same = stage01.CutMix(prob=0.0)(images, targets, torch.Generator().manual_seed(3))
    assert torch.equal(same[0], images) and torch.equal(same[1], targets)


# ----------------------------------------------------------------------------- where the data is
TINY_RECIPE = dict(image_size=32, train_images=6, val_images=3)


def test_resolve_dataset_custom_coco_and_built_in(stage01, tmp_path, monkeypatch):
    image_dir, ann_file = write_coco(tmp_path / "mine")
    spec = stage01.resolve_dataset(train_images=image_dir, train_ann=ann_file, val_images=image_dir, val_ann=ann_file)
    assert spec.kind == "custom" and spec.train_ann == str(ann_file)

    coco = tmp_path / "coco"
    for folder in ("train2014", "val2014", "annotations"):
        (coco / folder).mkdir(parents=True)
    for split in ("train", "val"):
        (coco / "annotations" / f"instances_{split}2014.json").write_text("{}")
    spec = stage01.resolve_dataset(data_root=coco, synthetic_root=tmp_path / "never")
    assert spec.kind == "coco2014" and spec.val_images == str(coco / "val2014")
    assert not (tmp_path / "never").exists()

    monkeypatch.chdir(tmp_path)  # no data/coco here: the default root falls back to the built-in set
    spec = stage01.resolve_dataset(synthetic_root=tmp_path / "syn", recipe=TINY_RECIPE)
    assert spec.kind == "synthetic" and Path(spec.train_ann).is_file() and "data/coco" in spec.note
    assert len(list(Path(spec.val_images).glob("*.jpg"))) == 3
    assert stage01.CocoMultiLabel(spec.val_images, spec.val_ann).labels.shape[0] == 3
    before = (tmp_path / "syn" / "recipe.json").stat().st_mtime_ns
    assert stage01.resolve_dataset(synthetic_root=tmp_path / "syn", recipe=TINY_RECIPE).train_ann == spec.train_ann
    assert (tmp_path / "syn" / "recipe.json").stat().st_mtime_ns == before  # found, not redrawn


@pytest.mark.hardening  # a path the user named must exist: no silent fallback to the built-in set
def test_named_paths_that_do_not_exist_are_errors_naming_them(stage01, tmp_path):
    image_dir, ann_file = write_coco(tmp_path / "mine")
    with pytest.raises(ValueError, match="--val-images missing; --val-ann missing"):
        stage01.resolve_dataset(train_images=image_dir, train_ann=ann_file)
    with pytest.raises(ValueError, match="--val-ann .*typo.json not found"):
        stage01.resolve_dataset(train_images=image_dir, train_ann=ann_file, val_images=image_dir,
                                val_ann=tmp_path / "typo.json")
    with pytest.raises(ValueError, match="coco_typo: does not exist"):
        stage01.resolve_dataset(data_root=tmp_path / "coco_typo", synthetic_root=tmp_path / "never")
    coco = tmp_path / "coco"
    (coco / "train2014").mkdir(parents=True)
    with pytest.raises(ValueError, match="incomplete there .*val2014"):
        stage01.resolve_dataset(data_root=coco, synthetic_root=tmp_path / "never")
    assert not (tmp_path / "never").exists()


@pytest.mark.hardening  # the data policy (tolerant, strict on request), not the lesson
def test_a_failing_generator_is_a_data_error_naming_the_command(stage01, tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")  # not a built-in set: the tool refuses (exit 2)
    monkeypatch.chdir(tmp_path)  # no data/coco here
    with pytest.raises(ValueError, match="make_synthetic.py"):
        stage01.resolve_dataset(synthetic_root=tmp_path / "mine", recipe=TINY_RECIPE)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- loaders
class Recorder(torch.utils.data.Dataset):
    """Records which indices were fetched: skipped batches must never be decoded."""

    def __init__(self, n):
        self.n, self.fetched = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.fetched.append(i)
        return i


def epoch_order(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [int(i) for batch in loader for i in batch]


def test_training_order_is_seeded_and_resumes_mid_epoch(stage01):
    loader = stage01.build_loader(Recorder(23), batch_size=4, train=True, workers=0, seed=5)
    assert loader.drop_last and loader.pin_memory == torch.cuda.is_available()  # pinned only for CUDA
    full = epoch_order(loader, 3)
    assert len(full) == 20 and len(set(full)) == 20  # 5 whole batches, the rest dropped
    again = stage01.build_loader(Recorder(23), batch_size=4, train=True, workers=0, seed=5)
    assert epoch_order(again, 3) == full
    assert epoch_order(again, 4) != full
    again.sampler.set_epoch(3)
    again.sampler.set_start_batch(2)
    again.dataset.fetched.clear()
    assert len(again) == 3
    assert [int(i) for batch in again for i in batch] == full[8:]
    assert again.dataset.fetched == full[8:]  # the skipped images were never fetched
    assert epoch_order(again, 3) == full  # set_epoch clears the start batch


def test_distributed_shards(stage01, monkeypatch):
    dataset = Recorder(10)
    train = [list(stage01.ResumableSampler(dataset, 2, num_replicas=3, rank=r, seed=1)) for r in range(3)]
    assert all(len(s) == 3 for s in train) and len(set(sum(train, []))) == 9  # disjoint, equal length
    assert isinstance(stage01.ResumableSampler(dataset, 2, 3, 0), torch.utils.data.DistributedSampler)
    shards = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    for rank in range(3):  # evaluation as rank r of 3 sees it
        monkeypatch.setattr(torch.distributed, "get_rank", lambda rank=rank: rank)
        loader = stage01.build_loader(dataset, 2, train=False, workers=0, distributed=True)
        assert not loader.drop_last
        shards.append([int(i) for batch in loader for i in batch])
    assert [len(s) for s in shards] == [3, 3, 4]  # no padding
    assert sum(shards, []) == list(range(10))  # every index exactly once, in order


def test_build_loader_when_distributed(stage01, tmp_path):
    with pytest.raises(RuntimeError, match="torch.distributed"):
        stage01.build_loader(Recorder(8), 2, train=True, workers=0, distributed=True)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        train = stage01.build_loader(Recorder(8), 2, train=True, workers=0, distributed=True)
        evaluate = stage01.build_loader(Recorder(9), 2, train=False, workers=0, distributed=True)
    finally:
        torch.distributed.destroy_process_group()
    assert isinstance(train.sampler, torch.utils.data.DistributedSampler) and len(train) == 4
    assert list(evaluate.sampler) == list(range(9)) and not evaluate.drop_last


def test_augmentation_depends_only_on_seed_epoch_and_index(stage01, tiny):
    ds = stage01.CocoMultiLabel(*tiny, transform=stage01.build_transforms(24, train=True), seed=7)
    state = torch.get_rng_state()
    first = ds[2][0]
    assert torch.equal(torch.get_rng_state(), state), "the caller's RNG is untouched"
    assert torch.equal(ds[0][0], ds[0][0]) and torch.equal(ds[2][0], first)

    def batches(workers, epoch):
        loader = stage01.build_loader(ds, batch_size=2, train=True, workers=workers, seed=1, pin_memory=False)
        loader.sampler.set_epoch(epoch)  # also the dataset's augmentation epoch, in every worker
        return [x for x, _ in loader]

    serial = batches(0, epoch=3)
    assert all(torch.equal(a, b) for a, b in zip(serial, batches(2, epoch=3), strict=True))
    assert not torch.equal(torch.cat(serial), torch.cat(batches(0, epoch=4)))


# ----------------------------------------------------------------------------- learner mode, end to end
def run_tests_against(files, selection):
    """Run the selected tests once per learner file, all at once (each run is mostly imports)."""
    runs = []
    for path in files:
        env = {k: v for k, v in os.environ.items() if not k.startswith("Q2L_STAGE_")}
        env.update(Q2L_STAGE_01=str(path), Q2L_E2E_CHILD="1")  # the child must not run this test again
        runs.append(subprocess.Popen([sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", __file__,
                                      "-k", selection], cwd=conftest.ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))
    return [(run.communicate(timeout=300)[0], run.returncode) for run in runs]


@pytest.mark.skipif(os.environ.get("Q2L_E2E_CHILD") == "1", reason="already inside the end-to-end run")
def test_learner_mode_end_to_end(tmp_path):
    source = (conftest.ROOT / "01_data.py").read_text()
    line = "labels[rows[pos[ok]], cols[ok]] = 1.0"
    assert source.count("class CutMix:") == 1 and source.count(line) == 1, "update the edits below"
    copy, partial, broken = tmp_path / "my_data.py", tmp_path / "half_done.py", tmp_path / "broken.py"
    copy.write_text(source)
    partial.write_text(source.replace("class CutMix:", "class NotYetCutMix:"))
    broken.write_text(source.replace(line, "labels[pos[ok], cols[ok]] = 1.0"))  # rows in id order, not file order
    (same, code), (half, half_code), (bad, bad_code) = run_tests_against(
        [copy, partial, broken], "(hand_written or cutmix_lambda) and not end_to_end")

    assert code == 0 and "2 passed" in same, same
    assert "learner mode: stage 01_data <- " in same and "my_data.py" in same
    assert half_code == 0 and "1 passed, 1 skipped" in half, half
    assert "half_done.py does not define `CutMix` yet" in half
    assert bad_code == 1 and "1 failed, 1 passed" in bad, bad
    assert "test_labels_match_hand_written_annotations" in bad and "assert_close" in bad


def test_iterating_a_dataset_stops_at_its_end(stage01, tiny_coco):
    """Python iterates a Dataset by index until IndexError; substituting past the end would never stop."""
    dataset = stage01.CocoMultiLabel(tiny_coco["val_images"], tiny_coco["val_ann"])
    assert sum(1 for _ in dataset) == len(dataset)
