"""Benchmark of stage 1: label building at COCO scale, and the training pipeline's images/s at 448 px.

    python tools/bench_data.py                      # both; inputs written once under data/benchmark/
    python tools/bench_data.py --only labels        # (a) only: needs about 2 GB of memory for the JSON
    python tools/bench_data.py --only pipeline --workers 2
    git show HEAD~3:01_data.py > /tmp/old_data.py && python tools/bench_data.py --before /tmp/old_data.py
                                                    # an older 01_data.py timed side by side, same run

(a) An instances JSON with COCO 2014 train's counts (82,783 images, 604,907 annotations, 80 category
    ids in 1..90), polygons included so the file is about as large; the (N, K) label matrix of
    01_data.build_label_matrix against the usual per-image loop through pycocotools' index, timed
    side by side (tools/timing.py: interleaved rounds, wall and CPU seconds).
(b) 640x480 JPEGs about COCO's size: decode only, the full training transform in-process on one
    thread (as in a DataLoader worker), with 01's fused normalisation and with torchvision's
    v2.ToImage + ToDtype + Normalize in its place, then a DataLoader with --workers workers.

write_jpegs(folder, count) is reused by other tools (e.g. the GPU data path's benchmark).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages live one folder up

import argparse
import importlib
import io
import json
import os
from contextlib import redirect_stdout

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from tools.timing import median, ratio, show, time_interleaved

data = importlib.import_module("01_data")  # module names may not start with a digit

COCO_ABSENT_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}  # COCO's 80 category ids are 1..90 minus these


def write_coco_sized_annotations(path, seed=0):
    """An instances JSON with COCO 2014 train's counts, polygons included so the file is about as large."""
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


def write_jpegs(folder, count):
    """`count` 640x480 JPEGs of smooth structure plus fine noise (about COCO's size), and an
    instances.json beside them (one category, one annotation per image). Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
        noisy = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 12, (480, 640, 3)).astype(np.int16)
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.jpg", quality=90)
    (folder / "instances.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i:03d}.jpg"} for i in range(count)],
        "annotations": [{"id": i, "image_id": i, "category_id": 1} for i in range(count)],
        "categories": [{"id": 1, "name": "thing"}]}))
    return folder


def once(fn, *args):
    """fn(*args) timed once (a step too slow to repeat): (result, [(wall, cpu)])."""
    result = []
    times = time_interleaved({"step": lambda: result.append(fn(*args))}, rounds=1)["step"]
    return result[-1], times


def load_before(path):
    """An older version of stage 1 from a file, as its own module (for before/after in one run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("data_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmark_labels(bench_dir, rounds, before=None):
    """(a): the label matrix vs the per-image pycocotools loop, after the JSON is loaded."""
    from pycocotools.coco import COCO

    ann_file = bench_dir / "instances_coco_train_sized.json"
    if not ann_file.exists():
        write_coco_sized_annotations(ann_file)
    print(f"(a) label building: {ann_file} ({ann_file.stat().st_size / 2**20:.0f} MiB); wall / CPU")
    coco_dict, read = once(data.read_coco, ann_file)
    coco = COCO()
    coco.dataset = coco_dict
    with redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        _, index = once(coco.createIndex)
    labels, cat_ids, *_ = data.build_label_matrix(coco_dict, ann_file)
    column = {c: k for k, c in enumerate(cat_ids)}

    def per_image_loop():  # the usual way: one image at a time through pycocotools' index
        looped = np.zeros_like(labels)
        for row, image_id in enumerate(coco.getImgIds()):
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
                looped[row, column[ann["category_id"]]] = 1
        return looped

    assert np.array_equal(labels, per_image_loop()), "vectorised and per-image labels differ"
    candidates = {"label matrix": lambda: data.build_label_matrix(coco_dict, ann_file), "per-image loop": per_image_loop}
    if before is not None:  # its build_label_matrix took the pycocotools index
        candidates["label matrix, before"] = lambda: before.build_label_matrix(coco, ann_file)
    times = time_interleaved(candidates, rounds=rounds)
    print(f"    {labels.shape[0]:,} images x {labels.shape[1]} classes from {len(coco_dict['annotations']):,} annotations")
    print(f"    label matrix, after the JSON is loaded:  {show(times['label matrix'])}")
    print(f"    per-image pycocotools loop (its index built): {show(times['per-image loop'])} "
          f"({ratio(times['per-image loop'], times['label matrix'], 1):.1f}x the CPU)")
    if before is not None:
        print(f"    label matrix, --before file:             {show(times['label matrix, before'])} "
              f"({ratio(times['label matrix, before'], times['label matrix'], 1):.2f}x the CPU of now)")
    print(f"    json.load + checks (read_coco): {median(read):.1f} s wall / {median(read, 1):.1f} s CPU; "
          f"pycocotools' index, which the stage no longer builds: {median(index):.1f} / {median(index, 1):.1f} s")


def benchmark_pipeline(bench_dir, workers, rounds, img_size=448, count=64, before=None):
    """(b): training-pipeline images/s at img_size from 640x480 JPEGs."""
    image_dir = bench_dir / "jpeg640x480"
    if not (image_dir / "instances.json").exists():
        write_jpegs(image_dir, count)
    size_kib = np.mean([p.stat().st_size for p in image_dir.glob("*.jpg")]) / 1024
    fused = data.build_transforms(img_size, train=True)
    library = v2.Compose([v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                      v2.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD), v2.ToPureTensor()])
                          if step is data.to_normalized_tensor else step for step in fused.transforms])
    with_fused = data.CocoMultiLabel(image_dir, image_dir / "instances.json", fused)
    with_library = data.CocoMultiLabel(image_dir, image_dir / "instances.json", library)
    assert torch.allclose(with_fused[0][0], with_library[0][0], atol=1e-5), "the two normalisations differ"
    print(f"(b) training pipeline at {img_size} px from {count} 640x480 JPEGs ({size_kib:.0f} KiB on average); "
          f"images/s by wall clock / per CPU second")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    image = data.load_image(with_fused.image_paths[0]).resize((img_size, img_size))
    candidates = {
        "decode only": lambda: [data.load_image(p) for p in with_fused.image_paths],
        "full, fused normalise": lambda: [with_fused[i] for i in range(count)],
        "full, v2 normalise": lambda: [with_library[i] for i in range(count)],
        "normalise step, fused": lambda: [data.to_normalized_tensor(image) for _ in range(count)],
        "normalise step, v2": lambda: [library.transforms[-2](image) for _ in range(count)],
    }
    if before is not None:
        old = before.CocoMultiLabel(image_dir, image_dir / "instances.json", before.build_transforms(img_size, train=True))
        candidates["full, --before file"] = lambda: [old[i] for i in range(count)]
    times = time_interleaved(candidates, rounds=rounds)
    torch.set_num_threads(threads)
    for name, t in times.items():
        print(f"    {name:22s} one worker (in-process): {count / median(t):6.1f} / {count / median(t, 1):6.1f}")
    print(f"    v2's ToImage + ToDtype + Normalize vs the fused step: {ratio(times['normalise step, v2'], times['normalise step, fused'], 1):.2f}x "
          f"the CPU on that step, {ratio(times['full, v2 normalise'], times['full, fused normalise'], 1):.3f}x on the whole transform")
    if workers > 0:
        loader = data.build_loader(with_fused, batch_size=16, train=True, workers=workers, pin_memory=False)
        next(iter(loader))  # start the workers
        epochs = [0]

        def epoch():
            loader.sampler.set_epoch(epochs[0])
            epochs[0] += 1
            for _ in loader:
                pass

        rate = len(loader) * 16 / median(time_interleaved({"loader": epoch}, rounds=rounds)["loader"])
        print(f"    full, DataLoader with {workers} workers: {rate:6.1f} in all, {rate / workers:.1f} per worker "
              f"({os.cpu_count()} CPU cores here)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench_data.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--only", choices=["labels", "pipeline"], help="run one part (default: both)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for (b); 0 skips it (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per candidate (default: 3)")
    parser.add_argument("--bench-dir", default="data/benchmark", help="where the inputs go (default: %(default)s)")
    parser.add_argument("--before", help="an older 01_data.py to time side by side (default: none)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.workers < 0:
        parser.exit(2, f"{parser.prog}: error: --rounds must be >= 1 and --workers >= 0\n")
    before = load_before(args.before) if args.before else None
    bench_dir = Path(args.bench_dir)
    bench_dir.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "labels"):
        benchmark_labels(bench_dir, args.rounds, before)
    if args.only in (None, "pipeline"):
        benchmark_pipeline(bench_dir, args.workers, args.rounds, before=before)


if __name__ == "__main__":
    main()
