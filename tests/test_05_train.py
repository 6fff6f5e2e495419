"""Stage 5: the training job, on a tiny COCO-format dataset and a tiny model.

Most runs happen in-process through `stage05.main([...])` (fast: no new interpreter); the kill tests
and the multi-process tests start real processes, because that is what they are about.
"""

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_train_args as tiny_args
from conftest import write_tiny_coco

ROOT = Path(__file__).resolve().parents[1]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def history_of(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "history.jsonl").read_text().splitlines()]


def assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    differ = [key for key in a if not torch.equal(a[key], b[key])]
    if differ:  # say how far apart, so a failure on another machine tells drift from a real bug
        worst = max((a[k].double() - b[k].double()).abs().max().item() for k in differ)
        raise AssertionError(f"{what}: {len(differ)} of {len(a)} tensors differ, first {differ[0]}, "
                             f"largest difference {worst:.3g}")


def fails(stage05, capsys, argv, *snippets, code=2):
    """main(argv) stops with exit code `code` and ONE line on stderr holding every snippet."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        stage05.main(argv)
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == code, err
    assert len(err.splitlines()) == 1, err
    for snippet in snippets:
        assert snippet in err, err
    return err


def with_criterion(stage05, monkeypatch, wrap):
    """Runs built from now on train with wrap(their criterion): to inject a signal or a NaN at a step (the
    criterion is also called, without gradients, for the validation loss)."""
    class Run(stage05.Run):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.criterion = wrap(self.criterion)

    monkeypatch.setattr(stage05, "Run", Run)


def test_one_epoch_writes_checkpoints_config_and_tensorboard(stage05, tiny_coco, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = stage05.main(tiny_args(tiny_coco, tmp_path, "one", epochs=1))
    run = Path(summary["run_dir"])
    assert summary["outcome"] == "done" and summary["epochs"] == 1
    for name in ("last.pt", "best.pt", "config.json", "history.jsonl", "train.log", "curves.png"):
        assert (run / name).is_file(), name
    last, best = load(run / "last.pt"), load(run / "best.pt")
    assert last["format"] == best["format"] == stage05.evaluation.CHECKPOINT_FORMAT
    assert best["weights_source"] in ("raw", "ema") and best["class_names"] == ["square", "disc", "bar"]
    assert best["ema"] is None and last["ema"].keys() == last["model"].keys()  # EMA: the model's own keys
    assert Path(last["data"]["val_ann"]).is_absolute() and Path(last["config"]["train_ann"]).is_absolute()
    config = json.loads((run / "config.json").read_text())
    assert config == last["config"] and config["epochs"] == 1 and None not in config.values()
    history = history_of(run)
    assert len(history) == 1 and history[0]["images_scored"] == 15
    assert abs(best["best_map"] - max(history[0]["mAP_raw"], history[0]["mAP_ema"])) < 1e-9
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_step", "train/lr_backbone", "train/lr_transformer", "val/mAP",
            "val/mAP_raw", "val/mAP_ema", "val/CF1_raw", "val/CF1_ema", "val/OF1", "val/loss", "val/loss_ema"} <= tags
    assert events.Tags()["images"] == ["val/examples"] and 0 < history[0]["val_loss"] < float("inf")
    (mAP,) = events.Scalars("val/mAP_raw")
    assert abs(mAP.value - history[0]["mAP_raw"]) < 1e-4  # TensorBoard stores float32
    assert len(events.Scalars("train/loss_step")) == 4  # every step
    assert any(tag.startswith("pr/") for tag in events.Tags()["tensors"])  # PR curves every epoch
    assert "official Query2Label scale" in (run / "train.log").read_text()  # says once what the loss is


def test_help_shows_real_defaults_and_the_presets(stage05):
    text = stage05.build_parser().format_help()
    assert "(default: None)" not in text and "default: coco 80, demo 8" in text
    assert "defaults < preset < --config FILE < flags" in text and "img_size" in text.split("presets")[-1]


def test_config_file_reproduces_a_run(stage05, tiny_coco, tmp_path):
    """--config runs/x/config.json resolves to the same settings; flags given too override it."""
    summary = stage05.main(tiny_args(tiny_coco, tmp_path, "orig", epochs=1))
    path = Path(summary["run_dir"]) / "config.json"
    saved, d = json.loads(path.read_text()), stage05.setup_distributed("cpu")
    again, *_ = stage05.configure(vars(stage05.build_parser().parse_args(["--config", str(path)])), d)
    assert stage05.asdict(again) == saved
    again, *_ = stage05.configure(vars(stage05.build_parser().parse_args(["--config", str(path), "--epochs", "3"])), d)
    assert again.epochs == 3
    rerun = stage05.main(["--config", str(path)])  # a new folder, the same settings and results
    assert Path(rerun["run_dir"]).name == "orig-2"
    assert json.loads((Path(rerun["run_dir"]) / "config.json").read_text()) == saved
    assert rerun["history"][0]["mAP_raw"] == summary["history"][0]["mAP_raw"]


def test_presets_precedence(stage05):
    """defaults < preset < flags; the model preset fills the model fields nobody set."""
    demo = stage05.make_config({}, "synthetic")
    assert demo.preset == "demo" and demo.epochs == 8 and demo.d_model == 128 and demo.backbone == "test_resnet"
    coco = stage05.make_config({"epochs": 3}, "custom")
    assert coco.preset == "coco" and coco.epochs == 3 and coco.d_model == 2048 and coco.pretrained is True
    mixed = stage05.make_config({"preset": "coco", "model": "demo", "d_model": 64}, "custom")
    assert mixed.d_model == 64 and mixed.dim_feedforward == 512 and mixed.img_size == 448


def stop_with_sigterm_then_resume(stage05, tiny_coco, tmp_path, monkeypatch, *extra):
    """An uninterrupted 2-epoch run, and the same run stopped by SIGTERM at step 6 then resumed."""
    full = stage05.main(tiny_args(tiny_coco, tmp_path, "full", *extra))

    def signal_at_step_6(criterion):
        calls = [0]

        def wrapped(logits, targets):
            calls[0] += torch.is_grad_enabled()  # training steps only, not validation's val/loss
            if calls[0] == 6 and torch.is_grad_enabled():  # in the middle of epoch 2 (4 steps per epoch)
                signal.raise_signal(signal.SIGTERM)
            return criterion(logits, targets)

        return wrapped

    with monkeypatch.context() as patch:
        with_criterion(stage05, patch, signal_at_step_6)
        with pytest.raises(SystemExit) as stopped:
            stage05.main(tiny_args(tiny_coco, tmp_path, "cut", *extra))
    assert stopped.value.code == 128 + signal.SIGTERM  # 143: a wrapper script can tell it from a finished run
    last = tmp_path / "cut" / "last.pt"
    assert load(last)["step"] == 6
    log = (tmp_path / "cut" / "train.log").read_text()
    assert f"--resume {last}" in log and "best.pt: mAP" in log  # epoch 1 made a best.pt
    resumed = stage05.main(["--resume", str(last)])
    assert resumed["outcome"] == "done" and resumed["run_dir"] == str(tmp_path / "cut")
    return full, resumed


def test_sigterm_then_resume_equals_uninterrupted_run(stage05, tiny_coco, tmp_path, monkeypatch):
    """SIGTERM mid-epoch writes last.pt and stops; resuming ends with the uninterrupted run's weights, EMA,
    learning rates and metrics, and the learning-rate schedule spans exactly the requested epochs."""
    full, resumed = stop_with_sigterm_then_resume(stage05, tiny_coco, tmp_path, monkeypatch)
    a, b = load(Path(full["run_dir"]) / "last.pt"), load(Path(resumed["run_dir"]) / "last.pt")
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["ema"], b["ema"], "EMA")
    for key in ("lr", "mAP_raw", "mAP_ema", "train_loss"):
        assert [h[key] for h in a["progress"]["history"]] == [h[key] for h in b["progress"]["history"]], key
    assert b["scheduler"]["last_epoch"] == b["scheduler"]["total_steps"] == b["step"] == 2 * 4
    assert [h["epoch"] for h in history_of(resumed["run_dir"])] == [1, 2]


@pytest.mark.hardening
def test_resume_refuses_a_changed_recipe(stage05, tiny_coco, tmp_path, capsys):
    run = stage05.main(tiny_args(tiny_coco, tmp_path, "r", epochs=1))
    fails(stage05, capsys, ["--resume", str(Path(run["run_dir"]) / "last.pt"), "--epochs", "3"],
          "--epochs: checkpoint 1, now 3", "--init-from")


def test_resume_auto_and_init_from(stage05, tiny_coco, tmp_path, capsys):
    """--resume auto = <out-dir>/<name>/last.pt (not the newest run); --init-from starts a new run (its own
    schedule) from a checkpoint's weights, --init-ema from its EMA weights."""
    first = stage05.main(tiny_args(tiny_coco, tmp_path, "a", epochs=1))
    (tmp_path / "b").mkdir()
    last = load(Path(first["run_dir"]) / "last.pt")
    stage05.save_atomic({**last, "progress": {**last["progress"], "epoch": 0}}, tmp_path / "b" / "last.pt")
    os.utime(Path(first["run_dir"]) / "last.pt", (1, 1))  # run a is the older one
    auto = stage05.main(tiny_args(tiny_coco, tmp_path, "a", epochs=1)[:-2] + ["--name", "a", "--resume", "auto"])
    assert auto["run_dir"] == first["run_dir"] and auto["epochs"] == 1  # a had finished: nothing left to do

    best = tmp_path / "a" / "best.pt"
    start = stage05.main(tiny_args(tiny_coco, tmp_path, "more", "--init-from", str(best), "--lr", "1e-12",
                                   "--backbone-lr", "1e-12", epochs=1))  # steps too small to move the weights
    new, old = load(Path(start["run_dir"]) / "last.pt"), load(best)
    assert start["run_dir"] == str(tmp_path / "more") and new["step"] == 4 and new["scheduler"]["total_steps"] == 4
    assert "weights from" in (tmp_path / "more" / "train.log").read_text()
    params = [k for k in old["model"] if "running_" not in k and "num_batches" not in k]
    assert max((new["model"][k] - old["model"][k]).abs().max().item() for k in params) < 1e-6
    assert max((new["ema"][k] - old["model"][k]).abs().max().item() for k in params) < 1e-6  # the EMA too
    ema_start = stage05.main(tiny_args(tiny_coco, tmp_path, "more-ema", "--init-from",
                                       str(tmp_path / "a" / "last.pt"), "--init-ema", epochs=1))
    assert ema_start["outcome"] == "done"


@pytest.mark.hardening
def test_resume_and_init_mistakes_are_one_line(stage05, tiny_coco, tmp_path, capsys):
    run = Path(stage05.main(tiny_args(tiny_coco, tmp_path, "x", epochs=1))["run_dir"])
    fails(stage05, capsys, ["--resume", str(run / "best.pt")], "holds weights only", f"--init-from {run / 'best.pt'}")
    fails(stage05, capsys, ["--resume", str(run)], "is a folder", str(run / "last.pt"))
    fails(stage05, capsys, ["--resume", "auto", "--out-dir", str(tmp_path), "--name", "nope"], "no ", "nope/last.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    fails(stage05, capsys, ["--resume", str(bad)], "bad.pt")
    fails(stage05, capsys, ["--resume", str(tmp_path / "missing.pt")], "does not exist")
    fails(stage05, capsys, tiny_args(tiny_coco, tmp_path, "y", "--init-ema"), "--init-from")
    fails(stage05, capsys, tiny_args(tiny_coco, tmp_path, "y", "--init-from", str(run / "best.pt"), "--init-ema"),
          "no EMA weights")
    fails(stage05, capsys, tiny_args(tiny_coco, tmp_path, "y", "--init-from", str(run / "best.pt"),
                                     "--d-model", "64"), "do not fit")
    fails(stage05, capsys, ["--config", str(run / "config.json"), "--resume", str(run / "last.pt")], "--resume")
    assert not (tmp_path / "y").exists()


@pytest.mark.hardening
@pytest.mark.parametrize("flags, snippets", [
    (["--epochs", "0"], ["--epochs 0", "> 0"]),
    (["--batch-size", "-1"], ["--batch-size -1"]),
    (["--lr", "0"], ["--lr 0"]),
    (["--warmup-pct", "1.5"], ["--warmup-pct 1.5"]),
    (["--epoch", "1"], ["unrecognized arguments: --epoch", "did you mean --epochs?"]),
    (["--heads", "2"], ["did you mean --num-heads?"]),
    (["--weights", "no/such/weights.pth"], ["no/such/weights.pth"]),
    (["--backbone", "no_such_net"], ["no_such_net"]),
    (["--model", "no_such_preset"], ["--model", "no_such_preset"]),
    (["--d-model", "30"], ["divisible"]),
    (["--batch-size", "64"], ["--batch-size 64", "lower --batch-size"]),
    (["--device", "gpu0"], ["gpu0", "not a device"]),
])
def test_flag_mistakes_are_one_line_errors_before_any_run_folder(stage05, tiny_coco, tmp_path, capsys, flags,
                                                                 snippets):
    fails(stage05, capsys, tiny_args(tiny_coco, tmp_path, "bad", *flags), *snippets)
    assert not (tmp_path / "bad").exists()  # no run folder for a run that never started


@pytest.mark.hardening
def test_unavailable_pretrained_weights_advise_flags_that_exist(stage05, tiny_coco, tmp_path, capsys, monkeypatch):
    """Offline without cached weights (the coco preset asks for them): name --weights and --no-pretrained,
    never "drop --pretrained" to a user who did not pass it."""
    def offline(config):
        raise stage05.backbone.WeightsUnavailableError("cannot reach the hub; drop --pretrained")

    monkeypatch.setattr(stage05.transformer, "Query2Label", offline)
    err = fails(stage05, capsys, tiny_args(tiny_coco, tmp_path, "bad", "--pretrained"), "--weights FILE",
                "--no-pretrained")
    assert "drop --pretrained" not in err and not (tmp_path / "bad").exists()


@pytest.mark.hardening
def test_data_mistakes_are_one_line_errors(stage05, tiny_coco, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    args = tiny_args(tiny_coco, tmp_path, "bad")
    args[args.index("--train-ann") + 1] = str(broken)
    fails(stage05, capsys, args, "broken.json")
    args[args.index("--train-ann") + 1] = str(tmp_path / "nowhere.json")
    fails(stage05, capsys, args, "nowhere.json")
    fails(stage05, capsys, ["--data-root", str(tmp_path / "coco_typo"), "--out-dir", str(tmp_path)], "coco_typo")
    assert not (tmp_path / "bad").exists()


def test_unreadable_images_are_replaced_in_training_and_left_out_of_validation(stage05, tiny_coco, tmp_path):
    """One cut-off JPEG in each split, through a one-epoch run: training uses the next readable image,
    validation leaves it out of the metric (14 of 15 images scored), and the log says so."""
    import shutil

    coco = {}
    for split in ("train", "val"):
        shutil.copytree(Path(tiny_coco[f"{split}_images"]).parent, tmp_path / split)
        coco[f"{split}_images"], coco[f"{split}_ann"] = tmp_path / split / "images", tmp_path / split / "instances.json"
        image = coco[f"{split}_images"] / "00003.jpg"
        image.write_bytes(image.read_bytes()[:300])
    run = stage05.main(tiny_args(coco, tmp_path, "bad", epochs=1))
    (h,) = run["history"]
    assert h["images_scored"] == 14 and h["bad_images"] == 1 and h["bad_val_images"] == 1
    assert "1 training (replaced), 1 validation (left out)" in (tmp_path / "bad" / "train.log").read_text()


def test_nonfinite_guard(stage05, tiny_coco, tmp_path, monkeypatch):
    def nan_at(steps):
        def wrap(criterion):
            calls = [0]

            def wrapped(logits, targets):
                calls[0] += torch.is_grad_enabled()  # training steps only, not validation's val/loss
                loss = criterion(logits, targets)
                return loss * float("nan") if calls[0] in steps and torch.is_grad_enabled() else loss

            return wrapped

        return wrap

    # One NaN: the step is skipped, reported, and training goes on with finite weights.
    with monkeypatch.context() as patch:
        with_criterion(stage05, patch, nan_at({3}))
        run = stage05.main(tiny_args(tiny_coco, tmp_path, "once", epochs=1))
    assert run["outcome"] == "done" and run["nonfinite_total"] == 1
    assert "non-finite loss or gradient at epoch 1 step 3" in (Path(run["run_dir"]) / "train.log").read_text()
    weights = load(Path(run["run_dir"]) / "last.pt")["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())

    # Three in a row (--max-nonfinite 3): the run stops (exit 1), and last.pt is the last good one (epoch 1).
    with monkeypatch.context() as patch:
        with_criterion(stage05, patch, nan_at({6, 7, 8}))
        with pytest.raises(SystemExit) as stopped:
            stage05.main(tiny_args(tiny_coco, tmp_path, "repeat", "--max-nonfinite", "3"))
    assert stopped.value.code == 1
    assert "3 non-finite losses in a row; stopping" in (tmp_path / "repeat" / "train.log").read_text()
    assert load(tmp_path / "repeat" / "last.pt")["step"] == 4


def test_interrupted_save_leaves_previous_checkpoint(stage05, tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    stage05.save_atomic({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dies_half_way(obj, f):
        real_save(obj, f)
        f.truncate(10)  # a partial file, as a kill during the write would leave
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        stage05.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    ckpt = load(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    assert not path.with_name("last.pt.tmp").exists()


def test_a_signal_during_a_save_waits_until_the_file_is_complete(stage05, tmp_path, monkeypatch):
    """A second Ctrl-C while last.pt is written: the write finishes, then the interrupt arrives."""
    real_save = torch.save

    def signalled_half_way(obj, f):
        signal.raise_signal(signal.SIGINT)  # with Python's default handler: KeyboardInterrupt, if not held
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", signalled_half_way)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever earlier tests left installed
    try:
        with pytest.raises(KeyboardInterrupt):
            stage05.save_atomic({"step": 3, "w": torch.ones(2)}, tmp_path / "last.pt")
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    assert load(tmp_path / "last.pt")["step"] == 3  # complete, although nothing was there before


def run_script(args, env=None, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_and_resume_gives_the_same_weights_and_history(stage05, tiny_coco, tmp_path):
    """A real SIGKILL at an unknown moment after the first step checkpoint; the work since that checkpoint
    is lost and redone; the end result is bit-identical, and history.jsonl has each epoch once."""
    if os.environ.get("Q2L_STAGE_05"):
        pytest.skip("runs 05_train.py itself in a subprocess")
    common = ("--save-every-steps", "2")
    full = run_script(["05_train.py", *tiny_args(tiny_coco, tmp_path, "full", *common, epochs=3)], env={})
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out

    victim = run_script(["05_train.py", *tiny_args(tiny_coco, tmp_path, "victim", *common, epochs=3)])
    last = tmp_path / "victim" / "last.pt"
    deadline = time.time() + 240
    while not (last.exists() and load(last)["step"] >= 6) and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # after epoch 1 ended (step 4): a kill inside epoch 2
    victim.send_signal(signal.SIGKILL)
    out, _ = victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{out}"
    killed_at = load(last)["step"]
    assert killed_at < 12

    resumed = run_script(["05_train.py", "--resume", str(last)])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"step {killed_at}" in out
    a, b = load(tmp_path / "full" / "last.pt"), load(last)
    assert a["step"] == b["step"] == 12
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["ema"], b["ema"], "EMA")
    history = (tmp_path / "victim" / "history.jsonl").read_text()
    print(f"killed at step {killed_at}; history.jsonl after the resume:\n{history}")
    assert [json.loads(line)["epoch"] for line in history.splitlines()] == [1, 2, 3]
    same = ("epoch", "step", "train_loss", "mAP_raw", "mAP_ema")
    assert [{k: h[k] for k in same} for h in history_of(tmp_path / "victim")] == \
        [{k: h[k] for k in same} for h in history_of(tmp_path / "full")]
    log = (tmp_path / "victim" / "train.log").read_text()
    assert [log.count(f"epoch {e}/3: loss") for e in (1, 2, 3)] == [1, 1, 1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reevaluate(path, use_ema=False):
    """mAP of a checkpoint's weights on its validation set, in this one process (06's functions)."""
    data, evaluation = importlib.import_module("01_data"), importlib.import_module("06_eval")
    model, ckpt = evaluation.load_for_eval(path, use_ema=use_ema)
    info = ckpt["data"]
    dataset = data.CocoMultiLabel(info["val_images"], info["val_ann"], data.build_transforms(info["img_size"],
                                  train=False), substitute=False)
    loader = data.build_loader(dataset, 8, train=False, workers=0)
    scores, targets = evaluation.predict_scores(model, loader, "cpu", show=False)
    return evaluation.score_dataset(scores, targets, ckpt["class_names"])["ap"]["mAP"]


def torchrun(tmp_path, name, args, nodes=None):
    """05_train.py under torchrun with 2 gloo processes: one node, or `nodes` single-process nodes."""
    port = free_port()
    if nodes is None:
        launches = [["--nproc_per_node=2", f"--master_port={port}"]]
    else:  # several machines, here two processes on this one meeting at a localhost rendezvous
        launches = [["--nnodes=2", "--nproc_per_node=1", f"--node_rank={n}", "--rdzv_backend=c10d",
                     f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=q2l-test"] for n in range(nodes)]
    procs = [run_script(["-m", "torch.distributed.run", *launch, "05_train.py", *args]) for launch in launches]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    return tmp_path / name


@pytest.mark.parametrize("n_val", [1, pytest.param(3, marks=pytest.mark.slow), 9])
def test_two_process_validation_is_what_the_checkpoints_give(stage05, tiny_coco, tmp_path, n_val):
    """2 gloo processes; every validation image scored once (1 image: one process has none, and nothing
    hangs); the logged raw and EMA mAP equal re-evaluating best.pt and last.pt in one process."""
    if os.environ.get("Q2L_STAGE_05"):
        pytest.skip("runs 05_train.py itself under torchrun")
    val_images, val_ann = write_tiny_coco(tmp_path / "val", n_val, seed=3)
    coco = {**tiny_coco, "val_images": val_images, "val_ann": val_ann}
    run = torchrun(tmp_path, "ddp", tiny_args(coco, tmp_path, "ddp", "--batch-size", "4", epochs=1))
    (h,) = history_of(run)
    last, best = load(run / "last.pt"), load(run / "best.pt")
    again = {"raw": reevaluate(run / "last.pt"), "ema": reevaluate(run / "last.pt", use_ema=True),
             "best": reevaluate(run / "best.pt")}
    print(f"{n_val} validation images, 2 processes: logged raw {h['mAP_raw']:.6f} EMA {h['mAP_ema']:.6f} "
          f"best {best['best_map']:.6f}; re-evaluated raw {again['raw']:.6f} EMA {again['ema']:.6f} "
          f"best.pt {again['best']:.6f}")
    assert h["images_scored"] == n_val and last["world_size"] == 2 and not (tmp_path / "ddp-2").exists()
    assert abs(again["raw"] - h["mAP_raw"]) < 1e-9 and abs(again["ema"] - h["mAP_ema"]) < 1e-9
    assert abs(again["best"] - best["best_map"]) < 1e-9
    assert "processes: 2" in (run / "train.log").read_text()


@pytest.mark.slow
def test_two_single_process_nodes_match_one_two_process_node(stage05, tiny_coco, tmp_path):
    """torchrun --nnodes 2 (c10d rendezvous on localhost) gives the checkpoints of --nproc_per_node 2."""
    if os.environ.get("Q2L_STAGE_05"):
        pytest.skip("runs 05_train.py itself under torchrun")
    one = torchrun(tmp_path, "node", tiny_args(tiny_coco, tmp_path, "node", "--batch-size", "4", epochs=1))
    two = torchrun(tmp_path, "nodes", tiny_args(tiny_coco, tmp_path, "nodes", "--batch-size", "4", epochs=1), nodes=2)
    a, b = load(one / "last.pt"), load(two / "last.pt")
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["ema"], b["ema"], "EMA")
    assert history_of(two)[0]["images_scored"] == 15
    assert [h["mAP_ema"] for h in history_of(one)] == [h["mAP_ema"] for h in history_of(two)]


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_mixed_precision_run_trains_and_checkpoints(stage05, tiny_coco, tmp_path, amp):
    """On CUDA: fp16 trains through a gradient scaler whose state is checkpointed, bf16 without one;
    losses, metrics and saved weights are finite and the checkpoint loads on the CPU."""
    summary = stage05.main(tiny_args(tiny_coco, tmp_path, amp, "--device", "cuda", "--amp", amp,
                                     "--no-deterministic"))
    assert summary["outcome"] == "done" and summary["epochs"] == 2
    history = history_of(summary["run_dir"])
    assert all(torch.isfinite(torch.tensor([h["train_loss"], h["mAP_raw"]])).all() for h in history)
    last = load(Path(summary["run_dir"]) / "last.pt")
    assert last["config"]["amp"] == amp
    assert ("scale" in last["scaler"]) == (amp == "fp16")  # a disabled scaler saves an empty state
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


@pytest.mark.gpu
def test_cuda_fp16_sigterm_then_resume_equals_uninterrupted_run(stage05, tiny_coco, tmp_path, monkeypatch):
    """The same exact-resume guarantee on CUDA with fp16 and --deterministic: the gradient scaler's
    state and the CUDA random state come back with the rest."""
    full, resumed = stop_with_sigterm_then_resume(stage05, tiny_coco, tmp_path, monkeypatch,
                                                  "--device", "cuda", "--amp", "fp16")
    a, b = load(Path(full["run_dir"]) / "last.pt"), load(Path(resumed["run_dir"]) / "last.pt")
    assert a["scaler"] == b["scaler"]
    assert_same_tensors(a["model"], b["model"], "model")


@pytest.mark.hardening
def test_bad_device_flag_is_a_clear_error(stage05, capsys):
    with pytest.raises(SystemExit):
        stage05.setup_distributed("gpu0")
    assert "not a device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            stage05.setup_distributed("cuda")
        assert "sees no CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_run_checkpoints_plain_weights_and_resumes(stage05, tiny_coco, tmp_path, monkeypatch):
    """--compile: checkpoints hold the plain module's keys (no torch.compile prefix), so 06_eval and
    uncompiled runs read them, and a stopped compiled run resumes to the end. (Slow: compiling takes
    about a minute on 2 cores.)"""
    full, resumed = stop_with_sigterm_then_resume(stage05, tiny_coco, tmp_path, monkeypatch,
                                                  "--compile", "--no-deterministic")
    a, b = load(Path(full["run_dir"]) / "last.pt"), load(Path(resumed["run_dir"]) / "last.pt")
    assert not any(key.startswith("_orig_mod.") for key in a["model"])
    assert a["model"].keys() == b["model"].keys() and b["step"] == 8
    worst = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]
                if a["model"][k].is_floating_point())
    assert worst < 1e-3, f"resumed compiled run drifted from the uninterrupted one by {worst}"
