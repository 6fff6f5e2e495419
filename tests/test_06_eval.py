"""Stage 6: metrics against scikit-learn and hand computation; evaluation, prediction, attention maps.

The metrics: AP and mAP against scikit-learn, VOC AP and CP/CR/CF1/OP/OR/OF1 against hand computation.
The models: a tiny Query2Label (timm's test_resnet, d 32) for prediction and attention maps; a 2-epoch
05_train.py run (a few seconds) for checkpoint evaluation; a state dict written in the official layout for
--official (no released file can be downloaded here).

Run against your own file:  Q2L_STAGE_06=my_eval.py python -m pytest tests/test_06_eval.py

The worked example (4 images x 5 classes A..E) is the one of docs/06_eval.md:

    scores    A     B     C     D     E        targets  A  B  C  D  E
    img0    0.90  0.80  0.30  0.60  0.10                1  0  1  0  0
    img1    0.80  0.40  0.70  0.20  0.30                1  1  0  0  0
    img2    0.55  0.60  0.60  0.90  0.20                0  1  1  1  0
    img3    0.70  0.20  0.60  0.40  0.45                1  0  0  1  1
"""

import argparse
import dataclasses
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_train_args
from PIL import Image
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    precision_score,
    recall_score,
)

SCORES = np.array([[0.90, 0.80, 0.30, 0.60, 0.10],
                   [0.80, 0.40, 0.70, 0.20, 0.30],
                   [0.55, 0.60, 0.60, 0.90, 0.20],
                   [0.70, 0.20, 0.60, 0.40, 0.45]])
TARGETS = np.array([[1, 0, 1, 0, 0],
                    [1, 1, 0, 0, 0],
                    [0, 1, 1, 1, 0],
                    [1, 0, 0, 1, 1]])
NAMES = ["A", "B", "C", "D", "E"]

# Non-interpolated AP = mean over a class's positives of the precision at that positive's score, where the
# precision at score s counts every known entry scoring >= s (all entries tied at s form one threshold).
#   A: ranking 0.90+ 0.80+ 0.70+ 0.55-             -> precisions 1, 1, 1         -> AP 1
#   B: ranking 0.80- 0.60+ 0.40+ 0.20-             -> precisions 1/2, 2/3        -> AP (1/2 + 2/3)/2 = 7/12
#   C: ranking 0.70- {0.60+ 0.60-} 0.30+           -> the tie is one threshold: at 0.60, 1 positive of 3
#                                                     entries -> 1/3; at 0.30, 2 of 4 -> 1/2  -> AP 5/12
#   D: ranking 0.90+ 0.60- 0.40+ 0.20-             -> precisions 1, 2/3          -> AP 5/6
#   E: ranking 0.45+ ...                           -> precision 1                -> AP 1
HAND_AP = np.array([1, 7 / 12, 5 / 12, 5 / 6, 1])
# VOC all-point interpolated AP: precision at each recall replaced by the best precision at that recall or
# beyond (monotone from the right), then the area under it. Per class, (recall, precision) at each threshold:
#   B: (0, 0) at 0.80, (1/2, 1/2) at 0.60, (1, 2/3) at 0.40, (1, 1/2) at 0.20
#      envelope at recall 1/2: max(1/2, 2/3, 1/2) = 2/3; at recall 1: max(2/3, 1/2) = 2/3
#      AP_VOC = (1/2 - 0) * 2/3 + (1 - 1/2) * 2/3 = 2/3          (plain AP: 7/12)
#   C: (0, 0) at 0.70, (1/2, 1/3) at 0.60, (1, 1/2) at 0.30
#      envelope at recall 1/2: max(1/3, 1/2) = 1/2; at recall 1: 1/2
#      AP_VOC = 1/2 * 1/2 + 1/2 * 1/2 = 1/2                      (plain AP: 5/12)
#   D: (1/2, 1) at 0.90, (1/2, 1/2) at 0.60, (1, 2/3) at 0.40, (1, 1/2) at 0.20
#      envelope at recall 1/2: 1; at recall 1: 2/3 -> 1/2 * 1 + 1/2 * 2/3 = 5/6   (no gap: already monotone)
#   A and E: precision 1 at every positive -> 1
HAND_VOC = np.array([1, 2 / 3, 1 / 2, 5 / 6, 1])


def sklearn_ap(scores, targets):
    """scikit-learn's AP per class on the known entries (target >= 0); NaN where a class has no positive."""
    out = []
    for k in range(scores.shape[1]):
        known = targets[:, k] >= 0
        y, s = targets[known, k], scores[known, k]
        out.append(average_precision_score(y, s) if (y == 1).any() else np.nan)
    return np.array(out)


def reference_voc_ap(s, y):
    """VOC all-point AP of one class, straight from the definition: precision/recall at every distinct
    threshold (ties grouped), sentinels (0, 0) and (1, 0), envelope from the right, area where recall
    moves."""
    s, y = s[y >= 0], y[y >= 0]
    recall, precision = [], []
    for t in np.unique(s)[::-1]:
        predicted = s >= t
        tp = np.sum(predicted & (y == 1))
        recall.append(tp / np.sum(y == 1))
        precision.append(tp / np.sum(predicted))
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    moved = np.flatnonzero(mrec[1:] != mrec[:-1])
    return np.sum((mrec[moved + 1] - mrec[moved]) * mpre[moved + 1])


def random_case(seed, n=300, k=12, decimals=1, unknown=0.0):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random((n, k)), decimals)  # 1 decimal: every class has many ties
    targets = (rng.random((n, k)) < rng.uniform(0.02, 0.5, k)).astype(np.int64)
    targets[:, 0] = 0  # a class without positives
    targets[:, 1] = 1  # a class without negatives
    targets[rng.random((n, k)) < unknown] = -1
    return scores, targets


# ------------------------------------------------------------------------------------------------- AP, mAP


def test_worked_example_ap_and_map(stage06):
    np.testing.assert_allclose(stage06.average_precision(SCORES, TARGETS), HAND_AP, rtol=0, atol=1e-12)
    result = stage06.mean_average_precision(SCORES, TARGETS, class_names=NAMES)
    assert result["mAP"] == pytest.approx(100 * 46 / 60, abs=1e-9)  # (1 + 7/12 + 5/12 + 5/6 + 1) / 5
    np.testing.assert_allclose(result["per_class"], 100 * HAND_AP, rtol=0, atol=1e-9)
    assert result["excluded"] == [] and "non-interpolated" in result["kind"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [1, 2])
def test_ap_matches_sklearn_with_ties_and_degenerate_classes(stage06, seed, decimals):
    scores, targets = random_case(seed, decimals=decimals)
    ours = stage06.average_precision(scores, targets)
    reference = sklearn_ap(scores, targets)
    assert np.isnan(ours[0])  # no positives: NaN (scikit-learn itself would say 0.0 with a warning)
    assert ours[1] == pytest.approx(1.0, abs=1e-12)  # no negatives: every precision is 1
    np.testing.assert_allclose(ours[1:], reference[1:], rtol=0, atol=1e-10)

    names = [f"class{k}" for k in range(scores.shape[1])]
    result = stage06.mean_average_precision(scores, targets, class_names=names)
    assert result["excluded"] == ["class0"]
    assert not np.isnan(result["mAP"])
    assert result["mAP"] == pytest.approx(100 * reference[1:].mean(), abs=1e-8)
    assert result["num_classes"] == scores.shape[1] - 1
    assert np.isnan(result["per_class"][0])
    assert stage06.mean_average_precision(scores, targets)["excluded"] == [0]  # indices without names


def test_ap_on_a_larger_float32_case(stage06):
    rng = np.random.default_rng(3)
    scores = rng.random((5000, 6), dtype=np.float32)
    targets = (rng.random((5000, 6)) < 0.04).astype(np.float32)  # stage 1 gives float32 labels
    np.testing.assert_allclose(stage06.average_precision(scores, targets), sklearn_ap(scores, targets),
                               rtol=0, atol=1e-10)


def test_unknown_targets_are_ignored_by_ap(stage06):
    scores, targets = random_case(4, unknown=0.2)
    ours = stage06.average_precision(scores, targets)
    np.testing.assert_allclose(ours[1:], sklearn_ap(scores, targets)[1:], rtol=0, atol=1e-10)
    # the scores of unknown entries cannot matter, wherever they land in the ranking
    moved = np.where(targets < 0, np.random.default_rng(5).random(scores.shape), scores)
    np.testing.assert_allclose(stage06.average_precision(moved, targets), ours, rtol=0, atol=1e-12)


def test_any_number_of_threads_gives_the_same_ap(stage06):
    scores, targets = random_case(9, n=400, k=7, decimals=2, unknown=0.1)  # ties and unknowns
    one = stage06.average_precision(scores, targets, threads=1)
    for threads in (2, 3, 7, 50):  # 50 > K: one class per thread
        np.testing.assert_array_equal(stage06.average_precision(scores, targets, threads=threads), one)
        np.testing.assert_array_equal(stage06.voc_average_precision(scores, targets, threads=threads),
                                      stage06.voc_average_precision(scores, targets, threads=1))
    bad = scores.copy()
    bad[5, 6] = np.nan  # in the last block: the error raised in a worker thread reaches the caller
    with pytest.raises(ValueError, match="scores contains 1 NaN"):
        stage06.average_precision(bad, np.abs(targets), threads=3)


def test_accepts_torch_tensors(stage06):
    scores, targets = random_case(6, decimals=2)
    expected = stage06.average_precision(scores, targets)
    from_torch = stage06.average_precision(torch.from_numpy(scores), torch.from_numpy(targets))
    np.testing.assert_allclose(from_torch, expected, rtol=0, atol=1e-12, equal_nan=True)
    # boolean and float32 targets mean the same as 0/1 integers
    np.testing.assert_allclose(stage06.average_precision(SCORES, TARGETS == 1), HAND_AP, rtol=0, atol=1e-12)
    np.testing.assert_allclose(stage06.average_precision(SCORES, TARGETS.astype(np.float32)), HAND_AP,
                               rtol=0, atol=1e-12)
    # bfloat16 scores (numpy has no bfloat16): compared with the same values in float32
    low = torch.from_numpy(scores).to(torch.bfloat16)
    np.testing.assert_allclose(stage06.average_precision(low, torch.from_numpy(targets).float()),
                               stage06.average_precision(low.float().numpy(), targets),
                               rtol=0, atol=1e-12, equal_nan=True)


# ------------------------------------------------------------------------------------------------- VOC AP


def test_voc_ap_worked_example(stage06):
    np.testing.assert_allclose(stage06.voc_average_precision(SCORES, TARGETS), HAND_VOC, rtol=0, atol=1e-12)
    result = stage06.mean_average_precision(SCORES, TARGETS, interpolated=True)
    assert result["mAP"] == pytest.approx(80.0, abs=1e-9)  # (1 + 2/3 + 1/2 + 5/6 + 1) / 5
    assert result["kind"] == "VOC all-point interpolated AP"


@pytest.mark.parametrize("seed", [0, 1])
def test_voc_ap_matches_the_definition_and_bounds_ap(stage06, seed):
    scores, targets = random_case(seed, n=120, k=6, unknown=0.1)
    ours = stage06.voc_average_precision(scores, targets)
    reference = [reference_voc_ap(scores[:, k], targets[:, k]) for k in range(1, 6)]
    assert np.isnan(ours[0])
    np.testing.assert_allclose(ours[1:], reference, rtol=0, atol=1e-12)
    assert np.all(ours[1:] >= stage06.average_precision(scores, targets)[1:] - 1e-12)


# ----------------------------------------------------------------------------------------- threshold metrics

# At threshold 0.5 (a score equal to the threshold counts as predicted) the predicted label sets are
#   img0 {A, B, D}   img1 {A, C}   img2 {A, B, C, D}   img3 {A, C}
# Per class: Nc correct, Np predicted, Ng positives -> precision Nc/Np, recall Nc/Ng
#   A: Nc 3 Np 4 Ng 3 -> 3/4, 1       B: Nc 1 Np 2 Ng 2 -> 1/2, 1/2     C: Nc 1 Np 3 Ng 2 -> 1/3, 1/2
#   D: Nc 1 Np 2 Ng 2 -> 1/2, 1/2     E: Nc 0 Np 0 Ng 1 -> 0 (never predicted: precision counts as 0), 0
#   CP = (3/4 + 1/2 + 1/3 + 1/2 + 0) / 5 = 5/12     CR = (1 + 1/2 + 1/2 + 1/2 + 0) / 5 = 1/2
#   CF1 = 2 CP CR / (CP + CR) = (5/12) / (11/12) = 5/11
#   OP = 6/11 (6 correct of 11 predicted)   OR = 6/10 (of 10 positives)
#   OF1 = 2 (6/11)(6/10) / (6/11 + 6/10) = 4/7
HAND_AT_HALF = {"CP": 5 / 12, "CR": 1 / 2, "CF1": 5 / 11, "OP": 6 / 11, "OR": 6 / 10, "OF1": 4 / 7}
# Top-3 (and also >= 0.5, as in ML-GCN's code that the papers' numbers come from): img2 ranks D 0.9, B 0.6,
# C 0.6, A 0.55, so A drops out; img1's third label B (0.4) and img3's third label E (0.45) are below 0.5.
#   img0 {A, B, D}   img1 {A, C}   img2 {B, C, D}   img3 {A, C}
#   A: 3/3, 1   B: 1/2, 1/2   C: 1/3, 1/2   D: 1/2, 1/2   E: 0, 0
#   CP = (1 + 1/2 + 1/3 + 1/2 + 0) / 5 = 7/15   CR = 1/2   CF1 = (7/15) / (29/30) = 14/29
#   OP = 6/10   OR = 6/10   OF1 = 6/10
HAND_TOP3 = {"CP": 7 / 15, "CR": 1 / 2, "CF1": 14 / 29, "OP": 6 / 10, "OR": 6 / 10, "OF1": 6 / 10}


@pytest.mark.parametrize("top_k, hand", [(None, HAND_AT_HALF), (3, HAND_TOP3)])
def test_threshold_metrics_worked_example(stage06, top_k, hand):
    result = stage06.threshold_metrics(SCORES, TARGETS, threshold=0.5, top_k=top_k)
    for key, value in hand.items():
        assert result[key] == pytest.approx(100 * value, abs=1e-9), key


def test_unknown_targets_are_ignored_by_threshold_metrics(stage06):
    targets = TARGETS.copy()
    targets[2, 0] = -1  # img2's A was class A's only false positive; unknown, it is not counted
    result = stage06.threshold_metrics(SCORES, targets)
    # A: Nc 3 Np 3 -> precision 1; CP = (1 + 1/2 + 1/3 + 1/2 + 0) / 5 = 7/15; OP = 6/10; recalls unchanged
    assert result["CP"] == pytest.approx(100 * 7 / 15, abs=1e-9)
    assert result["OP"] == pytest.approx(60.0, abs=1e-9)
    assert result["CR"] == pytest.approx(50.0, abs=1e-9) and result["OR"] == pytest.approx(60.0, abs=1e-9)


def test_threshold_metrics_match_sklearn_precision_and_recall(stage06):
    rng = np.random.default_rng(7)
    scores = rng.random((400, 10))
    targets = (rng.random((400, 10)) < 0.3).astype(int)
    scores[:, 3] *= 0.4  # class 3 is never predicted at 0.5: its precision counts as 0
    predicted = (scores >= 0.5).astype(int)
    result = stage06.threshold_metrics(scores, targets)
    cp = precision_score(targets, predicted, average="macro", zero_division=0)
    cr = recall_score(targets, predicted, average="macro", zero_division=0)
    assert result["CP"] == pytest.approx(100 * cp, abs=1e-9)
    assert result["CR"] == pytest.approx(100 * cr, abs=1e-9)
    assert result["CF1"] == pytest.approx(100 * 2 * cp * cr / (cp + cr), abs=1e-9)  # F1 of the means
    assert result["OP"] == pytest.approx(100 * precision_score(targets, predicted, average="micro"), abs=1e-9)
    assert result["OR"] == pytest.approx(100 * recall_score(targets, predicted, average="micro"), abs=1e-9)


def test_class_without_positives_is_left_out_of_class_averages(stage06):
    scores = np.array([[0.9, 0.8], [0.2, 0.7]])
    targets = np.array([[1, 0], [0, 0]])  # class 1: no positives, two false positives
    result = stage06.threshold_metrics(scores, targets)
    assert result["excluded"] == [1]
    assert result["CP"] == pytest.approx(100.0) and result["CR"] == pytest.approx(100.0)  # class 0 only
    assert result["OP"] == pytest.approx(100 / 3)  # class 1's false positives still count overall
    assert result["OR"] == pytest.approx(100.0)


def test_top_k_ties_go_to_the_lower_class_index(stage06):
    scores = np.array([[0.9, 0.6, 0.6, 0.6, 0.1]])
    targets = np.array([[0, 0, 0, 1, 0]])  # the positive is the last of the three tied labels
    # top-2 keeps 0.9 and the first 0.6 (class 1); class 3 is not predicted, so nothing is correct
    assert stage06.threshold_metrics(scores, targets, top_k=2)["OP"] == pytest.approx(0.0)
    assert stage06.threshold_metrics(scores, targets, top_k=4)["OR"] == pytest.approx(100.0)


def test_score_equal_to_the_threshold_counts_as_predicted(stage06):
    # ML-GCN predicts when the logit is >= 0, i.e. when the probability is >= 0.5
    result = stage06.threshold_metrics(np.array([[0.5, 0.3]]), np.array([[1, 0]]))
    assert result["OP"] == pytest.approx(100.0) and result["OR"] == pytest.approx(100.0)
    result = stage06.threshold_metrics(np.array([[0.5, 0.3]]), np.array([[1, 0]]), threshold=0.6)
    assert result["OR"] == pytest.approx(0.0)


def test_all_zero_precision_and_recall_give_f1_zero(stage06):
    result = stage06.threshold_metrics(np.array([[0.1, 0.2]]), np.array([[1, 1]]))
    assert result["CF1"] == 0.0 and result["OF1"] == 0.0 and result["OP"] == 0.0


# ---------------------------------------------------------------------------- not COCO mAP, and labelling


def test_per_batch_retrieval_ap_is_not_per_class_map(stage06):
    scores = np.array([[0.9, 0.2], [0.8, 0.1]])
    targets = np.array([[0, 1], [1, 0]])
    # per class: class 0 ranks 0.9- 0.8+ -> 1/2; class 1 ranks 0.2+ 0.1- -> 1; mAP 75
    assert stage06.mean_average_precision(scores, targets)["mAP"] == pytest.approx(75.0)
    # one batch of both images, flattened: 0.9- 0.8+ 0.2+ 0.1- -> (1/2 + 2/3) / 2 = 7/12
    assert stage06.per_batch_retrieval_ap(scores, targets, batch_size=2) == pytest.approx(100 * 7 / 12)
    # batches of one image: [0.9-, 0.2+] -> 1/2 and [0.8+, 0.1-] -> 1, averaged: 3/4
    assert stage06.per_batch_retrieval_ap(scores, targets, batch_size=1) == pytest.approx(75.0)
    # a third image makes a smaller last batch [0.7-, 0.3+] -> 1/2; batches are weighted by their size:
    # (2 * 7/12 + 1 * 1/2) / 3 = 5/9
    scores, targets = np.vstack([scores, [0.3, 0.7]]), np.vstack([targets, [1, 0]])
    assert stage06.per_batch_retrieval_ap(scores, targets, batch_size=2) == pytest.approx(100 * 5 / 9)


def test_format_metrics_names_the_definition(stage06):
    line = stage06.format_metrics(stage06.mean_average_precision(SCORES, TARGETS, interpolated=True))
    assert "80.00" in line and "VOC all-point interpolated AP" in line
    assert "top-3" in stage06.format_metrics(stage06.threshold_metrics(SCORES, TARGETS, top_k=3))


# -------------------------------------------------------------------------------------------- bad input

NAN_SCORES = SCORES.copy()
NAN_SCORES[1, 2] = NAN_SCORES[3, 0] = np.nan
SOFT = TARGETS.astype(float)
SOFT[0, 1] = 0.3


@pytest.mark.parametrize("scores, targets, message", [
    (SCORES, TARGETS[:3], r"scores has shape \(4, 5\) but targets has shape \(3, 5\)"),
    (SCORES[:, 0], TARGETS[:, 0], r"must be 2-D"),
    (NAN_SCORES, TARGETS, r"scores contains 2 NaN and 0 infinite value\(s\), the first at image 1, class 2"),
    (-NAN_SCORES, np.where(TARGETS == 0, -1, TARGETS), r"scores contains 2 NaN"),  # with unknown targets
    (np.where(SCORES < 0.15, -np.inf, SCORES), TARGETS, r"scores contains 0 NaN and 1 infinite"),
    (SCORES, np.where(TARGETS == 1, np.nan, TARGETS), r"targets contains 10 NaN"),
    (np.where(SCORES > 0.85, np.inf, SCORES), TARGETS, r"scores contains 0 NaN and 2 infinite"),
    (SCORES, SOFT,
     r"targets must be 1 \(positive\), 0 \(negative\) or < 0.*1 other value.*0\.3 at image 0, class 1"),
    (SCORES[:0], TARGETS[:0], r"nothing to score"),
])
def test_bad_input_is_named(stage06, scores, targets, message):
    for fn in (stage06.average_precision, stage06.voc_average_precision, stage06.threshold_metrics):
        with pytest.raises(ValueError, match=message):
            fn(scores, targets)


def test_bad_arguments_are_named(stage06):
    with pytest.raises(ValueError, match="probabilities in"):
        stage06.threshold_metrics(SCORES * 4 - 2, TARGETS)  # logits, not probabilities
    with pytest.raises(ValueError, match="top_k must be an integer in"):
        stage06.threshold_metrics(SCORES, TARGETS, top_k=0)
    with pytest.raises(ValueError, match="threshold must be"):
        stage06.threshold_metrics(SCORES, TARGETS, threshold=1.5)
    with pytest.raises(ValueError, match="class_names has 2 names but scores have 5 classes"):
        stage06.mean_average_precision(SCORES, TARGETS, class_names=["a", "b"])
    with pytest.raises(ValueError, match="no class has a positive"):
        stage06.mean_average_precision(SCORES, np.zeros_like(TARGETS))
    with pytest.raises(TypeError, match="scores must be a numeric"):
        stage06.average_precision(np.array([["a"]]), np.array([[1]]))


def test_self_check_passes(stage06, capsys):
    assert stage06.self_check() is True
    assert "checks passed" in capsys.readouterr().out


# ====================================================================================================
# Models: predict_scores, prediction for image files, attention maps, checkpoints, official files.
# A tiny Query2Label (timm's test_resnet, d 32) stands in for a trained one; a one-epoch run of
# 05_train.py (a few seconds) writes the checkpoints.
# ====================================================================================================

TINY = dict(num_classes=3, backbone="test_resnet", pretrained=False, d_model=32, num_heads=2,
            dim_feedforward=64, input_proj=True, frozen_bn=False, freeze_stem=False)
SIZE = 64


@pytest.fixture(scope="module")
def tiny_model(stage03):
    torch.manual_seed(0)
    return stage03.Query2Label(stage03.Q2LConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def trained_run(tiny_coco, tmp_path_factory):
    """A 1-epoch 05_train.py run on the tiny COCO-format set: its run folder (best.pt, last.pt, history)."""
    stage05 = importlib.import_module("05_train")  # tests may import 05; 06 itself never does
    out = tmp_path_factory.mktemp("runs06")
    summary = stage05.main(tiny_train_args(tiny_coco, out, "eval06", epochs=1))
    assert summary["outcome"] == "done"
    return Path(summary["run_dir"])


def direct_scores(model, transform, images):
    """Reference: sigmoid(model(batch)) for PIL images, computed here without stage 6."""
    with torch.no_grad():
        return torch.sigmoid(model(torch.stack([transform(image) for image in images]))).numpy()


def write_images(folder):
    """A folder of images as users have them: RGB JPEG, greyscale PNG, CMYK JPEG, a PNG whose EXIF says
    "rotate", a corrupt .jpg and a text file. Returns the images each file should decode to."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))  # 40 wide, 24 high
    base.save(folder / "a_rgb.jpg", quality=95)
    base.convert("L").save(folder / "b_grey.png")
    base.convert("CMYK").save(folder / "c_cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the viewer must turn the stored pixels 90 degrees clockwise
    base.save(folder / "d_exif.png", exif=exif)
    (folder / "e_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return {"a_rgb.jpg": Image.open(folder / "a_rgb.jpg").convert("RGB"),
            "b_grey.png": base.convert("L").convert("RGB"),
            "d_exif.png": base.transpose(Image.Transpose.ROTATE_270)}  # 90 degrees clockwise


# ------------------------------------------------------------------------------------------ predict_scores


def test_predict_scores_gives_sigmoid_probabilities_in_loader_order(stage06, stage01, tiny_model, tiny_coco):
    dataset = stage01.CocoMultiLabel(tiny_coco["val_images"], tiny_coco["val_ann"],
                                     stage01.build_transforms(SIZE, train=False))
    loader = stage01.build_loader(dataset, 4, train=False, workers=0)
    scores, targets = stage06.predict_scores(tiny_model, loader, "cpu", show=False)
    assert scores.shape == (15, 3) and scores.dtype == np.float32
    np.testing.assert_array_equal(targets, dataset.labels.numpy())
    with torch.no_grad():
        expected = torch.sigmoid(tiny_model(torch.stack([dataset[i][0] for i in range(15)]))).numpy()
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    # 05_train.py's call: (model, loader, device, amp_dtype, channels_last, desc, show), positionally
    again, _ = stage06.predict_scores(tiny_model, loader, torch.device("cpu"), None, True, "val", False)
    np.testing.assert_allclose(again, scores, rtol=0, atol=1e-5)  # channels_last: same numbers


# ------------------------------------------------------------------------------------------ prediction


def test_predict_images_decodes_like_stage1_and_skips_corrupt_files(stage06, stage01, tiny_model, tmp_path):
    expected_images = write_images(tmp_path / "photos")
    transform = stage06.eval_transform(SIZE)
    paths = stage06.find_images(tmp_path / "photos")
    assert [p.name for p in paths] == ["a_rgb.jpg", "b_grey.png", "c_cmyk.jpg", "d_exif.png", "e_corrupt.jpg"]
    results, skipped = stage06.predict_images(tiny_model, paths, ["x", "y", "z"], transform, batch_size=2,
                                              show=False)
    assert [r["image"].name for r in results] == ["a_rgb.jpg", "b_grey.png", "c_cmyk.jpg", "d_exif.png"]
    assert len(skipped) == 1 and skipped[0][0].name == "e_corrupt.jpg" and "e_corrupt.jpg" in skipped[0][1]
    by_name = {r["image"].name: r["scores"] for r in results}
    names = list(expected_images)
    reference = direct_scores(tiny_model, transform, [expected_images[n] for n in names])
    for name, ref in zip(names, reference, strict=True):  # grey as RGB; EXIF rotation applied
        np.testing.assert_allclose(by_name[name], ref, rtol=0, atol=1e-6, err_msg=name)
    stored = Image.open(tmp_path / "photos" / "d_exif.png").convert("RGB")  # pixels as stored, not turned
    unrotated = direct_scores(tiny_model, transform, [stored])
    assert np.abs(unrotated[0] - by_name["d_exif.png"]).max() > 1e-4  # the rotation did change the input
    assert stage06.find_images(tmp_path / "photos" / "a_rgb.jpg") == [tmp_path / "photos" / "a_rgb.jpg"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stage06.find_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without image files"):
        stage06.find_images(tmp_path / "empty")


def test_labels_above_threshold_are_sorted(stage06):
    scores = np.array([0.2, 0.9, 0.5, 0.7], dtype=np.float32)
    labels = stage06.labels_above(scores, ["a", "b", "c", "d"], 0.5)
    assert [name for name, _ in labels] == ["b", "d", "c"]  # 0.5 itself counts, as in threshold_metrics
    assert labels[0][1] == pytest.approx(0.9, abs=1e-7)


# ------------------------------------------------------------------------------------------ attention maps


def test_attention_maps_and_figure(stage06, tiny_model, tmp_path):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    transform = stage06.eval_transform(SIZE)
    scores, attention = stage06.attention_maps(tiny_model, image, transform)
    assert scores.shape == (3,) and attention.shape == (3, 2, 2)  # 64 px / stride 32 -> 2 x 2 cells
    torch.testing.assert_close(attention.sum(dim=(1, 2)), torch.ones(3), rtol=0, atol=1e-5)  # softmax rows
    np.testing.assert_allclose(scores, direct_scores(tiny_model, transform, [image])[0], rtol=0, atol=1e-6)
    path = tmp_path / "att.png"
    drawn = stage06.draw_attention(image, scores, attention, ["x", "y", "z"], path, top_k=2)
    assert [name for name, _ in drawn] == [["x", "y", "z"][k] for k in np.argsort(-scores)[:2]]
    with Image.open(path) as png:  # 1 image panel + 2 label panels of 320 px; height follows the aspect
        assert png.size[0] == 3 * 320 and png.size[1] == round(100 * (3.2 * 60 / 90 + 0.6))
    drawn = stage06.draw_attention(image, scores, attention, ["x", "y", "z"], path, threshold=0.0)
    assert len(drawn) == 3
    with Image.open(path) as png:
        assert png.size[0] == 4 * 320


# ------------------------------------------------------------------------------------------ checkpoints


def read_metrics(folder):
    return json.loads((Path(folder) / "metrics.json").read_text())


def test_evaluating_best_pt_reproduces_the_training_map(stage06, trained_run, capsys):
    checkpoint = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)
    assert stage06.main(["--checkpoint", str(trained_run / "best.pt"), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    metrics = read_metrics(trained_run / "eval")  # the default folder: eval/ next to best.pt
    # same images, same weights, same transform: the mAP 05_train.py recorded, to float noise
    assert metrics["mAP"] == pytest.approx(checkpoint["best_map"], abs=1e-6)
    assert metrics["images"] == 15 and metrics["weights"] == checkpoint["weights_source"]
    assert "non-interpolated" in metrics["mAP_kind"] and [c["name"] for c in metrics["per_class"]] == [
        "square", "disc", "bar"]
    for name in ("per_class_ap.png", "pr_curves.png"):
        with Image.open(trained_run / "eval" / name) as png:
            assert png.size[0] > 300 and png.size[1] > 150
    assert "VOC mAP" in out and "CF1" in out and "top-3" in out and "has changed" not in out
    table = [line.split() for line in out.splitlines() if line.split()[:1] in (["square"], ["disc"], ["bar"])]
    aps = [float(row[1]) for row in table]
    assert len(table) == 3 and aps == sorted(aps, reverse=True)  # the per-class table, best AP first


def test_changed_validation_annotations_are_reported(stage06, trained_run, tmp_path, capsys):
    """A checkpoint records a hash of its validation annotations; evaluating it on a changed file
    (a regenerated built-in set, say) still works but warns that the numbers are not comparable."""
    checkpoint = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)
    assert len(checkpoint["data"]["val_ann_fingerprint"]) == 16
    checkpoint["data"]["val_ann_fingerprint"] = "0" * 16
    torch.save(checkpoint, tmp_path / "altered.pt")
    assert stage06.main(["--checkpoint", str(tmp_path / "altered.pt"), "--workers", "0"]) == 0
    assert "has changed since this checkpoint was trained" in capsys.readouterr().out


def test_last_pt_raw_and_ema_match_the_last_epoch(stage06, trained_run, tmp_path):
    history = [json.loads(line) for line in (trained_run / "history.jsonl").read_text().splitlines()]
    for extra, key in (([], "mAP_raw"), (["--use-ema"], "mAP_ema")):
        out = tmp_path / key
        stage06.main(["--checkpoint", str(trained_run / "last.pt"), "--workers", "0", "--out-dir", str(out),
                      *extra])
        assert read_metrics(out)["mAP"] == pytest.approx(history[-1][key], abs=1e-6), key
    model, checkpoint = stage06.load_for_eval(trained_run / "last.pt", use_ema=True)
    assert not model.training and checkpoint["format"] == "q2l-checkpoint-v1"
    assert torch.equal(model.fc.W, checkpoint["ema"]["module"]["fc.W"])


def test_prediction_and_attention_from_the_command_line(stage06, trained_run, tmp_path, capsys):
    write_images(tmp_path / "photos")
    best = str(trained_run / "best.pt")
    stage06.main(["--checkpoint", best, "--image", str(tmp_path / "photos"), "--threshold", "0"])
    out = capsys.readouterr().out
    assert out.count("square") == 4 and "skipped" in out and "e_corrupt.jpg" in out  # 4 images, 1 skipped
    block = out.split("a_rgb.jpg:\n")[1].split("\n")[:3]
    probabilities = [float(line.split()[-1]) for line in block]
    assert probabilities == sorted(probabilities, reverse=True)  # most probable first
    path = tmp_path / "attention.png"
    stage06.main(["--checkpoint", best, "--image", str(tmp_path / "photos" / "a_rgb.jpg"),
                  "--attention", str(path), "--top-k", "2"])
    with Image.open(path) as png:
        assert png.size[0] == 3 * 320
    with pytest.raises(SystemExit, match="--attention draws one image"):
        stage06.main(["--checkpoint", best, "--image", str(tmp_path / "photos"), "--attention", str(path)])


def test_bad_checkpoints_give_clear_errors(stage06, stage03, trained_run, tiny_coco, tmp_path):
    def fails(path, message, *extra):
        with pytest.raises(SystemExit, match=message):
            stage06.main(["--checkpoint", str(path), "--workers", "0", *extra])

    fails(tmp_path / "missing.pt", r"checkpoint .*missing\.pt does not exist")
    fails(trained_run, r"is a folder; give a file in it \(e\.g\. .*best\.pt\)")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    fails(tmp_path / "notes.pt", r"notes\.pt is not a PyTorch file \(16 bytes starting b'not ")
    (tmp_path / "cut.pt").write_bytes((trained_run / "best.pt").read_bytes()[:5000])  # a copy cut short
    fails(tmp_path / "cut.pt", r"cut\.pt is a damaged zip archive \(5,000 bytes\)")
    torch.save({"fc.W": torch.zeros(1, 3, 32)}, tmp_path / "plain.pt")
    fails(tmp_path / "plain.pt", r"not a checkpoint written by 05_train\.py")
    torch.save({"state_dict": {"backbone.0.body.conv1.weight": torch.zeros(1)}}, tmp_path / "official.pth")
    fails(tmp_path / "official.pth", "use --official")
    fails(trained_run / "best.pt", "holds no EMA weights", "--use-ema")

    checkpoint = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)
    broken = dict(checkpoint, model={k: v for k, v in checkpoint["model"].items() if k != "fc.b"})
    broken["model"]["extra.weight"] = torch.zeros(2)
    torch.save(broken, tmp_path / "broken.pt")
    fails(tmp_path / "broken.pt", r"(?s)missing: fc\.b.*unexpected: extra\.weight")
    bad_config = dict(checkpoint, model_config=dict(checkpoint["model_config"], backbone="no_such_net"))
    torch.save(bad_config, tmp_path / "bad_config.pt")
    fails(tmp_path / "bad_config.pt", r"model_config does not build a model.*no_such_net")
    other = json.loads(Path(tiny_coco["val_ann"]).read_text())
    other["categories"][0]["name"] = "cube"
    (tmp_path / "other.json").write_text(json.dumps(other))
    best = trained_run / "best.pt"
    fails(best, r"other\.json defines other classes.*class 0 is 'cube' there, 'square'", "--val-ann",
          str(tmp_path / "other.json"))
    fails(best, r"validation data .*nowhere not found", "--val-images", str(tmp_path / "nowhere"))


# ------------------------------------------------------------------------------------------ official files


def official_layout(state):
    """Our state dict in the official code's layout, written out by hand from its naming rules (the
    same rules as tests/test_03_transformer.py): backbone under backbone.0.body., q/k/v packed into
    in_proj_weight / in_proj_bias, a fixed position buffer backbone.1.pe, DDP's "module." prefix."""
    out = {}
    for key, value in state.items():
        key = "backbone.0.body." + key[len("backbone.body."):] if key.startswith("backbone.body.") else key
        for kind in ("weight", "bias"):
            if key.endswith(f"q_proj.{kind}"):
                prefix = key[:-len(f"q_proj.{kind}")]
                out[f"{prefix}in_proj_{kind}"] = torch.cat([state[f"{prefix}{n}_proj.{kind}"] for n in "qkv"])
        if not any(f"{n}_proj." in key for n in "qkv"):
            out[key] = value
    out["backbone.1.pe"] = torch.zeros(1, 96, 2, 2)
    return {"state_dict": {"module." + k: v for k, v in out.items()}, "epoch": 7}


def test_official_layout_round_trip(stage06, stage01, stage03, tiny_coco, tmp_path, capsys):
    """We have no released file here (no network): a state dict written in the official layout stands in."""
    config = dataclasses.replace(stage03.PRESETS["official_r101"], num_classes=3, backbone="test_resnet",
                                 pretrained=False, d_model=96, num_heads=2, dim_feedforward=64)
    torch.manual_seed(2)
    source = stage03.Query2Label(config).eval()  # no input projection: d = test_resnet's 96 channels
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / "checkpoint.pkl"
    torch.save(official_layout(source.state_dict()), path)
    flags = ["--official", str(path), "--backbone", "test_resnet", "--d-model", "96", "--ff", "64",
             "--heads", "2", "--num-classes", "3", "--img-size", str(SIZE), "--workers", "0"]
    model, loaded_config, report = stage06.build_official(path, 3, "test_resnet", 96, 64, 2)
    assert report["dropped"] == ["module.backbone.1.pe"] and loaded_config.num_classes == 3
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(images), source(images), rtol=0, atol=1e-6)  # same logits

    val = [str(tiny_coco["val_images"]), str(tiny_coco["val_ann"])]
    stage06.main([*flags, "--val-images", val[0], "--val-ann", val[1], "--out-dir", str(tmp_path / "eval")])
    dataset = stage01.CocoMultiLabel(*val, stage06.eval_transform(SIZE))
    loader = stage01.build_loader(dataset, 8, train=False, workers=0)
    scores, targets = stage06.predict_scores(source, loader, "cpu", show=False)
    assert read_metrics(tmp_path / "eval")["mAP"] == pytest.approx(
        stage06.mean_average_precision(scores, targets)["mAP"], abs=1e-6)

    image = tmp_path / "one.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (50, 50, 3), dtype=np.uint8)).save(image)
    capsys.readouterr()
    stage06.main([*flags, "--image", str(image), "--threshold", "0", "--val-ann", str(tiny_coco["val_ann"])])
    out = capsys.readouterr().out
    assert "square" in out and "disc" in out and "bar" in out  # names from the annotation file
    stage06.main([*flags, "--image", str(image), "--threshold", "0"])
    assert "class 0" in capsys.readouterr().out  # no names anywhere: numbered
    with pytest.raises(SystemExit, match="no validation set"):
        stage06.main(flags)
    pickled = tmp_path / "pickled.pkl"  # a release that also pickled its argparse options
    torch.save({**official_layout(source.state_dict()), "args": argparse.Namespace(lr=1e-4)}, pickled)
    flags[1] = str(pickled)
    with pytest.raises(SystemExit, match=r"pickled Python objects \(argparse\.Namespace\).*--trusted"):
        stage06.main([*flags, "--image", str(image)])
    stage06.main([*flags, "--image", str(image), "--trusted"])  # the user vouches for it: loads
    assert len(stage06.COCO_CLASSES) == 80 and stage06.COCO_CLASSES[0] == "person"
    assert stage06.COCO_CLASSES[-1] == "toothbrush" and len(set(stage06.COCO_CLASSES)) == 80


def test_precision_recall_curve_matches_sklearn(stage06):
    scores, targets = random_case(8, n=200, k=3, decimals=1)
    for k in (1, 2):
        precision, recall = stage06.precision_recall_curve(scores[:, k], targets[:, k])
        p_ref, r_ref, _ = precision_recall_curve(targets[:, k], scores[:, k])
        # scikit-learn lists thresholds from low to high and appends (precision 1, recall 0)
        np.testing.assert_allclose(precision, p_ref[:-1][::-1], rtol=0, atol=1e-12)
        np.testing.assert_allclose(recall, r_ref[:-1][::-1], rtol=0, atol=1e-12)
