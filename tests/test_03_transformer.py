"""Stage 3: attention, encoder/decoder and Query2Label against torch.nn and hand computations.

Weights are copied across by name: our attention keeps q/k/v in three Linear layers
(`q_proj`, `k_proj`, `v_proj`, `out_proj`), torch packs them into one `in_proj_weight` (3d, d)
whose row blocks [0:d], [d:2d], [2d:3d] are q, k, v. Everything else uses torch's names
(`self_attn`, `multihead_attn`, `linear1`, `norm1`, ...), as DETR and the official code do.
Dropout is 0 wherever outputs are compared. Learner mode: Q2L_STAGE_03=my_file.py.
"""

import dataclasses
import math

import conftest
import pytest
import torch
from torch import nn

F64 = dict(atol=1e-10, rtol=0)
F32 = dict(atol=1e-5, rtol=0)
D, HEADS = 32, 4

def torch_to_ours(state):
    """nn.MultiheadAttention's packed in_proj -> q_proj / k_proj / v_proj (the test's own copy)."""
    out = {}
    for key, value in state.items():
        if key.endswith(("in_proj_weight", "in_proj_bias")):
            prefix, kind = key.rsplit("in_proj_", 1)
            for name, part in zip("qkv", value.chunk(3), strict=True):
                out[f"{prefix}{name}_proj.{kind}"] = part
        else:
            out[key] = value
    return out


def ours_to_torch(state):
    out = {k: v for k, v in state.items() if not any(f"{n}_proj." in k for n in "qkv")}
    for key in state:
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            prefix, kind = key.rsplit("q_proj.", 1)
            out[f"{prefix}in_proj_{kind}"] = torch.cat([state[f"{prefix}{n}_proj.{kind}"] for n in "qkv"])
    return out


def pair(stage03, dtype, dropout=0.0, bias=True):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(D, HEADS, dropout=dropout, bias=bias, batch_first=True, dtype=dtype)
    ours = stage03.MultiHeadAttention(D, HEADS, dropout=dropout, bias=bias).to(dtype)
    ours.load_state_dict(torch_to_ours(ref.state_dict()))
    return ours, ref


def inputs(dtype, B=3, Lq=5, Lk=7):
    g = torch.Generator().manual_seed(1)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(B, Lq, D), make(B, Lk, D), make(B, Lk, D)


def hand_attention(mha, q_in, k_in, v_in):
    """Vaswani et al. eq. 1, head by head with explicit weight slices (no reshapes shared with the code)."""
    dh = D // HEADS
    heads = []
    for i in range(HEADS):
        rows = slice(i * dh, (i + 1) * dh)
        q = q_in @ mha.q_proj.weight[rows].T + mha.q_proj.bias[rows]  # (B, Lq, dh)
        k = k_in @ mha.k_proj.weight[rows].T + mha.k_proj.bias[rows]  # (B, Lk, dh)
        v = v_in @ mha.v_proj.weight[rows].T + mha.v_proj.bias[rows]  # (B, Lk, dh)
        heads.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh), dim=-1) @ v)  # (B, Lq, dh)
    return torch.cat(heads, dim=-1) @ mha.out_proj.weight.T + mha.out_proj.bias  # (B, Lq, d)


# * multi-head attention ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, F32)])
@pytest.mark.parametrize("bias", [True, False])
def test_attention_matches_torch(stage03, dtype, tol, bias):
    ours, ref = pair(stage03, dtype, bias=bias)
    q, k, v = inputs(dtype)
    out_ref, w_ref = ref(q, k, v, need_weights=True, average_attn_weights=False)
    out, w = ours(q, k, v, need_weights=True, average_weights=False)
    torch.testing.assert_close(out, out_ref, **tol)
    torch.testing.assert_close(w, w_ref, **tol)  # (B, h, Lq, Lk)
    _, w_avg = ours(q, k, v, need_weights=True)
    torch.testing.assert_close(w_avg, ref(q, k, v)[1], **tol)  # (B, Lq, Lk)

    grad_out = torch.randn_like(out)
    ref_params = dict(ref.named_parameters())
    ours_params = dict(ours.named_parameters())
    g_ref = torch.autograd.grad(out_ref, [q, k, v, *ref_params.values()], grad_out)
    g_ours = torch.autograd.grad(out, [q, k, v, *ours_params.values()], grad_out)
    for name, a, b in zip("qkv", g_ours[:3], g_ref[:3], strict=True):
        torch.testing.assert_close(a, b, **tol, msg=f"gradient of input {name}")
    g_ref_params = torch_to_ours(dict(zip(ref_params, g_ref[3:], strict=True)))
    for (name, grad) in zip(ours_params, g_ours[3:], strict=True):
        torch.testing.assert_close(grad, g_ref_params[name], **tol, msg=f"gradient of {name}")


def test_self_attention_same_tensor_matches_torch(stage03):
    ours, ref = pair(stage03, torch.float64)
    x = inputs(torch.float64)[1]
    torch.testing.assert_close(ours(x, x, x)[0], ref(x, x, x)[0], **F64)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, F64), (torch.float32, F32)])
def test_fused_path_equals_explicit_path(stage03, dtype, tol):
    ours, _ = pair(stage03, dtype)
    q, k, v = inputs(dtype)
    ours.fused = True
    fused = ours(q, k, v)[0]
    ours.fused = False
    explicit = ours(q, k, v)[0]
    torch.testing.assert_close(fused, explicit, **tol)
    g_fused = torch.autograd.grad(fused.sum(), [q, k, v, ours.q_proj.weight])
    g_explicit = torch.autograd.grad(explicit.sum(), [q, k, v, ours.q_proj.weight])
    for a, b in zip(g_fused, g_explicit, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_need_weights_uses_explicit_path_and_weights_sum_to_one(stage03):
    ours, _ = pair(stage03, torch.float64)
    ours.fused = True
    q, k, v = inputs(torch.float64)
    out_plain, none = ours(q, k, v)
    out_weighted, w = ours(q, k, v, need_weights=True, average_weights=False)
    assert none is None
    torch.testing.assert_close(out_weighted, out_plain, **F64)
    assert w.shape == (3, HEADS, 5, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, HEADS, 5, dtype=torch.float64), **F64)


@pytest.mark.parametrize("fused", [False, True])
def test_masks_match_torch(stage03, fused):
    ours, ref = pair(stage03, torch.float64)
    ours.fused = fused
    q, k, v = inputs(torch.float64)
    causal = torch.ones(5, 7, dtype=torch.bool).triu(1)  # True = may not attend
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    padding[2, 6] = True
    additive = torch.randn(5, 7, dtype=torch.float64)
    for mask_args in (dict(attn_mask=causal), dict(key_padding_mask=padding),
                      dict(attn_mask=causal, key_padding_mask=padding), dict(attn_mask=additive)):
        expected = ref(q, k, v, **mask_args)[0]
        torch.testing.assert_close(ours(q, k, v, **mask_args)[0], expected, **F64, msg=str(mask_args.keys()))
    # a per-(batch, head) mask in torch's (B*h, Lq, Lk) layout
    per_head = torch.rand(3 * HEADS, 5, 7) < 0.3
    per_head[..., 0] = False  # every query keeps at least one key
    torch.testing.assert_close(ours(q, k, v, attn_mask=per_head)[0], ref(q, k, v, attn_mask=per_head)[0], **F64)


def test_attention_dropout_is_active_in_training_only(stage03):
    ours, _ = pair(stage03, torch.float64, dropout=0.5)
    q, k, v = inputs(torch.float64)
    ours.eval()
    torch.testing.assert_close(ours(q, k, v)[0], ours(q, k, v)[0], **F64)
    ours.train()
    for fused in (False, True):
        ours.fused = fused
        assert (ours(q, k, v)[0] - ours(q, k, v)[0]).abs().max() > 1e-3


def test_load_from_and_copy_to_torch(stage03):
    torch.manual_seed(3)
    ref = nn.MultiheadAttention(D, HEADS, batch_first=True, dtype=torch.float64)
    ours = stage03.MultiHeadAttention(D, HEADS).double()
    ours.load_from_torch(ref)
    q, k, v = inputs(torch.float64)
    torch.testing.assert_close(ours(q, k, v)[0], ref(q, k, v)[0], **F64)
    other = nn.MultiheadAttention(D, HEADS, batch_first=True, dtype=torch.float64)
    ours.copy_to_torch(other)
    torch.testing.assert_close(other.in_proj_weight, ref.in_proj_weight, atol=0, rtol=0)
    assert torch.equal(stage03.pack_in_proj(stage03.split_in_proj(ref.state_dict()))["in_proj_bias"],
                       ref.in_proj_bias)


@pytest.mark.hardening
def test_bad_head_count_is_a_clear_error(stage03):
    with pytest.raises(ValueError, match="30.*4|4.*30"):
        stage03.MultiHeadAttention(30, 4)


# * encoder / decoder layers -----------------------------------------------------------------------

@pytest.mark.parametrize("pre", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_encoder_layer_matches_torch(stage03, pre, train):
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(D, HEADS, 48, 0.0, batch_first=True, norm_first=pre, dtype=torch.float64)
    ours = stage03.TransformerEncoderLayer(D, HEADS, 48, 0.0, normalize_before=pre).double()
    ours.load_state_dict(torch_to_ours(ref.state_dict()))
    ref.train(train), ours.train(train)
    x = torch.randn(2, 9, D, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 7:] = True
    out = ours(x, src_key_padding_mask=padding)
    expected = ref(x, src_key_padding_mask=padding)
    torch.testing.assert_close(out, expected, **F64)
    ga, gb = torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(expected.sum(), x)[0]
    torch.testing.assert_close(ga, gb, **F64)


@pytest.mark.parametrize("pre", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_decoder_layer_with_self_attention_matches_torch(stage03, pre, train):
    torch.manual_seed(0)
    ref = nn.TransformerDecoderLayer(D, HEADS, 48, 0.0, batch_first=True, norm_first=pre, dtype=torch.float64)
    ours = stage03.TransformerDecoderLayer(D, HEADS, 48, 0.0, normalize_before=pre, self_attention=True).double()
    ours.load_state_dict(torch_to_ours(ref.state_dict()))
    ref.train(train), ours.train(train)
    tgt, memory = torch.randn(2, 6, D, dtype=torch.float64), torch.randn(2, 9, D, dtype=torch.float64)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    out, weights = ours(tgt, memory, tgt_mask=causal)
    torch.testing.assert_close(out, ref(tgt, memory, tgt_mask=causal), **F64)
    assert weights is None


def test_decoder_without_self_attention_has_the_official_parameters(stage03):
    layer = stage03.TransformerDecoderLayer(D, HEADS, 48, 0.0)  # default: as the official code
    names = {k.split(".")[0] for k in layer.state_dict()}
    assert names == {"multihead_attn", "linear1", "linear2", "norm2", "norm3"}


def test_position_goes_to_queries_and_keys_not_values(stage03):
    """Both layers against the equations with pos / query_pos added by hand (post-norm)."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    enc = stage03.TransformerEncoderLayer(D, HEADS, 48, 0.0).double().eval()
    dec = stage03.TransformerDecoderLayer(D, HEADS, 48, 0.0).double().eval()
    src, pos = torch.randn(2, 9, D, **f64), torch.randn(1, 9, D, **f64)
    tgt, query_pos = torch.randn(2, 4, D, **f64), torch.randn(1, 4, D, **f64)
    ffn = lambda layer, x: layer.linear2(torch.relu(layer.linear1(x)))  # noqa: E731

    x = enc.norm1(src + hand_attention(enc.self_attn, src + pos, src + pos, src))
    expected = enc.norm2(x + ffn(enc, x))
    torch.testing.assert_close(enc(src, pos=pos), expected, **F64)

    x = dec.norm2(tgt + hand_attention(dec.multihead_attn, tgt + query_pos, src + pos, src))
    expected = dec.norm3(x + ffn(dec, x))
    out, weights = dec(tgt, src, pos=pos, query_pos=query_pos, need_weights=True)
    torch.testing.assert_close(out, expected, **F64)
    assert weights.shape == (2, 4, 9)
    # and it matters: a position added to the values as well would change the output
    wrong = dec.norm2(tgt + hand_attention(dec.multihead_attn, tgt + query_pos, src + pos, src + pos))
    assert (ffn(dec, wrong) + wrong - (x + ffn(dec, x))).abs().max() > 1e-3


# * the whole encoder-decoder ----------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # torch's own note about its fast path
@pytest.mark.parametrize("pre", [False, True], ids=["post-norm", "pre-norm"])
def test_transformer_matches_nn_transformer(stage03, pre):
    torch.manual_seed(0)
    ref = nn.Transformer(D, HEADS, 2, 2, 48, 0.0, batch_first=True, norm_first=pre, dtype=torch.float64)
    ours = stage03.Transformer(D, HEADS, 2, 2, 48, 0.0, normalize_before=pre,
                               decoder_self_attention=True, encoder_norm=True).double()
    ours.load_state_dict(torch_to_ours(ref.state_dict()))
    ours.train(), ref.train()  # dropout 0: training mode must give the same numbers
    src = torch.randn(2, 9, D, dtype=torch.float64, requires_grad=True)
    tgt = torch.randn(2, 5, D, dtype=torch.float64)
    out, _ = ours(src, tgt=tgt)
    expected = ref(src, tgt)
    torch.testing.assert_close(out, expected, **F64)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), src)[0],
                               torch.autograd.grad(expected.sum(), src)[0], **F64)


def test_transformer_defaults_follow_detr_and_the_official_code(stage03):
    post = stage03.Transformer(D, HEADS, 1, 2, 48, 0.1)
    keys = set(post.state_dict())
    assert not any(k.startswith("encoder.norm") for k in keys)  # post-norm: no final encoder norm
    assert {"decoder.norm.weight", "decoder.norm.bias"} <= keys
    assert not any("self_attn" in k for k in keys if k.startswith("decoder."))
    assert any(k.startswith("encoder.norm") for k in stage03.Transformer(D, HEADS, 1, 2, 48, normalize_before=True).state_dict())
    # Xavier on the packed (3d, d) in-projection: every entry within sqrt(6 / (d + 3d))
    bound = math.sqrt(6 / (4 * D))
    w = post.encoder.layers[0].self_attn.q_proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound


def test_transformer_zero_target_and_query_positions(stage03):
    """DETR decoding: tgt = 0, the label embeddings enter only as query_pos, at every layer."""
    torch.manual_seed(0)
    model = stage03.Transformer(D, HEADS, 1, 2, 48, 0.0).double().eval()
    src, pos = torch.randn(2, 9, D, dtype=torch.float64), torch.randn(1, 9, D, dtype=torch.float64)
    labels = torch.randn(6, D, dtype=torch.float64)
    out, attention = model(src, query_pos=labels, pos=pos, need_weights=True)
    memory = model.encoder(src, pos=pos)
    x = torch.zeros(2, 6, D, dtype=torch.float64)
    for layer in model.decoder.layers:
        x, w = layer(x, memory, pos=pos, query_pos=labels.expand(2, -1, -1), need_weights=True)
    torch.testing.assert_close(out, model.decoder.norm(x), **F64)
    torch.testing.assert_close(attention, w, **F64)  # the LAST layer's cross-attention
    assert out.shape == (2, 6, D) and attention.shape == (2, 6, 9)


# * Query2Label ------------------------------------------------------------------------------------

def tiny_config(stage03, **changes):
    base = dict(num_classes=7, backbone="resnet18", pretrained=False, weights=None, d_model=64,
                num_heads=4, dim_feedforward=96, dropout=0.0, input_proj=True)
    base.update(changes)
    return dataclasses.replace(stage03.PRESETS["demo"], **base)


@pytest.fixture(scope="module")
def tiny_model(stage03):
    torch.manual_seed(0)
    return stage03.Query2Label(tiny_config(stage03)).eval()


@pytest.mark.parametrize("size,grid", [(64, 2), (96, 3)])
def test_query2label_shapes_at_two_input_sizes(stage03, tiny_model, size, grid):
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = tiny_model(images)
        logits_again, attention = tiny_model(images, return_attention=True)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(logits_again, logits, atol=1e-5, rtol=0)  # same forward pass, same numbers
    assert attention.shape == (2, 7, grid, grid)
    assert attention.min() >= 0
    torch.testing.assert_close(attention.sum((2, 3)), torch.ones(2, 7), atol=1e-5, rtol=0)


def test_group_wise_linear_is_one_classifier_per_label(stage03):
    torch.manual_seed(0)
    head = stage03.GroupWiseLinear(5, 16)
    assert head.W.shape == (1, 5, 16) and head.b.shape == (1, 5)
    hs = torch.randn(3, 5, 16)
    expected = torch.stack([torch.stack([hs[b, k] @ head.W[0, k] + head.b[0, k] for k in range(5)])
                            for b in range(3)])
    torch.testing.assert_close(head(hs), expected, atol=1e-6, rtol=0)


def test_query2label_head_is_the_explicit_per_class_loop(stage03, tiny_model):
    features = torch.randn(2, tiny_model.backbone.num_channels, 3, 3)
    with torch.no_grad():
        logits = tiny_model.forward_head(features)
        x = tiny_model.input_proj(features)
        pos = tiny_model.position(x).flatten(2).transpose(1, 2)
        hs, _ = tiny_model.transformer(x.flatten(2).transpose(1, 2), query_pos=tiny_model.query_embed.weight, pos=pos)
    for k in range(7):
        expected = hs[:, k] @ tiny_model.fc.W[0, k] + tiny_model.fc.b[0, k]
        torch.testing.assert_close(logits[:, k], expected, atol=1e-5, rtol=0)


def test_finer_grid_gives_finer_attention_maps(stage03):
    """output_stride 8: a 64 px image gives 8 x 8 feature cells, position encodings and attention maps."""
    torch.manual_seed(0)
    model = stage03.Query2Label(tiny_config(stage03, backbone="test_resnet", output_stride=8)).eval()
    with torch.no_grad():
        logits, attention = model(torch.randn(2, 3, 64, 64), return_attention=True)
    assert logits.shape == (2, 7) and attention.shape == (2, 7, 8, 8)
    torch.testing.assert_close(attention.sum((2, 3)), torch.ones(2, 7), atol=1e-5, rtol=0)


@pytest.mark.parametrize("pre", [False, True], ids=["post-norm", "pre-norm"])
def test_forward_picks_the_equation_of_its_norm_placement(stage03, pre):
    torch.manual_seed(0)
    enc = stage03.TransformerEncoderLayer(D, HEADS, 64, 0.0, normalize_before=pre).double()
    dec = stage03.TransformerDecoderLayer(D, HEADS, 64, 0.0, normalize_before=pre, self_attention=True).double()
    x, tgt = torch.randn(2, 9, D, dtype=torch.float64), torch.randn(2, 4, D, dtype=torch.float64)
    chosen, other = ("forward_pre", "forward_post") if pre else ("forward_post", "forward_pre")
    assert torch.equal(enc(x), getattr(enc, chosen)(x))
    assert torch.equal(dec(tgt, x)[0], getattr(dec, chosen)(tgt, x)[0])
    assert not torch.allclose(enc(x), getattr(enc, other)(x))  # the two equations do differ


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_cuda_kernels_under_autocast_match_float32(stage03, dtype):
    torch.manual_seed(0)
    model = stage03.Query2Label(tiny_config(stage03)).cuda().eval()
    images = torch.randn(2, 3, 96, 96, device="cuda")
    with torch.no_grad():
        reference, maps = model(images, return_attention=True)
        with torch.autocast("cuda", dtype=dtype):
            fast = model(images)  # flash / memory-efficient SDPA kernels
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast.float(), reference, atol=5e-2, rtol=0)
    torch.testing.assert_close(maps.sum((2, 3)), torch.ones(2, 7, device="cuda"), atol=1e-4, rtol=0)


@pytest.mark.hardening
def test_query2label_rejects_wrong_image_shape(stage03, tiny_model):
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        tiny_model(torch.randn(3, 64, 64))


def test_presets(stage03):
    official = stage03.PRESETS["official_r101"]
    assert (official.backbone, official.d_model, official.num_heads, official.dim_feedforward) == ("resnet101.tv_in1k", 2048, 4, 8192)
    assert (official.enc_layers, official.dec_layers, official.dropout) == (1, 2, 0.1)
    assert not official.input_proj and not official.decoder_self_attention and not official.normalize_before
    assert official.frozen_bn and official.freeze_stem and official.position == "sine"
    demo = stage03.PRESETS["demo"]
    assert 128 <= demo.d_model <= 256 and demo.input_proj
    assert dataclasses.asdict(dataclasses.replace(demo, num_classes=3))["num_classes"] == 3


# * learner mode -------------------------------------------------------------------------------------

def test_these_tests_run_on_a_learners_file(tmp_path, restore_stage_modules):
    # Loaded as Q2L_STAGE_03=my_transformer.py would load it: a learner who has written attention only.
    source = (conftest.ROOT / "03_transformer.py").read_text()
    attention_only = source.split("\nclass TransformerEncoderLayer(")[0] + "\n"
    mine = tmp_path / "my_transformer.py"
    mine.write_text(attention_only)
    stage = conftest.Stage(conftest.load_learner_file(3, mine), mine)
    test_attention_matches_torch(stage, torch.float64, F64, True)
    with pytest.raises(pytest.skip.Exception, match="my_transformer.py does not define `TransformerEncoderLayer` yet"):
        test_encoder_layer_matches_torch(stage, False, False)
    # A classic slip, the softmax taken over the queries instead of the keys, is caught.
    right = "weights = scores.softmax(dim=-1)"
    assert attention_only.count(right) == 1
    slip = tmp_path / "slip_transformer.py"
    slip.write_text(attention_only.replace(right, "weights = scores.softmax(dim=-2)"))
    stage = conftest.Stage(conftest.load_learner_file(3, slip), slip)
    with pytest.raises(AssertionError):
        test_attention_matches_torch(stage, torch.float64, F64, True)
