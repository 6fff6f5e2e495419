"""tools/ap_studies.py and tools/bench_ap.py: the studies' numbers on hand-made cases, and both tools run."""

import numpy as np
import pytest

from tools import ap_studies, bench_ap


def test_per_batch_retrieval_ap_is_not_per_class_map(stage06):
    scores = np.array([[0.9, 0.2], [0.8, 0.1]])
    targets = np.array([[0, 1], [1, 0]])
    # per class: class 0 ranks 0.9- 0.8+ -> 1/2; class 1 ranks 0.2+ 0.1- -> 1; mAP 75
    assert stage06.mean_average_precision(scores, targets)["mAP"] == pytest.approx(75.0)
    # one batch of both images, flattened: 0.9- 0.8+ 0.2+ 0.1- -> (1/2 + 2/3) / 2 = 7/12
    assert ap_studies.per_batch_retrieval_ap(scores, targets, batch_size=2) == pytest.approx(100 * 7 / 12)
    # batches of one image: [0.9-, 0.2+] -> 1/2 and [0.8+, 0.1-] -> 1, averaged: 3/4
    assert ap_studies.per_batch_retrieval_ap(scores, targets, batch_size=1) == pytest.approx(75.0)
    # a third image makes a smaller last batch [0.7-, 0.3+] -> 1/2; batches are weighted by their size:
    # (2 * 7/12 + 1 * 1/2) / 3 = 5/9
    scores, targets = np.vstack([scores, [0.3, 0.7]]), np.vstack([targets, [1, 0]])
    assert ap_studies.per_batch_retrieval_ap(scores, targets, batch_size=2) == pytest.approx(100 * 5 / 9)


def test_official_tie_order_matches_ours_without_ties(stage06):
    """With no ties, VOC AP with every image its own threshold (the official formula) equals stage 6's."""
    rng = np.random.default_rng(0)
    scores = rng.random((300, 6))
    targets = (rng.random((300, 6)) < 0.2).astype(float)
    np.testing.assert_allclose(ap_studies.voc_ap_ties_in_order(scores, targets),
                               stage06.voc_average_precision(scores, targets), rtol=0, atol=1e-12)
    # with ties it can only be higher or equal: the envelope picks the luckiest position inside a tie
    tied = scores.round(1)
    assert np.all(ap_studies.voc_ap_ties_in_order(tied, targets)
                  >= stage06.voc_average_precision(tied, targets) - 1e-12)


def test_simulated_model_scores_are_shaped_like_coco():
    scores, targets = ap_studies.simulated_model_scores(4000, 80, seed=1)
    assert scores.shape == targets.shape == (4000, 80) and scores.dtype == np.float32
    assert 0.40 < targets[:, 0].mean() < 0.50  # the "person"-like class
    assert 2.0 < targets.sum(1).mean() < 4.5  # COCO: ~2.9 labels per image


def test_compare_and_plot_writes_the_figure(tmp_path, capsys):
    path = ap_studies.compare_and_plot(tmp_path, num_images=2000)
    out = capsys.readouterr().out
    assert path.is_file() and path.stat().st_size > 20_000
    assert "flattened retrieval AP" in out and "ties ranked by image index" in out


def test_bench_ap_runs_and_agrees_with_scikit_learn(capsys):
    assert bench_ap.main(["--images", "500", "--classes", "4", "--rounds", "1", "--no-before"]) == 0
    out = capsys.readouterr().out
    differences = [float(line.split("scikit-learn ")[-1]) for line in out.splitlines() if "|AP difference|" in line
                   and "largest" in line]
    assert len(differences) == 4 and max(differences) <= 1e-12
    assert "scikit-learn / ours" in out and "top-3 threshold metrics" in out
