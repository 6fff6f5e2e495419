"""Stage 6: scoring Query2Label — metrics from scratch, checkpoint evaluation, prediction, attention maps.

A number is only worth what its metric is worth. This stage defines, in a few vectorised numpy lines each,
the metrics of the Query2Label paper's COCO table, checks them against scikit-learn and hand-computed values,
labels every number with the definition that produced it, and then uses them on trained models:

- `average_precision`: per-class AP exactly as scikit-learn's `average_precision_score` defines it
  (non-interpolated), the default of `mean_average_precision`.
- `voc_average_precision`: VOC all-point interpolated AP, what the official Query2Label code reports.
- `mean_average_precision`: the mean over classes that have at least one positive; classes without one are
  named in "excluded", never averaged in as NaN or 0.
- `threshold_metrics`: CP, CR, CF1, OP, OR, OF1 at a score threshold (default 0.5), or for each image's
  top-k labels (the papers' "top-3" rows).
- `per_batch_retrieval_ap`: NOT a COCO metric; the flattened per-batch retrieval AP behind a popular
  re-implementation's "90.4 mAP", kept only to show (docs/06_eval.md) why it cannot be compared.
- `predict_scores`: a model's sigmoid probabilities for a DataLoader (05_train.py validates with it);
  `load_for_eval`: a model and its checkpoint from a file 05_train.py wrote; `build_official`: an official
  Query2Label checkpoint through stage 3's converter; `evaluate`: summary, per-class table, figures.
- `predict_images` / `attention_maps` / `draw_attention`: labels for image files, and where each label's
  query looks (the last decoder layer's cross-attention, as the paper visualises it).

Run it:
    python 06_eval.py                                    # metric self-checks on a 4-image worked example
    python 06_eval.py --checkpoint runs/demo/best.pt     # evaluate on the validation set it was trained on
    python 06_eval.py --checkpoint runs/demo/best.pt --image photos/          # labels for images
    python 06_eval.py --checkpoint runs/demo/best.pt --image a.jpg --attention a_attention.png
    python 06_eval.py --official checkpoint.pkl --val-images ... --val-ann ...   # an official R101 file
    python 06_eval.py --benchmark   # speed and agreement vs a per-class scikit-learn loop, COCO val size
    python 06_eval.py --figures     # docs/figures/06_ap_vs_voc.png and the comparisons in docs/06_eval.md
Evaluation prints mAP (with its definition), VOC mAP, CP/CR/CF1/OP/OR/OF1 at the threshold and for the
top 3, and a per-class table sorted by AP, and writes metrics.json, per_class_ap.png and pr_curves.png.
This is the last stage.

Shapes: N images, K classes. scores (N, K): any real numbers for the AP functions (only their order
matters), probabilities (after sigmoid) for `threshold_metrics`. targets (N, K): 1 positive, 0 negative,
< 0 unknown; unknown entries are ignored everywhere (not counted as negatives). numpy arrays or torch tensors.
Attention maps: (K, H, W) over the backbone's H x W feature map, one per label query.

Deviations (each one deliberate, each one documented in docs/06_eval.md):
- From scikit-learn: a class without positives gets AP NaN (scikit-learn returns 0 with a warning) and is
  left out of the mean, by name.
- From the official code's VOC mAP: tied scores form one threshold (the official code ranks tied entries in
  the order `np.argsort` happens to return); unknown targets are ignored (it counts them as negatives);
  a class without positives is excluded (it yields NaN, which makes the whole mAP NaN, its issue #7).
- From ML-GCN's CP/CR/CF1 (which the Query2Label paper's table follows): classes without positives are left
  out of CP and CR (ML-GCN divides by zero); unknown targets are ignored (ML-GCN counts them as negatives).
  Same as ML-GCN: a class never predicted has precision 0, CF1 comes from the averaged CP and CR, a score
  equal to the threshold counts as predicted, and top-k labels must also reach the threshold.
- From the official inference script: evaluation and prediction run on any image size and on the CPU;
  official files are loaded with weights_only=True unless --trusted.

Import note: 05_train.py imports this file for its metrics and predict_scores; this file imports 01 and 03
and never 05, so there is no cycle.
"""

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T
from tqdm import tqdm

data = importlib.import_module("01_data")  # module names may not start with a digit
transformer = importlib.import_module("03_transformer")

AP_KIND = "AP (non-interpolated, scikit-learn definition)"
VOC_KIND = "VOC all-point interpolated AP"

# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def _to_numpy(x, name):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # float16/bfloat16 -> float32 is exact, and numpy has no bfloat16
        x = x.numpy()
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise TypeError(f"{name} must be a numeric array or tensor, got dtype {x.dtype}")
    return x


def _first(mask):
    n, k = np.argwhere(mask)[0]
    return f"image {n}, class {k}"


def _check_finite(array, name, extremes=None):
    """Raise if `array` holds NaN or +-inf, saying how many and where the first is. min and max are NaN
    if any entry is, +-inf if any entry is: two cheap reductions instead of masks (unless given)."""
    if not np.isfinite((array.min(), array.max()) if extremes is None else extremes).all():
        nan, inf = np.isnan(array), np.isinf(array)
        raise ValueError(f"{name} contains {nan.sum()} NaN and {inf.sum()} infinite value(s), the first "
                         f"at {_first(nan | inf)}; a metric over them would be meaningless")


def _bad_targets(targets):
    """The error for targets other than 1 (positive), 0 (negative) and < 0 (unknown)."""
    _check_finite(targets, "targets")
    bad = (targets > 0) & (targets != 1)
    return ValueError(f"targets must be 1 (positive), 0 (negative) or < 0 (unknown, ignored); found "
                      f"{bad.sum()} other value(s), e.g. {targets[bad][0]} at {_first(bad)} "
                      "(soft CutMix targets are for training, not for evaluation)")


def _as_arrays(scores, targets):
    """scores and targets as numpy arrays of one shape (N, K), N, K >= 1; scores in float32 or float64."""
    scores, targets = _to_numpy(scores, "scores"), _to_numpy(targets, "targets")
    if scores.ndim != 2 or targets.ndim != 2:
        raise ValueError(f"scores and targets must be 2-D (N images, K classes); got scores {scores.shape}, "
                         f"targets {targets.shape} (for a single class pass x[:, None])")
    if scores.shape != targets.shape:
        raise ValueError(f"scores has shape {scores.shape} but targets has shape {targets.shape}; "
                         "both must be (N images, K classes)")
    if scores.size == 0:
        raise ValueError(f"nothing to score: scores and targets have shape {scores.shape}")
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float64)  # float32 stays float32: it sorts faster than float64
    return scores, targets


def _check_inputs(scores, targets):
    """(scores, targets, positive) with positive = (targets == 1), or an error saying what is wrong and
    where. For the threshold metrics, which need every entry anyway."""
    scores, targets = _as_arrays(scores, targets)
    _check_finite(scores, "scores")
    positive = targets == 1  # (N, K)
    # valid targets are 1, 0 or < 0: every entry > 0 must be a 1 (a count finds 2, 0.3 or +inf)
    if not np.isfinite(targets.min()) or np.count_nonzero(targets > 0) != np.count_nonzero(positive):
        raise _bad_targets(targets)
    return scores, targets, positive


def _positives_and_unknowns(targets):
    """Flat indices (n * K + k) of the positive and of the unknown entries of targets (N, K), or an error.
    One pass finds the nonzero entries (a few percent: COCO images have ~2.9 of 80 labels), and every
    check then runs on those alone: NaN, inf and values other than 1 are nonzero too."""
    nonzero = np.flatnonzero(targets if targets.dtype == np.bool_ else targets != 0)  # (M + U,)
    values = targets.reshape(-1)[nonzero]
    positive, unknown = values == 1, values < 0
    if not (np.isfinite(values).all() and (positive | unknown).all()):
        raise _bad_targets(targets)
    return nonzero[positive], nonzero[unknown]


def _transposed(x, block=512):
    """x.T as a new C-contiguous array (so that sorting a row is fast), copied block by block: a plain
    x.T.copy() strides through memory and is about 5x slower at (40504, 80)."""
    out = np.empty(x.shape[::-1], x.dtype)
    for start in range(0, len(x), block):
        out[:, start:start + block] = x[start:start + block].T
    return out


def _default_threads():
    """One thread per core this process may use, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, 8))


def _transposed_index(flat, N, K):
    """Flat indices n * K + k into (N, K) -> k * N + n into its transpose (K, N), sorted: class by class."""
    return np.sort(flat % K * N + flat // K)


def _precision_at_positives(scores, targets, threads=None):
    """For each class k, the precision of "score >= s" at the score s of each of its positives.

    Returns (precision (M,), bounds (K + 1,)) for the M positives of all classes: class k's are
    precision[bounds[k]:bounds[k + 1]], from its lowest-scoring positive (recall 1) to its highest.
    With P_k positives, precision at s = tp / n where
        tp = number of positives scoring >= s,   n = number of known entries scoring >= s.
    Counting ">= s" puts all entries tied at s on one threshold, as scikit-learn does.
    The O(N K log N) work is one transpose and one sort of every class's scores; then a binary search
    for each positive, O(P_k log N); tp comes from the positives alone, vectorised. Classes are
    independent, so blocks of them run on `threads` threads (default: one per core, at most 8): numpy
    releases the GIL while it sorts and searches.
    """
    scores, targets = _as_arrays(scores, targets)
    positives, unknowns = _positives_and_unknowns(targets)  # flat indices into (N, K)
    N, K = scores.shape
    if unknowns.size:  # checked before the unknowns' scores are overwritten below
        _check_finite(scores, "scores")
    flat, unknown = _transposed_index(positives, N, K), _transposed_index(unknowns, N, K)  # (M,), (U,)
    bounds = np.searchsorted(flat, np.arange(K + 1) * N)  # (K + 1,) where each class's positives start
    unknown_bounds = np.searchsorted(unknown, np.arange(K + 1) * N)
    s = np.empty(len(flat), scores.dtype)  # (M,) the positives' scores, class by class; never upcast
    below = np.empty(len(flat), np.int64)  # (M,) known entries of the class scoring < s

    def sort_and_search(lo, hi):  # classes lo..hi-1
        ranked = _transposed(scores[:, lo:hi]).reshape(-1)  # (k * N,) row by row
        s[bounds[lo]:bounds[hi]] = ranked[flat[bounds[lo]:bounds[hi]] - lo * N]
        ranked[unknown[unknown_bounds[lo]:unknown_bounds[hi]] - lo * N] = -np.inf  # never counted in n
        ranked = ranked.reshape(hi - lo, N)
        ranked.sort(axis=1)  # (k, N) each class's scores, ascending
        if not unknowns.size:  # sorted rows start with any -inf, end with any +inf then NaN
            _check_finite(scores, "scores", ranked[:, [0, -1]])
        for k in range(lo, hi):
            start, end = bounds[k], bounds[k + 1]
            s[start:end].sort()
            below[start:end] = np.searchsorted(ranked[k - lo], s[start:end])

    threads = max(1, min(threads or _default_threads(), K))
    edges = np.linspace(0, K, threads + 1).astype(int)
    if threads == 1:
        sort_and_search(0, K)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(sort_and_search, edges[:-1], edges[1:]))  # list(): re-raises a block's error
    # tp = (end of the class's positives) - (first positive tied with s): ties are one threshold
    first = np.ones(len(s), bool)
    np.not_equal(s[1:], s[:-1], out=first[1:])
    first[bounds[:-1][bounds[:-1] < len(s)]] = True  # a class's first positive starts a run
    run_start = np.maximum.accumulate(np.where(first, np.arange(len(s)), 0))  # (M,)
    tp = np.repeat(bounds[1:], np.diff(bounds)) - run_start
    return tp / (N - below), bounds  # float64 only here


def _mean_per_class(values, bounds):
    """(K,) mean of values[bounds[k]:bounds[k + 1]] for each class k; NaN where the class has none."""
    counts = np.diff(bounds)
    out = np.full(len(counts), np.nan)
    some = counts > 0
    if some.any():
        out[some] = np.add.reduceat(values, bounds[:-1][some]) / counts[some]
    return out


def average_precision(scores, targets, threads=None):
    """Per-class AP, scikit-learn's definition (non-interpolated): (K,) in [0, 1], NaN for no positives.

        AP = sum_n (R_n - R_{n-1}) P_n      over the distinct scores (thresholds) t_n, from high to low,
    with P_n, R_n the precision and recall of "predict positive when score >= t_n". Recall grows by 1/P
    for each positive, so AP is the mean, over the P positives, of the precision at that positive's score.
    No curve is smoothed: this is the area under the raw precision-recall staircase.
    """
    return _mean_per_class(*_precision_at_positives(scores, targets, threads))


def voc_average_precision(scores, targets, threads=None):
    """Per-class VOC all-point interpolated AP: (K,) in [0, 1], NaN for a class without positives.

        AP_VOC = sum_n (R_n - R_{n-1}) max_{m : R_m >= R_n} P_m
    Precision is first made monotone from the right (at each recall, the best precision reachable at that
    recall or beyond), then the area under that envelope is summed. It is never below `average_precision`.
    As in the official code's `voc_ap`; unlike it, tied scores form one threshold (module docstring).
    """
    precision, bounds = _precision_at_positives(scores, targets, threads)
    # positives run from recall 1 down, so "recall >= R_n" means "this positive and those before it";
    # thresholds that add only negatives lower the precision, so the envelope's maxima sit at positives
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        np.maximum.accumulate(precision[start:end], out=precision[start:end])
    return _mean_per_class(precision, bounds)


def mean_average_precision(scores, targets, interpolated=False, class_names=None, threads=None):
    """mAP in percent over the classes with at least one positive.

    Returns {"mAP": float (percent), "per_class": (K,) percent with NaN for excluded classes,
    "excluded": names (or indices) of the classes without positives, "kind": which AP this is,
    "num_classes": how many classes the mean is over}. threads: how many threads sort the classes'
    scores (default: one per core, at most 8; the result is the same for any number).
    """
    ap = (voc_average_precision if interpolated else average_precision)(scores, targets, threads)
    if class_names is not None and len(class_names) != ap.size:
        raise ValueError(f"class_names has {len(class_names)} names but scores have {ap.size} classes")
    names = list(class_names) if class_names is not None else list(range(ap.size))
    has_pos = ~np.isnan(ap)
    if not has_pos.any():
        raise ValueError("no class has a positive target, so mAP is undefined; check the targets "
                         "(1 positive, 0 negative, < 0 unknown)")
    return {"mAP": float(100 * ap[has_pos].mean()), "per_class": 100 * ap,
            "excluded": [names[k] for k in np.flatnonzero(~has_pos)],
            "kind": VOC_KIND if interpolated else AP_KIND, "num_classes": int(has_pos.sum())}


def threshold_metrics(scores, targets, threshold=0.5, top_k=None):
    """CP, CR, CF1 (per class, then averaged) and OP, OR, OF1 (overall), in percent.

    A label is predicted when its probability is >= threshold (with top_k: and it is among the image's
    top_k scores; ties at the k-th place go to the lower class index). Per class c: Nc correct predictions,
    Np predictions, Ng positives (unknown targets ignored).
        CP = mean_c Nc/Np   CR = mean_c Nc/Ng   CF1 = 2 CP CR / (CP + CR)      (F1 of the averages)
        OP = sum Nc / sum Np   OR = sum Nc / sum Ng   OF1 = 2 OP OR / (OP + OR)
    A class never predicted has precision 0 (Np = 0), as in ML-GCN's code; the class means run over the
    classes with at least one positive; an F1 whose P and R are both 0 is 0.
    """
    scores, targets, positive = _check_inputs(scores, targets)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    if scores.min() < 0 or scores.max() > 1:
        raise ValueError(f"scores must be probabilities in [0, 1] (found {scores.min():.3g} .. "
                         f"{scores.max():.3g}); apply torch.sigmoid to the logits first")
    predicted = scores >= threshold  # (N, K)
    kind = f"score >= {threshold}"
    if top_k is not None:
        if not (isinstance(top_k, (int, np.integer)) and 1 <= top_k <= scores.shape[1]):
            raise ValueError(f"top_k must be an integer in [1, {scores.shape[1]}], got {top_k!r}")
        kth = -np.partition(-scores, top_k - 1, axis=1)[:, top_k - 1:top_k]  # (N, 1) k-th highest score
        above, tied = scores > kth, scores == kth
        room = top_k - above.sum(axis=1, keepdims=True)  # places left for the scores tied at the k-th
        predicted &= above | (tied & (np.cumsum(tied, axis=1) <= room))  # ties: lower class index first
        kind = f"top-{top_k} and {kind}"
    known = targets >= 0
    n_correct = (predicted & positive).sum(axis=0)  # (K,)
    n_predicted = (predicted & known).sum(axis=0)
    n_positive = positive.sum(axis=0)
    has_pos = n_positive > 0
    if not has_pos.any():
        raise ValueError("no class has a positive target; recall is undefined")
    precision = n_correct / np.maximum(n_predicted, 1)  # (K,), 0 when never predicted
    recall = n_correct / np.maximum(n_positive, 1)

    def f1(p, r):
        return 2 * p * r / (p + r) if p + r > 0 else 0.0

    cp, cr = precision[has_pos].mean(), recall[has_pos].mean()
    op, orr = n_correct.sum() / max(n_predicted.sum(), 1), n_correct.sum() / n_positive.sum()
    out = {"CP": cp, "CR": cr, "CF1": f1(cp, cr), "OP": op, "OR": orr, "OF1": f1(op, orr)}
    out = {key: float(100 * value) for key, value in out.items()}
    out.update(kind=kind, excluded=[int(k) for k in np.flatnonzero(~has_pos)],
               per_class_precision=100 * precision, per_class_recall=100 * recall)
    return out


def per_batch_retrieval_ap(scores, targets, batch_size=24):
    """NOT COCO mAP. Retrieval AP over each batch's B*K (image, class) pairs flattened into one ranking,
    averaged over batches weighted by their size: the metric behind curt-tigges/query2label's "90.4 mAP"
    (torchmetrics' retrieval_average_precision per validation batch, averaged over the epoch).
    Kept only to measure how far it is from per-class mAP (docs/06_eval.md)."""
    scores, targets, _ = _check_inputs(scores, targets)
    values, weights = [], []
    for start in range(0, len(scores), batch_size):
        s = scores[start:start + batch_size].ravel()  # (B*K,) one ranking of all pairs in the batch
        y = targets[start:start + batch_size].ravel()[np.argsort(-s, kind="stable")] == 1
        hits = np.cumsum(y)[y]  # 1, 2, 3, ... at the rank of each relevant pair
        values.append((hits / (np.flatnonzero(y) + 1)).mean() if y.any() else 0.0)
        weights.append(len(s) // scores.shape[1])  # Lightning's epoch mean weights batches by size
    return float(100 * np.average(values, weights=weights))


def format_metrics(result):
    """One line for a result of `mean_average_precision` or `threshold_metrics`, its definition included."""
    if "mAP" in result:
        excluded = f", excluded (no positives): {result['excluded']}" if result["excluded"] else ""
        return f"mAP {result['mAP']:.2f} [{result['kind']}, {result['num_classes']} classes{excluded}]"
    numbers = "  ".join(f"{key} {result[key]:.2f}" for key in ("CP", "CR", "CF1", "OP", "OR", "OF1"))
    return f"{numbers}  [{result['kind']}]"


# ---------------------------------------------------------------------------------------------------------
# Models: scoring a loader, loading a 05_train.py checkpoint or an official one
# ---------------------------------------------------------------------------------------------------------

CHECKPOINT_FORMAT = "q2l-checkpoint-v1"  # what 05_train.py writes (its checkpoint_common)
# COCO's 80 category names in increasing category id (ids 1..90 with 10 unused): output k of an official
# COCO model is COCO_CLASSES[k]; stage 1 orders the classes of any annotation file by id the same way.
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be evaluated; the message names the file and what is wrong with it."""


@torch.no_grad()
def predict_scores(model, loader, device, amp_dtype=None, channels_last=False, desc="eval", show=True):
    """Sigmoid probabilities (N, K) float32 and targets (N, K) of every image of `loader`, in its order.

    Puts the model in eval mode (dropout off; BatchNorm uses its running statistics) and leaves it there.
    no_grad rather than inference_mode: 05_train.py goes on training the same module, and a tensor that
    a module caches during an inference-mode forward can no longer be updated in place or saved for
    backward.
    With `amp_dtype` (torch.bfloat16 / torch.float16) the forward pass runs under autocast; the sigmoid is
    taken in float32 either way, so that probabilities near 0 and 1 keep their order."""
    model.eval()
    device = torch.device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    scores, targets = [], []
    for images, target in tqdm(loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True):
        images = images.to(device, non_blocking=True, memory_format=memory_format)  # (B, 3, S, S)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)  # (B, K)
        scores.append(torch.sigmoid(logits.float()).cpu())
        targets.append(target)
    if not scores:
        raise ValueError(f"the loader yielded no images (dataset of {len(loader.dataset)}): nothing to score")
    return torch.cat(scores).numpy(), torch.cat(targets).numpy()


def _build_model(config):
    """Query2Label from a config, never touching the timm hub: the weights are loaded next."""
    config = dataclasses.replace(config, pretrained=False, weights=None)
    with contextlib.redirect_stdout(io.StringIO()):  # stage 2's "random init" notice would mislead here
        return transformer.Query2Label(config)


def _load_weights(model, state, path, what):
    """load_state_dict with an error that lists every missing, unexpected and mis-shaped key."""
    own = model.state_dict()
    problems = ([f"missing: {k}" for k in own if k not in state]
                + [f"unexpected: {k}" for k in state if k not in own]
                + [f"shape: {k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
                   for k, v in state.items() if k in own and v.shape != own[k].shape])
    if problems:
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        shown = "\n  ".join(problems[:12]) + more
        raise CheckpointError(f"{path}: the {what} do not fit the model its model_config builds "
                              f"({len(problems)} problems):\n  {shown}")
    model.load_state_dict(state)


def _check_torch_file(path, what):
    """One-line errors for the usual mistakes before torch.load: no such file, a folder, a file that
    torch.save did not write (it writes a zip archive; before torch 1.6 a pickle), a cut-off one."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give a file in it (e.g. {path / 'best.pt'})")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is a damaged zip archive ({path.stat().st_size:,} bytes): cut off "
                              "while being written or copied?")
    if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch file ({path.stat().st_size:,} bytes starting "
                              f"{head!r}; torch.save writes a zip archive)")


def _pickled_objects_error(path, error):
    """weights_only=True refuses pickled Python objects; say which, and what to do, in one line."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    if found is None:
        return None
    return CheckpointError(f"{path} holds pickled Python objects ({found.group(1)}), which loading with "
                           "weights_only=True refuses; if you trust the file's source, pass --trusted")


def load_for_eval(path, device="cpu", use_ema=False):
    """(model in eval mode on `device`, checkpoint dict) from a checkpoint written by 05_train.py.

    The model is rebuilt from checkpoint["model_config"] without pretrained weights (the checkpoint holds
    them all) and loaded from "model": for best.pt the better of the raw and EMA weights at the best epoch,
    for last.pt the raw weights of the last step. use_ema=True loads last.pt's EMA weights instead."""
    path = Path(path)
    _check_torch_file(path, "checkpoint")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged archive, or pickled objects that weights_only refuses
        reason = (str(error).strip().splitlines() or [""])[0][:160]
        raise (_pickled_objects_error(path, error) or CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {reason})")) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        official = isinstance(checkpoint, dict) and ("state_dict" in checkpoint or any(
            "backbone.0.body." in str(key) for key in checkpoint))
        raise CheckpointError(f"{path} is not a checkpoint written by 05_train.py (no 'format': "
                              f"'{CHECKPOINT_FORMAT}')" + ("; it looks like an official Query2Label "
                                                           "state dict: use --official" if official else ""))
    missing = [key for key in ("model", "model_config", "class_names") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path}: a {CHECKPOINT_FORMAT} checkpoint without {missing}; is it complete?")
    known = {field.name for field in dataclasses.fields(transformer.Q2LConfig)}
    unknown = sorted(set(checkpoint["model_config"]) - known)
    if unknown:
        raise CheckpointError(f"{path}: model_config has fields 03_transformer.Q2LConfig does not know: "
                              f"{unknown} (written by another version of the code?)")
    try:
        model = _build_model(transformer.Q2LConfig(**checkpoint["model_config"]))
    except Exception as error:  # unknown backbone, d_model not divisible by heads, ...
        raise CheckpointError(f"{path}: its model_config does not build a model: {error}") from None
    if len(checkpoint["class_names"]) != model.config.num_classes:
        raise CheckpointError(f"{path}: {len(checkpoint['class_names'])} class names for a model with "
                              f"{model.config.num_classes} outputs")
    if use_ema:
        if not checkpoint.get("ema"):
            raise CheckpointError(
                f"{path} holds no EMA weights: only last.pt does (best.pt already holds the better of the "
                f"raw and EMA weights, here '{checkpoint.get('weights_source')}'); drop --use-ema or use "
                "last.pt")
        _load_weights(model, checkpoint["ema"]["module"], path, "EMA weights")
    else:
        _load_weights(model, checkpoint["model"], path, "weights")
    return model.to(device).eval(), checkpoint


def build_official(path, num_classes=80, backbone=None, d_model=None, ff=None, heads=None, device="cpu",
                   trusted=False):
    """A checkpoint of the official code (github.com/SlongLiu/query2labels) loaded, through stage 3's
    converter, into our model with the official_r101 architecture (each part overridable).
    Returns (model in eval mode, Q2LConfig, the converter's report)."""
    overrides = {key: value for key, value in dict(backbone=backbone, d_model=d_model, dim_feedforward=ff,
                                                   num_heads=heads).items() if value is not None}
    config = dataclasses.replace(transformer.PRESETS["official_r101"], num_classes=num_classes, **overrides)
    _check_torch_file(path, "official checkpoint")
    model = _build_model(config)
    try:
        report = transformer.load_official_checkpoint(model, path, trusted=trusted)
    except ValueError as error:
        raise _pickled_objects_error(path, error) or error from None
    return model.to(device).eval(), model.config, report


def amp_dtype_for(choice, device):
    """auto: bfloat16 on a CUDA device that has it, else float16 on CUDA, float32 on the CPU."""
    if choice == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[choice]


def eval_transform(img_size, imagenet_norm=True):
    """Stage 1's validation transform; imagenet_norm=False keeps pixels in [0, 1] (official --orid_norm)."""
    if imagenet_norm:
        return data.build_transforms(img_size, train=False)
    return T.Compose([data.to_rgb, T.Resize((img_size, img_size)),
                      data.ToNormalizedTensor(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))])


# ---------------------------------------------------------------------------------------------------------
# Evaluating a checkpoint on a validation set: summary, per-class table, metrics.json, two figures
# ---------------------------------------------------------------------------------------------------------


def score_dataset(scores, targets, class_names, threshold=0.5):
    """Every metric of this stage on one validation set's (N, K) probabilities and targets."""
    top_k = min(3, scores.shape[1])
    return {"ap": mean_average_precision(scores, targets, class_names=class_names),
            "voc": mean_average_precision(scores, targets, interpolated=True, class_names=class_names),
            "at_threshold": threshold_metrics(scores, targets, threshold),
            "top_k": threshold_metrics(scores, targets, threshold, top_k=top_k)}


def report_lines(metrics, class_names, targets):
    """The summary and the per-class table (sorted by AP, classes without positives last), as lines."""
    ap, voc, at, top = metrics["ap"], metrics["voc"], metrics["at_threshold"], metrics["top_k"]
    lines = [f"  {format_metrics(ap)}", f"  VOC mAP {voc['mAP']:.2f} [{voc['kind']}]",
             f"  {format_metrics(at)}", f"  {format_metrics(top)}"]
    if ap["excluded"]:
        names = ", ".join(map(str, ap["excluded"]))
        lines.append(f"  excluded from the means (no positive in this set): {names}")
    positives = (np.asarray(targets) == 1).sum(axis=0)  # (K,)
    best_first = np.argsort(-np.nan_to_num(ap["per_class"], nan=-np.inf), kind="stable")  # NaN last
    width = max(12, *(len(str(name)) for name in class_names))
    lines.append(f"\n  {'class':<{width}}  {'AP':>6}  {'VOC AP':>6}  {'positives':>9}  "
                 f"{'P@' + at['kind'].split()[-1]:>7}  {'R@' + at['kind'].split()[-1]:>7}")
    for k in best_first:
        value = ap["per_class"][k]
        numbers = ("     -       -" if np.isnan(value) else f"{value:6.2f}  {voc['per_class'][k]:6.2f}")
        lines.append(f"  {str(class_names[k]):<{width}}  {numbers}  {positives[k]:9d}  "
                     f"{at['per_class_precision'][k]:7.2f}  {at['per_class_recall'][k]:7.2f}")
    return lines


def metrics_record(metrics, class_names, targets):
    """metrics.json's numbers: plain JSON (NaN -> null), every value labelled with its definition."""
    def number(x):
        return None if np.isnan(x) else round(float(x), 6)

    ap, voc, at = metrics["ap"], metrics["voc"], metrics["at_threshold"]
    positives = (np.asarray(targets) == 1).sum(axis=0)
    record = {"mAP": ap["mAP"], "mAP_kind": ap["kind"], "mAP_voc": voc["mAP"], "mAP_voc_kind": voc["kind"],
              "num_classes_in_mean": ap["num_classes"], "excluded": [str(name) for name in ap["excluded"]]}
    for key in ("at_threshold", "top_k"):
        record[key] = {name: metrics[key][name] for name in ("CP", "CR", "CF1", "OP", "OR", "OF1", "kind")}
    record["per_class"] = [
        {"name": str(name), "AP": number(ap["per_class"][k]), "VOC_AP": number(voc["per_class"][k]),
         "positives": int(positives[k]), "precision": number(at["per_class_precision"][k]),
         "recall": number(at["per_class_recall"][k])}
        for k, name in enumerate(class_names)]
    return record


def precision_recall_curve(scores, targets):
    """One class's (precision, recall) at each distinct threshold from the highest score down; tied
    scores are one threshold and unknown targets (< 0) are ignored, as in `average_precision`."""
    known = targets >= 0
    order = np.argsort(-scores[known], kind="stable")
    s, hit = scores[known][order], targets[known][order] == 1
    last = np.append(s[1:] != s[:-1], True)  # the last entry of each run of tied scores
    tp, n = np.cumsum(hit)[last], np.arange(1, len(s) + 1)[last]
    return tp / n, tp / max(hit.sum(), 1)


def plot_per_class_ap(metrics, class_names, path):
    """Horizontal bars of every class's AP, best at the top, with the mAP as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = metrics["ap"]["per_class"]
    order = [k for k in np.argsort(-np.nan_to_num(ap, nan=-1), kind="stable") if not np.isnan(ap[k])]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.22 * max(len(order), 3)))
    ax.barh(range(len(order)), [ap[k] for k in order], color="tab:blue")
    ax.set_yticks(range(len(order)), [str(class_names[k]) for k in order], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(metrics["ap"]["mAP"], color="tab:red", lw=1, label=f"mAP {metrics['ap']['mAP']:.2f}")
    excluded = f"; no positives: {len(metrics['ap']['excluded'])}" if metrics["ap"]["excluded"] else ""
    ax.set(xlim=(0, 100), xlabel="AP (%, non-interpolated)", title=f"AP per class{excluded}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pr_curves(scores, targets, metrics, class_names, path, count=5):
    """Precision-recall curves: every class if there are at most 2*count, else the `count` best and worst."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = metrics["ap"]["per_class"]
    ranked = [k for k in np.argsort(-np.nan_to_num(ap, nan=-1), kind="stable") if not np.isnan(ap[k])]
    groups = [("all classes", ranked)] if len(ranked) <= 2 * count else [
        (f"{count} best classes", ranked[:count]), (f"{count} worst classes", ranked[-count:])]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.2), squeeze=False)
    for ax, (title, classes) in zip(axes[0], groups, strict=True):
        for k in classes:
            precision, recall = precision_recall_curve(scores[:, k], targets[:, k])
            ax.step(np.r_[0, recall], np.r_[precision[0], precision], where="pre",
                    label=f"{class_names[k]} (AP {ap[k]:.1f})")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(model, dataset, class_names, device, batch_size=32, workers=2, amp_dtype=None, threshold=0.5,
             out_dir=None, show=True):
    """Score `dataset` with `model`, print the summary and the per-class table; with `out_dir`, write
    per_class_ap.png and pr_curves.png there. Returns (metrics, record for metrics.json, scores, targets)."""
    device = torch.device(device)
    loader = data.build_loader(dataset, batch_size, train=False, workers=workers,
                               pin_memory=device.type == "cuda")
    start = time.perf_counter()
    scores, targets = predict_scores(model, loader, device, amp_dtype, device.type == "cuda", "eval", show)
    seconds = time.perf_counter() - start
    metrics = score_dataset(scores, targets, class_names, threshold)
    print(f"{len(scores)} images scored in {seconds:.1f} s ({len(scores) / seconds:.1f} images/s)"
          + (f"; {dataset.bad_count} corrupt images replaced by the next readable ones"
             if dataset.bad_count else ""))
    print("\n".join(report_lines(metrics, class_names, targets)))
    record = {**metrics_record(metrics, class_names, targets), "images": int(len(scores)),
              "corrupt_images": int(dataset.bad_count), "seconds": round(seconds, 3)}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_per_class_ap(metrics, class_names, out_dir / "per_class_ap.png")
        plot_pr_curves(scores, targets, metrics, class_names, out_dir / "pr_curves.png")
    return metrics, record, scores, targets


# ---------------------------------------------------------------------------------------------------------
# Prediction for image files, and attention maps
# ---------------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def find_images(path):
    """[path] for a file (whatever its suffix), or the image files of a folder (by suffix, sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"--image {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--image {path}: a folder without image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


@torch.inference_mode()
def predict_images(model, paths, class_names, transform, device="cpu", batch_size=16, amp_dtype=None,
                   show=True):
    """Probabilities for image files, decoded by stage 1 (grey, CMYK, alpha, EXIF rotation handled).

    Returns (results, skipped): results [{"image": path, "scores": (K,) float32}] in the order of
    `paths`; skipped [(path, reason)] for files that cannot be decoded (they are not scored)."""
    model.eval()
    device = torch.device(device)
    results, skipped = [], []
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", leave=False,
                      disable=not show or len(paths) <= batch_size, dynamic_ncols=True):
        images, kept = [], []
        for path in paths[start:start + batch_size]:
            try:
                images.append(transform(data.load_image(path)))  # (3, S, S)
                kept.append(path)
            except data.CorruptImageError as error:
                skipped.append((Path(path), str(error)))
        if not images:
            continue
        batch = torch.stack(images).to(device)  # (B, 3, S, S)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(batch)  # (B, K)
        probabilities = torch.sigmoid(logits.float()).cpu().numpy()
        results += [{"image": Path(p), "scores": s} for p, s in zip(kept, probabilities, strict=True)]
    return results, skipped


def labels_above(scores, class_names, threshold):
    """[(name, probability)] of the labels at or above the threshold, most probable first."""
    order = np.argsort(-scores, kind="stable")
    return [(class_names[k], float(scores[k])) for k in order if scores[k] >= threshold]


def print_predictions(results, skipped, class_names, threshold):
    for result in results:
        labels = labels_above(result["scores"], class_names, threshold)
        print(f"{result['image']}:")
        for name, p in labels:
            print(f"  {name:<20s} {p:.3f}")
        if not labels:
            best = int(np.argmax(result["scores"]))
            print(f"  (no label at or above {threshold}; the most probable is {class_names[best]} "
                  f"{result['scores'][best]:.3f})")
    for _, reason in skipped:
        print(f"skipped {reason}")
    print(f"{len(results)} image(s) labelled, {len(skipped)} skipped (cannot be decoded); "
          f"threshold {threshold}")


@torch.inference_mode()
def attention_maps(model, image, transform, device="cpu"):
    """One PIL image -> (probabilities (K,), attention (K, H, W)): the last decoder layer's cross-attention
    of each label query over the H x W feature map, averaged over heads (stage 3); each map sums to 1."""
    model.eval()
    x = transform(image)[None].to(device)  # (1, 3, S, S)
    logits, attention = model(x, return_attention=True)  # (1, K), (1, K, H, W)
    return torch.sigmoid(logits.float())[0].cpu().numpy(), attention[0].float().cpu()


def draw_attention(image, scores, attention, class_names, path, top_k=4, threshold=None, panel_px=320):
    """The image, then one panel per label (its top_k most probable, or with `threshold` every label at
    or above it) with the label's attention map upsampled bilinearly to the image and drawn over it as a
    heat map. All maps share one colour scale (0 to the largest weight shown), so panels compare; each
    title gives the label, its probability and how peaked its map is (largest weight x N: 1 = uniform).
    Returns [(name, probability)] of the labels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-scores, kind="stable")
    chosen = [k for k in order if scores[k] >= threshold] if threshold is not None else list(order[:top_k])
    chosen = chosen or list(order[:1])  # nothing above the threshold: still show the most probable label
    scale = min(1.0, 448 / max(image.size))  # at most 448 px: the map has only H x W cells anyway
    shown = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    # The model saw the image squashed to S x S, so stretching the H x W grid over the whole image
    # puts every cell back on the part of the image it looked at.
    maps = F.interpolate(attention[chosen][None], size=(shown.height, shown.width), mode="bilinear",
                         align_corners=False)[0]  # (L, h, w)
    peak = attention[chosen].flatten(1).max(dim=1).values * attention[0].numel()  # (L,) x uniform
    dpi, panels = 100, 1 + len(chosen)
    side = panel_px / dpi
    fig, axes = plt.subplots(1, panels, figsize=(side * panels, side * shown.height / shown.width + 0.6),
                             dpi=dpi, squeeze=False)
    axes[0, 0].imshow(shown)
    axes[0, 0].set_title(f"input ({image.width}x{image.height})", fontsize=9)
    grey = shown.convert("L")  # under a heat map, the image's own colours would read as attention
    for ax, k, heat, ratio in zip(axes[0, 1:], chosen, maps, peak, strict=True):
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
        ax.imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=float(maps.max()))
        ax.set_title(f"{class_names[k]} {scores[k]:.2f}\npeak {ratio:.1f}x uniform", fontsize=9)
    for ax in axes[0]:
        ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.55 / fig.get_figheight(), wspace=0.04)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return [(class_names[k], float(scores[k])) for k in chosen]


# ---------------------------------------------------------------------------------------------------------
# Self-checks, benchmark and figures (python 06_eval.py [--benchmark | --figures])
# ---------------------------------------------------------------------------------------------------------

# The worked example of docs/06_eval.md and tests/test_06_eval.py: 4 images x 5 classes A..E.
EXAMPLE_CLASSES = ["A", "B", "C", "D", "E"]
EXAMPLE_SCORES = [[0.90, 0.80, 0.30, 0.60, 0.10],
                  [0.80, 0.40, 0.70, 0.20, 0.30],
                  [0.55, 0.60, 0.60, 0.90, 0.20],
                  [0.70, 0.20, 0.60, 0.40, 0.45]]
EXAMPLE_TARGETS = [[1, 0, 1, 0, 0],
                   [1, 1, 0, 0, 0],
                   [0, 1, 1, 1, 0],
                   [1, 0, 0, 1, 1]]
# Derived by hand in docs/06_eval.md (and again in the tests' comments).
EXAMPLE_AP = [1, 7 / 12, 5 / 12, 5 / 6, 1]
EXAMPLE_VOC_AP = [1, 2 / 3, 1 / 2, 5 / 6, 1]
EXAMPLE_AT_HALF = {"CP": 500 / 12, "CR": 50, "CF1": 500 / 11, "OP": 600 / 11, "OR": 60, "OF1": 400 / 7}
EXAMPLE_TOP3 = {"CP": 700 / 15, "CR": 50, "CF1": 1400 / 29, "OP": 60, "OR": 60, "OF1": 60}


def _report(checks, name, ours, reference, tol):
    error = float(np.max(np.abs(np.asarray(ours, float) - np.asarray(reference, float))))
    checks.append(error <= tol)
    print(f"  {'ok  ' if error <= tol else 'FAIL'} {name}: max |diff| {error:.1e} (tolerance {tol:g})")


def self_check(seed=0):
    """Check the metrics on the worked example (hand values) and on random data (scikit-learn)."""
    start, checks = time.perf_counter(), []
    scores, targets = np.array(EXAMPLE_SCORES), np.array(EXAMPLE_TARGETS)
    print("06_eval.py self-check, on the 4-image x 5-class worked example of docs/06_eval.md")
    for interpolated, hand in ((False, EXAMPLE_AP), (True, EXAMPLE_VOC_AP)):
        result = mean_average_precision(scores, targets, interpolated, EXAMPLE_CLASSES)
        values = zip(EXAMPLE_CLASSES, result["per_class"], strict=True)
        per_class = "  ".join(f"{name} {value:.2f}" for name, value in values)
        print(f"  {format_metrics(result)}\n       per class: {per_class}")
        _report(checks, "per-class AP vs hand-computed", result["per_class"], 100 * np.array(hand), 1e-9)
    for top_k, hand in ((None, EXAMPLE_AT_HALF), (3, EXAMPLE_TOP3)):
        result = threshold_metrics(scores, targets, 0.5, top_k)
        print(f"  {format_metrics(result)}")
        _report(checks, "CP CR CF1 OP OR OF1 vs hand-computed", [result[key] for key in hand],
                list(hand.values()), 1e-9)
    unknown = targets.copy()
    unknown[2, 0] = -1  # image 2's A was the only false positive of class A; unknown, it no longer counts
    _report(checks, "unknown target ignored (CP rises to 7/15)", threshold_metrics(scores, unknown)["CP"],
            700 / 15, 1e-9)
    try:
        from sklearn.metrics import average_precision_score
    except ImportError:
        print("  (scikit-learn not installed: skipped the comparison on random data)")
    else:
        rng = np.random.default_rng(seed)
        scores = np.round(rng.random((500, 20)), 2)  # 2 decimals: many ties
        targets = (rng.random((500, 20)) < 0.1).astype(int)
        targets[:, 1], targets[:, 2] = 0, 1  # a class without positives, a class without negatives
        ours = average_precision(scores, targets)
        theirs = [average_precision_score(targets[:, k], scores[:, k]) for k in range(20) if k != 1]
        print(f"  500 x 20 random scores with ties; class 1 has no positive (AP {ours[1]}), "
              "class 2 no negative")
        _report(checks, "per-class AP vs scikit-learn", np.delete(ours, 1), theirs, 1e-10)
    print(f"{sum(checks)}/{len(checks)} checks passed in {time.perf_counter() - start:.2f} s.\n")
    print("Next, with a checkpoint from 05_train.py (python 06_eval.py --help for all flags):\n"
          "  python 06_eval.py --checkpoint runs/demo/best.pt                    evaluate it\n"
          "  python 06_eval.py --checkpoint runs/demo/best.pt --image PATH       labels for images\n"
          "  python 06_eval.py --checkpoint runs/demo/best.pt --image FILE --attention OUT.png\n"
          "  python 06_eval.py --benchmark   speed and agreement with scikit-learn at COCO val size\n"
          "  python 06_eval.py --figures     the AP-vs-VOC figure and the comparisons of docs/06_eval.md")
    return all(checks)


def benchmark(seed=0, num_images=40504, num_classes=80, rounds=7):
    """Our mAP (on all cores, then on one) vs a per-class scikit-learn loop, on the same data in the same
    run, timed in alternation (this machine is shared); the best time of each and the median of the
    per-round ratios, in wall-clock time, and for one thread also in process CPU time (then both sides
    run on one core, and CPU time is what other jobs on the machine disturb least). Then the other
    metrics' times."""
    try:
        from sklearn.metrics import average_precision_score
    except ImportError:
        raise SystemExit("--benchmark compares with scikit-learn, which is not installed: "
                         "pip install -r requirements-dev.txt") from None
    rng = np.random.default_rng(seed)
    # sigmoid outputs are float32; stage 1's labels are float32 0/1; COCO val has ~2.9 of 80 labels/image
    scores = rng.random((num_images, num_classes), dtype=np.float32)
    targets = (rng.random((num_images, num_classes)) < 0.036).astype(np.float32)
    cases = {"random, float32": (scores, targets),
             "random, float32 rounded to 2 decimals (ties)": (scores.round(2), targets),
             "random, float64 (all 53 bits used)": (rng.random((num_images, num_classes)), targets),
             "simulated model (class 0 on 45% of images)": simulated_model_scores(num_images, num_classes,
                                                                                  seed)}
    threads = _default_threads()
    print(f"mAP over {num_images} images x {num_classes} classes (COCO 2014 val size); random labels have "
          f"{100 * targets.mean():.1f}% positives. {rounds} alternating rounds; best times, median ratios. "
          f"Targets: >= 20x faster, |AP difference| <= 1e-6.")

    def timed(fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return out, (time.perf_counter() - wall, time.process_time() - cpu)

    for name, (s, y) in cases.items():
        runs = {"all": [], "one": [], "loop": []}
        for _ in range(rounds):
            ours, t = timed(lambda s=s, y=y: mean_average_precision(s, y)["per_class"] / 100)
            runs["all"].append(t)
            one, t = timed(lambda s=s, y=y: mean_average_precision(s, y, threads=1)["per_class"] / 100)
            runs["one"].append(t)
            theirs, t = timed(lambda s=s, y=y: np.array([average_precision_score(y[:, k], s[:, k])
                                                         for k in range(num_classes)]))
            runs["loop"].append(t)
        runs = {key: np.array(value) for key, value in runs.items()}  # (rounds, [wall, cpu])
        ratio = {key: np.median(runs["loop"] / runs[key], axis=0) for key in ("all", "one")}
        best = {key: 1000 * value[:, 0].min() for key, value in runs.items()}
        if not np.array_equal(ours, one, equal_nan=True):
            raise RuntimeError("AP on several threads differs from AP on one: a bug")
        print(f"  {name}: scikit-learn loop {best['loop']:.0f} ms; ours {best['all']:.1f} ms on {threads} "
              f"threads -> {ratio['all'][0]:.1f}x, {best['one']:.1f} ms on 1 -> {ratio['one'][0]:.1f}x "
              f"(CPU time {ratio['one'][1]:.1f}x); largest |AP difference| "
              f"{np.max(np.abs(ours - theirs)):.1e}")
    for name, fn in (("VOC interpolated mAP", lambda: mean_average_precision(scores, targets, True)),
                     ("threshold metrics at 0.5", lambda: threshold_metrics(scores, targets)),
                     ("top-3 threshold metrics", lambda: threshold_metrics(scores, targets, top_k=3))):
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(f"  {name}: {1000 * min(times):.1f} ms")


def simulated_model_scores(num_images=40504, num_classes=80, seed=0):
    """Scores shaped like a trained model's on COCO val (not a real model): class 0 on 45% of the
    images (like COCO's "person"), the others on 0.5-10% (log-uniform; ~3.1 labels per image), and
    per-class logits N(0, 1) - 3 for negatives, shifted up by a separation of 2-5 for positives."""
    rng = np.random.default_rng(seed)
    prevalence = np.exp(rng.uniform(np.log(0.005), np.log(0.10), num_classes))
    prevalence[0] = 0.45
    targets = rng.random((num_images, num_classes)) < prevalence  # (N, K)
    separation = rng.uniform(2.0, 5.0, num_classes)
    logits = rng.normal(size=targets.shape) - 3.0 + np.where(targets, separation, 0.0)
    return (1 / (1 + np.exp(-logits))).astype(np.float32), targets.astype(np.float32)


def _voc_ap_ties_in_order(scores, targets):
    """VOC AP with every entry its own threshold, ties ranked by image index: the official code's
    `voc_mAP` when its unstable np.argsort happens to keep tied entries in image order."""
    order = np.argsort(-scores, axis=0, kind="stable")  # (N, K)
    hit = np.take_along_axis(targets, order, axis=0) == 1
    precision = np.cumsum(hit, axis=0) / np.arange(1, len(scores) + 1)[:, None]
    envelope = np.maximum.accumulate(precision[::-1], axis=0)[::-1]
    return (envelope * hit).sum(axis=0) / hit.sum(axis=0)


def compare_and_plot(out_dir="docs/figures", seed=0):
    """The measurements behind docs/06_eval.md, and docs/figures/06_ap_vs_voc.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    model_scores, model_targets = simulated_model_scores(seed=seed)
    random_scores = rng.random(model_scores.shape, dtype=np.float32)
    random_targets = (rng.random(model_scores.shape) < 0.036).astype(np.float32)
    print("1. AP (scikit-learn definition) vs VOC interpolated AP, mAP in points (interpolated - not)")
    for name, s, y in (("random scores", random_scores, random_targets),
                       ("simulated model", model_scores, model_targets)):
        for n in (500, 5000, len(s)):
            plain = mean_average_precision(s[:n], y[:n])["mAP"]
            voc = mean_average_precision(s[:n], y[:n], interpolated=True)["mAP"]
            print(f"  {name:16s} {n:6d} images: {plain:6.2f} vs {voc:6.2f}  (+{voc - plain:.2f})")
    tied = model_scores.round(2)
    ours = voc_average_precision(tied, model_targets)
    in_order = _voc_ap_ties_in_order(tied, model_targets)
    print("2. VOC AP on the simulated model's scores rounded to 2 decimals: ties as one threshold (ours) vs\n"
          f"   ties ranked by image index (official code): mAP {100 * ours.mean():.2f} vs "
          f"{100 * in_order.mean():.2f}, largest per-class difference "
          f"{100 * np.abs(ours - in_order).max():.2f}")
    print("3. Per-class mAP vs flattened per-batch retrieval AP (curt-tigges' '90.4'), simulated model")
    print(f"  per class: {format_metrics(mean_average_precision(model_scores, model_targets))}")
    for batch_size in (8, 24, 64, 256, len(model_scores)):
        value = per_batch_retrieval_ap(model_scores, model_targets, batch_size)
        print(f"  flattened retrieval AP, batch {batch_size:5d}: {value:.2f}")
    # the figure: one class's precision-recall curve, the area each AP sums, and the per-class gaps
    k = int(np.argmin(np.abs(model_targets[:2000].sum(0) - 25)))  # a class with ~25 positives in 2000 images
    s, y = model_scores[:2000, k], model_targets[:2000, k]
    hits = np.cumsum(y[np.argsort(-s, kind="stable")])  # (2000,) positives among the top 1, 2, ... images
    precision, recall = hits / np.arange(1, len(s) + 1), hits / hits[-1]
    at_positive = precision[np.flatnonzero(np.diff(hits, prepend=0))]  # P_n where recall steps up
    envelope = np.maximum.accumulate(at_positive[::-1])[::-1]
    steps = np.arange(len(at_positive) + 1) / len(at_positive)  # recall 0, 1/P, ..., 1
    ap = average_precision(s[:, None], y[:, None])[0]
    voc = voc_average_precision(s[:, None], y[:, None])[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(recall, precision, color="0.75", lw=0.8, label="precision after each image")
    left.stairs(at_positive, steps, color="tab:blue", lw=1.5, label=f"area summed by AP: {100 * ap:.1f}")
    left.stairs(envelope, steps, baseline=at_positive, fill=True, color="tab:orange", alpha=0.35)
    left.stairs(envelope, steps, color="tab:orange", lw=1.5,
                label=f"interpolated, monotone from the right: VOC AP {100 * voc:.1f}")
    left.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02),
             title=f"one class of the simulated model, {len(at_positive)} positives in 2000 images")
    left.legend(loc="lower left", fontsize=8)
    for n, marker in ((500, "o"), (5000, "s"), (len(model_scores), "^")):
        plain = average_precision(model_scores[:n], model_targets[:n])
        gap = 100 * (voc_average_precision(model_scores[:n], model_targets[:n]) - plain)
        right.scatter(model_targets[:n].sum(0), gap, s=14, marker=marker,
                      label=f"{n} images: mAP gap +{np.nanmean(gap):.2f}")
    right.set(xscale="log", xlabel="positives of the class", ylabel="VOC AP - AP (points)",
              title="interpolation gap per class, simulated model")
    right.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out_dir) / "06_ap_vs_voc.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def _class_names_for(model, val_ann):
    """Names for a model without any: the annotation file's, else COCO's for 80 outputs, else numbers."""
    K = model.config.num_classes
    if val_ann:
        categories = sorted(data.read_coco(val_ann).dataset["categories"], key=lambda c: c["id"])
        names = [c["name"] for c in categories]
        if len(names) != K:
            raise ValueError(f"{val_ann} has {len(names)} categories but the model has {K} outputs")
        return names
    return list(COCO_CLASSES) if K == len(COCO_CLASSES) else [f"class {k}" for k in range(K)]


def _validation_set(paths, transform, drop_empty, kind):
    """Stage 1's dataset for the validation paths; the built-in set is regenerated if it was deleted."""
    images, ann = paths
    if not (images and ann):
        raise ValueError("no validation set: give --val-images and --val-ann (an official checkpoint "
                         "records none)")
    if kind == "synthetic" and not (Path(images).is_dir() and Path(ann).is_file()):
        print(data.ensure_synthetic(Path(images).parent).note)  # same recipe and seed as 05_train.py's
    for flag, path in (("--val-images", images), ("--val-ann", ann)):
        if not Path(path).exists():
            raise FileNotFoundError(f"validation data {path} not found (run from the folder you trained in, "
                                    f"or pass {flag})")
    return data.CocoMultiLabel(images, ann, transform, drop_empty=drop_empty)


def run(args):
    """--checkpoint / --official: evaluate on a validation set, or predict for --image (and --attention).
    Returns what it computed: {"metrics": ..., "out_dir": ...} or {"predictions": ..., "skipped": ...}."""
    if args.checkpoint and args.official:
        raise ValueError("give --checkpoint (ours) or --official (the official code's), not both")
    if args.attention and not args.image:
        raise ValueError("--attention needs --image FILE: the image whose attention to draw")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp_dtype = amp_dtype_for(args.amp, device)
    if args.official:
        source = Path(args.official)
        model, config, report = build_official(source, args.num_classes or len(COCO_CLASSES), args.backbone,
                                               args.d_model, args.ff, args.heads, device, args.trusted)
        print(f"official checkpoint {source}: {config.backbone}, d {config.d_model}, {config.num_heads} "
              f"heads, ff {config.dim_feedforward}, {config.num_classes} classes; left out on purpose: "
              f"{', '.join(report['dropped']) or 'nothing'}")
        info = {"checkpoint": str(source), "weights": "official", "model_config": dataclasses.asdict(config)}
        saved, batch_size, default_out = {}, args.batch_size or 32, source.parent / f"eval-{source.stem}"
        img_size, class_names = args.img_size or 448, None
    else:
        source = Path(args.checkpoint)
        model, checkpoint = load_for_eval(source, device, args.use_ema)
        weights = "ema (--use-ema)" if args.use_ema else checkpoint.get("weights_source", "raw")
        info = {"checkpoint": str(source), "weights": weights, "epoch": checkpoint.get("epoch"),
                "step": checkpoint.get("step"), "best_map_recorded": checkpoint.get("best_map"),
                "model_config": checkpoint["model_config"]}
        print(f"checkpoint {source}: epoch {info['epoch']}, step {info['step']}, {weights} weights, "
              f"{model.config.backbone} d {model.config.d_model}, {model.config.num_classes} classes")
        saved = checkpoint.get("data") or {}
        batch_size = args.batch_size or (checkpoint.get("args") or {}).get("batch_size") or 32
        img_size, class_names = args.img_size or saved.get("img_size"), list(checkpoint["class_names"])
        plain = source.stem == "best" and not args.use_ema
        default_out = source.parent / ("eval" if plain else f"eval-{source.stem}" + "-ema" * args.use_ema)
    if not img_size:
        raise ValueError(f"{source} records no input size: pass --img-size")
    transform = eval_transform(img_size, imagenet_norm=not args.orid_norm)
    if args.image:
        names = class_names or _class_names_for(model, args.val_ann)
        return predict_cli(args, model, names, transform, device, amp_dtype, batch_size)

    kind = saved.get("kind") if not (args.val_images or args.val_ann) else "custom"
    paths = (args.val_images or saved.get("val_images"), args.val_ann or saved.get("val_ann"))
    dataset = _validation_set(paths, transform, bool(saved.get("drop_empty", False)), kind)
    if class_names is None:
        class_names = _class_names_for(model, dataset.ann_file)
    elif list(dataset.class_names) != class_names:
        ours = list(dataset.class_names)
        k = next((k for k, (a, b) in enumerate(zip(ours, class_names, strict=False)) if a != b), None)
        where = (f"class {k} is {ours[k]!r} there, {class_names[k]!r} in the checkpoint" if k is not None
                 else f"{len(ours)} classes there, {len(class_names)} in the checkpoint")
        raise ValueError(f"{dataset.ann_file} defines other classes than the checkpoint was trained on "
                         f"({where}): evaluate on data with the same categories")
    recorded = saved.get("val_ann_fingerprint")
    if recorded and not (args.val_images or args.val_ann) and recorded != data.file_fingerprint(dataset.ann_file):
        print(f"warning: {dataset.ann_file} has changed since this checkpoint was trained (e.g. the built-in "
              f"set was regenerated with another recipe): its recorded mAP is not comparable with this one")
    out_dir = Path(args.out_dir) if args.out_dir else default_out
    config = {"val_images": str(dataset.image_dir), "val_ann": str(dataset.ann_file), "img_size": img_size,
              "drop_empty": dataset.drop_empty, "batch_size": batch_size, "device": str(device),
              "amp": str(amp_dtype or "off"), "threshold": args.threshold, "out_dir": str(out_dir)}
    print("evaluation: " + ", ".join(f"{k} {v}" for k, v in config.items()))
    metrics, record, _, _ = evaluate(model, dataset, class_names, device, batch_size, args.workers, amp_dtype,
                                     args.threshold, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps({**info, "config": config, **record}, indent=1))
    if info.get("best_map_recorded") is not None and not args.use_ema:
        print(f"(the checkpoint recorded a best mAP of {info['best_map_recorded']:.2f} during training)")
    print(f"wrote {out_dir / 'metrics.json'}, {out_dir / 'per_class_ap.png'}, {out_dir / 'pr_curves.png'}")
    return {"metrics": metrics, "record": record, "out_dir": out_dir}


def predict_cli(args, model, class_names, transform, device, amp_dtype, batch_size):
    paths = find_images(args.image)
    if args.attention and (len(paths) != 1 or Path(args.image).is_dir()):
        raise ValueError(f"--attention draws one image; --image {args.image} is a folder")
    results, skipped = predict_images(model, paths, class_names, transform, device, batch_size, amp_dtype)
    print_predictions(results, skipped, class_names, args.threshold)
    if args.attention and results:
        image = data.load_image(paths[0])
        scores, attention = attention_maps(model, image, transform, device)
        drawn = draw_attention(image, scores, attention, class_names, args.attention, args.top_k,
                               args.threshold if args.above_threshold else None)
        print(f"wrote {args.attention}: the image and the cross-attention of "
              + ", ".join(f"{name} ({p:.2f})" for name, p in drawn))
    return {"predictions": results, "skipped": skipped}


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

EXAMPLES = """examples:
  python 06_eval.py                                         metric self-checks
  python 06_eval.py --checkpoint runs/demo/best.pt          evaluate on the validation set it was trained with
  python 06_eval.py --checkpoint runs/demo/last.pt --use-ema
  python 06_eval.py --checkpoint runs/demo/best.pt --image photos/          labels of every image in a folder
  python 06_eval.py --checkpoint runs/demo/best.pt --image cat.jpg --attention cat_attention.png
  python 06_eval.py --official checkpoint.pkl --val-images data/coco/val2014 \\
                    --val-ann data/coco/annotations/instances_val2014.json  an official Q2L-R101-448 file
"""


def build_parser():
    parser = argparse.ArgumentParser(
        description="Stage 6 of Query2Label from scratch: metrics, evaluation of checkpoints, prediction and "
                    "attention maps. With no arguments, runs the metric self-checks.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    # * what to evaluate
    parser.add_argument("--checkpoint", help="a checkpoint written by 05_train.py (runs/<name>/best.pt or "
                                             "last.pt): evaluated on the validation set it was trained with")
    parser.add_argument("--use-ema", action="store_true",
                        help="load the EMA weights of last.pt (best.pt already holds the better of raw and "
                             "EMA)")
    parser.add_argument("--official", metavar="PATH",
                        help="a checkpoint of the official Query2Label code (e.g. Q2L-R101-448's "
                             "checkpoint.pkl), converted by stage 3; architecture official_r101 unless "
                             "overridden below")
    # * data
    parser.add_argument("--val-images", help="folder of validation images (default: the checkpoint's)")
    parser.add_argument("--val-ann", help="COCO-format annotation JSON of those images (default: the "
                                          "checkpoint's; with --official it also names the classes)")
    parser.add_argument("--img-size", type=int,
                        help="input size (default: the checkpoint's; 448 with --official)")
    # * prediction and attention maps
    parser.add_argument("--image", help="an image file or a folder of images: print each image's labels at "
                                        "or above --threshold, most probable first, instead of evaluating")
    parser.add_argument("--attention", metavar="OUT.png",
                        help="with --image FILE: draw the image and, for each of its top labels, the label's "
                             "cross-attention map over it, into OUT.png")
    parser.add_argument("--top-k", type=int, default=4,
                        help="--attention: panels for this many most probable labels (default 4)")
    parser.add_argument("--above-threshold", action="store_true",
                        help="--attention: one panel per label at or above --threshold, instead of --top-k")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="probability at which a label counts as predicted, for CP/CR/CF1/OP/OR/OF1 and "
                             "--image (default 0.5)")
    # * official architecture (what --official builds; the released R101 files need none of these)
    parser.add_argument("--backbone", help="timm backbone (default resnet101)")
    parser.add_argument("--d-model", type=int,
                        help="transformer width (default 2048 = ResNet-101's channels)")
    parser.add_argument("--ff", type=int, help="feed-forward width (default 8192)")
    parser.add_argument("--heads", type=int, help="attention heads (default 4)")
    parser.add_argument("--num-classes", type=int, help="outputs (default 80, COCO)")
    parser.add_argument("--orid-norm", action="store_true",
                        help="pixels in [0, 1] without ImageNet mean/std: for files trained with the "
                             "official --orid_norm (see the release's config json)")
    parser.add_argument("--trusted", action="store_true",
                        help="--official: allow pickled Python objects in the file (torch.load "
                             "weights_only=False); only for files from a source you trust")
    # * running
    parser.add_argument("--batch-size", type=int,
                        help="images per batch (default: the checkpoint's training batch size, else 32)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                        help="mixed precision; auto = bf16 (or fp16) on CUDA, off on the CPU (default auto)")
    parser.add_argument("--out-dir", help="where evaluation writes metrics.json, per_class_ap.png and "
                                          "pr_curves.png (default: eval/ next to best.pt, eval-<name>/ for "
                                          "other files)")
    # * metrics
    parser.add_argument("--benchmark", action="store_true",
                        help="time mAP at COCO val size against a per-class scikit-learn loop and report the "
                             "largest AP difference; also time VOC AP and the threshold metrics")
    parser.add_argument("--figures", action="store_true",
                        help="print the comparisons of docs/06_eval.md (AP vs VOC AP, ties, flattened "
                             "per-batch retrieval AP) and write 06_ap_vs_voc.png")
    parser.add_argument("--figure-dir", default="docs/figures",
                        help="where --figures writes its PNG (default: docs/figures)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data (default: 0)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")
    if args.benchmark:
        benchmark(args.seed)
    elif args.figures:
        compare_and_plot(args.figure_dir, args.seed)
    elif args.checkpoint or args.official:
        try:
            run(args)
        except (OSError, ValueError) as error:  # ours name the file and the problem; no traceback needed
            raise SystemExit(f"error: {error}") from None
    elif args.image or args.attention:
        parser.error("--image and --attention need a model: --checkpoint FILE or --official FILE")
    else:
        return 0 if self_check(args.seed) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
