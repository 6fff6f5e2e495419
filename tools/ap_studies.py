"""The measurements behind docs/06_eval.md: AP vs VOC AP, ties, and a metric that is not COCO mAP.

    python tools/ap_studies.py                       # prints the comparisons, writes docs/figures/06_ap_vs_voc.png
    python tools/ap_studies.py --images 5000 --figure-dir /tmp   # smaller and elsewhere

1. mAP with scikit-learn's AP vs VOC interpolated AP on random scores and on `simulated_model_scores`
   (made-up scores shaped like a trained model's on COCO val, not a real model), at 500, 5,000 and all images.
2. VOC AP with ties as one threshold (stage 6) vs ties ranked by image index (one order the official
   code's unstable np.argsort can return), on scores rounded to 2 decimals.
3. Per-class mAP vs `per_batch_retrieval_ap`, the flattened per-batch retrieval AP behind a popular
   re-implementation's "90.4 mAP" (curt-tigges/query2label): NOT a COCO metric.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages live one folder up

import argparse  # noqa: E402
import importlib  # noqa: E402

import numpy as np  # noqa: E402

evaluation = importlib.import_module("06_eval")  # module names may not start with a digit


def simulated_model_scores(num_images=40504, num_classes=80, seed=0):
    """Scores shaped like a trained model's on COCO val (not a real model): class 0 on 45% of the images
    (like COCO's "person"), the others on 0.5-10% (log-uniform; ~3.1 labels per image), and per-class
    logits N(0, 1) - 3 for negatives, shifted up by a separation of 2-5 for positives."""
    rng = np.random.default_rng(seed)
    prevalence = np.exp(rng.uniform(np.log(0.005), np.log(0.10), num_classes))
    prevalence[0] = 0.45
    targets = rng.random((num_images, num_classes)) < prevalence  # (N, K)
    separation = rng.uniform(2.0, 5.0, num_classes)
    logits = rng.normal(size=targets.shape) - 3.0 + np.where(targets, separation, 0.0)
    return (1 / (1 + np.exp(-logits))).astype(np.float32), targets.astype(np.float32)


def voc_ap_ties_in_order(scores, targets):
    """VOC AP with every entry its own threshold, ties ranked by image index: the official code's
    `voc_mAP` when its unstable np.argsort happens to keep tied entries in image order."""
    order = np.argsort(-scores, axis=0, kind="stable")  # (N, K)
    hit = np.take_along_axis(targets, order, axis=0) == 1
    precision = np.cumsum(hit, axis=0) / np.arange(1, len(scores) + 1)[:, None]
    envelope = np.maximum.accumulate(precision[::-1], axis=0)[::-1]
    return (envelope * hit).sum(axis=0) / hit.sum(axis=0)


def per_batch_retrieval_ap(scores, targets, batch_size=24):
    """NOT COCO mAP. Retrieval AP over each batch's B*K (image, class) pairs flattened into one ranking,
    averaged over batches weighted by their size: torchmetrics' retrieval_average_precision per validation
    batch, averaged over the epoch, as in curt-tigges/query2label."""
    scores, targets = evaluation.check_inputs(scores, targets)
    values, weights = [], []
    for start in range(0, len(scores), batch_size):
        s = scores[start:start + batch_size].ravel()  # (B*K,) one ranking of all pairs in the batch
        y = targets[start:start + batch_size].ravel()[np.argsort(-s, kind="stable")] == 1
        hits = np.cumsum(y)[y]  # 1, 2, 3, ... at the rank of each relevant pair
        values.append((hits / (np.flatnonzero(y) + 1)).mean() if y.any() else 0.0)
        weights.append(len(s) // scores.shape[1])  # Lightning's epoch mean weights batches by size
    return float(100 * np.average(values, weights=weights))


def compare_and_plot(out_dir="docs/figures", seed=0, num_images=40504):
    """Print the three comparisons; write out_dir/06_ap_vs_voc.png. Returns the figure's path."""
    from matplotlib.figure import Figure

    rng = np.random.default_rng(seed)
    model_scores, model_targets = simulated_model_scores(num_images, seed=seed)
    random_scores = rng.random(model_scores.shape, dtype=np.float32)
    random_targets = (rng.random(model_scores.shape) < 0.036).astype(np.float32)
    sizes = sorted({min(n, num_images) for n in (500, 5000, num_images)})
    mean_ap = evaluation.mean_average_precision
    print("1. AP (scikit-learn definition) vs VOC interpolated AP, mAP in points (interpolated - not)")
    for name, s, y in (("random scores", random_scores, random_targets),
                       ("simulated model", model_scores, model_targets)):
        for n in sizes:
            plain, voc = mean_ap(s[:n], y[:n])["mAP"], mean_ap(s[:n], y[:n], interpolated=True)["mAP"]
            print(f"  {name:16s} {n:6d} images: {plain:6.2f} vs {voc:6.2f}  (+{voc - plain:.2f})")
    tied = model_scores.round(2)
    ours, in_order = evaluation.voc_average_precision(tied, model_targets), voc_ap_ties_in_order(tied, model_targets)
    print("2. VOC AP on the simulated model's scores rounded to 2 decimals: ties as one threshold (ours) vs\n"
          f"   ties ranked by image index (official code): mAP {100 * np.nanmean(ours):.2f} vs "
          f"{100 * np.nanmean(in_order):.2f}, largest per-class difference "
          f"{100 * np.nanmax(np.abs(ours - in_order)):.2f}")
    print("3. Per-class mAP vs flattened per-batch retrieval AP (curt-tigges' '90.4'), simulated model")
    print(f"  per class: {evaluation.format_metrics(mean_ap(model_scores, model_targets))}")
    for batch_size in (8, 24, 64, 256, len(model_scores)):
        print(f"  flattened retrieval AP, batch {batch_size:5d}: "
              f"{per_batch_retrieval_ap(model_scores, model_targets, batch_size):.2f}")
    # the figure: one class's precision-recall curve, the area each AP sums, and the per-class gaps
    first = model_targets[:2000]
    k = int(np.argmin(np.abs(first.sum(0) - 25)))  # a class with ~25 positives in the first 2000 images
    s, y = model_scores[:2000, k], first[:, k]
    hits = np.cumsum(y[np.argsort(-s, kind="stable")])  # positives among the top 1, 2, ... images
    precision, recall = hits / np.arange(1, len(s) + 1), hits / hits[-1]
    at_positive = precision[np.flatnonzero(np.diff(hits, prepend=0))]  # P_n where recall steps up
    envelope = np.maximum.accumulate(at_positive[::-1])[::-1]
    steps = np.arange(len(at_positive) + 1) / len(at_positive)  # recall 0, 1/P, ..., 1
    ap = evaluation.average_precision(s[:, None], y[:, None])[0]
    voc = evaluation.voc_average_precision(s[:, None], y[:, None])[0]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(recall, precision, color="0.75", lw=0.8, label="precision after each image")
    left.stairs(at_positive, steps, color="tab:blue", lw=1.5, label=f"area summed by AP: {100 * ap:.1f}")
    left.stairs(envelope, steps, baseline=at_positive, fill=True, color="tab:orange", alpha=0.35)
    left.stairs(envelope, steps, color="tab:orange", lw=1.5,
                label=f"interpolated, monotone from the right: VOC AP {100 * voc:.1f}")
    left.set(xlabel="recall", ylabel="precision", ylim=(0, 1.02),
             title=f"one class of the simulated model, {len(at_positive)} positives in 2000 images")
    left.legend(loc="lower left", fontsize=8)
    for n, marker in zip(sizes, "os^", strict=False):
        gap = 100 * (evaluation.voc_average_precision(model_scores[:n], model_targets[:n])
                     - evaluation.average_precision(model_scores[:n], model_targets[:n]))
        right.scatter(model_targets[:n].sum(0), gap, s=14, marker=marker,
                      label=f"{n} images: mAP gap +{np.nanmean(gap):.2f}")
    right.set(xscale="log", xlabel="positives of the class", ylabel="VOC AP - AP (points)",
              title="interpolation gap per class, simulated model")
    right.legend(fontsize=8)
    path = Path(out_dir) / "06_ap_vs_voc.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ap_studies.py", allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--figure-dir", default="docs/figures", help="where 06_ap_vs_voc.png goes "
                                                                     "(default: docs/figures)")
    parser.add_argument("--images", type=int, default=40504, help="images of the simulated sets "
                                                                  "(default: 40504, COCO 2014 val)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the made-up data (default: 0)")
    args = parser.parse_args(argv)
    if args.images < 2000:
        parser.exit(2, f"{parser.prog}: error: --images must be >= 2000 (the figure's class), got {args.images}\n")
    compare_and_plot(args.figure_dir, args.seed, args.images)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
