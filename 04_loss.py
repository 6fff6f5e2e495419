"""Stage 4: the asymmetric loss (ASL) that Query2Label trains with, and plain BCE as its special case.

Ridnik et al., "Asymmetric Loss For Multi-Label Classification" (ICCV 2021), Sec. 3; Query2Label
(Liu et al., 2021) trains with it. With p = sigmoid(logit), per (image, label) pair:

    L+ = (1 - p)^g+ . log p                 positive: focal down-weighting of easy positives
    L- = p_m^g- . log(1 - p_m),  p_m = max(p - m, 0)
                                            negative: stronger focusing, and probability shifting
    loss = -(t . L+ + (1 - t) . L-)         t = 1 positive, 0 negative, in between for CutMix

Why: a COCO image has ~2.9 of 80 labels, so ~96% of pairs are negatives, mostly easy ones. With
g- > g+ their many small gradients stop drowning the few positives; the shift m zeroes the loss of
negatives with p <= m outright (and softens it for very confident negatives, which are often
missing labels).

Run:   python 04_loss.py                self-checks, and writes docs/figures/04_asl_shapes.png
       python tools/bench_loss.py       forward+backward time relative to BCE (CPU)
       python tools/exercise.py 04      this stage as an exercise: my_04_loss.py, lessons to write
Next:  05_train.py trains the model of 03_transformer.py with this loss.

Shape legend: B batch, K labels. logits and targets are (B, K), batch-first.
"""

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REDUCTIONS = ("sum", "mean", "q2l", "none")
# The official Query2Label recipe (SlongLiu/query2labels): its loss is -sum / B / K * 1000.
Q2L_SETTINGS = dict(gamma_neg=2.0, gamma_pos=0.0, clip=0.0, eps=1e-5, detach_focal_weight=True, reduction="q2l")
BCE_SETTINGS = dict(gamma_neg=0.0, gamma_pos=0.0, clip=0.0, eps=0.0)


def _check_options(gamma_neg, gamma_pos, clip, eps, reduction):
    if gamma_neg < 0 or gamma_pos < 0:
        raise ValueError(f"gamma_neg and gamma_pos must be >= 0, got {gamma_neg} and {gamma_pos}")
    if not 0 <= clip < 1:
        raise ValueError(f"clip (the probability shift m) must be in [0, 1), got {clip}")
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _focusing_weight(base, gamma, detach):
    """base^gamma (None for gamma = 0: weight 1), with derivative 0, not NaN, where base == 0.

    For 0 < gamma < 1, d/dbase base^gamma is infinite at 0 and autograd turns it into NaN (0 . inf).
    base is 0 only where p <= m or sigmoid underflowed, where the weighted term is 0 anyway.
    detach: a constant in the backward pass (.detach(); global autograd state is never touched).
    """
    if gamma == 0:
        return None  # no pow at all: 0^0 and its derivative never arise
    if float(gamma).is_integer():  # the usual 1, 2, 4: products are ~3x faster than pow on the CPU
        weight = base
        for _ in range(int(gamma) - 1):
            weight = weight * base
    elif gamma > 1:
        weight = base.pow(gamma)  # gamma . base^(gamma - 1) is finite at 0
    else:
        nonzero = base > 0
        weight = torch.where(nonzero, torch.where(nonzero, base, 1.0).pow(gamma), 0.0)
    return weight.detach() if detach else weight


def asymmetric_loss(logits, targets, gamma_neg=4.0, gamma_pos=0.0, clip=0.05, eps=1e-8,
                    detach_focal_weight=True, reduction="sum", check_targets=True):
    """ASL of logits (B, K) against targets (B, K): 1 positive, 0 negative, -1 unknown, or soft in [0, 1].

    gamma_neg, gamma_pos: focusing exponents g-, g+ (paper defaults 4 and 0).
    clip: the probability shift m for negatives (paper 0.05; 0 turns it off).
    eps: floor on the probabilities inside the logs, log max(p, eps), as in the ASL and Query2Label
        code. Not needed for finiteness here (the logs are computed as -softplus, finite for
        every finite logit); kept so that settings carry over. It caps each entry's loss at -log eps and
        gives no gradient past that cap. It is applied in log space, as the float64 constant
        log(eps): 1e-8 rounds to 0 in fp16, which is how the reference code reaches log 0.
        eps = 0 gives the paper's formula exactly.
    detach_focal_weight: treat (1 - p)^g+ and p_m^g- as constants in the backward pass (the
        reference's `disable_torch_grad_focal_loss`, done here with .detach(), never by switching
        autograd off); False differentiates through them as well.
    reduction: "sum": the sum over known entries (the ASL code returns -sum of the log-likelihood);
        "mean": the sum / number of known entries (torch's "mean" when nothing is unknown);
        "q2l": official Query2Label, sum / (B*K) * 1000 with B*K counting every entry;
        "none": the (B, K) per-entry loss, 0 at unknown entries.
        They differ by constant factors (sum = mean . n_known, q2l = 1000 . mean without unknowns),
        which AdamW's update undoes (up to its eps) but SGD multiplies into the learning rate; and
        "sum" grows with B*K. Gradient clipping thresholds and logged values depend on the choice.
    check_targets: raise ValueError on targets outside [0, 1] and not -1 (costs one device sync).

    Returns a float32 tensor (float64 for float64 logits, so gradcheck can run). fp16/bf16 logits
    and calls under autocast are computed in float32.
    Deviation: for soft targets the loss is t . L+ + (1 - t) . L-, each term with its own weight;
    the reference code mixes the two weights' bases and exponents instead (it was written for
    hard targets, on which both agree).
    """
    _check_options(gamma_neg, gamma_pos, clip, eps, reduction)
    if not torch.is_floating_point(logits):
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.shape != targets.shape:
        raise ValueError(f"logits have shape {tuple(logits.shape)} but targets have shape "
                         f"{tuple(targets.shape)}; both must be (B, K)")
    dtype = torch.promote_types(logits.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
    # The upcast is what matters: autocast leaves fp32 elementwise ops alone (on the CPU it runs
    # sigmoid, log and pow in bf16/fp16 when *given* bf16/fp16). The region makes sure no op here is
    # ever cast down, whatever autocast's op lists say now or later.
    with torch.autocast(logits.device.type, enabled=False):
        x = logits.to(dtype)  # (B, K)
        t = targets.to(x.device, dtype)  # (B, K)
        known = t >= 0
        if check_targets:
            bad = ~((known & (t <= 1)) | (t == -1))
            if bad.any():
                index = tuple(bad.nonzero()[0].tolist())
                raise ValueError(f"targets must be in [0, 1] (1 positive, 0 negative, soft in between) "
                                 f"or -1 (unknown); {int(bad.sum())} entries are not, e.g. "
                                 f"{t[index].item()} at index {index}")

        p, q = torch.sigmoid(x), torch.sigmoid(-x)  # p and 1 - p, each without cancellation
        # log p = log(1 / (1 + e^-x)) = -softplus(-x): finite for every finite x, where log(sigmoid(x))
        # rounds p to 0 and returns -inf. (F.logsigmoid is the same function, but on the CPU it
        # starts a parallel region for every call, which costs milliseconds on a busy machine.)
        log_p = -F.softplus(-x)
        if clip > 0:
            # 1 - p_m = min(1 - p + m, 1) = min(q + m, 1): the log is >= log m, never -inf;
            # the clamp is the branch p <= m, where 1 - p_m = 1 and the term is 0.
            log_q = torch.log(q + clip).clamp(max=0.0)
        else:
            log_q = -F.softplus(x)  # log(1 - p) = log sigmoid(-x)
        if eps > 0:
            log_p = log_p.clamp(min=math.log(eps))
        if eps > clip:  # otherwise log_q >= log m >= log eps already
            log_q = log_q.clamp(min=math.log(eps))

        w_pos = _focusing_weight(q, gamma_pos, detach_focal_weight)  # (1 - p)^g+
        w_neg = _focusing_weight((p - clip).clamp(min=0.0), gamma_neg, detach_focal_weight)  # p_m^g-
        L_pos = log_p if w_pos is None else w_pos * log_p  # L+
        L_neg = log_q if w_neg is None else w_neg * log_q  # L-

        loss = -(t * L_pos + (1 - t) * L_neg)  # (B, K)
        loss = torch.where(known, loss, 0.0)  # unknown labels: no loss, no gradient

    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / known.sum().clamp(min=1)  # all unknown -> 0, not 0/0
    return loss.sum() / loss.numel() * 1000.0  # "q2l"


def bce(logits, targets, reduction="mean", check_targets=True):
    """Plain binary cross-entropy (torch's "mean" by default): ASL with g+ = g- = m = eps = 0.

    Unknown labels (-1) are still ignored, which torch's BCE cannot do."""
    return asymmetric_loss(logits, targets, **BCE_SETTINGS, reduction=reduction, check_targets=check_targets)


class AsymmetricLoss(nn.Module):
    """nn.Module form of asymmetric_loss (see there for every option)."""

    def __init__(self, gamma_neg=4.0, gamma_pos=0.0, clip=0.05, eps=1e-8, detach_focal_weight=True,
                 reduction="sum", check_targets=True):
        super().__init__()
        _check_options(gamma_neg, gamma_pos, clip, eps, reduction)
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps
        self.detach_focal_weight, self.reduction, self.check_targets = detach_focal_weight, reduction, check_targets

    def forward(self, logits, targets):
        """asymmetric_loss(logits, targets) with this module's options."""
        return asymmetric_loss(logits, targets, self.gamma_neg, self.gamma_pos, self.clip, self.eps,
                               self.detach_focal_weight, self.reduction, self.check_targets)

    def extra_repr(self):
        return (f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, eps={self.eps}, "
                f"detach_focal_weight={self.detach_focal_weight}, reduction={self.reduction!r}")


def plot_shapes(path):
    """Loss and d loss / d logit against p for positives and negatives, at several g and m."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    p = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    settings = {  # (label, target, gamma_pos, gamma_neg, clip)
        "positives": [("BCE (g+ = 0, ASL default)", 1, 0, 0, 0), ("g+ = 1", 1, 1, 0, 0), ("g+ = 2", 1, 2, 0, 0)],
        "negatives": [("BCE", 0, 0, 0, 0), ("g- = 2 (Q2L)", 0, 0, 2, 0), ("g- = 4", 0, 0, 4, 0),
                      ("g- = 4, m = 0.05 (ASL default)", 0, 0, 4, 0.05), ("g- = 4, m = 0.2", 0, 0, 4, 0.2)],
    }
    fig = Figure(figsize=(11, 8))
    axes = fig.subplots(2, 2, sharex=True)
    for column, (kind, rows) in enumerate(settings.items()):
        for label, target, gp, gn, m in rows:
            for detach, style in ((True, "-"), (False, ":")):
                x = torch.logit(p).requires_grad_(True)
                loss = asymmetric_loss(x, torch.full_like(x, target), gn, gp, m, eps=0.0,
                                       detach_focal_weight=detach, reduction="none")
                loss.sum().backward()
                if detach:
                    line, = axes[0, column].plot(p, loss.detach(), style, label=label)
                if detach or (gp or gn):  # dotted: the full derivative, where it differs
                    axes[1, column].plot(p, x.grad.abs(), style, color=line.get_color())
        axes[0, column].set(title=f"{kind}: loss", ylim=(0, 4 if kind == "positives" else 2))
        axes[1, column].set(title=f"{kind}: |d loss / d logit|", xlabel="p = sigmoid(logit)", ylim=(0, 1.3))
        axes[0, column].legend(fontsize=8)
    axes[0, 0].set_ylabel("loss")
    axes[1, 0].set_ylabel("|gradient|")
    fig.suptitle("Gradients: solid = focusing weight detached (the default), dotted = differentiated through it")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def self_check():
    start = time.perf_counter()
    torch.manual_seed(0)
    x = (torch.randn(128, 80) * 4).requires_grad_(True)  # (B, K)
    t = (torch.rand(128, 80) < 0.036).float()  # ~2.9 positives of 80, as on COCO
    x_ref = x.detach().clone().requires_grad_(True)
    ours, ref = bce(x, t), F.binary_cross_entropy_with_logits(x_ref, t)
    ours.backward(), ref.backward()
    print(f"BCE special case vs F.binary_cross_entropy_with_logits (mean): |loss diff| "
          f"{(ours - ref).abs().item():.2e}, max |grad diff| {(x.grad - x_ref.grad).abs().max().item():.2e}")

    x64 = torch.logit(torch.tensor([0.001, 0.02, 0.049, 0.051, 0.1, 0.5, 0.9, 0.999], dtype=torch.float64))
    x64 = x64.repeat(4, 1).requires_grad_(True)  # (4, 8): rows negative, positive, soft 0.3, unknown
    t64 = torch.tensor([0.0, 1.0, 0.3, -1.0], dtype=torch.float64)[:, None].expand_as(x64)
    p = torch.sigmoid(x64.detach())
    p_m = (p - 0.05).clamp(min=0)
    brute = -(t64 * (1 - p) * torch.log(p) + (1 - t64) * p_m**4 * torch.log(1 - p_m)) * (t64 >= 0)
    ours = asymmetric_loss(x64.detach().float(), t64.float(), 4.0, 1.0, 0.05, eps=0.0, reduction="none")
    print(f"float32 loss vs brute-force float64 formula (g- 4, g+ 1, m 0.05, p below/above m, soft, unknown): "
          f"max |diff| {(ours.double() - brute).abs().max().item():.2e}")
    # Detached weight: autograd must return w . d(-log term)/d logit, with w held fixed.
    asymmetric_loss(x64, t64, 4.0, 1.0, 0.05, eps=0.0).backward()
    hand = (-t64 * (1 - p) * (1 - p) + (1 - t64) * p_m**4 * p * (1 - p) / (1 - p_m)) * (t64 >= 0)
    print(f"detached focusing weight: autograd vs hand-derived gradient, max |diff| "
          f"{(x64.grad - hand).abs().max().item():.2e}")

    xg = (torch.randn(6, 5, dtype=torch.float64) * 3).requires_grad_(True)
    tg = torch.tensor([0.0, 1.0, 0.25, -1.0, 0.0], dtype=torch.float64).expand(6, 5)
    ok = torch.autograd.gradcheck(lambda v: asymmetric_loss(v, tg, 4.0, 1.0, detach_focal_weight=False), (xg,))
    print(f"gradcheck float64 (g- 4, g+ 1, m 0.05, focusing weight not detached): {'passed' if ok else 'FAILED'}")

    extreme = torch.tensor([[-65504, -100, 0, 100, 65504]] * 3, dtype=torch.float16)  # (3, 5)
    rows = torch.tensor([[0.0] * 5, [1.0] * 5, [1, 0, 1, 0, 1]])  # all-negative, all-positive, mixed
    for name, precision in (("fp16 inputs", None), ("bf16 autocast", torch.bfloat16), ("fp16 autocast", torch.float16)):
        xe = extreme.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=precision or torch.float16, enabled=precision is not None):
            loss = asymmetric_loss(xe * 1, rows)  # `* 1`: an op run under autocast, as a model's last layer
        loss.backward()
        print(f"logits +-100 and +-65504, {name}: loss {loss.item():.4g} ({loss.dtype}), "
              f"gradient finite: {bool(torch.isfinite(xe.grad).all())}")
    p16 = torch.sigmoid(extreme)  # the reference's form: log(clamp(sigmoid)) in the input precision
    naive = -(rows * torch.log(p16.clamp(min=1e-8)) + (1 - rows) * torch.log((1 - p16).clamp(min=1e-8))).sum()
    print(f"  for contrast, log(sigmoid(x).clamp(min=1e-8)) in fp16 gives {naive.item()} (1e-8 is 0 in fp16)")

    plot_shapes("docs/figures/04_asl_shapes.png")
    print(f"wrote docs/figures/04_asl_shapes.png; self-check took {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False).parse_args()
    self_check()
