"""FLOPs per image and the fraction of the accelerator's peak a training run reaches (issue 16.1).

    python tools/flops.py --model official_r101 --img-size 448           # the COCO recipe's model
    python tools/flops.py --model official_r101 --device-name H200 --images-per-s 1130
    python tools/flops.py --model demo --img-size 64 --peak-tflops 1     # any peak, e.g. a CPU's

Prints the GFLOP of one image's backbone forward, head forward and whole training step (forward +
backward), and the ceiling in images/s at the device's peak. With --images-per-s it also prints the
achieved TFLOP/s and the fraction of peak (model FLOP utilisation, MFU):

    achieved FLOP/s = images/s . training FLOPs per image;   MFU = achieved / peak

Counting. torch.utils.flop_counter.FlopCounterMode counts the matrix products autograd runs
(convolutions and their backward, mm/addmm/bmm, attention kernels), 2 FLOPs per multiply-add;
element-wise work (normalisation, activations, softmax, the optimiser) is not counted, the usual MFU
convention (nanoGPT's estimate_mfu, PaLM appendix B). Backward is counted as autograd runs it: a
gradient for the input and one for the weight, each only where needed. So a frozen stem and first stage
(requires_grad False, fed by images that need no gradient) have no backward at all, and a training
step costs less than 3x the forward. The model runs on the meta device: shapes only, no arithmetic,
so ResNet-101 at 448 px is counted in a second on any machine, with random weights (the counts do not
depend on them). Batch 1: every count here is linear in the batch.

Peaks are the vendors' dense tensor-core figures (without 2:4 sparsity, which doubles the headline):
bf16 with fp32 accumulation, or fp16 where a chip has no bf16. They are upper bounds at boost clock;
a real matrix product reaches 70-80 % of them, a whole convnet much less.

Deviations: none from the issue's figures (62.4 + 40.3 forward, 293.9 training GFLOP per image for
official_r101 at 448 px are reproduced exactly).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages live one folder up

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

# Dense peak TFLOP/s for 16-bit tensor-core matmuls with fp32 accumulation, keyed by a substring of
# torch.cuda.get_device_name(); the longest matching key wins ("H100 PCIe" before "H100", "L40S" before
# "L4"). Source: each vendor's data sheet, whose headline figure is "with sparsity" (halved here).
PEAK_TFLOPS = {
    "H200": (989.0, "NVIDIA H200 SXM data sheet: BF16 tensor 1,979 TFLOPS with sparsity"),
    "H200 NVL": (835.0, "NVIDIA H200 NVL data sheet: BF16 tensor 1,671 TFLOPS with sparsity"),
    "H100": (989.0, "NVIDIA H100 SXM data sheet: BF16 tensor 1,979 TFLOPS with sparsity"),
    "H100 NVL": (835.0, "NVIDIA H100 NVL data sheet: BF16 tensor 1,671 TFLOPS with sparsity"),
    "H100 PCIe": (756.0, "NVIDIA H100 PCIe data sheet: BF16 tensor 1,513 TFLOPS with sparsity"),
    "GH200": (989.0, "NVIDIA GH200 data sheet: the H100/H200 GPU, BF16 tensor 1,979 with sparsity"),
    "A100": (312.0, "NVIDIA A100 data sheet (SXM and PCIe): BF16 tensor 312 TFLOPS dense"),
    "A10G": (None, "NVIDIA publishes no tensor-core peak for the A10G (an AWS variant of the A10)"),
    "A10": (125.0, "NVIDIA A10 data sheet: BF16 tensor 125 TFLOPS dense (250 with sparsity)"),
    "L40S": (362.0, "NVIDIA L40S data sheet: BF16 tensor 733 TFLOPS with sparsity"),
    "L40": (181.0, "NVIDIA L40 data sheet: BF16 tensor 362 TFLOPS with sparsity"),
    "L4": (121.0, "NVIDIA L4 data sheet: BF16 tensor 242 TFLOPS with sparsity"),
    "RTX 4090": (165.2, "NVIDIA Ada whitepaper: RTX 4090 FP16/BF16 tensor with FP32 accumulate 165.2 "
                        "dense (330.3 with fp16 accumulate, which torch's matmuls do not use)"),
    "RTX A6000": (154.8, "NVIDIA RTX A6000 data sheet: FP16/BF16 tensor with FP32 accumulate 154.8 dense"),
    "V100": (125.0, "NVIDIA V100 SXM2 data sheet: FP16 tensor 125 TFLOPS (no bf16: use --amp fp16)"),
    "T4": (65.0, "NVIDIA T4 data sheet: FP16 tensor 65 TFLOPS (no bf16: use --amp fp16)"),
    "MI300X": (1307.4, "AMD Instinct MI300X data sheet: BF16 matrix 1,307.4 TFLOPS dense"),
}


@dataclasses.dataclass
class FlopCount:
    """FLOPs for one image (batch 1)."""

    backbone_forward: int
    head_forward: int
    forward: int
    training: int  # forward + backward

    @property
    def backward(self):
        return self.training - self.forward


def count_flops(fn):
    """FLOPs counted by FlopCounterMode while fn() runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def count_step_flops(model, example):
    """(forward FLOPs, training FLOPs) of `model` on the tensor `example`, whatever its batch.

    Training = forward + the backward of a scalar made from the output: the gradients autograd
    computes are the ones the parameters' requires_grad (and example.requires_grad) ask for."""
    model.train()
    forward = count_flops(lambda: model(example))
    training = count_flops(lambda: model(example).float().sum().backward())
    model.zero_grad(set_to_none=True)
    return forward, training


def flops_per_image(model, img_size, device="meta"):
    """FlopCount of a Query2Label model (anything with .backbone and .forward_head) on one
    img_size x img_size image. The model is copied to `device` ("meta": shapes only); yours is untouched."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    model = getattr(model, "module", model)  # DistributedDataParallel's
    model = copy.deepcopy(model).to(device).train()
    image = torch.zeros(1, 3, img_size, img_size, device=device)  # (1, 3, S, S)
    # FlopCounterMode knows the CUDA fused attention kernels and the math path (what meta runs), not
    # the CPU's fused kernel, which it would count as 0: on the CPU, attention takes the math path.
    cpu = torch.device(device).type == "cpu"
    with sdpa_kernel([SDPBackend.MATH]) if cpu else contextlib.nullcontext():
        features = model.backbone(image)  # (1, C, H, W)
        backbone = count_flops(lambda: model.backbone(image))
        head = count_flops(lambda: model.forward_head(features))
        forward, training = count_step_flops(model, image)
    return FlopCount(backbone, head, forward, training)


def training_flops_per_image(model, img_size, device="meta"):
    """FLOPs of one training image (forward + backward), as --benchmark reports them."""
    return flops_per_image(model, img_size, device).training


def peak_tflops(device_name=None, override=None):
    """(peak TFLOP/s, where it comes from) for `device_name` (default: the current CUDA device);
    `override` (--peak-tflops) wins; (None, reason) when the device is not in PEAK_TFLOPS."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"--peak-tflops must be positive, got {override}")
        return float(override), "--peak-tflops"
    if device_name is None:
        if not torch.cuda.is_available():
            return None, "no CUDA device (give --peak-tflops to compare with a peak)"
        device_name = torch.cuda.get_device_name()
    matches = [key for key in PEAK_TFLOPS if key.lower() in device_name.lower()]
    if not matches:
        return None, f"{device_name!r} is not in tools/flops.py PEAK_TFLOPS (give --peak-tflops)"
    value, source = PEAK_TFLOPS[max(matches, key=len)]
    return value, f"{device_name}: {source}" + ("" if value else "; give --peak-tflops")


def achieved(images_per_s, flops_per_image, peak=None):
    """(achieved TFLOP/s, fraction of `peak` TFLOP/s or None) for a measured images/s."""
    tflops = images_per_s * flops_per_image / 1e12
    return tflops, (tflops / peak if peak else None)


def describe(label, images_per_s, flops_per_image, peak=None):
    """'eager: 501.0 img/s = 147.2 TFLOP/s = 14.9 % of 989 TFLOP/s' (one line for a benchmark)."""
    tflops, fraction = achieved(images_per_s, flops_per_image, peak)
    share = f" = {100 * fraction:.1f} % of {peak:g} TFLOP/s" if fraction is not None else ""
    return f"{label}: {images_per_s:,.1f} img/s = {tflops:,.4g} TFLOP/s{share}"


def main(argv=None):
    transformer = importlib.import_module("03_transformer")
    p = argparse.ArgumentParser(prog="tools/flops.py", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="official_r101", choices=sorted(transformer.PRESETS),
                   help="architecture preset from 03_transformer.PRESETS, random weights (default: official_r101)")
    p.add_argument("--img-size", type=int, default=448, help="input side in pixels (default: 448)")
    p.add_argument("--num-classes", type=int, default=80, help="label queries K (default: 80, COCO)")
    p.add_argument("--device-name", default=None,
                   help="look the peak up for this name (e.g. H200) instead of the CUDA device's; "
                        "default: the CUDA device, if any")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s to compare with; default: looked up in PEAK_TFLOPS")
    p.add_argument("--images-per-s", type=float, default=None,
                   help="a measured training rate: print its TFLOP/s and fraction of peak; default: none")
    args = p.parse_args(argv)
    if args.img_size <= 0 or args.num_classes <= 0:
        p.exit(2, f"{p.prog}: error: --img-size and --num-classes must be positive\n")
    try:
        peak, source = peak_tflops(args.device_name, args.peak_tflops)
    except ValueError as error:
        p.exit(2, f"{p.prog}: error: {error}\n")
    config = dataclasses.replace(transformer.PRESETS[args.model], num_classes=args.num_classes, pretrained=False)
    model = transformer.Query2Label(config)
    try:
        count = flops_per_image(model, args.img_size)
    except ValueError as error:  # e.g. a token backbone and a side not divisible by its stride
        p.exit(2, f"{p.prog}: error: {error}\n")
    print(f"{args.model} ({config.backbone}, d {config.d_model}) at {args.img_size} px, {args.num_classes} classes;"
          f" GFLOP per image (FlopCounterMode, 2 per multiply-add):")
    rows = [("backbone forward", count.backbone_forward), ("head forward", count.head_forward),
            ("forward", count.forward), ("backward", count.backward), ("training step", count.training)]
    for name, flops in rows:
        print(f"  {name:17s} {flops / 1e9:8.1f}")
    print(f"  training / forward = {count.training / count.forward:.2f} (3 if every layer had both gradients)")
    if peak is None:
        print(f"peak: unknown ({source})")
        return
    print(f"peak: {peak:g} TFLOP/s ({source})")
    print(f"ceiling at 100 % of peak: {peak * 1e12 / count.training:,.0f} training img/s")
    if args.images_per_s is not None:
        print(describe("measured", args.images_per_s, count.training, peak))


if __name__ == "__main__":
    main()
