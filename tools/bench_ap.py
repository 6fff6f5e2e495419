"""Speed of stage 6's AP at COCO val size, against a per-class scikit-learn loop and against the AP of git
HEAD's 06_eval.py (the "before" of a change), all timed in one run, interleaved (tools/timing.py).

    python tools/bench_ap.py                         # 40,504 x 80, 5 rounds
    python tools/bench_ap.py --images 2000 --rounds 1 --no-before

Prints per case: median wall time of each candidate, the median per-round ratio scikit-learn / ours (wall
and CPU time), and the largest |AP difference| from scikit-learn; then VOC AP and the threshold metrics.
The "before" comes from `git show REV:06_eval.py` (--before, default HEAD) loaded into a temporary module (skipped when git, the
file or one of its functions is missing); it ran with its default threads (one per core, at most 8).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages live one folder up

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

from tools.ap_studies import simulated_model_scores  # noqa: E402
from tools.timing import median, ratio, show, time_interleaved  # noqa: E402

evaluation = importlib.import_module("06_eval")  # module names may not start with a digit
ROOT = Path(__file__).resolve().parents[1]


def load_before(revision="HEAD"):
    """06_eval.py as it is in git `revision`, imported under another name; None if that is not possible."""
    try:
        text = subprocess.run(["git", "show", f"{revision}:06_eval.py"], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(tempfile.mkdtemp()) / "eval_before.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("eval_before", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # e.g. it imports a stage whose names changed since
        print(f"(the {revision} version of 06_eval.py does not import here: {error!r}; no 'before' column)")
        return None
    return module if hasattr(module, "average_precision") else None


def sklearn_loop(scores, targets):
    from sklearn.metrics import average_precision_score

    return np.array([average_precision_score(targets[:, k], scores[:, k]) for k in range(scores.shape[1])])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench_ap.py", allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=40504, help="N (default: 40504, COCO 2014 val)")
    parser.add_argument("--classes", type=int, default=80, help="K (default: 80)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random data (default: 0)")
    parser.add_argument("--before", default="HEAD", help="git revision whose 06_eval.py is the 'before' (default: "
                                                          "HEAD; the version before the lessons-first layout: 18f77ff)")
    parser.add_argument("--no-before", action="store_true", help="skip the 'before' column (default: off)")
    args = parser.parse_args(argv)
    if min(args.images, args.classes, args.rounds) < 1:
        parser.exit(2, f"{parser.prog}: error: --images, --classes and --rounds must be >= 1\n")
    before = None if args.no_before else load_before(args.before)
    N, K = args.images, args.classes
    rng = np.random.default_rng(args.seed)
    # sigmoid outputs are float32; stage 1's labels are float32 0/1; COCO val has ~2.9 of 80 labels/image
    scores = rng.random((N, K), dtype=np.float32)
    targets = (rng.random((N, K)) < 0.036).astype(np.float32)
    targets[0] = 1  # every class has a positive, so scikit-learn and we agree on every class
    cases = {"random, float32": (scores, targets),
             "random, float32 rounded to 2 decimals (ties)": (scores.round(2), targets),
             "random, float64": (rng.random((N, K)), targets),
             "simulated model (class 0 on 45% of images)": simulated_model_scores(N, K, args.seed)}
    print(f"AP of {N} images x {K} classes; {args.rounds} interleaved rounds, medians. Target: ours >= 20x "
          "faster than the scikit-learn loop, |AP difference| <= 1e-12.")
    for name, (s, y) in cases.items():
        candidates = {"ours": lambda s=s, y=y: evaluation.average_precision(s, y),
                      "scikit-learn loop": lambda s=s, y=y: sklearn_loop(s, y)}
        if before is not None:
            candidates["before"] = lambda s=s, y=y: before.average_precision(s, y)
        times = time_interleaved(candidates, args.rounds)
        ours, reference = evaluation.average_precision(s, y), sklearn_loop(s, y)
        diff = np.nanmax(np.abs(ours - reference))
        print(f"  {name}: largest |AP difference| from scikit-learn {diff:.1e}")
        for candidate, t in times.items():
            print(f"    {candidate:18s} {show(t)}")
        print(f"    scikit-learn / ours: {ratio(times['scikit-learn loop'], times['ours']):.1f}x wall, "
              f"{ratio(times['scikit-learn loop'], times['ours'], 1):.1f}x cpu" + (
                  f"; before / ours: {ratio(times['before'], times['ours']):.2f}x wall, "
                  f"{ratio(times['before'], times['ours'], 1):.2f}x cpu" if before is not None else ""))
    others = time_interleaved({
        "VOC AP": lambda: evaluation.voc_average_precision(scores, targets),
        "threshold metrics at 0.5": lambda: evaluation.threshold_metrics(scores, targets),
        "top-3 threshold metrics": lambda: evaluation.threshold_metrics(scores, targets, top_k=3)}, args.rounds)
    for name, t in others.items():
        print(f"  {name}: {median(t) * 1e3:.1f} ms wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
