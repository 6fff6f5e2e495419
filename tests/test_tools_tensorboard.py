"""tools/tensorboard_check.py: what a run's event files hold as TensorBoard reads them, what its server serves,
and (slow, needs Debian's chromium) the dashboards in a real headless browser."""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tools import tensorboard_check as tb

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def small_log(tmp_path_factory):
    """The kinds 05_train.py writes: scalars (raw and EMA side by side via add_scalars), a PR curve per epoch,
    an image, a text and the hparams entry, for three 'epochs' at steps 10, 20, 30."""
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path_factory.mktemp("tensorboard") / "demo"
    writer = SummaryWriter(str(logdir))
    rng = np.random.default_rng(0)
    for step in (10, 20, 30):
        writer.add_scalar("train/loss", 1 / step, step)
        writer.add_scalar("val/mAP", step / 2, step)
        writer.add_scalars("val/CF1", {"raw": step / 3, "ema": step / 4}, step)
        writer.add_pr_curve("val_pr/disc", rng.integers(0, 2, 40), rng.random(40), step)
    writer.add_image("val/examples", torch.full((3, 24, 32), 200, dtype=torch.uint8), 30)
    writer.add_text("config", "lr: 0.001", 0)
    writer.add_hparams({"lr": 0.001, "backbone": "test_resnet"}, {"hparam/best_mAP": 15.0}, run_name=".")
    writer.close()
    return logdir


def test_lists_every_kind_of_tag(small_log):
    found = tb.list_tags(small_log)
    assert sorted(found) == [".", "val_CF1_ema", "val_CF1_raw"]  # add_scalars: one run folder per curve
    run = found["."]
    assert run["scalars"]["val/mAP"] == (3, 30, 15.0)  # points, last step, last value (exact in float32)
    assert run["scalars"]["train/loss"][:2] == (3, 30)
    assert run["scalars"]["hparam/best_mAP"] == (1, 0, 15.0)  # add_hparams logs its metrics as scalars too
    assert run["images"] == {"val/examples": [30]}
    assert run["pr_curves"] == {"val_pr/disc": [10, 20, 30]}  # one per epoch, on the step axis
    assert run["hparams"] == {"hparams": {"backbone": "test_resnet", "lr": 0.001}, "metrics": ["hparam/best_mAP"]}
    assert run["other"] == {"config/text_summary": "text"}  # listed, not checked
    assert found["val_CF1_raw"]["scalars"] == {"val/CF1": (3, 30, 10.0)}
    assert found["val_CF1_ema"]["scalars"] == {"val/CF1": (3, 30, 7.5)}
    assert not found["val_CF1_raw"]["hparams"] and not found["val_CF1_raw"]["images"]


def test_no_browser_prints_the_listing(small_log, capsys):
    found, written = tb.main(["--logdir", str(small_log), "--no-browser"])
    out = capsys.readouterr().out
    assert written == [] and set(found) == {".", "val_CF1_ema", "val_CF1_raw"}
    for line in ("run .:", "scalar    val/mAP: 3 points, last step 30: 15", "image     val/examples: 1 steps (30)",
                 "pr curve  val_pr/disc: 3 steps (10, 20, 30)", "hparams   2 values: backbone=test_resnet, lr=0.001",
                 "hparams   metrics: hparam/best_mAP", "text      config/text_summary", "run val_CF1_raw:", "scalar    val/CF1: 3 points, last step 30: 10"):
        assert line in out, line


@pytest.mark.hardening
def test_a_folder_without_event_files_is_one_line(tmp_path, capsys):
    for logdir, says in ((tmp_path / "typo", "is not a folder"), (tmp_path, "no TensorBoard event files")):
        with pytest.raises(SystemExit) as stop:
            tb.main(["--logdir", str(logdir), "--no-browser"])
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and says in err and str(logdir) in err and len(err.splitlines()) == 1


def test_tensorboard_serves_every_tag_and_a_missing_one_is_named(small_log):
    """The server half without a browser: TensorBoard's data API serves exactly what the files hold."""
    expected = tb.expected_tags(tb.list_tags(small_log))
    assert expected["hparams"] == {("hparam", "backbone"), ("hparam", "lr"), ("metric", "hparam/best_mAP")}
    url = f"http://127.0.0.1:{tb.free_port()}"
    with tempfile.TemporaryFile(mode="w+") as log_file:
        process = tb.start_tensorboard(small_log, url.rsplit(":", 1)[1], log_file)
        try:
            served = tb.wait_until_served(process, url, expected, timeout=60)
            assert all(served[kind] == expected[kind] for kind in tb.KINDS)
            expected["images"].add((".", "val/not_logged"))
            with pytest.raises(RuntimeError, match="val/not_logged"):
                tb.wait_until_served(process, url, expected, timeout=2)
        finally:
            tb.stop(process)
    assert process.returncode is not None


@pytest.mark.slow
@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"no browser at {CHROMIUM} (Debian's chromium package)")
def test_screenshots_of_every_dashboard(small_log, tmp_path, capsys):
    from PIL import Image

    found, written = tb.main(["--logdir", str(small_log), "--out", str(tmp_path), "--window", "1000", "700",
                              "--chromium", CHROMIUM])
    out = capsys.readouterr().out
    assert "serves every tag of the event files" in out
    for dashboard in tb.DASHBOARDS:
        with Image.open(tmp_path / f"05_tensorboard_{dashboard}.png") as picture:
            assert picture.size == (1000, 700), dashboard
            # not one flat colour: something was drawn below the title bar (the PNGs are for a human to judge)
            assert len(picture.convert("RGB").crop((0, 120, 1000, 700)).getcolors(1 << 20)) > 20, dashboard
    assert out.count("settled after") == len(tb.DASHBOARDS)
    with Image.open(tmp_path / "05_tensorboard_image_val_examples.png") as logged:
        assert logged.size == (32, 24) and logged.getpixel((0, 0)) == (200, 200, 200)  # as logged, full size
    assert len(written) == len(tb.DASHBOARDS) + 1


@pytest.mark.hardening
def test_chromium_missing_is_one_line(small_log, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        tb.main(["--logdir", str(small_log), "--out", str(tmp_path), "--chromium", str(tmp_path / "no_browser")])
    assert stop.value.code == 2 and "--no-browser" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))  # nothing written, no TensorBoard started


def test_runs_as_a_script_from_the_repository_root(small_log):
    done = subprocess.run([sys.executable, "tools/tensorboard_check.py", "--logdir", str(small_log), "--no-browser"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and "val/examples" in done.stdout, done.stderr[-500:]
