"""The built-in dataset: twelve named shapes in four scenes, written as a COCO-format dataset.

    python tools/make_synthetic.py --root data/synthetic --seed 0     # what 01_data.py runs
    python tools/make_synthetic.py --root /tmp/tiny --train-images 60 --val-images 20
    python tools/make_synthetic.py --help                              # every recipe knob is a flag

Stage 1 (`01_data.resolve_dataset`) runs this file as a separate program the first time a run
has no other data (stages never import tools). It is a no-op when `--root` already holds the set
drawn from the same recipe and seed (`recipe.json` stores their hash); otherwise it draws every
image from its own generator, seeded by (seed, split, index), so the bytes are the same in any
order and any number of processes, into a temporary folder that is renamed at the end: an
interrupted run never leaves a half-written dataset. It refuses to overwrite a folder that is
not one of its own. Exit codes: 0 done (or already there), 2 a bad flag or a foreign folder.

Layout: ROOT/{train,val}/NNNNNN.jpg, ROOT/annotations/instances_{train,val}.json, ROOT/recipe.json.
See docs/01_data.md ("The built-in synthetic dataset") for what makes it a real multi-label problem.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages live one folder up

import argparse
import colorsys
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm


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



def ensure_synthetic(root="data/synthetic", seed=0, recipe=None, workers=None):
    """Draw the built-in dataset under `root` unless it is there with this recipe and seed.

    Returns (what happened: "found" | "generated" | "regenerated", recipe hash).
    """
    recipe = recipe or SyntheticRecipe()
    root = Path(root)
    key = recipe_hash(recipe, seed)
    stamp = root / "recipe.json"
    found = json.loads(stamp.read_text()).get("hash") if stamp.is_file() else None
    if found == key:
        return "found", key
    if root.exists() and found is None and any(root.iterdir()):
        raise FileExistsError(f"{root} exists but holds no built-in dataset (no recipe.json); "
                              f"refusing to overwrite it: choose another --synthetic-root")
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
    return ("generated" if found is None else "regenerated"), key


def main(argv=None):
    parser = argparse.ArgumentParser(prog="make_synthetic.py", allow_abbrev=False,
                                     description="Draw the built-in multi-label dataset (COCO format).")
    parser.add_argument("--root", default="data/synthetic", help="where the set goes (default: data/synthetic)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every image's generator (default: 0)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="processes that draw (default: %(default)s); the bytes do not depend on it")
    recipe = parser.add_argument_group("recipe (each field of SyntheticRecipe)")
    for field in fields(SyntheticRecipe):
        recipe.add_argument("--" + field.name.replace("_", "-"), type=field.type, default=field.default,
                            metavar=field.type.__name__.upper(), help=f"default: {field.default}")
    args = parser.parse_args(argv)
    chosen = SyntheticRecipe(**{f.name: getattr(args, f.name) for f in fields(SyntheticRecipe)})
    problems = [f"--{f.name.replace('_', '-')} {getattr(chosen, f.name)}" for f in fields(chosen)
                if getattr(chosen, f.name) < 0] + ([] if chosen.image_size >= 8 else ["--image-size below 8"])
    if problems or chosen.min_objects > chosen.max_objects or chosen.min_scale > chosen.max_scale:
        parser.exit(2, f"{parser.prog}: error: impossible recipe ({', '.join(problems) or 'a min above its max'})\n")
    start = time.perf_counter()
    try:
        what, key = ensure_synthetic(args.root, args.seed, chosen, args.workers)
    except FileExistsError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"built-in dataset {what} at {args.root} (seed {args.seed}, recipe {key}: {chosen.train_images} "
          f"train + {chosen.val_images} val images of {chosen.image_size} px) in "
          f"{time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
