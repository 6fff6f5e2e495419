"""Backbone benchmarks on the CPU: channels_last, BatchNorm folding, finer feature grids, memory.

    python tools/bench_backbone.py                 # NCHW vs channels_last, forward img/s (eval, no_grad)
    python tools/bench_backbone.py --fold          # frozen BN folded vs not, forward+backward img/s
    python tools/bench_backbone.py --grid          # candidate demo models: train-step img/s and token grid
    python tools/bench_backbone.py --memory        # resnet101 at 448 px: peak RSS in a fresh process

Every comparison runs its candidates in interleaved rounds (tools/timing.py); ratios are medians
of per-round ratios. On a shared machine pass --threads 1 for steadier figures.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages live one folder up

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402

import torch  # noqa: E402

from tools.timing import median, ratio, show, time_interleaved  # noqa: E402

backbone = importlib.import_module("02_backbone")  # module names may not start with a digit

# (backbone, input side, batch): the demo's backbone as 05_train.py's demo preset feeds it, then two
# small ResNets at the usual ImageNet size.
LAYOUT_CASES = (("test_resnet", 64, 32), ("resnet10t", 224, 8), ("resnet18", 224, 8))


def bench_layouts(rounds):
    """Forward img/s (eval, no_grad), NCHW vs channels_last."""
    print(f"forward, eval, no_grad, {torch.get_num_threads()} threads, median of {rounds} interleaved rounds")
    for name, S, batch in LAYOUT_CASES:
        model = backbone.Backbone(name, verbose=False).eval()
        last = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, S, S)
        x_last = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            t = time_interleaved({"NCHW": lambda m=model, x=x: m(x),
                                  "channels_last": lambda m=last, x=x_last: m(x)}, rounds)
        print(f"  {name:12s} {S:3d}px batch {batch:2d}: NCHW {batch / median(t['NCHW']):7.1f} img/s   "
              f"channels_last {batch / median(t['channels_last']):7.1f} img/s   "
              f"speed ratio {ratio(t['NCHW'], t['channels_last']):.2f}x")


def bench_fold(rounds, names=("resnet18", "resnet50"), S=224, batch=8):
    """Forward+backward img/s in training mode (frozen BN, frozen stem), folded vs not."""
    print(f"forward+backward, train mode, frozen BN, {S} px, batch {batch}, {torch.get_num_threads()} threads")
    for name in names:
        torch.manual_seed(0)
        plain = backbone.Backbone(name, verbose=False).train()
        folded = copy.deepcopy(plain)
        pairs = backbone.fold_frozen_batchnorm(folded.body)
        x = torch.randn(batch, 3, S, S)
        with torch.no_grad():
            diff = (plain(x) - folded(x)).abs().max().item()
        steps = {k: (lambda m=m, x=x: m(x).float().square().mean().backward()) for k, m in
                 (("unfolded", plain), ("folded", folded))}
        t = time_interleaved(steps, rounds)
        print(f"  {name:9s} ({pairs} conv+BN pairs folded; max |diff| {diff:.1e}): "
              f"unfolded {batch / median(t['unfolded']):5.1f} img/s [{show(t['unfolded'])}]  "
              f"folded {batch / median(t['folded']):5.1f} img/s [{show(t['folded'])}]  "
              f"speed-up {ratio(t['unfolded'], t['folded']):.3f}x wall, {ratio(t['unfolded'], t['folded'], 1):.3f}x cpu")


# Candidate demo models for a finer attention grid: (label, img_size, Q2LConfig changes). The demo
# preset today: test_resnet, 64 px, stride 32 -> 2x2 tokens, d 128.
GRID_CASES = (
    ("today: test_resnet 64px s32, d128", 64, {}),
    ("test_resnet 64px s16, d128", 64, dict(output_stride=16)),
    ("test_resnet 64px s8, d128", 64, dict(output_stride=8)),
    ("test_resnet 64px layer2 (s8), d128", 64, dict(feature_stage=2)),
    ("test_resnet 64px layer2 (s8), d64", 64, dict(feature_stage=2, d_model=64, dim_feedforward=256)),
    ("test_resnet 64px layer3 s8, d128", 64, dict(feature_stage=3, output_stride=8)),
    ("test_resnet 96px layer2 (s8), d128", 96, dict(feature_stage=2)),
    ("test_resnet 128px s16, d128", 128, dict(output_stride=16)),
    ("resnet10t 64px s8, d128", 64, dict(backbone="resnet10t", output_stride=8)),
)


def bench_grid(rounds, batch=32, num_classes=10, cases=GRID_CASES):
    """Training-step img/s (forward+backward+AdamW step, fp32) of candidate demo models, interleaved."""
    transformer = importlib.import_module("03_transformer")
    loss = importlib.import_module("04_loss")
    criterion = loss.AsymmetricLoss()
    runs, info = {}, {}
    for label, S, changes in cases:
        torch.manual_seed(0)
        config = dataclasses.replace(transformer.PRESETS["demo"], num_classes=num_classes, **changes)
        model = transformer.Query2Label(config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x, y = torch.randn(batch, 3, S, S), (torch.rand(batch, num_classes) < 0.3).float()

        def step(model=model, optimizer=optimizer, x=x, y=y):
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            optimizer.step()
        with torch.no_grad():
            _, attention = model.eval()(x[:1], return_attention=True)
        model.train()
        runs[label], info[label] = step, (tuple(attention.shape[-2:]), sum(p.numel() for p in model.parameters()))
    t = time_interleaved(runs, rounds)
    reference = t[cases[0][0]]
    print(f"training step (forward+backward+AdamW), fp32, batch {batch}, {num_classes} classes, "
          f"{torch.get_num_threads()} threads, median of {rounds} interleaved rounds")
    for label, _, _ in cases:
        grid, params = info[label]
        print(f"  {label:36s} grid {grid[0]:2d}x{grid[1]:<2d} {params / 1e6:5.2f}M params  "
              f"{batch / median(t[label]):6.1f} img/s wall  {batch / median(t[label], 1):6.1f} img/s per cpu-s  "
              f"time vs today {ratio(t[label], reference):.2f}x")


def memory_probe(grad):
    """Run in a fresh process: peak RSS growth of one resnet101 forward at 448 px, batch 1 (Linux)."""
    def status(field):  # kB -> MiB
        return int(next(ln for ln in open("/proc/self/status") if ln.startswith(field)).split()[1]) / 1024

    model, x = backbone.Backbone("resnet101", verbose=False).train(grad), torch.randn(1, 3, 448, 448)
    weights = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    saved = {}  # activations autograd keeps for backward, by storage (saved twice counts once)

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM), so only the forward's own peak counts
    before = status("VmRSS")
    with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    print(json.dumps(dict(before=before, peak=status("VmHWM"), saved=sum(saved.values()) / 2**20,
                          weights=sum(weights.values()) / 2**20)))


def bench_memory():
    if sys.platform != "linux":
        print("peak memory: needs Linux /proc (VmHWM); skipped")
        return
    print("resnet101, 448px, batch 1, one forward in a fresh process; peak RSS growth (VmHWM reset before):")
    for grad in (False, True):
        probe = ["--memory-probe", "grad" if grad else "no_grad", "--threads", str(torch.get_num_threads())]
        out = subprocess.run([sys.executable, __file__, *probe], capture_output=True, text=True, check=True).stdout
        m = json.loads(out.strip().splitlines()[-1])
        print(f"  {'train mode + grad' if grad else 'eval + no_grad   '}: +{m['peak'] - m['before']:4.0f} MiB"
              f" over {m['before']:.0f} MiB before (weights+buffers {m['weights']:.0f} MiB);"
              f" activations saved for backward {m['saved']:.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--fold", action="store_true", help="frozen BN folded vs not (default: off)")
    parser.add_argument("--grid", action="store_true", help="candidate demo models for a finer grid (default: off)")
    parser.add_argument("--memory", action="store_true", help="resnet101 peak memory (default: off)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per candidate (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--memory-probe", choices=["no_grad", "grad"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args.memory_probe == "grad")
    elif args.fold:
        bench_fold(args.rounds)
    elif args.grid:
        bench_grid(args.rounds)
    elif args.memory:
        bench_memory()
    else:
        bench_layouts(args.rounds)
        bench_memory()
