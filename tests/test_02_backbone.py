"""Tests for stage 2: backbone, freezing, weights files, projection, position encodings.

Run against your own file: Q2L_STAGE_02=my_backbone.py python -m pytest tests/test_02_backbone.py
All backbones here are tiny timm test models (or resnet18) with random init: no download.
"""

import math

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: on a busy 2-core machine, 2 OpenMP threads wait on each other and a
    30 ms forward takes 1.5 s (measured). One thread keeps the file fast whatever else runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sine_formula(i, j, c, H, W, d, temperature=10000.0, eps=1e-6):
    """Channel c of DETR's normalised 2D sine encoding at row i, column j (0-based), by hand."""
    F = d // 2
    axis, k = (i, c) if c < F else (j, c - F)
    length = H if c < F else W
    coord = (axis + 1) / (length + eps) * 2 * math.pi
    angle = coord / temperature ** (2 * (k // 2) / F)
    return math.sin(angle) if k % 2 == 0 else math.cos(angle)


@pytest.mark.parametrize("H, W, d", [(7, 7, 8), (14, 10, 64), (18, 18, 256), (1, 3, 4)])
def test_sine_matches_formula_at_hand_picked_positions(stage02, H, W, d):
    pe = stage02.PositionEmbeddingSine(d)(torch.zeros(2, 5, H, W))
    assert pe.shape == (1, d, H, W)
    positions = [(0, 0), (H - 1, W - 1), (H // 2, W // 3), (H - 1, 0)]
    channels = sorted({0, 1, 2, 3, d // 2 - 1, d // 2, d // 2 + 1, d - 2, d - 1})
    for i, j in positions:
        for c in channels:
            expected = sine_formula(i, j, c, H, W, d)
            assert abs(pe[0, c, i, j].item() - expected) < 1e-5, (i, j, c)


def test_projection_conv_and_identity(stage02):
    proj = stage02.make_projection(32, 16)
    x = torch.randn(2, 32, 5, 6)
    assert proj(x).shape == (2, 16, 5, 6)
    # a 1x1 convolution is the same linear map applied at every position
    manual = torch.einsum("dc,bchw->bdhw", proj.weight[:, :, 0, 0], x) + proj.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(proj(x), manual, atol=1e-5, rtol=1e-5)
    same = stage02.make_projection(32, 32, enabled=False)
    assert isinstance(same, nn.Identity) and torch.equal(same(x), x)


@pytest.mark.hardening
def test_errors_name_the_values(stage02):
    with pytest.raises(ValueError, match=r"32.*16|16.*32"):
        stage02.make_projection(32, 16, enabled=False)
    with pytest.raises(ValueError, match="100"):
        stage02.build_position_encoding("learned", 16)(torch.zeros(1, 1, 100, 4))
    with pytest.raises(ValueError, match="cosine"):
        stage02.build_position_encoding("cosine", 16)


SWIN_TINY = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))  # a few hundred k params


@pytest.mark.parametrize("name, kwargs, sizes, C, stride", [
    ("test_resnet", {}, (160, 224), 96, 32),  # CNN: forward_features
    ("test_vit", {}, (160, 224), 64, 16),  # class token + patch tokens -> grid
    ("swin_tiny_patch4_window7_224", SWIN_TINY, (224, 448), 128, 32),  # NHWC tokens -> NCHW
])
def test_feature_shapes_at_two_sizes(stage02, name, kwargs, sizes, C, stride):
    model = stage02.Backbone(name, **kwargs).eval()
    assert model.num_channels == C and model.stride == stride
    for S in sizes:
        with torch.no_grad():
            out = model(torch.randn(2, 3, S, S))
        assert out.shape == (2, C, S // stride, S // stride)


def test_sine_equals_detr_mask_computation(stage02):
    """Re-derived from DETR / the official fixed buffer: cumsum over a mask of ones, normalised."""
    H, W, d, eps, T = 14, 11, 256, 1e-6, 10000
    not_mask = torch.ones(1, H, W)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    y = y / (y[:, -1:, :] + eps) * 2 * math.pi
    x = x / (x[:, :, -1:] + eps) * 2 * math.pi
    dim_t = torch.arange(d // 2, dtype=torch.float32)
    dim_t = T ** (2 * (dim_t // 2) / (d // 2))
    px, py = x[:, :, :, None] / dim_t, y[:, :, :, None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    expected = torch.cat((py, px), dim=3).permute(0, 3, 1, 2)  # (1, d, H, W)
    got = stage02.PositionEmbeddingSine(d)(torch.zeros(1, 3, H, W))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_sine_any_size_cached_and_in_input_dtype(stage02):
    pe = stage02.PositionEmbeddingSine(64)
    a = pe(torch.zeros(1, 1, 7, 7))
    assert pe(torch.zeros(3, 9, 7, 7)) is a  # same size: the cached tensor, not recomputed
    for side in (7, 14, 18):  # 224, 448, 576 px at stride 32
        assert pe(torch.zeros(1, 1, side, side)).shape == (1, 64, side, side)
    half = pe(torch.zeros(1, 1, 7, 7, dtype=torch.float16))
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), a, atol=1e-3, rtol=0)
    with pytest.raises(ValueError):
        stage02.PositionEmbeddingSine(66)  # d/2 = 33 features per axis cannot pair sin/cos


def test_sine_first_computed_in_inference_mode_still_trains(stage02):
    pe = stage02.PositionEmbeddingSine(8)
    with torch.inference_mode():  # e.g. an evaluation pass fills the cache first
        pe(torch.zeros(1, 1, 3, 3))
    weight = torch.ones(1, 8, 1, 1, requires_grad=True)
    (pe(torch.zeros(1, 1, 3, 3)) * weight).sum().backward()  # mul saves pe for weight's gradient
    torch.testing.assert_close(weight.grad, pe(torch.zeros(1, 1, 3, 3)).sum(dim=(2, 3), keepdim=True))


def test_learned_layout_and_limits(stage02):
    pe = stage02.build_position_encoding("learned", 16)
    out = pe(torch.zeros(2, 5, 3, 4))
    assert out.shape == (1, 16, 3, 4)
    # y (row table) in the first d/2 channels, x (column table) in the last d/2, like the sine one
    torch.testing.assert_close(out[0, :8, 2, 1], pe.row_embed.weight[2], atol=0, rtol=0)
    torch.testing.assert_close(out[0, 8:, 2, 1], pe.col_embed.weight[1], atol=0, rtol=0)
    assert out.requires_grad  # trained with the model
    with pytest.raises(ValueError):
        pe(torch.zeros(1, 1, 100, 4))  # beyond the table
    assert isinstance(stage02.build_position_encoding("sine", 16), stage02.PositionEmbeddingSine)
    with pytest.raises(ValueError):
        stage02.build_position_encoding("cosine", 16)


@pytest.mark.hardening
def test_token_model_rejects_size_not_multiple_of_patch(stage02):
    model = stage02.Backbone("test_vit", verbose=False)
    with pytest.raises(ValueError, match="16"):
        model(torch.randn(1, 3, 168, 168))


def test_freeze_batchnorm_keeps_eval_output(stage02):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Sequential(nn.BatchNorm2d(4)))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics and affine values
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2), m.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    expected = net.eval()(x)
    stage02.freeze_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert isinstance(net[1], stage02.FrozenBatchNorm2d) and isinstance(net[3][0], stage02.FrozenBatchNorm2d)
    assert set(dict(net[1].named_buffers())) == {"weight", "bias", "running_mean", "running_var"}
    torch.testing.assert_close(net.train()(x), expected, atol=1e-5, rtol=1e-5)  # train mode = inference


def test_resnet_freezes_stem_and_layer1_like_the_official_recipe(stage02):
    model = stage02.Backbone("resnet18", verbose=False)
    frozen = {n for n, p in model.body.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.body.named_parameters() if n.startswith(("conv1.", "layer1."))}
    assert "body.layer1.0.conv1.weight" in model.state_dict()  # torchvision names under body.
    assert "body.bn1.running_var" in model.state_dict()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_frozen_parts_stay_frozen_after_a_training_step(stage02, name):
    torch.manual_seed(0)
    model = stage02.Backbone(name, verbose=False).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen, "stem + first stage should be frozen"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 64, 64)).square().mean().backward()
    optimizer.step()
    after = model.state_dict()
    params = dict(model.named_parameters())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k in params and params[k].requires_grad for k in changed), changed
    assert all(params[n].grad is None for n in frozen)


def test_freezing_switches(stage02):
    model = stage02.Backbone("test_resnet", frozen_bn=False, freeze_stem=False, verbose=False).train()
    assert all(p.requires_grad for p in model.parameters())
    bn = model.body.bn1
    assert isinstance(bn, nn.BatchNorm2d)
    mean = bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert not torch.equal(bn.running_mean, mean)  # a normal BatchNorm updates its statistics


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_round_trip(stage02, tmp_path, suffix, capsys):
    torch.manual_seed(0)
    source = stage02.Backbone("test_resnet", frozen_bn=False, verbose=False).eval()
    for m in source.modules():  # make the BN statistics matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    state = dict(source.body.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 96), torch.zeros(10)  # an ImageNet head
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)
    torch.manual_seed(1)
    loaded = stage02.Backbone("test_resnet", weights=path).eval()  # frozen BN, weights copied in
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), atol=1e-5, rtol=1e-5)
    report = capsys.readouterr().out
    assert "fc.weight" in report and str(path) in report
    missing, unexpected = stage02.load_weights(loaded, path, verbose=False)
    assert missing == [] and sorted(unexpected) == ["fc.bias", "fc.weight"]


@pytest.mark.hardening
def test_weights_file_errors_name_the_file(stage02, tmp_path):
    model = stage02.Backbone("test_resnet", verbose=False)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        stage02.load_weights(model, tmp_path / "nothere.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        stage02.load_weights(model, garbage)
    other = tmp_path / "resnet18.pth"
    torch.save(stage02.Backbone("resnet18", verbose=False).body.state_dict(), other)
    with pytest.raises(ValueError, match="resnet18.pth.*shape"):
        stage02.load_weights(model, other)


@pytest.mark.hardening
def test_offline_hub_gives_a_clear_message(stage02, monkeypatch):
    """What the hub client raises offline (here simulated) becomes one message with the way out."""
    import timm.models._builder
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_hf", offline)
    with pytest.raises(RuntimeError) as info:
        stage02.Backbone("test_resnet", pretrained=True)
    message = str(info.value)
    assert "test_resnet" in message and "--weights" in message and "scratch" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no hub traceback chained


@pytest.mark.hardening
def test_offline_message_from_the_command_line(stage02, tmp_path):
    """A real offline hub (HF_HUB_OFFLINE=1, empty cache): the user sees a message, not a traceback."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, stage02.__file__, "--backbone", "test_resnet", "--pretrained"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "--weights" in result.stderr and "test_resnet" in result.stderr


def torchvision_resnet18_file(tmp_path):
    """(torchvision ResNet-18 with non-trivial BN statistics, the file it was saved to)."""
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    path = tmp_path / "torchvision_resnet18.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


def test_torchvision_resnet_file_loads_with_the_same_names(stage02, tmp_path):
    """A torchvision ResNet checkpoint (the official Query2Label backbone) loads key for key."""
    reference, path = torchvision_resnet18_file(tmp_path)
    model = stage02.Backbone("resnet18", weights=path, verbose=False).eval()
    missing, unexpected = stage02.load_weights(model, path, verbose=False)
    assert missing == [] and sorted(unexpected) == ["fc.bias", "fc.weight"]
    features = nn.Sequential(*list(reference.children())[:-2])  # everything before avgpool and fc
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), features(x), atol=1e-4, rtol=1e-4)


# * finer feature grid -----------------------------------------------------------------------------

@pytest.mark.parametrize("output_stride, grid", [(None, 2), (16, 4), (8, 8)])
def test_output_stride_gives_a_finer_grid_with_the_same_parameters(stage02, output_stride, grid):
    torch.manual_seed(0)
    model = stage02.Backbone("test_resnet", verbose=False, output_stride=output_stride).eval()
    with torch.no_grad():
        features = model(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, model.num_channels, grid, grid) and model.stride == 64 // grid
    reference = stage02.Backbone("test_resnet", verbose=False)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_output_stride_refused_where_the_model_cannot_dilate(stage02):
    with pytest.raises(ValueError):
        stage02.Backbone("test_vit", verbose=False, output_stride=8)


# * frozen BatchNorm folded into the convolutions --------------------------------------------------

def randomise_frozen_bn(model, stage02):
    """Statistics and affine values far from the identity, so that folding has something to do."""
    for m in model.modules():
        if isinstance(m, stage02.FrozenBatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("name, pairs", [("test_resnet", 15), ("resnet18", 20)])
def test_folding_keeps_the_output_and_removes_every_frozen_bn(stage02, name, pairs):
    torch.manual_seed(0)
    model = randomise_frozen_bn(stage02.Backbone(name, verbose=False), stage02).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        assert stage02.fold_frozen_batchnorm(model.body) == pairs
        folded = model(x)
    assert not any(isinstance(m, stage02.FrozenBatchNorm2d) for m in model.modules())
    scale = expected.abs().max().item()  # float32 rounding grows with the activations' size
    torch.testing.assert_close(folded, expected, atol=1e-5 * max(1.0, scale), rtol=1e-5)


def test_folding_is_exact_in_float64(stage02):
    torch.manual_seed(0)
    model = randomise_frozen_bn(stage02.Backbone("test_resnet", verbose=False), stage02).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        stage02.fold_frozen_batchnorm(model.body)
        torch.testing.assert_close(model(x), expected, atol=1e-10, rtol=0)


def test_folded_convolutions_still_train(stage02):
    """Gradients reach the folded convolutions: dL/dw = dL/dw' * scale, since w' = w * scale."""
    import copy

    torch.manual_seed(0)
    model = randomise_frozen_bn(stage02.Backbone("test_resnet", verbose=False), stage02).train()
    folded = copy.deepcopy(model)
    assert stage02.fold_frozen_batchnorm(folded.body) == 15
    x = torch.randn(2, 3, 64, 64)
    model(x).square().mean().backward()
    folded(x).square().mean().backward()
    scale, _ = model.body.layer2[0].bn1.scale_and_shift()
    conv, conv_folded = model.body.layer2[0].conv1, folded.body.layer2[0].conv1  # trainable
    assert conv_folded.bias.grad.abs().sum() > 0
    torch.testing.assert_close(conv_folded.weight.grad * scale.view(-1, 1, 1, 1), conv.weight.grad,
                               atol=1e-6, rtol=1e-4)
    stem = folded.body.conv1[0]
    assert not stem.weight.requires_grad and stem.weight.grad is None  # frozen stays frozen
    assert stage02.Backbone("test_resnet", verbose=False, fold_bn=True).folded == 15


def test_fold_after_loading_a_torchvision_file(stage02, tmp_path):
    """Official and torchvision files name BN buffers: they load into the unfolded model, then fold."""
    reference, path = torchvision_resnet18_file(tmp_path)
    model = stage02.Backbone("resnet18", weights=path, verbose=False, fold_bn=True).eval()
    features = nn.Sequential(*list(reference.children())[:-2])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), features(x), atol=1e-4, rtol=1e-4)
    assert not any(k.endswith("running_var") for k in model.state_dict())
    with pytest.raises(ValueError):  # a file's conv weights are not the folded ones
        stage02.load_weights(model, path)
    with pytest.raises(ValueError):
        stage02.Backbone("test_resnet", verbose=False, frozen_bn=False, fold_bn=True)


@pytest.mark.gpu
def test_cuda_autocast_features_and_encoding_follow_device_and_dtype(stage02):
    model = stage02.Backbone("test_resnet", verbose=False).cuda().eval()
    pe = stage02.PositionEmbeddingSine(32)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        features = model(torch.randn(2, 3, 128, 128, device="cuda"))
    pos = pe(features)
    assert features.is_cuda and pos.device == features.device and pos.dtype == features.dtype
    cpu = pe(torch.zeros(1, 1, *features.shape[-2:]))
    torch.testing.assert_close(pos.float().cpu(), cpu, atol=2e-3, rtol=0)  # fp16 rounding
