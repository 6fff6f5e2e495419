"""Where a training step's time goes: torch.profiler over a few steps, kernels by class (issue 16.2).

    python tools/profile_step.py --model official_r101 --img-size 448 --batch-size 64        # CUDA, eager
    python tools/profile_step.py --model official_r101 --img-size 448 --batch-size 64 --compile
    python tools/profile_step.py --model demo --img-size 64 --batch-size 8 --device cpu      # anywhere

Runs --warmup steps, then profiles --steps steps and prints (a) the top kernels by self time per step
(on CUDA: device kernels, self device time; on the CPU: operators, self CPU time), (b) the share of
five classes, (c) the kernel time per step against the wall time per step: on a GPU, a kernel time
well below the wall time means the GPU waits (for Python, launches or a sync). --markdown FILE writes
the same tables for docs/05_train.md.

The step is 05_train's, built here from stages 3 and 4 with the settings of 05's "coco" preset
(`05_train.PRESETS`; no data is loaded): Query2Label with random weights, channels_last input, autocast
bf16 on CUDA (float32 on the CPU), 04's asymmetric loss, backward, the gradient norm (05 computes it
every step, with an infinite threshold when clipping is off), fused AdamW, zero_grad, the EMA update of
timm's ModelEmaV3 (parameters and buffers, as 05) and loss.item() (05 reads the loss every step, which
makes the CPU wait for the GPU once per step). Input tensors are random and already
on the device: this profiles the model step, not the loader.

Classes: a kernel's name is matched against RULES in order, the first match wins:
    copies        memcpy/memset, layout and dtype conversions (nchwToNhwc, to_copy), cat, clone, copy_
    convolution   cuDNN/oneDNN convolution kernels: conv, fprop/dgrad/wgrad, implicit_gemm, winograd
    matmul        GEMMs and attention: gemm, cublas, cutlass, xmma, mm/addmm/bmm, flash/fmha/sdpa,
                  Triton matmul templates (triton_tem)
    element-wise  everything point-wise or reducing: elementwise/vectorized/reduce kernels, Triton's
                  fused point-wise and reduction kernels (triton_poi/red/per), norms, activations,
                  softmax, the optimiser (fused AdamW, foreach) and the EMA
    other         the rest (printed, so the rules can be refined)
Limits: a name alone cannot tell every kernel's purpose: cuDNN may run a 1x1 convolution as a plain
GEMM kernel (then counted as matmul), and a fused Triton kernel mixing a copy with arithmetic counts
as element-wise. The top-kernel table shows the names, so a reader can check.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages live one folder up

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

CLASSES = ("convolution", "matmul", "element-wise", "copies", "other")
RULES = [  # (class, pattern); first match wins, case-insensitive
    ("copies", r"memcpy|memset|nchwtonhwc|nhwctonchw|to_copy|copy_|aten::(clone|cat|contiguous|_to_copy)$"
               r"|catarraybatchedcopy|copykernel|\bcopy\b"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit_gemm|winograd"),
    ("matmul", r"gemm|gemv|cublas|cutlass|xmma|matmul|aten::(mm|addmm|bmm|baddbmm|_addmm_activation)$"
               r"|flash|fmha|sdpa|attention|triton_tem"),
    ("element-wise", r"elementwise|vectorized|unrolled|reduce|triton_(poi|red|per)_|norm|softmax|relu|gelu"
                     r"|sigmoid|softplus|adam|foreach|lerp|aten::(add|mul|div|sub|exp|log|pow|where|clamp"
                     r"|sum|mean|threshold|neg|rsqrt|sqrt|fill|zero|abs|max|min|sign|lt|gt|ge|le|eq|ne)"),
]


def classify(name):
    """The class of a kernel or operator name (see RULES)."""
    for label, pattern in RULES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


@dataclasses.dataclass
class Row:
    name: str
    ms_per_step: float  # self time
    calls_per_step: float
    label: str


def build_step(model, criterion, optimizer, ema, amp_dtype):
    """05's training step on given tensors (see the module docstring); returns the loss as a float."""
    params = [p for p in model.parameters() if p.requires_grad]
    plain = getattr(model, "_orig_mod", model)  # the EMA follows the uncompiled module, as in 05

    def step(images, targets):
        with torch.autocast(images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)  # (B, K)
        loss = criterion(logits, targets)  # float32, whatever the autocast dtype
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float("inf"))  # the norm 05 logs (and clips with)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.apply_update_(plain, ema.decay)  # 05 warms the decay up; in a long run it is this one
        return loss.item()

    return step


@dataclasses.dataclass
class StepSetup:
    step: object  # step(images, targets) -> loss as a float
    images: torch.Tensor  # (B, 3, S, S) random, on the device, in the step's memory format
    targets: torch.Tensor  # (B, K)
    description: str
    model: torch.nn.Module  # uncompiled (for tools/flops.py)


def setup(model_name, img_size, batch_size, device, compile_model=False, channels_last=True, amp="auto",
          num_classes=80):
    """A StepSetup: 05's step for this model, and random inputs for a profile or a timing."""
    transformer = importlib.import_module("03_transformer")  # module names may not start with a digit
    losses = importlib.import_module("04_loss")
    recipe = importlib.import_module("05_train").PRESETS["coco"]  # the loss, optimiser and EMA settings
    device = torch.device(device)
    amp_dtype = {"auto": torch.bfloat16 if device.type == "cuda" else None, "bf16": torch.bfloat16,
                 "off": None}[amp]
    config = dataclasses.replace(transformer.PRESETS[model_name], num_classes=num_classes, pretrained=False)
    model = transformer.Query2Label(config).to(device).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    ema = ModelEmaV3(model, decay=recipe.ema_decay)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                                  weight_decay=recipe.weight_decay, fused=True)
    criterion = losses.AsymmetricLoss(gamma_neg=recipe.gamma_neg, gamma_pos=recipe.gamma_pos, clip=recipe.clip,
                                      eps=recipe.loss_eps, reduction=recipe.loss_reduction)
    step = build_step(torch.compile(model) if compile_model else model, criterion, optimizer, ema, amp_dtype)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=generator)  # (B, 3, S, S)
    images = images.to(device).contiguous(memory_format=memory_format)
    targets = (torch.rand(batch_size, num_classes, generator=generator) < 0.1).float().to(device)  # (B, K)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    description = (f"{model_name} ({config.backbone}), {img_size} px, batch {batch_size}, "
                   f"{'bf16' if amp_dtype else 'float32'}, {'channels_last' if channels_last else 'NCHW'}, "
                   f"{'compiled' if compile_model else 'eager'}, on {name}")
    return StepSetup(step, images, targets, description, model)


def profile_steps(step, images, targets, steps, warmup):
    """(rows sorted by self time, mean wall ms per step under the profiler, kernel ms per step)."""
    cuda = images.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):  # cuDNN autotuning, the allocator, torch.compile's first calls
        step(images, targets)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    walls = []
    with profile(activities=activities) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            step(images, targets)
            sync()
            walls.append(time.perf_counter() - start)
    events = prof.key_averages()
    if cuda:  # the device kernels themselves; their self time is their run time on the GPU
        chosen = [(e, e.self_device_time_total) for e in events if e.device_type == DeviceType.CUDA]
        if not chosen:  # a profiler that keeps kernel time on the operators that launched the kernels
            chosen = [(e, e.self_device_time_total) for e in events if not e.is_user_annotation]
    else:  # operators: self CPU time excludes the operators they call
        chosen = [(e, e.self_cpu_time_total) for e in events if not e.is_user_annotation]
    rows = [Row(e.key, us / 1e3 / steps, e.count / steps, classify(e.key)) for e, us in chosen if us > 0]
    rows.sort(key=lambda r: -r.ms_per_step)
    return rows, 1e3 * statistics.mean(walls), sum(r.ms_per_step for r in rows)  # means, like the rows


def time_steps(s, steps, peak_override=None):
    """Markdown lines: img/s of `steps` unprofiled steps (the first, untimed, warms up and compiles),
    achieved TFLOP/s and % of peak (tools/flops.py), peak memory on CUDA."""
    from tools.flops import describe, flops_per_image, peak_tflops
    from tools.timing import median, time_interleaved

    cuda = s.images.device.type == "cuda"
    s.step(s.images, s.targets)  # compiles (once), allocates, autotunes: not counted in time or memory
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = time_interleaved({"step": lambda: s.step(s.images, s.targets)}, rounds=steps,
                             sync=torch.cuda.synchronize if cuda else None)["step"]
    rate = s.images.shape[0] / median(times)
    count = flops_per_image(s.model, s.images.shape[-1])
    peak, source = peak_tflops(torch.cuda.get_device_name(s.images.device) if cuda else "CPU", peak_override)
    memory = f"; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
    return (f"Unprofiled, median of {steps} steps: {describe('model step', rate, count.training, peak)} "
            f"({count.training / 1e9:.1f} GFLOP per training image; peak: {source}){memory}.\n\n")


def shares(rows):
    """{class: fraction of the total self time}."""
    total = sum(r.ms_per_step for r in rows) or 1.0
    return {c: sum(r.ms_per_step for r in rows if r.label == c) / total for c in CLASSES}


def markdown(rows, wall_ms, kernel_ms, description, command, top=15, batch_size=None):
    """The class shares and the top kernels as Markdown tables."""
    what = "kernel (self device time)" if "on CPU" not in description else "operator (self CPU time)"
    rate = f" = {batch_size / wall_ms * 1e3:,.0f} img/s" if batch_size else ""
    lines = [f"Profile of {description}: `{command}`", "",
             f"Wall time {wall_ms:.1f} ms per step{rate} under the profiler; "
             f"{kernel_ms:.1f} ms of {what.split(' (')[0]} time per step "
             f"({100 * kernel_ms / wall_ms:.0f} % of the wall time).", "",
             "| class | ms per step | share |", "| --- | ---: | ---: |"]
    lines += [f"| {c} | {s * kernel_ms:.2f} | {100 * s:.1f} % |" for c, s in shares(rows).items()]
    lines += ["", f"| # | {what} | class | calls per step | ms per step | share |",
              "| ---: | --- | --- | ---: | ---: | ---: |"]
    for i, r in enumerate(rows[:top], 1):
        name = r.name if len(r.name) <= 90 else r.name[:87] + "..."
        lines.append(f"| {i} | `{name.replace('|', '/')}` | {r.label} | {r.calls_per_step:g} | "
                     f"{r.ms_per_step:.3f} | {100 * r.ms_per_step / (kernel_ms or 1):.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    transformer = importlib.import_module("03_transformer")
    p = argparse.ArgumentParser(prog="tools/profile_step.py", allow_abbrev=False,
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="official_r101", choices=sorted(transformer.PRESETS),
                   help="architecture preset from 03_transformer.PRESETS, random weights (default: official_r101)")
    p.add_argument("--img-size", type=int, default=448, help="input side in pixels (default: 448)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when there is one, else cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (default: off, eager)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC images and weights (default: on, as 05)")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto",
                   help="autocast dtype; auto = bf16 on CUDA, float32 on the CPU (default: auto)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (default: 5)")
    p.add_argument("--warmup", type=int, default=3, help="steps before profiling (default: 3)")
    p.add_argument("--top", type=int, default=15, help="kernels listed (default: 15)")
    p.add_argument("--timed-steps", type=int, default=0,
                   help="first time this many steps without the profiler: img/s, TFLOP/s, %% of peak, peak "
                        "memory (default: 0, no timing)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak for the %% of peak (default: looked up in tools/flops.py PEAK_TFLOPS)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file (default: none)")
    args = p.parse_args(argv)
    for flag in ("img_size", "batch_size", "steps", "top"):
        if getattr(args, flag) <= 0:
            p.exit(2, f"{p.prog}: error: --{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}\n")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.exit(2, f"{p.prog}: error: --device {args.device} but torch sees no CUDA device; use --device cpu\n")
    try:
        s = setup(args.model, args.img_size, args.batch_size, args.device, args.compile, args.channels_last, args.amp)
    except ValueError as error:  # e.g. a token backbone and a side not divisible by its stride
        p.exit(2, f"{p.prog}: error: {error}\n")
    timing = time_steps(s, args.timed_steps, args.peak_tflops) if args.timed_steps > 0 else ""
    rows, wall_ms, kernel_ms = profile_steps(s.step, s.images, s.targets, args.steps, max(args.warmup, 0))
    command = "python tools/profile_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = markdown(rows, wall_ms, kernel_ms, s.description, command.strip(), args.top, args.batch_size)
    table = table.replace("\n\n", "\n\n" + timing, 1) if timing else table
    print(table)
    unclassified = [r.name for r in rows if r.label == "other"][:5]
    if unclassified:
        print("largest unclassified (other):", "; ".join(unclassified))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
