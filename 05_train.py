"""Stage 5: the training job. Query2Label with ASL, AMP, EMA, exact resume, TensorBoard and DDP.

    python 05_train.py                           # built-in dataset (made on first use), demo preset
    python 05_train.py --epochs 40               # COCO 2014 under data/coco: the official R101 recipe
    python 05_train.py --resume auto             # continue runs/<name>/last.pt exactly where it stopped
    python 05_train.py --init-from runs/demo/best.pt --epochs 5 --name demo-more   # new run from weights
    python 05_train.py --config runs/demo/config.json                            # that run's settings
    torchrun --nproc_per_node=4 05_train.py      # DistributedDataParallel, one process per GPU

Paper: Sections 3.3 and 4.1 (training). Read like DETR's main.py + engine.py: the configuration (one
dataclass whose fields are the flags; presets), `train_one_epoch`, `run`, then plumbing and the command line.

    each step:   logits = model(images) (B, K); loss = ASL(logits, targets) (stage 4, float32 under autocast)
                 backward; clip; AdamW step; one-cycle LR step
                 ema = d * ema + (1 - d) * weights,  d = min(decay, (1 + n) / (10 + n)) after n updates
    each epoch:  mAP of raw and EMA weights (stage 6); best.pt = the better; last.pt = the whole state

Settings: defaults < preset < --config FILE < flags. A run writes runs/<name>/: last.pt (each epoch and
every --save-every-steps steps: all a bit-exact continuation needs), best.pt (weights only), config.json,
history.jsonl, train.log, curves.png, TensorBoard files. State dicts only, written atomically.

Deviations from the official code (github.com/SlongLiu/query2labels), each on purpose:
- Resume restores the whole training state, not only the weights (its issues #31, #38, #40).
- The EMA (timm's ModelEmaV3: parameters and buffers) gets a warm-up decay, min(decay, (1 + n)/(10 + n)),
  so that it is useful in short runs; with 0.9997 it reaches the official decay after ~33k steps.
- Validation reports scikit-learn's AP (which picks "best") and the official VOC AP side by side.
- A non-finite loss skips the update and is reported; repeated ones stop the run.
- Under DDP, validation scores rank 0's weights and buffers (BatchNorm statistics differ per process):
  the ones saved, so the logged mAP is what re-evaluating the checkpoint gives.
Import note: 06_eval (metrics, checkpoints) is the one forward import; 06 never imports 05.
Next: 06_eval.py scores a checkpoint, predicts labels and draws attention maps.
"""

import argparse
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

data = importlib.import_module("01_data")  # module names may not start with a digit
backbone = importlib.import_module("02_backbone")
transformer = importlib.import_module("03_transformer")
losses = importlib.import_module("04_loss")
evaluation = importlib.import_module("06_eval")  # see "Import note"


def flag(default, group, help, choices=None, check=None, type=None):
    """A TrainConfig field that is also the flag --name-with-dashes."""
    return field(default=default, metadata=dict(group=group, help=help, choices=choices, check=check, type=type))


@dataclass
class TrainConfig:
    """Every setting of a run; the defaults are the official R101 recipe (the "coco" preset). Model fields
    left at None take the --model preset's value (03_transformer.PRESETS)."""

    # * data
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
    # * model
    model: str = flag("official_r101", "model", "architecture preset", tuple(transformer.PRESETS))
    backbone: str = flag(None, "model", "any timm model name, e.g. resnet101, convnext_tiny", type=str)
    pretrained: bool = flag(None, "model", "ImageNet weights from the timm hub", type=bool)
    weights: str = flag("", "model", "backbone weights from a local .pth/.pt/.safetensors file (offline)")
    d_model: int = flag(None, "model", "transformer width d", check="> 0", type=int)
    num_heads: int = flag(None, "model", "attention heads", check="> 0", type=int)
    dim_feedforward: int = flag(None, "model", "feed-forward width", check="> 0", type=int)
    enc_layers: int = flag(None, "model", "encoder layers", check=">= 0", type=int)
    dec_layers: int = flag(None, "model", "decoder layers", check="> 0", type=int)
    dropout: float = flag(None, "model", "dropout in the transformer", check="in [0, 1)", type=float)
    # * optimisation
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
    # * augmentation
    randaugment: bool = flag(True, "augmentation", "RandAugment on training images")
    cutout: bool = flag(True, "augmentation", "Cutout on training images")
    hflip: bool = flag(False, "augmentation", "random horizontal flips")
    cutmix: float = flag(0.0, "augmentation", "probability of multi-label CutMix per batch", check="in [0, 1]")
    cutmix_alpha: float = flag(1.0, "augmentation", "CutMix box ~ Beta(alpha, alpha)", check="> 0")
    # * speed
    amp: str = flag("auto", "speed", "auto = bf16 (else fp16) on CUDA, off on the CPU", ("auto", "bf16", "fp16", "off"))
    channels_last: bool = flag(True, "speed", "NHWC memory format for the convolutions")
    compile: bool = flag(False, "speed", "torch.compile the model (slow start, faster steps)")
    deterministic: bool = flag(False, "speed", "deterministic algorithms (bit-exact resume)")
    device: str = flag("auto", "speed", "cpu, cuda or cuda:N; auto = cuda when available")
    # * run
    name: str = flag("", "run", "outputs go to <out-dir>/<name>/ (none = the preset's name)")
    out_dir: str = flag("runs", "run", "folder of the runs")
    resume: str = flag("", "run", "continue a run: its last.pt, or auto = <out-dir>/<name>/last.pt")
    init_from: str = flag("", "run", "start a NEW run (new schedule) from this checkpoint's weights")
    init_ema: bool = flag(False, "run", "with --init-from: take the checkpoint's EMA weights (last.pt)")
    save_every_steps: int = flag(0, "run", "also write last.pt every N steps; 0 = each epoch only", check=">= 0")
    max_nonfinite: int = flag(3, "run", "stop after this many non-finite losses in a row", check="> 0")


MODEL_FIELDS = ("backbone", "pretrained", "d_model", "num_heads", "dim_feedforward", "enc_layers", "dec_layers",
                "dropout")  # named as in 03_transformer.Q2LConfig
PRESETS = {
    "coco": replace(TrainConfig(), preset="coco"),  # the official ResNet-101 recipe at 448 px (REFERENCES.md)
    # From scratch on a 2-core CPU in minutes: the backbone needs a higher learning rate than the transformer,
    # which turns unstable above ~2e-3 (docs/05_train.md); augmentation only slows a short run down.
    "demo": replace(TrainConfig(), preset="demo", model="demo", img_size=64, epochs=9, early_stop=0, batch_size=32,
                    lr=1e-3, backbone_lr=4e-3, grad_clip=1.0, ema_decay=0.995, randaugment=False, cutout=False,
                    hflip=True, workers=0),
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
    params = [p for p in model.parameters() if p.requires_grad]
    loader.sampler.set_epoch(progress.epoch)
    loader.sampler.set_start_batch(progress.step_in_epoch)
    model.train()
    bar = tqdm(total=len(loader), initial=progress.step_in_epoch, disable=not d.main, leave=False,
               desc=f"epoch {progress.epoch + 1}/{config.epochs}")
    started, seen = time.perf_counter(), 0
    for images, targets in loader:
        images = images.to(d.device, non_blocking=True, memory_format=memory_format)  # (B, 3, S, S)
        targets = targets.to(d.device, non_blocking=True)  # (B, K)
        if cutmix is not None:
            images, targets = cutmix(images, targets, generator=cutmix_rng)
        with torch.autocast(d.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)  # (B, K)
        loss = criterion(logits, targets)  # float32 (stage 4), even under autocast
        # All processes must agree to skip a step (else DDP's gradient all-reduce would hang) and to stop.
        flags = torch.tensor([float(not torch.isfinite(loss)), float(stop.requested)], device=d.device)
        if d.world > 1:
            dist.all_reduce(flags)
        nonfinite, stopping = bool(flags[0] > 0), bool(flags[1] > 0)
        if not nonfinite:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip (and check) the true gradients, not the scaled ones
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip or float("inf"))
            nonfinite = not scaler.is_enabled() and not torch.isfinite(grad_norm)  # fp16: the scaler skips
            if not nonfinite:
                scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped step is deliberate; PyTorch's warning is not for us
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            scheduler.step()  # on a skipped step too, so that the schedule ends at the last epoch
        progress.global_step, progress.step_in_epoch = progress.global_step + 1, progress.step_in_epoch + 1
        progress.nonfinite_in_a_row = progress.nonfinite_in_a_row + 1 if nonfinite else 0
        if nonfinite:
            progress.nonfinite_total += 1
            log(f"warning: non-finite loss or gradient at epoch {progress.epoch + 1} step {progress.global_step} "
                f"(loss {loss.item()}); update skipped ({progress.nonfinite_in_a_row} in a row)")
            if progress.nonfinite_in_a_row >= config.max_nonfinite:
                return "nonfinite"
        else:
            if ema is not None:
                n = progress.ema_updates = progress.ema_updates + 1
                ema.apply_update_(unwrap(model), min(config.ema_decay, (1 + n) / (10 + n)))
            progress.loss_sum, progress.loss_count = progress.loss_sum + loss.item(), progress.loss_count + 1
            log.scalars({"train/loss_step": loss.item()}, progress.global_step)
        seen += images.shape[0] * d.world
        bar.update(1)
        bar.set_postfix(loss=f"{progress.loss_sum / max(progress.loss_count, 1):.4f}", refresh=False)
        if stopping:
            return "stopped"
        if config.save_every_steps and progress.global_step % config.save_every_steps == 0:
            save()
    bar.close()
    progress.images_per_s = seen / max(time.perf_counter() - started, 1e-9)
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
    loss_sum: float = 0.0
    loss_count: int = 0
    ema_updates: int = 0
    images_per_s: float = 0.0
    history: list = field(default_factory=list)  # one record per epoch, as in history.jsonl


@dataclass
class Run:
    """What a run trains with, built by `setup` (the folder comes when training starts)."""

    config: TrainConfig
    d: "Dist"
    model: torch.nn.Module  # what trains: possibly compiled, possibly wrapped in DDP
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: torch.nn.Module
    amp_dtype: torch.dtype | None
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    cutmix: object
    cutmix_rng: torch.Generator
    model_config: object
    class_names: list
    data_info: dict  # what 06_eval needs to re-evaluate a checkpoint
    log: "Log"
    run_dir: Path = None


def run(r, progress):
    """Epochs until the last, an early stop, a signal or repeated non-finite losses; returns a summary."""
    config, log, started, outcome = r.config, r.log, time.perf_counter(), "done"
    with StopRequest() as stop:
        while progress.epoch < config.epochs:
            epoch_started = time.perf_counter()
            outcome = train_one_epoch(r.model, r.criterion, r.train_loader, r.optimizer, r.scheduler, r.scaler,
                                      r.ema, progress, stop, config, r.d, log, r.amp_dtype, r.cutmix, r.cutmix_rng,
                                      save=lambda: save_last(r, progress))
            if outcome == "nonfinite":
                log(f"error: {config.max_nonfinite} non-finite losses in a row; stopping. last.pt keeps the last "
                    "good state. Try a lower --lr, --grad-clip 1, or --amp bf16/off.")
                break
            if outcome == "stopped":
                save_last(r, progress)
                break
            end_of_epoch(r, progress, time.perf_counter() - epoch_started)
            if config.early_stop and progress.epochs_without_better >= config.early_stop:
                log(f"early stop: no better mAP for {config.early_stop} epochs")
                break
    best = (f"best.pt: mAP {progress.best_map:.2f} ({progress.best_source} weights, epoch {progress.best_epoch + 1})"
            if (r.run_dir / "best.pt").exists() else "no best.pt (no epoch finished)")
    seconds = time.perf_counter() - started
    if outcome == "stopped":
        log(f"stopped by {signal.Signals(stop.signum).name} at epoch {progress.epoch + 1}, step {progress.global_step}"
            f"; last.pt written; {best}. Continue with: python 05_train.py --resume {r.run_dir / 'last.pt'}")
    else:
        if progress.history and r.d.main:
            write_curves(progress.history, r.run_dir / "curves.png")
            log.hparams(asdict(config), {"hparam/best_mAP": progress.best_map, "hparam/epochs": progress.epoch})
        log(f"finished ({outcome}) in {seconds:.0f} s; {best}; last.pt in {r.run_dir}")
    return {"outcome": outcome, "run_dir": str(r.run_dir), "epochs": progress.epoch, "best_map": progress.best_map,
            "best_source": progress.best_source, "nonfinite_total": progress.nonfinite_total, "seconds": seconds,
            "history": progress.history, "signal": stop.signum}


def end_of_epoch(r, progress, seconds):
    """Validate raw and EMA weights; best.pt (the better, if better than before); last.pt; then the logs."""
    common = (r.val_loader, r.d, r.amp_dtype, r.config.channels_last, r.class_names)
    raw = validate(r.model.module if r.d.world > 1 else r.model, *common, desc="val (raw)")  # not through DDP
    ema = validate(r.ema.module, *common, desc="val (EMA)") if r.ema else None
    better, source = (ema, "ema") if ema and ema["mAP"] > raw["mAP"] else (raw, "raw")
    record = {"epoch": progress.epoch + 1, "step": progress.global_step,
              "train_loss": progress.loss_sum / max(progress.loss_count, 1), "lr": r.scheduler.get_last_lr()[1],
              "mAP_raw": raw["mAP"], "mAP_ema": ema and ema["mAP"], "source": source,
              **{k: better[k] for k in ("mAP_voc", "CF1", "OF1", "CF1_top3", "OF1_top3", "images_scored")},
              "bad_images": r.train_loader.dataset.bad_count, "bad_val_images": r.val_loader.dataset.bad_count,
              "images_per_s": progress.images_per_s, "seconds": seconds}  # bad_*: files so far (this process's)
    improved = better["mAP"] > progress.best_map
    if improved:
        progress.best_map, progress.best_source, progress.best_epoch = better["mAP"], source, progress.epoch
    progress.epochs_without_better = 0 if improved else progress.epochs_without_better + 1
    progress.history.append(record)
    progress.epoch, progress.step_in_epoch, progress.loss_sum, progress.loss_count = progress.epoch + 1, 0, 0.0, 0
    if improved and r.d.main:
        weights = r.ema.module if source == "ema" else unwrap(r.model)
        save_atomic({**checkpoint_common(r, progress), "model": weights.state_dict(), "weights_source": source,
                     "ema": None, "metrics": {k: v for k, v in better.items() if k not in ("scores", "targets")}},
                    r.run_dir / "best.pt")
    save_last(r, progress)
    if r.d.main:  # only now: a kill before this epoch's last.pt redoes the epoch, which is then logged once
        with open(r.run_dir / "history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        r.log(epoch_line(record, r.config.epochs) + (" *best*" if improved else ""))
        r.log.epoch_scalars(record, raw, ema, better, r.scheduler.get_last_lr(), r.class_names, progress.global_step)


@torch.no_grad()
def validate(model, loader, d, amp_dtype, channels_last, class_names, desc):
    """Every validation image scored exactly once across processes, with rank 0's weights and buffers (the
    saved ones); stage 6's metrics. A process without images still takes part, so that none waits."""
    for tensor in model.state_dict().values() if d.world > 1 else ():
        dist.broadcast(tensor, src=0)
    rows = list(loader.sampler)  # the dataset index of each row this process scores
    scores, targets = (evaluation.predict_scores(model, loader, d.device, amp_dtype, channels_last, desc, d.main)
                       if rows else (torch.zeros(0, len(class_names)).numpy(),) * 2)
    if d.world > 1:
        parts = [None] * d.world
        dist.all_gather_object(parts, (rows, scores, targets))
        rows, scores, targets = sum((p[0] for p in parts), []), *(torch.cat([torch.from_numpy(p[i]) for p in parts])
                                                                  .numpy() for i in (1, 2))
    if sorted(rows) != list(range(len(loader.dataset))):
        raise RuntimeError(f"validation scored {len(rows)} rows for {len(loader.dataset)} images: the evaluation "
                           "sampler must give each image to exactly one process")
    order = sorted(range(len(rows)), key=rows.__getitem__)
    scores, targets = scores[order], targets[order]  # an unreadable image has unknown (-1) targets: left out
    m = evaluation.score_dataset(scores, targets, class_names)
    return {"mAP": float(m["ap"]["mAP"]), "mAP_voc": float(m["voc"]["mAP"]), "CF1": float(m["at_threshold"]["CF1"]),
            "OF1": float(m["at_threshold"]["OF1"]), "CF1_top3": float(m["top_k"]["CF1"]),
            "OF1_top3": float(m["top_k"]["OF1"]), "images_scored": int((targets >= 0).any(1).sum()), "scores": scores, "targets": targets}


def epoch_line(h, epochs):
    ema = f", EMA {h['mAP_ema']:.2f}" if h["mAP_ema"] is not None else ""
    return (f"epoch {h['epoch']}/{epochs}: loss {h['train_loss']:.4f}, mAP raw {h['mAP_raw']:.2f}{ema} -> "
            f"{h['source']} is better; VOC mAP {h['mAP_voc']:.2f}, CF1 {h['CF1']:.1f}, OF1 {h['OF1']:.1f}; "
            f"{h['seconds']:.0f} s" + (f"; unreadable images so far: {h['bad_images']} training (replaced), "
                                       f"{h['bad_val_images']} validation (left out)" if h["bad_images"]
                                       or h["bad_val_images"] else ""))


# ----------------------------------------------------------------------------- set-up

def setup(config, spec, d, log=print):
    """Data, model, EMA, optimiser, schedule, scaler and loss of a run: everything but its folder."""
    augment = dict(randaugment=config.randaugment, cutout=config.cutout, hflip=config.hflip)
    sets = [data.CocoMultiLabel(images, ann, data.build_transforms(config.img_size, train=train, **kw),
                                drop_empty=config.drop_empty, strict=config.strict, seed=config.seed,
                                substitute=train)  # validation never scores a stand-in for an unreadable image
            for images, ann, train, kw in ((spec.train_images, spec.train_ann, True, augment),
                                           (spec.val_images, spec.val_ann, False, {}))]
    if sets[0].class_names != sets[1].class_names:
        raise data.DataError(f"{spec.train_ann} and {spec.val_ann} define different categories; give both splits "
                             "one label set")
    for dataset in sets:
        log(dataset.summary())
    kw = dict(workers=config.workers, distributed=d.world > 1, seed=config.seed, pin_memory=d.device.type == "cuda")
    train_loader, val_loader = (data.build_loader(s, config.batch_size, train=t, **kw)
                                for s, t in zip(sets, (True, False), strict=True))
    if len(train_loader) == 0:
        fail(f"--batch-size {config.batch_size}: {len(sets[0])} training images make less than one batch per "
             f"process ({d.world} processes); lower --batch-size")
    model_config = replace(transformer.PRESETS[config.model], num_classes=len(sets[0].class_names),
                           weights=config.weights or None, **{k: getattr(config, k) for k in MODEL_FIELDS})
    try:
        model = transformer.Query2Label(model_config).to(d.device)
    except backbone.WeightsUnavailableError:
        fail(f"cannot get ImageNet weights for {config.backbone!r} (pretrained {config.pretrained}: offline and not "
             f"in the hub cache?): pass --weights FILE (a local copy) or --no-pretrained (from scratch)")
    except (ValueError, NotImplementedError, FileNotFoundError) as error:  # unknown backbone, bad width, ...
        fail(f"cannot build the model: {str(error).splitlines()[0]}")
    if config.channels_last:  # NHWC: faster convolutions on CUDA (tensor cores), and measured so on the CPU
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay > 0 else None
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if n.startswith("backbone.")], "lr": config.backbone_lr},
              {"params": [p for n, p in trainable if not n.startswith("backbone.")], "lr": config.lr}]
    # fused: one kernel for all parameters (demo model on the CPU: 1.4-1.6 ms per step instead of 5.0-5.7)
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups],
                                                    pct_start=config.warmup_pct,
                                                    total_steps=config.epochs * len(train_loader))
    amp_dtype = evaluation.amp_dtype_for(config.amp, d.device)  # bf16 needs no loss scaling, fp16 does
    scaler = torch.amp.GradScaler(d.device.type, enabled=amp_dtype == torch.float16)
    net = torch.compile(model) if config.compile else model
    if d.world > 1:
        net = DistributedDataParallel(net, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    asl = dict(gamma_neg=config.gamma_neg, gamma_pos=config.gamma_pos, clip=config.clip, eps=config.loss_eps)
    bce = dict(gamma_neg=0.0, gamma_pos=0.0, clip=0.0, eps=0.0)  # eps 0: the plain BCE of the formula
    criterion = losses.AsymmetricLoss(**(bce if config.loss == "bce" else asl), reduction=config.loss_reduction)
    cutmix = data.CutMix(config.cutmix_alpha, config.cutmix) if config.cutmix > 0 else None
    data_info = {"kind": spec.kind, "val_images": str(Path(spec.val_images).resolve()), "img_size": config.img_size,
                 "val_ann": str(Path(spec.val_ann).resolve()), "drop_empty": config.drop_empty,
                 "val_ann_fingerprint": data.file_fingerprint(spec.val_ann)}
    n_train, n_all = (sum(p.numel() for p in model.parameters() if p.requires_grad or a) for a in (False, True))
    log(f"model: {model_config.backbone}, d {model_config.d_model}, {n_train / 1e6:.2f}M trainable of "
        f"{n_all / 1e6:.2f}M parameters")
    return Run(config, d, net, ema, optimizer, scheduler, scaler, criterion, amp_dtype, train_loader, val_loader,
               cutmix, torch.Generator().manual_seed(config.seed * 1000 + d.rank), model_config,
               list(sets[0].class_names), data_info, log)


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_common(r, progress):
    return {"format": evaluation.CHECKPOINT_FORMAT, "model_config": asdict(r.model_config),
            "class_names": r.class_names, "config": asdict(r.config), "data": r.data_info, "epoch": progress.epoch,
            "step": progress.global_step, "best_map": progress.best_map, "best_source": progress.best_source,
            "best_epoch": progress.best_epoch}


def save_last(r, progress):
    """Everything needed to continue bit-exactly. Collective: every process calls it."""
    rngs = [None] * r.d.world  # each process has its own dropout stream
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    dist.all_gather_object(rngs, rng) if r.d.world > 1 else rngs.__setitem__(0, rng)
    if r.d.main:
        save_atomic({**checkpoint_common(r, progress), "model": unwrap(r.model).state_dict(), "weights_source": "raw",
                     "ema": r.ema.module.state_dict() if r.ema else None, "optimizer": r.optimizer.state_dict(),
                     "scheduler": r.scheduler.state_dict(), "scaler": r.scaler.state_dict(), "rng": rngs,
                     "cutmix_rng": r.cutmix_rng.get_state(), "world_size": r.d.world, "progress": asdict(progress)},
                    r.run_dir / "last.pt")
    if r.d.world > 1:
        dist.barrier()


def restore(r, ckpt):
    """last.pt's state into a freshly built run; returns its Progress."""
    unwrap(r.model).load_state_dict(ckpt["model"])
    if r.ema is not None:
        r.ema.module.load_state_dict(ckpt["ema"])
    for part in ("optimizer", "scheduler", "scaler"):
        getattr(r, part).load_state_dict(ckpt[part])
    r.cutmix_rng.set_state(ckpt["cutmix_rng"])
    same = ckpt["world_size"] == r.d.world
    if not same:
        r.log(f"note: last.pt was written by {ckpt['world_size']} processes, this run has {r.d.world}: it "
              "continues, but not bit-exactly")
    rng = ckpt["rng"][r.d.rank if same else 0]
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return Progress(**ckpt["progress"])


def save_atomic(obj, path):
    """Write a temporary file, flush it to disk, rename: a crash leaves the previous file intact. Ctrl-C and
    SIGTERM arriving meanwhile are held until the file is complete, then delivered."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with signals_held():
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


@contextmanager
def signals_held():
    held, previous = [], {}
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
        previous = {s: signal.signal(s, lambda signum, _: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in held:
            signal.raise_signal(s)


def unwrap(model):
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module too


# ----------------------------------------------------------------------------- processes, signals, logs

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    main = property(lambda self: self.rank == 0)


def setup_distributed(device="auto"):
    """One process per device. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain run is world 1."""
    world, rank, local = (int(os.environ.get(k, 0)) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    except RuntimeError:
        fail(f"--device {device!r} is not a device; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            fail(f"--device {device} asked for CUDA, but PyTorch sees no CUDA device here; use --device cpu")
        device = torch.device("cuda", local) if device.index is None else device  # this process's GPU
        if device.index >= torch.cuda.device_count():
            fail(f"--device {device} does not exist: {torch.cuda.device_count()} CUDA device(s)")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, max(world, 1), device)


class StopRequest:
    """Ctrl-C / SIGTERM: stop after this step and write last.pt; a second Ctrl-C stops at once (not inside a
    checkpoint write: save_atomic holds it until the file is complete)."""

    def __init__(self):
        self.requested, self.signum, self.previous = False, None, {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, self.signum or signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing last.pt (Ctrl-C again to "
              "stop at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Log:
    """Prints on rank 0; keeps the lines until the run folder exists, then train.log; TensorBoard there too."""

    def __init__(self, d):
        self.main, self.lines, self.file, self.writer = d.main, [], None, None

    def open(self, run_dir):
        if self.main:
            # slow to import: only once a run starts
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            self.file, self.writer = open(run_dir / "train.log", "a"), SummaryWriter(str(run_dir))
            self.file.write("".join(line + "\n" for line in self.lines))

    def __call__(self, message):
        if self.main:
            tqdm.write(message)
            self.file.write(message + "\n") if self.file else self.lines.append(message)
            self.file and self.file.flush()

    def scalars(self, values, step):
        for tag, value in values.items() if self.writer else ():
            self.writer.add_scalar(tag, value, step)

    def epoch_scalars(self, record, raw, ema, better, lrs, class_names, step):
        """val/* of the chosen weights, raw and EMA side by side; each LR group; one PR curve per class."""
        values = {"train/loss": record["train_loss"], "train/images_per_s": record["images_per_s"],
                  "train/lr_backbone": lrs[0], "train/lr_transformer": lrs[1]}
        for suffix, m in (("", better), ("_raw", raw), ("_ema", ema)):
            values.update({f"val/{k}{suffix}": m[k] for k in ("mAP", "mAP_voc", "CF1", "OF1")} if m else {})
        self.scalars(values, step)
        for k, name in enumerate(class_names):
            self.writer.add_pr_curve(f"pr/{name}", better["targets"][:, k] > 0, better["scores"][:, k], step)

    def hparams(self, config, metrics):
        self.writer.add_hparams({k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))},
                                metrics, run_name=".")

    def close(self):
        if self.file:
            self.writer.close()
            self.file.close()


def write_curves(history, path):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4), layout="tight")
    ax1, ax2 = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax2.plot(epochs, [h["mAP_raw"] for h in history], marker="o", label="raw weights")
    if history[0]["mAP_ema"] is not None:
        ax2.plot(epochs, [h["mAP_ema"] for h in history], marker="s", label="EMA weights")
    ax2.set(xlabel="epoch", ylabel="validation mAP (%)", title="validation mAP")
    ax2.legend()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- configuration

def fail(message):
    """A mistake the user can fix: one line naming the file or value and what to do; exit code 2."""
    print(f"05_train.py: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def make_config(given, kind):
    """defaults < preset < --config FILE < flags; the --model preset fills the model fields left unset."""
    preset = given.get("preset", "auto")
    preset = ("demo" if kind == "synthetic" else "coco") if preset == "auto" else preset
    config = replace(PRESETS[preset], **{**given, "preset": preset})
    arch = transformer.PRESETS[config.model]
    config = replace(config, **{k: getattr(arch, k) for k in MODEL_FIELDS if getattr(config, k) is None})
    paths = ["train_images", "train_ann", "val_images", "val_ann", "synthetic_root"]
    paths += ["data_root"] if kind == "coco2014" else []  # unused, it stays as given (stage 1 checks a named one)
    return replace(config, name=config.name or preset,
                   **{k: str(Path(getattr(config, k)).resolve()) for k in paths if getattr(config, k)})


def check_values(values):
    for f in fields(TrainConfig):
        check, value = f.metadata["check"], values.get(f.name)
        if check and value is not None and not CHECKS[check](value):
            fail(f"--{f.name.replace('_', '-')} {value}: must be {check} ({f.metadata['help']})")


def read_config_file(path):
    """A run's config.json as flag values (--resume, --init-from and --init-ema are not taken from it)."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        fail(f"--config {path}: cannot read it as JSON ({type(error).__name__}); give a run's config.json")
    unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)}) if isinstance(values, dict) else ["?"]
    if unknown:
        fail(f"--config {path}: unknown settings {unknown}; give a config.json written by 05_train.py")
    return {k: v for k, v in values.items() if k not in ("resume", "init_from", "init_ema")}


def resumed_config(ckpt, given):
    config = TrainConfig(**ckpt["config"])
    clash = {k: (getattr(config, k), v) for k, v in given.items()
             if k not in RESUME_OVERRIDABLE and getattr(config, k) != v}
    if clash:
        fail("--resume continues a run with its own settings, and these differ: " + "; ".join(
            f"--{k.replace('_', '-')}: checkpoint {a!r}, now {b!r}" for k, (a, b) in clash.items())
            + ". Drop them to continue that run, or start a new one with --init-from.")
    return replace(config, **{k: v for k, v in given.items() if k in RESUME_OVERRIDABLE})


def resolve_data(values, d):
    """Stage 1 picks the data (rank 0 first: it may make the built-in set, which the others then find)."""
    v, spec, error = {**asdict(TrainConfig()), **values}, None, None
    for turn in (True, False):
        if d.main == turn:
            try:
                spec = data.resolve_dataset(v["data_root"], *(v[k] or None for k in ("train_images", "train_ann",
                                            "val_images", "val_ann")), v["synthetic_root"], seed=v["seed"])
            except data.DataError as found:  # raised after the barrier: the other processes must not wait
                error = found
        if d.world > 1:
            dist.barrier()
    if error:
        raise error
    return spec


def load_resume(path):
    if Path(path).is_dir():
        fail(f"--resume {path} is a folder; give {Path(path) / 'last.pt'}")
    ckpt = evaluation.load_checkpoint(path)
    if "optimizer" not in ckpt:
        fail(f"--resume {path} holds weights only (a best.pt), not the training state; continue from "
             f"{Path(path).parent / 'last.pt'}, or start a new run from these weights with --init-from {path}")
    return ckpt


# ----------------------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2; an unknown flag gets the nearest known one suggested
        unknown = message.split(": ", 1)[1].split()[:1] if message.startswith("unrecognized") else []
        near = [m for u in unknown for m in difflib.get_close_matches(u, self._option_string_actions, 1)]
        self.exit(2, f"{self.prog}: error: {message}" + (f"; did you mean {near[0]}?" if near else "") + "\n")


def build_parser():
    coco, demo = PRESETS["coco"], PRESETS["demo"]

    def default(name):
        a, b = (getattr(coco, name), getattr(demo, name)) if name != "preset" else ("auto",) * 2
        if a is None:
            return "default: the --model preset's: " + ", ".join(f"{k} {getattr(v, name)}"
                                                                   for k, v in transformer.PRESETS.items())
        return f"default: coco {a}, demo {b}" if a != b else f"default: {a if a != '' else 'none'}"

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
        m, kind = f.metadata, f.metadata["type"] or type(f.default)
        group = groups.get(m["group"]) or groups.setdefault(m["group"], parser.add_argument_group(m["group"]))
        options = (dict(action=argparse.BooleanOptionalAction) if kind is bool else
                   dict(type=kind, choices=m["choices"], metavar=None if m["choices"] else f.name.upper()))
        group.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                           help=f"{m['help']} ({default(f.name)})", **options)
    groups["run"].add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                               help="a run's config.json: its settings again (flags given too override them)")
    return parser


def main(argv=None):
    given = vars(build_parser().parse_args(argv))  # only the flags given; the rest: preset and --config
    d = setup_distributed(given.get("device", "auto"))
    determinism = torch.are_deterministic_algorithms_enabled(), torch.backends.mkldnn.deterministic
    try:
        summary = train(given, d)
    except (data.DataError, backbone.FileProblem, evaluation.CheckpointError) as error:
        fail(str(error).splitlines()[0])
    finally:  # a caller (tests, a notebook) gets its settings back
        torch.use_deterministic_algorithms(determinism[0])
        torch.backends.mkldnn.deterministic = determinism[1]
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    if summary["outcome"] != "done":  # 130 after Ctrl-C, 143 after SIGTERM, 1 after non-finite losses
        raise SystemExit(128 + summary["signal"] if summary["outcome"] == "stopped" else 1)
    return summary


def train(given, d):
    """Checks, data, configuration, set-up, then `run`; every mistake that can be found early stops first."""
    if "config" in given:
        if given.get("resume"):
            fail("--config starts a run from saved settings, --resume continues a run with its own: give one")
        given = {**read_config_file(given.pop("config")), **given}
    check_values(given)
    if given.get("init_ema") and not given.get("init_from"):
        fail("--init-ema takes the EMA weights of the checkpoint given with --init-from; give --init-from CKPT")
    spec, ckpt, init = None, None, None
    if given.get("resume") == "auto":
        name = given.get("name") or given.get("preset", "auto").replace("auto", "")
        if not name:  # the preset that auto picks depends on the data found
            spec = resolve_data(given, d)
            name = "demo" if spec.kind == "synthetic" else "coco"
        given["resume"] = str(Path(given.get("out_dir", "runs")) / name / "last.pt")
        if not Path(given["resume"]).exists():
            fail(f"--resume auto: no {given['resume']} to continue (the name comes from --name, else the preset)")
    if given.get("resume"):
        ckpt = load_resume(given["resume"])
        config = resumed_config(ckpt, given)
        spec = resolve_data(asdict(config), d)
    else:
        init = evaluation.load_checkpoint(given["init_from"]) if given.get("init_from") else None
        if init is not None and given.get("init_ema") and not init.get("ema"):
            fail(f"--init-ema: {given['init_from']} holds no EMA weights (only last.pt does; best.pt holds the better"
                 f" of raw and EMA already, here {init.get('weights_source')}); drop --init-ema")
        config = make_config(given, (spec := spec or resolve_data(given, d)).kind)
    log = Log(d)
    log(f"dataset: {spec.note}")
    if spec.kind == "synthetic" and config.preset == "coco":
        log("note: the coco preset on the built-in dataset trains ResNet-101 at 448 px on 64 px shapes (hours on a "
            "CPU); --preset demo is the recipe made for it")
    torch.manual_seed(config.seed + d.rank)
    random.seed(config.seed + d.rank)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.mkldnn.deterministic = True  # oneDNN (CPU convolutions): the switch above does not cover it
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif d.device.type == "cuda":
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    r = setup(config, spec, d, log)
    if ckpt is not None:
        progress, r.run_dir = restore(r, ckpt), Path(config.resume).parent
    else:
        progress, r.run_dir = Progress(), fresh_run_dir(Path(config.out_dir) / config.name, d)
        if init is not None:
            init_weights(r, init, config)
    log.open(r.run_dir)  # the run starts: only now does its folder exist
    if d.main:  # history from the checkpoint: no epoch twice or missing after a kill and a resume
        (r.run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
        (r.run_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in progress.history))
        logged = (r.run_dir / "train.log").read_text()
        for h in progress.history:  # an epoch line a kill cut off after its last.pt was written
            log(epoch_line(h, config.epochs)) if epoch_line(h, config.epochs) not in logged else None
    log("configuration:\n" + "\n".join(f"  {k:18s} {v}" for k, v in asdict(config).items()))
    if ckpt is not None:
        log(f"resuming {config.resume} at epoch {progress.epoch + 1}, step {progress.global_step}")
    if config.loss_reduction == "q2l":
        log("loss: the official Query2Label scale, the sum over the B*K label entries / (B*K) * 1000: divide by "
            "1000 for the mean per label (250 = 0.25)")
    if spec.kind == "synthetic":
        log(f"== training on the built-in dataset ({config.synthetic_root}): no dataset flags and no COCO 2014 under "
            f"{config.data_root}. For COCO unpack train2014/, val2014/, annotations/ there (or --data-root); for "
            "your own data give --train-images --train-ann --val-images --val-ann ==")
    log(f"amp: {r.amp_dtype or 'off (float32)'}; channels_last: {config.channels_last}; device: {d.device}; "
        f"processes: {d.world}; {len(r.train_loader)} steps per epoch; writing to {r.run_dir}")
    try:
        return run(r, progress)
    finally:
        log.close()


def init_weights(r, ckpt, config):
    """--init-from: the checkpoint's model (or EMA) weights, for the model and its EMA; a new schedule."""
    if ckpt["class_names"] != r.class_names:
        fail(f"--init-from {config.init_from}: its classes {ckpt['class_names'][:4]}... are not this dataset's")
    try:
        unwrap(r.model).load_state_dict(ckpt["ema"] if config.init_ema else ckpt["model"])
    except RuntimeError as error:
        fail(f"--init-from {config.init_from}: its weights do not fit this model ({str(error).splitlines()[1].strip()}"
             "); give the model flags of that run (its config is in the checkpoint)")
    r.ema.set(unwrap(r.model)) if r.ema is not None else None
    r.log(f"weights from {config.init_from} ({'EMA' if config.init_ema else ckpt.get('weights_source')} weights, "
          f"epoch {ckpt['epoch']}); a new run with its own schedule")


def fresh_run_dir(run_dir, d):
    """runs/<name>, else runs/<name>-2, -3, ...: a new run never overwrites another; the same on every rank."""
    base, n = run_dir, 1
    while (run_dir / "last.pt").exists() or (run_dir / "config.json").exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    box = [str(run_dir)]
    dist.broadcast_object_list(box) if d.world > 1 else None
    return Path(box[0])


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once; last.pt is the last one written
        print("\ninterrupted at once; resume from the run's last.pt (--resume)", file=sys.stderr)
        sys.exit(130)
