"""Stage 4 (04_loss.py): the asymmetric loss, against torch's BCE, the paper's formula and hand derivatives.

Everything goes through the `stage04` fixture, so a learner can run these tests on their own file:
    Q2L_STAGE_04=my_loss.py python -m pytest tests/test_04_loss.py
The brute-force reference below is written independently of 04_loss.py: the paper's formula, one
entry at a time, in Python floats (float64) with plain sigmoid and log.
"""

import math
from pathlib import Path

import conftest
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
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


# ------------------------------------------------------------------ plain BCE as a special case


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("soft", [False, True])
def test_zero_gamma_and_clip_is_bce(stage04, reduction, soft):
    torch.manual_seed(0)
    x = (torch.randn(16, 80) * 5).requires_grad_(True)
    t = torch.rand(16, 80) if soft else (torch.rand(16, 80) < 0.04).float()
    x_ref = x.detach().clone().requires_grad_(True)
    ours = stage04.asymmetric_loss(x, t, gamma_neg=0.0, gamma_pos=0.0, clip=0.0, eps=0.0, reduction=reduction)
    ref = F.binary_cross_entropy_with_logits(x_ref, t, reduction=reduction)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


def test_bce_helper_is_torch_bce(stage04):
    torch.manual_seed(1)
    x, t = torch.randn(8, 20) * 3, (torch.rand(8, 20) < 0.2).float()
    torch.testing.assert_close(stage04.bce(x, t), F.binary_cross_entropy_with_logits(x, t), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the formula, entry by entry


@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_entry_matches_the_paper_formula_in_float64(stage04, name):
    gamma_neg, gamma_pos, clip = SETTINGS[name]
    x, t = grid(torch.float64)
    for i in range(x.shape[0]):
        for k in range(x.shape[1]):
            ours = stage04.asymmetric_loss(x[i:i + 1, k:k + 1], t[i:i + 1, k:k + 1], gamma_neg=gamma_neg,
                                           gamma_pos=gamma_pos, clip=clip, eps=0.0, reduction="sum")
            expected = formula(x[i, k].item(), t[i, k].item(), gamma_neg, gamma_pos, clip)
            assert ours.item() == pytest.approx(expected, rel=1e-12, abs=1e-14), (name, i, k)


@pytest.mark.parametrize("name", ["asl_default", "asl_gamma_pos", "gamma_below_1"])
def test_float32_batch_matches_the_formula(stage04, name):
    gamma_neg, gamma_pos, clip = SETTINGS[name]
    x, t = grid(torch.float32)
    ours = stage04.asymmetric_loss(x, t, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=0.0)
    pairs = zip(x.double().flatten().tolist(), t.flatten().tolist(), strict=True)
    expected = sum(formula(a, b, gamma_neg, gamma_pos, clip) for a, b in pairs)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(expected, rel=1e-6)


def test_soft_targets_mix_the_positive_and_negative_terms(stage04):
    # Defined as t . L+ + (1 - t) . L-: the loss is linear in t, values and gradients.
    torch.manual_seed(2)
    x = (torch.randn(4, 10, dtype=torch.float64) * 3).requires_grad_(True)
    t = torch.rand(4, 10, dtype=torch.float64)
    mixed = stage04.asymmetric_loss(x, t)
    (g_mixed,) = torch.autograd.grad(mixed, x)
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    parts = 0.0
    g_parts = torch.zeros_like(x)
    for i in range(4):
        for k in range(10):
            xi = x[i:i + 1, k:k + 1]
            pos, neg = stage04.asymmetric_loss(xi, ones[:1, :1]), stage04.asymmetric_loss(xi, zeros[:1, :1])
            w = t[i, k].item()
            parts = parts + w * pos + (1 - w) * neg
            g_parts[i, k] = w * torch.autograd.grad(pos, xi)[0] + (1 - w) * torch.autograd.grad(neg, xi)[0]
    torch.testing.assert_close(mixed, parts, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_mixed, g_parts, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("name", ["asl_default", "asl_gamma_pos", "clip_0.2", "gamma_below_1"])
def test_gradcheck_float64_full_gradient(stage04, name):
    gamma_neg, gamma_pos, clip = SETTINGS[name]
    x, t = grid(torch.float64)  # no p sits within gradcheck's step of a shift's kink
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v: stage04.asymmetric_loss(v, t, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip,
                                          detach_focal_weight=False, reduction="mean"), (x,))


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


@pytest.mark.parametrize("detached", [True, False])
@pytest.mark.parametrize("name", ["asl_default", "asl_gamma_pos", "clip_0.2"])
def test_gradient_matches_the_hand_derivative(stage04, name, detached):
    # gradcheck cannot check the detached case (its gradient is on purpose not the forward's
    # derivative), so both cases are checked against the chain rule written out by hand.
    gamma_neg, gamma_pos, clip = SETTINGS[name]
    x, t = grid(torch.float64)
    x.requires_grad_(True)
    loss = stage04.asymmetric_loss(x, t, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=0.0,
                                   detach_focal_weight=detached)
    (grad,) = torch.autograd.grad(loss, x)
    expected = hand_gradient(x.detach(), t, gamma_neg, gamma_pos, clip, detached)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    # and the two modes really differ: by the focusing weight's own derivative
    other = hand_gradient(x.detach(), t, gamma_neg, gamma_pos, clip, not detached)
    assert (grad - other).abs().max() > 1e-3


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
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), (gamma, clip, grad)


# ------------------------------------------------------------------ precision and extremes


def extreme_batch(dtype):
    x = torch.tensor([EXTREME] * 4, dtype=dtype)  # (4, 7)
    t = torch.tensor([[0.0] * 7, [1.0] * 7, [1, 0, 1, 0, 1, 0, 1], [0.5] * 7])  # all 0, all 1, mixed, soft
    return x, t


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
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss) and torch.isfinite(xg.grad).all(), (loss, xg.grad)


def test_extreme_logits_have_the_right_values(stage04):
    # Without the eps floor, a positive at logit -65504 costs exactly 65504 (log p = x there), and a
    # negative at +65504 with shift m costs log(1/m) (1 - p_m = m).
    x = torch.tensor([[-65504.0, 65504.0]], dtype=torch.float16)
    t = torch.tensor([[1.0, 0.0]])
    loss = stage04.asymmetric_loss(x, t, gamma_neg=4.0, gamma_pos=0.0, clip=0.05, eps=0.0)
    assert loss.item() == pytest.approx(65504.0 + (0.95**4) * -math.log(0.05), rel=1e-6)


def test_eps_is_a_floor_on_the_probability_as_in_the_reference(stage04):
    # log max(p, eps): the loss of a very wrong positive stops at -log eps, and so does its gradient.
    x = torch.tensor([[-30.0, -5.0]], requires_grad=True)
    t = torch.ones(1, 2)
    loss = stage04.asymmetric_loss(x, t, gamma_pos=0.0, eps=1e-5)
    loss.backward()
    assert loss.item() == pytest.approx(-math.log(1e-5) + 5.0 + math.log1p(math.exp(-5.0)), rel=1e-6)
    assert x.grad[0, 0].item() == 0.0 and x.grad[0, 1].item() == pytest.approx(-1 / (1 + math.exp(-5.0)), rel=1e-6)


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
            if logits.dtype != precision:
                pytest.skip(f"CPU autocast does not run Linear in {precision} in this torch")
            loss = stage04.asymmetric_loss(logits, t)
            assert torch.is_autocast_enabled("cpu")  # the loss left autocast on for the caller
    except RuntimeError as error:
        pytest.skip(f"CPU autocast with {precision} not supported here: {error}")
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(layer.weight.grad).all() and torch.isfinite(layer.bias.grad).all()


@pytest.mark.gpu
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_result_is_float32(stage04, dtype):
    x, t = torch.randn(3, 5).to(dtype), torch.ones(3, 5)
    for reduction in ("sum", "mean", "q2l"):
        assert stage04.asymmetric_loss(x, t, reduction=reduction).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert stage04.AsymmetricLoss()(x, t).dtype == torch.float32


# ------------------------------------------------------------------ unknown labels and reductions


def test_unknown_labels_are_ignored(stage04):
    torch.manual_seed(3)
    x = (torch.randn(8, 12) * 3).requires_grad_(True)
    t = (torch.rand(8, 12) < 0.3).float()
    unknown = torch.rand(8, 12) < 0.25
    t_partial = t.masked_fill(unknown, -1.0)
    known = ~unknown
    for reduction in ("sum", "mean"):
        loss = stage04.asymmetric_loss(x, t_partial, reduction=reduction)
        subset = stage04.asymmetric_loss(x[known][None], t[known][None], reduction=reduction)  # (1, n_known)
        torch.testing.assert_close(loss, subset, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(stage04.asymmetric_loss(x, t_partial), x)
    assert (grad[unknown] == 0).all()
    wild = x.detach().masked_fill(unknown, 1e4)  # what the model says about unknown labels is irrelevant
    assert stage04.asymmetric_loss(wild, t_partial).item() == pytest.approx(
        stage04.asymmetric_loss(x.detach(), t_partial).item(), rel=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean", "q2l"])
def test_all_unknown_is_zero_not_nan(stage04, reduction):
    x = torch.randn(2, 3, requires_grad=True)
    loss = stage04.asymmetric_loss(x, torch.full((2, 3), -1.0), reduction=reduction)
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()


def test_reductions_relate_as_documented(stage04):
    torch.manual_seed(4)
    B, K = 6, 10
    x = torch.randn(B, K) * 2
    t = (torch.rand(B, K) < 0.3).float()
    loss = {r: stage04.asymmetric_loss(x, t, reduction=r).item() for r in ("sum", "mean", "q2l")}
    assert loss["mean"] == pytest.approx(loss["sum"] / (B * K), rel=1e-6)
    assert loss["q2l"] == pytest.approx(loss["sum"] / (B * K) * 1000, rel=1e-6)  # official: -sum / B / K * 1000
    t[0, :4] = -1.0  # with unknowns, "mean" divides by the known entries, "q2l" still by B*K
    loss = {r: stage04.asymmetric_loss(x, t, reduction=r).item() for r in ("sum", "mean", "q2l")}
    assert loss["mean"] == pytest.approx(loss["sum"] / (B * K - 4), rel=1e-6)
    assert loss["q2l"] == pytest.approx(loss["sum"] / (B * K) * 1000, rel=1e-6)


# ------------------------------------------------------------------ the module, global state, errors


def test_module_defaults_and_functional_agree(stage04):
    module = stage04.AsymmetricLoss()
    assert (module.gamma_neg, module.gamma_pos, module.clip, module.eps) == (4.0, 0.0, 0.05, 1e-8)
    assert module.detach_focal_weight is True and module.reduction == "sum"
    torch.manual_seed(5)
    x, t = torch.randn(4, 9), (torch.rand(4, 9) < 0.3).float()
    assert module(x, t).item() == stage04.asymmetric_loss(x, t).item()
    q2l = stage04.AsymmetricLoss(gamma_neg=2.0, gamma_pos=0.0, clip=0.0, eps=1e-5, reduction="q2l")
    assert q2l(x, t).item() == stage04.asymmetric_loss(x, t, gamma_neg=2.0, gamma_pos=0.0, clip=0.0, eps=1e-5,
                                                       reduction="q2l").item()


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
    assert calls == [], f"the loss switched autograd globally: {calls}"
    monkeypatch.undo()
    with torch.no_grad():
        loss = stage04.asymmetric_loss(x, t)
        assert not torch.is_grad_enabled() and not loss.requires_grad


@pytest.mark.parametrize("targets, message", [
    (torch.full((2, 3), 2.0), "targets"),
    (torch.full((2, 3), -0.5), "targets"),
    (torch.full((2, 3), float("nan")), "targets"),
    (torch.ones(2, 4), r"\(2, 3\).*\(2, 4\)"),
])
def test_bad_targets_raise_a_clear_error(stage04, targets, message):
    with pytest.raises(ValueError, match=message):
        stage04.asymmetric_loss(torch.randn(2, 3), targets)


@pytest.mark.parametrize("options", [dict(reduction="avg"), dict(gamma_neg=-1.0), dict(clip=1.0), dict(eps=-1e-8)])
def test_bad_options_raise_a_clear_error(stage04, options):
    with pytest.raises(ValueError):
        stage04.AsymmetricLoss(**options)
    with pytest.raises(ValueError):
        stage04.asymmetric_loss(torch.randn(2, 3), torch.ones(2, 3), **options)


def test_integer_targets_work_and_integer_logits_do_not(stage04):
    x = torch.randn(2, 3)
    t = torch.tensor([[1, 0, -1], [0, 0, 1]])
    assert stage04.asymmetric_loss(x, t).item() == pytest.approx(stage04.asymmetric_loss(x, t.float()).item())
    with pytest.raises(TypeError):
        stage04.asymmetric_loss(t, t)


def test_plot_writes_a_png(stage04, tmp_path):
    path = tmp_path / "shapes.png"
    stage04.plot_shapes(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ learner mode


def test_these_tests_run_on_a_learners_file(tmp_path, restore_stage_modules):
    # Loaded as Q2L_STAGE_04=my_loss.py would load it (tests/test_learner_mode.py checks the variable).
    source = (ROOT / "04_loss.py").read_text().split("\ndef bce(")[0] + "\n"  # functional form only
    mine = tmp_path / "my_loss.py"
    mine.write_text(source)
    stage = conftest.Stage(conftest.load_learner_file(4, mine), mine)
    test_zero_gamma_and_clip_is_bce(stage, "mean", True)
    test_unknown_labels_are_ignored(stage)
    with pytest.raises(pytest.skip.Exception, match="my_loss.py does not define `AsymmetricLoss` yet"):
        test_module_defaults_and_functional_agree(stage)
    # A classic slip, "mean" over all entries instead of the known ones, is caught.
    right = "return loss.sum() / known.sum().clamp(min=1)"
    assert right in source
    slip = tmp_path / "slip_loss.py"
    slip.write_text(source.replace(right, "return loss.sum() / loss.numel()"))
    stage = conftest.Stage(conftest.load_learner_file(4, slip), slip)
    with pytest.raises(AssertionError):
        test_unknown_labels_are_ignored(stage)
