"""Stage 6 metrics: AP and mAP against scikit-learn, VOC AP and CP/CR/CF1/OP/OR/OF1 against hand computation.

Run against your own file:  Q2L_STAGE_06=my_eval.py python -m pytest tests/test_06_eval.py

The worked example (4 images x 5 classes A..E) is the one of docs/06_eval.md:

    scores    A     B     C     D     E        targets  A  B  C  D  E
    img0    0.90  0.80  0.30  0.60  0.10                1  0  1  0  0
    img1    0.80  0.40  0.70  0.20  0.30                1  1  0  0  0
    img2    0.55  0.60  0.60  0.90  0.20                0  1  1  1  0
    img3    0.70  0.20  0.60  0.40  0.45                1  0  0  1  1
"""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_score, recall_score

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
