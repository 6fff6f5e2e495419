"""Stage 3 (03_transformer.py): attention, encoder/decoder layers and Query2Label against torch.nn and hand computations.

Everything goes through the `stage03` fixture, so a learner can run these tests on their own file
(`python tools/exercise.py 03` writes one to start from):
    Q2L_STAGE_03=my_03_transformer.py python -m pytest tests/test_03_transformer.py
Two kinds of checks:
- `lesson` checks, from the simplest piece to the whole (output shapes, scores, softmax, one head,
  all heads, gradients, masks, dropout, encoder layer post-/pre-norm, decoder layer post-/pre-norm,
  the Transformer, GroupWiseLinear, Query2Label), on small inputs (B 2, d 8, h 2) in float32 against
  a float64 reference, at the tolerance a correct float32 version written from the equations meets;
  on failure they show the input, expected and obtained values, and a hint;
- `stability` checks: float64 parity with torch.nn to 1e-12, the fused path against the explicit
  one, huge scores, CUDA autocast. Our reference passes them all.
Weights are copied across by name: our attention keeps q/k/v in three Linear layers (`q_proj`,
`k_proj`, `v_proj`, `out_proj`), torch packs them into one `in_proj_weight` (3d, d) whose row
blocks [0:d], [d:2d], [2d:3d] are q, k, v; everything else has torch's names (`self_attn`,
`multihead_attn`, `linear1`, `norm1`, ...), as DETR and the official code. Dropout is 0 wherever
outputs are compared.
"""

import copy
import dataclasses
import math

import conftest
import pytest
import torch
from conftest import assert_close_teaching
from torch import nn

F64 = torch.float64
LEARNER = dict(rtol=1e-4, atol=1e-5)  # what a correct float32 version meets against float64
STRICT = dict(rtol=1e-12, atol=1e-12)  # float64 against torch.nn: the same operations
d, h = 8, 2  # the lessons' sizes: dh = 4, so sqrt(dh) = 2 and sqrt(d) = 2.83 tell each other apart
D, HEADS = 32, 4  # the strictness checks' sizes
HINT_POS = "position is added to queries and keys, never to values: Attn(x + pos, x + pos, x)"


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


def shuffled(module, seed=0):
    """Every parameter moved off its init (biases, LayerNorm gains), so a dropped bias or a swapped
    norm shows; float32, dropout as built."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module


def twin(ours, reference):
    """`reference` (a torch.nn module, float64) with our module's weights; both in eval mode."""
    reference.load_state_dict(ours_to_torch({k: v.double() for k, v in ours.state_dict().items()}))
    return reference.eval()


def randn(*shape, seed=1, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def attention_inputs(B=2, Lq=3, Lk=4, width=d, seed=1):
    """query (B, Lq, d), key and value (B, Lk, d): three different tensors."""
    return randn(B, Lq, width, seed=seed), randn(B, Lk, width, seed=seed + 1), randn(B, Lk, width, seed=seed + 2)


def small_attention(stage03, heads=h, bias=True, dropout=0.0):
    torch.manual_seed(0)
    return shuffled(stage03.MultiHeadAttention(d, heads, dropout=dropout, bias=bias)).eval()


@torch.no_grad()
def hand_attention(mha, query, key, value, heads):
    """Vaswani et al. eq. 1 in float64, head by head with explicit weight slices (no reshapes shared
    with the code) -> (out (B, Lq, d), weights (B, h, Lq, Lk), scores (B, h, Lq, Lk))."""
    width = query.shape[-1]
    dh = width // heads

    def project(proj, x, rows):
        bias = 0.0 if proj.bias is None else proj.bias[rows].double()
        return x.double() @ proj.weight[rows].double().T + bias

    outs, weights, scores = [], [], []
    for i in range(heads):
        rows = slice(i * dh, (i + 1) * dh)
        q, k, v = project(mha.q_proj, query, rows), project(mha.k_proj, key, rows), project(mha.v_proj, value, rows)
        scores.append(q @ k.transpose(1, 2) / math.sqrt(dh))  # (B, Lq, Lk)
        weights.append(torch.softmax(scores[-1], dim=-1))
        outs.append(weights[-1] @ v)  # (B, Lq, dh)
    out = project(mha.out_proj, torch.cat(outs, dim=-1), slice(None))  # (B, Lq, d)
    return out, torch.stack(weights, 1), torch.stack(scores, 1)


class Shown:
    """An input a failure message shows (a few numbers and the shape) without pairing its entries with
    the result's: attention mixes entries, so query[i] is not the cause of out[i]."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        return conftest._numbers(self.value)


def teach(obtained, expected, *, inputs=None, **options):
    """assert_close_teaching, with the inputs shown but not matched entry by entry."""
    __tracebackhide__ = True
    inputs = {name: Shown(v) if hasattr(v, "detach") else v for name, v in (inputs or {}).items()}
    assert_close_teaching(obtained, expected, inputs=inputs, **options)


def check_shape(obtained, expected, *, what, hint, inputs=None):
    """A teaching message for a wrong shape (or a missing tensor)."""
    __tracebackhide__ = True
    got = None if obtained is None else tuple(obtained.shape)
    if got == tuple(expected):
        return
    lines = [f"{what}: wrong shape"] + [f"  {n:9s} {conftest._numbers(v)}" for n, v in (inputs or {}).items()]
    lines += [f"  expected shape {tuple(expected)}, obtained {'None' if got is None else f'shape {got}'}",
              f"  hint: {hint}"]
    raise AssertionError("\n".join(lines))


def centred(x):
    """x - its mean over keys - its mean over queries + the overall mean: what softmax weights
    determine of the scores, whichever axis the softmax ran over."""
    return x - x.mean(-1, keepdim=True) - x.mean(-2, keepdim=True) + x.mean((-2, -1), keepdim=True)


def scale_hint(obtained, expected, heads, dh):
    """The usual cause of scores off by a constant factor, named from the factor."""
    obtained, expected = obtained.detach(), expected.detach()
    ratio = float((obtained * expected).sum() / (expected * expected).sum())
    if (obtained - ratio * expected).abs().max() < 1e-3 * expected.abs().max():
        if abs(ratio - 1 / math.sqrt(heads)) < 1e-3:
            return (f"your scores are {ratio:.3g} = 1/sqrt(h) of the right ones: you divided by sqrt(d) = "
                    f"{math.sqrt(dh * heads):.3g}; divide by sqrt(dh) = {math.sqrt(dh):.3g}, the HEAD width")
        if abs(ratio - math.sqrt(dh)) < 1e-3:
            return f"your scores are sqrt(dh) = {ratio:.3g} times too large: divide Q K^T by sqrt(dh)"
    return "scores = Q_i K_i^T / sqrt(dh): Q_i, K_i are head i's dh columns; dh = d / h is the HEAD width, not d"


# * multi-head attention, piece by piece ------------------------------------------------------------

@pytest.mark.lesson(1, "q/k/v projections and the head split: output shapes")
def test_attention_shapes(stage03):
    mha = small_attention(stage03)
    query, key, value = attention_inputs()
    inputs = {"query": query, "key": key, "sizes": dict(B=2, Lq=3, Lk=4, d=d, h=h)}
    hint = ("split d into h heads of dh: q_proj(query).view(B, Lq, h, dh).transpose(1, 2) -> (B, h, Lq, dh); "
            "back with out.transpose(1, 2).reshape(B, Lq, d) before out_proj")
    with torch.no_grad():
        out, weights = mha(query, key, value, need_weights=True, average_weights=False)
        check_shape(out, (2, 3, d), what="MultiHeadAttention output", inputs=inputs, hint=hint)
        check_shape(weights, (2, h, 3, 4), what="MultiHeadAttention weights, average_weights=False",
                    inputs=inputs, hint="need_weights=True returns the softmax weights of every head, (B, h, Lq, Lk)")
        check_shape(mha(query, key, value, need_weights=True)[1], (2, 3, 4), inputs=inputs,
                    what="MultiHeadAttention weights, averaged", hint="average_weights=True: weights.mean(dim=1)")
        plain = mha(query, key, value)
    check_shape(plain[0], (2, 3, d), what="MultiHeadAttention output, need_weights=False", inputs=inputs, hint=hint)
    assert plain[1] is None, "need_weights=False: return (out, None)"


@pytest.mark.lesson(2, "scores: Q K^T / sqrt(dh), head by head")
def test_attention_scores(stage03):
    mha = small_attention(stage03)
    query, key, value = attention_inputs()
    with torch.no_grad():
        weights = mha(query, key, value, need_weights=True, average_weights=False)[1]  # (B, h, Lq, Lk)
    check_shape(weights, (2, h, 3, 4), what="MultiHeadAttention weights", hint="see the shapes lesson")
    expected = centred(hand_attention(mha, query, key, value, h)[2])
    obtained = centred(weights.double().log())  # the scores, as far as the weights tell them
    teach(obtained, expected, **LEARNER, hint=scale_hint(obtained, expected, h, d // h),
                          what="MultiHeadAttention scores Q K^T / sqrt(dh) (read from your weights: log w "
                               "minus its means over keys and queries)",
                          inputs={"query": query, "key": key, "sizes": dict(d=d, h=h, dh=d // h)})


@pytest.mark.lesson(3, "softmax over the keys: each row sums to 1")
def test_attention_rows_sum_to_one(stage03):
    mha = small_attention(stage03)
    query, key, value = attention_inputs()
    with torch.no_grad():
        weights = mha(query, key, value, need_weights=True, average_weights=False)[1]  # (B, h, Lq, Lk)
    hint = ("softmax over the KEYS, the last axis of (B, h, Lq, Lk): scores.softmax(dim=-1); "
            "each query spreads a weight of 1 over the keys")
    inputs = {"query": query, "key": key}
    teach(weights.sum(-1), torch.ones(2, h, 3), what="sum of the weights over the keys", **LEARNER,
                          inputs=inputs, hint=hint)
    teach(weights.clamp(max=0), torch.zeros_like(weights), what="negative weights", inputs=inputs,
                          hint=hint, rtol=0, atol=0)


@pytest.mark.lesson(4, "one head: softmax(Q K^T / sqrt(d)) V, then out_proj")
def test_one_head_against_the_hand_computation(stage03):
    mha = small_attention(stage03, heads=1)
    query, key, value = attention_inputs()
    with torch.no_grad():
        out, weights = mha(query, key, value, need_weights=True, average_weights=False)
    expected, expected_weights, _ = hand_attention(mha, query, key, value, 1)
    inputs = {"query": query, "key": key, "value": value}
    teach(weights, expected_weights, what="one head (h = 1): weights", inputs=inputs, **LEARNER,
                          hint="weights = softmax(Q K^T / sqrt(d)) with Q = q_proj(query), K = k_proj(key)")
    teach(out, expected, what="one head (h = 1): output", inputs=inputs, **LEARNER,
                          hint="out = out_proj(weights @ V), V = v_proj(value) (from `value`, not `key`; biases included)")


@pytest.mark.lesson(5, "all heads: split, attend, concatenate (vs nn.MultiheadAttention)")
@pytest.mark.parametrize("heads, bias", [(2, True), (4, False)])
def test_all_heads_against_torch(stage03, heads, bias):
    mha = small_attention(stage03, heads=heads, bias=bias)
    ref = twin(mha, nn.MultiheadAttention(d, heads, bias=bias, batch_first=True, dtype=F64))
    query, key, value = attention_inputs()
    with torch.no_grad():
        out, weights = mha(query, key, value, need_weights=True, average_weights=False)
        plain = mha(query, key, value)[0]
        averaged = mha(query, key, value, need_weights=True)[1]
        expected, expected_weights = ref(query.double(), key.double(), value.double(), average_attn_weights=False)
    inputs = {"query": query, "key": key, "value": value, "sizes": dict(d=d, h=heads, bias=bias)}
    hint = ("head i uses columns [i*dh, (i+1)*dh) of Q, K and V: view(B, L, h, dh).transpose(1, 2), not "
            "view(B, h, L, dh); heads back side by side with transpose(1, 2).reshape(B, Lq, d), then out_proj")
    teach(weights, expected_weights, what=f"{heads} heads: per-head weights", inputs=inputs,
                          hint=hint, **LEARNER)
    teach(out, expected, what=f"{heads} heads: output", inputs=inputs, hint=hint, **LEARNER)
    teach(plain, expected, what=f"{heads} heads: output with need_weights=False", inputs=inputs,
                          hint="need_weights=False must give the same output (with self.fused: "
                               "F.scaled_dot_product_attention on the same q, k, v and mask)", **LEARNER)
    teach(averaged, expected_weights.mean(1), what=f"{heads} heads: averaged weights",
                          inputs=inputs, hint="average_weights=True: the mean over heads, weights.mean(dim=1)",
                          **LEARNER)


@pytest.mark.lesson(6, "gradients through attention (vs nn.MultiheadAttention)")
def test_attention_gradients_against_torch(stage03):
    mha = small_attention(stage03)
    ref = twin(mha, nn.MultiheadAttention(d, h, batch_first=True, dtype=F64))
    tensors = [t.requires_grad_() for t in attention_inputs()]
    doubles = [t.detach().double().requires_grad_() for t in tensors]
    grad_out = randn(2, 3, d, seed=7)
    ours = dict(mha.named_parameters())
    grads = torch.autograd.grad(mha(*tensors)[0], [*tensors, *ours.values()], grad_out)
    theirs = dict(ref.named_parameters())
    expected = torch.autograd.grad(ref(*doubles)[0], [*doubles, *theirs.values()], grad_out.double())
    expected_params = torch_to_ours(dict(zip(theirs, expected[3:], strict=True)))
    hint = "gradients come from autograd: no .detach(), no torch.no_grad(), no in-place edit of a tensor autograd needs"
    for name, grad, want in [*zip(("query", "key", "value"), grads[:3], expected[:3], strict=True),
                             *((n, g, expected_params[n]) for n, g in zip(ours, grads[3:], strict=True))]:
        teach(grad, want, what=f"d out / d {name} (backward of sum(out * g))", hint=hint,
                              inputs={"query": tensors[0], "g": grad_out}, **LEARNER)


def masks(B=2, Lq=3, Lk=4, heads=h):
    causal = torch.ones(Lq, Lk, dtype=torch.bool).triu(1)  # True = may NOT attend
    padding = torch.zeros(B, Lk, dtype=torch.bool)
    padding[0, 3:] = True
    per_head = torch.rand(B * heads, Lq, Lk, generator=torch.Generator().manual_seed(3)) < 0.3
    per_head[..., 0] = False  # every query keeps a key
    return {"causal attn_mask (Lq, Lk)": dict(attn_mask=causal),
            "key_padding_mask (B, Lk)": dict(key_padding_mask=padding),
            "causal + padding": dict(attn_mask=causal, key_padding_mask=padding),
            "float attn_mask (added)": dict(attn_mask=randn(Lq, Lk, seed=4)),
            "per-head attn_mask (B*h, Lq, Lk)": dict(attn_mask=per_head)}


MASK_IDS = ["causal", "padding", "causal+padding", "float", "per-head"]


@pytest.mark.lesson(7, "masks: True = may not attend, float masks are added")
@pytest.mark.parametrize("kind", list(masks()), ids=MASK_IDS)
def test_masks_against_torch(stage03, kind):
    mha = small_attention(stage03)
    ref = twin(mha, nn.MultiheadAttention(d, h, batch_first=True, dtype=F64))
    query, key, value = attention_inputs()
    mask = masks()[kind]
    reference_mask = {k: v.double() if v.is_floating_point() else v for k, v in mask.items()}
    with torch.no_grad():
        out, weights = mha(query, key, value, need_weights=True, average_weights=False, **mask)
        plain = mha(query, key, value, **mask)[0]
        expected, expected_weights = ref(query.double(), key.double(), value.double(), average_attn_weights=False,
                                         **reference_mask)
    hint = ("masks are added to the scores before the softmax: bool True -> -inf (may NOT attend), float as is; "
            "attn_mask (Lq, Lk) or (B*h, Lq, Lk), key_padding_mask (B, Lk): self._additive_mask builds one of both")
    inputs = {"query": query, "key": key, **mask}
    teach(weights, expected_weights, what=f"weights with a {kind}", inputs=inputs, hint=hint, **LEARNER)
    teach(out, expected, what=f"output with a {kind}", inputs=inputs, hint=hint, **LEARNER)
    teach(plain, expected, what=f"output with a {kind}, need_weights=False", inputs=inputs,
                          hint=hint + "; the fused path takes the same additive mask (attn_mask=mask)", **LEARNER)


@pytest.mark.lesson(8, "attention dropout: on the weights, in training only")
def test_attention_dropout_is_active_in_training_only(stage03):
    mha = small_attention(stage03, dropout=0.5)
    ref = twin(mha, nn.MultiheadAttention(d, h, dropout=0.5, batch_first=True, dtype=F64))
    query, key, value = attention_inputs()
    with torch.no_grad():
        expected = ref(query.double(), key.double(), value.double())[0]
        teach(mha(query, key, value)[0], expected, what="dropout 0.5, eval mode: output", **LEARNER,
                              inputs={"query": query}, hint="no dropout in eval mode: p = self.dropout if self.training else 0")
        mha.train()
        torch.manual_seed(0)
        for need_weights in (False, True):
            first, second = mha(query, key, value, need_weights=need_weights)[0], mha(query, key, value)[0]
            assert (first - second).abs().max() > 1e-3, (
                f"dropout 0.5 in training mode (need_weights={need_weights}): two calls gave the same output; "
                "hint: F.dropout(weights, p) on the attention weights when self.training")


# * encoder and decoder layers ------------------------------------------------------------------

def ffn(layer, x):
    return layer.linear2(torch.relu(layer.linear1(x)))


def hand_encoder_layer(layer, src, pos, pre):
    """The layer's equation, written out with its own submodules, in float64."""
    layer = copy.deepcopy(layer).double()
    src, pos = src.double(), pos.double()
    if pre:
        y = layer.norm1(src)
        x = src + hand_attention(layer.self_attn, y + pos, y + pos, y, h)[0]
        return x + ffn(layer, layer.norm2(x))
    x = layer.norm1(src + hand_attention(layer.self_attn, src + pos, src + pos, src, h)[0])
    return layer.norm2(x + ffn(layer, x))


def hand_decoder_layer(layer, tgt, memory, pos, query_pos, pre):
    """Cross-attention layer (no self-attention, the default) written out, in float64 -> (out, weights)."""
    layer = copy.deepcopy(layer).double()
    tgt, memory, pos, query_pos = tgt.double(), memory.double(), pos.double(), query_pos.double()
    t = layer.norm2(tgt) if pre else tgt
    x, weights, _ = hand_attention(layer.multihead_attn, t + query_pos, memory + pos, memory, h)
    if pre:
        x = tgt + x
        return x + ffn(layer, layer.norm3(x)), weights.mean(1)
    x = layer.norm2(tgt + x)
    return layer.norm3(x + ffn(layer, x)), weights.mean(1)


def encoder_layer_check(stage03, pre):
    torch.manual_seed(0)
    ours = shuffled(stage03.TransformerEncoderLayer(d, h, 16, 0.0, normalize_before=pre)).eval()
    ref = twin(ours, nn.TransformerEncoderLayer(d, h, 16, 0.0, batch_first=True, norm_first=pre, dtype=F64))
    src = randn(2, 5, d)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 4:] = True
    with torch.no_grad():
        out = ours(src, src_key_padding_mask=padding)
        expected = ref(src.double(), src_key_padding_mask=padding)
    norm = "pre" if pre else "post"
    hint = ("pre-norm: y = LN1(x); x = x + Attn(y, y, y); x = x + FFN(LN2(x)): the residual adds to x, not to LN1(x)"
            if pre else "post-norm: LayerNorm AFTER the residual sum: x = LN1(x + Attn(x, x, x)); x = LN2(x + FFN(x))")
    teach(out, expected, what=f"encoder layer, {norm}-norm, vs nn.TransformerEncoderLayer",
                          inputs={"src": src, "padding": padding}, hint=hint, **LEARNER)


def encoder_position_check(stage03, pre):
    torch.manual_seed(0)
    ours = shuffled(stage03.TransformerEncoderLayer(d, h, 16, 0.0, normalize_before=pre)).eval()
    src, pos = randn(2, 5, d), randn(1, 5, d, seed=9)
    with torch.no_grad():
        out = ours(src, pos=pos)
    hint = HINT_POS + ("; pre-norm: on y = LN1(x): Attn(y + pos, y + pos, y)" if pre else "")
    teach(out, hand_encoder_layer(ours, src, pos, pre), inputs={"src": src, "pos": pos}, hint=hint,
                          what=f"encoder layer, {'pre' if pre else 'post'}-norm, with a position", **LEARNER)


@pytest.mark.lesson(9, "encoder layer, post-norm: LayerNorm after the residual sum")
def test_encoder_layer_post_norm(stage03):
    encoder_layer_check(stage03, pre=False)


@pytest.mark.lesson(10, "encoder layer, post-norm: position on queries and keys, not values")
def test_encoder_layer_post_norm_position(stage03):
    encoder_position_check(stage03, pre=False)


@pytest.mark.lesson(11, "encoder layer, pre-norm: LayerNorm before each block")
def test_encoder_layer_pre_norm(stage03):
    encoder_layer_check(stage03, pre=True)


@pytest.mark.lesson(12, "encoder layer, pre-norm: position on queries and keys, not values")
def test_encoder_layer_pre_norm_position(stage03):
    encoder_position_check(stage03, pre=True)


def decoder_layer_check(stage03, pre):
    """With self-attention (as nn.TransformerDecoderLayer) and a causal mask on the queries."""
    torch.manual_seed(0)
    ours = shuffled(stage03.TransformerDecoderLayer(d, h, 16, 0.0, normalize_before=pre, self_attention=True)).eval()
    ref = twin(ours, nn.TransformerDecoderLayer(d, h, 16, 0.0, batch_first=True, norm_first=pre, dtype=F64))
    tgt, memory = randn(2, 3, d), randn(2, 5, d, seed=2)
    causal = torch.ones(3, 3, dtype=torch.bool).triu(1)
    with torch.no_grad():
        out = ours(tgt, memory, tgt_mask=causal)[0]
        expected = ref(tgt.double(), memory.double(), tgt_mask=causal)
    hint = ("pre-norm: t = t + SelfAttn(LN1(t)); t = t + Attn(LN2(t), m, m); t = t + FFN(LN3(t))" if pre else
            "post-norm: t = LN1(t + SelfAttn(t)); t = LN2(t + Attn(t, m, m)); t = LN3(t + FFN(t))")
    teach(out, expected, inputs={"tgt": tgt, "memory": memory, "tgt_mask": causal},
                          what=f"decoder layer with self-attention, {'pre' if pre else 'post'}-norm, vs "
                               "nn.TransformerDecoderLayer", hint=hint + "; self-attention only if self.self_attn is not None",
                          **LEARNER)


def decoder_position_check(stage03, pre):
    """The default layer (cross-attention only, as the official code), with pos and query_pos."""
    torch.manual_seed(0)
    ours = shuffled(stage03.TransformerDecoderLayer(d, h, 16, 0.0, normalize_before=pre)).eval()
    tgt, memory = randn(2, 3, d), randn(2, 5, d, seed=2)
    pos, query_pos = randn(1, 5, d, seed=9), randn(1, 3, d, seed=10)
    with torch.no_grad():
        out, weights = ours(tgt, memory, pos=pos, query_pos=query_pos, need_weights=True)
    expected, expected_weights = hand_decoder_layer(ours, tgt, memory, pos, query_pos, pre)
    inputs = {"tgt": tgt, "memory": memory, "pos": pos, "query_pos": query_pos}
    norm = "pre" if pre else "post"
    hint = "query_pos on the queries, pos on the keys, never on the values: Attn(t + query_pos, m + pos, m)"
    teach(out, expected, what=f"decoder layer, {norm}-norm, with pos and query_pos", inputs=inputs,
                          hint=hint + ("; pre-norm: t = LN2(t) first" if pre else ""), **LEARNER)
    check_shape(weights, (2, 3, 5), what="decoder layer attention maps", inputs=inputs,
                hint="need_weights=True: return the cross-attention weights (B, Lq, N), averaged over heads")
    teach(weights, expected_weights, what=f"decoder layer, {norm}-norm, attention maps",
                          inputs=inputs, hint=hint, **LEARNER)


@pytest.mark.lesson(13, "decoder layer, post-norm: self-attention, cross-attention, FFN")
def test_decoder_layer_post_norm(stage03):
    decoder_layer_check(stage03, pre=False)


@pytest.mark.lesson(14, "decoder layer, post-norm: query_pos on queries, pos on keys, not values")
def test_decoder_layer_post_norm_position(stage03):
    decoder_position_check(stage03, pre=False)


@pytest.mark.lesson(15, "decoder layer, pre-norm: self-attention, cross-attention, FFN")
def test_decoder_layer_pre_norm(stage03):
    decoder_layer_check(stage03, pre=True)


@pytest.mark.lesson(16, "decoder layer, pre-norm: query_pos on queries, pos on keys, not values")
def test_decoder_layer_pre_norm_position(stage03):
    decoder_position_check(stage03, pre=True)


# * the whole encoder-decoder, the classifier and the model ----------------------------------------

@pytest.mark.lesson(17, "the Transformer: encoder then decoder (vs nn.Transformer)")
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # torch's own note about its fast path
@pytest.mark.parametrize("pre", [False, True], ids=["post-norm", "pre-norm"])
def test_transformer_against_torch(stage03, pre):
    torch.manual_seed(0)
    ours = shuffled(stage03.Transformer(d, h, 2, 2, 16, 0.0, normalize_before=pre, decoder_self_attention=True,
                                        encoder_norm=True)).eval()
    ref = twin(ours, nn.Transformer(d, h, 2, 2, 16, 0.0, batch_first=True, norm_first=pre, dtype=F64))
    src, tgt = randn(2, 5, d), randn(2, 3, d, seed=2)
    with torch.no_grad():
        out = ours(src, tgt=tgt)[0]
        expected = ref(src.double(), tgt.double())
    teach(out, expected, what=f"Transformer (2 + 2 layers, {'pre' if pre else 'post'}-norm) vs "
                          "nn.Transformer", inputs={"src": src, "tgt": tgt}, **LEARNER,
                          hint="the layers one after the other: the encoder's output is the memory of every decoder layer")


@pytest.mark.lesson(18, "GroupWiseLinear: one classifier per label")
def test_group_wise_linear_is_one_classifier_per_label(stage03):
    torch.manual_seed(0)
    head = stage03.GroupWiseLinear(5, d)
    assert head.W.shape == (1, 5, d) and head.b.shape == (1, 5)
    hs = randn(2, 5, d)
    with torch.no_grad():
        obtained = head(hs)
    expected = torch.stack([torch.stack([hs[b, k].double() @ head.W[0, k].double() + head.b[0, k].double()
                                         for k in range(5)]) for b in range(2)])
    inputs = {"hs": hs, "W": head.W, "b": head.b}
    hint = ("logit[b, k] = <W[0, k], hs[b, k]> + b[0, k]: query k meets classifier k only "
            "(einsum 'bkd,kd->bk' or (hs * W).sum(-1)), not hs @ W[0].T, which gives (B, K, K)")
    check_shape(obtained, (2, 5), what="GroupWiseLinear(K=5, d=8)(hs)", inputs=inputs, hint=hint)
    teach(obtained, expected, what="GroupWiseLinear(K=5, d=8)(hs)", inputs=inputs, hint=hint, **LEARNER)


def tiny_config(stage03, **changes):
    base = dict(num_classes=7, backbone="resnet18", pretrained=False, weights=None, d_model=64,
                num_heads=4, dim_feedforward=96, dropout=0.0, input_proj=True,
                feature_stage=None)  # the whole backbone: stride 32
    base.update(changes)
    return dataclasses.replace(stage03.PRESETS["demo"], **base)


@pytest.fixture(scope="module")
def tiny_model(stage03):
    torch.manual_seed(0)
    return stage03.Query2Label(tiny_config(stage03)).eval()


@pytest.mark.lesson(19, "Query2Label.forward_head: tokens, position, label queries, logits")
def test_query2label_head_against_the_pipeline(stage03, tiny_model):
    model = tiny_model
    features = randn(2, model.backbone.num_channels, 2, 3)
    with torch.no_grad():
        logits, attention = model.forward_head(features, return_attention=True)
        plain = model.forward_head(features)
        x = model.input_proj(features)  # (B, d, H, W)
        src = x.flatten(2).transpose(1, 2)  # (B, N, d)
        pos = model.position(x).flatten(2).transpose(1, 2)  # (1, N, d)
        hs, maps = model.transformer(src, query_pos=model.query_embed.weight, pos=pos, need_weights=True)
        expected = torch.stack([hs[:, k] @ model.fc.W[0, k] + model.fc.b[0, k] for k in range(7)], 1)  # (B, K)
    inputs = {"features": features, "sizes": dict(B=2, C=model.backbone.num_channels, H=2, W=3, K=7)}
    hint = ("tokens: input_proj, then x.flatten(2).transpose(1, 2) (B, N, d), not x.view(B, N, d), which mixes "
            "channels and cells; pos likewise; query_pos = self.query_embed.weight; logits = self.fc(hs)")
    teach(logits, expected, what="Query2Label.forward_head: logits", inputs=inputs, hint=hint, **LEARNER)
    teach(plain, expected, what="forward_head without attention: logits", inputs=inputs,
                          hint="the same logits with and without return_attention", **LEARNER)
    check_shape(attention, (2, 7, 2, 3), what="forward_head attention maps", inputs=inputs,
                hint="attention (B, K, N) back onto the grid: attention.view(B, K, H, W)")
    teach(attention, maps.view(2, 7, 2, 3), what="forward_head attention maps", inputs=inputs,
                          hint="return the last decoder layer's cross-attention, viewed as (B, K, H, W)", **LEARNER)


@pytest.mark.lesson(20, "the whole model: images -> logits (B, K), attention (B, K, H, W)")
@pytest.mark.parametrize("size,grid", [(64, 2), (96, 3)])
def test_query2label_shapes_at_two_input_sizes(stage03, tiny_model, size, grid):
    images = randn(2, 3, size, size)
    with torch.no_grad():
        logits = tiny_model(images)
        logits_again, attention = tiny_model(images, return_attention=True)
    inputs = {"images": images}
    check_shape(logits, (2, 7), what=f"Query2Label on {size} px images: logits", inputs=inputs, hint="one logit per label")
    teach(logits_again, logits, what="logits with return_attention=True", inputs=inputs, **LEARNER,
                          hint="the same forward pass with and without the maps")
    check_shape(attention, (2, 7, grid, grid), what=f"Query2Label on {size} px: attention", inputs=inputs,
                hint=f"the backbone's grid is {grid} x {grid} at {size} px (stride 32)")
    teach(attention.sum((2, 3)), torch.ones(2, 7), what="attention summed over the grid", inputs=inputs,
                          hint="each label's map is a softmax over the H*W cells: it sums to 1", **LEARNER)


# * plumbing around the lessons -------------------------------------------------------------------

def test_load_from_and_copy_to_torch(stage03):
    torch.manual_seed(3)
    ref = nn.MultiheadAttention(D, HEADS, batch_first=True, dtype=F64)
    ours = stage03.MultiHeadAttention(D, HEADS).double()
    if not hasattr(ours, "load_from_torch"):  # plumbing the exercise keeps; a file from scratch may lack it
        pytest.skip("MultiHeadAttention has no load_from_torch / copy_to_torch (03_transformer.py's helpers)")
    ours.load_from_torch(ref)
    q, k, v = attention_inputs(width=D)
    torch.testing.assert_close(ours(q.double(), k.double(), v.double())[0], ref(q.double(), k.double(), v.double())[0])
    other = nn.MultiheadAttention(D, HEADS, batch_first=True, dtype=F64)
    ours.copy_to_torch(other)
    torch.testing.assert_close(other.in_proj_weight, ref.in_proj_weight, atol=0, rtol=0)
    assert torch.equal(stage03.pack_in_proj(stage03.split_in_proj(ref.state_dict()))["in_proj_bias"],
                       ref.in_proj_bias)


def test_decoder_without_self_attention_has_the_official_parameters(stage03):
    layer = stage03.TransformerDecoderLayer(D, HEADS, 48, 0.0)  # default: as the official code
    names = {k.split(".")[0] for k in layer.state_dict()}
    assert names == {"multihead_attn", "linear1", "linear2", "norm2", "norm3"}


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
    src, pos = randn(2, 9, D, dtype=F64), randn(1, 9, D, seed=2, dtype=F64)
    labels = randn(6, D, seed=3, dtype=F64)
    out, attention = model(src, query_pos=labels, pos=pos, need_weights=True)
    memory = model.encoder(src, pos=pos)
    x = torch.zeros(2, 6, D, dtype=F64)
    for layer in model.decoder.layers:
        x, w = layer(x, memory, pos=pos, query_pos=labels.expand(2, -1, -1), need_weights=True)
    torch.testing.assert_close(out, model.decoder.norm(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(attention, w, atol=1e-10, rtol=0)  # the LAST layer's cross-attention
    assert out.shape == (2, 6, D) and attention.shape == (2, 6, 9)


@pytest.mark.parametrize("pre", [False, True], ids=["post-norm", "pre-norm"])
def test_forward_picks_the_equation_of_its_norm_placement(stage03, pre):
    torch.manual_seed(0)
    enc = stage03.TransformerEncoderLayer(D, HEADS, 64, 0.0, normalize_before=pre).double()
    dec = stage03.TransformerDecoderLayer(D, HEADS, 64, 0.0, normalize_before=pre, self_attention=True).double()
    x, tgt = randn(2, 9, D, dtype=F64), randn(2, 4, D, seed=2, dtype=F64)
    chosen, other = ("forward_pre", "forward_post") if pre else ("forward_post", "forward_pre")
    assert torch.equal(enc(x), getattr(enc, chosen)(x))
    assert torch.equal(dec(tgt, x)[0], getattr(dec, chosen)(tgt, x)[0])
    assert not torch.allclose(enc(x), getattr(enc, other)(x))  # the two equations do differ


def test_finer_grid_gives_finer_attention_maps(stage03):
    """output_stride 8: a 64 px image gives 8 x 8 feature cells, position encodings and attention maps."""
    torch.manual_seed(0)
    model = stage03.Query2Label(tiny_config(stage03, backbone="test_resnet", output_stride=8)).eval()
    with torch.no_grad():
        logits, attention = model(torch.randn(2, 3, 64, 64), return_attention=True)
    assert logits.shape == (2, 7) and attention.shape == (2, 7, 8, 8)
    torch.testing.assert_close(attention.sum((2, 3)), torch.ones(2, 7), atol=1e-5, rtol=0)


def test_presets(stage03):
    official = stage03.PRESETS["official_r101"]
    assert (official.backbone, official.d_model, official.num_heads, official.dim_feedforward) == ("resnet101.tv_in1k", 2048, 4, 8192)
    assert (official.enc_layers, official.dec_layers, official.dropout) == (1, 2, 0.1)
    assert not official.input_proj and not official.decoder_self_attention and not official.normalize_before
    assert official.frozen_bn and official.freeze_stem and official.position == "sine"
    demo = stage03.PRESETS["demo"]
    assert 128 <= demo.d_model <= 256 and demo.input_proj
    assert dataclasses.asdict(dataclasses.replace(demo, num_classes=3))["num_classes"] == 3


# * stability and strictness ----------------------------------------------------------------------

HINT_PARITY = ("float64 to 1e-12 against torch.nn: compute in the input's dtype (no float32 step) with torch's "
               "operations: q scaled by dh**-0.5 before Q K^T, softmax over the keys, heads joined before out_proj")


def strict_pair(stage03, bias=True, dropout=0.0):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(D, HEADS, dropout=dropout, bias=bias, batch_first=True, dtype=F64)
    ours = stage03.MultiHeadAttention(D, HEADS, dropout=dropout, bias=bias).double()
    ours.load_state_dict(torch_to_ours(ref.state_dict()))
    return ours, ref


def strict_inputs(B=3, Lq=5, Lk=7):
    return [t.double().requires_grad_() for t in attention_inputs(B, Lq, Lk, width=D)]


@pytest.mark.stability(HINT_PARITY)
@pytest.mark.parametrize("bias", [True, False])
def test_attention_float64_parity_with_torch(stage03, bias):
    ours, ref = strict_pair(stage03, bias=bias)
    q, k, v = strict_inputs()
    out_ref, w_ref = ref(q, k, v, need_weights=True, average_attn_weights=False)
    out, w = ours(q, k, v, need_weights=True, average_weights=False)
    inputs = {"query": q, "key": k, "value": v}
    teach(out, out_ref, what="float64 output vs nn.MultiheadAttention", inputs=inputs, hint=HINT_PARITY, **STRICT)
    teach(w, w_ref, what="float64 per-head weights", inputs=inputs, hint=HINT_PARITY, **STRICT)
    teach(ours(q, k, v, need_weights=True)[1], ref(q, k, v)[1], what="float64 averaged weights",
                          inputs=inputs, hint=HINT_PARITY, **STRICT)
    teach(ours(q, q, q)[0], ref(q, q, q)[0], what="float64 self-attention (query = key = value)",
                          inputs=inputs, hint=HINT_PARITY, **STRICT)
    grad_out = torch.randn_like(out)
    ref_params, ours_params = dict(ref.named_parameters()), dict(ours.named_parameters())
    g_ref = torch.autograd.grad(out_ref, [q, k, v, *ref_params.values()], grad_out)
    g_ours = torch.autograd.grad(out, [q, k, v, *ours_params.values()], grad_out)
    g_ref_params = torch_to_ours(dict(zip(ref_params, g_ref[3:], strict=True)))
    pairs = [*zip("qkv", g_ours[:3], g_ref[:3], strict=True),
             *((n, g, g_ref_params[n]) for n, g in zip(ours_params, g_ours[3:], strict=True))]
    for name, a, b in pairs:
        teach(a, b, what=f"float64 gradient of {name}", inputs=inputs, hint=HINT_PARITY, **STRICT)


@pytest.mark.stability("the fused path (self.fused, need_weights=False: F.scaled_dot_product_attention(q, k, v, "
                       "attn_mask=mask, dropout_p=p)) must compute what the explicit path computes: the same additive "
                       "mask, the default scale 1/sqrt(dh); need_weights=True takes the explicit path")
@pytest.mark.parametrize("dtype,tol", [(F64, STRICT), (torch.float32, dict(rtol=1e-5, atol=1e-6))])
@pytest.mark.parametrize("kind", ["no mask", "causal + padding", "float attn_mask (added)"], ids=["none", "causal+padding", "float"])
def test_fused_path_equals_explicit_path(stage03, dtype, tol, kind):
    ours, _ = strict_pair(stage03)
    ours.to(dtype)
    q, k, v = [t.detach().to(dtype).requires_grad_() for t in strict_inputs(Lq=3, Lk=4)]
    mask = {k_: v_.to(dtype) if v_.is_floating_point() else v_ for k_, v_ in masks(B=3, heads=HEADS).get(kind, {}).items()}
    ours.fused = True
    fused = ours(q, k, v, **mask)[0]
    ours.fused = False
    explicit = ours(q, k, v, **mask)[0]
    inputs = {"query": q, **mask}
    hint = "fused and explicit paths must agree"
    teach(fused, explicit, what=f"fused vs explicit output ({dtype}, {kind})", inputs=inputs, hint=hint, **tol)
    ours.fused = True
    out_weighted, w = ours(q, k, v, need_weights=True, average_weights=False, **mask)
    teach(out_weighted, fused, what="output with need_weights=True vs fused", inputs=inputs, hint=hint, **tol)
    teach(w.sum(-1), torch.ones(3, HEADS, 3, dtype=dtype), what="weights summed over keys",
                          inputs=inputs, hint=hint, **tol)
    g_fused = torch.autograd.grad(fused.sum(), [q, k, v, ours.q_proj.weight])
    g_explicit = torch.autograd.grad(explicit.sum(), [q, k, v, ours.q_proj.weight])
    for name, a, b in zip(("query", "key", "value", "q_proj.weight"), g_fused, g_explicit, strict=True):
        teach(a, b, what=f"fused vs explicit gradient of {name}", inputs=inputs, hint=hint, **tol)


@pytest.mark.stability("float64 to 1e-12 with every mask, on both paths: bool True -> -inf added to the scores, "
                       "float masks added as they are, (B*h, Lq, Lk) masks viewed as (B, h, Lq, Lk)")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", list(masks()), ids=MASK_IDS)
def test_masks_float64_parity_with_torch(stage03, fused, kind):
    ours, ref = strict_pair(stage03)
    ours.fused = fused
    q, k, v = strict_inputs(B=2, Lq=3, Lk=4)
    mask = {k_: v_.double() if v_.is_floating_point() else v_ for k_, v_ in masks(heads=HEADS)[kind].items()}
    teach(ours(q, k, v, **mask)[0], ref(q, k, v, **mask)[0], what=f"float64 output with a {kind}",
                          inputs={"query": q, **mask}, hint="masks: the same additive mask as torch", **STRICT)


@pytest.mark.stability("scores in the thousands: exp(scores) overflows (float32 past 88) and inf / inf = NaN; use "
                       "scores.softmax(dim=-1), which subtracts each row's maximum first")
@pytest.mark.parametrize("need_weights", [True, False])
def test_huge_scores_stay_finite(stage03, need_weights):
    mha = small_attention(stage03)
    ref = twin(mha, nn.MultiheadAttention(d, h, batch_first=True, dtype=F64))
    query, key, value = (100 * t for t in attention_inputs())  # scores ~ 1e4
    with torch.no_grad():
        out, weights = mha(query, key, value, need_weights=need_weights)
        expected = ref(query.double(), key.double(), value.double())[0]
    hint = "softmax of huge scores: subtract the row maximum (scores.softmax(-1) does)"
    assert torch.isfinite(out).all(), f"inputs x 100 (scores ~ 1e4): output {out.flatten()[:6].tolist()}; hint: {hint}"
    if weights is not None:
        teach(weights.sum(-1), torch.ones(2, 3), what="weights summed over keys, scores ~ 1e4",
                              inputs={"query": query}, hint=hint, rtol=0, atol=1e-5)
    teach(out, expected, what="output, scores ~ 1e4", inputs={"query": query}, hint=hint,
                          rtol=1e-3, atol=1e-2)


@pytest.mark.stability("encoder layers to 1e-12 in float64 against torch.nn, in train mode too (dropout 0): "
                       "torch's operations in torch's order, nn.LayerNorm, ReLU, no float32 step")
@pytest.mark.parametrize("pre", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_encoder_layer_float64_parity_with_torch(stage03, pre, train):
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(D, HEADS, 48, 0.0, batch_first=True, norm_first=pre, dtype=F64)
    ours = stage03.TransformerEncoderLayer(D, HEADS, 48, 0.0, normalize_before=pre).double()
    ours.load_state_dict(torch_to_ours(ref.state_dict()))
    ref.train(train), ours.train(train)
    x = randn(2, 9, D, dtype=F64).requires_grad_()
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 7:] = True
    out, expected = ours(x, src_key_padding_mask=padding), ref(x, src_key_padding_mask=padding)
    inputs = {"src": x, "padding": padding}
    teach(out, expected, what="float64 encoder layer", inputs=inputs, hint=HINT_PARITY, **STRICT)
    grads = [torch.autograd.grad(y.sum(), x)[0] for y in (out, expected)]
    teach(*grads, what="float64 encoder layer, input gradient", inputs=inputs, hint=HINT_PARITY, **STRICT)


@pytest.mark.stability("decoder layers to 1e-12 in float64 against torch.nn: torch's operations in torch's order")
@pytest.mark.parametrize("pre", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_decoder_layer_float64_parity_with_torch(stage03, pre, train):
    torch.manual_seed(0)
    ref = nn.TransformerDecoderLayer(D, HEADS, 48, 0.0, batch_first=True, norm_first=pre, dtype=F64)
    ours = stage03.TransformerDecoderLayer(D, HEADS, 48, 0.0, normalize_before=pre, self_attention=True).double()
    ours.load_state_dict(torch_to_ours(ref.state_dict()))
    ref.train(train), ours.train(train)
    tgt, memory = randn(2, 6, D, dtype=F64), randn(2, 9, D, seed=2, dtype=F64)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    out, weights = ours(tgt, memory, tgt_mask=causal)
    teach(out, ref(tgt, memory, tgt_mask=causal), what="float64 decoder layer", hint=HINT_PARITY,
                          inputs={"tgt": tgt, "memory": memory}, **STRICT)
    assert weights is None, "need_weights=False: the layer returns (tgt, None)"


@pytest.mark.stability("the whole encoder-decoder to 1e-12 in float64 against nn.Transformer, outputs and gradients")
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("pre", [False, True], ids=["post-norm", "pre-norm"])
def test_transformer_float64_parity_with_torch(stage03, pre):
    torch.manual_seed(0)
    ref = nn.Transformer(D, HEADS, 2, 2, 48, 0.0, batch_first=True, norm_first=pre, dtype=F64)
    ours = stage03.Transformer(D, HEADS, 2, 2, 48, 0.0, normalize_before=pre,
                               decoder_self_attention=True, encoder_norm=True).double()
    ours.load_state_dict(torch_to_ours(ref.state_dict()))
    ours.train(), ref.train()  # dropout 0: training mode must give the same numbers
    src = randn(2, 9, D, dtype=F64).requires_grad_()
    tgt = randn(2, 5, D, seed=2, dtype=F64)
    out, expected = ours(src, tgt=tgt)[0], ref(src, tgt)
    inputs = {"src": src, "tgt": tgt}
    teach(out, expected, what="float64 Transformer", inputs=inputs, hint=HINT_PARITY, **STRICT)
    grads = [torch.autograd.grad(y.sum(), src)[0] for y in (out, expected)]
    teach(*grads, what="float64 Transformer, input gradient", inputs=inputs, hint=HINT_PARITY, **STRICT)


@pytest.mark.gpu
@pytest.mark.stability("under CUDA autocast (fp16/bf16) the fused flash / memory-efficient kernels run: keep the "
                       "softmax and the masks in a form F.scaled_dot_product_attention accepts")
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


# * errors (our wording; not the lesson) and the learner-mode machinery -----------------------------

@pytest.mark.hardening
def test_bad_head_count_is_a_clear_error(stage03):
    with pytest.raises(ValueError, match="30.*4|4.*30"):
        stage03.MultiHeadAttention(30, 4)


@pytest.mark.hardening
def test_query2label_rejects_wrong_image_shape(stage03, tiny_model):
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        tiny_model(torch.randn(3, 64, 64))


@pytest.mark.hardening
def test_these_tests_run_on_a_learners_file(tmp_path, restore_stage_modules):
    # Loaded as Q2L_STAGE_03=my_transformer.py would load it: a learner who has written attention only.
    source = (conftest.ROOT / "03_transformer.py").read_text()
    attention_only = source.split("\nclass TransformerEncoderLayer(")[0] + "\n"
    mine = tmp_path / "my_transformer.py"
    mine.write_text(attention_only)
    stage = conftest.Stage(conftest.load_learner_file(3, mine), mine)
    test_all_heads_against_torch(stage, 2, True)
    with pytest.raises(pytest.skip.Exception, match="my_transformer.py does not define `TransformerEncoderLayer` yet"):
        test_encoder_layer_post_norm(stage)
    # A classic slip, the softmax taken over the queries instead of the keys, is caught and named.
    right = "weights = scores.softmax(dim=-1)"
    assert attention_only.count(right) == 1
    slip = tmp_path / "slip_transformer.py"
    slip.write_text(attention_only.replace(right, "weights = scores.softmax(dim=-2)"))
    stage = conftest.Stage(conftest.load_learner_file(3, slip), slip)
    test_attention_scores(stage)  # the scores themselves are right
    with pytest.raises(AssertionError, match="sum of the weights over the keys(.|\n)*hint: softmax over the KEYS"):
        test_attention_rows_sum_to_one(stage)
