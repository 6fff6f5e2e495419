"""Stage 3: hand-written multi-head attention, the DETR-style transformer and the Query2Label model.

Paper: Liu et al. 2021, sec. 3.1-3.2 (Fig. 2): backbone features + 2D position encoding -> encoder
-> a decoder whose K queries are learnable *label embeddings*, one per class -> one linear
classifier per class -> K logits. Attention: Vaswani et al. 2017, sec. 3.2; layers as DETR's.
    python 03_transformer.py   # parity with torch.nn (max abs differences), then the demo model
Tools: bench_transformer.py (speed), official.py (official checkpoints), export.py. Next: 04_loss.py.

Shapes (batch-first everywhere; nn.MultiheadAttention and DETR default to sequence-first):
B batch, C backbone channels, H x W feature map, N = H*W tokens, K labels/queries, d model width,
h heads, dh = d / h head width, Lq / Lk query / key lengths.
"""

import argparse
import dataclasses
import importlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

backbone = importlib.import_module("02_backbone")  # module names may not start with a digit

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class MultiHeadAttention(nn.Module):
    """Multi-head attention written out (Vaswani et al. 2017, eq. 1 and sec. 3.2.2).

        Q = query Wq + bq,   K = key Wk + bk,   V = value Wv + bv             each (B, L, d)
        head_i = softmax(Q_i K_i^T / sqrt(dh) + M) V_i,   i = 1..h              (B, Lq, dh)
        out = concat(head_1, ..., head_h) Wo + bo                               (B, Lq, d)

    Why: each head compares queries with keys in its own subspace, so one layer looks for several
    things at once; 1/sqrt(dh) keeps scores near unit scale (no saturated softmax at init). M: 0 where
    attending is allowed, -inf where not (bool True = "may NOT attend"). With `self.fused` and no
    weights asked for, F.scaled_dot_product_attention computes the same from the same parameters.
    Deviations from nn.MultiheadAttention: batch-first; separate q/k/v projections (split_in_proj /
    pack_in_proj convert); no bias_k/bias_v/add_zero_attn/kdim/vdim; weights before dropout (sum 1)."""

    def __init__(self, d_model, num_heads, dropout=0.0, bias=True):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.dropout, self.fused = dropout, True
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d_model, d_model, bias=bias)
                                                                for _ in range(4))
        self.reset_parameters()

    def reset_parameters(self):
        # As nn.MultiheadAttention (so DETR, official): Xavier over the packed (3d, d) in-projection,
        # zero biases; Xavier on the output projection, as DETR re-initialises it.
        bound = math.sqrt(6.0 / (self.d_model + 3 * self.d_model))
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.uniform_(proj.weight, -bound, bound)
        nn.init.xavier_uniform_(self.out_proj.weight)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(self, query, key, value, need_weights=False, average_weights=True,
                attn_mask=None, key_padding_mask=None):
        """query (B, Lq, d), key/value (B, Lk, d) -> (out (B, Lq, d), weights or None).
        weights: (B, Lq, Lk) averaged over heads, or (B, h, Lq, Lk) with average_weights=False.
        attn_mask: (Lq, Lk) or (B*h, Lq, Lk); key_padding_mask: (B, Lk); bool (True = masked) or float."""
        B, Lq, d = query.shape
        Lk, h, dh = key.shape[1], self.num_heads, self.head_dim
        q = self.q_proj(query).view(B, Lq, h, dh).transpose(1, 2)  # (B, h, Lq, dh)
        k = self.k_proj(key).view(B, Lk, h, dh).transpose(1, 2)  # (B, h, Lk, dh)
        v = self.v_proj(value).view(B, Lk, h, dh).transpose(1, 2)  # (B, h, Lk, dh)
        mask = self._additive_mask(attn_mask, key_padding_mask, B, Lq, Lk, q.dtype)
        p = self.dropout if self.training else 0.0
        if self.fused and not need_weights:
            out, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p), None
        else:
            scores = (q * dh**-0.5) @ k.transpose(-2, -1)  # (B, h, Lq, dh) @ (B, h, dh, Lk): (B, h, Lq, Lk)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)  # (B, h, Lq, Lk), each row sums to 1 over keys
            out = F.dropout(weights, p) @ v  # (B, h, Lq, Lk) @ (B, h, Lk, dh) -> (B, h, Lq, dh)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Lq, d))  # heads side by side: (B, Lq, h*dh)
        if weights is not None and average_weights:
            weights = weights.mean(dim=1)  # (B, Lq, Lk)
        return out, weights

    def _additive_mask(self, attn_mask, key_padding_mask, B, Lq, Lk, dtype):
        """Both masks as one float tensor broadcastable to (B, h, Lq, Lk) (bool True: -inf), or None."""
        mask, h = None, self.num_heads
        attn_shape = (1, 1, Lq, Lk) if attn_mask is None or attn_mask.dim() == 2 else (B, h, Lq, Lk)
        for m, shape in ((attn_mask, attn_shape), (key_padding_mask, (B, 1, 1, Lk))):
            if m is not None:
                if m.dtype == torch.bool:
                    m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, -math.inf)
                m = m.to(dtype).view(shape)  # attn: (1 or B, 1 or h, Lq, Lk); padding: (B, 1, 1, Lk)
                mask = m if mask is None else mask + m
        return mask

    @torch.no_grad()
    def load_from_torch(self, mha):  # weights from an nn.MultiheadAttention (packed in_proj)
        self.load_state_dict(split_in_proj(mha.state_dict()))

    @torch.no_grad()
    def copy_to_torch(self, mha):  # this module's weights into an nn.MultiheadAttention
        mha.load_state_dict(pack_in_proj(self.state_dict()))


def split_in_proj(state):
    """nn.MultiheadAttention's packed `*in_proj_weight` (3d, d) / `*in_proj_bias` (3d,) in a state dict
    -> ours: `*q_proj.*`, `*k_proj.*`, `*v_proj.*` (rows [0:d], [d:2d], [2d:3d])."""
    out = {}
    for key, value in state.items():
        prefix, packed, kind = key.rpartition("in_proj_")  # "a.attn.in_proj_weight": "a.attn.", "weight"
        if packed and kind in ("weight", "bias"):
            out.update({f"{prefix}{n}_proj.{kind}": part
                        for n, part in zip("qkv", value.chunk(3), strict=True)})
        else:
            out[key] = value
    return out


def pack_in_proj(state):
    """The inverse of split_in_proj: ours -> nn.MultiheadAttention's packed layout."""
    out = {}
    for key, value in state.items():
        proj, kind = (["", ""] + key.split("."))[-2:]  # "a.self_attn.q_proj.weight" -> "q_proj", "weight"
        if proj not in ("q_proj", "k_proj", "v_proj"):
            out[key] = value
        elif proj == "q_proj":
            prefix = key[: -len(f"q_proj.{kind}")]  # "a.self_attn."
            out[f"{prefix}in_proj_{kind}"] = torch.cat([state[f"{prefix}{n}_proj.{kind}"] for n in "qkv"])
    return out


def with_pos(x, pos):
    """Position is added to what is compared (queries, keys), never to what is mixed (values)."""
    return x if pos is None else x + pos


class TransformerEncoderLayer(nn.Module):
    """One encoder layer: self-attention among the N image tokens, then a feed-forward network
    FFN(x) = linear2(dropout(relu(linear1(x)))); post-norm (default: DETR, official weights) or pre-norm
    (normalize_before: a clean residual path, stabler when deep). Why: every token gathers context
    from all others (global reasoning a CNN's receptive field lacks); the FFN transforms each alone.
    Deviations from nn.TransformerEncoderLayer: `pos` added to queries and keys in each layer; batch-first."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout, self.dropout1, self.dropout2 = (nn.Dropout(dropout) for _ in range(3))
        self.activation, self.normalize_before = ACTIVATIONS[activation], normalize_before

    def ffn(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward_post(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
        """Post-norm: x = LN1(x + Attn(x + pos, x + pos, x));  x = LN2(x + FFN(x))."""
        q = k = with_pos(src, pos)
        x = self.self_attn(q, k, src, attn_mask=src_mask, key_padding_mask=src_key_padding_mask)[0]
        src = self.norm1(src + self.dropout1(x))
        return self.norm2(src + self.dropout2(self.ffn(src)))

    def forward_pre(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
        """Pre-norm: y = LN1(x);  x = x + Attn(y + pos, y + pos, y);  x = x + FFN(LN2(x))."""
        y = self.norm1(src)
        q = k = with_pos(y, pos)
        x = self.self_attn(q, k, y, attn_mask=src_mask, key_padding_mask=src_key_padding_mask)[0]
        src = src + self.dropout1(x)
        return src + self.dropout2(self.ffn(self.norm2(src)))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
        """src (B, N, d), pos (1 or B, N, d) or None -> (B, N, d)."""
        forward = self.forward_pre if self.normalize_before else self.forward_post
        return forward(src, src_mask, src_key_padding_mask, pos)


class TransformerDecoderLayer(nn.Module):
    """One decoder layer on the K queries t and the encoder's memory m: [self-attention SelfAttn(t) =
    Attn(t + qpos, t + qpos, t)], cross-attention Attn(t, m) = Attn(t + qpos, m + pos, m), then FFN;
    residual + LayerNorm around each. Attn's weights (B, Lq, N), averaged over heads, are the attention
    maps. Why: each label query compares itself with every image token and pools those that match.
    Deviations: self-attention OFF by default (official `rm_self_attn_dec`; the paper's Fig. 2 and
    nn.TransformerDecoderLayer have it; off, no `self_attn`/`norm1`, as the official state dict);
    `pos` / `query_pos` at every layer (DETR); returns (tgt, weights or None)."""

    def __init__(self, d_model, nhead, dim_feedforward=2048, dropout=0.1, activation="relu",
                 normalize_before=False, self_attention=False):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, nhead, dropout=dropout) if self_attention else None
        self.norm1 = nn.LayerNorm(d_model) if self_attention else None
        self.multihead_attn = MultiHeadAttention(d_model, nhead, dropout=dropout)
        self.linear1, self.linear2 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
        self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout, self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(4))
        self.activation, self.normalize_before = ACTIVATIONS[activation], normalize_before

    def ffn(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def attend_self(self, x, query_pos, masks):  # the K queries among themselves
        q = k = with_pos(x, query_pos)
        return self.dropout1(self.self_attn(q, k, x, attn_mask=masks.get("tgt_mask"),
                                            key_padding_mask=masks.get("tgt_key_padding_mask"))[0])

    def attend_memory(self, x, memory, pos, query_pos, need_weights, masks):  # queries -> image tokens
        x, weights = self.multihead_attn(with_pos(x, query_pos), with_pos(memory, pos), memory,
                                         need_weights=need_weights, attn_mask=masks.get("memory_mask"),
                                         key_padding_mask=masks.get("memory_key_padding_mask"))
        return self.dropout2(x), weights

    def forward_post(self, tgt, memory, pos=None, query_pos=None, need_weights=False, **masks):
        """Post-norm: t = LN1(t + SelfAttn(t));  t = LN2(t + Attn(t, m));  t = LN3(t + FFN(t))."""
        if self.self_attn is not None:
            tgt = self.norm1(tgt + self.attend_self(tgt, query_pos, masks))
        x, weights = self.attend_memory(tgt, memory, pos, query_pos, need_weights, masks)
        tgt = self.norm2(tgt + x)
        return self.norm3(tgt + self.dropout3(self.ffn(tgt))), weights

    def forward_pre(self, tgt, memory, pos=None, query_pos=None, need_weights=False, **masks):
        """Pre-norm: t = t + SelfAttn(LN1(t));  t = t + Attn(LN2(t), m);  t = t + FFN(LN3(t))."""
        if self.self_attn is not None:
            tgt = tgt + self.attend_self(self.norm1(tgt), query_pos, masks)
        x, weights = self.attend_memory(self.norm2(tgt), memory, pos, query_pos, need_weights, masks)
        tgt = tgt + x
        return tgt + self.dropout3(self.ffn(self.norm3(tgt))), weights

    def forward(self, tgt, memory, pos=None, query_pos=None, need_weights=False, **masks):
        """tgt (B, Lq, d), memory (B, N, d), pos (1 or B, N, d), query_pos (1 or B, Lq, d), masks as
        torch's -> (tgt (B, Lq, d), cross-attention weights (B, Lq, N) averaged over heads, or None)."""
        known = {"tgt_mask", "memory_mask", "tgt_key_padding_mask", "memory_key_padding_mask"}
        if unknown := set(masks) - known:
            raise TypeError(f"unknown mask arguments {sorted(unknown)}")
        forward = self.forward_pre if self.normalize_before else self.forward_post
        return forward(tgt, memory, pos, query_pos, need_weights, **masks)


class TransformerEncoder(nn.Module):
    def __init__(self, layers, norm=None):
        super().__init__()
        self.layers, self.norm = nn.ModuleList(layers), norm

    def forward(self, src, mask=None, src_key_padding_mask=None, pos=None):
        for layer in self.layers:
            src = layer(src, src_mask=mask, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    def __init__(self, layers, norm=None):
        super().__init__()
        self.layers, self.norm = nn.ModuleList(layers), norm

    def forward(self, tgt, memory, need_weights=False, **kwargs):
        """Returns (output, the LAST layer's cross-attention weights or None)."""
        weights, last = None, len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            tgt, weights = layer(tgt, memory, need_weights=need_weights and i == last, **kwargs)
        return (tgt if self.norm is None else self.norm(tgt)), weights


class Transformer(nn.Module):
    """DETR's encoder-decoder, batch-first: encoder over image tokens, decoder over K queries.
    Deviations from nn.Transformer (as DETR): `pos` / `query_pos` added to queries and keys in every
    attention; decoder input `tgt` zeros by default (the identity is in query_pos); final encoder
    LayerNorm only with pre-norm; no decoder self-attention by default; Xavier init; no aux outputs."""

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.1, activation="relu", normalize_before=False,
                 decoder_self_attention=False, encoder_norm=None):
        super().__init__()
        args = (d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        encoder_norm = normalize_before if encoder_norm is None else encoder_norm
        self.encoder = TransformerEncoder([TransformerEncoderLayer(*args) for _ in range(num_encoder_layers)],
                                          nn.LayerNorm(d_model) if encoder_norm else None)
        decoder_layers = [TransformerDecoderLayer(*args, self_attention=decoder_self_attention)
                          for _ in range(num_decoder_layers)]
        self.decoder = TransformerDecoder(decoder_layers, nn.LayerNorm(d_model))
        self.d_model, self.nhead = d_model, nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                module.reset_parameters()

    def forward(self, src, query_pos=None, pos=None, tgt=None, src_key_padding_mask=None,
                need_weights=False):
        """src (B, N, d) image tokens; query_pos (K, d) or (B, K, d) label embeddings; pos (1 or B, N, d);
        tgt (B, K, d) decoder input, zeros by default -> (out (B, K, d), attention (B, K, N) or None)."""
        memory = self.encoder(src, src_key_padding_mask=src_key_padding_mask, pos=pos)  # (B, N, d)
        if query_pos is not None and query_pos.dim() == 2:
            query_pos = query_pos.unsqueeze(0)  # (1, K, d), shared by every image
        if tgt is None and query_pos is None:
            raise ValueError("Transformer needs the decoder queries: pass query_pos (K, d) or tgt (B, K, d)")
        if tgt is None:
            tgt = src.new_zeros(src.shape[0], query_pos.shape[1], self.d_model)  # (B, K, d)
        return self.decoder(tgt, memory, need_weights=need_weights, pos=pos, query_pos=query_pos,
                            memory_key_padding_mask=src_key_padding_mask)


class GroupWiseLinear(nn.Module):
    """One linear classifier per label:  logit_k = <W_k, h_k> + b_k,   W (1, K, d), b (1, K).
    Why not one nn.Linear(K*d, K) over all decoded queries? Every query would vote on every class;
    here query k alone decides label k, so label embedding k must find its own class's evidence."""

    def __init__(self, num_classes, d_model):
        super().__init__()
        bound = 1.0 / math.sqrt(d_model)  # the official init: uniform(-1/sqrt(d), 1/sqrt(d))
        self.W = nn.Parameter(torch.empty(1, num_classes, d_model).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(1, num_classes).uniform_(-bound, bound))

    def forward(self, hs):
        """hs (B, K, d) -> logits (B, K): logit_k = <W_k, hs_k> + b_k, one classifier per label."""
        return torch.einsum("bkd,kd->bk", hs, self.W[0]) + self.b  # (B, K, d) . (K, d) -> (B, K)


@dataclasses.dataclass
class Q2LConfig:
    """Everything that defines a Query2Label model; plain values, so asdict() is JSON (checkpoints)."""
    num_classes: int = 80
    backbone: str = "resnet101"
    pretrained: bool = False  # ImageNet weights through timm (needs the network or timm's cache)
    weights: str | None = None  # local backbone weights file instead (.pth/.pt/.safetensors)
    d_model: int = 2048
    num_heads: int = 4
    dim_feedforward: int = 8192
    enc_layers: int = 1
    dec_layers: int = 2
    dropout: float = 0.1
    normalize_before: bool = False  # pre-norm instead of DETR's post-norm
    decoder_self_attention: bool = False  # the official code removes it; the paper's figure has it
    input_proj: bool = False  # 1x1 conv C -> d; off in the official R101 recipe (d = C = 2048)
    frozen_bn: bool = True
    freeze_stem: bool = True
    position: str = "sine"  # or "learned"
    output_stride: int | None = None  # 8 or 16: finer grid (dilated last stages); None: the backbone's
    feature_stage: int | None = None  # e.g. 2: stop after that stage (ResNet layer2: stride 8); None: all
    fold_bn: bool = False  # fold frozen BN into the convolutions (needs frozen_bn; see stage 2)


PRESETS = {
    # The official R101 recipe (SlongLiu/query2labels), from the torchvision ImageNet weights it starts
    # from (resnet101.tv_in1k; timm's plain "resnet101" is a later recipe).
    "official_r101": Q2LConfig(backbone="resnet101.tv_in1k", pretrained=True),
    # From scratch on the built-in set in CPU minutes: timm's 0.4M-parameter test_resnet up to its second
    # stage (stride 8: an 8x8 grid at 64 px, so attention maps show where); BN and stem train too; no dropout.
    "demo": Q2LConfig(backbone="test_resnet", d_model=128, num_heads=4, dim_feedforward=512, feature_stage=2,
                      dropout=0.0, input_proj=True, frozen_bn=False, freeze_stem=False),
}


class Query2Label(nn.Module):
    """images (B, 3, S, S) -> backbone (B, C, H, W) -> projection (B, d, H, W) + sine position
    -> encoder over N = H*W tokens -> decoder with K label queries -> GroupWiseLinear -> logits (B, K).
    Logits are raw scores: sigmoid (never softmax: labels are not exclusive) in the loss and at
    prediction. As the official code: no decoder self-attention, no input projection for R101. Unlike
    it: position encoding per input size, attention maps from the same pass, separate q/k/v weights."""

    def __init__(self, config: Q2LConfig):
        super().__init__()
        c = self.config = config
        self.backbone = backbone.Backbone(c.backbone, pretrained=c.pretrained, weights=c.weights,
                                          frozen_bn=c.frozen_bn, freeze_stem=c.freeze_stem,
                                          output_stride=c.output_stride, feature_stage=c.feature_stage,
                                          fold_bn=c.fold_bn)
        self.input_proj = backbone.make_projection(self.backbone.num_channels, c.d_model, c.input_proj)
        self.position = backbone.build_position_encoding(c.position, c.d_model)
        self.transformer = Transformer(c.d_model, c.num_heads, c.enc_layers, c.dec_layers, c.dim_feedforward,
                                       c.dropout, normalize_before=c.normalize_before,
                                       decoder_self_attention=c.decoder_self_attention)
        self.query_embed = nn.Embedding(c.num_classes, c.d_model)
        self.fc = GroupWiseLinear(c.num_classes, c.d_model)

    def forward(self, images, return_attention=False):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, S, S), got {tuple(images.shape)}")
        return self.forward_head(self.backbone(images), return_attention)

    def forward_head(self, features, return_attention=False):
        """After the backbone: features (B, C, H, W) -> logits (B, K) [, attention (B, K, H, W)]."""
        x = self.input_proj(features)  # (B, d, H, W)
        B, d, H, W = x.shape
        src = x.flatten(2).transpose(1, 2)  # (B, N, d)
        pos = self.position(x).flatten(2).transpose(1, 2)  # (1, N, d)
        hs, attention = self.transformer(src, query_pos=self.query_embed.weight, pos=pos,
                                         need_weights=return_attention)  # (B, K, d), (B, K, N)
        logits = self.fc(hs)  # (B, K)
        return (logits, attention.view(B, -1, H, W)) if return_attention else logits  # (B, K, H, W)


# * Self-check ----------------------------------------------------------------------------------
def max_diff(a, b):
    return (a.detach() - b.detach()).abs().max().item()


def self_check():
    """Parity with torch.nn in float64, weights copied across, dropout 0; then the demo model."""
    torch.manual_seed(0)
    d, h, B, f64 = 32, 4, 2, dict(dtype=torch.float64)
    print("max |ours - torch.nn|, float64, weights copied across (0 = bit-identical: the same operations)")
    ref, ours = nn.MultiheadAttention(d, h, batch_first=True, **f64), MultiHeadAttention(d, h).double()
    ours.load_from_torch(ref)
    q, kv = torch.randn(B, 5, d, **f64, requires_grad=True), torch.randn(B, 7, d, **f64, requires_grad=True)
    out_ref, w_ref = ref(q, kv, kv, average_attn_weights=False)
    out, w = ours(q, kv, kv, need_weights=True, average_weights=False)
    grads_ref = torch.autograd.grad(out_ref.sum(), [q, kv, ref.in_proj_weight])
    projections = [ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]
    grads = torch.autograd.grad(out.sum(), [q, kv, *projections])
    grads = list(grads[:2]) + [torch.cat(grads[2:])]  # (3d, d), as torch's packed in_proj_weight
    print(f"attention, explicit vs nn.MultiheadAttention: output {max_diff(out, out_ref):.1e}, per-head "
          f"weights {max_diff(w, w_ref):.1e}, gradients {max(map(max_diff, grads, grads_ref)):.1e}")
    print(f"attention, fused vs explicit:                 output {max_diff(ours(q, kv, kv)[0], out):.1e}")
    x, tgt = torch.randn(B, 12, d, **f64), torch.randn(B, 6, d, **f64)
    for pre in (False, True):
        kw = dict(batch_first=True, norm_first=pre, **f64)
        enc_ref, enc = (nn.TransformerEncoderLayer(d, h, 64, 0.0, **kw),
                        TransformerEncoderLayer(d, h, 64, 0.0, normalize_before=pre))
        dec_ref, dec = (nn.TransformerDecoderLayer(d, h, 64, 0.0, **kw),
                        TransformerDecoderLayer(d, h, 64, 0.0, normalize_before=pre, self_attention=True))
        for ref, ours in ((enc_ref, enc), (dec_ref, dec)):
            ours.double().load_state_dict(split_in_proj(ref.state_dict()))
        print(f"{'pre' if pre else 'post'}-norm encoder layer vs nn.TransformerEncoderLayer: "
              f"{max_diff(enc(x), enc_ref(x)):.1e}, decoder layer vs nn.TransformerDecoderLayer: "
              f"{max_diff(dec(tgt, x)[0], dec_ref(tgt, x)):.1e}")
    ref = nn.Transformer(d, h, 1, 2, 64, 0.0, batch_first=True, **f64)
    ours = Transformer(d, h, 1, 2, 64, 0.0, decoder_self_attention=True, encoder_norm=True).double()
    ours.load_state_dict(split_in_proj(ref.state_dict()))
    print("encoder-decoder vs nn.Transformer (1 + 2 layers, post-norm): "
          f"{max_diff(ours(x, tgt=tgt)[0], ref(x, tgt)):.1e}")

    config = dataclasses.replace(PRESETS["demo"], num_classes=20)
    model, images = Query2Label(config).eval(), torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        logits, attention = model(images, return_attention=True)
    count, in_backbone = (sum(p.numel() for p in m.parameters()) for m in (model, model.backbone))
    print(f"demo model ({config.backbone}, d {config.d_model}, K {config.num_classes}): {count:,} parameters "
          f"({count - in_backbone:,} after the backbone); images {tuple(images.shape)} -> logits "
          f"{tuple(logits.shape)}, attention {tuple(attention.shape)}")


if __name__ == "__main__":
    argparse.ArgumentParser(description="Stage 3 self-check: parity with torch.nn, then the demo model.",
                            allow_abbrev=False).parse_args()
    started = time.perf_counter()
    self_check()
    print(f"\ndone in {time.perf_counter() - started:.1f} s")
