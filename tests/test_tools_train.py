"""tools/bench_train.py: the training benchmark, built through 05_train.py's own set-up."""

import pytest
from conftest import tiny_train_args as tiny_args

from tools import bench_train


def test_benchmark_reports_both_rates(tiny_coco, tmp_path, capsys):
    result = bench_train.benchmark(tiny_args(tiny_coco, tmp_path, "bench", "--steps", "2", "--rounds", "1"))
    assert result["train_images_per_s"] > 0 and result["data_images_per_s"] > 0
    assert result["batch_size"] == 8 and result["img_size"] == 64
    out = capsys.readouterr().out
    assert "training step on synthetic tensors" in out and "limits training speed" in out
    assert not (tmp_path / "bench").exists()  # a benchmark is not a run: no run folder


@pytest.mark.gpu
def test_cuda_benchmark_reports_peak_memory(tiny_coco, tmp_path):
    result = bench_train.benchmark(tiny_args(tiny_coco, tmp_path, "bench", "--device", "cuda", "--amp", "bf16",
                                             "--steps", "3", "--rounds", "1"))
    assert result["device"].startswith("cuda") and result["peak_gpu_memory_gib"] > 0
    assert result["train_images_per_s"] > 0 and result["data_images_per_s"] > 0
