"""PROTOTYPE, not yet wired into 05_train.py (issue 16.4; needs a GPU measurement first): a data path that decodes and augments on the accelerator, batched.

    python tools/bench_gpu_loader.py --bench --count 64 --img-size 448            # CPU figures
    python tools/bench_gpu_loader.py --bench --device cuda --workers 16 --count 512  # GPU machine
    python tools/bench_gpu_loader.py --end-to-end --device cuda --workers 16 --count 1024 --batch-size 64 [--compile]

The CPU path (01_data) decodes each JPEG with PIL in a DataLoader worker and runs Resize, flip,
RandAugment, normalisation and Cutout there, one image at a time. On a fast GPU that is the
bottleneck (issue 16: ~112 img/s per core for the full transform, ~1,130 img/s wanted by the compiled
model step). This path moves all of it to the device:

    worker:  read_file(path)                        -> the file's bytes, 1-D uint8   (cheap: no decode)
    main:    decode_jpeg(list of bytes, device)     -> B images (3, H_i, W_i) uint8  (nvjpeg, batched)
             resize each to S x S                   -> (B, 3, S, S) uint8            (grouped by size)
             flip, RandAugment (grouped), normalise -> (B, 3, S, S) float32
             Cutout                                 -> one masked_fill for the batch

Per-sample randomness, same decisions as the CPU path. transforms.v2 on a batch draws ONE random op
for the whole batch (RandAugment, flip), which would correlate the augmentation of 64 images. Here each
sample's decisions are drawn first, on the CPU, from a generator seeded with (seed, epoch, index)
exactly as 01's CocoMultiLabel seeds its transform, and in the same order as 01's transforms draw them
(flip: rand < 0.5; per RandAugment op: randint(14), then rand <= 0.5 for the sign of a signed op;
Cutout: randint(S), randint(S)). So a sample gets the same flip, the same two RandAugment ops with the
same magnitudes and the same Cutout square on both paths; only the pixel arithmetic differs (PIL's
kernels vs tensor kernels). The decisions are then applied batched: RandAugment's magnitude is fixed
(9 of 31), so the only per-sample choices are the op and its sign, and the samples that drew the
same (op, sign) in a slot are transformed together: at most 14 + 9 = 23 groups per slot, whatever the
batch size, instead of a Python loop over 64 images.

Ops come from torchvision's own RandAugment table and op code (`_AUGMENTATION_SPACE`,
`_apply_image_or_video_transform`: private names, pinned torchvision), so the 14 ops and their
magnitudes are those of the CPU path; every op works per image on a batch (autocontrast, equalize and
contrast take per-image statistics).

EXIF orientation: the CPU decoder can apply it, nvjpeg cannot, so the worker reads the orientation tag
from the file's header (PIL opens lazily: no pixel decode) and the main process turns the decoded
image. Files that are not JPEGs (PNG, GIF, ...) are decoded in the worker by 01's load_image (alpha
composited as 01 does) and pass through as pixels. A JPEG that fails to decode is replaced by the next
good image of the batch with its labels (01 takes the next readable file), counted in `bad_count`;
strict=True raises 01's CorruptImageError naming the file.

When to use it (for 05, to be implemented there): use this path automatically when CUDA is present and
a short probe at start measures the CPU path slower than this one (`select_data_path`); the CPU path
stays the default elsewhere and whenever exact resume on the CPU is asked for (--deterministic), since
GPU kernels are not promised bit-exact across runs.

Deviations from the CPU path: pixels differ slightly (measured: decode, resize; see the tests);
torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec (>= 0.16): the calls here
are the ones TorchCodec's migration guide maps 1:1 (decode_jpeg -> torchcodec.decoders.decode_jpeg).
"""

import dataclasses
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


def _repo_root():
    """The project's folder: one up from tools/ once integrated; /work/main (or $Q2L_ROOT) for the draft."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "01_data.py").exists() else Path(os.environ.get("Q2L_ROOT", "/work/main"))


sys.path.insert(0, str(_repo_root()))
import importlib  # noqa: E402

data = importlib.import_module("01_data")  # module names may not start with a digit

RANDAUGMENT = v2.RandAugment()  # torchvision's op table and op code (2 ops, magnitude 9 of 31, nearest, fill 0)
OPS = tuple(RANDAUGMENT._AUGMENTATION_SPACE)  # the 14 op names, in the order randint indexes them


# ----------------------------------------------------------------------------- decisions (CPU, per sample)
def sample_seed(seed, epoch, index):
    """The seed 01's CocoMultiLabel gives sample `index` in `epoch` (a pure function of the three)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


@dataclasses.dataclass
class Decisions:
    flip: bool
    ops: list  # [(op name, signed magnitude)] for each RandAugment slot
    cutout: tuple | None  # (cy, cx), the square's centre


def draw_decisions(seed, img_size, hflip=True, randaugment=True, cutout=True):
    """One sample's random choices, drawn in the order and with the calls of 01's build_transforms."""
    g = torch.Generator().manual_seed(seed)
    flip = hflip and bool(torch.rand(1, generator=g) < 0.5)  # v2.RandomHorizontalFlip
    ops = []
    if randaugment:
        for _ in range(RANDAUGMENT.num_ops):  # v2.RandAugment.forward
            name = OPS[int(torch.randint(len(OPS), (), generator=g))]
            magnitudes_fn, signed = RANDAUGMENT._AUGMENTATION_SPACE[name]
            magnitudes = magnitudes_fn(RANDAUGMENT.num_magnitude_bins, img_size, img_size)
            magnitude = 0.0
            if magnitudes is not None:
                magnitude = float(magnitudes[RANDAUGMENT.magnitude])
                if signed and torch.rand((), generator=g) <= 0.5:
                    magnitude = -magnitude
            ops.append((name, magnitude))
    box = None
    if cutout:  # 01's Cutout: centre row, then centre column
        box = (int(torch.randint(img_size, (), generator=g)), int(torch.randint(img_size, (), generator=g)))
    return Decisions(flip, ops, box)


# ----------------------------------------------------------------------------- workers: bytes only
class EncodedImages(Dataset):
    """01's dataset as (file bytes or pixels, target, index): a worker reads, the device decodes.

    Item 0 is a 1-D uint8 tensor (a JPEG's bytes) or, for other formats, a decoded (3, H, W) uint8
    image; item 3 the JPEG's EXIF orientation (1 = upright)."""

    def __init__(self, dataset):
        self.dataset = dataset  # a data.CocoMultiLabel; its own transform is not used

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        path = self.dataset.image_paths[index]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
            encoded = read_file(str(path))  # (n_bytes,) uint8
        target = self.dataset.labels[index].clone()
        if encoded[:2].tolist() == [0xFF, 0xD8]:  # JPEG start-of-image marker
            return encoded, target, index, jpeg_orientation(encoded)
        try:
            image = data.load_image(path)  # PNG, GIF, ...: PIL, alpha composited as on the CPU path
        except data.CorruptImageError:
            return encoded, target, index, 1  # left for decode_batch to report and replace
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous(), target, index, 1


def jpeg_orientation(encoded):
    """The EXIF orientation tag (1..8) of a JPEG's bytes, 1 if absent; reads the header only."""
    try:
        with Image.open(io.BytesIO(encoded.numpy().tobytes())) as image:
            return int(image.getexif().get(0x0112, 1))
    except (OSError, SyntaxError, ValueError):
        return 1


def collate_encoded(batch):
    """[(bytes or pixels, target, index, orientation)] -> (flat, lengths, targets (B, K), indices (B,),
    orientations, pixels): every JPEG's bytes in ONE uint8 tensor `flat` (one shared-memory block for
    the worker to send, instead of one per file), `pixels` {position: (3, H, W)} for the other formats."""
    items, targets, indices, orientations = zip(*batch, strict=True)
    jpegs = [t for t in items if t.dim() == 1]
    flat = torch.cat(jpegs) if jpegs else torch.empty(0, dtype=torch.uint8)
    lengths = [len(t) if t.dim() == 1 else 0 for t in items]
    pixels = {i: t for i, t in enumerate(items) if t.dim() != 1}
    return flat, lengths, torch.stack(targets), torch.tensor(indices), list(orientations), pixels


def split_encoded(flat, lengths, pixels):
    """collate_encoded's flat bytes back into a list: 1-D bytes per JPEG, (3, H, W) pixels for others."""
    parts = list(flat.split(lengths))
    return [pixels.get(i, part) for i, part in enumerate(parts)]


# ----------------------------------------------------------------------------- device: decode and augment
ORIENT = {  # EXIF orientation -> how to turn a (3, H, W) image upright, as PIL's exif_transpose
    2: lambda x: x.flip(-1),  # mirrored
    3: lambda x: x.flip(-1).flip(-2),  # rotated 180
    4: lambda x: x.flip(-2),  # flipped upside down
    5: lambda x: x.transpose(-1, -2),  # transposed
    6: lambda x: x.transpose(-1, -2).flip(-1),  # rotated 90 clockwise to view
    7: lambda x: x.transpose(-1, -2).flip(-1).flip(-2),  # transverse
    8: lambda x: x.transpose(-1, -2).flip(-2),  # rotated 90 counter-clockwise to view
}


def orient(image, orientation):
    """(3, H, W) image turned as EXIF orientation 1..8 says (1 and unknown values: as stored)."""
    return ORIENT[orientation](image) if orientation in ORIENT else image


def decode_batch(encoded, device):
    """Decode a list of JPEG bytes (or pass pixels through) on `device`: a list of (3, H, W) uint8,
    None where a file cannot be decoded. One batched nvjpeg call on CUDA when every file decodes."""
    jpegs = [i for i, t in enumerate(encoded) if t.dim() == 1]
    images = [None if t.dim() == 1 else t.to(device, non_blocking=True) for t in encoded]
    with warnings.catch_warnings():  # torchvision 0.29: "deprecated, superseded by TorchCodec" (see Deviations)
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        try:
            decoded = decode_jpeg([encoded[i] for i in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
        except RuntimeError:  # one bad file fails the batched call: decode one by one to find it
            decoded = []
            for i in jpegs:
                try:
                    decoded.append(decode_jpeg(encoded[i], mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
    for i, image in zip(jpegs, decoded, strict=True):
        images[i] = image
    return images


def resize_all(images, img_size):
    """List of (3, H_i, W_i) uint8 -> (B, 3, S, S) uint8; bilinear with antialiasing (as PIL), one call
    per distinct input size (COCO: a handful per batch)."""
    out = [None] * len(images)
    sizes = {}
    for i, image in enumerate(images):
        sizes.setdefault(tuple(image.shape), []).append(i)
    for members in sizes.values():
        stacked = torch.stack([images[i] for i in members])  # (b, 3, H, W)
        resized = F.resize(stacked, [img_size, img_size], interpolation=v2.InterpolationMode.BILINEAR,
                           antialias=True)  # (b, 3, S, S)
        for j, i in enumerate(members):
            out[i] = resized[j]
    return torch.stack(out)  # (B, 3, S, S)


class BatchTransform:
    """A batch of collate_encoded -> (images (B, 3, S, S) float32 normalised on `device`, targets (B, K)),
    with 01's training or evaluation transform."""

    def __init__(self, img_size, train, randaugment=True, cutout=True, hflip=True, cutout_fraction=0.5,
                 seed=0, device="cpu", channels_last=True, strict=False, paths=None):
        self.img_size, self.train, self.seed, self.device = img_size, train, seed, torch.device(device)
        self.randaugment, self.cutout, self.hflip = train and randaugment, train and cutout, train and hflip
        self.cutout_fraction, self.channels_last, self.strict = cutout_fraction, channels_last, strict
        self.paths, self.epoch, self.bad_count = paths, 0, 0
        std = torch.tensor(data.IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self.scale = 1 / (255 * std)  # (1, 3, 1, 1): (x / 255 - mean) / std = x * scale + shift
        self.shift = -torch.tensor(data.IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) / std

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def decisions(self, indices):
        return [draw_decisions(sample_seed(self.seed, self.epoch, int(i)), self.img_size, self.hflip,
                               self.randaugment, self.cutout) for i in indices]

    def __call__(self, flat, lengths, targets, indices, orientations, pixels):
        images = decode_batch(split_encoded(flat, lengths, pixels), self.device)
        images, targets = self._replace_bad(images, targets, indices)
        images = [orient(image, o) for image, o in zip(images, orientations, strict=True)]
        x = resize_all(images, self.img_size)  # (B, 3, S, S) uint8
        decisions = self.decisions(indices) if self.train else None
        if self.train:
            x = self.augment_uint8(x, decisions)
        x = torch.addcmul(self.shift, x.float(), self.scale)  # (B, 3, S, S) float32
        if self.cutout:
            x = self.apply_cutout(x, decisions)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, targets.to(self.device, non_blocking=True)

    def augment_uint8(self, x, decisions):
        """Flip and RandAugment on a uint8 batch, each sample as its decisions say."""
        flip = torch.tensor([d.flip for d in decisions], device=x.device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)  # (B, 3, S, S)
        for slot in range(RANDAUGMENT.num_ops if self.randaugment else 0):
            groups = {}
            for i, d in enumerate(decisions):
                groups.setdefault(d.ops[slot], []).append(i)
            for (name, magnitude), members in groups.items():
                if name == "Identity":
                    continue
                index = torch.tensor(members, device=x.device)
                x[index] = RANDAUGMENT._apply_image_or_video_transform(
                    x[index], name, magnitude, interpolation=RANDAUGMENT.interpolation, fill=RANDAUGMENT._fill)
        return x

    def apply_cutout(self, x, decisions):
        """01's Cutout for the whole batch: zero a square of side round(S * fraction) per sample."""
        B, _, S, _ = x.shape
        h = round(S * self.cutout_fraction)
        centre = torch.tensor([d.cutout for d in decisions], device=x.device)  # (B, 2): cy, cx
        start, stop = (centre - h // 2).clamp(min=0), centre + h - h // 2  # (B, 2) each
        r = torch.arange(S, device=x.device)  # (S,)
        rows = (r >= start[:, :1]) & (r < stop[:, :1])  # (B, S)
        cols = (r >= start[:, 1:]) & (r < stop[:, 1:])  # (B, S)
        return x.masked_fill(rows[:, None, :, None] & cols[:, None, None, :], 0.0)  # (B, 3, S, S)

    def _replace_bad(self, images, targets, indices):
        """A file that would not decode takes the next good image of the batch and its labels."""
        bad = [i for i, image in enumerate(images) if image is None]
        if not bad:
            return images, targets
        names = [self.paths[int(indices[i])] if self.paths is not None else f"sample {int(indices[i])}" for i in bad]
        if self.strict or len(bad) == len(images):
            raise data.CorruptImageError(f"{names[0]}: cannot be decoded as an image")
        targets = targets.clone()
        for i, name in zip(bad, names, strict=True):
            j = next(j for j in [(i + k) % len(images) for k in range(1, len(images))] if images[j] is not None)
            images[i], targets[i] = images[j], targets[j]
            self.bad_count += 1
            warnings.warn(f"{name}: cannot be decoded as an image; using another image of the batch",
                          RuntimeWarning, stacklevel=3)
        return images, targets


def build_encoded_loader(dataset, batch_size, train, workers=None, seed=0, distributed=False):
    """01's loader (same sampler, so the same order and resume points) over bytes instead of tensors."""
    loader = data.build_loader(EncodedImages(dataset), batch_size, train, workers=workers,
                               distributed=distributed, seed=seed, pin_memory=False)
    loader.collate_fn = collate_encoded  # set before the first iteration starts the workers
    return loader


# ----------------------------------------------------------------------------- which path
def select_data_path(device, cpu_images_per_s=None, device_images_per_s=None, exact_resume=False):
    """"device" when CUDA is there, exact resume is not asked for and the probe measured the device
    path faster; "cpu" otherwise (no CUDA, --deterministic, or the CPU path keeps up)."""
    if torch.device(device).type != "cuda" or exact_resume:
        return "cpu"
    if cpu_images_per_s is None or device_images_per_s is None:
        return "device"
    return "device" if device_images_per_s > cpu_images_per_s else "cpu"


# ----------------------------------------------------------------------------- benchmark
def bench(folder, count, img_size, device, workers, batch_size, rounds):
    """Images/s of 01's PIL path vs this path (decode only, eval transform, full training transform)."""
    from tools.bench_data import write_jpegs  # the 640x480 JPEGs of stage 1's benchmark

    folder = Path(folder)
    if not (folder / "instances.json").exists():
        write_jpegs(folder, count)
    ann = folder / "instances.json"
    from tools.timing import median, show, time_interleaved
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    threads = torch.get_num_threads()
    candidates = {}
    for train in (False, True):
        kind = "train" if train else "eval"
        cpu_set = data.CocoMultiLabel(folder, ann, data.build_transforms(img_size, train=train))
        n = len(cpu_set)
        paths = cpu_set.image_paths
        encoded_set = EncodedImages(cpu_set)
        transform = BatchTransform(img_size, train, device=device, paths=paths)

        def cpu_path(cpu_set=cpu_set, n=n):
            for i in range(n):
                cpu_set[i]

        def device_path(encoded_set=encoded_set, transform=transform, n=n):
            for start in range(0, n, batch_size):
                batch = collate_encoded([encoded_set[i] for i in range(start, min(start + batch_size, n))])
                transform(*batch)

        candidates[f"PIL path, {kind}"] = cpu_path
        candidates[f"tensor path on {device.type}, {kind}"] = device_path
    torch.set_num_threads(1)  # as in a DataLoader worker (the CPU path's work happens there)
    times = time_interleaved(candidates, rounds=rounds, sync=sync)
    torch.set_num_threads(threads)
    print(f"{n} 640x480 JPEGs -> {img_size} px; one process, 1 thread; tensor path in batches of {batch_size}; "
          f"images/s by wall clock (median of {rounds} rounds)")
    for name, t in times.items():
        print(f"  {name:32s} {n / median(t):8.1f} img/s   ({show(t)} per pass)")
    if workers > 0:
        print(f"DataLoader with {workers} workers, full training transform, {img_size} px:")
        cpu_set = data.CocoMultiLabel(folder, ann, data.build_transforms(img_size, train=True))
        transform = BatchTransform(img_size, True, device=device, paths=cpu_set.image_paths)
        cpu_loader = data.build_loader(cpu_set, batch_size, train=True, workers=workers, pin_memory=device.type == "cuda")
        device_loader = build_encoded_loader(cpu_set, batch_size, train=True, workers=workers)

        def run_cpu():
            for images, _ in cpu_loader:
                images.to(device, non_blocking=True)

        def run_device():
            for batch in device_loader:
                transform(*batch)

        run_cpu(), run_device()  # start the workers
        times = time_interleaved({"PIL path in workers": run_cpu, f"tensor path on {device.type}": run_device},
                                 rounds=rounds, sync=sync)
        per_pass = len(cpu_loader) * batch_size
        for name, t in times.items():
            print(f"  {name:32s} {per_pass / median(t):8.1f} img/s")


def end_to_end(folder, count, img_size, device, workers, batch_size, rounds, model_name, compile_model):
    """Training images/s with real JPEGs: 01's loader (PIL in workers) vs this path, each feeding 05's
    step (tools/profile_step.py) with the COCO recipe's augmentation (RandAugment + Cutout, no flip)."""
    from tools.bench_data import write_jpegs
    from tools.flops import describe, flops_per_image, peak_tflops
    from tools.profile_step import setup, time_steps
    from tools.timing import median, time_interleaved

    folder = Path(folder)
    if not (folder / "instances.json").exists():
        write_jpegs(folder, count)
    device = torch.device(device)
    cuda = device.type == "cuda"
    s = setup(model_name, img_size, batch_size, device, compile_model)
    print(s.description)
    print(time_steps(s, 5).strip())  # model alone, random tensors: the ceiling for both loaders
    dataset = data.CocoMultiLabel(folder, folder / "instances.json",
                                  data.build_transforms(img_size, train=True, hflip=False))
    transform = BatchTransform(img_size, True, hflip=False, device=device, paths=dataset.image_paths)
    cpu_loader = data.build_loader(dataset, batch_size, train=True, workers=workers, pin_memory=cuda)
    device_loader = build_encoded_loader(dataset, batch_size, train=True, workers=workers)
    memory_format = torch.channels_last

    def cpu_pass():  # labels are ignored: the step trains on the model's 80 classes
        for images, _ in cpu_loader:
            s.step(images.to(device, non_blocking=True, memory_format=memory_format), s.targets)

    def device_pass():
        for batch in device_loader:
            s.step(transform(*batch)[0], s.targets)

    names = {f"end to end, PIL path ({workers} workers)": cpu_pass,
             f"end to end, decode+augment on {device.type} ({workers} workers read)": device_pass}
    times = time_interleaved(names, rounds=rounds, sync=torch.cuda.synchronize if cuda else None)
    flops = flops_per_image(s.model, img_size).training
    peak, source = peak_tflops(torch.cuda.get_device_name(device) if cuda else "CPU")
    images = len(cpu_loader) * batch_size
    for name, t in times.items():
        print(describe(name, images / median(t), flops, peak))
    print(f"({images} images per pass, median of {rounds} passes; peak: {source})")


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="gpu_loader_draft.py", allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", action="store_true", help="measure both paths (default: off)")
    p.add_argument("--folder", type=Path, default=Path("/tmp/q2l-bench-jpeg640x480"),
                   help="where the 640x480 JPEGs are (written if absent) (default: /tmp/q2l-bench-jpeg640x480)")
    p.add_argument("--count", type=int, default=64, help="JPEGs to write (default: 64)")
    p.add_argument("--img-size", type=int, default=448, help="output side (default: 448)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default: 16)")
    p.add_argument("--device", default="cpu", help="where the tensor path runs (default: cpu)")
    p.add_argument("--workers", type=int, default=0, help="also time DataLoaders with this many workers (default: 0)")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (default: 3)")
    p.add_argument("--end-to-end", action="store_true",
                   help="time 05's training step fed by each loader (default: off)")
    p.add_argument("--model", default="official_r101", help="with --end-to-end: 03 preset (default: official_r101)")
    p.add_argument("--compile", action="store_true", help="with --end-to-end: torch.compile the model (default: off)")
    args = p.parse_args(argv)
    if args.bench:
        bench(args.folder, args.count, args.img_size, args.device, args.workers, args.batch_size, args.rounds)
    if args.end_to_end:
        end_to_end(args.folder, args.count, args.img_size, args.device, args.workers, args.batch_size, args.rounds,
                   args.model, args.compile)


if __name__ == "__main__":
    main()
