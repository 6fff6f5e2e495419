"""Stage 6: metrics against scikit-learn and hand computation; evaluation, prediction, attention maps.

The metrics: AP and mAP against scikit-learn, VOC AP and CP/CR/CF1/OP/OR/OF1 against hand computation.
The models: a tiny Query2Label (timm's test_resnet, d 32) for prediction and attention maps, and the
checkpoints this file writes by hand in the format 05_train.py writes (q2l-checkpoint-v2); one test also
evaluates a real 1-epoch 05_train.py run. Official checkpoints: tests/test_tools_model.py.

Run against your own file:  Q2L_STAGE_06=my_eval.py python -m pytest tests/test_06_eval.py

The worked example (4 images x 5 classes A..E) is the one of docs/06_eval.md:

    scores    A     B     C     D     E        targets  A  B  C  D  E
    img0    0.90  0.80  0.30  0.60  0.10                1  0  1  0  0
    img1    0.80  0.40  0.70  0.20  0.30                1  1  0  0  0
    img2    0.55  0.60  0.60  0.90  0.20                0  1  1  1  0
    img3    0.70  0.20  0.60  0.40  0.45                1  0  0  1  1
"""

import argparse
import csv
import importlib
import json
import os
import re
import subprocess
import sys
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


def test_one_ap_function_gives_both_definitions(stage06):
    np.testing.assert_allclose(stage06.average_precision(SCORES, TARGETS, interpolated=True), HAND_VOC,
                               rtol=0, atol=1e-12)


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


def test_format_metrics_names_the_definition(stage06):
    line = stage06.format_metrics(stage06.mean_average_precision(SCORES, TARGETS, interpolated=True))
    assert "80.00" in line and "VOC all-point interpolated AP" in line
    assert "top-3" in stage06.format_metrics(stage06.threshold_metrics(SCORES, TARGETS, top_k=3))


def test_score_dataset_gives_every_metric(stage06):
    probabilities = SCORES.astype(np.float32)
    result = stage06.score_dataset(probabilities, TARGETS, NAMES)
    assert result["ap"]["mAP"] == pytest.approx(100 * 46 / 60, abs=1e-6)
    assert result["voc"]["mAP"] == pytest.approx(80.0, abs=1e-6)
    assert result["at_threshold"]["CF1"] == pytest.approx(100 * 5 / 11, abs=1e-6)
    assert result["top_k"]["OF1"] == pytest.approx(60.0, abs=1e-6)


# -------------------------------------------------------------------------------------------- bad input
# The lesson: bad input raises instead of returning a NaN metric. The exact wording is hardening.

NAN_SCORES = SCORES.copy()
NAN_SCORES[1, 2] = NAN_SCORES[3, 0] = np.nan
SOFT = TARGETS.astype(float)
SOFT[0, 1] = 0.3
BAD_INPUT = [
    (SCORES, TARGETS[:3], r"scores \(4, 5\) and targets \(3, 5\) must both be \(N images, K classes\)"),
    (SCORES[:, 0], TARGETS[:, 0], r"must both be \(N images"),
    (NAN_SCORES, TARGETS, r"scores must be finite numbers; found 2 other value\(s\), e\.g\. nan at image 1, class 2"),
    (-NAN_SCORES, np.where(TARGETS == 0, -1, TARGETS), r"scores must be finite"),  # with unknown targets
    (np.where(SCORES < 0.15, -np.inf, SCORES), TARGETS, r"scores must be finite numbers; found 1 other"),
    (SCORES, np.where(TARGETS == 1, np.nan, TARGETS), r"targets must be 1 \(positive\).*found 10 other"),
    (SCORES, SOFT, r"targets must be 1 \(positive\), 0 \(negative\) or < 0.*1 other value.*0\.3 at image 0, class 1"),
    (SCORES[:0], TARGETS[:0], r"N, K >= 1"),
]


@pytest.mark.parametrize("scores, targets, message", BAD_INPUT)
def test_bad_input_raises(stage06, scores, targets, message):
    for fn in (stage06.average_precision, stage06.voc_average_precision, stage06.threshold_metrics):
        with pytest.raises(ValueError):
            fn(scores, targets)


@pytest.mark.hardening
@pytest.mark.parametrize("scores, targets, message", BAD_INPUT)
def test_bad_input_is_named(stage06, scores, targets, message):
    for fn in (stage06.average_precision, stage06.voc_average_precision, stage06.threshold_metrics):
        with pytest.raises(ValueError, match=message):
            fn(scores, targets)


@pytest.mark.hardening
def test_bad_arguments_are_named(stage06):
    with pytest.raises(ValueError, match="must be probabilities in"):
        stage06.threshold_metrics(SCORES * 4 - 2, TARGETS)  # logits, not probabilities
    with pytest.raises(ValueError, match="top_k must be an integer in"):
        stage06.threshold_metrics(SCORES, TARGETS, top_k=0)
    with pytest.raises(ValueError, match="threshold 1.5"):
        stage06.threshold_metrics(SCORES, TARGETS, threshold=1.5)
    with pytest.raises(ValueError, match="class_names has 2 names but scores have 5 classes"):
        stage06.mean_average_precision(SCORES, TARGETS, class_names=["a", "b"])
    with pytest.raises(ValueError, match="no class has a positive"):
        stage06.mean_average_precision(SCORES, np.zeros_like(TARGETS))
    with pytest.raises(ValueError):
        stage06.average_precision(np.array([["a"]]), np.array([[1]]))


def test_self_check_passes(stage06):
    assert stage06.self_check() is True


def test_precision_recall_curve_matches_sklearn(stage06):
    """AP = sum_n (R_n - R_{n-1}) P_n over scikit-learn's own precision-recall points (ties grouped)."""
    scores, targets = random_case(8, n=200, k=3, decimals=1)
    for k in (1, 2):
        precision, recall, _ = precision_recall_curve(targets[:, k], scores[:, k])
        by_definition = -np.sum(np.diff(recall) * precision[:-1])
        assert stage06.average_precision(scores[:, k:k + 1], targets[:, k:k + 1])[0] == pytest.approx(
            by_definition, abs=1e-12)


# ====================================================================================================
# Models: predict_scores, prediction for image files, attention maps, checkpoints.
# A tiny Query2Label (timm's test_resnet, d 32) stands in for a trained one; checkpoints are written here
# in the format 05_train.py writes (q2l-checkpoint-v2).
# ====================================================================================================

TINY = dict(num_classes=3, backbone="test_resnet", pretrained=False, d_model=32, num_heads=2,
            dim_feedforward=64, input_proj=True, frozen_bn=False, freeze_stem=False)
SIZE = 64


@pytest.fixture(scope="module")
def tiny_model(stage03):
    torch.manual_seed(0)
    return stage03.Query2Label(stage03.Q2LConfig(**TINY)).eval()


def dataset_scores(stage01, stage06, model, tiny_coco):
    """(scores, targets) of `model` on the tiny validation set, computed with stage 6's predict_scores."""
    dataset = stage01.CocoMultiLabel(tiny_coco["val_images"], tiny_coco["val_ann"],
                                     stage01.build_transforms(SIZE, train=False), substitute=False)
    return stage06.predict_scores(model, stage01.build_loader(dataset, 8, train=False, workers=0), "cpu",
                                  show=False)


@pytest.fixture(scope="module")
def checkpoints(stage01, stage03, stage06, tiny_model, tiny_coco, tmp_path_factory):
    """best.pt and last.pt as 05_train.py writes them (format v2, absolute data paths), from a tiny model;
    last.pt's EMA weights are a perturbed copy. Returns their folder and the mAPs they should give."""
    folder = tmp_path_factory.mktemp("run06")
    torch.manual_seed(1)
    ema = stage03.Query2Label(stage03.Q2LConfig(**TINY)).eval()
    raw_map = stage06.mean_average_precision(*dataset_scores(stage01, stage06, tiny_model, tiny_coco))["mAP"]
    ema_map = stage06.mean_average_precision(*dataset_scores(stage01, stage06, ema, tiny_coco))["mAP"]
    common = {"format": stage06.CHECKPOINT_FORMAT, "model_config": dict(TINY, weights=None),
              "class_names": ["square", "disc", "bar"], "config": {"batch_size": 8},
              "data": {"kind": "custom", "val_images": str(Path(tiny_coco["val_images"]).resolve()),
                       "val_ann": str(Path(tiny_coco["val_ann"]).resolve()),
                       "val_ann_fingerprint": stage01.file_fingerprint(tiny_coco["val_ann"]), "img_size": SIZE,
                       "drop_empty": False},
              "epoch": 1, "step": 4, "best_map": raw_map, "best_source": "raw", "best_epoch": 1}
    torch.save({**common, "model": tiny_model.state_dict(), "weights_source": "raw", "ema": None},
               folder / "best.pt")
    torch.save({**common, "model": tiny_model.state_dict(), "weights_source": "raw", "ema": ema.state_dict()},
               folder / "last.pt")
    return {"folder": folder, "raw": raw_map, "ema": ema_map}


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


def read_metrics(folder):
    return json.loads((Path(folder) / "metrics.json").read_text())


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
    transform = stage01.build_transforms(SIZE, train=False)
    paths = stage06.find_images(tmp_path / "photos")
    assert [p.name for p in paths] == ["a_rgb.jpg", "b_grey.png", "c_cmyk.jpg", "d_exif.png", "e_corrupt.jpg"]
    rows = stage06.predict_images(tiny_model, paths, transform, ["x", "y", "z"], threshold=0.0, top_k=2)
    assert [Path(row["image"]).name for row in rows] == [p.name for p in paths]  # in order, errors included
    assert [row["error"] is None for row in rows] == [True] * 4 + [False] and "e_corrupt.jpg" in rows[4]["error"]
    by_name = {Path(row["image"]).name: dict(zip(row["labels"], row["scores"], strict=True)) for row in rows}
    names = list(expected_images)
    reference = direct_scores(tiny_model, transform, [expected_images[n] for n in names])
    for name, ref in zip(names, reference, strict=True):  # grey as RGB; EXIF rotation applied
        ours = [by_name[name][label] for label in ("x", "y", "z")]  # threshold 0: every label is listed
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6, err_msg=name)  # rounded to 6 decimals
    stored = Image.open(tmp_path / "photos" / "d_exif.png").convert("RGB")  # pixels as stored, not turned
    unrotated = direct_scores(tiny_model, transform, [stored])[0]
    assert np.abs(unrotated - [by_name["d_exif.png"][c] for c in "xyz"]).max() > 1e-4  # rotation mattered
    assert stage06.find_images(tmp_path / "photos" / "a_rgb.jpg") == [tmp_path / "photos" / "a_rgb.jpg"]
    (tmp_path / "empty").mkdir()
    for nothing in (tmp_path / "nowhere", tmp_path / "empty"):
        with pytest.raises(FileNotFoundError):
            stage06.find_images(nothing)


def test_prediction_rows_hold_labels_above_threshold_and_top_k(stage06, tiny_model, tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    fixed = [0.2, 0.9, 0.5, 0.7]

    def model(images):  # a stand-in with known probabilities: logit(p)
        p = torch.tensor([fixed] * len(images))
        return torch.log(p / (1 - p))

    model.eval = lambda: None
    rows = stage06.predict_images(model, [tmp_path / "x.png", tmp_path / "missing.jpg"],
                                  lambda image: torch.zeros(3, 4, 4), ["a", "b", "c", "d"], 0.5, 2)
    assert rows[0]["labels"] == ["b", "d", "c"]  # 0.5 itself counts, as in threshold_metrics; most probable first
    assert rows[0]["scores"] == pytest.approx([0.9, 0.7, 0.5], abs=1e-6)
    assert rows[0]["top_k_labels"] == ["b", "d"] and rows[0]["error"] is None
    assert rows[1]["labels"] == [] and "missing.jpg" in rows[1]["error"]


# ------------------------------------------------------------------------------------------ attention maps


def test_attention_maps_and_figure(stage06, stage01, tiny_model, tmp_path):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    transform = stage01.build_transforms(SIZE, train=False)
    scores, attention = stage06.attention_maps(tiny_model, image, transform)
    H, W = attention.shape[1:]  # whatever grid the backbone gives (2 x 2 for test_resnet at 64 px)
    assert scores.shape == (3,) and attention.shape == (3, H, W)
    torch.testing.assert_close(attention.sum(dim=(1, 2)), torch.ones(3), rtol=0, atol=1e-5)  # softmax rows
    np.testing.assert_allclose(scores, direct_scores(tiny_model, transform, [image])[0], rtol=0, atol=1e-6)
    names, path = ["x", "y", "z"], tmp_path / "att.png"
    drawn = stage06.draw_attention(image, scores, attention, names, path, [0, 2])
    assert drawn == [("x", pytest.approx(float(scores[0])), None), ("z", pytest.approx(float(scores[2])), None)]
    with Image.open(path) as png:  # the image panel and two map panels, side by side
        assert png.size[0] > png.size[1] > 100
    # with true labels: each drawn label is right / wrong (predicted) or missed / absent (not predicted)
    fake = np.array([0.9, 0.8, 0.1], dtype=np.float32)
    drawn = stage06.draw_attention(image, fake, attention, names, path, [0, 1, 2], truth={0, 2})
    assert [v for _, _, v in drawn] == ["right", "wrong", "missed"]
    assert stage06.draw_attention(image, fake, attention, names, path, [2], truth=set())[0][2] == "absent"


def test_attention_figure_as_an_array_and_a_panel_for_tensorboard(stage01, stage03, stage06, tiny_coco):
    """Without a path, draw_attention returns the figure's pixels; attention_panel stacks a few validation
    images' figures into one (3, H, W) uint8 image, as 05_train.py logs with writer.add_image."""
    from dataclasses import replace

    torch.manual_seed(0)
    model = stage03.Query2Label(replace(stage03.PRESETS["demo"], backbone="test_resnet", d_model=32, num_heads=2,
                                        dim_feedforward=64, num_classes=3))
    dataset = stage01.CocoMultiLabel(tiny_coco["val_images"], tiny_coco["val_ann"],
                                     stage01.build_transforms(SIZE, train=False))
    image = stage01.load_image(dataset.image_paths[0])
    scores, attention = stage06.attention_maps(model, image, dataset.transform)
    pixels = stage06.draw_attention(image, scores, attention, dataset.class_names, labels=[0, 1])
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.shape[1] > pixels.shape[0] > 100  # the image and two maps side by side
    assert (pixels < 250).mean() > 0.05 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # drawn, in colour
    model.train()
    panel = stage06.attention_panel(model, dataset, [0, 3, 5], dataset.class_names, "cpu")
    assert isinstance(panel, torch.Tensor) and panel.dtype == torch.uint8 and panel.shape[0] == 3
    assert panel.shape[1] > 2.5 * pixels.shape[0] and panel.shape[2] >= pixels.shape[1]  # three figures, stacked
    assert 0.05 < (panel < 250).float().mean() < 0.95 and panel.float().std() > 20  # neither blank nor solid
    assert not model.training  # left in eval mode, as predict_scores leaves it


# ------------------------------------------------------------------------------------------ checkpoints


def test_evaluating_best_pt_reproduces_its_recorded_map(stage06, checkpoints, capsys):
    best = checkpoints["folder"] / "best.pt"
    assert stage06.main(["--checkpoint", str(best), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    metrics = read_metrics(checkpoints["folder"] / "eval")  # the default folder: eval/ next to best.pt
    assert metrics["mAP"] == pytest.approx(checkpoints["raw"], abs=1e-6)  # same images, weights, transform
    assert metrics["images"] == 15 and metrics["weights"] == "raw"
    assert "non-interpolated" in metrics["mAP_kind"] and [c["name"] for c in metrics["per_class"]] == [
        "square", "disc", "bar"]
    assert "VOC mAP" in out and "CF1" in out and "top-3" in out and "changed since training" not in out
    table = [line.split() for line in out.splitlines() if line.split()[:1] in (["square"], ["disc"], ["bar"])]
    aps = [float(row[1]) for row in table]
    assert len(table) == 3 and aps == sorted(aps, reverse=True)  # the per-class table, best AP first


def test_last_pt_raw_and_ema_weights(stage06, checkpoints, tmp_path):
    last = checkpoints["folder"] / "last.pt"
    for extra, key in (([], "raw"), (["--use-ema"], "ema")):
        stage06.main(["--checkpoint", str(last), "--workers", "0", "--out-dir", str(tmp_path / key), *extra])
        assert read_metrics(tmp_path / key)["mAP"] == pytest.approx(checkpoints[key], abs=1e-6), key
    model, checkpoint = stage06.load_for_eval(last, use_ema=True)
    assert not model.training and checkpoint["format"] == "q2l-checkpoint-v2"
    assert torch.equal(model.fc.W, checkpoint["ema"]["fc.W"])
    assert checkpoints["raw"] != pytest.approx(checkpoints["ema"], abs=1e-6)  # the test can tell them apart


def test_checkpoint_works_from_any_folder_and_never_regenerates_data(stage06, checkpoints, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # recorded paths are absolute: another working folder changes nothing
    assert stage06.main(["--checkpoint", str(checkpoints["folder"] / "best.pt"), "--workers", "0",
                         "--out-dir", "here"]) == 0
    assert read_metrics(tmp_path / "here")["mAP"] == pytest.approx(checkpoints["raw"], abs=1e-6)
    checkpoint = torch.load(checkpoints["folder"] / "best.pt", weights_only=True)
    gone = tmp_path / "deleted" / "val"
    checkpoint["data"].update(kind="synthetic", val_images=str(gone))
    torch.save(checkpoint, tmp_path / "moved.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        stage06.main(["--checkpoint", str(tmp_path / "moved.pt"), "--workers", "0"])
    assert stop.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "deleted").exists()  # nothing regenerated


@pytest.mark.hardening
def test_missing_recorded_data_says_what_to_do(stage06, checkpoints, tmp_path, capsys):
    checkpoint = torch.load(checkpoints["folder"] / "best.pt", weights_only=True)
    gone = tmp_path / "deleted" / "val"
    checkpoint["data"].update(kind="synthetic", val_images=str(gone))
    torch.save(checkpoint, tmp_path / "moved.pt")
    with pytest.raises(SystemExit):
        stage06.main(["--checkpoint", str(tmp_path / "moved.pt"), "--workers", "0"])
    err = capsys.readouterr().err
    assert str(gone) in err and "--val-images" in err and f"make_synthetic.py --root {gone.parent}" in err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # stage 1 warns about the corrupt file
def test_an_undecodable_validation_image_is_left_out_not_replaced(stage06, stage01, checkpoints, tiny_coco,
                                                                  tmp_path):
    """A corrupt validation image is not scored twice (as a substitute would be): it leaves the metric."""
    import shutil

    images = tmp_path / "val"
    shutil.copytree(tiny_coco["val_images"], images)
    broken = sorted(images.iterdir())[3]
    broken.write_bytes(b"not an image any more")
    stage06.main(["--checkpoint", str(checkpoints["folder"] / "best.pt"), "--workers", "0", "--val-images",
                  str(images), "--out-dir", str(tmp_path / "eval")])
    metrics = read_metrics(tmp_path / "eval")
    assert metrics["images"] == 14 and metrics["undecodable_images"] == 1
    model, _ = stage06.load_for_eval(checkpoints["folder"] / "best.pt")
    scores, targets = dataset_scores(stage01, stage06, model, tiny_coco)
    keep = np.arange(15) != 3  # the same model on the 14 other images
    assert metrics["mAP"] == pytest.approx(stage06.mean_average_precision(scores[keep], targets[keep])["mAP"],
                                           abs=1e-6)


def test_pickled_objects_need_trusted(stage06, checkpoints, tmp_path, capsys):
    checkpoint = torch.load(checkpoints["folder"] / "best.pt", weights_only=True)
    torch.save(dict(checkpoint, args=argparse.Namespace(lr=1e-4)), tmp_path / "pickled.pt")
    flags = ["--checkpoint", str(tmp_path / "pickled.pt"), "--workers", "0", "--out-dir", str(tmp_path / "e")]
    with pytest.raises(SystemExit) as stop:
        stage06.main(flags)
    assert stop.value.code == 2 and capsys.readouterr().err.strip()  # wording: test_bad_checkpoints_...
    assert stage06.main([*flags, "--trusted"]) == 0  # the user vouches for the file: it loads


@pytest.mark.hardening
def test_changed_validation_annotations_are_reported(stage06, checkpoints, tmp_path, capsys):
    """A checkpoint records a hash of its validation annotations; evaluating it on a changed file (a
    regenerated built-in set, say) still works but warns that the numbers are not comparable."""
    checkpoint = torch.load(checkpoints["folder"] / "best.pt", weights_only=True)
    checkpoint["data"]["val_ann_fingerprint"] = "0" * 16
    torch.save(checkpoint, tmp_path / "altered.pt")
    assert stage06.main(["--checkpoint", str(tmp_path / "altered.pt"), "--workers", "0"]) == 0
    assert "changed since training" in capsys.readouterr().out


def test_prediction_output_files(stage06, checkpoints, tmp_path, capsys):
    write_images(tmp_path / "photos")
    best = str(checkpoints["folder"] / "best.pt")
    for name in ("preds.jsonl", "preds.csv"):
        assert stage06.main(["--checkpoint", best, "--image", str(tmp_path / "photos"), "--threshold", "0",
                             "--top-k", "2", "--output", str(tmp_path / name)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [Path(row["image"]).name for row in rows] == ["a_rgb.jpg", "b_grey.png", "c_cmyk.jpg", "d_exif.png",
                                                         "e_corrupt.jpg"]  # in order, the undecodable one too
    assert all(len(row["labels"]) == 3 and len(row["top_k_labels"]) == 2 for row in rows[:4])  # threshold 0
    assert rows[0]["scores"] == sorted(rows[0]["scores"], reverse=True) and rows[4]["error"]
    with open(tmp_path / "preds.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [row["image"] for row in table] == [row["image"] for row in rows]
    assert table[0]["labels"].split(";") == rows[0]["labels"] and table[0]["error"] == ""
    assert [float(x) for x in table[0]["scores"].split(";")] == pytest.approx(rows[0]["scores"], abs=1e-6)


def test_no_decodable_image_exits_1(stage06, checkpoints, tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert stage06.main(["--checkpoint", str(checkpoints["folder"] / "best.pt"), "--image",
                         str(tmp_path / "bad")]) == 1
    assert capsys.readouterr().err.strip()  # and it says so


@pytest.mark.hardening
def test_prediction_messages(stage06, checkpoints, tmp_path, capsys):
    write_images(tmp_path / "photos")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"not an image")
    best = str(checkpoints["folder"] / "best.pt")
    stage06.main(["--checkpoint", best, "--image", str(tmp_path / "photos")])
    out = capsys.readouterr().out
    assert "e_corrupt.jpg: SKIPPED" in out and "4 image(s) labelled, 1 not decodable" in out
    assert stage06.main(["--checkpoint", best, "--image", str(tmp_path / "bad")]) == 1
    assert "none of the 1 image file(s) could be decoded" in capsys.readouterr().err


def test_attention_from_the_command_line_knows_true_labels(stage06, checkpoints, tiny_coco, tmp_path, capsys):
    """An image of the checkpoint's validation set: its true labels come from the recorded annotations."""
    annotations = json.loads(Path(tiny_coco["val_ann"]).read_text())
    labelled = {a["image_id"] for a in annotations["annotations"]}
    image = next(i for i in annotations["images"] if i["id"] in labelled)
    names = {c["id"]: c["name"] for c in annotations["categories"]}
    truth = {names[a["category_id"]] for a in annotations["annotations"] if a["image_id"] == image["id"]}
    result = stage06.run(stage06.build_parser().parse_args([
        "--checkpoint", str(checkpoints["folder"] / "best.pt"), "--image",
        str(Path(tiny_coco["val_images"]) / image["file_name"]), "--attention", str(tmp_path / "a.png"),
        "--top-k", "1"]))
    drawn = result["attention"]
    assert (tmp_path / "a.png").is_file() and result["code"] == 0
    assert {name for name, _, verdict in drawn if verdict in ("right", "missed")} == truth  # every true label
    assert all(verdict is not None for _, _, verdict in drawn)


@pytest.mark.hardening
def test_bad_checkpoints_give_one_line_and_exit_2(stage06, checkpoints, tiny_coco, tmp_path, capsys):
    best = checkpoints["folder"] / "best.pt"

    def fails(path, message, *extra):
        with pytest.raises(SystemExit) as stop:
            stage06.main(["--checkpoint", str(path), "--workers", "0", *extra])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), err

    fails(tmp_path / "missing.pt", r"checkpoint .*missing\.pt does not exist")
    fails(checkpoints["folder"], r"is a folder")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    fails(tmp_path / "notes.pt", r"notes\.pt is not a PyTorch file")
    (tmp_path / "cut.pt").write_bytes(best.read_bytes()[:5000])  # a copy cut short
    fails(tmp_path / "cut.pt", r"cut\.pt is a damaged zip archive")
    torch.save({"fc.W": torch.zeros(1, 3, 32)}, tmp_path / "plain.pt")
    fails(tmp_path / "plain.pt", r"not a q2l-checkpoint-v2 checkpoint.*tools/official\.py")
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    torch.save(dict(checkpoint, format="q2l-checkpoint-v1"), tmp_path / "old.pt")
    fails(tmp_path / "old.pt", r"format 'q2l-checkpoint-v1'")
    fails(best, "holds no EMA weights", "--use-ema")
    torch.save(dict(checkpoint, args=argparse.Namespace(lr=1e-4)), tmp_path / "pickled.pt")
    fails(tmp_path / "pickled.pt", r"pickled Python objects \(argparse\.Namespace\).*pass --trusted")
    broken = dict(checkpoint, model={k: v for k, v in checkpoint["model"].items() if k != "fc.b"})
    broken["model"]["extra.weight"] = torch.zeros(2)
    torch.save(broken, tmp_path / "broken.pt")
    fails(tmp_path / "broken.pt", r"Missing key.*fc\.b.*Unexpected key.*extra\.weight")
    torch.save(dict(checkpoint, model_config=dict(checkpoint["model_config"], backbone="no_such_net")),
               tmp_path / "bad_config.pt")
    fails(tmp_path / "bad_config.pt", r"do not make a model.*no_such_net")
    torch.save(dict(checkpoint, model_config=dict(checkpoint["model_config"], wings=2)), tmp_path / "new.pt")
    fails(tmp_path / "new.pt", r"does not know: \['wings'\]")
    other = json.loads(Path(tiny_coco["val_ann"]).read_text())
    other["categories"][0]["name"] = "cube"
    (tmp_path / "other.json").write_text(json.dumps(other))
    fails(best, r"other\.json has the classes \['cube'", "--val-ann", str(tmp_path / "other.json"))
    with pytest.raises(SystemExit) as stop:
        stage06.main(["--image", "x.jpg"])
    assert stop.value.code == 2 and "--image needs --checkpoint" in capsys.readouterr().err
    fails(best, r"--attention draws one image", "--image", str(tiny_coco["val_images"]), "--attention",
          str(tmp_path / "a.png"))
    fails(best, r"--top-k must be >= 1", "--top-k", "0")


def test_a_05_train_checkpoint_evaluates_to_the_map_it_recorded(stage06, tiny_coco, tmp_path):
    """End to end with the real writer of checkpoints: a 1-epoch 05_train.py run, re-evaluated in a fresh
    process from another folder (as a user would)."""
    stage05 = importlib.import_module("05_train")  # tests may import 05; 06 itself never does
    summary = stage05.main(tiny_train_args(tiny_coco, tmp_path / "runs", "eval06", epochs=1))
    best = Path(summary["run_dir"]) / "best.pt"
    done = subprocess.run([sys.executable, str(Path(stage06.__file__).resolve()), "--checkpoint", str(best),
                           "--workers", "0", "--out-dir", str(tmp_path / "eval")], cwd=tmp_path / "runs",
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    recorded = torch.load(best, map_location="cpu", weights_only=True)["best_map"]
    assert read_metrics(tmp_path / "eval")["mAP"] == pytest.approx(recorded, abs=1e-6)
