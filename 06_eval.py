"""Stage 6: scoring a multi-label classifier — mAP, CP/CR/CF1 and OP/OR/OF1, from scratch.

A number is only worth what its metric is worth. This stage defines, in a few vectorised numpy lines each,
the metrics of the Query2Label paper's COCO table, checks them against scikit-learn and hand-computed values,
and labels every number with the definition that produced it:

- `average_precision`: per-class AP exactly as scikit-learn's `average_precision_score` defines it
  (non-interpolated), the default of `mean_average_precision`.
- `voc_average_precision`: VOC all-point interpolated AP, what the official Query2Label code reports.
- `mean_average_precision`: the mean over classes that have at least one positive; classes without one are
  named in "excluded", never averaged in as NaN or 0.
- `threshold_metrics`: CP, CR, CF1, OP, OR, OF1 at a score threshold (default 0.5), or for each image's
  top-k labels (the papers' "top-3" rows).
- `per_batch_retrieval_ap`: NOT a COCO metric; the flattened per-batch retrieval AP behind a popular
  re-implementation's "90.4 mAP", kept only to show (docs/06_eval.md) why it cannot be compared.

Run it:
    python 06_eval.py               # self-checks on a 4-image worked example (hand values, scikit-learn)
    python 06_eval.py --benchmark   # speed and agreement vs a per-class scikit-learn loop, COCO val size
    python 06_eval.py --figures     # docs/figures/06_ap_vs_voc.png and the comparisons in docs/06_eval.md
Evaluation of checkpoints, prediction and attention maps: coming with stage 5 (they need the model of
stage 3 and the checkpoints that 05_train.py writes). This is the last stage.

Shapes: N images, K classes. scores (N, K): any real numbers for the AP functions (only their order
matters), probabilities (after sigmoid) for `threshold_metrics`. targets (N, K): 1 positive, 0 negative,
< 0 unknown; unknown entries are ignored everywhere (not counted as negatives). numpy arrays or torch tensors.

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
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

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


def _check_inputs(scores, targets):
    """Return (scores, targets) as numpy arrays (N, K), or raise an error saying what is wrong, and where."""
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
        scores = scores.astype(np.float64)
    # min and max are NaN if any entry is: two cheap reductions per array instead of masks
    bounds = [(array.min(), array.max()) for array in (scores, targets)]
    for array, extremes, name in zip((scores, targets), bounds, ("scores", "targets"), strict=True):
        if not np.isfinite(extremes).all():
            nan, inf = np.isnan(array), np.isinf(array)
            raise ValueError(f"{name} contains {nan.sum()} NaN and {inf.sum()} infinite value(s), the first "
                             f"at {_first(nan | inf)}; a metric over them would be meaningless")
    # the only bad values left are > 1 or strictly between 0 and 1 (float targets only)
    if bounds[1][1] > 1 or (targets.dtype.kind == "f" and ((targets > 0) & (targets < 1)).any()):
        bad = (targets > 1) | ((targets > 0) & (targets < 1))
        raise ValueError(f"targets must be 1 (positive), 0 (negative) or < 0 (unknown, ignored); found "
                         f"{bad.sum()} other value(s), e.g. {targets[bad][0]} at {_first(bad)} "
                         "(soft CutMix targets are for training, not for evaluation)")
    return scores, targets


def _transposed(x, block=1024):
    """x.T as a new C-contiguous array (so that sorting a row is fast), copied block by block: a plain
    x.T.copy() strides through memory and is about 3x slower at (40504, 80)."""
    out = np.empty(x.shape[::-1], x.dtype)
    for start in range(0, len(x), block):
        out[:, start:start + block] = x[start:start + block].T
    return out


def _precision_at_positives(scores, targets):
    """For each class k, the precision of "score >= s" at the score s of each of its positives.

    Returns a list of K arrays, one precision per positive, ordered from the lowest-scoring positive (recall
    1) to the highest. With P_k positives, precision at s = tp / n where
        tp = number of positives scoring >= s,   n = number of known entries scoring >= s.
    Counting ">= s" puts all entries tied at s on one threshold, as scikit-learn does.
    The work over all N x K entries (transpose, sort) is vectorised; the loop over classes then only does
    binary searches for each class's positives, O(P_k log N) each.
    """
    N, K = scores.shape
    # the positives' scores grouped by class: flat index n*K + k of every positive, sorted by its class
    # k (stored in the smallest integer type, so that numpy's stable sort is a linear-time radix sort)
    flat = np.flatnonzero(targets == 1)  # (M,)
    k_of = (flat % K).astype(np.min_scalar_type(K))
    by_class = scores.ravel()[flat[np.argsort(k_of, kind="stable")]]  # (M,)
    pos_scores = np.split(by_class, np.cumsum(np.bincount(k_of, minlength=K))[:-1])  # K arrays (P_k,)
    ranked = _transposed(scores)  # (K, N)
    if targets.min() < 0:  # unknowns become -inf, below every (finite) score: never counted in n
        ranked[_transposed(targets < 0)] = -np.inf
    ranked.sort(axis=1)  # (K, N) each class's scores, ascending
    precisions = []
    for k, s in enumerate(pos_scores):
        s = np.sort(s)  # (P_k,) ascending
        tp = len(s) - np.searchsorted(s, s)  # positives scoring >= s; tied ones included
        n = N - np.searchsorted(ranked[k], s)  # known entries scoring >= s
        precisions.append(tp / n)
    return precisions


def average_precision(scores, targets):
    """Per-class AP, scikit-learn's definition (non-interpolated): (K,) in [0, 1], NaN for no positives.

        AP = sum_n (R_n - R_{n-1}) P_n      over the distinct scores (thresholds) t_n, from high to low,
    with P_n, R_n the precision and recall of "predict positive when score >= t_n". Recall grows by 1/P
    for each positive, so AP is the mean, over the P positives, of the precision at that positive's score.
    No curve is smoothed: this is the area under the raw precision-recall staircase.
    """
    scores, targets = _check_inputs(scores, targets)
    return np.array([p.mean() if p.size else np.nan for p in _precision_at_positives(scores, targets)])


def voc_average_precision(scores, targets):
    """Per-class VOC all-point interpolated AP: (K,) in [0, 1], NaN for a class without positives.

        AP_VOC = sum_n (R_n - R_{n-1}) max_{m : R_m >= R_n} P_m
    Precision is first made monotone from the right (at each recall, the best precision reachable at that
    recall or beyond), then the area under that envelope is summed. It is never below `average_precision`.
    As in the official code's `voc_ap`; unlike it, tied scores form one threshold (module docstring).
    """
    scores, targets = _check_inputs(scores, targets)
    # positives run from recall 1 down, so "recall >= R_n" means "this positive and those before it";
    # thresholds that add only negatives lower the precision, so the envelope's maxima sit at positives
    return np.array([np.maximum.accumulate(p).mean() if p.size else np.nan
                     for p in _precision_at_positives(scores, targets)])


def mean_average_precision(scores, targets, interpolated=False, class_names=None):
    """mAP in percent over the classes with at least one positive.

    Returns {"mAP": float (percent), "per_class": (K,) percent with NaN for excluded classes,
    "excluded": names (or indices) of the classes without positives, "kind": which AP this is,
    "num_classes": how many classes the mean is over}.
    """
    ap = (voc_average_precision if interpolated else average_precision)(scores, targets)
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
    scores, targets = _check_inputs(scores, targets)
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
    known, positive = targets >= 0, targets == 1
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
    scores, targets = _check_inputs(scores, targets)
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
# Evaluating a checkpoint, prediction and attention maps (issue #7, items 2-5) come here with stage 5:
# they need stage 3's model and the checkpoints 05_train.py writes.
# ---------------------------------------------------------------------------------------------------------


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
    print("Evaluating a checkpoint (`--checkpoint runs/<name>/best.pt`), predicting labels for images and\n"
          "drawing attention maps come with stage 5, once 05_train.py writes checkpoints. Until then:\n"
          "  python 06_eval.py --benchmark   speed and agreement with scikit-learn at COCO val size\n"
          "  python 06_eval.py --figures     the AP-vs-VOC figure and the comparisons of docs/06_eval.md")
    return all(checks)


def benchmark(seed=0, num_images=40504, num_classes=80, rounds=5):
    """Our mAP vs a per-class scikit-learn loop on the same data in the same run; the two are timed in
    alternation (this machine is shared), and we report the best time of each and the median of the
    per-round ratios. Then the other metrics' times."""
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
    print(f"mAP over {num_images} images x {num_classes} classes (COCO 2014 val size); random labels have "
          f"{100 * targets.mean():.1f}% positives. {rounds} alternating rounds; best times, median ratio.")
    for name, (s, y) in cases.items():
        ours_times, loop_times = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            ours = mean_average_precision(s, y)["per_class"] / 100
            ours_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            theirs = np.array([average_precision_score(y[:, k], s[:, k]) for k in range(num_classes)])
            loop_times.append(time.perf_counter() - start)
        ratio = np.median(np.array(loop_times) / np.array(ours_times))
        print(f"  {name}: ours {1000 * min(ours_times):.1f} ms, scikit-learn loop "
              f"{1000 * min(loop_times):.0f} ms -> {ratio:.1f}x faster (target >= 20x); "
              f"largest |AP difference| {np.max(np.abs(ours - theirs)):.1e} (target <= 1e-6)")
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


def build_parser():
    parser = argparse.ArgumentParser(
        description="Stage 6 of Query2Label from scratch: metrics (mAP, CP/CR/CF1, OP/OR/OF1). With no "
                    "arguments, runs the metric self-checks. Checkpoint evaluation, prediction and attention "
                    "maps come with stage 5.")
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
    args = build_parser().parse_args(argv)
    if args.benchmark:
        benchmark(args.seed)
    elif args.figures:
        compare_and_plot(args.figure_dir, args.seed)
    else:
        return 0 if self_check(args.seed) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
