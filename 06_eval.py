"""Stage 6: scoring Query2Label: the metrics of the paper's COCO table (Sec. 4.1), checkpoint evaluation,
labels for image files, and attention maps (the paper's visualisations, Sec. 4.5).

    AP     = sum_n (R_n - R_{n-1}) P_n   over one class's distinct scores t_n, high to low; P_n, R_n: precision
             and recall of "positive when score >= t_n" (scikit-learn's definition); mAP: mean over classes
    AP_VOC = sum_n (R_n - R_{n-1}) max_{m: R_m >= R_n} P_m        (what the official code reports)
    CP = mean_c Nc/Np   CR = mean_c Nc/Ng   CF1 = 2 CP CR / (CP + CR);   OP, OR, OF1: the same, pooled

    python 06_eval.py [--checkpoint runs/demo/best.pt]  # self-check; [evaluate on the checkpoint's validation set]
    python 06_eval.py --checkpoint runs/demo/best.pt --image photos/ --output preds.jsonl  # label images
    python 06_eval.py --checkpoint runs/demo/best.pt --image a.jpg --attention a_attention.png  # and its maps
Tools: tools/ap_studies.py, tools/bench_ap.py, tools/official.py. Shapes: N images, K classes, H x W feature map;
scores (N, K): reals (AP) or probabilities; targets (N, K): 1, 0, < 0 = unknown (ignored); attention (K, H, W).
Deviations: from scikit-learn, a class without positives gets AP NaN (not 0) and is left out of mAP, by name. From
the official voc_mAP: ties are one threshold (it ranks them in np.argsort's arbitrary order), unknown targets are
ignored (it counts them negative), classes without positives excluded (it gives NaN). From ML-GCN's CP/CR (the
paper's table): the same two exclusions; as there, a class never predicted has precision 0, CF1 comes from the
averaged CP and CR, a score equal to the threshold counts, and top-k labels must also reach it.
"""

import argparse
import contextlib
import csv
import dataclasses
import importlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

data = importlib.import_module("01_data")  # module names may not start with a digit
backbone = importlib.import_module("02_backbone")
transformer = importlib.import_module("03_transformer")

AP_KIND = "AP (non-interpolated, scikit-learn definition)"
VOC_KIND = "VOC all-point interpolated AP"
CHECKPOINT_FORMAT = "q2l-checkpoint-v2"  # 05_train.py writes it; load_checkpoint checks it


def average_precision(scores, targets, interpolated=False):
    """Per-class AP (K,) in [0, 1], NaN for a class without positives; VOC AP when `interpolated`.
    Recall grows by 1/P at each of a class's P positives, so AP = the mean, over the positives, of the
    precision at that positive's score s:  P(s) = tp(s) / n(s),  tp = positives scoring >= s, n = known
    entries scoring >= s. Counting ">= s" makes all entries tied at s one threshold, as scikit-learn."""
    scores, targets = check_inputs(scores, targets)
    N, K = scores.shape
    scores = np.where(targets >= 0, scores, -np.inf)  # unknown entries sink below every threshold
    by_class, positive = (torch.from_numpy(x).T.contiguous().numpy() for x in (scores, targets == 1))  # (K, N), fast copy
    ranked = np.sort(by_class, axis=1)  # (K, N) each class's scores, ascending
    ap = np.full(K, np.nan)
    for k in range(K):
        s = np.sort(by_class[k, positive[k]])  # (P,) the positives' scores, ascending: recall 1 first
        if s.size == 0:
            continue  # no positives: AP undefined
        tp = s.size - np.searchsorted(s, s, side="left")  # (P,) positives scoring >= s (ties included)
        n = N - np.searchsorted(ranked[k], s, side="left")  # (P,) known entries scoring >= s
        precision = tp / n  # (P,) P_n at each positive, from recall 1 up to the top-scored positive
        if interpolated:  # VOC: the best precision at this recall or beyond, i.e. at this score or below
            precision = np.maximum.accumulate(precision)
        ap[k] = precision.mean()
    return ap


def voc_average_precision(scores, targets):
    """Per-class VOC all-point interpolated AP (K,): `average_precision` with the envelope. Never below AP."""
    return average_precision(scores, targets, interpolated=True)


def mean_average_precision(scores, targets, interpolated=False, class_names=None):
    """{"mAP": percent, "per_class": (K,) percent (NaN = excluded), "excluded": names (or indices) of the
    classes without positives, "kind": which AP, "num_classes": how many classes the mean is over}."""
    ap = average_precision(scores, targets, interpolated)
    if class_names is not None and len(class_names) != ap.size:
        raise ValueError(f"class_names has {len(class_names)} names but scores have {ap.size} classes")
    names, has_pos = list(range(ap.size)) if class_names is None else list(class_names), ~np.isnan(ap)
    if not has_pos.any():
        raise ValueError("no class has a positive target, so mAP is undefined (targets: 1, 0 or < 0)")
    return {"mAP": float(100 * ap[has_pos].mean()), "per_class": 100 * ap, "excluded": [names[k] for k in
            np.flatnonzero(~has_pos)], "kind": VOC_KIND if interpolated else AP_KIND, "num_classes": int(has_pos.sum())}


def threshold_metrics(scores, targets, threshold=0.5, top_k=None):
    """CP, CR, CF1 (per class, then averaged) and OP, OR, OF1 (pooled), in percent, for the labels whose
    probability is >= threshold (with top_k: and among the image's top_k; ties go to the lower index)."""
    scores, targets = check_inputs(scores, targets)
    if not (0 <= threshold <= 1 and 0 <= scores.min() and scores.max() <= 1):
        raise ValueError(f"threshold {threshold} and scores must be probabilities in [0, 1] (torch.sigmoid of logits)")
    predicted, kind = scores >= threshold, f"score >= {threshold}"  # (N, K)
    if top_k is not None:
        if not (isinstance(top_k, (int, np.integer)) and 1 <= top_k <= scores.shape[1]):
            raise ValueError(f"top_k must be an integer in [1, {scores.shape[1]}], got {top_k!r}")
        rank = np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1)  # (N, K) 0 = most probable
        predicted, kind = predicted & (rank < top_k), f"top-{top_k} and {kind}"  # ties: lower index first
    n_correct = (predicted & (targets == 1)).sum(axis=0)  # (K,) Nc
    n_predicted = (predicted & (targets >= 0)).sum(axis=0)  # (K,) Np; unknown entries not counted
    n_positive = (targets == 1).sum(axis=0)  # (K,) Ng
    if not (has_pos := n_positive > 0).any():
        raise ValueError("no class has a positive target; recall is undefined")
    precision = n_correct / np.maximum(n_predicted, 1)  # (K,) 0 when never predicted, as ML-GCN
    recall = n_correct / np.maximum(n_positive, 1)  # (K,)
    cp, cr = precision[has_pos].mean(), recall[has_pos].mean()
    op, orr = n_correct.sum() / max(n_predicted.sum(), 1), n_correct.sum() / n_positive.sum()
    out = {"CP": cp, "CR": cr, "CF1": 2 * cp * cr / (cp + cr) if cp + cr else 0.0,  # F1 of the means
           "OP": op, "OR": orr, "OF1": 2 * op * orr / (op + orr) if op + orr else 0.0}
    return {**{key: float(100 * value) for key, value in out.items()}, "kind": kind, "excluded": [int(k) for k in
            np.flatnonzero(~has_pos)], "per_class_precision": 100 * precision, "per_class_recall": 100 * recall}


def score_dataset(scores, targets, class_names, threshold=0.5):
    """Every metric of this stage on one validation set's (N, K) probabilities and targets (top-k: top-3)."""
    return {"ap": mean_average_precision(scores, targets, class_names=class_names),
            "voc": mean_average_precision(scores, targets, interpolated=True, class_names=class_names),
            "at_threshold": threshold_metrics(scores, targets, threshold),
            "top_k": threshold_metrics(scores, targets, threshold, top_k=min(3, scores.shape[1]))}


def format_metrics(result):
    """One line for a result of `mean_average_precision` or `threshold_metrics`, its definition included."""
    if "mAP" in result:
        excluded = f", excluded (no positives): {result['excluded']}" if result["excluded"] else ""
        return f"mAP {result['mAP']:.2f} [{result['kind']}, {result['num_classes']} classes{excluded}]"
    return "  ".join(f"{key} {result[key]:.2f}" for key in "CP CR CF1 OP OR OF1".split()) + f"  [{result['kind']}]"


def check_inputs(scores, targets):
    """scores and targets as numpy (N, K) float arrays, or one ValueError saying what is wrong and where."""
    scores, targets = (np.asarray(x.detach().cpu().float() if isinstance(x, torch.Tensor) and x.dtype != torch.float64
                                  else x) for x in (scores, targets))  # numpy has no bfloat16: as float32, exactly
    scores, targets = (x if x.dtype in (np.float32, np.float64) else x.astype(np.float64) for x in (scores, targets))
    if scores.ndim != 2 or scores.shape != targets.shape or scores.size == 0:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must both be (N images, K classes), N, K >= 1")
    for name, x, bad, valid in (("scores", scores, ~np.isfinite(scores), "finite numbers"), ("targets", targets,
                                ~((targets == 1) | (targets <= 0)), "1 (positive), 0 (negative) or < 0 (unknown)")):
        if bad.any():
            n, k = np.argwhere(bad)[0]
            raise ValueError(f"{name} must be {valid}; found {bad.sum()} other value(s), e.g. {x[n, k]} at image {n}, "
                             f"class {k}")
    return scores, targets


class CheckpointError(ValueError):
    """A checkpoint that cannot be evaluated; the message names the file and what is wrong."""


def load_checkpoint(path, trusted=False):
    """A checkpoint dict written by 05_train.py, checked: its format and the keys evaluation needs."""
    checkpoint = backbone.load_torch_file(path, "checkpoint", trusted)
    if (found := checkpoint.get("format") if isinstance(checkpoint, dict) else None) != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} checkpoint of 05_train.py (" + (
            f"format {found!r}: another version's)" if found else "official files: tools/official.py)"))
    missing = [key for key in ("model", "model_config", "class_names") if key not in checkpoint]
    unknown = sorted(set(checkpoint.get("model_config", {})) - set(transformer.Q2LConfig.__dataclass_fields__))
    if missing or unknown:
        raise CheckpointError(f"checkpoint {path}: " + (f"no {missing}; is it complete?" if missing else
                              f"model_config fields 03_transformer.Q2LConfig does not know: {unknown}"))
    return checkpoint


def load_for_eval(path, device="cpu", use_ema=False, trusted=False):
    """(model in eval mode, checkpoint) with the "model" weights (best.pt: raw or EMA; last.pt: raw) or "ema"."""
    checkpoint = load_checkpoint(path, trusted)
    config = dataclasses.replace(transformer.Q2LConfig(**checkpoint["model_config"]), pretrained=False, weights=None)
    if use_ema and not checkpoint.get("ema"):
        raise CheckpointError(f"checkpoint {path} holds no EMA weights (only last.pt does)")
    if len(checkpoint["class_names"]) != config.num_classes:
        raise CheckpointError(f"checkpoint {path}: {len(checkpoint['class_names'])} names, {config.num_classes} classes")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # stage 2's "random init" notice would mislead
            model = transformer.Query2Label(config)
        model.load_state_dict(checkpoint["ema"] if use_ema else checkpoint["model"])
    except (RuntimeError, ValueError) as error:  # unknown backbone; missing, unexpected, mis-shaped keys
        raise CheckpointError(f"checkpoint {path}: its weights and model_config do not make a model: "
                              + " ".join(str(error).split())) from None
    return model.to(device).eval(), checkpoint


@torch.no_grad()
def predict_scores(model, loader, device, amp_dtype=None, channels_last=False, desc="eval", show=True, criterion=None):
    """Sigmoid scores (N, K) float32, targets (N, K) of `loader` in eval mode (left so), autocast; + criterion's mean."""
    model, device, scores, targets, losses = model.eval(), torch.device(device), [], [], []
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, target in tqdm(loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True):
        images = images.to(device, non_blocking=True, memory_format=memory_format)  # (B, 3, S, S)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            scores.append(torch.sigmoid(logits := model(images).float()).cpu())  # (B, K)
        targets.append(target)
        losses += [] if criterion is None else [float(criterion(logits, target.to(device)))]
    if not scores:
        raise ValueError(f"the loader yielded no images (dataset of {len(loader.dataset)}): nothing to score")
    return torch.cat(scores).numpy(), torch.cat(targets).numpy(), *([sum(losses) / len(losses)] if losses else [])


def amp_dtype_for(choice, device):
    """auto: bfloat16 on a CUDA device that has it, else float16 on CUDA, float32 (None) on the CPU."""
    auto = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if torch.device(device).type == "cuda" else None
    return {"auto": auto, "bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[choice]


def evaluate(model, dataset, class_names, device, batch_size=32, workers=2, amp_dtype=None, threshold=0.5,
             out_dir=None, show=True, info=None):
    """Score `dataset`, print the metrics and a per-class table, write out_dir/metrics.json (`info` added) if given.
    Returns (metrics, record, scores, targets)."""
    device, start = torch.device(device), time.perf_counter()
    loader = data.build_loader(dataset, batch_size, train=False, workers=workers, pin_memory=device.type == "cuda")
    scores, targets = predict_scores(model, loader, device, amp_dtype, device.type == "cuda", "eval", show)
    seconds, images = time.perf_counter() - start, len(scores) - dataset.bad_count
    metrics = score_dataset(scores, targets, class_names, threshold)
    ap, voc, at = metrics["ap"], metrics["voc"], metrics["at_threshold"]
    print(f"{images} images scored in {seconds:.1f} s" + f"; {dataset.bad_count} undecodable file(s) left out" * bool(
        dataset.bad_count), format_metrics(ap), f"VOC mAP {voc['mAP']:.2f} [{voc['kind']}]", format_metrics(at),
        format_metrics(metrics["top_k"]), sep="\n  ")
    rows = [{"name": str(name), "AP": ap["per_class"][k], "VOC_AP": voc["per_class"][k],
             "positives": int((targets[:, k] == 1).sum()), "precision": at["per_class_precision"][k],
             "recall": at["per_class_recall"][k]} for k, name in enumerate(class_names)]
    ranked = sorted(rows, key=lambda row: -np.nan_to_num(row["AP"], nan=-1))  # best first, no positives last
    w = max(12, *(len(row["name"]) for row in rows))
    print(f"\n  {'class':<{w}}  {'AP':>6}  {'VOC AP':>6}  {'positives':>9}  {'P':>6}  {'R':>6}", *(
        f"  {r['name']:<{w}}  {r['AP']:6.2f}  {r['VOC_AP']:6.2f}  {r['positives']:9d}  {r['precision']:6.2f}  "
        f"{r['recall']:6.2f}" for r in ranked), sep="\n")
    record = {**(info or {}), "mAP": ap["mAP"], "mAP_kind": ap["kind"], "mAP_voc": voc["mAP"],
              "mAP_voc_kind": voc["kind"], "excluded": [str(name) for name in ap["excluded"]], "images": images,
              "undecodable_images": int(dataset.bad_count), "seconds": round(seconds, 3), **{key: {m: metrics[key][m]
              for m in "CP CR CF1 OP OR OF1 kind".split()} for key in ("at_threshold", "top_k")}, "per_class": [
              {key: None if isinstance(v, float) and np.isnan(v) else v for key, v in row.items()} for row in rows]}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(record, indent=1, default=float))
        print(f"wrote {Path(out_dir) / 'metrics.json'}")
    return metrics, record, scores, targets


def find_images(path, suffixes=(".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")):
    """[path] for a file (whatever its suffix), or the image files of a folder (by suffix, sorted)."""
    path = Path(path)
    if not (files := [path] if path.is_file() else sorted(p for p in path.glob("*") if p.suffix.lower() in suffixes)):
        raise FileNotFoundError(f"--image {path}: no such file, nor a folder of {'/'.join(suffixes)} files")
    return files


@torch.inference_mode()
def predict_images(model, paths, transform, class_names, threshold=0.5, top_k=3, device="cpu", amp_dtype=None):
    """Per image file, in order: labels >= threshold and the top_k, most probable first, or its decoding error."""
    model.eval()
    rows = []
    for path in map(Path, paths):
        row = {"image": str(path), "labels": [], "scores": [], "top_k_labels": [], "top_k_scores": [], "error": None}
        try:
            image = transform(data.load_image(path))[None].to(device)  # (1, 3, S, S); grey, CMYK, EXIF handled
        except data.CorruptImageError as error:
            rows.append({**row, "error": str(error)})
            continue
        with torch.autocast(torch.device(device).type, dtype=amp_dtype, enabled=amp_dtype is not None):
            scores = torch.sigmoid(model(image).float())[0].cpu().numpy()  # (K,)
        order = np.argsort(-scores, kind="stable")
        for key, chosen in (("", [k for k in order if scores[k] >= threshold]), ("top_k_", order[:top_k])):
            row.update({key + "labels": [class_names[k] for k in chosen],
                        key + "scores": [round(float(scores[k]), 6) for k in chosen]})
        rows.append(row)
    return rows


@torch.inference_mode()
def attention_maps(model, image, transform, device="cpu"):
    """(probabilities (K,), attention (K, H, W)) of a PIL image: last decoder layer, heads averaged (stage 3)."""
    model.eval()
    logits, attention = model(transform(image)[None].to(device), return_attention=True)  # (1, K), (1, K, H, W)
    return torch.sigmoid(logits.float())[0].cpu().numpy(), attention[0].float().cpu()


def draw_attention(image, scores, attention, class_names, path=None, labels=3, truth=None, threshold=0.5):
    """The image with true (`truth`: indices, None = unknown) and predicted labels, then the H x W map of each class
    in `labels` (int k: top k and true ones) on its cell grid. With `path`: writes it, returns [(name, probability,
    "right"/"wrong" if predicted, "missed"/"absent" if not, or None)]; without: the uint8 array (height, width, 3)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    H, W = attention.shape[1:]
    if isinstance(labels, int):  # the top k and the true labels, most probable first
        labels = sorted({*np.argsort(-scores, kind="stable")[:labels].tolist(), *(truth or ())}, key=lambda k: -scores[k])
    verdict = {k: None if truth is None else ("right", "wrong", "missed", "absent")[  # predicted?, true?
        2 * int(scores[k] < threshold) + int(k not in truth)] for k in range(len(scores))}
    fig = Figure(figsize=(3.2 * len(labels) + 4.2, 3.2 * image.height / image.width + 1), layout="constrained")
    axes = fig.subplots(1, 1 + len(labels), squeeze=False)[0]
    predicted = [f"{class_names[k]} {scores[k]:.2f}" + {"right": " ✓", "wrong": " ✗"}.get(verdict[k], "")
                 for k in np.argsort(-scores, kind="stable") if scores[k] >= threshold]
    true = "unknown" if truth is None else ", ".join(class_names[k] for k in sorted(truth)) or "none"
    axes[0].imshow(image)
    axes[0].set_axis_off()
    axes[0].set_title(f"true: {true}\npredicted: {', '.join(predicted) or 'none'}", fontsize=8, wrap=True)
    for ax, k in zip(axes[1:], labels, strict=True):
        ax.imshow(image.convert("L"), cmap="gray", extent=(0, W, H, 0))  # squashed to the grid, as the model saw it
        heat = ax.imshow(attention[k].numpy(), cmap="jet", alpha=0.5, vmin=0, extent=(0, W, H, 0),
                         vmax=float(attention[list(labels)].max()))  # one scale: panels compare
        ax.set(xticks=range(W + 1), yticks=range(H + 1), xticklabels=[], yticklabels=[])
        ax.tick_params(length=0)
        ax.grid(color="white", lw=0.5)  # one cell per feature-map position
        ax.set_title(f"{class_names[k]} {scores[k]:.2f}" + (f" ({verdict[k]})" if verdict[k] else ""), fontsize=9)
    fig.colorbar(heat, ax=list(axes[1:]), shrink=0.8, label=f"attention weight ({H}x{W} cells)")
    if path is None:
        (canvas := FigureCanvasAgg(fig)).draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # (height, width, 3) uint8
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return [(class_names[k], float(scores[k]), verdict[k]) for k in labels]


def attention_panel(model, dataset, indices, class_names, device="cpu"):
    """`draw_attention` of a stage-1 dataset's images `indices`, stacked: uint8 (3, height, width) for add_image."""
    figures = []  # the model is left in eval mode, as by predict_scores
    for i in indices:
        image, truth = data.load_image(dataset.image_paths[i]), set(np.flatnonzero(dataset.labels[i] == 1).tolist())
        scores, attention = attention_maps(model, image, dataset.transform, device)
        figures.append(draw_attention(image, scores, attention, class_names, truth=truth))
    width = max(f.shape[1] for f in figures)  # a figure with fewer maps is narrower: pad it on the right
    panel = np.concatenate([np.pad(f, ((0, 0), (0, width - f.shape[1]), (0, 0)), constant_values=255) for f in figures])
    return torch.from_numpy(panel).permute(2, 0, 1).contiguous()  # (height, width, 3) -> (3, height, width)


def run(args):
    """Evaluate --checkpoint on its validation set, or label --image; returns its results and exit "code"."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, checkpoint = load_for_eval(args.checkpoint, device, args.use_ema, args.trusted)
    saved, names, amp_dtype = checkpoint.get("data") or {}, list(checkpoint["class_names"]), amp_dtype_for(args.amp, device)
    transform = data.build_transforms(img_size := args.img_size or saved.get("img_size"), train=False)
    weights = "ema (--use-ema)" if args.use_ema else checkpoint.get("weights_source", "raw")
    print(f"checkpoint {args.checkpoint}: epoch {checkpoint.get('epoch')}, {weights} weights, "
          f"{model.config.backbone} d {model.config.d_model}, {len(names)} classes, {img_size} px")
    if args.image:  # label image files: print them, --output them, --attention: draw one image's maps
        ann = args.val_ann or saved.get("val_ann")  # for the true labels
        if len(paths := find_images(args.image)) != 1 and args.attention:
            raise ValueError(f"--attention draws one image; --image {args.image} holds {len(paths)}")
        rows = predict_images(model, paths, transform, names, args.threshold, args.top_k, device, amp_dtype)
        for row in rows:
            labels = ", ".join(f"{n} {p:.3f}" for n, p in zip(row["labels"], row["scores"], strict=True))
            print(f"{row['image']}: " + (f"SKIPPED, {row['error']}" if row["error"] else labels or
                  f"nothing >= {args.threshold} (top: {row['top_k_labels'][0]} {row['top_k_scores'][0]:.3f})"))
        if args.output:  # JSON lines, or CSV with lists joined by ';' and an empty error for a decoded image
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            with open(args.output, "w", newline="") as f:
                if Path(args.output).suffix.lower() != ".csv":
                    f.writelines(json.dumps(row) + "\n" for row in rows)
                else:
                    (writer := csv.DictWriter(f, rows[0])).writeheader()  # None (no error) is written as ""
                    writer.writerows({k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
        labelled = sum(row["error"] is None for row in rows)
        print(f"{labelled} image(s) labelled, {len(rows) - labelled} not decodable"
              + f", written to {args.output}" * bool(args.output))
        if not labelled:
            print(f"error: none of the {len(paths)} image file(s) could be decoded", file=sys.stderr)
        if not (labelled and args.attention):
            return {"rows": rows, "attention": None, "code": 0 if labelled else 1}
        truth, coco = None, json.loads(Path(ann).read_text()) if ann and Path(ann).is_file() else {"images": []}
        if ids := [i["id"] for i in coco["images"] if Path(i["file_name"]).name == paths[0].name]:  # listed: true labels
            category = {c["id"]: c["name"] for c in coco["categories"]}
            truth = {names.index(category[a["category_id"]]) for a in coco["annotations"]
                     if a["image_id"] == ids[0] and category.get(a["category_id"]) in names}
        scores, attention = attention_maps(model, image := data.load_image(paths[0]), transform, device)
        drawn = draw_attention(image, scores, attention, names, args.attention, args.top_k, truth, args.threshold)
        print(f"wrote {args.attention} ({attention.shape[1]}x{attention.shape[2]} cells; true labels from {ann}): "
              + ", ".join(f"{n} {p:.2f}" + (f" {v}" if v else "") for n, p, v in drawn))
        return {"rows": rows, "attention": drawn, "code": 0}
    for flag, given, recorded in (("--val-images", args.val_images, saved.get("val_images")),
                                  ("--val-ann", args.val_ann, saved.get("val_ann"))):
        if not (given or recorded and Path(recorded).exists()):  # never regenerated behind the user's back
            redo = (", or regenerate the built-in set: python tools/make_synthetic.py --root "
                    f"{Path(saved['val_images']).parent}") if saved.get("kind") == "synthetic" else ""
            raise FileNotFoundError(f"validation data {recorded} (from the checkpoint) does not exist: pass {flag}{redo}")
    val_images, val_ann = Path(args.val_images or saved["val_images"]), Path(args.val_ann or saved["val_ann"])
    dataset = data.CocoMultiLabel(val_images, val_ann, transform, drop_empty=bool(saved.get("drop_empty")),
                                  substitute=False)  # an undecodable image is left out, not replaced
    if list(dataset.class_names) != names:
        raise CheckpointError(f"{val_ann} has the classes {list(dataset.class_names)[:4]}..., the checkpoint {names[:4]}...")
    if saved.get("val_ann_fingerprint") not in (None, data.file_fingerprint(val_ann)) and not args.val_ann:
        print(f"warning: {val_ann} changed since training: the mAP recorded in the checkpoint is not comparable")
    out_dir = Path(args.out_dir or Path(args.checkpoint).parent / ("eval" if (stem := Path(args.checkpoint).stem)
                   == "best" and not args.use_ema else f"eval-{stem}" + "-ema" * args.use_ema))
    info = {"checkpoint": str(args.checkpoint), "weights": weights, "epoch": checkpoint.get("epoch"),
            "best_map_recorded": checkpoint.get("best_map"), "val_ann": str(val_ann), "img_size": img_size}
    batch_size = args.batch_size or (checkpoint.get("config") or {}).get("batch_size") or 32
    metrics, record, _, _ = evaluate(model, dataset, names, device, batch_size, args.workers, amp_dtype,
                                     args.threshold, out_dir, info=info)
    return {"metrics": metrics, "record": record, "out_dir": out_dir, "code": 0}


def build_parser():
    parser = argparse.ArgumentParser(prog="06_eval.py", allow_abbrev=False, description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--checkpoint", help="best.pt or last.pt of 05_train.py (default: none: self-check)")  # * what, on what
    add("--use-ema", action="store_true", help="last.pt's EMA weights (default: off)")
    add("--trusted", action="store_true", help="allow pickled Python objects in it: runs code (default: off)")
    add("--val-images", help="validation image folder (default: the checkpoint's)")
    add("--val-ann", help="its COCO-format JSON, also the true labels for --attention (default: the checkpoint's)")
    add("--img-size", type=int, help="input size (default: the checkpoint's)")
    add("--image", help="an image file or folder: label it instead of evaluating (default: none)")  # * prediction
    add("--output", help="with --image: write the labels to a .jsonl or .csv file (default: none)")
    add("--attention", metavar="OUT.png", help="with --image FILE: its top-k and true labels' maps (default: none)")
    add("--top-k", type=int, default=3, help="labels in --output's top-k and in --attention (default: 3)")
    add("--threshold", type=float, default=0.5, help="probability from which a label counts (default: 0.5)")
    add("--batch-size", type=int, help="default: the checkpoint's training batch size, else 32")  # * running
    add("--workers", type=int, default=2, help="DataLoader processes (default: 2)")
    add("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    add("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="auto: bf16/fp16 on CUDA (default: auto)")
    add("--out-dir", help="for metrics.json (default: eval/ next to best.pt, else eval-<name>[-ema]/)")
    return parser


def main(argv=None):
    args = (parser := build_parser()).parse_args(argv)
    for message, bad in ((f"--top-k must be >= 1, got {args.top_k}", args.top_k < 1),
                         (f"--threshold must be in [0, 1], got {args.threshold}", not 0 <= args.threshold <= 1),
                         (f"--batch-size must be >= 1, got {args.batch_size}", (args.batch_size or 1) < 1),
                         ("--output and --attention need --image", (args.output or args.attention) and not args.image),
                         ("--image needs --checkpoint", args.image and not args.checkpoint)):
        if bad:
            parser.exit(2, f"{parser.prog}: error: {message}\n")
    try:
        return run(args)["code"] if args.checkpoint else 0 if self_check() else 1
    except (OSError, ValueError) as error:  # ours name the file or flag and what to do: no traceback
        parser.exit(2, f"{parser.prog}: error: {error}\n")


EXAMPLE_SCORES = [[0.90, 0.80, 0.30, 0.60, 0.10], [0.80, 0.40, 0.70, 0.20, 0.30],
                  [0.55, 0.60, 0.60, 0.90, 0.20], [0.70, 0.20, 0.60, 0.40, 0.45]]
EXAMPLE_TARGETS = [[1, 0, 1, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [1, 0, 0, 1, 1]]
EXAMPLE = {"AP": [1, 7 / 12, 5 / 12, 5 / 6, 1], "VOC AP": [1, 2 / 3, 1 / 2, 5 / 6, 1],  # by hand, in the docs
           "CP CR CF1 OP OR OF1 at 0.5": [5 / 12, 1 / 2, 5 / 11, 6 / 11, 6 / 10, 4 / 7],
           "CP CR CF1 OP OR OF1 top-3": [7 / 15, 1 / 2, 14 / 29, 6 / 10, 6 / 10, 6 / 10]}


def self_check():
    """Every metric on the worked example against its hand-computed values (tolerance 1e-12)."""
    start, s, y, keys = time.perf_counter(), np.array(EXAMPLE_SCORES), np.array(EXAMPLE_TARGETS), "CP CR CF1 OP OR OF1"
    ours = [average_precision(s, y), voc_average_precision(s, y),
            *([threshold_metrics(s, y, top_k=k)[m] / 100 for m in keys.split()] for k in (None, 3))]
    errors = {name: float(np.max(np.abs(np.subtract(a, b)))) for (name, b), a in zip(EXAMPLE.items(), ours, strict=True)}
    passed = sum(e <= 1e-12 for e in errors.values())
    print("06_eval.py self-check on the 4-image x 5-class worked example of docs/06_eval.md",
          *(f"  {'ok  ' if e <= 1e-12 else 'FAIL'} {name}: max |diff| {e:.1e} vs hand" for name, e in errors.items()),
          f"  {format_metrics(mean_average_precision(s, y, class_names=list('ABCDE')))}", f"{passed}/{len(errors)} checks "
          f"passed in {time.perf_counter() - start:.2f} s. Next: python 06_eval.py --checkpoint runs/demo/best.pt", sep="\n")
    return passed == len(errors)


if __name__ == "__main__":
    raise SystemExit(main())
