"""Benchmark of stage 4: asymmetric loss forward+backward time relative to torch's fused BCE (CPU).

    python tools/bench_loss.py               # 1 CPU thread (the default)
    python tools/bench_loss.py --threads 0   # torch's default thread count

Batch 128 x 80 labels (COCO's K), ~2.9 positives per image. Each candidate runs `--inner` calls of
forward+backward per round; rounds are interleaved by tools/timing.py and the ratio to BCE is the
median of the per-round ratios.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages live one folder up

import argparse
import importlib

import torch
import torch.nn.functional as F

from tools.timing import median, ratio, time_interleaved

loss = importlib.import_module("04_loss")  # module names may not start with a digit


def candidates(B=128, K=80, inner=50):
    """{name: callable running `inner` forward+backward passes}; the first is the BCE baseline."""
    torch.manual_seed(0)
    x = torch.randn(B, K).requires_grad_(True)  # (B, K)
    t = (torch.rand(B, K) < 0.036).float()  # (B, K)
    cases = {
        "F.binary_cross_entropy_with_logits (sum)": lambda: F.binary_cross_entropy_with_logits(x, t, reduction="sum"),
        "ASL default (g- 4, g+ 0, m 0.05, sum)": lambda: loss.asymmetric_loss(x, t),
        "ASL default, check_targets=False": lambda: loss.asymmetric_loss(x, t, check_targets=False),
        "ASL Q2L settings (g- 2, m 0, eps 1e-5, q2l)": lambda: loss.asymmetric_loss(x, t, **loss.Q2L_SETTINGS),
    }

    def repeat(fn):
        def run():
            for _ in range(inner):
                x.grad = None
                fn().backward()
        return run

    return {name: repeat(fn) for name, fn in cases.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: at 128 x 80 entries, waiting for a second thread costs "
                             "more than it saves on a busy machine; 0 = torch's default)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timed rounds (default 15)")
    parser.add_argument("--inner", type=int, default=50, help="calls per candidate per round (default 50)")
    args = parser.parse_args(argv)
    if args.threads < 0 or args.rounds < 1 or args.inner < 1:
        parser.exit(2, f"{parser.prog}: error: --threads must be >= 0, --rounds and --inner >= 1\n")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cases = candidates(inner=args.inner)
    times = time_interleaved(cases, rounds=args.rounds)
    base = times[next(iter(cases))]
    print(f"forward+backward, batch 128 x 80 labels, CPU, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds of {args.inner} calls:")
    for name, values in times.items():
        print(f"  {name:45s} {median(values) / args.inner * 1e6:8.1f} us   {ratio(values, base):5.2f}x BCE"
              f"   (cpu time {ratio(values, base, which=1):5.2f}x)")


if __name__ == "__main__":
    main()
