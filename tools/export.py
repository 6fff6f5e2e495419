"""Export a trained Query2Label checkpoint: a torch.export program (.pt2) and an ONNX file.

    python tools/export.py --checkpoint runs/demo/best.pt --out exported/

Both take images (B, 3, S, S), normalised as stage 1's validation transform does, at the
checkpoint's input side S (the batch size B may vary), and return the K logits (B, K); apply a
sigmoid for probabilities. The script checks each file against the eager model on a random
batch and prints the largest difference. Load them with
    program = torch.export.load("exported/model.pt2").module();  logits = program(images)
    session = onnxruntime.InferenceSession("exported/model.onnx")
    logits = session.run(None, {"images": images.numpy()})[0]
The ONNX file is written by torch.onnx's dynamo exporter (needs the `onnx` and `onnxscript`
packages); checking it needs `onnxruntime`. Attention maps are not exported (logits only).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages live one folder up

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402


def export_program(model, img_size, path, batch=2):
    """torch.export of model.eval() for (B, 3, S, S) images with a dynamic batch size; saved to `path`."""
    example = torch.randn(batch, 3, img_size, img_size)
    batch_dim = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch_dim},))
    torch.export.save(program, path)
    return program


def export_onnx(model, img_size, path, batch=2):
    """ONNX (dynamo exporter) with input "images" (B, 3, S, S) and output "logits" (B, K)."""
    example = torch.randn(batch, 3, img_size, img_size)
    batch_dim = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(model.eval(), (example,), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: batch_dim},), dynamo=True, external_data=False)
    return path


def onnx_logits(path, images):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def export_all(model, img_size, out_dir, check_batch=3, seed=0):
    """Write model.pt2 and model.onnx to out_dir; returns {file: max |exported - eager| on a random batch}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    images = torch.randn(check_batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        eager = model(images)
    pt2, onnx_path = out_dir / "model.pt2", out_dir / "model.onnx"
    export_program(model, img_size, pt2)
    export_onnx(model, img_size, onnx_path)
    with torch.no_grad():
        from_pt2 = torch.export.load(pt2).module()(images)
    differences = {str(pt2): (from_pt2 - eager).abs().max().item()}
    try:
        differences[str(onnx_path)] = (onnx_logits(onnx_path, images) - eager).abs().max().item()
    except ImportError:
        differences[str(onnx_path)] = None  # written, not checked: pip install onnxruntime
    return differences


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="best.pt or last.pt written by 05_train.py")
    parser.add_argument("--out", default="exported", help="output folder (default: exported)")
    parser.add_argument("--use-ema", action="store_true", help="export last.pt's EMA weights (default: off)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input side S (default: the one the checkpoint was trained at)")
    args = parser.parse_args(argv)
    evaluation = importlib.import_module("06_eval")
    backbone = importlib.import_module("02_backbone")
    try:
        model, checkpoint = evaluation.load_for_eval(args.checkpoint, "cpu", use_ema=args.use_ema)
    except (ValueError, OSError, backbone.FileProblem) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    img_size = args.img_size or (checkpoint.get("data") or {}).get("img_size")
    if not img_size:
        parser.exit(2, f"{parser.prog}: error: {args.checkpoint} records no input size; pass --img-size\n")
    differences = export_all(model, img_size, args.out)
    meta = {"checkpoint": str(args.checkpoint), "img_size": img_size, "class_names": checkpoint["class_names"],
            "input": "images (B, 3, S, S) float32, normalised as stage 1's validation transform",
            "output": "logits (B, K); sigmoid for probabilities"}
    (Path(args.out) / "model.json").write_text(json.dumps(meta, indent=1))
    for path, diff in differences.items():
        print(f"wrote {path}: max |exported - eager| logits {'not checked (no onnxruntime)' if diff is None else f'{diff:.1e}'}")
    print(f"wrote {Path(args.out) / 'model.json'} (input size, class names)")
    return differences


if __name__ == "__main__":
    main()
