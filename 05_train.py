"""Stage 5: the training job. Trains Query2Label with ASL, AMP, EMA, exact resume, TensorBoard, DDP.

    python 05_train.py                      # built-in dataset (generated on first use), demo preset
    python 05_train.py --epochs 40          # COCO 2014 when it is under data/coco (the official R101 recipe)
    python 05_train.py --resume auto        # continue the run in runs/<name>/ exactly where it stopped
    torchrun --nproc_per_node=4 05_train.py # DistributedDataParallel, one process per GPU
    python 05_train.py --benchmark          # training images/s on synthetic tensors vs data pipeline images/s

Paper: Section 3.3 and 4.1 (training details). The recipe of the official code for ResNet-101 at 448 px
is the "coco" preset below; the "demo" preset trains a small model from scratch on the built-in dataset
in a few minutes on a laptop CPU. Every value is printed at start, saved to runs/<name>/config.json,
and can be overridden flag by flag (`--help` lists them).

What a run writes to runs/<name>/: last.pt (every epoch, and every --save-every-steps steps),
best.pt (best validation mAP, raw or EMA weights, whichever is better), config.json, history.jsonl
(one line per epoch), train.log, curves.png and TensorBoard event files (`tensorboard --logdir runs`).

Checkpoints hold state dicts only (loaded with `weights_only=True`) and are written atomically: a kill
during a save leaves the previous file intact. last.pt holds everything needed to continue bit-exactly
(model, EMA, optimiser, scheduler, scaler, epoch and step, best metric, every RNG, the data position and
the arguments): on the CPU with --deterministic, a run killed with SIGKILL and resumed ends with the
same weights as one that was never interrupted (tests/test_05_train.py checks it).

Deviations from the official code (github.com/SlongLiu/query2labels), each on purpose:
- Resume restores the whole training state, not only the weights; saving cannot crash on a missing
  attribute (its issues #31, #38, #40); last.pt is written every epoch, not just the best model.
- The EMA decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so that the EMA is
  useful in short runs; with decay 0.9997 it reaches the official value after ~33k steps.
- Validation reports scikit-learn's (non-interpolated) AP and the official VOC interpolated AP side
  by side, plus CF1/OF1 (stage 6); "best" is chosen by the former.
- A non-finite loss skips the update and is reported; repeated ones stop the run.

Import note: this stage imports 06_eval for its metrics, the one import in this project that
points forwards: the metrics are taught in stage 6, and 06 never imports 05, so there is no cycle.

Next: 06_eval.py scores a checkpoint, predicts labels for images and draws attention maps.
"""

import argparse
import copy
import dataclasses
import importlib
import json
import os
import random
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

data = importlib.import_module("01_data")  # module names may not start with a digit
transformer = importlib.import_module("03_transformer")
losses = importlib.import_module("04_loss")
evaluation = importlib.import_module("06_eval")  # metrics, predict_scores, amp_dtype_for; see "Import note"

CHECKPOINT_FORMAT = "q2l-checkpoint-v1"

# Training presets. "coco" is the official ResNet-101 recipe at 448 px (REFERENCES.md); "demo" is sized
# for a from-scratch run on a 2-core CPU. The model architecture comes from stage 3's presets.
PRESETS = {
    "coco": dict(
        model="official_r101", pretrained=True, img_size=448, epochs=80, early_stop=8,
        batch_size=64, lr=1e-4, backbone_lr=1e-4, weight_decay=1e-2, warmup_pct=0.2, grad_clip=0.0,
        ema_decay=0.9997, loss="asl", gamma_neg=2.0, gamma_pos=0.0, clip=0.0, loss_eps=1e-5,
        loss_reduction="q2l", randaugment=True, cutout=True, hflip=False, cutmix=0.0, workers=8,
    ),
    # From scratch, the backbone needs a higher learning rate than the transformer, which turns
    # unstable above ~2e-3 (measured: see docs/05_train.md); augmentation would only slow a
    # short run down.
    "demo": dict(
        model="demo", pretrained=False, img_size=64, epochs=9, early_stop=0,
        batch_size=32, lr=1e-3, backbone_lr=4e-3, weight_decay=1e-2, warmup_pct=0.2, grad_clip=1.0,
        ema_decay=0.995, loss="asl", gamma_neg=2.0, gamma_pos=0.0, clip=0.0, loss_eps=1e-5,
        loss_reduction="q2l", randaugment=False, cutout=False, hflip=True, cutmix=0.0, workers=0,
    ),
}
# Values that no preset sets. A flag left unset takes the preset's value, else this one.
DEFAULTS = dict(
    preset="auto", data_root="data/coco", synthetic_root="data/synthetic", train_images=None,
    train_ann=None, val_images=None, val_ann=None, drop_empty=False, strict=False, backbone=None,
    weights=None, d_model=None, heads=None, ff=None, enc_layers=None, dec_layers=None, dropout=None,
    cutmix_alpha=1.0, seed=0, deterministic=False, amp="auto", channels_last=None, compile=False,
    device=None, name=None, out_dir="runs", resume=None, save_every_steps=0, max_nonfinite=3,
    benchmark=False, benchmark_steps=10,
)
# Flags a resumed run may change; anything else must match the checkpoint (else the run is not a
# continuation of the one that was stopped, and we say so instead of silently mixing two recipes).
RESUME_OVERRIDABLE = {"workers", "resume", "save_every_steps", "compile", "max_nonfinite", "device"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train Query2Label. Unset flags take the preset's value (printed at start).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bool_flag = dict(action=argparse.BooleanOptionalAction, default=None)
    # * data
    p.add_argument("--preset", choices=["auto", "coco", "demo"], default=None,
                   help="recipe; auto = 'coco' for COCO or your own dataset, 'demo' for the built-in one")
    p.add_argument("--data-root", help="COCO 2014 root (train2014/, val2014/, annotations/); default data/coco")
    p.add_argument("--synthetic-root", help="where the built-in dataset lives; default data/synthetic")
    p.add_argument("--train-images", help="your own dataset: folder of training images")
    p.add_argument("--train-ann", help="your own dataset: COCO-format instances JSON for training")
    p.add_argument("--val-images", help="your own dataset: folder of validation images")
    p.add_argument("--val-ann", help="your own dataset: COCO-format instances JSON for validation")
    p.add_argument("--drop-empty", **bool_flag, help="drop images without annotations (ASL repo) "
                   "instead of keeping them as all-negative (Query2Label); default keep")
    p.add_argument("--strict", **bool_flag, help="fail on a corrupt image instead of replacing it")
    p.add_argument("--img-size", type=int, help="square input size in pixels")
    p.add_argument("--workers", type=int, help="DataLoader worker processes per GPU/process")
    # * model
    p.add_argument("--model", help="architecture preset from 03_transformer.PRESETS")
    p.add_argument("--backbone", help="any timm model name, e.g. resnet101, tresnet_l, convnext_tiny")
    p.add_argument("--pretrained", **bool_flag, help="load ImageNet weights from the timm hub")
    p.add_argument("--weights", help="backbone weights from a local .pth/.pt/.safetensors file (offline)")
    p.add_argument("--d-model", type=int, help="transformer width d")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--ff", type=int, help="feed-forward width")
    p.add_argument("--enc-layers", type=int, help="encoder layers")
    p.add_argument("--dec-layers", type=int, help="decoder layers")
    p.add_argument("--dropout", type=float, help="dropout in the transformer")
    # * optimisation
    p.add_argument("--epochs", type=int, help="epochs; the one-cycle schedule spans exactly these")
    p.add_argument("--batch-size", type=int, help="images per step per process")
    p.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule (AdamW)")
    p.add_argument("--backbone-lr", type=float, help="peak learning rate of the backbone (DETR's lr_backbone)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (on all parameters, as official)")
    p.add_argument("--warmup-pct", type=float, help="fraction of steps spent warming up (OneCycleLR pct_start)")
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm to this; 0 = off")
    p.add_argument("--early-stop", type=int, help="stop after this many epochs without a better mAP; 0 = off")
    p.add_argument("--seed", type=int, help="seed for weights, data order, augmentation; default 0")
    p.add_argument("--deterministic", **bool_flag, help="deterministic algorithms (bit-exact resume)")
    # * loss
    p.add_argument("--loss", choices=["asl", "bce"], help="asymmetric loss, or plain BCE to compare")
    p.add_argument("--gamma-neg", type=float, help="ASL focusing exponent for negatives")
    p.add_argument("--gamma-pos", type=float, help="ASL focusing exponent for positives")
    p.add_argument("--clip", type=float, help="ASL probability shift m for negatives")
    p.add_argument("--loss-eps", type=float, help="ASL eps (see 04_loss.py)")
    p.add_argument("--loss-reduction", choices=["sum", "mean", "q2l"], help="see 04_loss.py")
    # * augmentation
    p.add_argument("--randaugment", **bool_flag, help="RandAugment on training images")
    p.add_argument("--cutout", **bool_flag, help="Cutout on training images")
    p.add_argument("--hflip", **bool_flag, help="random horizontal flips")
    p.add_argument("--cutmix", type=float, help="probability of multi-label CutMix per batch; 0 = off")
    p.add_argument("--cutmix-alpha", type=float, help="CutMix box ~ Beta(alpha, alpha); default 1")
    # * precision and speed
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision; auto = bf16 on CUDA that supports it, else fp16 on CUDA, off on CPU")
    p.add_argument("--channels-last", **bool_flag, help="NHWC memory format for the convolutions; default on")
    p.add_argument("--compile", **bool_flag, help="torch.compile the model (slow start, faster steps)")
    p.add_argument("--device", help="cuda, cuda:1 or cpu; default cuda when available")
    # * checkpoints and logging
    p.add_argument("--name", help="run name: outputs go to <out-dir>/<name>/; default the preset's name")
    p.add_argument("--out-dir", help="folder for runs; default runs")
    p.add_argument("--resume", help="last.pt of a stopped run, or 'auto' for <out-dir>/<name>/last.pt")
    p.add_argument("--save-every-steps", type=int, help="also write last.pt every N steps; 0 = per epoch only")
    p.add_argument("--max-nonfinite", type=int, help="stop after this many non-finite losses in a row")
    p.add_argument("--benchmark", **bool_flag, help="measure training and data images/s, then exit")
    p.add_argument("--benchmark-steps", type=int, help="timed steps for --benchmark")
    return p.parse_args(argv)


def resolve_config(args, spec, resumed=None):
    """Every setting with its value, from (in order) the flag, the checkpoint, the preset, DEFAULTS."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    if resumed is not None:
        saved = resumed["args"]
        clash = {k: (saved.get(k), v) for k, v in given.items()
                 if k not in RESUME_OVERRIDABLE and saved.get(k) != v}
        if clash:
            lines = "\n".join(f"  --{k.replace('_', '-')}: checkpoint {a!r}, now {b!r}" for k, (a, b) in clash.items())
            raise SystemExit(f"error: --resume continues a run with its own settings, and these differ:\n{lines}\n"
                             "Drop them to continue that run, or start a new run with another --name.")
        return {**saved, **{k: v for k, v in given.items() if k in RESUME_OVERRIDABLE}}
    preset = given.get("preset", "auto")
    if preset == "auto":
        preset = "demo" if spec.kind == "synthetic" else "coco"
    config = {**DEFAULTS, **PRESETS[preset], **given, "preset": preset}
    config["name"] = config["name"] or preset
    return config


# ----------------------------------------------------------------------------- distributed set-up

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0


def setup_distributed(device_flag):
    """One process per device. torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain run is world 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if device_flag:
        try:
            device = torch.device(device_flag)
        except RuntimeError:
            raise SystemExit(f"error: --device {device_flag!r} is not a device; use cpu, cuda or cuda:N") from None
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {device_flag} asked for CUDA, but PyTorch sees no CUDA device here")
        if device.index is None:  # plain "cuda": this process's GPU under torchrun, else the first
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise SystemExit(f"error: --device {device} does not exist: {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def barrier(d):
    if d.world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- pieces of the recipe

def build_model_config(config, num_classes):
    if config["model"] not in transformer.PRESETS:
        raise SystemExit(f"error: --model {config['model']!r} is not a preset; choose one of "
                         f"{sorted(transformer.PRESETS)} (03_transformer.PRESETS)")
    cfg = dataclasses.replace(transformer.PRESETS[config["model"]], num_classes=num_classes)
    overrides = dict(backbone=config["backbone"], pretrained=config["pretrained"], weights=config["weights"],
                     d_model=config["d_model"], num_heads=config["heads"], dim_feedforward=config["ff"],
                     enc_layers=config["enc_layers"], dec_layers=config["dec_layers"], dropout=config["dropout"])
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def build_loss(config):
    if config["loss"] == "bce":
        # eps 0: the plain BCE of the formula, with no cap on a confidently wrong prediction's loss
        return losses.AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0, eps=0.0,
                                     reduction=config["loss_reduction"])
    return losses.AsymmetricLoss(gamma_neg=config["gamma_neg"], gamma_pos=config["gamma_pos"],
                                 clip=config["clip"], eps=config["loss_eps"], detach_focal_weight=True,
                                 reduction=config["loss_reduction"])


class ModelEMA:
    """Exponential moving average of the weights: ema = decay * ema + (1 - decay) * weights.

    Buffers that are not floating point (counters) are copied. The decay warms up (see Deviations)."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema, now = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in ema.items() if v.dtype.is_floating_point]
        torch._foreach_lerp_([ema[k] for k in floats], [now[k] for k in floats], 1.0 - decay)
        for k, v in ema.items():
            if not v.dtype.is_floating_point:
                v.copy_(now[k])

    def state_dict(self):
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


def rng_state():
    np_state = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"bit_generator": np_state["bit_generator"], "pos": np_state["state"]["pos"],
                      "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                      "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]}}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"], "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]}})


def save_atomic(obj, path):
    """Write to a temporary file, flush it to disk, then rename: a crash leaves the old file intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} is not a checkpoint written by 05_train.py (no '{CHECKPOINT_FORMAT}')")
    return ckpt


def find_resume(resume, out_dir, name=None):
    """'auto' = runs/<name>/last.pt with --name, else the most recently written runs/*/last.pt."""
    if resume != "auto":
        return Path(resume)
    pattern = f"{name}/last.pt" if name else "*/last.pt"
    candidates = sorted(Path(out_dir).glob(pattern), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise SystemExit(f"error: --resume auto found no {out_dir}/{pattern} to continue")
    return candidates[-1]


def fresh_run_dir(out_dir, name):
    """runs/<name>, or runs/<name>-2, -3, ... so that a second run never overwrites a first."""
    run_dir, n = Path(out_dir) / name, 1
    while (run_dir / "last.pt").exists() or (run_dir / "config.json").exists():
        n += 1
        run_dir = Path(out_dir) / f"{name}-{n}"
    return run_dir


class StopRequest:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step and write last.pt; a second
    Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested, self.previous = False, {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing last.pt "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Log:
    """Prints on rank 0, appends to train.log, and writes TensorBoard scalars."""

    def __init__(self, d, run_dir):
        self.main, self.file, self.writer = d.main, None, None
        if self.main:
            from torch.utils.tensorboard import (
                SummaryWriter,  # imported here: tensorboard is slow to import
            )

            run_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(run_dir / "train.log", "a")
            self.writer = SummaryWriter(str(run_dir))

    def __call__(self, message):
        if self.main:
            tqdm.write(message)
            self.file.write(message + "\n")
            self.file.flush()

    def scalars(self, values, step):
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def close(self):
        if self.main:
            self.writer.close()
            self.file.close()


# ----------------------------------------------------------------------------- validation

def validate(model, loader, d, amp_dtype, channels_last, class_names, desc):
    """Scores every validation image exactly once across all processes, then computes the metrics."""
    indices = np.asarray(list(loader.sampler), dtype=np.int64)  # dataset index of each row
    if len(indices):
        scores, targets = evaluation.predict_scores(model, loader, d.device, amp_dtype, channels_last, desc, d.main)
    else:  # more processes than validation images: this one has nothing to score
        K = len(class_names)
        scores, targets = np.zeros((0, K), np.float32), np.zeros((0, K), np.float32)
    if d.world > 1:
        parts = [None] * d.world
        dist.all_gather_object(parts, (indices, scores, targets))
        indices = np.concatenate([p[0] for p in parts])
        scores = np.concatenate([p[1] for p in parts])
        targets = np.concatenate([p[2] for p in parts])
    n = len(loader.dataset)
    if len(indices) != n or not np.array_equal(np.sort(indices), np.arange(n)):
        raise RuntimeError(f"validation scored {len(indices)} rows for {n} images "
                           f"({len(np.unique(indices))} distinct): the eval sampler must cover each image once")
    order = np.argsort(indices)
    scores, targets = scores[order], targets[order]
    ap = evaluation.mean_average_precision(scores, targets, class_names=class_names)
    voc = evaluation.mean_average_precision(scores, targets, interpolated=True, class_names=class_names)
    at_threshold = evaluation.threshold_metrics(scores, targets, threshold=0.5)
    top3 = evaluation.threshold_metrics(scores, targets, threshold=0.5, top_k=3)
    return {"mAP": float(ap["mAP"]), "mAP_voc": float(voc["mAP"]), "excluded": list(map(str, ap["excluded"])),
            "CF1": float(at_threshold["CF1"]), "OF1": float(at_threshold["OF1"]),
            "CF1_top3": float(top3["CF1"]), "OF1_top3": float(top3["OF1"]), "images_scored": int(len(indices)),
            "scores": scores, "targets": targets}


# ----------------------------------------------------------------------------- the training loop

def train_one_epoch(state, ctx, stop):
    """One epoch from state["step_in_epoch"]; returns "done", "stopped" (signal) or "nonfinite"."""
    model, optimizer, scheduler, scaler = ctx["model"], ctx["optimizer"], ctx["scheduler"], ctx["scaler"]
    d, config, loader, log = ctx["dist"], ctx["config"], ctx["train_loader"], ctx["log"]
    memory_format = torch.channels_last if ctx["channels_last"] else torch.contiguous_format
    amp_dtype, params = ctx["amp_dtype"], [p for p in model.parameters() if p.requires_grad]
    loader.sampler.set_epoch(state["epoch"])
    loader.sampler.set_start_batch(state["step_in_epoch"])
    model.train()
    bar = tqdm(total=len(loader), initial=state["step_in_epoch"], desc=f"epoch {state['epoch'] + 1}/{config['epochs']}",
               disable=not d.main, dynamic_ncols=True, leave=False)
    seen_at, images_seen = time.perf_counter(), 0
    for images, targets in loader:
        images = images.to(d.device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(d.device, non_blocking=True)
        if ctx["cutmix"] is not None:
            images, targets = ctx["cutmix"](images, targets, generator=ctx["cutmix_rng"])
        with torch.autocast(d.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        loss = ctx["criterion"](logits, targets)  # computed in float32 by stage 4 even under autocast
        # All processes must agree to skip a step (else DDP's gradient all-reduce would hang) and to stop.
        flags = torch.tensor([float(not torch.isfinite(loss)), float(stop.requested)], device=d.device)
        if d.world > 1:
            dist.all_reduce(flags)
        nonfinite, stopping = bool(flags[0] > 0), bool(flags[1] > 0)
        if not nonfinite:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip (and check) the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config["grad_clip"] or float("inf"))
            # With fp16 the scaler itself skips steps with inf gradients while it calibrates its scale.
            nonfinite = not scaler.is_enabled() and not torch.isfinite(grad_norm)
            if not nonfinite:
                scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped step is deliberate here, PyTorch's warning is not for us
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            scheduler.step()  # also on a skipped step, so the schedule still ends at the last epoch
        state["global_step"] += 1
        state["step_in_epoch"] += 1
        if nonfinite:
            state["nonfinite_in_a_row"] += 1
            state["nonfinite_total"] += 1
            log(f"warning: non-finite loss or gradient at epoch {state['epoch'] + 1} step {state['global_step']} "
                f"(loss {loss.item()}); update skipped ({state['nonfinite_in_a_row']} in a row)")
            if state["nonfinite_in_a_row"] >= config["max_nonfinite"]:
                bar.close()
                return "nonfinite"
        else:
            state["nonfinite_in_a_row"] = 0
            ctx["ema"] and ctx["ema"].update(unwrap(model))
            state["loss_sum"] += loss.item()
            state["loss_count"] += 1
        images_seen += images.shape[0] * d.world
        bar.update(1)
        if d.main and (state["step_in_epoch"] % 10 == 0 or state["step_in_epoch"] == len(loader)):
            rate = images_seen / (time.perf_counter() - seen_at)
            lr = scheduler.get_last_lr()[1]  # the transformer's (--lr); the backbone's is scaled alike
            bar.set_postfix(loss=f"{state['loss_sum'] / max(state['loss_count'], 1):.4f}", lr=f"{lr:.2e}",
                            img_s=f"{rate:.0f}")
            ctx["log"].scalars({"train/loss": loss.item(), "train/lr": lr, "train/images_per_s": rate},
                               state["global_step"])
        if stopping:
            bar.close()
            return "stopped"
        if config["save_every_steps"] and state["global_step"] % config["save_every_steps"] == 0:
            save_last(state, ctx)
    bar.close()
    state["images_per_s"] = images_seen / max(time.perf_counter() - seen_at, 1e-9)
    return "done"


def unwrap(model):
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module too


def checkpoint_common(state, ctx):
    return {"format": CHECKPOINT_FORMAT, "model_config": dataclasses.asdict(ctx["model_config"]),
            "class_names": ctx["class_names"], "data": ctx["data_info"], "args": ctx["config"],
            "epoch": state["epoch"], "step": state["global_step"], "best_map": state["best_map"],
            "best_source": state["best_source"], "best_epoch": state["best_epoch"]}


def save_last(state, ctx):
    """Everything needed to continue bit-exactly. Collective: every process calls it."""
    d = ctx["dist"]
    rng = rng_state()
    if d.world > 1:  # each process has its own dropout/augmentation RNG stream
        all_rng = [None] * d.world
        dist.all_gather_object(all_rng, rng)
    else:
        all_rng = [rng]
    if d.main:
        ema = ctx["ema"]
        save_atomic({**checkpoint_common(state, ctx), "model": unwrap(ctx["model"]).state_dict(),
                     "weights_source": "raw", "ema": ema.state_dict() if ema else None,
                     "optimizer": ctx["optimizer"].state_dict(), "scheduler": ctx["scheduler"].state_dict(),
                     "scaler": ctx["scaler"].state_dict(), "cutmix_rng": ctx["cutmix_rng"].get_state(),
                     "rng": all_rng, "world_size": d.world, "state": dict(state)}, ctx["run_dir"] / "last.pt")
    barrier(d)


def restore(ckpt, ctx):
    d = ctx["dist"]
    unwrap(ctx["model"]).load_state_dict(ckpt["model"])
    if ctx["ema"] is not None:
        ctx["ema"].load_state_dict(ckpt["ema"])
    ctx["optimizer"].load_state_dict(ckpt["optimizer"])
    ctx["scheduler"].load_state_dict(ckpt["scheduler"])
    ctx["scaler"].load_state_dict(ckpt["scaler"])
    ctx["cutmix_rng"].set_state(ckpt["cutmix_rng"])
    if ckpt["world_size"] == d.world:
        set_rng_state(ckpt["rng"][d.rank])
    else:
        ctx["log"](f"note: checkpoint was written by {ckpt['world_size']} processes, this run has {d.world}: "
                   "training continues, but not bit-exactly")
        set_rng_state(ckpt["rng"][0])
    return dict(ckpt["state"])


def write_curves(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax2.plot(epochs, [h["mAP_raw"] for h in history], marker="o", label="raw weights")
    if history[0].get("mAP_ema") is not None:
        ax2.plot(epochs, [h["mAP_ema"] for h in history], marker="s", label="EMA weights")
    ax2.set(xlabel="epoch", ylabel="validation mAP (%)", title="validation mAP")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- benchmark

def benchmark(ctx):
    """Training images/s on synthetic tensors (the model's speed) vs the data pipeline's images/s."""
    d, config, model = ctx["dist"], ctx["config"], ctx["model"]
    B, S, K = config["batch_size"], config["img_size"], len(ctx["class_names"])
    memory_format = torch.channels_last if ctx["channels_last"] else torch.contiguous_format
    images = torch.randn(B, 3, S, S, device=d.device).contiguous(memory_format=memory_format)
    targets = (torch.rand(B, K, device=d.device) < 0.05).float()
    sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)
    model.train()
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast(d.device.type, dtype=ctx["amp_dtype"] or torch.float32,
                            enabled=ctx["amp_dtype"] is not None):
            loss = ctx["criterion"](model(images), targets)
        ctx["scaler"].scale(loss).backward()
        ctx["scaler"].step(ctx["optimizer"])
        ctx["scaler"].update()
        ctx["optimizer"].zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: cuDNN autotuning, allocator, torch.compile
        step()
    sync()
    start = time.perf_counter()
    for _ in tqdm(range(config["benchmark_steps"]), desc="model steps", disable=not d.main, leave=False):
        step()
    sync()
    model_rate = B * config["benchmark_steps"] / (time.perf_counter() - start)
    loader, n_batches = ctx["train_loader"], min(len(ctx["train_loader"]), max(config["benchmark_steps"], 20))
    loader.sampler.set_epoch(0)
    loader.sampler.set_start_batch(0)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in tqdm(range(n_batches - 1), desc="data batches", disable=not d.main, leave=False):
        next(it)
    data_rate = B * (n_batches - 1) / (time.perf_counter() - start)
    del it
    result = {"device": str(d.device), "amp": str(ctx["amp_dtype"]), "channels_last": ctx["channels_last"],
              "batch_size": B, "img_size": S, "train_images_per_s": model_rate,
              "data_images_per_s": data_rate, "workers": config["workers"]}
    if d.device.type == "cuda":
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    limit = "the data pipeline" if data_rate < model_rate else "the model"
    ctx["log"](f"benchmark ({d.device}, batch {B}, {S} px, amp {ctx['amp_dtype']}, "
               f"channels_last {ctx['channels_last']}, {config['workers']} workers):\n"
               f"  training step on synthetic tensors: {model_rate:8.1f} images/s\n"
               f"  data pipeline alone:                {data_rate:8.1f} images/s\n"
               + (f"  peak GPU memory: {result['peak_gpu_memory_gib']:.2f} GiB\n" if "peak_gpu_memory_gib" in result else "")
               + f"  -> {limit} limits training speed")
    return result


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    d = setup_distributed(args.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    onednn_deterministic = torch.backends.mkldnn.deterministic
    try:
        return run(args, d)
    finally:  # a caller (tests, a notebook) gets its settings back
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.mkldnn.deterministic = onednn_deterministic
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run(args, d):
    started = time.perf_counter()
    resumed = None
    if args.resume:
        path = find_resume(args.resume, args.out_dir or DEFAULTS["out_dir"], args.name)
        resumed = load_checkpoint(path)
    # The dataset comes first (the preset depends on it). Rank 0 generates the built-in one if needed.
    source = resumed["args"] if resumed else {**DEFAULTS, **{k: v for k, v in vars(args).items() if v is not None}}
    spec = None
    for rank_turn in (True, False):
        if d.main == rank_turn:
            spec = data.resolve_dataset(source["data_root"], source["train_images"], source["train_ann"],
                                        source["val_images"], source["val_ann"], source["synthetic_root"])
        barrier(d)
    config = resolve_config(args, spec, resumed)
    run_dir = path.parent if resumed else fresh_run_dir(config["out_dir"], config["name"])
    if d.world > 1 and not resumed:  # every process must write to the same folder
        box = [str(run_dir)]
        dist.broadcast_object_list(box)
        run_dir = Path(box[0])
    log = Log(d, run_dir)
    log(f"dataset: {spec.note}")
    if resumed:
        log(f"resuming {path} at epoch {resumed['state']['epoch'] + 1}, step {resumed['step']}")
    log("configuration (preset '" + config["preset"] + "'; flags override):\n"
        + "\n".join(f"  {k:18s} {v}" for k, v in config.items()))

    torch.manual_seed(config["seed"] + d.rank)
    random.seed(config["seed"] + d.rank)
    np.random.seed(config["seed"] + d.rank)
    if config["deterministic"]:
        torch.use_deterministic_algorithms(True)
        # oneDNN, the CPU convolutions, may reduce with atomics unless told not to; the switch above
        # does not cover it (torch.backends.mkldnn.deterministic stays False by default).
        torch.backends.mkldnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif d.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # * data
    augment = dict(randaugment=config["randaugment"], cutout=config["cutout"], hflip=config["hflip"])
    train_set = data.CocoMultiLabel(spec.train_images, spec.train_ann,
                                    data.build_transforms(config["img_size"], train=True, **augment),
                                    drop_empty=config["drop_empty"], strict=config["strict"], seed=config["seed"])
    val_set = data.CocoMultiLabel(spec.val_images, spec.val_ann,
                                  data.build_transforms(config["img_size"], train=False),
                                  drop_empty=config["drop_empty"], strict=config["strict"], seed=config["seed"])
    if train_set.class_names != val_set.class_names:
        raise SystemExit(f"error: {spec.train_ann} and {spec.val_ann} define different categories; "
                         "training and validation must share one label set")
    log(train_set.summary())
    log(val_set.summary())
    loader_args = dict(workers=config["workers"], distributed=d.world > 1, seed=config["seed"],
                       pin_memory=d.device.type == "cuda")
    train_loader = data.build_loader(train_set, config["batch_size"], train=True, **loader_args)
    val_loader = data.build_loader(val_set, config["batch_size"], train=False, **loader_args)
    if len(train_loader) == 0:
        raise SystemExit(f"error: {len(train_set)} training images per process is less than one batch of "
                         f"{config['batch_size']}; lower --batch-size")

    # * model, EMA, optimiser, schedule, loss
    model_config = build_model_config(config, len(train_set.class_names))
    # NHWC is faster for convolutions on CUDA (tensor cores) and, measured here, on the CPU too.
    channels_last = config["channels_last"] if config["channels_last"] is not None else True
    try:
        model = transformer.Query2Label(model_config).to(d.device)
    except (transformer.backbone.WeightsUnavailableError, FileNotFoundError, ValueError, NotImplementedError) as error:
        # no network for the hub, a missing or mismatched weights file, an unknown backbone, a bad width
        raise SystemExit(f"error: cannot build the model: {error}") from None
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log(f"model: {model_config.backbone}, d {model_config.d_model}, {n_train / 1e6:.2f}M trainable of "
        f"{n_all / 1e6:.2f}M parameters")
    ema = ModelEMA(model, config["ema_decay"]) if config["ema_decay"] > 0 else None
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if n.startswith("backbone.")], "lr": config["backbone_lr"]},
              {"params": [p for n, p in trainable if not n.startswith("backbone.")], "lr": config["lr"]}]
    # weight decay on every parameter, as official; fused: one kernel for all parameters instead of ~10
    # per tensor (measured on the demo model on the CPU: 1.4-1.6 ms per step instead of 5.0-5.7 ms)
    optimizer = torch.optim.AdamW(groups, weight_decay=config["weight_decay"], fused=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups],
                                                    pct_start=config["warmup_pct"],
                                                    total_steps=config["epochs"] * len(train_loader))
    # bf16 needs no loss scaling (the exponent range of fp32); fp16 does; the CPU default is fp32
    amp_dtype = evaluation.amp_dtype_for(config["amp"], d.device)
    scaler = torch.amp.GradScaler(d.device.type, enabled=amp_dtype == torch.float16)
    if config["compile"]:
        model = torch.compile(model)
    if d.world > 1:
        model = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    cutmix_rng = torch.Generator().manual_seed(config["seed"] * 1000 + d.rank)
    ctx = dict(dist=d, config=config, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler,
               scaler=scaler, criterion=build_loss(config), amp_dtype=amp_dtype, channels_last=channels_last,
               train_loader=train_loader, val_loader=val_loader, log=log, run_dir=run_dir,
               model_config=model_config, class_names=list(train_set.class_names), cutmix_rng=cutmix_rng,
               cutmix=data.CutMix(config["cutmix_alpha"], config["cutmix"]) if config["cutmix"] > 0 else None,
               data_info={"kind": spec.kind, "val_images": str(spec.val_images), "val_ann": str(spec.val_ann),
                          "val_ann_fingerprint": data.file_fingerprint(spec.val_ann),
                          "img_size": config["img_size"], "drop_empty": config["drop_empty"]})
    if config["benchmark"]:
        result = benchmark(ctx)
        log.close()
        return result

    state = dict(epoch=0, step_in_epoch=0, global_step=0, best_map=-1.0, best_source=None, best_epoch=-1,
                 epochs_without_better=0, nonfinite_in_a_row=0, nonfinite_total=0, loss_sum=0.0, loss_count=0,
                 history=[])
    if resumed:
        state = restore(resumed, ctx)
    if d.main:
        (run_dir / "config.json").write_text(json.dumps(config, indent=2))
        log.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))
    log(f"amp: {amp_dtype or 'off (float32)'}; channels_last: {channels_last}; device: {d.device}; "
        f"processes: {d.world}; {len(train_loader)} steps per epoch; writing to {run_dir}")

    outcome, last_metrics = "done", None
    with StopRequest() as stop:
        while state["epoch"] < config["epochs"]:
            epoch_started = time.perf_counter()
            outcome = train_one_epoch(state, ctx, stop)
            if outcome == "nonfinite":
                log(f"error: {config['max_nonfinite']} non-finite losses in a row; stopping. The last good "
                    f"checkpoint is kept: {run_dir / 'last.pt'}. Try a lower --lr, --grad-clip 1, or --amp bf16/off.")
                break
            if outcome == "stopped":
                save_last(state, ctx)
                log(f"stopped at epoch {state['epoch'] + 1}, step {state['global_step']}; "
                    f"continue with: python 05_train.py --resume {run_dir / 'last.pt'}")
                break
            last_metrics = end_of_epoch(state, ctx, time.perf_counter() - epoch_started)
            if config["early_stop"] and state["epochs_without_better"] >= config["early_stop"]:
                log(f"early stop: no better mAP for {config['early_stop']} epochs")
                break
    if outcome == "done" and last_metrics is not None and d.main:
        best = last_metrics["best_scores"]
        for k, name in enumerate(ctx["class_names"]):
            log.writer.add_pr_curve(f"pr/{name}", best["targets"][:, k], best["scores"][:, k], state["global_step"])
        write_curves(state["history"], run_dir / "curves.png")
    summary = {"outcome": outcome, "run_dir": str(run_dir), "epochs": state["epoch"],
               "best_map": state["best_map"], "best_source": state["best_source"],
               "nonfinite_total": state["nonfinite_total"], "seconds": time.perf_counter() - started,
               "history": state["history"]}
    log(f"finished ({outcome}) in {summary['seconds']:.0f} s: best mAP {state['best_map']:.2f} "
        f"({state['best_source']} weights, epoch {state['best_epoch'] + 1}); best.pt and last.pt in {run_dir}")
    log.close()
    if outcome == "nonfinite":
        raise SystemExit(2)
    return summary


def end_of_epoch(state, ctx, seconds):
    """Validate raw and EMA weights, log, write best.pt (the better of the two) and last.pt."""
    d, config, log = ctx["dist"], ctx["config"], ctx["log"]
    common = (ctx["val_loader"], d, ctx["amp_dtype"], ctx["channels_last"], ctx["class_names"])
    raw = validate(ctx["model"], *common, desc="val (raw)")
    ema = validate(ctx["ema"].module, *common, desc="val (EMA)") if ctx["ema"] else None
    better, source = (ema, "ema") if ema and ema["mAP"] > raw["mAP"] else (raw, "raw")
    epoch = state["epoch"]
    record = {"epoch": epoch + 1, "step": state["global_step"],
              "train_loss": state["loss_sum"] / max(state["loss_count"], 1),
              "lr": ctx["scheduler"].get_last_lr()[1], "mAP_raw": raw["mAP"], "mAP_ema": ema and ema["mAP"],
              "mAP_voc": better["mAP_voc"], "CF1": better["CF1"], "OF1": better["OF1"],
              "CF1_top3": better["CF1_top3"], "OF1_top3": better["OF1_top3"], "source": source,
              "images_scored": raw["images_scored"], "bad_images": ctx["train_loader"].dataset.bad_count,
              "images_per_s": state.get("images_per_s"), "seconds": seconds}
    improved = better["mAP"] > state["best_map"]
    if improved:
        state.update(best_map=better["mAP"], best_source=source, best_epoch=epoch, epochs_without_better=0)
    else:
        state["epochs_without_better"] += 1
    state["history"].append(record)
    state.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, loss_count=0)
    if d.main:
        log.scalars({"val/mAP_raw": raw["mAP"], "val/mAP_voc": better["mAP_voc"], "val/CF1": better["CF1"],
                     "val/OF1": better["OF1"], **({"val/mAP_ema": ema["mAP"]} if ema else {})}, state["global_step"])
        with open(ctx["run_dir"] / "history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if improved:
            weights = ctx["ema"].module if source == "ema" else unwrap(ctx["model"])
            save_atomic({**checkpoint_common(state, ctx), "model": weights.state_dict(), "weights_source": source,
                         "ema": None, "metrics": {k: v for k, v in better.items() if k not in ("scores", "targets")}},
                        ctx["run_dir"] / "best.pt")
        ema_text = f", EMA {ema['mAP']:.2f}" if ema else ""
        log(f"epoch {epoch + 1}/{config['epochs']}: loss {record['train_loss']:.4f}, mAP raw {raw['mAP']:.2f}"
            f"{ema_text} -> {source} is better; VOC mAP {better['mAP_voc']:.2f}, CF1 {better['CF1']:.1f}, "
            f"OF1 {better['OF1']:.1f}; {seconds:.0f} s" + (" *best*" if improved else "")
            + (f"; {record['bad_images']} corrupt images replaced" if record["bad_images"] else ""))
    ctx["train_loader"].dataset.reset_bad_count()  # the count is reported per epoch
    save_last(state, ctx)
    return {"best_scores": better}


if __name__ == "__main__":
    main()
