"""Stage 5: the training job, on a tiny COCO-format dataset and a tiny model.

Most runs happen in-process through `stage05.main([...])` (fast: no new interpreter); the kill test
and the two-process test start real processes, because that is what they are about.
"""

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

ROOT = Path(__file__).resolve().parents[1]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, what):
    assert a.keys() == b.keys(), what
    differ = [key for key in a if not torch.equal(a[key], b[key])]
    if differ:  # say how far apart, so a failure on another machine tells drift from a real bug
        worst = max((a[k].double() - b[k].double()).abs().max().item() for k in differ)
        raise AssertionError(f"{what}: {len(differ)} of {len(a)} tensors differ, first {differ[0]}, "
                             f"largest difference {worst:.3g}")


def test_one_epoch_writes_checkpoints_config_and_tensorboard(stage05, tiny_coco, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = stage05.main(tiny_args(tiny_coco, tmp_path, "one", epochs=1))
    run = Path(summary["run_dir"])
    assert summary["outcome"] == "done" and summary["epochs"] == 1
    for name in ("last.pt", "best.pt", "config.json", "history.jsonl", "train.log", "curves.png"):
        assert (run / name).is_file(), name
    last, best = load(run / "last.pt"), load(run / "best.pt")
    assert last["format"] == best["format"] == "q2l-checkpoint-v1"
    assert best["weights_source"] in ("raw", "ema") and best["class_names"] == ["square", "disc", "bar"]
    assert json.loads((run / "config.json").read_text())["epochs"] == 1
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["images_scored"] == 15
    assert abs(best["best_map"] - max(history[0]["mAP_raw"], history[0]["mAP_ema"])) < 1e-9
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_s", "val/mAP_raw", "val/mAP_ema",
            "val/CF1", "val/OF1"} <= tags
    (mAP,) = events.Scalars("val/mAP_raw")
    assert abs(mAP.value - history[0]["mAP_raw"]) < 1e-4  # TensorBoard stores float32
    assert any(tag.startswith("pr/") for tag in events.Tags()["tensors"])  # PR curves at the end


def stop_with_sigterm_then_resume(stage05, tiny_coco, tmp_path, monkeypatch, *extra):
    """An uninterrupted 2-epoch run, and the same run stopped by SIGTERM at step 6 then resumed."""
    full = stage05.main(tiny_args(tiny_coco, tmp_path, "full", *extra))
    original = stage05.build_loss

    def loss_that_signals_at_step_6(config):
        criterion, calls = original(config), [0]

        def wrapped(logits, targets):
            calls[0] += 1
            if calls[0] == 6:  # in the middle of epoch 2 (4 steps per epoch)
                signal.raise_signal(signal.SIGTERM)
            return criterion(logits, targets)

        return wrapped

    monkeypatch.setattr(stage05, "build_loss", loss_that_signals_at_step_6)
    stopped = stage05.main(tiny_args(tiny_coco, tmp_path, "cut", *extra))
    assert stopped["outcome"] == "stopped"
    assert load(Path(stopped["run_dir"]) / "last.pt")["step"] == 6
    monkeypatch.setattr(stage05, "build_loss", original)
    resumed = stage05.main(["--resume", str(Path(stopped["run_dir"]) / "last.pt")])
    assert resumed["outcome"] == "done" and resumed["run_dir"] == stopped["run_dir"]
    return full, resumed


def test_sigterm_then_resume_equals_uninterrupted_run(stage05, tiny_coco, tmp_path, monkeypatch):
    """SIGTERM mid-epoch writes last.pt and stops; resuming ends with the uninterrupted run's weights,
    and the learning-rate schedule spans exactly the requested epochs."""
    full, resumed = stop_with_sigterm_then_resume(stage05, tiny_coco, tmp_path, monkeypatch)
    a, b = load(Path(full["run_dir"]) / "last.pt"), load(Path(resumed["run_dir"]) / "last.pt")
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["ema"]["module"], b["ema"]["module"], "EMA")
    assert [h["lr"] for h in a["state"]["history"]] == [h["lr"] for h in b["state"]["history"]]
    assert [h["mAP_raw"] for h in a["state"]["history"]] == [h["mAP_raw"] for h in b["state"]["history"]]
    steps = 2 * 4
    assert b["scheduler"]["last_epoch"] == steps == b["step"]
    assert b["scheduler"]["total_steps"] == steps


def test_resume_refuses_a_changed_recipe(stage05, tiny_coco, tmp_path):
    run = stage05.main(tiny_args(tiny_coco, tmp_path, "r", epochs=1))
    with pytest.raises(SystemExit, match="--epochs: checkpoint 1, now 3"):
        stage05.main(["--resume", str(Path(run["run_dir"]) / "last.pt"), "--epochs", "3"])


def test_nonfinite_guard(stage05, tiny_coco, tmp_path, monkeypatch):
    original = stage05.build_loss

    def loss_with_nans(at_steps):
        def build(config):
            criterion, calls = original(config), [0]

            def wrapped(logits, targets):
                calls[0] += 1
                loss = criterion(logits, targets)
                return loss * float("nan") if calls[0] in at_steps else loss

            return wrapped

        return build

    # One NaN: the step is skipped, reported, and training goes on with finite weights.
    monkeypatch.setattr(stage05, "build_loss", loss_with_nans({3}))
    run = stage05.main(tiny_args(tiny_coco, tmp_path, "once", epochs=1))
    assert run["outcome"] == "done" and run["nonfinite_total"] == 1
    log = (Path(run["run_dir"]) / "train.log").read_text()
    assert "non-finite loss or gradient at epoch 1 step 3" in log
    weights = load(Path(run["run_dir"]) / "last.pt")["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())

    # Three in a row (--max-nonfinite 3): the run stops, and last.pt is the last good one (epoch 1).
    monkeypatch.setattr(stage05, "build_loss", loss_with_nans({6, 7, 8}))
    with pytest.raises(SystemExit):
        stage05.main(tiny_args(tiny_coco, tmp_path, "repeat", "--max-nonfinite", "3"))
    run_dir = tmp_path / "repeat"
    assert "3 non-finite losses in a row; stopping" in (run_dir / "train.log").read_text()
    assert load(run_dir / "last.pt")["step"] == 4


def test_interrupted_save_leaves_previous_checkpoint(stage05, tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    stage05.save_atomic({"format": "q2l-checkpoint-v1", "step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dies_half_way(obj, f):
        real_save(obj, f)
        f.truncate(10)  # a partial file, as a kill during the write would leave
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        stage05.save_atomic({"format": "q2l-checkpoint-v1", "step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    ckpt = load(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))


def test_bad_checkpoint_gives_a_clear_error(stage05, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="bad.pt is not a readable checkpoint"):
        stage05.main(["--resume", str(bad)])
    with pytest.raises(SystemExit, match="does not exist"):
        stage05.main(["--resume", str(tmp_path / "missing.pt")])


def test_benchmark_reports_both_rates(stage05, tiny_coco, tmp_path):
    result = stage05.main(tiny_args(tiny_coco, tmp_path, "bench", "--benchmark", "--benchmark-steps", "2"))
    assert result["train_images_per_s"] > 0 and result["data_images_per_s"] > 0


def run_script(args, env=None, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_and_resume_gives_the_same_weights(stage05, tiny_coco, tmp_path):
    """A real SIGKILL at an unknown moment after the first step checkpoint; the work since that
    checkpoint is lost and redone; the end result is bit-identical."""
    if os.environ.get("Q2L_STAGE_05"):
        pytest.skip("runs 05_train.py itself in a subprocess")
    common = ("--save-every-steps", "2")
    full = run_script(["05_train.py", *tiny_args(tiny_coco, tmp_path, "full", *common, epochs=3)])
    out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, out

    victim = run_script(["05_train.py", *tiny_args(tiny_coco, tmp_path, "victim", *common, epochs=3)])
    last = tmp_path / "victim" / "last.pt"
    deadline = time.time() + 240
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
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
    assert_same_tensors(a["ema"]["module"], b["ema"]["module"], "EMA")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_scores_every_validation_image_once(stage05, tiny_coco, tmp_path):
    if os.environ.get("Q2L_STAGE_05"):
        pytest.skip("runs 05_train.py itself under torchrun")
    args = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "05_train.py", *tiny_args(tiny_coco, tmp_path, "ddp", "--batch-size", "4", epochs=1)]
    proc = run_script(args, env={"OMP_NUM_THREADS": "1"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    run = tmp_path / "ddp"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert history[0]["images_scored"] == 15  # 15 images over 2 processes: 8 + 7, none twice
    assert "processes: 2" in (run / "train.log").read_text()
    assert load(run / "last.pt")["world_size"] == 2
    assert not (tmp_path / "ddp-2").exists()  # one run folder for both processes


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_mixed_precision_run_trains_and_checkpoints(stage05, tiny_coco, tmp_path, amp):
    """On CUDA: fp16 trains through a gradient scaler whose state is checkpointed, bf16 without one;
    losses, metrics and saved weights are finite and the checkpoint loads on the CPU."""
    summary = stage05.main(tiny_args(tiny_coco, tmp_path, amp, "--device", "cuda", "--amp", amp,
                                     "--no-deterministic"))
    run = Path(summary["run_dir"])
    assert summary["outcome"] == "done" and summary["epochs"] == 2
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor([h["train_loss"], h["mAP_raw"]])).all() for h in history)
    last = load(run / "last.pt")
    assert last["args"]["amp"] == amp
    assert ("scale" in last["scaler"]) == (amp == "fp16")  # a disabled scaler saves an empty state
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


@pytest.mark.gpu
def test_cuda_benchmark_reports_peak_memory(stage05, tiny_coco, tmp_path):
    result = stage05.main(tiny_args(tiny_coco, tmp_path, "bench", "--device", "cuda", "--amp", "bf16",
                                    "--benchmark", "--benchmark-steps", "3"))
    assert result["device"].startswith("cuda") and result["peak_gpu_memory_gib"] > 0
    assert result["train_images_per_s"] > 0 and result["data_images_per_s"] > 0


@pytest.mark.gpu
def test_cuda_fp16_sigterm_then_resume_equals_uninterrupted_run(stage05, tiny_coco, tmp_path, monkeypatch):
    """The same exact-resume guarantee on CUDA with fp16 and --deterministic: the gradient scaler's
    state and the CUDA random state come back with the rest."""
    full, resumed = stop_with_sigterm_then_resume(stage05, tiny_coco, tmp_path, monkeypatch,
                                                  "--device", "cuda", "--amp", "fp16")
    a, b = load(Path(full["run_dir"]) / "last.pt"), load(Path(resumed["run_dir"]) / "last.pt")
    worst = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"]
                if a["model"][k].is_floating_point())
    print(f"largest weight difference, resumed vs uninterrupted (CUDA, fp16): {worst:.3g}")
    assert a["scaler"] == b["scaler"]
    assert_same_tensors(a["model"], b["model"], "model")


def test_bad_device_flag_is_a_clear_error(stage05):
    with pytest.raises(SystemExit, match="not a device"):
        stage05.setup_distributed("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA device"):
            stage05.setup_distributed("cuda")


@pytest.mark.parametrize("flags, message", [
    (["--weights", "no/such/weights.pth"], "does not exist"),
    (["--backbone", "no_such_net"], "unknown timm model"),
    (["--model", "no_such_preset"], "not a preset"),
    (["--d-model", "30"], "divisible by 4"),
])
def test_model_mistakes_are_one_line_errors(stage05, tiny_coco, tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        stage05.main(tiny_args(tiny_coco, tmp_path, "bad", *flags))


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
