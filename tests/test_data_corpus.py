"""A corrupt-data corpus, and the outcome of every case through the data stage.

`build_corpus(root)` writes one small COCO-format dataset per case under `root` (three ordinary
images plus the case) and returns {case: (image_dir, ann_file, expected)}, where expected is
    {"outcome": "loads" | "skipped" | "undecodable" | "error", "what": a short description, ...}
with the details each outcome is checked by. It is meant to be reused: a one-epoch 05_train.py run
can take each case's folder and file as both its training and its validation data.

    python tests/test_data_corpus.py      # prints the case -> outcome table of docs/01_data.md
"""

import io
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

if __name__ == "__main__":  # printing the table without pytest: find conftest and the stages
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import conftest  # noqa: E402

NAMES = ["cat", "dog"]  # category ids 1 and 2
ORDINARY = [("a.png", (200, 40, 40), [1]), ("b.png", (40, 200, 40), [2]), ("c.png", (40, 40, 200), [1, 2])]


def _jpeg_bytes(image, **save):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


def _exif_rotated():
    stored = Image.new("RGB", (32, 16), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": upright, red is on top
    return _jpeg_bytes(stored, exif=exif)


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _palette():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return _png(image)


def _huge():
    return _jpeg_bytes(Image.new("RGB", (6000, 4000), (90, 120, 150)))


# Image cases: (file name, bytes, labels, expected). "rgb" is the pixel at (x, y) after load_image.
IMAGE_CASES = {
    "damaged JPEG (cut in half)": ("damaged.jpg", lambda: _jpeg_bytes(Image.effect_noise((64, 64), 60).convert("RGB"))[:900],
                                   [1], {"outcome": "undecodable"}),
    "empty file (0 bytes)": ("empty.jpg", lambda: b"", [2], {"outcome": "undecodable"}),
    "text named .jpg": ("notes.jpg", lambda: b"this is not an image\n", [1], {"outcome": "undecodable"}),
    "mislabelled (a red square labelled dog)": ("red.png", lambda: _png(Image.new("RGB", (8, 8), (255, 0, 0))), [2],
                                                {"outcome": "loads", "rgb": ((4, 4), (255, 0, 0)),
                                                 "what": "loads with the labels as annotated: a data stage cannot see a wrong label"}),
    "greyscale (L)": ("grey.png", lambda: _png(Image.new("L", (8, 8), 77)), [1], {"outcome": "loads", "rgb": ((1, 1), (77, 77, 77))}),
    "CMYK JPEG": ("cmyk.jpg", lambda: _jpeg_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0))), [1],
                  {"outcome": "loads", "rgb": ((4, 4), (255, 0, 0))}),
    "RGBA, half transparent": ("alpha.png", lambda: _png(Image.new("RGBA", (8, 8), (255, 0, 0, 128))), [1],
                               {"outcome": "loads", "rgb": ((4, 4), (255, 127, 127)),
                                "what": "loads, composited on white"}),
    "palette (P)": ("palette.png", _palette, [2], {"outcome": "loads", "rgb": ((2, 2), (10, 200, 30))}),
    "16-bit grey (I;16)": ("deep.png", lambda: _png(Image.new("I;16", (8, 8), 32896)), [1],
                           {"outcome": "loads", "rgb": ((1, 1), (128, 128, 128)), "what": "loads, rescaled to 8 bits (not clipped)"}),
    "EXIF-rotated JPEG": ("phone.jpg", _exif_rotated, [1], {"outcome": "loads", "size": (16, 32), "rgb": ((8, 4), (255, 0, 0)),
                                                            "what": "loads upright (turned by its EXIF orientation)"}),
    "tiny (1x1)": ("dot.png", lambda: _png(Image.new("RGB", (1, 1), (9, 99, 199))), [2],
                   {"outcome": "loads", "rgb": ((0, 0), (9, 99, 199))}),
    "huge (6000x4000 JPEG)": ("huge.jpg", _huge, [1], {"outcome": "loads", "size": (6000, 4000)}),
    "PNG bytes named .jpg": ("really_png.jpg", lambda: _png(Image.new("RGB", (8, 8), (1, 2, 3))), [1],
                             {"outcome": "loads", "rgb": ((0, 0), (1, 2, 3))}),
    "file name with spaces": ("my holiday photo.png", lambda: _png(Image.new("RGB", (8, 8), (5, 6, 7))), [2],
                              {"outcome": "loads", "rgb": ((0, 0), (5, 6, 7))}),
}


def _coco(extra=()):
    """The ordinary three images (+ extra [(name, category ids)]) as a COCO dict, image ids 10, 11, ..."""
    listed = [(name, ids) for name, _, ids in ORDINARY] + list(extra)
    images = [{"id": 10 + i, "file_name": name} for i, (name, _) in enumerate(listed)]
    pairs = [(10 + i, c) for i, (_, ids) in enumerate(listed) for c in ids]
    anns = [{"id": k + 1, "image_id": i, "category_id": c} for k, (i, c) in enumerate(pairs)]
    return {"images": images, "annotations": anns, "categories": [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)]}


def _edit(change):
    def make():
        data = _coco()
        change(data)
        return json.dumps(data)
    return make


def _set(section, index, key, value):
    return lambda data: data[section][index].__setitem__(key, value)


def _append(section, entry):
    return lambda data: data[section].append(entry)


def _drop(section, index, key):
    return lambda data: data[section][index].pop(key)


# Annotation cases: (JSON text maker, expected).
JSON_CASES = {
    "truncated JSON": (lambda: json.dumps(_coco())[:150], {"outcome": "error", "match": "instances.json: not valid JSON"}),
    "not a JSON object (a list)": (lambda: "[1, 2, 3]", {"outcome": "error", "match": "JSON object"}),
    "'images' is a dict": (lambda: json.dumps({**_coco(), "images": {"10": "a.png"}}), {"outcome": "error", "match": "'images' must be a list, got a dict"}),
    "no 'categories'": (lambda: json.dumps({k: v for k, v in _coco().items() if k != "categories"}),
                        {"outcome": "error", "match": "'categories'"}),
    "empty 'categories'": (lambda: json.dumps({**_coco(), "categories": []}), {"outcome": "error", "match": "'categories' is empty"}),
    "zero images": (lambda: json.dumps({**_coco(), "images": [], "annotations": []}), {"outcome": "error", "match": "'images' is empty"}),
    "annotation without category_id": (_edit(_drop("annotations", 1, "category_id")),
                                       {"outcome": "error", "match": r"annotations\[1\] has no 'category_id'"}),
    "image without file_name": (_edit(_drop("images", 2, "file_name")), {"outcome": "error", "match": r"images\[2\] has no 'file_name'"}),
    "image id as a string": (_edit(_set("images", 1, "id", "11")), {"outcome": "error", "match": r"images\[1\] has 'id' = '11'"}),
    "category_id as a float": (_edit(_set("annotations", 0, "category_id", 1.5)),
                               {"outcome": "error", "match": r"annotations\[0\] has 'category_id' = 1.5"}),
    "duplicate image id": (_edit(_set("images", 2, "id", 10)), {"outcome": "error", "match": "'images' lists id 10 more than once"}),
    "duplicate category id": (_edit(_append("categories", {"id": 2, "name": "wolf"})),
                              {"outcome": "error", "match": "'categories' lists id 2 more than once"}),
    "annotation with an unknown category_id": (_edit(_append("annotations", {"id": 99, "image_id": 10, "category_id": 7})),
                                               {"outcome": "skipped", "kind": "unknown_category_id",
                                                "names": ["annotation 99: category_id 7"]}),
    "annotation with an unknown image_id": (_edit(_append("annotations", {"id": 98, "image_id": 555, "category_id": 1})),
                                            {"outcome": "skipped", "kind": "unknown_image_id",
                                             "names": ["annotation 98: image_id 555"]}),
    "listed image missing on disk": (_edit(_append("images", {"id": 77, "file_name": "gone.jpg"})),
                                     {"outcome": "skipped", "kind": "missing_files", "names": ["gone.jpg"]}),
}
PATH_CASES = {
    "image folder missing": {"outcome": "error", "match": "no_such_folder"},
    "annotation file missing": {"outcome": "error", "match": "no_such_file.json"},
}
OUTCOMES = {"loads": "loads, correct pixels and labels",
            "undecodable": "training: the next readable image instead; validation: left out (targets -1); "
                           "counted once in `bad_count`; strict: DataError naming the file",
            "skipped": "skipped; strict: DataError naming it"}


def build_corpus(root):
    """Write every case under `root`; {case: (image_dir, ann_file, expected)}."""
    root, corpus = Path(root), {}
    for number, (case, (name, make, ids, expected)) in enumerate(IMAGE_CASES.items()):
        folder = root / f"image{number:02d}"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        for ordinary, colour, _ in ORDINARY:
            Image.new("RGB", (16, 16), colour).save(folder / "images" / ordinary)
        (folder / "images" / name).write_bytes(make())
        (folder / "instances.json").write_text(json.dumps(_coco([(name, ids)])))
        corpus[case] = (folder / "images", folder / "instances.json", {**expected, "file": name, "labels": ids})
    for number, (case, (make, expected)) in enumerate(JSON_CASES.items()):
        folder = root / f"json{number:02d}"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        for ordinary, colour, _ in ORDINARY:
            Image.new("RGB", (16, 16), colour).save(folder / "images" / ordinary)
        (folder / "instances.json").write_text(make())
        corpus[case] = (folder / "images", folder / "instances.json", expected)
    good_images, good_ann = corpus["file name with spaces"][:2]
    corpus["image folder missing"] = (root / "no_such_folder", good_ann, PATH_CASES["image folder missing"])
    corpus["annotation file missing"] = (good_images, root / "no_such_file.json", PATH_CASES["annotation file missing"])
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def one_hot(ids):
    return torch.tensor([float(k + 1 in ids) for k in range(len(NAMES))])


def _case(case):  # how a bad file or entry is handled is policy, not the lesson: hardening
    outcome = {**{k: v[3] for k, v in IMAGE_CASES.items()}, **{k: v[1] for k, v in JSON_CASES.items()}, **PATH_CASES}[case]["outcome"]
    return pytest.param(case, marks=[pytest.mark.hardening] if outcome != "loads" else [])


@pytest.mark.parametrize("case", [_case(case) for case in [*IMAGE_CASES, *JSON_CASES, *PATH_CASES]])
def test_corpus_case_through_the_data_stage(stage01, corpus, case):
    image_dir, ann_file, expected = corpus[case]
    outcome = expected["outcome"]
    if outcome == "error":
        with pytest.raises(ValueError, match=expected["match"]):
            stage01.CocoMultiLabel(image_dir, ann_file)
        return
    if outcome == "skipped":
        ds = stage01.CocoMultiLabel(image_dir, ann_file)
        assert ds.skipped[expected["kind"]] == expected["names"]
        assert sum(map(len, ds.skipped.values())) == 1, ds.skipped
        assert [p.name for p in ds.image_paths] == [name for name, _, _ in ORDINARY]
        torch.testing.assert_close(ds.labels, torch.stack([one_hot(ids) for _, _, ids in ORDINARY]), rtol=0, atol=0)
        with pytest.raises(ValueError, match=str(expected["names"][0]).split(": ")[-1]):
            stage01.CocoMultiLabel(image_dir, ann_file, strict=True)
        return
    transform = stage01.build_transforms(16, train=False)
    train = stage01.CocoMultiLabel(image_dir, ann_file, transform)
    val = stage01.CocoMultiLabel(image_dir, ann_file, transform, substitute=False)
    index = [p.name for p in train.image_paths].index(expected["file"])  # the case's image comes last
    if outcome == "undecodable":
        with pytest.warns(RuntimeWarning, match=expected["file"]):
            image, target = train[index]
        torch.testing.assert_close(target, one_hot(ORDINARY[0][2]), rtol=0, atol=0)  # the next image, wrapped round
        with pytest.warns(RuntimeWarning, match=expected["file"]):
            image, target = val[index]
        assert image.shape == (3, 16, 16) and bool((target == -1).all())
        assert train.bad_count == val.bad_count == 1 and val.skipped["undecodable"] == [expected["file"]]
        with pytest.raises(ValueError, match=expected["file"]):
            stage01.CocoMultiLabel(image_dir, ann_file, transform, strict=True)[index]
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a readable image raises no warning at all
        for ds in (train, val):
            for i in range(len(ds)):
                image, target = ds[i]
                assert image.shape == (3, 16, 16) and image.dtype == torch.float32
                torch.testing.assert_close(target, one_hot(expected["labels"] if i == index else ORDINARY[i][2]), rtol=0, atol=0)
    assert train.bad_count == val.bad_count == 0
    pixels = stage01.load_image(train.image_paths[index])
    assert pixels.mode == "RGB"
    if "size" in expected:
        assert pixels.size == expected["size"]
    if "rgb" in expected:
        (x, y), rgb = expected["rgb"]
        assert all(abs(a - b) <= 2 for a, b in zip(pixels.getpixel((x, y)), rgb, strict=True)), pixels.getpixel((x, y))


def outcome_table(root):
    """The Markdown table case -> outcome for docs/01_data.md, observed by running each case."""
    data = conftest.load_stage(1)
    rows = ["| case | outcome through `01_data` |", "| --- | --- |"]
    for case, (image_dir, ann_file, expected) in build_corpus(root).items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = data.CocoMultiLabel(image_dir, ann_file, substitute=False)
                [ds[i] for i in range(len(ds))]
            seen = data.describe_skipped(ds.skipped)
            text = expected.get("what") or OUTCOMES[expected["outcome"]] + (f"; reported as `{seen}`" if seen else "")
        except ValueError as error:
            text = f"DataError: `{str(error).replace(str(root), '…')}`"
        rows.append(f"| {case} | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print(outcome_table(folder))
