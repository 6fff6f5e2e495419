"""Evaluate a checkpoint of the official Query2Label code (github.com/SlongLiu/query2labels) here.

    python tools/official.py --checkpoint checkpoint.pkl --val-images coco/val2014 \
        --val-ann coco/annotations/instances_val2014.json [--img-size 448] [--trusted]

builds stage 3's `official_r101` architecture (each part overridable: --backbone, --d-model,
--num-heads, --dim-feedforward, --num-classes), converts the file's state dict to our names
(`convert_official_state_dict`), loads it (`load_official_checkpoint`) and scores the validation
set with stage 6's `evaluate` (mAP, per-class table; figures with --out-dir). The official
training normalises with ImageNet's mean and std; checkpoints trained with its `--orid_norm`
expect pixels in [0, 1]: pass --orid-norm for those.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages live one folder up

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402

import torch  # noqa: E402

data = importlib.import_module("01_data")  # module names may not start with a digit
backbone = importlib.import_module("02_backbone")
transformer = importlib.import_module("03_transformer")


def convert_official_state_dict(state_dict):
    """An official Query2Label state dict -> (our state dict, report).

        official key                                         our key
        module.<key>  (saved from DistributedDataParallel)   <key>
        backbone.0.body.<torchvision ResNet key>             backbone.body.<same key: timm = torchvision>
        backbone.1.pe  (position buffer for one input size)  dropped: recomputed for every input size
        *.in_proj_weight (3d, d), *.in_proj_bias (3d,)       *.q_proj.*, *.k_proj.*, *.v_proj.*
        *.num_batches_tracked  (BatchNorm step counters)     dropped: not weights
        transformer.*, input_proj.*, query_embed.weight, fc.W, fc.b                      unchanged
    A {"state_dict": ...} or {"model": ...} wrapper is unwrapped first. The report lists the
    wrapper used, the keys dropped on purpose and the keys that could not be placed ("unplaced"),
    e.g. DETR's learned position tables (backbone.1.row_embed/col_embed: x-first channel order and
    50 rows there, which stage 2's PositionEmbeddingLearned cannot reproduce).
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"expected a state dict (a dict of tensors), got {type(state_dict).__name__}")
    if str(state_dict.get("format", "")).startswith("q2l-checkpoint"):
        raise ValueError("this is one of this project's own checkpoints, not an official one: "
                         "evaluate it with 06_eval.py --checkpoint")
    report = {"wrapper": None, "dropped": [], "unplaced": []}
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict, report["wrapper"] = state_dict[wrapper], wrapper
            break
    ours = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith("module."):
            name = name[len("module."):]
        if not torch.is_tensor(value):
            report["unplaced"].append(key)
        elif name.endswith("num_batches_tracked") or name == "backbone.1.pe":
            report["dropped"].append(key)
        elif name.startswith("backbone.0."):
            ours["backbone." + name[len("backbone.0."):]] = value
        elif name.startswith(("transformer.", "input_proj.", "query_embed.", "fc.")):
            ours[name] = value
        else:
            report["unplaced"].append(key)
    return transformer.split_in_proj(ours), report


def load_official_checkpoint(model, path, strict=True, trusted=False):
    """Load an official checkpoint file into `model`, a Query2Label built with the matching config
    (for the released R101 files: replace(PRESETS["official_r101"], num_classes=80, pretrained=False)).

    Shape mismatches always raise ValueError naming every such key, and nothing is loaded. With
    strict=True a key that could not be placed or a model key left unfilled raises too; with
    strict=False they are only reported. Returns the converter's report plus "missing" (model keys
    the file did not fill) and "unexpected" (converted keys the model lacks). The file is read with
    stage 2's `load_torch_file` (FileProblem, a ValueError, for a missing or unreadable file);
    trusted=True allows pickled non-tensor objects: only for files whose source you trust.
    A model built with fold_bn cannot take the file (its BatchNorm is folded): load, then fold.
    """
    checkpoint = backbone.load_torch_file(path, "official checkpoint", trusted=trusted)
    ours, report = convert_official_state_dict(checkpoint)
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
             for k, v in ours.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} tensors do not fit this model (check --num-classes, --d-model, "
                         "--backbone):\n  " + "\n  ".join(wrong))
    report["missing"] = sorted(set(own) - set(ours))
    report["unexpected"] = sorted(set(ours) - set(own))
    problems = [f"{kind}: {key}" for kind in ("unplaced", "unexpected", "missing") for key in report[kind]]
    if strict and problems:
        raise ValueError(f"{path}: {len(problems)} keys do not match this model (strict=False loads the "
                         "rest and reports them):\n  " + "\n  ".join(problems))
    model.load_state_dict({k: v for k, v in ours.items() if k in own}, strict=False)
    return report


def build_official(path, num_classes=80, trusted=False, **overrides):
    """The official_r101 architecture (overrides: backbone, d_model, num_heads, dim_feedforward), random
    backbone init (no download), the file's weights loaded. Returns (model in eval mode, report)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = dataclasses.replace(transformer.PRESETS["official_r101"], num_classes=num_classes,
                                 pretrained=False, **overrides)
    model = transformer.Query2Label(config)
    return model.eval(), load_official_checkpoint(model, path, trusted=trusted)


def zero_one_transform(img_size):
    """The official --orid_norm input: RGB resized to S x S, pixels in [0, 1], no mean/std."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Lambda(lambda image: image.convert("RGB")), v2.Resize((img_size, img_size)),
                       v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    # * the checkpoint and the data
    parser.add_argument("--checkpoint", required=True, help="the official code's checkpoint file (.pkl/.pth)")
    parser.add_argument("--val-images", required=True, help="folder of validation images")
    parser.add_argument("--val-ann", required=True, help="COCO-format annotation file of the validation set")
    parser.add_argument("--trusted", action="store_true",
                        help="allow pickled Python objects in the file (runs code from it; default: refused)")
    # * model: the official_r101 architecture unless changed here
    official = transformer.PRESETS["official_r101"]
    parser.add_argument("--backbone", default=official.backbone, help=f"timm backbone (default: {official.backbone})")
    parser.add_argument("--num-classes", type=int, default=80, help="model outputs (default: 80, COCO)")
    parser.add_argument("--d-model", type=int, default=official.d_model, help=f"width d (default: {official.d_model})")
    parser.add_argument("--num-heads", type=int, default=official.num_heads, help=f"heads (default: {official.num_heads})")
    parser.add_argument("--dim-feedforward", type=int, default=official.dim_feedforward,
                        help=f"feed-forward width (default: {official.dim_feedforward})")
    # * evaluation
    parser.add_argument("--img-size", type=int, default=448, help="input side S (default: 448, the R101 recipe)")
    parser.add_argument("--orid-norm", action="store_true",
                        help="pixels in [0, 1] without ImageNet mean/std, as the official --orid_norm (default: off)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    parser.add_argument("--workers", type=int, default=2, help="loader processes (default: 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda if available, else cpu)")
    parser.add_argument("--out-dir", default=None, help="write per-class AP and PR-curve figures here (default: none)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    evaluation = importlib.import_module("06_eval")
    try:
        model, report = build_official(args.checkpoint, args.num_classes, args.trusted, backbone=args.backbone,
                                       d_model=args.d_model, num_heads=args.num_heads,
                                       dim_feedforward=args.dim_feedforward)
        transform = zero_one_transform(args.img_size) if args.orid_norm else data.build_transforms(args.img_size, train=False)
        dataset = data.CocoMultiLabel(args.val_images, args.val_ann, transform, substitute=False)
    except (ValueError, OSError, data.DataError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"official checkpoint {args.checkpoint}: {args.backbone}, d {args.d_model}, {args.num_heads} heads, "
          f"ff {args.dim_feedforward}, {args.num_classes} classes; left out on purpose: "
          f"{', '.join(report['dropped']) or 'nothing'}")
    device = torch.device(args.device)
    return evaluation.evaluate(model.to(device), dataset, list(dataset.class_names), device, args.batch_size,
                               args.workers, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
