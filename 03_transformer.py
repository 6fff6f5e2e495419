"""Stage 3: hand-written multi-head attention, the DETR-style transformer and the Query2Label model.

Paper: Liu et al. 2021, "Query2Label", sec. 3.1-3.2 (Fig. 2): backbone features + 2D position
encoding -> transformer encoder -> a decoder whose K queries are learnable *label embeddings*, one
per class -> one linear classifier per class -> K logits. Attention follows Vaswani et al. 2017,
sec. 3.2; the encoder/decoder layers follow DETR (Carion et al. 2020) as the official code does.

Run:  python 03_transformer.py   parity checks against torch.nn (max abs differences), the demo model
Tools: tools/bench_transformer.py (speed vs torch.nn), tools/official.py (official checkpoints),
       tools/export.py (torch.export and ONNX)
Next: 04_loss.py turns the K logits into the asymmetric loss.

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

    Why: each head compares queries with keys in its own dh-dimensional subspace, so one layer can
    look for several things at once; dividing by sqrt(dh) keeps the dot products near unit scale,
    so the softmax is not saturated at initialisation. M is the mask: 0 where attending is allowed,
    -inf where not (torch's convention: True in a boolean mask means "may NOT attend").

    Two paths, same parameters: the explicit one (the equations, line by line; it can return the
    weights) and F.scaled_dot_product_attention (fused), used when `self.fused` and no weights asked.

    Deviations from nn.MultiheadAttention: batch-first; separate q/k/v projections, not one packed
    `in_proj_weight` (split_in_proj / pack_in_proj convert); no bias_k / bias_v / add_zero_attn /
    kdim / vdim; weights returned before attention dropout (torch: after), so they sum to 1.
    """

    def __init__(self, d_model, num_heads, dropout=0.0, bias=True):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.dropout, self.fused = dropout, True
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.reset_parameters()

    def reset_parameters(self):
        # As nn.MultiheadAttention (hence DETR and the official code): Xavier over the packed (3d, d)
        # in-projection, zero biases; Xavier on the output projection as DETR re-initialises it.
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
        attn_mask: (Lq, Lk) or (B*h, Lq, Lk); key_padding_mask: (B, Lk); bool (True = masked) or float.
        """
        B, Lq, d = query.shape
        Lk, h, dh = key.shape[1], self.num_heads, self.head_dim
        q = self.q_proj(query).view(B, Lq, h, dh).transpose(1, 2)  # (B, h, Lq, dh)
        k = self.k_proj(key).view(B, Lk, h, dh).transpose(1, 2)  # (B, h, Lk, dh)
        v = self.v_proj(value).view(B, Lk, h, dh).transpose(1, 2)  # (B, h, Lk, dh)
        mask = self._additive_mask(attn_mask, key_padding_mask, B, Lq, Lk, q.dtype)
        p = self.dropout if self.training else 0.0
        if self.fused and not need_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, h, Lq, dh)
            weights = None
        else:
            scores = (q * dh**-0.5) @ k.transpose(-2, -1)  # (B, h, Lq, dh) @ (B, h, dh, Lk) -> (B, h, Lq, Lk)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)  # (B, h, Lq, Lk), each row sums to 1 over keys
            out = F.dropout(weights, p) @ v  # (B, h, Lq, Lk) @ (B, h, Lk, dh) -> (B, h, Lq, dh)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Lq, d))  # heads side by side: (B, Lq, h*dh)
        if weights is not None and average_weights:
            weights = weights.mean(dim=1)  # (B, Lq, Lk)
        return out, weights

    def _additive_mask(self, attn_mask, key_padding_mask, B, Lq, Lk, dtype):
        """Both masks as one float tensor broadcastable to (B, h, Lq, Lk), or None."""
        def additive(mask):
            if mask.dtype == torch.bool:
                return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
            return mask.to(dtype)

        mask = None
        if attn_mask is not None:
            shape = (1, 1, Lq, Lk) if attn_mask.dim() == 2 else (B, self.num_heads, Lq, Lk)
            mask = additive(attn_mask).view(shape)  # (1 or B, 1 or h, Lq, Lk)
        if key_padding_mask is not None:
            padding = additive(key_padding_mask).view(B, 1, 1, Lk)  # (B, 1, 1, Lk)
            mask = padding if mask is None else mask + padding
        return mask

    @torch.no_grad()
    def load_from_torch(self, mha):
        """Copy weights from an nn.MultiheadAttention (packed in_proj) into this module."""
        self.load_state_dict(split_in_proj(mha.state_dict()))

    @torch.no_grad()
    def copy_to_torch(self, mha):
        """Copy this module's weights into an nn.MultiheadAttention (packed in_proj)."""
        mha.load_state_dict(pack_in_proj(self.state_dict()))


def split_in_proj(state):
    """State dict with nn.MultiheadAttention's packed `*in_proj_weight` (3d, d) / `*in_proj_bias`
    (3d,) -> ours with `*q_proj.*`, `*k_proj.*`, `*v_proj.*` (rows [0:d], [d:2d], [2d:3d])."""
    out = {}
    for key, value in state.items():
        prefix, packed, kind = key.rpartition("in_proj_")  # "a.self_attn.in_proj_weight" -> "a.self_attn.", "weight"
        if packed and kind in ("weight", "bias"):
            out.update({f"{prefix}{n}_proj.{kind}": part for n, part in zip("qkv", value.chunk(3), strict=True)})
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
    """One encoder layer: self-attention among the N image tokens, then a feed-forward network.

        post-norm (default, DETR / official):  x = LN1(x + Attn(x + pos, x + pos, x));  x = LN2(x + FFN(x))
        pre-norm (normalize_before=True):      y = LN1(x);  x = x + Attn(y + pos, y + pos, y);  x = x + FFN(LN2(x))
        FFN(x) = linear2(dropout(relu(linear1(x))))

    Why: attention lets every image token gather context from all others (global reasoning a CNN's
    receptive field lacks); the FFN transforms each token on its own. Post-norm: what the official
    weights were trained with; pre-norm: a clean residual path, more stable for deep stacks.
    `forward_post` and `forward_pre` transcribe the two lines; `forward` picks one.

    Deviations from nn.TransformerEncoderLayer: a `pos` argument added to queries and keys at this
    layer (DETR); batch-first only; no fast inference path.
    """

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
    """One decoder layer: [self-attention among the K queries], cross-attention from the queries to
    the N image tokens, then a feed-forward network; residual + LayerNorm around each.

        post-norm (default):  t = LN1(t + SelfAttn(t + qpos, t + qpos, t))     [only with self_attention]
                              t = LN2(t + Attn(t + qpos, m + pos, m));   t = LN3(t + FFN(t))
        pre-norm:             y = LN1(t);  t = t + SelfAttn(y + qpos, y + qpos, y)   [only with self_attention]
                              y = LN2(t);  t = t + Attn(y + qpos, m + pos, m);   t = t + FFN(LN3(t))
    t: the K label queries (B, Lq, d); m: the encoder's memory (B, N, d). Attn's weights (B, Lq, N),
    averaged over heads, are Query2Label's attention maps.

    Why: the queries (label embeddings in Query2Label) compare themselves with every image token
    and pool the values of the tokens that match: each label looks for its own evidence.

    Deviations: self-attention OFF by default (the official `rm_self_attn_dec`; the paper's Fig. 2
    and nn.TransformerDecoderLayer have it; without it no `self_attn` / `norm1`, as the official
    state dict); `pos` / `query_pos` at every layer (DETR); returns (tgt, weights or None).
    """

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
        """tgt (B, Lq, d), memory (B, N, d), pos (1 or B, N, d), query_pos (1 or B, Lq, d), masks as torch's
        -> (tgt (B, Lq, d), cross-attention weights (B, Lq, N) averaged over heads, or None)."""
        if unknown := set(masks) - {"tgt_mask", "memory_mask", "tgt_key_padding_mask", "memory_key_padding_mask"}:
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
        weights = None
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            tgt, weights = layer(tgt, memory, need_weights=need_weights and last, **kwargs)
        return (tgt if self.norm is None else self.norm(tgt)), weights


class Transformer(nn.Module):
    """DETR's encoder-decoder, batch-first: encoder over image tokens, decoder over K queries.

    Deviations from nn.Transformer: `pos` / `query_pos` added to queries and keys in every
    attention; decoder input `tgt` zeros by default (the queries' identity lives in query_pos);
    encoder final LayerNorm only with pre-norm (DETR; encoder_norm=True as nn.Transformer);
    no decoder self-attention by default; Xavier init (DETR). From DETR: no auxiliary outputs.
    """

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.1, activation="relu", normalize_before=False,
                 decoder_self_attention=False, encoder_norm=None):
        super().__init__()
        args = (d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        encoder_norm = normalize_before if encoder_norm is None else encoder_norm
        self.encoder = TransformerEncoder([TransformerEncoderLayer(*args) for _ in range(num_encoder_layers)],
                                          nn.LayerNorm(d_model) if encoder_norm else None)
        self.decoder = TransformerDecoder([TransformerDecoderLayer(*args, self_attention=decoder_self_attention)
                                           for _ in range(num_decoder_layers)], nn.LayerNorm(d_model))
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
    here query k alone decides label k, so label embedding k must find its own class's evidence.
    """

    def __init__(self, num_classes, d_model):
        super().__init__()
        bound = 1.0 / math.sqrt(d_model)  # the official init: uniform(-1/sqrt(d), 1/sqrt(d))
        self.W = nn.Parameter(torch.empty(1, num_classes, d_model).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(1, num_classes).uniform_(-bound, bound))

    def forward(self, hs):
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
    output_stride: int | None = None  # 8 or 16: finer feature grid (dilated last stages); None: the backbone's own
    feature_stage: int | None = None  # e.g. 2: features after that stage (ResNet layer2: stride 8); None: all stages
    fold_bn: bool = False  # fold frozen BN into the convolutions (needs frozen_bn; see stage 2)


PRESETS = {
    # The official ResNet-101 recipe (SlongLiu/query2labels), from the torchvision ImageNet weights
    # the official code starts from (resnet101.tv_in1k; timm's plain "resnet101" is a later recipe).
    "official_r101": Q2LConfig(backbone="resnet101.tv_in1k", pretrained=True),
    # Small and CPU-friendly, trained from scratch on the built-in dataset in minutes: timm's
    # 0.4M-parameter test_resnet; BatchNorm and stem must train too; no dropout in a run this short.
    "demo": Q2LConfig(backbone="test_resnet", d_model=128, num_heads=4, dim_feedforward=512,
                      dropout=0.0, input_proj=True, frozen_bn=False, freeze_stem=False),
}


class Query2Label(nn.Module):
    """images (B, 3, S, S) -> backbone (B, C, H, W) -> projection (B, d, H, W) + sine position
    -> encoder over N = H*W tokens -> decoder with K label queries -> GroupWiseLinear -> logits (B, K).

    The logits are raw scores: sigmoid is applied by the loss and at prediction, never softmax
    (labels are not mutually exclusive). Deviations from the paper: no decoder self-attention by
    default (official code); no input projection in the official R101 recipe. From the official
    code: position encoding per input size; attention maps from the same forward pass; separate
    q/k/v weights (tools/official.py converts official checkpoints); finer grids (stage 2).
    """

    def __init__(self, config: Q2LConfig):
        super().__init__()
        c = self.config = config
        self.backbone = backbone.Backbone(c.backbone, pretrained=c.pretrained, weights=c.weights,
                                          frozen_bn=c.frozen_bn, freeze_stem=c.freeze_stem,
                                          output_stride=c.output_stride, feature_stage=c.feature_stage,
                                          fold_bn=c.fold_bn)
        self.input_proj = backbone.make_projection(self.backbone.num_channels, c.d_model, enabled=c.input_proj)
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
        """Everything after the backbone: features (B, C, H, W) -> logits (B, K) [, attention (B, K, H, W)]."""
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
    """Parity with torch.nn on small float64 shapes, weights copied across, dropout 0; then the demo model."""
    torch.manual_seed(0)
    d, h, B, f64 = 32, 4, 2, dict(dtype=torch.float64)
    print("max |ours - torch.nn|, float64, weights copied across (0 = bit-identical: the same operations)")
    ref, ours = nn.MultiheadAttention(d, h, batch_first=True, **f64), MultiHeadAttention(d, h).double()
    ours.load_from_torch(ref)
    q, kv = torch.randn(B, 5, d, **f64, requires_grad=True), torch.randn(B, 7, d, **f64, requires_grad=True)
    out_ref, w_ref = ref(q, kv, kv, average_attn_weights=False)
    out, w = ours(q, kv, kv, need_weights=True, average_weights=False)
    grads_ref = torch.autograd.grad(out_ref.sum(), [q, kv, ref.in_proj_weight])
    grads = torch.autograd.grad(out.sum(), [q, kv, ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight])
    grads = list(grads[:2]) + [torch.cat(grads[2:])]  # (3d, d), as torch's packed in_proj_weight
    print(f"attention, explicit vs nn.MultiheadAttention: output {max_diff(out, out_ref):.1e}, per-head "
          f"weights {max_diff(w, w_ref):.1e}, gradients {max(map(max_diff, grads, grads_ref)):.1e}")
    print(f"attention, fused vs explicit:                 output {max_diff(ours(q, kv, kv)[0], out):.1e}")
    x, tgt = torch.randn(B, 12, d, **f64), torch.randn(B, 6, d, **f64)
    for pre in (False, True):
        pairs = [(nn.TransformerEncoderLayer(d, h, 64, 0.0, batch_first=True, norm_first=pre, **f64),
                  TransformerEncoderLayer(d, h, 64, 0.0, normalize_before=pre).double(), (x,)),
                 (nn.TransformerDecoderLayer(d, h, 64, 0.0, batch_first=True, norm_first=pre, **f64),
                  TransformerDecoderLayer(d, h, 64, 0.0, normalize_before=pre, self_attention=True).double(), (tgt, x))]
        diffs = []
        for ref, ours, args in pairs:
            ours.load_state_dict(split_in_proj(ref.state_dict()))
            out = ours(*args)
            diffs.append(max_diff(out[0] if isinstance(out, tuple) else out, ref(*args)))
        print(f"{'pre' if pre else 'post'}-norm encoder layer vs nn.TransformerEncoderLayer: {diffs[0]:.1e}, "
              f"decoder layer vs nn.TransformerDecoderLayer: {diffs[1]:.1e}")
    ref = nn.Transformer(d, h, 1, 2, 64, 0.0, batch_first=True, **f64)
    ours = Transformer(d, h, 1, 2, 64, 0.0, decoder_self_attention=True, encoder_norm=True).double()
    ours.load_state_dict(split_in_proj(ref.state_dict()))
    print(f"encoder-decoder vs nn.Transformer (1 + 2 layers, post-norm): {max_diff(ours(x, tgt=tgt)[0], ref(x, tgt)):.1e}")

    config = dataclasses.replace(PRESETS["demo"], num_classes=20)
    model, images = Query2Label(config).eval(), torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        logits, attention = model(images, return_attention=True)
    count = sum(p.numel() for p in model.parameters())
    head = count - sum(p.numel() for p in model.backbone.parameters())
    print(f"demo model ({config.backbone}, d {config.d_model}, K {config.num_classes}): {count:,} parameters "
          f"({head:,} after the backbone); images {tuple(images.shape)} -> logits {tuple(logits.shape)}, "
          f"attention {tuple(attention.shape)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Stage 3 self-check: parity with torch.nn, then the demo model.",
                                     allow_abbrev=False)
    parser.parse_args()
    started = time.perf_counter()
    self_check()
    print(f"\ndone in {time.perf_counter() - started:.1f} s")
