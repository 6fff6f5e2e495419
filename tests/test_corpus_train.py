"""The corrupt-data corpus (tests/test_data_corpus.py) through 05_train.py: each case's outcome in a run.

- Fatal cases (malformed JSON of every kind, duplicate ids, missing paths; the skipped flaws under
  --strict): `main([...])` stops with exit code 2 and one line naming the file, before any run folder
  exists. Each is tried as the training and as the validation split; cheap, nothing trains.
- Tolerable cases (odd images, undecodable images, a listed image missing on disk, annotations with an
  unknown category or image id) all go into ONE training split (24 images on disk: 3 batches of 8) and
  ONE validation split (20 on disk), trained for ONE epoch: the run finishes, reports every skip, and
  scores exactly the decodable validation images. The same splits with --strict stop at the first flaw.

    python tests/test_corpus_train.py      # prints the case -> outcome table (through 01_data and 05_train)
"""

import contextlib
import io
import json
import math
import re
import shutil
import sys
import warnings
from pathlib import Path

import pytest

if __name__ == "__main__":  # printing the table without pytest: find conftest and the stages
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import conftest  # noqa: E402
import test_data_corpus as corpus_cases  # noqa: E402

EXTRA_GOOD = {"train": 7, "val": 3}  # + 3 ordinary + 14 image cases: 24 and 20 images on disk
OUTCOME = {**{k: v[3]["outcome"] for k, v in corpus_cases.IMAGE_CASES.items()},
           **{k: v[1]["outcome"] for k, v in corpus_cases.JSON_CASES.items()},
           **{k: v["outcome"] for k, v in corpus_cases.PATH_CASES.items()}}
FATAL = [case for case, outcome in OUTCOME.items() if outcome in ("error", "skipped")]  # skipped: under --strict
GOOD_CASE = "file name with spaces"  # its dataset is the good other split of a fatal run


def cases(outcome):
    return [case for case, o in OUTCOME.items() if o == outcome]


def run_args(train, val, out_dir, name, *extra):
    """conftest.tiny_train_args (a seconds-per-epoch model) for ONE epoch on (image_dir, ann_file) splits."""
    paths = {"train_images": train[0], "train_ann": train[1], "val_images": val[0], "val_ann": val[1]}
    return conftest.tiny_train_args(paths, out_dir, name, *extra, epochs=1)


def stops(stage05, argv):
    """main(argv) must stop with SystemExit: (exit code, stderr). What it prints is kept, not shown."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            stage05.main(argv)
        except SystemExit as stopped:
            return stopped.code, err.getvalue().strip()
    raise AssertionError(f"the run did not stop: {argv}")


def fatal_run(stage05, corpus, case, split, out_dir):
    """The case as the `split` split, a good dataset as the other; (exit code, stderr)."""
    bad, good = corpus[case][:2], corpus[GOOD_CASE][:2]
    train, val = (bad, good) if split == "train" else (good, bad)
    strict = ["--strict"] if OUTCOME[case] == "skipped" else []
    return stops(stage05, run_args(train, val, out_dir, "fatal", *strict))


def flaw_entries(ann_file):
    """What a "skipped" case adds to the corpus's ordinary COCO dict: {section: [entries]}."""
    case, base = json.loads(Path(ann_file).read_text()), corpus_cases._coco()
    return {section: [e for e in case[section] if e not in base[section]] for section in base}


def write_tolerant_split(corpus, root, split, flaws=True):
    """ONE split holding every tolerable case at once: the corpus's 3 ordinary images, all 14 image cases
    (loading and undecodable), EXTRA_GOOD[split] more good images and, if `flaws`, the entries of the
    three "skipped" cases (a listed file missing on disk, an unknown category id, an unknown image id).
    Image ids as in the corpus (10, 11, ...), so the flaws refer to what they did there."""
    from PIL import Image

    images = Path(root) / split / "images"
    images.mkdir(parents=True, exist_ok=True)
    first = corpus[next(iter(corpus_cases.IMAGE_CASES))][0]
    for name, _, _ in corpus_cases.ORDINARY:
        shutil.copy(first / name, images / name)
    extra = []
    for case in corpus_cases.IMAGE_CASES:
        folder, _, expected = corpus[case]
        shutil.copy(folder / expected["file"], images / expected["file"])
        extra.append((expected["file"], expected["labels"]))
    for i in range(EXTRA_GOOD[split]):
        ids, shade = [[1], [2], [1, 2]][i % 3], 60 + 25 * i + 5 * (split == "val")
        colour = (shade, 230 - shade, 40) if ids == [1] else (40, shade, 230 - shade) if ids == [2] else (shade,) * 3
        Image.new("RGB", (16, 16), colour).save(images / f"good {split} {i}.png")
        extra.append((f"good {split} {i}.png", ids))
    coco = corpus_cases._coco(extra)
    for case in cases("skipped") if flaws else []:
        for section, entries in flaw_entries(corpus[case][1]).items():
            coco[section] += entries
    for section in ("images", "annotations"):  # the flaws' ids must not clash with ours
        ids = [e["id"] for e in coco[section]]
        assert len(ids) == len(set(ids)), section
    ann_file = Path(root) / split / ("instances.json" if flaws else "instances_no_flaws.json")
    ann_file.write_text(json.dumps(coco))
    return images, ann_file


def tolerant_run(stage05, corpus, root):
    """One epoch on the two all-cases splits; (summary, run folder, warning messages, splits)."""
    splits = {split: write_tolerant_split(corpus, root / "data", split) for split in ("train", "val")}
    err = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        try:
            summary = stage05.main(run_args(splits["train"], splits["val"], root / "runs", "tolerant"))
        except SystemExit as stopped:
            raise AssertionError(f"the run stopped with exit code {stopped.code}: {err.getvalue()[-2000:]}") from None
    return summary, root / "runs" / "tolerant", [str(w.message) for w in caught], splits


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return corpus_cases.build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tolerant(stage05, corpus, tmp_path_factory):
    return tolerant_run(stage05, corpus, tmp_path_factory.mktemp("tolerant"))


# ----------------------------------------------------------------------------- fatal: stop before any work

@pytest.mark.hardening
@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("case", FATAL)
def test_fatal_case_stops_before_any_run_folder(stage05, corpus, case, split, tmp_path):
    """Exit 2, ONE line on stderr naming the file and the field or id (the corpus's `match`, or the
    skipped entry under --strict), and no run folder: nothing started."""
    image_dir, ann_file, expected = corpus[case]
    code, err = fatal_run(stage05, corpus, case, split, tmp_path / "runs")
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert str(image_dir if case == "image folder missing" else ann_file) in err, err  # the path at fault
    assert re.search(expected.get("match") or re.escape(expected["names"][0]), err), err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- tolerable: one run, all cases

def test_every_tolerable_case_at_once_trains_one_epoch(tolerant):
    """The run finishes; training replaced the undecodable images (3 full steps of 8), validation left
    them out: images scored = the decodable validation images; bad_* count files; no NaN anywhere."""
    summary, run_dir, _, splits = tolerant
    on_disk = {split: sum((images / e["file_name"]).is_file() for e in json.loads(ann.read_text())["images"])
               for split, (images, ann) in splits.items()}
    assert on_disk == {"train": 24, "val": 20}
    assert summary["outcome"] == "done" and summary["epochs"] == 1
    lines = (run_dir / "history.jsonl").read_text().splitlines()
    assert len(lines) == 1
    h = json.loads(lines[0])
    assert h["step"] == 24 // 8
    assert h["images_scored"] == on_disk["val"] - len(cases("undecodable")) == 17
    assert h["bad_images"] == h["bad_val_images"] == len(cases("undecodable")) == 3  # files, not attempts
    numbers = [v for v in h.values() if isinstance(v, (int, float))]
    assert len(numbers) >= 10 and all(math.isfinite(v) for v in numbers), h
    assert h["mAP_ema"] is not None and 0 <= h["mAP_raw"] <= 100 and 0 <= h["mAP_ema"] <= 100
    assert (run_dir / "best.pt").is_file() and (run_dir / "last.pt").is_file()


@pytest.mark.hardening
def test_the_run_reports_every_skip_and_every_undecodable_image(tolerant, corpus):
    """train.log: each split's summary gives each skipped entry's count and name; the epoch line counts
    the undecodable files (replaced in training, left out of validation); one warning per file and split
    names it."""
    _, run_dir, caught, splits = tolerant
    log = (run_dir / "train.log").read_text()
    for split, (_, ann_file) in splits.items():
        block = log.split(f"{ann_file} (")[1]
        skipped = next(line for line in block.splitlines() if line.strip().startswith("skipped"))
        for case in cases("skipped"):
            expected = corpus[case][2]
            assert f"{expected['kind'].replace('_', ' ')}: 1 ({expected['names'][0]})" in skipped, (split, skipped)
    assert "unreadable images so far: 3 training (replaced), 3 validation (left out)" in log
    for case in cases("undecodable"):
        name = corpus[case][2]["file"]
        for split, ending in (("train", "the next readable image is used"), ("val", "left out of the metric")):
            said = [m for m in caught if f"/{split}/images/{name}:" in m]
            assert len(said) == 1 and said[0].endswith(ending), (case, split, said)
    for case in cases("loads"):  # a readable image is never reported
        assert not [m for m in caught if corpus[case][2]["file"] in m], case


@pytest.mark.hardening
def test_strict_stops_the_same_splits_at_the_first_flaw(stage05, tolerant, tmp_path):
    """--strict on the all-cases splits: exit 2, one line naming the training file and its first flaw
    (the listed image missing on disk), before any run folder."""
    splits = tolerant[3]
    code, err = stops(stage05, run_args(splits["train"], splits["val"], tmp_path, "strict", "--strict"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(splits["train"][1]) in err and "gone.jpg" in err, err
    assert not (tmp_path / "strict").exists()


@pytest.mark.hardening
def test_strict_stops_at_the_first_undecodable_image(stage05, corpus, tmp_path):
    """Without the annotation flaws, --strict finds an undecodable image only when it reads it (the first
    training step): exit 2, one line naming that file; no checkpoint claims to be a run."""
    splits = {split: write_tolerant_split(corpus, tmp_path / "data", split, flaws=False) for split in ("train", "val")}
    code, err = stops(stage05, run_args(splits["train"], splits["val"], tmp_path / "runs", "strict", "--strict"))
    # what a terminal shows: progress-bar redraws (\r) aside, the error is one line of its own
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("05_train.py: error: "), err
    assert any(f"{splits['train'][0] / corpus[case][2]['file']}:" in err for case in cases("undecodable")), err
    assert not list((tmp_path / "runs").glob("*/*.pt"))


# ----------------------------------------------------------------------------- the table for docs/01_data.md

def outcome_table(root):
    """The Markdown table case -> outcome through 01_data and through 05_train.py, observed by running."""
    root = Path(root)
    stage05 = conftest.load_stage(5)
    through_01 = dict(line[2:-2].split(" | ", 1) for line in corpus_cases.outcome_table(root / "01").splitlines()[2:])
    corpus = corpus_cases.build_corpus(root / "corpus")
    summary, run_dir, caught, splits = tolerant_run(stage05, corpus, root / "tolerant")
    (h,) = summary["history"]
    log = (run_dir / "train.log").read_text()
    _, strict_err = stops(stage05, run_args(splits["train"], splits["val"], root / "strict", "s", "--strict"))
    no_flaws = {split: write_tolerant_split(corpus, root / "no_flaws", split, flaws=False) for split in ("train", "val")}
    _, undecodable_err = stops(stage05, run_args(no_flaws["train"], no_flaws["val"], root / "strict2", "s", "--strict"))
    short = lambda text: text.replace(str(root / "corpus"), "…").replace(str(root), "…")  # noqa: E731
    error_line = lambda err: short(re.search(r"05_train\.py: error: .*", err).group(0))  # noqa: E731  (no progress bar)
    epoch_note = re.search(r"unreadable images so far: [^\n]*\)", log).group(0)
    rows = ["| case | outcome through `01_data` | through `05_train.py` (one epoch) |", "| --- | --- | --- |"]
    for case, (_, _, expected) in corpus.items():
        outcome = OUTCOME[case]
        if outcome in ("error", "skipped"):
            code, err = fatal_run(stage05, corpus, case, "train", root / "fatal" / case)
            line = error_line(err)
            same = f"DataError: `{line.removeprefix('05_train.py: error: ')}`" == through_01[case]
            stop = (f"exit {code}, {'a' if (root / 'fatal' / case).exists() else 'no'} run folder"
                    + (", the same line prefixed `05_train.py: error:`" if same else f": `{line}`"))
        if outcome == "error":
            text = stop
        elif outcome == "skipped":
            name = expected["names"][0]
            text = (f"skipped, the run trains; {'named' if log.count(name) == 2 else 'NOT named'} in train.log (the "
                    f"summary of each split); --strict: {stop}")
        elif outcome == "undecodable":
            said = [m for m in caught if f"images/{expected['file']}:" in m]
            text = (f"training: replaced; validation: left out ({h['images_scored']} of 20 scored); counted in "
                    f"train.log: `{epoch_note}`; named in {len(said)} RuntimeWarnings (stderr, training and "
                    "validation), not in train.log; --strict: exit 2 at the first training step, naming the first "
                    "such file read; its run folder stays, without checkpoints")
        else:
            warned = [m for m in caught if expected["file"] in m]
            text = "trains and is scored, no warning" if not warned else "WARNED: " + short(warned[0])
        rows.append(f"| {case} | {through_01[case]} | {text} |")
    rows.append(f"\nAll tolerable cases in ONE run (24 training, 20 validation images on disk, one epoch, "
                f"{summary['outcome']}): {h['step']} steps, loss {h['train_loss']:.1f}, mAP raw {h['mAP_raw']:.2f}, "
                f"EMA {h['mAP_ema']:.2f}, images scored {h['images_scored']}, bad images {h['bad_images']} "
                f"training / {h['bad_val_images']} validation.\n--strict on those splits: {error_line(strict_err)}"
                f"\n--strict without the annotation flaws: {error_line(undecodable_err)}")
    return "\n".join(rows)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        print(outcome_table(folder))
