"""Stage 5: the training job. Query2Label with ASL, AMP, EMA, exact resume, TensorBoard and DDP.

    python 05_train.py                        # built-in dataset (made on first use), demo preset
    python 05_train.py --epochs 40            # COCO 2014 under data/coco: the official R101 recipe
    python 05_train.py --resume auto          # continue runs/<name>/last.pt exactly where it stopped
    python 05_train.py --init-from runs/demo/best.pt --epochs 5 --name demo-more   # a new run from weights
    python 05_train.py --config runs/demo/config.json                              # that run's settings again
    torchrun --nproc_per_node=4 05_train.py   # DistributedDataParallel, one process per GPU

Paper: Sections 3.3 and 4.1. Read like DETR's main.py + engine.py: the configuration, `train_one_epoch`, `run`,
then plumbing and the command line. Settings: defaults < preset < --config FILE < flags.

    each step:   logits = model(images) (B, K); loss = ASL(logits, targets) (stage 4, float32); backward; clip;
                 AdamW step; one-cycle LR step; ema = d ema + (1 - d) weights, d = min(decay, (1 + n)/(10 + n))
    each epoch:  mAP of raw and EMA weights (stage 6); best.pt = the better; last.pt = the whole state

Deviations from the official code (github.com/SlongLiu/query2labels), each on purpose:
- Resume restores the whole training state, not only the weights (its issues #31, #38, #40).
- The EMA (timm's ModelEmaV3) warms up (d above) to serve short runs; a non-finite loss skips its update.
- scikit-learn's AP picks "best"; the official VOC AP is reported beside it.
- Under DDP, validation scores rank 0's weights and buffers (BatchNorm statistics differ per process): the
  saved ones, so the logged mAP is what re-evaluating the checkpoint gives.
06_eval (metrics, checkpoints) is the one forward import; 06 never imports 05. Next: 06_eval.py.
"""

import argparse
import contextlib
import difflib
import importlib
import json
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections import namedtuple
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

data = importlib.import_module("01_data")  # module names may not start with a digit
backbone = importlib.import_module("02_backbone")
transformer = importlib.import_module("03_transformer")
losses = importlib.import_module("04_loss")
evaluation = importlib.import_module("06_eval")  # metrics and checkpoints: the one forward import


def flag(default, group, help, choices=None, check=None):
    """A TrainConfig field that is also the flag --name-with-dashes, of the field's type."""
    return field(default=default, metadata=dict(group=group, help=help, choices=choices, check=check))


R101 = transformer.PRESETS["official_r101"]


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the official R101 recipe (the "coco" preset)."""
    preset: str = flag("auto", "data", "recipe; auto = demo on the built-in set, else coco", ("auto", "coco", "demo"))
    data_root: str = flag("data/coco", "data", "COCO 2014 root: train2014/, val2014/, annotations/")
    synthetic_root: str = flag("data/synthetic", "data", "the built-in dataset (made there on first use)")
    train_images: str = flag("", "data", "your own dataset: folder of training images")
    train_ann: str = flag("", "data", "your own dataset: COCO-format instances JSON for training")
    val_images: str = flag("", "data", "your own dataset: folder of validation images")
    val_ann: str = flag("", "data", "your own dataset: COCO-format instances JSON for validation")
    drop_empty: bool = flag(False, "data", "drop images without annotations (ASL) instead of all-negative (Q2L)")
    strict: bool = flag(False, "data", "a missing or mislabelled image is an error, not skipped and reported")
    img_size: int = flag(448, "data", "square input side in pixels", check="> 0")
    workers: int = flag(8, "data", "DataLoader worker processes per process", check=">= 0")
    model: str = flag("official_r101", "model", "architecture of the model flags not given", tuple(transformer.PRESETS))
    backbone: str = flag(R101.backbone, "model", "any timm model name, e.g. resnet101, convnext_tiny")
    pretrained: bool = flag(R101.pretrained, "model", "ImageNet weights from the timm hub")
    weights: str = flag("", "model", "backbone weights from a local .pth/.pt/.safetensors file (offline)")
    d_model: int = flag(R101.d_model, "model", "transformer width d", check="> 0")
    num_heads: int = flag(R101.num_heads, "model", "attention heads", check="> 0")
    dim_feedforward: int = flag(R101.dim_feedforward, "model", "feed-forward width", check="> 0")
    enc_layers: int = flag(R101.enc_layers, "model", "encoder layers", check=">= 0")
    dec_layers: int = flag(R101.dec_layers, "model", "decoder layers", check="> 0")
    dropout: float = flag(R101.dropout, "model", "dropout in the transformer", check="in [0, 1)")
    epochs: int = flag(80, "optimisation", "epochs; the one-cycle schedule spans exactly these", check="> 0")
    batch_size: int = flag(64, "optimisation", "images per step per process", check="> 0")
    lr: float = flag(1e-4, "optimisation", "peak learning rate of transformer and head (AdamW)", check="> 0")
    backbone_lr: float = flag(1e-4, "optimisation", "peak learning rate of the backbone", check="> 0")
    weight_decay: float = flag(1e-2, "optimisation", "AdamW weight decay, on every parameter", check=">= 0")
    warmup_pct: float = flag(0.2, "optimisation", "share of the steps spent warming up", check="in [0, 1]")
    grad_clip: float = flag(0.0, "optimisation", "clip the gradient norm to this; 0 = off", check=">= 0")
    early_stop: int = flag(8, "optimisation", "stop after this many epochs without better mAP; 0 = off", check=">= 0")
    ema_decay: float = flag(0.9997, "optimisation", "EMA decay of the weights; 0 = no EMA", check="in [0, 1)")
    loss: str = flag("asl", "optimisation", "asymmetric loss, or plain BCE to compare", ("asl", "bce"))
    gamma_neg: float = flag(2.0, "optimisation", "ASL focusing exponent of negatives", check=">= 0")
    gamma_pos: float = flag(0.0, "optimisation", "ASL focusing exponent of positives", check=">= 0")
    clip: float = flag(0.0, "optimisation", "ASL probability shift m of negatives", check="in [0, 1)")
    loss_eps: float = flag(1e-5, "optimisation", "ASL eps (04_loss.py)", check=">= 0")
    loss_reduction: str = flag("q2l", "optimisation", "q2l = sum/(B*K)*1000 (official)", ("q2l", "sum", "mean"))
    seed: int = flag(0, "optimisation", "seed of weights, data order and augmentation", check=">= 0")
    randaugment: bool = flag(True, "augmentation", "RandAugment on training images")
    cutout: bool = flag(True, "augmentation", "Cutout on training images")
    hflip: bool = flag(False, "augmentation", "random horizontal flips")
    cutmix: float = flag(0.0, "augmentation", "probability of multi-label CutMix per batch", check="in [0, 1]")
    cutmix_alpha: float = flag(1.0, "augmentation", "CutMix box ~ Beta(alpha, alpha)", check="> 0")
    amp: str = flag("auto", "speed", "auto = bf16 (else fp16) on CUDA, off on the CPU", ("auto", "bf16", "fp16", "off"))
    channels_last: bool = flag(True, "speed", "NHWC memory format for the convolutions")
    compile: bool = flag(False, "speed", "torch.compile: slow first steps, then faster (off until a GPU run checks it)")
    deterministic: bool = flag(False, "speed", "deterministic algorithms (bit-exact resume)")
    device: str = flag("auto", "speed", "cpu, cuda or cuda:N; auto = cuda when available")
    name: str = flag("", "run", "outputs go to <out-dir>/<name>/ (none = the preset's name)")
    out_dir: str = flag("runs", "run", "folder of the runs")
    resume: str = flag("", "run", "continue a run: its last.pt, or auto = <out-dir>/<name>/last.pt")
    init_from: str = flag("", "run", "start a NEW run (new schedule) from this checkpoint's weights")
    init_ema: bool = flag(False, "run", "with --init-from: take the checkpoint's EMA weights (last.pt)")
    save_every_steps: int = flag(0, "run", "also write last.pt every N steps; 0 = each epoch only", check=">= 0")
    max_nonfinite: int = flag(3, "run", "stop after this many non-finite losses in a row", check="> 0")


MODEL_FIELDS = ("backbone", "pretrained", "d_model", "num_heads", "dim_feedforward", "enc_layers", "dec_layers",
                "dropout")  # named as in 03_transformer.Q2LConfig; --model fills those not given
PRESETS = {
    "coco": replace(TrainConfig(), preset="coco"),  # the official ResNet-101 recipe at 448 px (REFERENCES.md)
    # From scratch on a 2-core CPU in minutes: the backbone needs a higher learning rate than the transformer,
    # which turns unstable above ~2e-3 (docs/05_train.md); augmentation only slows a short run down.
    "demo": replace(TrainConfig(), preset="demo", model="demo", img_size=64, epochs=8, early_stop=0, batch_size=32,
                    lr=1e-3, backbone_lr=4e-3, grad_clip=1.0, ema_decay=0.995, randaugment=False, cutout=False,
                    hflip=True, workers=0, **{k: getattr(transformer.PRESETS["demo"], k) for k in MODEL_FIELDS}),
}
# A resumed run may change these; any other flag must match the checkpoint, or the run would be neither run.
RESUME_OVERRIDABLE = {"workers", "resume", "save_every_steps", "compile", "max_nonfinite", "device", "name", "out_dir"}
CHECKS = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1,
          "in [0, 1)": lambda v: 0 <= v < 1}


# ----------------------------------------------------------------------------- the step
def train_one_epoch(model, criterion, loader, optimizer, scheduler, scaler, ema, progress, stop, config, d, log,
                    amp_dtype=None, cutmix=None, cutmix_rng=None, save=None):
    """One epoch from progress.step_in_epoch; returns "done", "stopped" (a signal) or "nonfinite"."""
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    first, started = progress.step_in_epoch, time.perf_counter()
    loader.sampler.set_epoch(progress.epoch)
    loader.sampler.set_start_batch(first)
    model.train()
    bar = tqdm(total=first + len(loader), initial=first, desc=f"epoch {progress.epoch + 1}/{config.epochs}",
               disable=not d.main, leave=False)  # left open by an error: its message stays one line
    for images, targets in loader:
        images = images.to(d.device, non_blocking=True, memory_format=memory_format)  # (B, 3, S, S)
        targets = targets.to(d.device, non_blocking=True)  # (B, K)
        if cutmix is not None:
            images, targets = cutmix(images, targets, generator=cutmix_rng)
        with torch.autocast(d.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)  # (B, K)
        loss = criterion(logits, targets)  # float32 (stage 4), even under autocast
        # Every process must agree to skip a step (else DDP's gradient all-reduce would hang) and to stop.
        flags = torch.tensor([float(not torch.isfinite(loss)), float(stop.requested)], device=d.device)
        dist.all_reduce(flags) if d.world > 1 else None
        nonfinite, stopping = bool(flags[0] > 0), bool(flags[1] > 0)
        if not nonfinite:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip (and check) the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"))
            nonfinite = not scaler.is_enabled() and not torch.isfinite(grad_norm)  # fp16: the scaler skips
            if not nonfinite:
                scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()  # on a skipped step too, so that the schedule ends at the last epoch
        progress.global_step, progress.step_in_epoch = progress.global_step + 1, progress.step_in_epoch + 1
        progress.nonfinite_total += nonfinite
        progress.nonfinite_in_a_row = (progress.nonfinite_in_a_row + 1) * nonfinite
        if nonfinite:
            log(f"warning: non-finite loss or gradient at epoch {progress.epoch + 1} step {progress.global_step}; "
                "update skipped")
            if progress.nonfinite_in_a_row >= config.max_nonfinite:
                return "nonfinite"
        else:
            n = progress.global_step - progress.nonfinite_total  # EMA updates so far, this one included
            if ema is not None:
                ema.apply_update_(unwrap(model), min(config.ema_decay, (1 + n) / (10 + n)))
            progress.epoch_losses.append(loss.item())
            log.scalars({"train/loss_step": loss.item()}, progress.global_step)
        bar.update()
        if stopping:
            return "stopped"
        if config.save_every_steps and progress.global_step % config.save_every_steps == 0:
            save()
    done = (progress.step_in_epoch - first) * config.batch_size * d.world
    progress.images_per_s = done / max(time.perf_counter() - started, 1e-9)
    bar.close()
    return "done"


# ----------------------------------------------------------------------------- the run
@dataclass
class Progress:
    """Where a run is; saved in last.pt, so that a resumed run continues from exactly here."""
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0
    global_step: int = 0
    best_map: float = -1.0
    best_source: str = ""  # "raw" or "ema": which weights best.pt holds
    best_epoch: int = -1
    epochs_without_better: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    epoch_losses: list = field(default_factory=list)  # this epoch's finite losses so far
    images_per_s: float = 0.0
    history: list = field(default_factory=list)  # one record per epoch, as in history.jsonl


def run(r, progress):
    """Epochs until the last, an early stop, a signal or repeated non-finite losses; returns a summary."""
    config, log, started, outcome = r.config, r.log, time.perf_counter(), "done"
    with Signals(stop=True) as stop, warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")  # our skipped steps
        while progress.epoch < config.epochs and outcome == "done":
            epoch_started = time.perf_counter()
            outcome = train_one_epoch(r.model, r.criterion, r.train_loader, r.optimizer, r.scheduler, r.scaler,
                                      r.ema, progress, stop, config, r.d, log, r.amp_dtype, r.cutmix, r.cutmix_rng,
                                      save=lambda: r.save(progress))
            if outcome == "stopped":
                r.save(progress)
            elif outcome == "done":
                end_of_epoch(r, progress, time.perf_counter() - epoch_started)
                if config.early_stop and progress.epochs_without_better >= config.early_stop:
                    log(f"early stop: no better mAP for {config.early_stop} epochs")
                    break
    best = (f"best.pt: mAP {progress.best_map:.2f} ({progress.best_source} weights, epoch {progress.best_epoch + 1})"
            if (r.run_dir / "best.pt").exists() else "no best.pt (no epoch finished)")
    if outcome == "nonfinite":
        log(f"error: {config.max_nonfinite} non-finite losses in a row; stopping. Try a lower --lr or --grad-clip 1")
    if outcome == "stopped":
        log(f"stopped by {signal.Signals(stop.caught[0]).name} at step {progress.global_step}; last.pt written; "
            f"{best}. Continue with: python 05_train.py --resume {r.run_dir / 'last.pt'}")
    elif progress.history and r.d.main:
        write_curves(progress.history, r.run_dir / "curves.png")
        log.writer.add_hparams({k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str))},
                               {"hparam/best_mAP": progress.best_map, "hparam/epochs": progress.epoch}, run_name=".")
    log(f"{outcome} after {time.perf_counter() - started:.0f} s; {best}; in {r.run_dir}")
    return {"outcome": outcome, "run_dir": str(r.run_dir), "epochs": progress.epoch, "best_map": progress.best_map,
            "nonfinite_total": progress.nonfinite_total, "history": progress.history,
            "signal": stop.caught[0] if stop.caught else None}


def end_of_epoch(r, progress, seconds):
    """Validate raw and EMA weights; best.pt (the better, if better than before); last.pt; then the logs."""
    common = (r.val_loader, r.d, r.amp_dtype, r.config.channels_last, r.class_names, r.criterion)
    raw = validate(r.model.module if r.d.world > 1 else r.model, *common, desc="val (raw)")  # not through DDP
    ema = validate(r.ema.module, *common, desc="val (EMA)") if r.ema else None
    better, source = (ema, "ema") if ema and ema["mAP"] > raw["mAP"] else (raw, "raw")
    record = {"epoch": progress.epoch + 1, "step": progress.global_step, "lr": r.scheduler.get_last_lr()[1],
              "train_loss": sum(progress.epoch_losses) / max(len(progress.epoch_losses), 1),
              "mAP_raw": raw["mAP"], "mAP_ema": ema and ema["mAP"], "source": source,
              **{k: better[k] for k in ("mAP_voc", "CF1", "OF1", "CF1_top3", "OF1_top3", "images_scored")},
              "val_loss": better["loss"],
              "bad_images": r.train_loader.dataset.bad_count, "bad_val_images": r.val_loader.dataset.bad_count,
              "images_per_s": progress.images_per_s, "seconds": seconds}  # bad_*: files so far (this process's)
    if improved := better["mAP"] > progress.best_map:
        progress.best_map, progress.best_source, progress.best_epoch = better["mAP"], source, progress.epoch
    progress.epochs_without_better = 0 if improved else progress.epochs_without_better + 1
    progress.history.append(record)
    progress.epoch, progress.step_in_epoch, progress.epoch_losses = progress.epoch + 1, 0, []
    if improved and r.d.main:
        r.save(progress, best=source)
    r.save(progress)
    if r.d.main:  # only now: a kill before this epoch's last.pt redoes the epoch, which is then logged once
        with open(r.run_dir / "history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        r.log(epoch_line(record, r.config.epochs) + (" *best*" if improved else ""))
        lrs, step = r.scheduler.get_last_lr(), progress.global_step
        r.log.scalars({"train/loss": record["train_loss"], "train/images_per_s": record["images_per_s"],
                       "train/lr_backbone": lrs[0], "train/lr_transformer": lrs[1]}, step)
        for suffix, m in (("", better), ("_raw", raw), ("_ema", ema)):  # the chosen weights', raw and EMA
            r.log.scalars({f"val/{k}{suffix}": m[k] for k in ("mAP", "mAP_voc", "CF1", "OF1", "loss") if m}, step)
        for k, name in enumerate(r.class_names):  # PR curves of the chosen weights, every epoch
            r.log.writer.add_pr_curve(f"pr/{name}", better["targets"][:, k] > 0, better["scores"][:, k], step)
        weights, val_set = r.ema.module if source == "ema" else unwrap(r.model), r.val_loader.dataset
        with contextlib.suppress(data.CorruptImageError):  # 2 fixed images: true and predicted labels, attention
            r.log.writer.add_image("val/examples", evaluation.attention_panel(
                weights, val_set, range(min(2, len(val_set))), r.class_names, r.d.device), step)


@torch.no_grad()
def validate(model, loader, d, amp_dtype, channels_last, class_names, criterion, desc):
    """Every validation image scored exactly once across processes, with rank 0's weights and buffers (the
    saved ones); stage 6's metrics, and the loss (mean over batches). A process without images takes part too."""
    for tensor in model.state_dict().values() if d.world > 1 else ():
        dist.broadcast(tensor, src=0)
    rows = list(loader.sampler)  # the dataset index of each row this process scores
    scores, targets, loss = (evaluation.predict_scores(model, loader, d.device, amp_dtype, channels_last, desc, d.main,
                             criterion) if rows else (np.zeros((0, len(class_names)), np.float32),) * 2 + (0.0,))
    parts = [mine := (rows, scores, targets, loss * len(loader), len(loader) if rows else 0)] * d.world
    dist.all_gather_object(parts, mine) if d.world > 1 else None
    rows, scores, targets = sum((p[0] for p in parts), []), *(np.concatenate([p[i] for p in parts]) for i in (1, 2))
    if sorted(rows) != list(range(len(loader.dataset))):
        raise RuntimeError(f"validation scored {len(rows)} rows for {len(loader.dataset)} images, not each once")
    scores, targets = scores[np.argsort(rows)], targets[np.argsort(rows)]  # unreadable: unknown (-1), left out
    m = evaluation.score_dataset(scores, targets, class_names)
    return {"mAP": float(m["ap"]["mAP"]), "mAP_voc": float(m["voc"]["mAP"]), "CF1": float(m["at_threshold"]["CF1"]),
            "OF1": float(m["at_threshold"]["OF1"]), "CF1_top3": float(m["top_k"]["CF1"]),
            "OF1_top3": float(m["top_k"]["OF1"]), "images_scored": int((targets >= 0).any(1).sum()),
            "loss": sum(p[3] for p in parts) / max(sum(p[4] for p in parts), 1), "scores": scores, "targets": targets}


def epoch_line(h, epochs):
    bad = (f"; unreadable images so far: {h['bad_images']} training (replaced), {h['bad_val_images']} validation "
           "(left out)") if h["bad_images"] or h["bad_val_images"] else ""
    return (f"epoch {h['epoch']}/{epochs}: loss {h['train_loss']:.4f}, mAP raw {h['mAP_raw']:.2f}"
            + (f", EMA {h['mAP_ema']:.2f}" if h["mAP_ema"] is not None else "") + f" -> {h['source']} is better; "
            f"VOC mAP {h['mAP_voc']:.2f}, CF1 {h['CF1']:.1f}, OF1 {h['OF1']:.1f}; {h['seconds']:.0f} s{bad}")


# ----------------------------------------------------------------------------- plumbing: set-up, checkpoints
class Run:
    """What a run trains with: data, model, EMA, optimiser, schedule, scaler, loss; its folder comes later."""

    def __init__(self, config, spec, d, log=print):
        self.config, self.d, self.log, self.run_dir = config, d, log, None
        augment = dict(randaugment=config.randaugment, cutout=config.cutout, hflip=config.hflip)
        sets = [data.CocoMultiLabel(images, ann, data.build_transforms(config.img_size, train=train, **kw),
                                    drop_empty=config.drop_empty, strict=config.strict, seed=config.seed,
                                    substitute=train)  # validation never scores a stand-in for an unreadable image
                for images, ann, train, kw in ((spec.train_images, spec.train_ann, True, augment),
                                               (spec.val_images, spec.val_ann, False, {}))]
        if sets[0].class_names != sets[1].class_names:
            raise data.DataError(f"{spec.train_ann} and {spec.val_ann} define different categories; give one label set")
        for dataset in sets:
            log(dataset.summary())
        kw = dict(workers=config.workers, distributed=d.world > 1, seed=config.seed, pin_memory=d.device.type == "cuda")
        self.train_loader, self.val_loader = (data.build_loader(s, config.batch_size, t, **kw)
                                              for s, t in zip(sets, (True, False), strict=True))
        if len(self.train_loader) == 0:
            fail(f"--batch-size {config.batch_size}: under one batch of images per process; lower --batch-size")
        self.class_names = list(sets[0].class_names)
        self.model_config = replace(transformer.PRESETS[config.model], num_classes=len(self.class_names),
                                    weights=config.weights or None, **{k: getattr(config, k) for k in MODEL_FIELDS})
        try:
            model = transformer.Query2Label(self.model_config).to(d.device)
        except backbone.WeightsUnavailableError:
            fail(f"no ImageNet weights for {config.backbone} (offline?): pass --weights FILE or --no-pretrained")
        except (ValueError, NotImplementedError, FileNotFoundError) as error:  # unknown backbone, bad width, ...
            fail(f"cannot build the model: {str(error).splitlines()[0]}")
        if config.channels_last:  # NHWC: faster convolutions on CUDA (tensor cores), and measured so on the CPU
            model = model.to(memory_format=torch.channels_last)
        self.ema = ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay > 0 else None
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in trainable if n.startswith("backbone.")], "lr": config.backbone_lr},
                  {"params": [p for n, p in trainable if not n.startswith("backbone.")], "lr": config.lr}]
        # fused: one kernel for all parameters (demo model on the CPU: 1.4-1.6 ms per step instead of 5.0-5.7)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, [g["lr"] for g in groups],
                                                             config.epochs * len(self.train_loader),
                                                             pct_start=config.warmup_pct)
        self.amp_dtype = evaluation.amp_dtype_for(config.amp, d.device)  # bf16 needs no loss scaling, fp16 does
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.amp_dtype == torch.float16)
        self.model = torch.compile(model) if config.compile else model  # what trains: maybe compiled, in DDP
        if d.world > 1:
            self.model = DistributedDataParallel(self.model, [d.device.index] if d.device.type == "cuda" else None)
        asl = dict(gamma_neg=config.gamma_neg, gamma_pos=config.gamma_pos, clip=config.clip, eps=config.loss_eps)
        self.criterion = losses.AsymmetricLoss(**(losses.BCE_SETTINGS if config.loss == "bce" else asl),
                                               reduction=config.loss_reduction)
        self.cutmix = data.CutMix(config.cutmix_alpha, config.cutmix) if config.cutmix > 0 else None
        self.cutmix_rng = torch.Generator().manual_seed(config.seed * 1000 + d.rank)
        self.data_info = {"kind": spec.kind, "val_images": str(Path(spec.val_images).resolve()), "img_size":
                          config.img_size, "val_ann": str(Path(spec.val_ann).resolve()), "drop_empty":
                          config.drop_empty, "val_ann_fingerprint": data.file_fingerprint(spec.val_ann)}
        counts = [sum(p.numel() for p in model.parameters() if p.requires_grad or a) / 1e6 for a in (False, True)]
        log(f"model: {config.backbone}, d {config.d_model}, {counts[0]:.2f}M trainable of {counts[1]:.2f}M "
            "parameters" + ("; --compile: the first steps compile (slow)" if config.compile else ""))

    def save(self, progress, best=None):
        """best.pt (best = "raw" or "ema": those weights; rank 0 only), else last.pt: all that a bit-exact
        continuation needs (collective: every process calls it, as each has its own random streams)."""
        ckpt = {"format": evaluation.CHECKPOINT_FORMAT, "model_config": asdict(self.model_config), "class_names":
                self.class_names, "config": asdict(self.config), "data": self.data_info, "epoch": progress.epoch,
                "step": progress.global_step, "best_map": progress.best_map, "best_source": progress.best_source,
                "best_epoch": progress.best_epoch, "weights_source": best or "raw", "ema": None,
                "model": (self.ema.module if best == "ema" else unwrap(self.model)).state_dict()}
        if best:
            return save_atomic(ckpt, self.run_dir / "best.pt")
        rngs, rng = [None] * self.d.world, {"torch": torch.get_rng_state(), "python": list(random.getstate()),
                                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        dist.all_gather_object(rngs, rng) if self.d.world > 1 else rngs.__setitem__(0, rng)
        if self.d.main:
            save_atomic({**ckpt, "ema": self.ema and self.ema.module.state_dict(), "progress": asdict(progress),
                         **{k: getattr(self, k).state_dict() for k in ("optimizer", "scheduler", "scaler")},
                         "rng": rngs, "cutmix_rng": self.cutmix_rng.get_state(), "world_size": self.d.world},
                        self.run_dir / "last.pt")
        dist.barrier() if self.d.world > 1 else None

    def restore(self, ckpt):
        """last.pt's state into this freshly built run; returns its Progress."""
        unwrap(self.model).load_state_dict(ckpt["model"])
        for k in ("optimizer", "scheduler", "scaler") + (("ema",) if self.ema else ()):
            (self.ema.module if k == "ema" else getattr(self, k)).load_state_dict(ckpt[k])
        self.cutmix_rng.set_state(ckpt["cutmix_rng"])
        if not (same := ckpt["world_size"] == self.d.world):
            self.log(f"note: last.pt comes from {ckpt['world_size']} processes, not {self.d.world}: not bit-exact")
        rng = ckpt["rng"][self.d.rank if same else 0]
        torch.set_rng_state(rng["torch"])
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
        torch.cuda.set_rng_state_all(rng["cuda"]) if rng["cuda"] and torch.cuda.is_available() else None
        return Progress(**ckpt["progress"])


def unwrap(model):
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module too


def save_atomic(obj, path):
    """A temporary file, flushed to disk, then renamed: a crash leaves the previous file intact; Ctrl-C and
    SIGTERM arriving meanwhile wait until the file is complete."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with Signals():
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class Signals:
    """Catches Ctrl-C and SIGTERM (only the main thread can). stop=True, a run: the first asks to stop after this
    step and write last.pt, a second Ctrl-C stops at once. Else, a checkpoint write: held, delivered after it."""

    def __init__(self, stop=False):
        self.stop, self.caught, self.previous = stop, [], {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.catch) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def catch(self, signum, frame):
        if self.stop and self.caught and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.caught.append(signum)
        if self.stop:
            print(f"\n{signal.Signals(signum).name}: stopping after this step (Ctrl-C again: at once)", file=sys.stderr)

    requested = property(lambda self: bool(self.caught))

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        for s in () if self.stop else self.caught:  # held during a checkpoint write: delivered now
            signal.raise_signal(s)


# ----------------------------------------------------------------------------- plumbing: processes, logs
Dist = namedtuple("Dist", "rank world device main")  # this process's rank, their number, its device, rank == 0


def setup_distributed(device="auto"):
    """One process per device. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain run is world 1."""
    world, rank, local = (int(os.environ.get(k, 0)) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    except RuntimeError:
        fail(f"--device {device!r} is not a device; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        device = torch.device("cuda", local if device.index is None else device.index)  # this process's GPU
        if device.index >= torch.cuda.device_count():
            fail(f"--device {device}: PyTorch sees no CUDA device {device.index} here; use --device cpu or cuda:N")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, max(world, 1), device, rank == 0)


class Log:
    """Prints on rank 0 and keeps the lines until the run's folder exists; then train.log and TensorBoard there."""

    def __init__(self, d):
        self.main, self.lines, self.file, self.writer = d.main, [], None, None

    def open(self, run_dir):
        if self.main:
            from torch.utils.tensorboard import SummaryWriter  # noqa: I001  (slow to import: only when a run starts)
            run_dir.mkdir(parents=True, exist_ok=True)
            self.file, self.writer = open(run_dir / "train.log", "a"), SummaryWriter(str(run_dir))
            self.file.write("".join(line + "\n" for line in self.lines))

    def __call__(self, message):
        if self.main:
            tqdm.write(message)
            self.file.write(message + "\n") if self.file else self.lines.append(message)
            self.file.flush() if self.file else None

    def scalars(self, values, step):
        for tag, value in values.items() if self.writer else ():
            self.writer.add_scalar(tag, value, step)

    def close(self):
        for f in (self.writer, self.file) if self.file else ():
            f.close()


def write_curves(history, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), layout="tight")
    ax1, ax2 = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss", title="training loss")
    for key, label, marker in (("mAP_raw", "raw weights", "o"), ("mAP_ema", "EMA weights", "s")):
        if history[0][key] is not None:
            ax2.plot(epochs, [h[key] for h in history], marker=marker, label=label)
    ax2.set(xlabel="epoch", ylabel="validation mAP (%)", title="validation mAP")
    ax2.legend()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- command line
def fail(message):
    """A mistake the user can fix: one line naming the file or value and what to do; exit code 2."""
    tqdm.write(f"05_train.py: error: {message}", file=sys.stderr)  # on its own line, even under a progress bar
    raise SystemExit(2)


def make_config(given, kind):
    """defaults < preset < --config FILE < flags; --model fills the model fields not given."""
    preset = given.get("preset", "auto")
    preset = ("demo" if kind == "synthetic" else "coco") if preset == "auto" else preset
    arch = transformer.PRESETS[given.get("model", PRESETS[preset].model)]
    config = replace(PRESETS[preset], **{**{k: getattr(arch, k) for k in MODEL_FIELDS}, **given, "preset": preset})
    paths = ["train_images", "train_ann", "val_images", "val_ann", "synthetic_root"]
    paths += ["data_root"] if kind == "coco2014" else []  # unused, it stays as given (stage 1 checks a named one)
    return replace(config, name=config.name or preset,
                   **{k: str(Path(getattr(config, k)).resolve()) for k in paths if getattr(config, k)})


def resolve_data(values, d):
    """Stage 1 picks the data (rank 0 first: it may make the built-in set, which the others then find)."""
    v, spec, error = {**asdict(TrainConfig()), **values}, None, None
    for turn in (True, False):
        try:
            spec = spec if d.main != turn else data.resolve_dataset(v["data_root"], *(v[k] or None for k in (
                "train_images", "train_ann", "val_images", "val_ann")), v["synthetic_root"], seed=v["seed"])
        except data.DataError as found:  # raised after the barrier: the other processes must not wait
            error = found
        dist.barrier() if d.world > 1 else None
    if error:
        raise error
    return spec


def configure(given, d):
    """(config, data spec, last.pt to resume or None, checkpoint to start from or None) from the flags given;
    every mistake that can be found before any work stops here."""
    if path := given.pop("config", None):
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            fail(f"--config {path}: cannot read it as JSON ({type(error).__name__}); give a run's config.json")
        if not isinstance(values, dict) or set(values) - {f.name for f in fields(TrainConfig)} or given.get("resume"):
            fail(f"--config {path}: give a config.json written by 05_train.py, and no --resume (it continues a run)")
        given = {**{k: v for k, v in values.items() if k not in ("resume", "init_from", "init_ema")}, **given}
    for f in fields(TrainConfig):
        if (check := f.metadata["check"]) and f.name in given and not CHECKS[check](given[f.name]):
            fail(f"--{f.name.replace('_', '-')} {given[f.name]}: must be {check} ({f.metadata['help']})")
    if given.get("init_ema") and not given.get("init_from"):
        fail("--init-ema takes the EMA weights of the checkpoint given with --init-from; give --init-from CKPT")
    spec = None
    if given.get("resume") == "auto":
        name = given.get("name") or given.get("preset", "auto").replace("auto", "")
        if not name:  # the preset that auto picks depends on the data found
            name = "demo" if (spec := resolve_data(given, d)).kind == "synthetic" else "coco"
        if not (path := Path(given.get("out_dir", "runs")) / name / "last.pt").exists():
            fail(f"--resume auto: no {path} to continue (the name comes from --name, else the preset)")
        given["resume"] = str(path)
    if path := given.get("resume"):
        if Path(path).is_dir():
            fail(f"--resume {path} is a folder; give {Path(path) / 'last.pt'}")
        if "optimizer" not in (ckpt := evaluation.load_checkpoint(path)):
            fail(f"--resume {path} holds weights only (a best.pt), not the training state; continue from "
                 f"{Path(path).parent / 'last.pt'}, or start a new run from these weights with --init-from {path}")
        config = TrainConfig(**ckpt["config"])
        if clash := [f"--{k.replace('_', '-')}: checkpoint {getattr(config, k)!r}, now {v!r}" for k, v in given.items()
                     if k not in RESUME_OVERRIDABLE and getattr(config, k) != v]:
            fail(f"--resume continues a run with its own settings, and these differ: {'; '.join(clash)}. Drop them "
                 "to continue that run, or start a new one with --init-from.")
        config = replace(config, **{k: v for k, v in given.items() if k in RESUME_OVERRIDABLE})
        return config, resolve_data(asdict(config), d), ckpt, None
    init = evaluation.load_checkpoint(given["init_from"]) if given.get("init_from") else None
    if init is not None and given.get("init_ema") and not init.get("ema"):
        fail(f"--init-ema: {given['init_from']} holds no EMA weights (only last.pt does); drop --init-ema")
    spec = spec or resolve_data(given, d)
    return make_config(given, spec.kind), spec, None, init


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2; an unknown flag gets the nearest known one suggested
        unknown = message.split(": ", 1)[1].split()[:1] if message.startswith("unrecognized") else []
        near = [m for u in unknown for m in difflib.get_close_matches(u, self._option_string_actions, 1)]
        self.exit(2, f"{self.prog}: error: {message}" + (f"; did you mean {near[0]}?" if near else "") + "\n")


def build_parser():
    coco, demo = PRESETS["coco"], PRESETS["demo"]
    table = "\n".join(f"  {f.name:16s} {str(getattr(coco, f.name)):16s} {getattr(demo, f.name)}"
                      for f in fields(TrainConfig)[1:] if getattr(coco, f.name) != getattr(demo, f.name))
    parser = Parser(prog="05_train.py", usage="%(prog)s [options]", allow_abbrev=False,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="Train Query2Label. Settings: defaults < preset < --config FILE < flags; the "
                                "resolved values are printed at start and saved to runs/<name>/config.json.",
                    epilog=f"presets (where they differ; --preset auto = demo on the built-in dataset, else coco):"
                           f"\n  {'setting':16s} {'coco':16s} demo\n{table}")
    groups = {}
    for f in fields(TrainConfig):
        m, (a, b) = f.metadata, (getattr(coco, f.name), getattr(demo, f.name)) if f.name != "preset" else ("auto",) * 2
        group = groups.get(m["group"]) or groups.setdefault(m["group"], parser.add_argument_group(m["group"]))
        options = (dict(action=argparse.BooleanOptionalAction) if f.type is bool else
                   dict(type=f.type, choices=m["choices"], metavar=None if m["choices"] else f.name.upper()))
        group.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, **options, help=m["help"] + (
            f" (default: coco {a}, demo {b})" if a != b else f" (default: {a if a != '' else 'none'})"))
    groups["run"].add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                               help="a run's config.json: its settings again (flags given too override them)")
    return parser


def main(argv=None):
    given = vars(build_parser().parse_args(argv))  # only the flags given; the rest: preset and --config
    d, log = setup_distributed(given.get("device", "auto")), None
    determinism = torch.are_deterministic_algorithms_enabled(), torch.backends.mkldnn.deterministic
    try:
        summary = run(*start(*configure(given, d), d, log := Log(d)))
    except (data.DataError, backbone.FileProblem, evaluation.CheckpointError) as error:
        fail(str(error).splitlines()[0])
    finally:  # a caller (tests, a notebook) gets its settings back
        log.close() if log else None
        torch.use_deterministic_algorithms(determinism[0])
        torch.backends.mkldnn.deterministic = determinism[1]
        dist.destroy_process_group() if d.world > 1 and dist.is_initialized() else None
    if summary["outcome"] != "done":  # 130 after Ctrl-C, 143 after SIGTERM, 1 after non-finite losses
        raise SystemExit(128 + summary["signal"] if summary["outcome"] == "stopped" else 1)
    return summary


def start(config, spec, ckpt, init, d, log):
    """Seeds, set-up, weights (resumed or --init-from), the run's folder and first log lines: (Run, Progress)."""
    torch.manual_seed(config.seed + d.rank)
    random.seed(config.seed + d.rank)
    if config.deterministic:  # oneDNN (CPU convolutions) has its own switch
        torch.use_deterministic_algorithms(True)
        torch.backends.mkldnn.deterministic, torch.backends.cudnn.benchmark = True, False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif d.device.type == "cuda":
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    log(f"dataset: {spec.note}")
    if spec.kind == "synthetic" and config.preset == "coco":
        log("note: the coco preset trains ResNet-101 at 448 px on the built-in 64 px shapes (hours on a CPU); "
            "--preset demo is the recipe made for them")
    r = Run(config, spec, d, log)
    progress, r.run_dir = (r.restore(ckpt), Path(config.resume).parent) if ckpt else (Progress(), None)
    if init is not None:  # --init-from: the checkpoint's model (or EMA) weights, for the model and its EMA
        try:
            assert init["class_names"] == r.class_names, "its classes are not this dataset's"
            unwrap(r.model).load_state_dict(init["ema"] if config.init_ema else init["model"])
        except (AssertionError, RuntimeError) as error:
            fail(f"--init-from {config.init_from}: its weights do not fit this model ("
                 f"{str(error).strip().splitlines()[-1].strip()}); give the model flags of that run")
        r.ema.set(unwrap(r.model)) if r.ema is not None else None
        log(f"weights from {config.init_from} (epoch {init['epoch']}); a new run with its own schedule")
    if not ckpt:  # runs/<name>, else runs/<name>-2, -3, ...: a new run never overwrites another
        r.run_dir, n = Path(config.out_dir) / config.name, 1
        while (r.run_dir / "last.pt").exists() or (r.run_dir / "config.json").exists():
            r.run_dir, n = r.run_dir.with_name(f"{config.name}-{n + 1}"), n + 1
        box = [r.run_dir]
        dist.broadcast_object_list(box) if d.world > 1 else None  # rank 0's choice, on every rank
        r.run_dir = box[0]
    log.open(r.run_dir)  # the run starts: only now does its folder exist
    if d.main:  # history from the checkpoint: no epoch twice or missing after a kill and a resume
        (r.run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
        (r.run_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in progress.history))
        logged = (r.run_dir / "train.log").read_text()
        for line in (epoch_line(h, config.epochs) for h in progress.history):  # cut off by a kill after last.pt
            log(line) if line not in logged else None
    log("configuration:\n" + "\n".join(f"  {k:18s} {v}" for k, v in asdict(config).items()))
    if ckpt:
        log(f"resuming {config.resume} at epoch {progress.epoch + 1}, step {progress.global_step}")
    if config.loss_reduction == "q2l":
        log("loss: the official Query2Label scale, sum over the B*K labels / (B*K) * 1000 (250 = 0.25 per label)")
    if spec.kind == "synthetic":
        log(f"== training on the built-in dataset: no dataset flags, no COCO 2014 under {config.data_root} (unpack "
            "train2014/ val2014/ annotations/ there, or give --train-images --train-ann --val-images --val-ann) ==")
    log(f"amp: {r.amp_dtype or 'off (float32)'}; channels_last: {config.channels_last}; device: {d.device}; "
        f"processes: {d.world}; {len(r.train_loader)} steps per epoch; writing to {r.run_dir}")
    return r, progress


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once; last.pt is the last one written
        print("\ninterrupted at once; resume from the run's last.pt (--resume)", file=sys.stderr)
        sys.exit(130)
