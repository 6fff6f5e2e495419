"""Stage 1: the data. Images and their label vectors, ready for a multi-label model.

Query2Label (Liu et al., 2021) predicts, for every image, which of K labels are present: a
target is a vector y in {0, 1}^K, not a single class. This stage builds those vectors from
COCO-format annotations (COCO 2014, your own dataset, or the built-in synthetic one), the
image transforms of the paper's recipe (resize to a square, RandAugment, Cutout), the batch
transform CutMix, and DataLoaders that resume mid-epoch and shard for multi-GPU evaluation.

    python 01_data.py               # generate the built-in dataset if needed, print summaries,
                                    # write docs/figures/01_samples.png
    python 01_data.py --benchmark   # label building at COCO scale, pipeline images/s at 448 px
    python 01_data.py --help

Shapes: B batch, K labels, S image side (square). Batch-first. Next: 02_backbone.py.

Deviations from the official Query2Label loader (SlongLiu/query2labels):
- Its Cutout never runs (an argument is not forwarded); ours works and is tested.
- It builds each label vector per image inside __getitem__; we build the (N, K) matrix once,
  vectorised, and check the annotation file and image folder up front.
- Augmentation randomness is seeded per sample from (seed, epoch, index), so a resumed run
  sees exactly the same images whatever the worker count.
"""

import argparse
import colorsys
import hashlib
import io
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import time
import warnings
from contextlib import nullcontext, redirect_stdout
from dataclasses import asdict, dataclass
from operator import itemgetter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageOps
from pycocotools.coco import COCO
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms as T
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Transparent pixels are composited on white: that is how viewers show them, and dark line
# art drawn on a transparent background (logos, icons) would vanish on black.
BACKGROUND = (255, 255, 255)


class DataError(ValueError):
    """Dataset input the user can fix; the message names the file and what is wrong."""


class MissingImagesError(DataError, FileNotFoundError):
    """Images listed in the annotation file are not in the image folder."""


class CorruptImageError(DataError):
    """An image file that is empty or cannot be decoded."""


# ----------------------------------------------------------------------------- annotations
REQUIRED = {"images": ("id", "file_name"), "annotations": ("id", "image_id", "category_id"),
            "categories": ("id", "name")}


def _first_bad_entry(data, ann_file):
    """The error for the first entry that lacks a required field (only run once reading failed)."""
    for section, keys in REQUIRED.items():
        for i, entry in enumerate(data[section]):
            missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if missing:
                return DataError(f"{ann_file}: {section}[{i}] has no {missing[0]!r} field "
                                 f"(every entry needs {', '.join(keys)}); got {str(entry)[:120]}")
    return None


def file_fingerprint(path):
    """A short content hash of a file: a checkpoint records its validation annotations' one, so that
    evaluating it later can tell when that file (e.g. a regenerated built-in set) has changed."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def read_coco(ann_file):
    """Load and check a COCO instances JSON, then index it with pycocotools."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} does not exist")
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{ann_file}: not valid JSON ({error}); the file has "
                        f"{ann_file.stat().st_size:,} bytes: is it truncated?") from None
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: expected a JSON object with 'images', 'annotations' and "
                        f"'categories', got a {type(data).__name__}")
    for section in REQUIRED:
        if not isinstance(data.get(section), list):
            raise DataError(f"{ann_file}: no {section!r} list (found keys: {sorted(data)}); a COCO "
                            f"instances file has 'images', 'annotations' and 'categories'")
    for section, why in [("categories", "there are no labels to learn"), ("images", "there is nothing to load")]:
        if not data[section]:
            raise DataError(f"{ann_file}: {section!r} is empty, so {why}")
    coco = COCO()  # built from the checked dict: pycocotools' own loader would print and crash raw
    coco.dataset = data
    try:
        with redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco.createIndex()
    except (KeyError, TypeError) as error:
        raise (_first_bad_entry(data, ann_file)
               or DataError(f"{ann_file}: pycocotools cannot index it ({error!r})")) from None
    return coco


def _ids(entries, key, section, ann_file):
    """One integer field of every entry, as an int64 array (fast: no Python-level indexing)."""
    try:
        return np.fromiter(map(itemgetter(key), entries), dtype=np.int64, count=len(entries))
    except (KeyError, TypeError, ValueError):
        bad = next(i for i, e in enumerate(entries) if not isinstance(e.get(key), int))
        raise DataError(f"{ann_file}: {section}[{bad}] has {key!r} = {entries[bad].get(key)!r}; "
                        f"COCO ids are integers") from None


def _lookup(known, wanted):
    """Position of each `wanted` id in the 1-D array `known` (sorted), and a mask of unknown ids."""
    pos = np.searchsorted(known, wanted).clip(0, len(known) - 1)
    return pos, known[pos] != wanted


def _unknown_error(ann_file, what, anns, values, bad, known):
    examples = ", ".join(f"annotation {anns[i]['id']} -> {what} {values[i]}" for i in np.flatnonzero(bad)[:5])
    return DataError(f"{ann_file}: {int(bad.sum())} annotation(s) refer to a {what} that is not "
                     f"listed ({examples}); listed ids span {known.min()}..{known.max()}")


def build_label_matrix(coco, ann_file="annotations"):
    """The (N, K) 0/1 label matrix from the annotations alone, vectorised.

    Category ids need not be contiguous (COCO's 80 classes use ids 1..90): column k holds
    category cat_ids[k], with cat_ids sorted. Rows follow the order of the file's 'images'.
    Returns labels (N, K) float32, cat_ids, class_names, image_ids, file_names.
    """
    cat_ids = np.array(sorted(coco.getCatIds()), dtype=np.int64)
    if len(coco.cats) != len(coco.dataset["categories"]):
        raise DataError(f"{ann_file}: 'categories' lists the same id twice")
    if len(coco.imgs) != len(coco.dataset["images"]):
        raise DataError(f"{ann_file}: 'images' lists the same id twice")
    try:
        class_names = [c["name"] for c in coco.loadCats(cat_ids.tolist())]
        file_names = [image["file_name"] for image in coco.dataset["images"]]
    except KeyError:
        raise _first_bad_entry(coco.dataset, ann_file) from None
    images = coco.dataset["images"]
    image_ids = _ids(images, "id", "images", ann_file)
    anns = coco.dataset["annotations"]
    ann_images = _ids(anns, "image_id", "annotations", ann_file)
    ann_cats = _ids(anns, "category_id", "annotations", ann_file)

    order = np.argsort(image_ids)  # row of each image id, through a sorted copy
    pos, unknown = _lookup(image_ids[order], ann_images)
    if unknown.any():
        raise _unknown_error(ann_file, "image_id", anns, ann_images, unknown, image_ids)
    cols, unknown = _lookup(cat_ids, ann_cats)
    if unknown.any():
        raise _unknown_error(ann_file, "category_id", anns, ann_cats, unknown, cat_ids)
    labels = np.zeros((len(images), len(cat_ids)), dtype=np.float32)  # (N, K)
    labels[order[pos], cols] = 1.0  # several boxes of one class still make a single 1
    return labels, cat_ids.tolist(), class_names, image_ids.tolist(), file_names


def find_missing_images(image_dir, file_names):
    """File names not present in image_dir: one directory listing per folder, no per-file stat."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist")
    listed = {}
    missing = []
    for name in file_names:
        folder, _, base = name.rpartition("/")
        if folder not in listed:
            try:
                listed[folder] = {e.name for e in os.scandir(image_dir / folder)}
            except (FileNotFoundError, NotADirectoryError):
                listed[folder] = set()
        if base not in listed[folder]:
            missing.append(name)
    return missing


# ----------------------------------------------------------------------------- images
def to_rgb(image, background=BACKGROUND):
    """Any PIL image as 8-bit RGB: grey, palette, CMYK converted; alpha composited on `background`."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):  # 16-bit grey: rescale, since convert() would clip at 255
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).round().astype(np.uint8))
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def load_image(path, background=BACKGROUND):
    """Decode an image file as RGB, upright as its EXIF orientation says; CorruptImageError if unreadable."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise CorruptImageError(f"{path}: the file is empty (0 bytes)")
    try:
        with Image.open(path) as image:
            ImageOps.exif_transpose(image, in_place=True)  # decodes the pixels, then turns them
            return to_rgb(image, background)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"{path}: cannot be decoded as an image ({error})") from None


# ----------------------------------------------------------------------------- built-in dataset
def _regular(n, radius=1.0, phase=-math.pi / 2, center=(0.0, 0.0)):
    angle = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([radius * np.cos(angle) + center[0], radius * np.sin(angle) + center[1]], 1)


def _star(points=5, inner=0.42):
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    angle = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)


def _heart():
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], 1) / 16.5


_W = 0.34  # half width of the cross's arms
# Each shape: polygons in unit coordinates (y down), drawn in order; 1 fills, 0 cuts a hole.
SHAPES = {
    "circle": [(_regular(48), 1)],
    "ring": [(_regular(48), 1), (_regular(48, 0.55), 0)],
    "crescent": [(_regular(48), 1), (_regular(48, 0.8, center=(0.42, -0.12)), 0)],
    "star": [(_star(), 1)],
    "triangle": [(_regular(3), 1)],
    "square": [(_regular(4, phase=math.pi / 4), 1)],
    "diamond": [(np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]]), 1)],
    "hexagon": [(_regular(6, phase=0), 1)],
    "cross": [(np.array([[-_W, -1], [_W, -1], [_W, -_W], [1, -_W], [1, _W], [_W, _W], [_W, 1],
                         [-_W, 1], [-_W, _W], [-1, _W], [-1, -_W], [-_W, -_W]]), 1)],
    "heart": [(_heart(), 1)],
    "arrow": [(np.array([[-1, -0.22], [0.15, -0.22], [0.15, -0.62], [1, 0], [0.15, 0.62],
                         [0.15, 0.22], [-1, 0.22]]), 1)],
    "bolt": [(np.array([[0.1, -1], [0.6, -1], [0.2, -0.2], [0.55, -0.2], [-0.35, 1],
                        [-0.05, 0.1], [-0.45, 0.1]]), 1)],
}
# A scene is what makes labels co-occur: each image is one scene, and a scene draws its shapes
# with these relative frequencies (plus a few strays from anywhere), as street scenes in COCO
# make "car" and "traffic light" likely together.
SCENES = {
    "night sky": {"crescent": 3, "star": 4, "circle": 2, "bolt": 2},
    "road signs": {"triangle": 3, "arrow": 4, "diamond": 2, "hexagon": 2, "square": 1},
    "valentine": {"heart": 4, "ring": 2, "diamond": 2, "star": 1, "arrow": 1},
    "toy blocks": {"square": 3, "triangle": 2, "hexagon": 2, "circle": 2, "cross": 3, "ring": 1},
}
SYNTHETIC_VERSION = 1  # bump when the drawing code changes: the stored hash then forces a rebuild


@dataclass(frozen=True)
class SyntheticRecipe:
    """Everything the built-in dataset depends on (with the seed); the difficulty knobs live here."""

    image_size: int = 64  # native side in pixels
    train_images: int = 8000
    val_images: int = 1000
    min_objects: int = 1
    max_objects: int = 4
    min_scale: float = 0.25  # object size as a fraction of the image side, log-uniform
    max_scale: float = 0.6
    max_rotation: float = 30.0  # degrees either way
    aspect_jitter: float = 0.2  # width/height stretched by up to this factor either way
    max_occlusion: float = 0.4  # at most this fraction of an object is hidden by later ones
    clutter: int = 4  # up to this many distractor strokes and dots
    stray_prob: float = 0.15  # chance that an object ignores its scene
    min_contrast: int = 60  # least luminance difference (0..255) between a shape and what is under it
    jpeg_quality: int = 90


def recipe_hash(recipe, seed):
    text = json.dumps({"recipe": asdict(recipe), "seed": seed, "version": SYNTHETIC_VERSION},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _luminance(rgb):
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _clutter(draw, rng, S, count, scale):
    """Distractors no class looks like: straight strokes, wiggly lines and dots."""
    for _ in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        if kind == 0:
            draw.line([tuple(p) for p in rng.uniform(0, S, (2, 2))], fill=colour,
                      width=int(rng.integers(1, 3) * scale))
        elif kind == 1:
            start = rng.uniform(0, S, 2)
            steps = np.cumsum(rng.normal(0, S / 12, (int(rng.integers(3, 7)), 2)), 0)
            draw.line([tuple(p) for p in start + steps], fill=colour, width=scale, joint="curve")
        else:
            x, y = rng.uniform(0, S, 2)
            r = rng.uniform(0.5, 1.5) * scale
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def render_synthetic_image(recipe, rng):
    """Draw one image of the built-in dataset.

    Returns (PIL RGB image, scene name, objects), objects = [(shape name, [x, y, w, h] of its
    visible part, visible area)] in native pixels. Shapes are drawn at twice the size and
    averaged down, so small ones keep smooth edges.
    """
    ss = 2
    S = recipe.image_size * ss
    corners = rng.uniform(0, 255, (2, 2, 3)).astype(np.uint8)  # background: a smooth random gradient
    canvas = Image.fromarray(corners).resize((S, S), Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    _clutter(draw, rng, S, int(rng.integers(0, recipe.clutter + 1)), ss)

    scene = list(SCENES)[rng.integers(len(SCENES))]
    names, weights = zip(*SCENES[scene].items(), strict=True)
    owner = np.full((S, S), -1, dtype=np.int16)  # which object is visible at each pixel
    full, visible, objects, boxes = [], [], [], []
    for _ in range(rng.integers(recipe.min_objects, recipe.max_objects + 1)):
        if rng.random() < recipe.stray_prob:
            name = list(SHAPES)[rng.integers(len(SHAPES))]
        else:
            name = names[rng.choice(len(names), p=np.array(weights) / sum(weights))]
        for _attempt in range(10):  # find a place that hides no earlier object too much
            size = S * math.exp(rng.uniform(math.log(recipe.min_scale), math.log(recipe.max_scale)))
            stretch = math.exp(rng.uniform(-1, 1) * math.log1p(recipe.aspect_jitter))
            theta = math.radians(rng.uniform(-recipe.max_rotation, recipe.max_rotation))
            radius = min(size / 2 * max(stretch, 1 / stretch), S / 2)
            centre = rng.uniform(radius, S - radius, 2)
            rotate = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
            scale = np.array([stretch, 1 / stretch]) * size / 2
            x0, y0 = (centre - radius).astype(int)  # work inside the shape's box only
            x1, y1 = np.ceil(centre + radius).astype(int).clip(max=S)
            mask_image = Image.new("L", (x1 - x0, y1 - y0), 0)
            mask_draw = ImageDraw.Draw(mask_image)
            for polygon, fill in SHAPES[name]:
                points = (polygon * scale) @ rotate.T + centre - (x0, y0)  # (P, 2)
                mask_draw.polygon([tuple(p) for p in points], fill=255 * fill)
            mask = np.asarray(mask_image) > 0  # (h, w)
            region = owner[y0:y1, x0:x1]  # a view: writing to it marks the canvas
            hidden = np.bincount(region[mask] + 1, minlength=len(objects) + 1)[1:]
            if mask.any() and all(v - h >= (1 - recipe.max_occlusion) * f
                                  for v, h, f in zip(visible, hidden, full, strict=True)):
                break
        else:
            continue  # no room: fewer objects in this image
        under = np.asarray(canvas.crop((x0, y0, x1, y1)))[mask].mean(0)
        for _attempt in range(10):  # any colour, as long as the shape stands out from what is under it
            rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.3, 1), rng.uniform(0.15, 1))
            colour = tuple(int(255 * c) for c in rgb)
            if abs(_luminance(colour) - _luminance(under)) >= recipe.min_contrast:
                break
        else:
            colour = (0, 0, 0) if _luminance(under) > 127 else (255, 255, 255)
        canvas.paste(colour, (int(x0), int(y0), int(x1), int(y1)), mask=mask_image)
        visible = [v - h for v, h in zip(visible, hidden, strict=True)] + [int(mask.sum())]
        full.append(int(mask.sum()))
        region[mask] = len(objects)
        objects.append(name)
        boxes.append((x0, y0, x1, y1))
    _clutter(draw, rng, S, int(rng.integers(0, recipe.clutter // 2 + 1)), ss)  # some on top

    annotated = []
    for k, (name, (x0, y0, x1, y1)) in enumerate(zip(objects, boxes, strict=True)):
        ys, xs = np.nonzero(owner[y0:y1, x0:x1] == k)  # the visible part only
        box = [(x0 + xs.min()) / ss, (y0 + ys.min()) / ss, (xs.max() + 1 - xs.min()) / ss,
               (ys.max() + 1 - ys.min()) / ss]
        annotated.append((name, [round(float(v), 2) for v in box], round(visible[k] / ss**2, 2)))
    return canvas.reduce(ss), scene, annotated


def _render_chunk(job):
    """Worker: draw and save images `indices` of one split; each from its own (seed, split, index) RNG."""
    recipe, seed, split, indices, folder = job
    records = []
    for index in indices:
        rng = np.random.default_rng([seed, ("train", "val").index(split), index])
        image, scene, objects = render_synthetic_image(recipe, rng)
        name = f"{index:06d}.jpg"
        image.save(Path(folder) / name, quality=recipe.jpeg_quality)
        records.append((index, name, scene, objects))
    return records


def _write_split(root, split, count, recipe, seed, workers):
    folder = root / split
    folder.mkdir(parents=True)
    jobs = [(recipe, seed, split, range(i, min(i + 100, count)), str(folder)) for i in range(0, count, 100)]
    bar = tqdm(total=count, desc=f"drawing {split}", unit="img", leave=False)
    records = []
    with multiprocessing.Pool(workers) if workers > 1 and count > 200 else nullcontext() as pool:
        for chunk in (pool.imap if pool else map)(_render_chunk, jobs):  # small jobs: no pool to start
            records += chunk
            bar.update(len(chunk))
    bar.close()
    categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPES)]
    cat_id = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for index, name, scene, objects in records:
        images.append({"id": index + 1, "file_name": name, "width": recipe.image_size,
                       "height": recipe.image_size, "scene": scene})
        for shape, box, area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": cat_id[shape], "bbox": box, "area": area, "iscrowd": 0})
    data = {"info": {"description": "Query2Label built-in synthetic shapes", "recipe": asdict(recipe),
                     "seed": seed}, "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations").mkdir(exist_ok=True)
    with open(root / "annotations" / f"instances_{split}.json", "w") as f:
        json.dump(data, f)


@dataclass
class DatasetSpec:
    """Where a run's images and annotations are, and a human-readable note on how they were chosen."""

    kind: str  # "coco2014" | "custom" | "synthetic"
    train_images: str
    train_ann: str
    val_images: str
    val_ann: str
    note: str = ""


def ensure_synthetic(root="data/synthetic", seed=0, recipe=None, workers=None):
    """The built-in dataset under `root`, drawn now if it is missing or its recipe changed."""
    recipe = recipe or SyntheticRecipe()
    root = Path(root)
    key = recipe_hash(recipe, seed)
    spec = DatasetSpec("synthetic", str(root / "train"), str(root / "annotations/instances_train.json"),
                       str(root / "val"), str(root / "annotations/instances_val.json"))
    stamp = root / "recipe.json"
    found = json.loads(stamp.read_text()).get("hash") if stamp.is_file() else None
    if found == key:
        spec.note = f"built-in synthetic dataset found at {root} (recipe {key})"
        return spec
    if root.exists() and found is None and any(root.iterdir()):
        raise DataError(f"{root} exists but holds no built-in dataset (no recipe.json); "
                        f"refusing to overwrite it: choose another --synthetic-root")
    start = time.perf_counter()
    workers = workers or min(4, os.cpu_count() or 1)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")  # a run stopped half-way leaves root intact
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_split(tmp, "train", recipe.train_images, recipe, seed, workers)
    _write_split(tmp, "val", recipe.val_images, recipe, seed, workers)
    (tmp / "recipe.json").write_text(json.dumps({"hash": key, "seed": seed, "recipe": asdict(recipe),
                                                 "version": SYNTHETIC_VERSION}, indent=1))
    if stamp.is_file() and json.loads(stamp.read_text()).get("hash") == key:
        shutil.rmtree(tmp)  # another process (e.g. another DDP rank) finished the same set first
    else:
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    why = "it was missing" if found is None else "its recipe changed"
    spec.note = (f"built-in synthetic dataset generated at {root} because {why}: {recipe.train_images} "
                 f"train + {recipe.val_images} val images in {time.perf_counter() - start:.1f} s "
                 f"(seed {seed}, recipe {key})")
    return spec


def resolve_dataset(data_root="data/coco", train_images=None, train_ann=None, val_images=None,
                    val_ann=None, synthetic_root="data/synthetic", seed=0, recipe=None):
    """Pick the data for a run: your own paths, else COCO 2014 under data_root, else the built-in set."""
    given = {"--train-images": train_images, "--train-ann": train_ann, "--val-images": val_images,
             "--val-ann": val_ann}
    if any(given.values()):
        missing = [flag for flag, value in given.items() if not value]
        if missing:
            raise DataError(f"a custom dataset needs all four paths; missing {', '.join(missing)}")
        absent = [f"{flag} {value}" for flag, value in given.items() if not Path(value).exists()]
        if absent:
            raise FileNotFoundError(f"custom dataset: not found: {'; '.join(absent)}")
        return DatasetSpec("custom", str(train_images), str(train_ann), str(val_images), str(val_ann),
                           note=f"custom COCO-format dataset: train {train_ann}, val {val_ann}")
    root = Path(data_root)
    coco = DatasetSpec("coco2014", str(root / "train2014"), str(root / "annotations/instances_train2014.json"),
                       str(root / "val2014"), str(root / "annotations/instances_val2014.json"))
    layout = [coco.train_images, coco.train_ann, coco.val_images, coco.val_ann]
    absent = [path for path in layout if not Path(path).exists()]
    if not absent:
        coco.note = f"COCO 2014 found under {root}"
        return coco
    spec = ensure_synthetic(synthetic_root, seed=seed, recipe=recipe)
    spec.note += (f". COCO 2014 was not found under {root} (missing: {', '.join(absent)}); to train on it, "
                  f"unpack train2014/, val2014/ and annotations/ there (or pass --data-root), or give "
                  f"your own dataset with --train-images --train-ann --val-images --val-ann")
    return spec


# ----------------------------------------------------------------------------- transforms
class Cutout:
    """Zero a random square, `fraction` of the image side, centred anywhere (clipped at the edges).

    Runs after normalisation, so zero is the dataset's mean colour. (The official Query2Label
    Cutout never runs: its size argument is not forwarded.) Labels stay as they are, though the
    square may hide an object: that is the regularisation Cutout trades for.
    """

    def __init__(self, fraction=0.5):
        self.fraction = fraction

    def __call__(self, image):  # (3, S, S)
        _, H, W = image.shape
        h, w = round(H * self.fraction), round(W * self.fraction)
        cy, cx = int(torch.randint(H, ())), int(torch.randint(W, ()))
        image[:, max(cy - h // 2, 0):cy + h - h // 2, max(cx - w // 2, 0):cx + w - w // 2] = 0
        return image

    def __repr__(self):
        return f"Cutout(fraction={self.fraction})"


class ToNormalizedTensor:
    """PIL RGB image -> float32 (3, S, S) holding (x / 255 - mean) / std.

    The same numbers as torchvision's ToTensor then Normalize, in one multiply-add instead of
    three passes over the float image: at 448 px this is about half the CPU time.
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        std = torch.tensor(std)[:, None, None]  # (3, 1, 1)
        self.scale, self.shift = 1 / (255 * std), -torch.tensor(mean)[:, None, None] / std

    def __call__(self, image):
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, S, S)
        return torch.addcmul(self.shift, x.float(), self.scale)

    def __repr__(self):
        return "ToNormalizedTensor(ImageNet mean and std)"


def build_transforms(img_size, train, randaugment=True, cutout=True, hflip=True, cutout_fraction=0.5):
    """PIL image -> normalised float32 tensor (3, S, S). Training adds the paper's augmentation.

    Randomness comes from torch's global RNG, which CocoMultiLabel seeds per sample.
    """
    steps = [to_rgb, T.Resize((img_size, img_size))]
    if train and hflip:
        steps.append(T.RandomHorizontalFlip())
    if train and randaugment:
        steps.append(T.RandAugment())  # 2 ops of magnitude 9 out of 31, as the official recipe
    steps.append(ToNormalizedTensor())
    if train and cutout:
        steps.append(Cutout(cutout_fraction))
    return T.Compose(steps)


# ----------------------------------------------------------------------------- the dataset
class CocoMultiLabel(Dataset):
    """A COCO-format dataset as (image, label vector) pairs.

    Labels come from the annotation file alone; the image folder is checked once, up front.
    Images without annotations stay in as all-negative targets (as the Query2Label loader does)
    unless drop_empty=True (as the ASL loader does): the two give slightly different mAP.
    A corrupt image met while loading is reported, counted in `bad_count`, and replaced by the
    next readable image (with that image's labels); strict=True raises instead.
    """

    def __init__(self, image_dir, ann_file, transform=None, drop_empty=False, strict=False, seed=0):
        self.image_dir, self.ann_file = Path(image_dir), Path(ann_file)
        self.transform, self.drop_empty, self.strict, self.seed = transform, drop_empty, strict, seed
        coco = read_coco(self.ann_file)
        self.num_annotations = len(coco.dataset["annotations"])
        labels, self.cat_ids, self.class_names, image_ids, file_names = build_label_matrix(coco, self.ann_file)
        empty = labels.sum(1) == 0
        self.num_empty = int(empty.sum())
        if drop_empty:
            keep = np.flatnonzero(~empty)
            labels, image_ids, file_names = labels[keep], [image_ids[i] for i in keep], [file_names[i] for i in keep]
        missing = find_missing_images(self.image_dir, file_names)
        if missing:
            raise MissingImagesError(f"{len(missing)} of {len(file_names)} images listed in {self.ann_file} "
                                     f"are not in {self.image_dir}, e.g. {', '.join(missing[:5])}")
        self.labels = torch.from_numpy(labels)  # (N, K)
        self.image_ids = image_ids
        self.image_paths = [self.image_dir / name for name in file_names]
        # Shared memory, so DataLoader workers (even persistent ones) see set_epoch and add to the count.
        self._epoch = multiprocessing.Value("q", 0)
        self._bad = multiprocessing.Value("q", 0)

    def __len__(self):
        return len(self.image_paths)

    def set_epoch(self, epoch):
        self._epoch.value = int(epoch)

    @property
    def bad_count(self):
        return self._bad.value

    def reset_bad_count(self):
        self._bad.value = 0

    def _load(self, index):
        """Decode image `index`; a corrupt one is reported and replaced by the next readable image."""
        for step in range(len(self)):
            j = (index + step) % len(self)
            try:
                return load_image(self.image_paths[j]), j
            except CorruptImageError as error:
                if self.strict:
                    raise
                with self._bad.get_lock():
                    self._bad.value += 1
                warnings.warn(f"{error}; using image {self.image_paths[(j + 1) % len(self)].name} "
                              f"in its place", RuntimeWarning, stacklevel=3)
        raise DataError(f"not one image in {self.image_dir} could be decoded")

    def __getitem__(self, index):
        image, used = self._load(index)
        if self.transform is not None:
            epoch = self._epoch.value
            seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
            state = random.getstate()
            with torch.random.fork_rng(devices=[]):  # the caller's torch RNG stays untouched
                torch.default_generator.manual_seed(seed)  # CPU only: transforms run on the CPU
                random.seed(seed)
                try:
                    image = self.transform(image)
                finally:
                    random.setstate(state)  # and so does Python's
        return image, self.labels[used].clone()

    def summary(self):
        """What this dataset holds, in a few lines: sizes, label statistics, how empty images count."""
        N, K = self.labels.shape
        per_class = self.labels.sum(0)  # (K,) images showing each class
        per_image = self.labels.sum(1)  # (N,) labels in each image
        contiguous = self.cat_ids == list(range(self.cat_ids[0], self.cat_ids[0] + K))
        if self.drop_empty:
            empty = f"{self.num_empty:,} without annotations dropped (drop_empty=True)"
        else:
            empty = (f"{self.num_empty:,} without annotations kept as all-negative targets "
                     f"(drop_empty=True drops them)")
        top = per_class.argsort(descending=True)
        frequent = ", ".join(f"{self.class_names[k]} {int(per_class[k]):,}" for k in top[:5])
        absent = [self.class_names[k] for k in range(K) if per_class[k] == 0]
        return "\n".join([
            f"{self.ann_file} ({self.image_dir})",
            f"  images          {N:,}; {empty}",
            f"  classes         {K} (category ids {self.cat_ids[0]}..{self.cat_ids[-1]}"
            f"{'' if contiguous else ', not contiguous: mapped to 0..' + str(K - 1) + ' in id order'})",
            f"  annotations     {self.num_annotations:,} -> {int(per_image.sum()):,} positive labels",
            f"  labels/image    {per_image.mean():.2f} mean, {int(per_image.max()) if N else 0} max",
            f"  most frequent   {frequent}",
            f"  no positives    {', '.join(absent) if absent else 'none'}"
            + (" (no AP for these: mAP leaves them out)" if absent else ""),
        ])


# ----------------------------------------------------------------------------- CutMix
class CutMix:
    """Multi-label CutMix (Yun et al., 2019) on a batch: paste a box from a shuffled copy.

        lam ~ Beta(alpha, alpha);  box side = sqrt(1 - lam) * image side, centred anywhere;
        lam = 1 - (area of the box after clipping to the image) / (S * S)
        y = lam * y_a + (1 - lam) * y_b        (area-weighted soft targets)

    Why area-weighted rather than the union max(y_a, y_b): a label shared by both images stays
    1 and a label in neither stays 0, while a label from one image only gets the share of the
    picture that image still covers, which is roughly the chance its object is still in view.
    The union would claim, with full confidence, objects the box may have pasted over. Unknown
    entries (< 0, ignored by the loss) stay unknown if either image has them unknown.
    With probability 1 - prob the batch is returned unchanged.
    """

    def __init__(self, alpha=1.0, prob=0.5):
        self.alpha, self.prob = alpha, prob

    def __call__(self, images, targets, generator=None):  # (B, 3, S, S), (B, K)
        B, _, H, W = images.shape
        # One draw from `generator` seeds everything else, so the caller controls all randomness.
        device = generator.device if generator is not None else "cpu"
        rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator, device=device)))
        if rng.random() >= self.prob:
            return images, targets
        lam = float(rng.beta(self.alpha, self.alpha))
        h, w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        y0, y1 = max(cy - h // 2, 0), min(cy + h - h // 2, H)
        x0, x1 = max(cx - w // 2, 0), min(cx + w - w // 2, W)
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)  # recomputed: clipping shrinks the pasted part
        perm = torch.from_numpy(rng.permutation(B)).to(images.device)
        mixed = images.clone()
        mixed[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1]
        other = targets[perm]
        soft = lam * targets + (1 - lam) * other
        return mixed, torch.where((targets < 0) | (other < 0), torch.full_like(soft, -1), soft)


# ----------------------------------------------------------------------------- loaders
class ResumableSampler(DistributedSampler):
    """Training order: a shuffle that is a pure function of (seed, epoch, rank, world size).

    torch's DistributedSampler with drop_last, plus `set_start_batch(n)` to skip the first n
    batches of the current epoch when resuming mid-epoch: the skipped indices are never
    handed to the dataset, so no image is decoded for them. `set_epoch` also sets the
    dataset's augmentation epoch, and clears the start batch. Without torch.distributed,
    pass num_replicas=1, rank=0.
    """

    def __init__(self, dataset, batch_size, num_replicas=None, rank=None, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.batch_size, self.start_batch = batch_size, 0

    def set_epoch(self, epoch):
        super().set_epoch(epoch)
        self.start_batch = 0
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def set_start_batch(self, n):
        self.start_batch = int(n)

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_batch * self.batch_size:])

    def __len__(self):
        return max(self.num_samples - self.start_batch * self.batch_size, 0)


class ShardSampler(Sampler):
    """Evaluation order: rank r of w gets the r-th contiguous slice, in order, without padding,
    so every image is scored exactly once; `indices` says which dataset rows this rank yields."""

    def __init__(self, dataset, num_replicas=1, rank=0):
        n = len(dataset)
        self.indices = list(range(n * rank // num_replicas, n * (rank + 1) // num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_loader(dataset, batch_size, train, workers=None, distributed=False, seed=0, pin_memory=None):
    """A DataLoader for training (shuffled, drop_last, resumable) or evaluation (in order, sharded)."""
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs torch.distributed initialised first (e.g. under torchrun)")
    replicas, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    if train:
        sampler = ResumableSampler(dataset, batch_size, replicas, rank, seed)
    else:
        sampler = ShardSampler(dataset, replicas, rank)
    # The loader draws its workers' base seed from its own generator: starting an epoch must not
    # advance the caller's torch RNG (dropout), or a resumed run would drift from an uninterrupted one.
    # Augmentation does not depend on that seed (see CocoMultiLabel.__getitem__).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      drop_last=train, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=_ignore_sigint)


def _ignore_sigint(worker_id):
    """Ctrl-C reaches every process in the terminal's group: workers leave it to the main process,
    which finishes its step, writes a checkpoint and shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------- demo and benchmark
def save_sample_figure(dataset, path, img_size, count=6, seed=0):
    """Rows: images as stored, after training augmentation, after CutMix; titled with their labels."""
    import matplotlib  # imported here: only this figure needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(count, len(dataset))
    index = list(range(count))
    plain = build_transforms(img_size, train=False)
    raw = torch.stack([plain(load_image(dataset.image_paths[i])) for i in index])
    augmented, targets = map(torch.stack, zip(*[dataset[i] for i in index], strict=True))
    mixed, soft = CutMix(alpha=1.0, prob=1.0)(augmented, targets, torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    fig, axes = plt.subplots(3, count, figsize=(2.1 * count, 8.2), squeeze=False)
    for row, (images, labels, name) in enumerate([(raw, targets, "as stored"), (augmented, targets,
                                                  "augmented"), (mixed, soft, "CutMix")]):
        for i in range(count):
            ax = axes[row, i]
            ax.imshow((images[i] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())  # (S, S, 3)
            ax.set_xticks([]), ax.set_yticks([])
            shown = [f"{dataset.class_names[k]} {labels[i, k]:.2f}".replace(" 1.00", "")
                     for k in labels[i].nonzero().flatten().tolist()]
            ax.set_title("\n".join(shown) or "(none)", fontsize=7)
        axes[row, 0].set_ylabel(name)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


COCO_ABSENT_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # COCO's 80 category ids are 1..90 minus these


def write_coco_sized_annotations(path, seed=0):
    """An instances JSON with COCO 2014 train's counts (82,783 images, 604,907 annotations,
    80 categories with ids 1..90), polygons included so the file is about as large."""
    rng = np.random.default_rng(seed)
    n_images, n_anns = 82_783, 604_907
    image_ids = np.sort(rng.choice(600_000, n_images, replace=False)) + 1  # sparse, as COCO's
    cat_ids = [i for i in range(1, 91) if i not in COCO_ABSENT_IDS]
    polygons = ["[[" + ",".join(f"{v:.2f}" for v in rng.uniform(0, 640, 2 * rng.integers(8, 40))) + "]]"
                for _ in range(997)]  # a pool, reused: parsing cost is what matters here
    ann_images, ann_cats = rng.choice(image_ids, n_anns), rng.choice(cat_ids, n_anns)
    with open(path, "w") as f:
        f.write('{"images": [')
        f.write(",".join(f'{{"id": {i}, "file_name": "COCO_train2014_{i:012d}.jpg", "width": 640, '
                         f'"height": 480}}' for i in image_ids))
        f.write('], "annotations": [')
        f.write(",".join(f'{{"id": {k + 1}, "image_id": {i}, "category_id": {c}, "iscrowd": 0, '
                         f'"area": 1234.5, "bbox": [10.0, 20.0, 30.0, 40.0], '
                         f'"segmentation": {polygons[k % 997]}}}'
                         for k, (i, c) in enumerate(zip(ann_images, ann_cats, strict=True))))
        f.write('], "categories": [')
        f.write(",".join(f'{{"id": {c}, "name": "class{c}", "supercategory": "x"}}' for c in cat_ids))
        f.write("]}")


def _timed(fn, *args):
    """fn(*args), its wall-clock seconds and this process's CPU seconds (steadier on a busy machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _write_jpegs(image_dir, count):
    """640x480 JPEGs of smooth structure plus fine noise: about the size of COCO's, with a JSON."""
    image_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
        noisy = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 12, (480, 640, 3)).astype(np.int16)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(image_dir / f"{i:03d}.jpg", quality=90)
    (image_dir / "instances.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i:03d}.jpg"} for i in range(count)],
        "annotations": [{"id": i, "image_id": i, "category_id": 1} for i in range(count)],
        "categories": [{"id": 1, "name": "thing"}]}))


def benchmark_labels(bench_dir):
    """Print (a): label building for an annotation file of COCO 2014 train's size."""
    ann_file = bench_dir / "instances_coco_train_sized.json"
    if not ann_file.exists():
        write_coco_sized_annotations(ann_file)
    print(f"(a) label building: {ann_file} ({ann_file.stat().st_size / 2**20:.0f} MiB), wall / CPU seconds")
    coco, read_wall, read_cpu = _timed(read_coco, ann_file)
    (labels, cat_ids, *_), build_wall, build_cpu = _timed(build_label_matrix, coco, ann_file)

    def per_image_loop():  # the usual way: one image at a time through pycocotools' index
        column, looped = {c: k for k, c in enumerate(cat_ids)}, np.zeros_like(labels)
        for row, image_id in enumerate(coco.getImgIds()):
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
                looped[row, column[ann["category_id"]]] = 1
        return looped

    looped, loop_wall, loop_cpu = _timed(per_image_loop)
    assert np.array_equal(labels, looped), "vectorised and per-image labels differ"
    print(f"    {labels.shape[0]:,} images x {labels.shape[1]} classes from {len(coco.dataset['annotations']):,} annotations")
    print(f"    label matrix, after the JSON is loaded: {build_wall:.2f} / {build_cpu:.2f} s "
          f"(per-image pycocotools loop: {loop_wall:.2f} / {loop_cpu:.2f} s, {loop_cpu / build_cpu:.1f}x the CPU)")
    print(f"    file to labels: {read_wall + build_wall:.1f} / {read_cpu + build_cpu:.1f} s "
          f"(of which json.load + pycocotools index: {read_wall:.1f} / {read_cpu:.1f} s)")


def benchmark_pipeline(bench_dir, workers, img_size=448, count=64):
    """Print (b): training-pipeline images/s at img_size from 640x480 JPEGs."""
    image_dir = bench_dir / "jpeg640x480"
    if not image_dir.exists():
        _write_jpegs(image_dir, count)
    size_kib = np.mean([p.stat().st_size for p in image_dir.glob("*.jpg")]) / 1024
    dataset = CocoMultiLabel(image_dir, image_dir / "instances.json", build_transforms(img_size, train=True))
    print(f"(b) training pipeline at {img_size} px from {count} 640x480 JPEGs ({size_kib:.0f} KiB on average); "
          f"images/s by wall clock / by CPU time")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    for name, fn in [("decode only", lambda i: load_image(dataset.image_paths[i])), ("full", dataset.__getitem__)]:
        fn(0)
        _, wall, cpu = _timed(list, map(fn, range(count)))
        print(f"    {name:11s}  one worker (in-process):  {count / wall:6.1f} / {count / cpu:6.1f}")
    torch.set_num_threads(threads)
    if workers > 0:
        loader = build_loader(dataset, batch_size=16, train=True, workers=workers, pin_memory=False)
        next(iter(loader))  # start the workers

        def epochs():
            for epoch in range(3):
                loader.sampler.set_epoch(epoch)
                for _ in loader:
                    pass

        _, wall, _ = _timed(epochs)
        rate = 3 * len(loader) * 16 / wall
        print(f"    full         DataLoader, {workers} workers:   {rate:6.1f} in all, {rate / workers:.1f} per worker "
              f"({os.cpu_count()} CPU cores here)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # * data
    parser.add_argument("--data-root", default="data/coco", help="where COCO 2014 is unpacked "
                        "(train2014/, val2014/, annotations/instances_{train,val}2014.json)")
    parser.add_argument("--train-images", help="your own dataset: folder of training images")
    parser.add_argument("--train-ann", help="your own dataset: COCO instances JSON for training")
    parser.add_argument("--val-images", help="your own dataset: folder of validation images")
    parser.add_argument("--val-ann", help="your own dataset: COCO instances JSON for validation")
    parser.add_argument("--synthetic-root", default="data/synthetic",
                        help="where the built-in dataset is generated when no other data is found")
    parser.add_argument("--seed", type=int, default=0, help="seed of the built-in dataset and augmentation")
    parser.add_argument("--drop-empty", action="store_true",
                        help="drop images without annotations instead of keeping them as all-negative")
    # * figure
    parser.add_argument("--img-size", type=int, help="side of the square training images "
                        "(default: the built-in dataset's native size, 448 for COCO / your own)")
    parser.add_argument("--figure", default="docs/figures/01_samples.png", help="where to save the sample picture")
    # * benchmark
    parser.add_argument("--benchmark", action="store_true",
                        help="measure label building at COCO scale and pipeline images/s at 448 px, then exit")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the benchmark")
    parser.add_argument("--bench-dir", default="data/benchmark", help="where the benchmark writes its inputs")
    args = parser.parse_args()
    print("config:", json.dumps(vars(args)))
    start = time.perf_counter()
    if args.benchmark:
        Path(args.bench_dir).mkdir(parents=True, exist_ok=True)
        benchmark_labels(Path(args.bench_dir))
        benchmark_pipeline(Path(args.bench_dir), args.workers)
        return
    try:  # a mistake in the data or the flags: its message, not a traceback
        spec = resolve_dataset(args.data_root, args.train_images, args.train_ann, args.val_images,
                               args.val_ann, args.synthetic_root, seed=args.seed)
        print(f"data: {spec.kind}: {spec.note}")
        img_size = args.img_size or (SyntheticRecipe().image_size if spec.kind == "synthetic" else 448)
        train = CocoMultiLabel(spec.train_images, spec.train_ann, build_transforms(img_size, train=True),
                               drop_empty=args.drop_empty, seed=args.seed)
        val = CocoMultiLabel(spec.val_images, spec.val_ann, build_transforms(img_size, train=False),
                             drop_empty=args.drop_empty)
    except (DataError, FileNotFoundError) as error:
        parser.exit(2, f"01_data.py: error: {error}\n")
    print(f"train: {train.summary()}\nval: {val.summary()}")
    save_sample_figure(train, args.figure, img_size, seed=args.seed)
    print(f"wrote {args.figure} (images as stored, augmented at {img_size} px, CutMix); "
          f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
