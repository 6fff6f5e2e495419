"""tools/bench_loss.py: stage 4's benchmark runs and prints its figures (timings themselves are not tested)."""

import pytest
import torch
from tools import bench_loss


def test_benchmark_prints_every_candidate_with_its_ratio_to_bce(capsys):
    threads = torch.get_num_threads()
    try:
        bench_loss.main(["--rounds", "1", "--inner", "1"])
    finally:
        torch.set_num_threads(threads)  # the benchmark pins 1 thread; the rest of the session keeps its own
    out = capsys.readouterr().out
    assert "median of 1 interleaved rounds of 1 calls" in out
    for name in ("F.binary_cross_entropy_with_logits (sum)", "ASL default (g- 4, g+ 0, m 0.05, sum)",
                 "ASL default, check_targets=False", "ASL Q2L settings (g- 2, m 0, eps 1e-5, q2l)"):
        assert name in out and out.split(name)[1].split("\n")[0].count("x BCE") == 1, name
    assert "1.00x BCE" in out


@pytest.mark.hardening
def test_bad_values_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as stop:
        bench_loss.main(["--rounds", "0"])
    assert stop.value.code == 2 and "--rounds" in capsys.readouterr().err
