"""Tests for stage 2: backbone, freezing, weights files, projection, position encodings.

Run against your own file: Q2L_STAGE_02=my_backbone.py python -m pytest tests/test_02_backbone.py
All backbones here are tiny timm test models (or resnet18) with random init: no download.
"""

import math

import pytest
import torch
from torch import nn


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
    with pytest.raises(ValueError, match=r"32.*16|16.*32"):
        stage02.make_projection(32, 16, enabled=False)


@pytest.mark.parametrize("name, sizes, C, stride", [("test_resnet", (160, 224), 96, 32),
                                                    ("test_vit", (160, 224), 64, 16)])
def test_feature_shapes_at_two_sizes(stage02, name, sizes, C, stride):
    model = stage02.Backbone(name).eval()
    assert model.num_channels == C and model.stride == stride
    for S in sizes:
        with torch.no_grad():
            out = model(torch.randn(2, 3, S, S))
        assert out.shape == (2, C, S // stride, S // stride)
