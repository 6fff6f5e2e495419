"""A learner's stage 4 written straight from the equations, used by tests/test_learner_mode.py.

Correct, without any of 04_loss.py's stability work: log of sigmoid in the logits' own precision,
p_m^g differentiated as it comes (infinite at p_m = 0 for g < 1), "mean" as sum / known.sum().
It must pass every lesson check of tests/test_04_loss.py and fail only stability checks.
"""

import torch
from torch import nn


def asymmetric_loss(logits, targets, gamma_neg=4.0, gamma_pos=0.0, clip=0.05, eps=1e-8,
                    detach_focal_weight=True, reduction="sum", check_targets=True):
    """-(t (1 - p)^g+ log p + (1 - t) p_m^g- log(1 - p_m)), p_m = max(p - m, 0); 0 where t = -1."""
    t = targets.to(logits.dtype)
    p = torch.sigmoid(logits)
    p_m = (p - clip).clamp(min=0)
    w_pos, w_neg = (1 - p) ** gamma_pos, p_m**gamma_neg
    if detach_focal_weight:
        w_pos, w_neg = w_pos.detach(), w_neg.detach()
    L_pos = w_pos * torch.log(p.clamp(min=eps))
    L_neg = w_neg * torch.log((1 - p_m).clamp(min=eps))
    known = t >= 0
    loss = torch.where(known, -(t * L_pos + (1 - t) * L_neg), 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / known.sum()
    return loss.sum() / loss.numel() * 1000  # "q2l"


def bce(logits, targets, reduction="mean", check_targets=True):
    """Binary cross-entropy: ASL with g+ = g- = m = eps = 0."""
    return asymmetric_loss(logits, targets, 0.0, 0.0, 0.0, 0.0, reduction=reduction)


class AsymmetricLoss(nn.Module):
    def __init__(self, gamma_neg=4.0, gamma_pos=0.0, clip=0.05, eps=1e-8, detach_focal_weight=True,
                 reduction="sum", check_targets=True):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps
        self.detach_focal_weight, self.reduction = detach_focal_weight, reduction

    def forward(self, logits, targets):
        return asymmetric_loss(logits, targets, self.gamma_neg, self.gamma_pos, self.clip, self.eps,
                               self.detach_focal_weight, self.reduction)
