"""Stage 4 (04_loss.py): the asymmetric loss, against torch's BCE, the paper's formula and hand derivatives.

Everything goes through the `stage04` fixture, so a learner can run these tests on their own file
(`python tools/exercise.py 04` writes one to start from):
    Q2L_STAGE_04=my_04_loss.py python -m pytest tests/test_04_loss.py
Two kinds of checks:
- `lesson` checks, in reading order (positive term, negative term, the shift, ..., gradients, the
  module), at the tolerance a correct float32 version written straight from the equations meets;
  on failure they show the small input, expected and obtained values, and a hint;
- `stability` checks: extreme logits, fp16/bf16 and autocast, 1e-12 parity in float64. Our
  reference passes them all; a correct first version usually does not, and the learner-mode
  summary says what to change.
The brute-force reference below is written independently of 04_loss.py: the paper's formula, one
entry at a time, in Python floats (float64) with plain sigmoid and log.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_teaching

EXTREME = [-65504.0, -100.0, -10.0, 0.0, 10.0, 100.0, 65504.0]  # 65504 = largest fp16
SETTINGS = {  # name: (gamma_neg, gamma_pos, clip)
    "asl_default": (4.0, 0.0, 0.05),
    "asl_gamma_pos": (4.0, 1.0, 0.05),
    "q2l": (2.0, 0.0, 0.0),
    "clip_0.2": (3.0, 2.0, 0.2),
    "gamma_below_1": (0.5, 0.5, 0.05),
    "clip_only": (0.0, 0.0, 0.1),  # the shift alone: where p <= m, 1 - p_m = 1 exactly, not 1 - p + m
    "bce": (0.0, 0.0, 0.0),
}
# What a correct float32 version written from the equations meets (log(sigmoid(x)) in fp32 is off by
# ~3e-6 at |x| <= 4); the stability checks below hold our code to 1e-6 .. 1e-12.
LEARNER = dict(rtol=1e-4, atol=1e-5)
HINT_LOGS = ("log(sigmoid(x)) is -inf once sigmoid rounds to 0 (x = -100 in float32, -17.3 in fp16): "
             "log p = F.logsigmoid(x), log(1 - p) = F.logsigmoid(-x); compute in float32 (logits.float())")


def formula(x, t, gamma_neg, gamma_pos, clip):
    """-(t (1-p)^g+ log p + (1-t) p_m^g- log(1-p_m)), p_m = max(p - m, 0); 0 for unknown (t = -1)."""
    if t < 0:
        return 0.0
    p = 1.0 / (1.0 + math.exp(-x))
    p_m = max(p - clip, 0.0)
    positive = (1.0 - p) ** gamma_pos * math.log(p)
    negative = p_m**gamma_neg * math.log(1.0 - p_m)
    return -(t * positive + (1.0 - t) * negative)


def grid(dtype=torch.float64):
    """Logits whose p lies below, near and above the shifts 0.05 and 0.2, against 5 kinds of target."""
    p = torch.tensor([0.001, 0.01, 0.03, 0.049, 0.051, 0.1, 0.19, 0.21, 0.5, 0.7, 0.9, 0.99, 0.999],
                     dtype=torch.float64)
    targets = torch.tensor([0.0, 1.0, 0.3, 0.75, -1.0], dtype=torch.float64)
    x = torch.logit(p).repeat(len(targets), 1)  # (5, 13)
    t = targets[:, None].expand_as(x).clone()  # (5, 13)
    return x.to(dtype), t.to(dtype)


def per_entry(stage04, x, t, **options):
    """The loss of each entry on its own (a (1, 1) call with reduction "sum"), so the first lessons
    need neither reduction="none" nor anything beyond one entry at a time."""
    return torch.stack([stage04.asymmetric_loss(x[i:i + 1, k:k + 1], t[i:i + 1, k:k + 1], **options)
                        for i in range(x.shape[0]) for k in range(x.shape[1])]).reshape(x.shape)


def check_terms(stage04, p, target, hint, what, gamma_neg=0.0, gamma_pos=0.0, clip=0.0):
    """Per-entry loss at probabilities p (float32 logits) for one target, against the formula."""
    x = torch.logit(torch.tensor([p], dtype=torch.float64)).float()  # (1, n)
    t = torch.full_like(x, target)
    options = dict(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=0.0)
    obtained = per_entry(stage04, x, t, **options)
    expected = torch.tensor([[formula(v, target, gamma_neg, gamma_pos, clip) for v in x[0].double().tolist()]])
    assert_close_teaching(obtained, expected, what=what, hint=hint, **LEARNER,
                          inputs={"logits": x, "p": torch.sigmoid(x.double()), "targets": t, "options": options})


# ------------------------------------------------------------------ the two terms, one entry at a time

P_WIDE = [0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98]
P_SHIFT = [0.01, 0.04, 0.06, 0.15, 0.25, 0.5, 0.9]  # below and above m = 0.05 and 0.2


@pytest.mark.lesson(1, "positive term: -log p")
def test_positive_term(stage04):
    check_terms(stage04, P_WIDE, 1.0, what="asymmetric_loss, positive term (target 1, g+ = 0)",
                hint="the positive term: loss = -log p with p = sigmoid(logit), for target 1")


@pytest.mark.lesson(2, "positive focusing weight (1 - p)^g+")
@pytest.mark.parametrize("gamma_pos", [1.0, 2.0])
def test_positive_focusing_weight(stage04, gamma_pos):
    check_terms(stage04, P_WIDE, 1.0, gamma_pos=gamma_pos, what=f"asymmetric_loss, positive term with g+ = {gamma_pos:g}",
                hint="the positive term: -(1 - p)^g+ . log p; the weight uses gamma_pos, not gamma_neg")


@pytest.mark.lesson(3, "negative term: -log(1 - p)")
def test_negative_term(stage04):
    check_terms(stage04, P_WIDE, 0.0, what="asymmetric_loss, negative term (target 0, g- = 0, m = 0)",
                hint="the negative term: loss = -log(1 - p) for target 0")


@pytest.mark.lesson(4, "negative focusing weight p^g-")
@pytest.mark.parametrize("gamma_neg", [2.0, 4.0])
def test_negative_focusing_weight(stage04, gamma_neg):
    check_terms(stage04, P_WIDE, 0.0, gamma_neg=gamma_neg, what=f"asymmetric_loss, negative term with g- = {gamma_neg:g}, m = 0",
                hint="the negative term: -p_m^g- . log(1 - p_m); with m = 0, p_m = p; the weight uses gamma_neg")


@pytest.mark.lesson(5, "negative term with the shift p_m = max(p - m, 0)")
@pytest.mark.parametrize("gamma_neg, clip", [(0.0, 0.05), (4.0, 0.05), (4.0, 0.2)])
def test_negative_term_with_the_shift(stage04, gamma_neg, clip):
    check_terms(stage04, P_SHIFT, 0.0, gamma_neg=gamma_neg, clip=clip,
                what=f"asymmetric_loss, negative term with the shift m = {clip:g} (g- = {gamma_neg:g})",
                hint="the negative term: p_m = max(p - m, 0), in both the weight and the log: "
                     "-p_m^g- . log(1 - p_m); 0 where p <= m")


@pytest.mark.lesson(6, "soft targets: t . L+ + (1 - t) . L-")
@pytest.mark.parametrize("target", [0.3, 0.75])
def test_soft_targets_mix_the_two_terms(stage04, target):
    check_terms(stage04, P_SHIFT, target, gamma_neg=4.0, gamma_pos=1.0, clip=0.05,
                what=f"asymmetric_loss, soft target {target} (g- 4, g+ 1, m 0.05)",
                hint="soft targets: loss = -(t . L+ + (1 - t) . L-), each term with its own weight and its "
                     "own p (p for L+, p_m for L-)")


@pytest.mark.lesson(7, "eps: log max(p, eps)")
def test_eps_is_a_floor_on_the_probability(stage04):
    # log max(p, eps): the loss of a very wrong positive stops at -log eps, and so does its gradient.
    x = torch.tensor([[-30.0, -5.0]], requires_grad=True)
    t = torch.ones(1, 2)
    loss = stage04.asymmetric_loss(x, t, gamma_pos=0.0, eps=1e-5, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    hint = "eps is a floor inside the logs: log(p.clamp(min=eps)), or max(log p, log eps); no gradient past it"
    inputs = {"logits": x, "targets": t, "options": dict(gamma_pos=0.0, eps=1e-5, reduction="none")}
    expected = torch.tensor([[-math.log(1e-5), 5.0 + math.log1p(math.exp(-5.0))]])
    assert_close_teaching(loss, expected, what="asymmetric_loss with eps = 1e-5, loss", inputs=inputs, hint=hint, **LEARNER)
    expected_grad = torch.tensor([[0.0, -1 / (1 + math.exp(-5.0))]])
    assert_close_teaching(grad, expected_grad, what="asymmetric_loss with eps = 1e-5, gradient", inputs=inputs,
                          hint=hint, **LEARNER)


# ------------------------------------------------------------------ plain BCE as a special case


@pytest.mark.lesson(8, "BCE as the special case g+ = g- = m = 0")
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("soft", [False, True])
def test_zero_gamma_and_clip_is_bce(stage04, reduction, soft):
    torch.manual_seed(0)
    x = (torch.randn(4, 5) * 2).requires_grad_(True)
    t = torch.rand(4, 5) if soft else (torch.rand(4, 5) < 0.3).float()
    ours = stage04.asymmetric_loss(x, t, gamma_neg=0.0, gamma_pos=0.0, clip=0.0, eps=0.0, reduction=reduction)
    (grad,) = torch.autograd.grad(ours, x)
    x_ref = x.detach().requires_grad_(True)
    ref = F.binary_cross_entropy_with_logits(x_ref, t, reduction=reduction)
    (grad_ref,) = torch.autograd.grad(ref, x_ref)
    inputs = {"logits": x, "targets": t, "options": dict(gamma_neg=0, gamma_pos=0, clip=0, eps=0, reduction=reduction)}
    assert_close_teaching(ours, ref, what=f"asymmetric_loss vs torch's BCE ({reduction})", inputs=inputs, **LEARNER,
                          hint=f"with g+ = g- = m = 0 the loss is BCE; '{reduction}': "
                               + ("the sum over entries" if reduction == "sum" else "the sum / number of entries"))
    assert_close_teaching(grad, grad_ref, what=f"gradient of asymmetric_loss vs torch's BCE ({reduction})",
                          inputs=inputs, **LEARNER, hint="the gradient of BCE w.r.t. the logit is p - t (/ B.K for mean)")


@pytest.mark.lesson(9, "bce(): BCE via asymmetric_loss")
def test_bce_helper_is_torch_bce(stage04):
    torch.manual_seed(1)
    x, t = torch.randn(2, 5) * 2, (torch.rand(2, 5) < 0.3).float()
    assert_close_teaching(stage04.bce(x, t), F.binary_cross_entropy_with_logits(x, t), what="bce(logits, targets)",
                          inputs={"logits": x, "targets": t}, **LEARNER,
                          hint="bce: asymmetric_loss with BCE_SETTINGS (g+ = g- = m = eps = 0) and reduction 'mean'")


# ------------------------------------------------------------------ reductions and unknown labels


@pytest.mark.lesson(10, "reductions: sum, mean, q2l, none")
def test_reductions_relate_as_documented(stage04):
    torch.manual_seed(4)
    B, K = 2, 5
    x = torch.randn(B, K) * 2
    t = (torch.rand(B, K) < 0.3).float()
    loss = {r: stage04.asymmetric_loss(x, t, reduction=r) for r in ("none", "sum", "mean", "q2l")}
    entries = per_entry(stage04, x, t)
    inputs = {"logits": x, "targets": t}
    assert_close_teaching(loss["none"], entries, what="reduction='none': the (B, K) per-entry losses", inputs=inputs,
                          hint="reduction 'none' returns the (B, K) loss before any sum", **LEARNER)
    for name, expected, hint in [("sum", entries.sum(), "'sum': the sum over all (known) entries"),
                                 ("mean", entries.sum() / (B * K), "'mean': the sum / number of known entries"),
                                 ("q2l", entries.sum() / (B * K) * 1000, "'q2l': the sum / (B . K) * 1000 (official Q2L)")]:
        assert_close_teaching(loss[name], expected, what=f"reduction={name!r}", inputs=inputs, hint=hint, **LEARNER)


@pytest.mark.lesson(11, "unknown labels (-1): no loss, no gradient")
def test_unknown_labels_are_ignored(stage04):
    x = torch.tensor([[-2.0, -0.5, 0.5, 2.0], [1.0, -1.0, 3.0, -3.0]], requires_grad=True)
    t = torch.tensor([[1.0, -1.0, 0.0, -1.0], [-1.0, 0.0, 1.0, 0.0]])
    known = t >= 0
    hint = ("unknown labels: an entry with target -1 gives loss 0 and gradient 0 (torch.where(t >= 0, loss, 0)); "
            "'mean' divides by the number of known entries")
    inputs = {"logits": x, "targets": t}
    per = stage04.asymmetric_loss(x, t, reduction="none")
    assert_close_teaching(per.masked_fill(known, 0.0), torch.zeros_like(x), what="loss at unknown entries (t = -1)",
                          inputs=inputs, hint=hint, atol=0.0, rtol=0.0)
    for reduction in ("sum", "mean"):
        loss = stage04.asymmetric_loss(x, t, reduction=reduction)
        subset = stage04.asymmetric_loss(x[known][None], t[known][None], reduction=reduction)  # (1, n_known)
        assert_close_teaching(loss, subset, what=f"loss ({reduction}) with unknowns vs on the known entries only",
                              inputs=inputs, hint=hint, **LEARNER)
    (grad,) = torch.autograd.grad(stage04.asymmetric_loss(x, t), x)
    assert_close_teaching(grad.masked_fill(known, 0.0), torch.zeros_like(x), what="gradient at unknown entries",
                          inputs=inputs, hint=hint, atol=0.0, rtol=0.0)


# ------------------------------------------------------------------ gradients


def hand_gradient(x, t, gamma_neg, gamma_pos, clip, detached):
    """d loss / d logit from the chain rule by hand (float64); p > m branch and p <= m branch."""
    p = torch.sigmoid(x)
    p_m = (p - clip).clamp(min=0)
    dp = p * (1 - p)  # dp/dx
    # positive: -(1-p)^g+ log p  ->  -(1-p)^g+ (1-p)  [+ g+ (1-p)^(g+-1) dp log p if not detached]
    g_pos = -(1 - p) ** gamma_pos * (1 - p)
    # negative: -p_m^g- log(1-p_m) -> p_m^g- dp / (1-p_m)  [- g- p_m^(g--1) dp log(1-p_m) if not detached]
    g_neg = torch.where(p > clip, p_m**gamma_neg * dp / (1 - p_m), 0.0)
    if not detached:
        g_pos = g_pos + gamma_pos * (1 - p) ** (gamma_pos - 1) * dp * torch.log(p)
        g_neg = g_neg - torch.where(p > clip, gamma_neg * p_m ** (gamma_neg - 1) * dp * torch.log(1 - p_m), 0.0)
    return torch.where(t >= 0, t * g_pos + (1 - t) * g_neg, 0.0)


@pytest.mark.lesson(12, "gradients: detached focusing weight, and the full derivative")
@pytest.mark.parametrize("detached", [True, False])
@pytest.mark.parametrize("name", ["asl_default", "asl_gamma_pos", "clip_0.2"])
def test_gradient_matches_the_hand_derivative(stage04, name, detached):
    # gradcheck cannot check the detached case (its gradient is on purpose not the forward's
    # derivative), so both cases are checked against the chain rule written out by hand.
    gamma_neg, gamma_pos, clip = SETTINGS[name]
    x = torch.logit(torch.tensor([[0.02, 0.1, 0.3, 0.7, 0.9], [0.02, 0.1, 0.3, 0.7, 0.9]], dtype=torch.float64))
    t = torch.tensor([[1.0] * 5, [0.0] * 5], dtype=torch.float64)
    options = dict(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=0.0, detach_focal_weight=detached)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(stage04.asymmetric_loss(xg, t, **options), xg)
    expected = hand_gradient(x, t, gamma_neg, gamma_pos, clip, detached)
    hint = ("detach_focal_weight=True: the weights (1 - p)^g+ and p_m^g- are constants in the backward pass "
            "(w.detach())" if detached else "detach_focal_weight=False: the weights are differentiated too (no .detach())")
    assert_close_teaching(grad, expected, what=f"d loss / d logit ({name}, detach_focal_weight={detached})",
                          inputs={"logits": x, "p": torch.sigmoid(x), "targets": t, "options": options}, hint=hint,
                          **LEARNER)
    # and the two modes really differ: by the focusing weight's own derivative
    other = hand_gradient(x, t, gamma_neg, gamma_pos, clip, not detached)
    assert (grad - other).abs().max() > 1e-3


@pytest.mark.lesson(13, "gradients: autograd vs finite differences")
@pytest.mark.parametrize("name", ["asl_default", "asl_gamma_pos", "clip_0.2"])
def test_full_gradient_matches_finite_differences(stage04, name):
    gamma_neg, gamma_pos, clip = SETTINGS[name]
    x, t = grid(torch.float64)  # no p sits within the step of a shift's kink
    options = dict(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, detach_focal_weight=False, reduction="sum")
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(stage04.asymmetric_loss(xg, t, **options), xg)
    step = 1e-6
    numeric = torch.zeros_like(x)
    for index in range(x.numel()):
        bump = torch.zeros(x.numel(), dtype=x.dtype)
        bump[index] = step
        bump = bump.reshape(x.shape)
        up, down = stage04.asymmetric_loss(x + bump, t, **options), stage04.asymmetric_loss(x - bump, t, **options)
        numeric.view(-1)[index] = (up - down) / (2 * step)
    assert_close_teaching(grad, numeric, what=f"autograd gradient vs central differences ({name}, not detached)",
                          inputs={"logits": x, "targets": t, "options": options}, rtol=1e-5, atol=1e-7,
                          hint="the backward pass must be the derivative of the forward when detach_focal_weight=False")


# ------------------------------------------------------------------ the module and autograd state


@pytest.mark.lesson(14, "the module AsymmetricLoss")
def test_module_defaults_and_functional_agree(stage04):
    module = stage04.AsymmetricLoss()
    assert (module.gamma_neg, module.gamma_pos, module.clip, module.eps) == (4.0, 0.0, 0.05, 1e-8)
    assert module.detach_focal_weight is True and module.reduction == "sum"
    torch.manual_seed(5)
    x, t = torch.randn(2, 4), (torch.rand(2, 4) < 0.3).float()
    hint = "AsymmetricLoss.forward: return asymmetric_loss(logits, targets, <this module's options>)"
    assert_close_teaching(module(x, t), stage04.asymmetric_loss(x, t), what="AsymmetricLoss()(x, t)",
                          inputs={"logits": x, "targets": t}, hint=hint, rtol=0.0, atol=0.0)
    options = dict(gamma_neg=2.0, gamma_pos=0.0, clip=0.0, eps=1e-5, reduction="q2l")
    assert_close_teaching(stage04.AsymmetricLoss(**options)(x, t), stage04.asymmetric_loss(x, t, **options),
                          what="AsymmetricLoss(**Q2L settings)(x, t)", inputs={"logits": x, "targets": t,
                                                                               "options": options},
                          hint=hint, rtol=0.0, atol=0.0)


@pytest.mark.lesson(15, "detach, never switch autograd off")
def test_global_autograd_state_is_never_touched(stage04, monkeypatch):
    calls = []
    for owner, name in ((torch._C, "_set_grad_enabled"), (torch._C, "set_grad_enabled")):
        original = getattr(owner, name, None)
        if original is not None:
            def spy(mode, _original=original, _name=name):
                calls.append((_name, mode))
                return _original(mode)
            monkeypatch.setattr(owner, name, spy)
    x = torch.randn(4, 6, requires_grad=True)
    t = (torch.rand(4, 6) < 0.5).float()
    for detached in (True, False):
        assert torch.is_grad_enabled()
        loss = stage04.asymmetric_loss(x, t, detach_focal_weight=detached)
        assert torch.is_grad_enabled() and loss.requires_grad
    assert calls == [], (f"the loss switched autograd globally: {calls}; hint: hold the focusing weight "
                         "constant with w.detach(), never torch.no_grad / set_grad_enabled inside a loss")
    monkeypatch.undo()
    with torch.no_grad():
        loss = stage04.asymmetric_loss(x, t)
        assert not torch.is_grad_enabled() and not loss.requires_grad


def test_plot_writes_a_png(stage04, tmp_path):
    path = tmp_path / "shapes.png"
    stage04.plot_shapes(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ stability and strictness


@pytest.mark.stability("1e-12 in float64: take no shortcuts that lose digits; the two logs as "
                       "F.logsigmoid(x) and F.logsigmoid(-x) (or log(sigmoid(-x) + m) with the shift)")
@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_entry_matches_the_paper_formula_in_float64(stage04, name):
    gamma_neg, gamma_pos, clip = SETTINGS[name]
    x, t = grid(torch.float64)
    ours = per_entry(stage04, x, t, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=0.0)
    expected = torch.tensor([[formula(a, b, gamma_neg, gamma_pos, clip) for a, b in zip(row_x, row_t, strict=True)]
                             for row_x, row_t in zip(x.tolist(), t.tolist(), strict=True)], dtype=torch.float64)
    assert_close_teaching(ours, expected, what=f"float64 loss entry by entry ({name}), to 1e-12",
                          inputs={"logits": x, "p": torch.sigmoid(x), "targets": t}, rtol=1e-12, atol=1e-14,
                          hint="float64 parity: compute p, log p and log(1 - p) without cancellation")


@pytest.mark.stability("float32 to 1e-6 up to p = 0.999: log(1 - p) from 1 - sigmoid(x) loses digits; "
                       "use F.logsigmoid(-x) (sigmoid(-x) = 1 - p without cancellation)")
@pytest.mark.parametrize("name", ["asl_default", "asl_gamma_pos", "gamma_below_1", "bce"])
def test_float32_batch_matches_the_formula(stage04, name):
    gamma_neg, gamma_pos, clip = SETTINGS[name]
    x, t = grid(torch.float32)
    ours = stage04.asymmetric_loss(x, t, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=0.0)
    pairs = zip(x.double().flatten().tolist(), t.flatten().tolist(), strict=True)
    expected = sum(formula(a, b, gamma_neg, gamma_pos, clip) for a, b in pairs)
    assert ours.dtype == torch.float32
    assert_close_teaching(ours, expected, what=f"float32 loss, sum over p from 0.001 to 0.999 ({name})",
                          inputs={"logits": x, "targets": t}, rtol=1e-6, atol=0.0,
                          hint="float32 accuracy: log(1 - p) as F.logsigmoid(-x), not log(1 - sigmoid(x))")


@pytest.mark.stability("a focusing weight p_m^g with 0 < g < 1 has an infinite derivative at p_m = 0 and "
                       "0 . inf = NaN: give it derivative 0 there (torch.where on a safe base)")
@pytest.mark.parametrize("name", ["gamma_below_1"])
def test_gradcheck_float64_full_gradient(stage04, name):
    gamma_neg, gamma_pos, clip = SETTINGS[name]
    x, t = grid(torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v: stage04.asymmetric_loss(v, t, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip,
                                          detach_focal_weight=False, reduction="mean"), (x,))


@pytest.mark.stability("no NaN gradient where p_m = 0: for 0 < g < 1 give p_m^g derivative 0 there; "
                       "and at x = -65504 sigmoid is 0, so log p needs F.logsigmoid")
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 4.0])
def test_no_nan_gradient_where_the_shifted_probability_is_zero(stage04, gamma):
    # d/dp p_m^g at p_m = 0 is infinite for 0 < g < 1, and 0 . inf = NaN if handled naively.
    x = torch.tensor([[-65504.0, -200.0, -50.0, -3.0, torch.logit(torch.tensor(0.03)).item(), 0.0, 50.0]],
                     dtype=torch.float64, requires_grad=True)
    for clip in (0.0, 0.05):
        for t in (torch.zeros_like(x), torch.ones_like(x)):
            loss = stage04.asymmetric_loss(x, t, gamma_neg=gamma, gamma_pos=gamma, clip=clip, eps=0.0,
                                           detach_focal_weight=False)
            (grad,) = torch.autograd.grad(loss, x)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), (
                f"g = {gamma}, m = {clip}, target {t[0, 0].item():g}, logits {x.detach().tolist()[0]}: "
                f"loss {loss.item()}, gradient {grad.tolist()[0]}")


def extreme_batch(dtype):
    x = torch.tensor([EXTREME] * 4, dtype=dtype)  # (4, 7)
    t = torch.tensor([[0.0] * 7, [1.0] * 7, [1, 0, 1, 0, 1, 0, 1], [0.5] * 7])  # all 0, all 1, mixed, soft
    return x, t


@pytest.mark.stability(HINT_LOGS)
@pytest.mark.parametrize("eps", [0.0, 1e-8, 1e-5])
@pytest.mark.parametrize("name", ["asl_default", "q2l", "gamma_below_1", "bce"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_finite_loss_and_gradient_at_extreme_logits(stage04, dtype, name, eps):
    gamma_neg, gamma_pos, clip = SETTINGS[name]
    x, t = extreme_batch(dtype)
    for detached in (True, False):
        xg = x.clone().requires_grad_(True)
        loss = stage04.asymmetric_loss(xg, t, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps,
                                       detach_focal_weight=detached)
        loss.backward()
        assert loss.dtype == torch.float32, f"{dtype} logits gave a {loss.dtype} loss; compute in float32"
        assert torch.isfinite(loss) and torch.isfinite(xg.grad).all(), (
            f"logits {EXTREME} ({dtype}), targets 0 / 1 / mixed / 0.5, {name}, eps {eps}: loss {loss.item()}, "
            f"gradient finite: {bool(torch.isfinite(xg.grad).all())}")


@pytest.mark.stability(HINT_LOGS)
def test_extreme_logits_have_the_right_values(stage04):
    # Without the eps floor, a positive at logit -65504 costs exactly 65504 (log p = x there), and a
    # negative at +65504 with shift m costs log(1/m) (1 - p_m = m).
    x = torch.tensor([[-65504.0, 65504.0]], dtype=torch.float16)
    t = torch.tensor([[1.0, 0.0]])
    loss = stage04.asymmetric_loss(x, t, gamma_neg=4.0, gamma_pos=0.0, clip=0.05, eps=0.0)
    assert_close_teaching(loss, 65504.0 + (0.95**4) * -math.log(0.05), what="loss at logits -65504 and +65504",
                          inputs={"logits": x, "targets": t}, rtol=1e-6, atol=0.0, hint=HINT_LOGS)


@pytest.mark.stability("under autocast the logits arrive in bf16/fp16: upcast them (logits.float()) before "
                       "sigmoid and log, and use F.logsigmoid")
@pytest.mark.parametrize("precision", [torch.bfloat16, torch.float16])
def test_finite_under_cpu_autocast(stage04, precision):
    layer = torch.nn.Linear(4, 7)
    with torch.no_grad():  # outputs exactly the extreme logits, whatever the input
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor(EXTREME))
    _, t = extreme_batch(torch.float32)
    try:
        with torch.autocast("cpu", dtype=precision):
            logits = layer(torch.randn(4, 4))
    except RuntimeError as error:
        pytest.skip(f"CPU autocast with {precision} not supported here: {error}")
    if logits.dtype != precision:
        pytest.skip(f"CPU autocast does not run Linear in {precision} in this torch")
    with torch.autocast("cpu", dtype=precision):
        loss = stage04.asymmetric_loss(logits, t)
        assert torch.is_autocast_enabled("cpu")  # the loss left autocast on for the caller
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(layer.weight.grad).all() and torch.isfinite(layer.bias.grad).all()


@pytest.mark.gpu
@pytest.mark.stability("under CUDA autocast the logits arrive in fp16/bf16: upcast them before sigmoid and log")
@pytest.mark.parametrize("precision", [torch.float16, torch.bfloat16])
def test_finite_under_cuda_autocast_and_equal_to_cpu(stage04, precision):
    layer = torch.nn.Linear(4, 7).cuda()
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor(EXTREME))
    _, t = extreme_batch(torch.float32)
    with torch.autocast("cuda", dtype=precision):
        logits = layer(torch.randn(4, 4, device="cuda"))
        loss = stage04.asymmetric_loss(logits, t.cuda())
    loss.backward()
    assert logits.dtype == precision and loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(layer.bias.grad).all()
    on_cpu = stage04.asymmetric_loss(logits.detach().cpu(), t)
    assert loss.item() == pytest.approx(on_cpu.item(), rel=1e-5)


@pytest.mark.stability("fp16/bf16 logits: compute in float32 (x = logits.float()) and return float32")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_result_is_float32(stage04, dtype):
    x, t = torch.randn(3, 5).to(dtype), torch.ones(3, 5)
    for reduction in ("sum", "mean", "q2l"):
        assert stage04.asymmetric_loss(x, t, reduction=reduction).dtype == torch.float32, (dtype, reduction)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert stage04.AsymmetricLoss()(x, t).dtype == torch.float32


@pytest.mark.stability("'mean' over zero known entries is 0 / 0 = NaN: divide by known.sum().clamp(min=1)")
@pytest.mark.parametrize("reduction", ["sum", "mean", "q2l"])
def test_all_unknown_is_zero_not_nan(stage04, reduction):
    x = torch.randn(2, 3, requires_grad=True)
    loss = stage04.asymmetric_loss(x, torch.full((2, 3), -1.0), reduction=reduction)
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all(), f"all targets -1, {reduction}: loss {loss.item()}"


# ------------------------------------------------------------------ errors (our wording; not the lesson)


@pytest.mark.hardening
@pytest.mark.parametrize("targets, message", [
    (torch.full((2, 3), 2.0), "targets"),
    (torch.full((2, 3), -0.5), "targets"),
    (torch.full((2, 3), float("nan")), "targets"),
    (torch.ones(2, 4), r"\(2, 3\).*\(2, 4\)"),
])
def test_bad_targets_raise_a_clear_error(stage04, targets, message):
    with pytest.raises(ValueError, match=message):
        stage04.asymmetric_loss(torch.randn(2, 3), targets)


@pytest.mark.hardening
@pytest.mark.parametrize("options", [dict(reduction="avg"), dict(gamma_neg=-1.0), dict(clip=1.0), dict(eps=-1e-8)])
def test_bad_options_raise_a_clear_error(stage04, options):
    with pytest.raises(ValueError):
        stage04.AsymmetricLoss(**options)
    with pytest.raises(ValueError):
        stage04.asymmetric_loss(torch.randn(2, 3), torch.ones(2, 3), **options)


@pytest.mark.hardening
def test_integer_targets_work_and_integer_logits_do_not(stage04):
    x = torch.randn(2, 3)
    t = torch.tensor([[1, 0, -1], [0, 0, 1]])
    assert stage04.asymmetric_loss(x, t).item() == pytest.approx(stage04.asymmetric_loss(x, t.float()).item())
    with pytest.raises(TypeError):
        stage04.asymmetric_loss(t, t)
