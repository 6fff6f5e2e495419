"""Stage 1: the data. Images and their label vectors, ready for a multi-label model.

Query2Label (Liu et al., 2021) predicts which of K labels are in an image: a target y in {0, 1}^K.
This stage builds those vectors from COCO-format annotations, decodes images as RGB, applies the
paper's augmentation (square resize, RandAugment, Cutout) and CutMix, and serves batches through
DataLoaders that resume mid-epoch and shard evaluation.

    labels[i, k] = 1  iff an annotation of image i has category cat_ids[k]    (N, K), cat_ids sorted
    python 01_data.py [--strict]   # find or draw the data, print summaries, write the sample figure

Shapes: N images, K labels, B batch, S image side (square). Batch-first. Next: 02_backbone.py.
Data: your four paths, else COCO 2014 under --data-root, else the built-in set (resolve_dataset).
Tolerant unless strict: missing images, unlisted ids and undecodable files are skipped and reported
(validation leaves them out of the metric); duplicate ids are errors.

Deviations from the official loader (SlongLiu/query2labels):
- Its Cutout never runs (an argument is not forwarded); ours works and is tested.
- It builds each label vector in __getitem__ (pycocotools); we build the (N, K) matrix once, vectorised.
- Augmentation is seeded per sample from (seed, epoch, index): a resumed run sees the same images.
"""

import argparse
import functools
import hashlib
import json
import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parent
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKGROUND = (255, 255, 255)  # transparent pixels go on white, as viewers show them
COCO_ROOT = "data/coco"  # the default --data-root; only when it is absent: the built-in set
FIGURE = ROOT / "docs" / "figures" / "01_samples.png"  # the one picture this stage explains


class DataError(ValueError):
    """Dataset input the user can fix; the message names the file and what is wrong."""


class CorruptImageError(DataError):
    """An image file that is empty or cannot be decoded."""


# ----------------------------------------------------------------------------- annotations -> labels
def build_label_matrix(data, ann_file="annotations"):
    """The (N, K) 0/1 label matrix of a COCO dict (see read_coco), vectorised, and what it skipped.
    Column k is category cat_ids[k], sorted (COCO's 80 ids run 1..90 with gaps); row i is the file's
    i-th image. Returns labels (N, K) float32, cat_ids, class_names, image_ids, file_names, skipped."""
    column = functools.partial(_column, data, ann_file=ann_file)  # one checked field of every entry
    cat_ids, names = column("categories", "id"), column("categories", "name", kind=str)
    image_ids, file_names = column("images", "id"), column("images", "file_name", kind=str)
    cat_ids, names = np.sort(cat_ids), [names[k] for k in np.argsort(cat_ids)]
    ann_images, ann_cats = column("annotations", "image_id"), column("annotations", "category_id")  # (A,)
    rows = np.argsort(image_ids)  # rows[j] = row of the j-th smallest image id
    pos = np.searchsorted(image_ids[rows], ann_images).clip(0, len(rows) - 1)  # (A,) where ids would sit
    cols = np.searchsorted(cat_ids, ann_cats).clip(0, len(cat_ids) - 1)  # (A,)
    no_image, no_category = image_ids[rows][pos] != ann_images, cat_ids[cols] != ann_cats  # not listed
    no_category &= ~no_image  # an annotation is reported for its first problem only
    ok = ~(no_image | no_category)
    labels = np.zeros((len(image_ids), len(cat_ids)), dtype=np.float32)  # (N, K)
    labels[rows[pos[ok]], cols[ok]] = 1.0  # several boxes of one class still make a single 1
    anns, unknown = data["annotations"], {"image_id": (ann_images, no_image),
                                          "category_id": (ann_cats, no_category)}
    skipped = {f"unknown_{field}": [f"annotation {anns[i].get('id', i)}: {field} {values[i]}"
                                    for i in np.flatnonzero(bad)] for field, (values, bad) in unknown.items()}
    return labels, cat_ids.tolist(), names, image_ids.tolist(), file_names, skipped


class CocoMultiLabel(Dataset):
    """A COCO-format dataset as (image, target (K,)) pairs; labels from the annotation file alone.
    Images without annotations stay in as all-negative targets (as the Query2Label loader keeps
    them) unless drop_empty=True (as the ASL loader does): the two give slightly different mAP."""

    def __init__(self, image_dir, ann_file, transform=None, drop_empty=False, strict=False, seed=0,
                 substitute=True):
        self.image_dir, self.ann_file, self.transform = Path(image_dir), Path(ann_file), transform
        self.drop_empty, self.strict, self.seed, self.substitute = drop_empty, strict, seed, substitute
        data = read_coco(self.ann_file)
        labels, self.cat_ids, self.class_names, image_ids, names, skipped = build_label_matrix(data, ann_file)
        if not self.image_dir.is_dir():
            raise DataError(f"image folder {self.image_dir} does not exist")
        listed = set(os.listdir(self.image_dir))  # one listing instead of one stat per image
        missing = np.array([n not in listed if "/" not in n else not (self.image_dir / n).is_file()
                            for n in names], dtype=bool)  # (N,)
        self._skipped = {"missing_files": [names[i] for i in np.flatnonzero(missing)], **skipped}
        if strict and any(self._skipped.values()):
            raise DataError(f"{self.ann_file} (strict): {describe_skipped(self._skipped)}")
        empty = labels.sum(1) == 0  # (N,)
        self.num_annotations, self.num_empty = len(data["annotations"]), int((empty & ~missing).sum())
        keep = np.flatnonzero(~missing & ~(empty & drop_empty))
        if not len(keep):
            raise DataError(f"{self.ann_file}: no image left: " + (
                f"none of its {len(names):,} images is in {self.image_dir} (e.g. {names[0]})"
                if missing.all() else "none has an annotation"))
        self.labels = torch.from_numpy(labels[keep])  # (N, K)
        self.image_ids = [image_ids[i] for i in keep]
        self.image_paths = [self.image_dir / names[i] for i in keep]
        # Shared memory, so DataLoader workers (persistent ones too) see set_epoch and mark bad files.
        self._epoch = multiprocessing.Value("q", 0)
        self._bad = multiprocessing.Array("b", len(keep), lock=False)  # 1 = this file cannot be decoded

    def __len__(self):
        return len(self.image_paths)

    def __getitem__(self, index):
        if index >= len(self):  # iteration (`for x in dataset`) stops here
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image, target = self._load(index)
        if self.transform is None:
            return image, target
        # The augmentation of sample `index` in this epoch is a pure function of (seed, epoch, index).
        seed = int(np.random.SeedSequence([self.seed, self._epoch.value, index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):  # the caller's torch RNG stays untouched
            torch.default_generator.manual_seed(seed)  # CPU only: transforms run on the CPU
            state = random.getstate()
            random.seed(seed)
            image = self.transform(image)
            random.setstate(state)  # and so does Python's
        return image, target

    def _load(self, index):
        """Image `index` and its target. A corrupt file is marked (once, across workers), reported and
        replaced: in training by the next readable image, in validation by a blank one, targets unknown."""
        for step in range(len(self) if self.substitute else 1):
            j = (index + step) % len(self)
            try:
                if not self._bad[j]:
                    return load_image(self.image_paths[j]), self.labels[j].clone()
            except CorruptImageError as error:
                if self.strict:
                    raise
                self._bad[j] = 1
                warnings.warn(f"{error}; " + ("the next readable image is used" if self.substitute else
                                              "left out of the metric"), RuntimeWarning, stacklevel=3)
        if not self.substitute:
            return Image.new("RGB", (8, 8), BACKGROUND), torch.full_like(self.labels[index], -1.0)
        raise DataError(f"not one image in {self.image_dir} could be decoded")

    def set_epoch(self, epoch):
        self._epoch.value = int(epoch)

    @property
    def bad_count(self):
        """Files (not attempts) found undecodable so far, in this process and its loader workers."""
        return int(np.frombuffer(self._bad, np.int8).sum())

    def reset_bad_count(self):
        np.frombuffer(self._bad, np.int8)[:] = 0

    @property
    def skipped(self):
        """What was left out: {missing_files, unknown_image_id, unknown_category_id, undecodable: [names]}."""
        bad = np.flatnonzero(np.frombuffer(self._bad, np.int8))
        return {**self._skipped, "undecodable": [self.image_paths[i].name for i in bad]}

    def summary(self):
        """What this dataset holds, in a few lines: sizes, label statistics, what was left out."""
        N, K = self.labels.shape
        per_class, per_image = self.labels.sum(0), self.labels.sum(1)  # (K,), (N,)
        empty = "dropped (drop_empty=True)" if self.drop_empty else "kept as all-negative targets"
        absent = [self.class_names[k] for k in range(K) if per_class[k] == 0]
        return "\n".join([
            f"{self.ann_file} ({self.image_dir})",
            f"  images          {N:,}; {self.num_empty:,} without annotations {empty}",
            f"  classes         {K}: category ids {self.cat_ids[0]}..{self.cat_ids[-1]} -> columns 0..{K-1}",
            f"  annotations     {self.num_annotations:,} -> {int(per_image.sum()):,} positive labels, "
            f"{per_image.mean():.2f} per image (at most {int(per_image.max())})",
            f"  no positives    {', '.join(absent) or 'none'}" + (" (no AP for these)" if absent else ""),
            f"  skipped         {describe_skipped(self.skipped) or 'nothing'}"])


# ----------------------------------------------------------------------------- images, transforms, CutMix
def load_image(path, background=BACKGROUND):
    """Decode an image file as RGB, upright as its EXIF orientation says; CorruptImageError if not."""
    path = Path(path)
    try:
        if path.stat().st_size > 0:
            with Image.open(path) as image:
                ImageOps.exif_transpose(image, in_place=True)  # decodes the pixels, then turns them
                return to_rgb(image, background)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"{path}: cannot be decoded as an image ({error})") from None
    raise CorruptImageError(f"{path}: the file is empty (0 bytes)")


def to_rgb(image, background=BACKGROUND):
    """Any PIL image as 8-bit RGB: grey, palette, CMYK converted; alpha composited on `background`."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):  # 16-bit grey: rescale, since convert() would clip at 255
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).round().astype(np.uint8))
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        canvas = Image.new("RGBA", image.size, background)
        return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def build_transforms(img_size, train, randaugment=True, cutout=True, hflip=True, cutout_fraction=0.5):
    """PIL image -> normalised float32 (3, S, S); training adds the paper's augmentation, drawing from
    torch's global RNG, which CocoMultiLabel seeds per sample."""
    steps = [to_rgb, v2.Resize((img_size, img_size))]
    if train and hflip:
        steps.append(v2.RandomHorizontalFlip())
    if train and randaugment:
        steps.append(v2.RandAugment())  # 2 ops of magnitude 9 out of 31, as the official recipe
    steps.append(to_normalized_tensor)
    if train and cutout:
        steps.append(functools.partial(cutout_square, fraction=cutout_fraction))
    return v2.Compose(steps)


def cutout_square(image, fraction=0.5):  # (3, S, S)
    """Zero a random square, `fraction` of the image side, centred anywhere (clipped at the edges).
    After normalisation, zero is the mean colour. Labels stay, though the square may hide an object."""
    _, H, W = image.shape
    h, w = round(H * fraction), round(W * fraction)
    cy, cx = int(torch.randint(H, ())), int(torch.randint(W, ()))
    image[:, max(cy - h // 2, 0):cy + h - h // 2, max(cx - w // 2, 0):cx + w - w // 2] = 0
    return image


def to_normalized_tensor(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """PIL RGB image -> float32 (3, S, S) holding (x / 255 - mean) / std, in one multiply-add (v2's
    ToImage + ToDtype + Normalize: same numbers, three passes, 1.07-1.19x slower; tools/bench_data.py)."""
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, S, S)
    return torch.addcmul(-mean / std, x.float(), 1 / (255 * std))


class CutMix:
    """Multi-label CutMix (Yun et al., 2019) on a batch: paste a box from a shuffled copy.

        lam ~ Beta(alpha, alpha);  box side = sqrt(1 - lam) * image side, centred anywhere;
        lam = 1 - (area of the box after clipping to the image) / (S * S)
        y = lam * y_a + (1 - lam) * y_b        (area-weighted soft targets)

    Why area-weighted, not the union max(y_a, y_b): a label gets the share of the picture its image
    still covers, roughly the chance its object is in view (the union would claim objects the box hid).
    Unknown entries (< 0) stay unknown; with probability 1 - prob nothing changes. Not v2.CutMix: it
    mixes an unknown -1 into a soft label and draws from the global RNG (no exact resume)."""

    def __init__(self, alpha=1.0, prob=0.5):
        self.alpha, self.prob = alpha, prob

    def __call__(self, images, targets, generator=None):  # (B, 3, S, S), (B, K)
        B, _, H, W = images.shape
        # One draw from `generator` seeds everything else, so the caller controls all randomness.
        seed = torch.randint(2**62, (1,), generator=generator, device=getattr(generator, "device", "cpu"))
        rng = np.random.default_rng(int(seed))
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
    """DistributedSampler (shuffled by seed, epoch, rank, world size; drop_last) + `set_start_batch(n)`:
    skip this epoch's first n batches, undecoded (resume). `set_epoch` sets the dataset's epoch too."""

    def __init__(self, dataset, batch_size, num_replicas=None, rank=None, seed=0):
        super().__init__(dataset, num_replicas, rank, shuffle=True, seed=seed, drop_last=True)
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


def build_loader(dataset, batch_size, train, workers=None, distributed=False, seed=0, pin_memory=None):
    """A DataLoader for training (shuffled, drop_last, resumable) or evaluation (in order, sharded)."""
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed=True needs torch.distributed initialised first (e.g. torchrun)")
    replicas, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    # Evaluation: rank r of w takes the r-th slice, in order, unpadded (DistributedSampler repeats some)
    n = len(dataset)
    sampler = ResumableSampler(dataset, batch_size, replicas, rank, seed) if train else \
        range(n * rank // replicas, n * (rank + 1) // replicas)
    # Workers' base seed from the loader's own generator: starting an epoch leaves the caller's RNG alone.
    return DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=train,
                      persistent_workers=workers > 0, worker_init_fn=_ignore_sigint,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      generator=torch.Generator().manual_seed(seed))


def _ignore_sigint(worker_id):  # Ctrl-C reaches all workers: they leave it to the main process
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------- where the data is, checks
@dataclass
class DatasetSpec:
    """Where a run's images and annotations are, and a human-readable note on how they were chosen."""
    kind: str  # "coco2014" | "custom" | "synthetic"
    train_images: str
    train_ann: str
    val_images: str
    val_ann: str
    note: str = ""


def resolve_dataset(data_root=COCO_ROOT, train_images=None, train_ann=None, val_images=None,
                    val_ann=None, synthetic_root="data/synthetic", seed=0, recipe=None):
    """Pick a run's data: your four paths, else COCO 2014 under data_root, else the built-in set.
    A path you named must exist: only the default data_root, when absent, falls back."""
    own = "give your own data with --train-images --train-ann --val-images --val-ann"
    given = dict(zip(["--train-images", "--train-ann", "--val-images", "--val-ann"],
                     [train_images, train_ann, val_images, val_ann], strict=True))
    if any(given.values()):
        problems = [f"{flag} missing" for flag, value in given.items() if not value] or \
            [f"{flag} {value} not found" for flag, value in given.items() if not Path(value).exists()]
        if problems:
            raise DataError(f"a custom dataset needs all four paths, each existing: {'; '.join(problems)}")
        return DatasetSpec("custom", *map(str, given.values()),
                           note=f"custom COCO-format dataset: train {train_ann}, val {val_ann}")
    root, paths = Path(data_root), coco_layout(data_root, "train2014", "val2014")
    absent = [path for path in paths if not Path(path).exists()]
    if not absent:
        return DatasetSpec("coco2014", *paths, note=f"COCO 2014 under {root}")
    if root.exists() or root != Path(COCO_ROOT):
        problem = f"COCO 2014 is incomplete there (missing {', '.join(absent)})" if root.exists() else \
            "does not exist"
        raise DataError(f"--data-root {root}: {problem}; unpack train2014/, val2014/ and annotations/ there, "
                        f"or {own}")
    # The built-in set: tools/make_synthetic.py as a program (stages never import tools); it returns at
    # once when the set is there with the same recipe ({field: value} overrides).
    command = [sys.executable, str(ROOT / "tools" / "make_synthetic.py"), "--root", str(synthetic_root),
               "--seed", str(seed)]
    command += [str(x) for k, v in (recipe or {}).items() for x in (f"--{k.replace('_', '-')}", v)]
    if subprocess.run(command).returncode != 0:
        raise DataError(f"drawing the built-in dataset failed (its message is above): {' '.join(command)}")
    root = Path(synthetic_root)
    made = json.loads((root / "recipe.json").read_text())["recipe"]
    return DatasetSpec("synthetic", *coco_layout(root, "train", "val"), note=(
        f"built-in synthetic shapes at {root} ({made['train_images']:,} train + {made['val_images']:,} val "
        f"images of {made['image_size']} px, seed {seed}); no COCO 2014 under {data_root}: unpack it there "
        f"(or pass --data-root), or {own}"))


def coco_layout(root, train, val):  # [train images, train JSON, val images, val JSON] as COCO lays them out
    return [str(Path(root) / p) for s in (train, val) for p in (s, f"annotations/instances_{s}.json")]


def read_coco(ann_file):
    """A COCO instances JSON as a dict, its three lists checked: one DataError line per problem."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        folder = " (it is a folder)" if ann_file.is_dir() else ""
        raise DataError(f"annotation file {ann_file} does not exist{folder}")
    try:
        data = json.loads(ann_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        size = ann_file.stat().st_size
        raise DataError(f"{ann_file}: not valid JSON ({error}); {size:,} bytes: is it truncated?") from None
    if not isinstance(data, dict):
        raise DataError(f"{ann_file}: expected a JSON object with 'images', 'annotations' and 'categories', "
                        f"got a {type(data).__name__}")
    for section in ("images", "annotations", "categories"):
        if not isinstance(data.get(section), list):
            got = f"a {type(data[section]).__name__}" if section in data else \
                f"nothing: no such key (found {sorted(data)})"
            raise DataError(f"{ann_file}: {section!r} must be a list, got {got}")
        if not data[section] and section != "annotations":  # no annotations: every image all-negative
            raise DataError(f"{ann_file}: {section!r} is empty, so there is nothing to "
                            + ("load" if section == "images" else "learn"))
    return data


def _column(data, section, key, ann_file, kind=int):
    """Field `key` of every entry of data[section]: int64 ids (unique if key is 'id') or str."""
    entries = data[section]
    try:
        values = list(map(itemgetter(key), entries))
    except (KeyError, TypeError, IndexError):
        i = next(i for i, e in enumerate(entries) if not isinstance(e, dict) or key not in e)
        got = str(entries[i])[:100]
        raise DataError(f"{ann_file}: {section}[{i}] has no {key!r} field; got {got}") from None
    ids = np.array(values, dtype=None if values else np.int64) if kind is int else None  # fast: one C loop
    if (ids.dtype.kind != "i") if kind is int else not all(isinstance(v, str) for v in values):
        i = next((i for i, v in enumerate(values) if type(v) is not kind), 0)
        raise DataError(f"{ann_file}: {section}[{i}] has {key!r} = {values[i]!r}; expected "
                        + ("an integer" if kind is int else "a string"))
    unique, counts = np.unique(ids, return_counts=True) if key == "id" else (None, None)
    if counts is not None and (counts > 1).any():
        raise DataError(f"{ann_file}: {section!r} lists id {unique[counts > 1][0]} more than once; which "
                        f"entry is meant is ambiguous: remove the duplicates")
    return values if kind is str else ids.astype(np.int64)


def describe_skipped(skipped, shown=3):
    """{kind: [names]} -> "missing files: 2 (a.jpg, b.jpg); undecodable: 1 (c.jpg)", or "" if none."""
    return "; ".join(f"{kind.replace('_', ' ')}: {len(names):,} ({', '.join(map(str, names[:shown]))}"
                     f"{', ...' if len(names) > shown else ''})" for kind, names in skipped.items() if names)


def file_fingerprint(path):
    """A short content hash: checkpoints record their validation annotations' one (changed file?)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def save_sample_figure(dataset, path, img_size, count=6, seed=0):
    """Rows: images as stored, after training augmentation, after CutMix; titled with their labels."""
    from matplotlib.figure import Figure  # imported here: slow, and only this picture needs it

    index, plain = list(range(min(count, len(dataset)))), build_transforms(img_size, train=False)
    stored = torch.stack([plain(load_image(dataset.image_paths[i])) for i in index])  # (B, 3, S, S)
    augmented, targets = map(torch.stack, zip(*[dataset[i] for i in index], strict=True))
    mixed, soft = CutMix(alpha=1.0, prob=1.0)(augmented, targets, torch.Generator().manual_seed(seed))
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    fig = Figure(figsize=(2.1 * len(index), 8.2), layout="tight")
    axes = fig.subplots(3, len(index), squeeze=False)
    rows = [(stored, targets, "as stored"), (augmented, targets, "augmented"), (mixed, soft, "CutMix")]
    for row, (images, labels, name) in enumerate(rows):
        for i, ax in enumerate(axes[row]):
            ax.imshow((images[i] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())  # (S, S, 3)
            ax.set_xticks([]), ax.set_yticks([])
            shown = [f"{dataset.class_names[k]} {labels[i, k]:.2f}".replace(" 1.00", "")
                     for k in labels[i].nonzero().flatten().tolist()]
            ax.set_title("\n".join(shown) or "(none)", fontsize=7)
        axes[row, 0].set_ylabel(name)
    fig.savefig(path, dpi=90)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="01_data.py", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    add = parser.add_argument  # * data
    add("--data-root", default=COCO_ROOT, help="COCO 2014 (train2014/ val2014/ annotations/); default "
        "%(default)s")
    for split in ("train", "val"):  # your own dataset: all four paths or none
        add(f"--{split}-images", help=f"your own dataset (all four paths or none): {split} image folder")
        add(f"--{split}-ann", help=f"your own dataset: COCO instances JSON for {split}")
    add("--synthetic-root", default="data/synthetic", help="the built-in set's folder; default %(default)s")
    add("--seed", type=int, default=0, help="seed of the built-in set and of augmentation; default 0")
    add("--drop-empty", action="store_true", help="drop images without annotations; default: all-negative")
    add("--strict", action="store_true", help="every skipped entry or image is an error; default: reported")
    add("--img-size", type=int, help="image side; default: the built-in set's own (64), else 448")
    args = parser.parse_args(argv)
    try:
        spec = resolve_dataset(args.data_root, args.train_images, args.train_ann, args.val_images,
                               args.val_ann, args.synthetic_root, seed=args.seed)
        img_size = args.img_size or (load_image(next(Path(spec.val_images).glob("*.jpg"))).width
                                     if spec.kind == "synthetic" else 448)
        train = CocoMultiLabel(spec.train_images, spec.train_ann, build_transforms(img_size, train=True),
                               drop_empty=args.drop_empty, strict=args.strict, seed=args.seed)
        val = CocoMultiLabel(spec.val_images, spec.val_ann, build_transforms(img_size, train=False),
                             drop_empty=args.drop_empty, strict=args.strict, substitute=False)
    except DataError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"data: {spec.kind}: {spec.note}\ntrain: {train.summary()}\nval: {val.summary()}")
    save_sample_figure(train, FIGURE, img_size, seed=args.seed)
    assert torch.equal(train[0][0], train[0][0]), "augmentation must be a function of (seed, epoch, index)"
    print(f"verified: a training sample drawn twice is the same (3, {img_size}, {img_size}) tensor; wrote "
          f"{FIGURE} (as stored, augmented, CutMix)")


if __name__ == "__main__":
    main()
