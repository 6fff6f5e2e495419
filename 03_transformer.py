"""Stage 3: hand-written multi-head attention, the DETR-style transformer and the Query2Label model.

Paper: Liu et al. 2021, "Query2Label", sec. 3.1-3.2 (Fig. 2): backbone features + 2D position
encoding -> transformer encoder -> a decoder whose K queries are learnable *label embeddings*, one
per class -> one linear classifier per class -> K logits. Attention follows Vaswani et al. 2017,
sec. 3.2; the encoder/decoder layers follow DETR (Carion et al. 2020) as the official code does.

Run:  python 03_transformer.py              parity checks against torch.nn (max abs differences),
                                            then the demo model's size and output shape
      python 03_transformer.py --benchmark  attention and whole-head speed, as ratios to torch.nn
Next: 04_loss.py turns the K logits into the asymmetric loss.

Shapes (batch-first everywhere; nn.MultiheadAttention and DETR default to sequence-first):
B batch, C backbone channels, H x W feature map, N = H*W tokens, K labels/queries, d model width,
h heads, dh = d / h head width, Lq / Lk query / key lengths.
"""

import argparse
import copy
import dataclasses
import importlib
import math
import statistics
import time
from pathlib import Path

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
    so the softmax is not saturated (and its gradient not vanishing) at initialisation. M is the
    mask: 0 where attending is allowed, -inf where not (torch's convention: a True entry in a
    boolean mask means "may NOT attend"; a float mask is added to the scores).

    Two paths, same parameters: the explicit one below (the equations, line by line; it can return
    the attention weights) and F.scaled_dot_product_attention (fused, faster, less memory), used
    when `self.fused` is True and no weights are asked for.

    Deviations from nn.MultiheadAttention: batch-first only; separate q/k/v projections instead of
    one packed `in_proj_weight` (`load_from_torch` / `copy_to_torch` / `split_in_proj` convert);
    no bias_k / bias_v / add_zero_attn / kdim / vdim; the weights returned are taken before
    attention dropout (torch returns them after), so they always sum to 1 over keys.
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
        for packed, kind in (("in_proj_weight", "weight"), ("in_proj_bias", "bias")):
            if key.endswith(packed):
                prefix = key[: -len(packed)]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3), strict=True):
                    out[f"{prefix}{name}.{kind}"] = part
                break
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

        post-norm (default, DETR / official):  x = LN(x + Attn(x + pos, x + pos, x));  x = LN(x + FFN(x))
        pre-norm (normalize_before=True):      y = LN(x);  x = x + Attn(y + pos, y + pos, y);  x = x + FFN(LN(x))
        FFN(x) = linear2(dropout(relu(linear1(x))))

    Why: attention lets every image token gather context from all others (global reasoning a CNN's
    receptive field lacks); the FFN then transforms each token on its own. Post-norm is what the
    official weights were trained with; pre-norm keeps the residual path clean and trains deep
    stacks more stably.

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

    def forward(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
        """src (B, N, d), pos (1 or B, N, d) or None -> (B, N, d)."""
        pre = self.normalize_before
        x = self.norm1(src) if pre else src
        q = k = with_pos(x, pos)
        x = self.self_attn(q, k, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask)[0]
        src = src + self.dropout1(x)
        src = src if pre else self.norm1(src)
        x = self.norm2(src) if pre else src
        src = src + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        return src if pre else self.norm2(src)


class TransformerDecoderLayer(nn.Module):
    """One decoder layer: [self-attention among the K queries], cross-attention from the queries to
    the N image tokens, then a feed-forward network; residual + LayerNorm around each (post- or pre-norm).

        cross-attention:  Attn(tgt + query_pos, memory + pos, memory)   -> weights (B, Lq, N)

    Why: the queries (label embeddings in Query2Label) compare themselves with every image token
    and pool the values of the tokens that match: each label looks for its own evidence.

    Deviations: self-attention is OFF by default (self_attention=False, as the official code's
    default `rm_self_attn_dec`; the paper's Fig. 2 and nn.TransformerDecoderLayer have it; without
    it there is no `self_attn` / `norm1`, matching the official state dict). `pos` / `query_pos` are
    added to queries and keys at every layer (DETR). forward returns (tgt, cross-attention weights
    or None) instead of a tensor, so the attention maps come from the same forward pass.
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

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, pos=None, query_pos=None, need_weights=False):
        """tgt (B, Lq, d), memory (B, N, d), pos (1 or B, N, d), query_pos (1 or B, Lq, d)
        -> (tgt (B, Lq, d), cross-attention weights (B, Lq, N) averaged over heads, or None)."""
        pre = self.normalize_before
        if self.self_attn is not None:
            x = self.norm1(tgt) if pre else tgt
            q = k = with_pos(x, query_pos)
            x = self.self_attn(q, k, x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask)[0]
            tgt = tgt + self.dropout1(x)
            tgt = tgt if pre else self.norm1(tgt)
        x = self.norm2(tgt) if pre else tgt
        x, weights = self.multihead_attn(with_pos(x, query_pos), with_pos(memory, pos), memory,
                                         need_weights=need_weights, attn_mask=memory_mask,
                                         key_padding_mask=memory_key_padding_mask)
        tgt = tgt + self.dropout2(x)
        tgt = tgt if pre else self.norm2(tgt)
        x = self.norm3(tgt) if pre else tgt
        tgt = tgt + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        return (tgt if pre else self.norm3(tgt)), weights


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

    Deviations from nn.Transformer: position encodings `pos` (image tokens) and `query_pos`
    (label embeddings) are added to queries and keys in every attention; the decoder input `tgt`
    defaults to zeros (the queries' identity lives in query_pos); the encoder's final LayerNorm
    exists only with pre-norm (DETR; nn.Transformer always has one: pass encoder_norm=True);
    decoder self-attention is off by default (official code); Xavier init on all matrices (DETR).
    Deviation from DETR: only the last decoder layer's output is returned (no auxiliary outputs).
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
        if tgt is None:
            if query_pos is None:
                raise ValueError("Transformer needs the decoder queries: pass query_pos (K, d) or tgt (B, K, d)")
            tgt = src.new_zeros(src.shape[0], query_pos.shape[1], self.d_model)  # (B, K, d)
        return self.decoder(tgt, memory, need_weights=need_weights, pos=pos, query_pos=query_pos,
                            memory_key_padding_mask=src_key_padding_mask)


class GroupWiseLinear(nn.Module):
    """One linear classifier per label:  logit_k = <W_k, h_k> + b_k,   W (1, K, d), b (1, K).

    Why not one nn.Linear(K*d, K) over all decoded queries? It would let every query vote on every
    class; here query k alone decides label k, so label embedding k is pushed to find the evidence
    for its own class, wherever it is in the image.
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


PRESETS = {
    # The official ResNet-101 recipe (SlongLiu/query2labels), with ImageNet weights for training.
    # resnet101.tv_in1k: the torchvision ImageNet weights the official code starts from (timm's
    # plain "resnet101" tag is a different, later training recipe).
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
    default (the official code's default); the official R101 recipe has no input projection.
    From the official code: the position encoding is recomputed for every input size (the official
    buffer is fixed to one size); attention maps on request from the same forward pass; separate
    q/k/v weights (load_official_checkpoint converts).
    """

    def __init__(self, config: Q2LConfig):
        super().__init__()
        c = self.config = config
        self.backbone = backbone.Backbone(c.backbone, pretrained=c.pretrained, weights=c.weights,
                                          frozen_bn=c.frozen_bn, freeze_stem=c.freeze_stem)
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


# * Official checkpoints (github.com/SlongLiu/query2labels) --------------------------------------

def convert_official_state_dict(state_dict):
    """An official Query2Label state dict -> (our state dict, report).

        official key                                         our key
        module.<key>  (saved from DistributedDataParallel)   <key>
        backbone.0.body.<torchvision ResNet key>             backbone.body.<same key: timm = torchvision>
        backbone.1.pe  (position buffer for one input size)  dropped: recomputed for every input size
        *.in_proj_weight (3d, d), *.in_proj_bias (3d,)       *.q_proj.*, *.k_proj.*, *.v_proj.*
        *.num_batches_tracked  (BatchNorm step counters)     dropped: not weights
        transformer.*, input_proj.*, query_embed.weight, fc.W, fc.b                      unchanged
    A {"state_dict": ...} or {"model": ...} wrapper is unwrapped first. The report lists the
    wrapper used, the keys dropped on purpose and the keys that could not be placed ("unplaced"),
    e.g. DETR's learned position tables (backbone.1.row_embed/col_embed: x-first channel order and
    50 rows there, which our stage-2 PositionEmbeddingLearned cannot reproduce).
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"expected a state dict (a dict of tensors), got {type(state_dict).__name__}")
    if state_dict.get("format") == "q2l-checkpoint-v1":
        raise ValueError("this is one of this project's own checkpoints, not an official one: "
                         "load it with model.load_state_dict(checkpoint['model'])")
    report = {"wrapper": None, "dropped": [], "unplaced": []}
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict, report["wrapper"] = state_dict[wrapper], wrapper
            break
    ours = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith("module."):
            name = name[len("module."):]
        if not torch.is_tensor(value):
            report["unplaced"].append(key)
        elif name.endswith("num_batches_tracked") or name == "backbone.1.pe":
            report["dropped"].append(key)
        elif name.startswith("backbone.0."):
            ours["backbone." + name[len("backbone.0."):]] = value
        elif name.startswith(("transformer.", "input_proj.", "query_embed.", "fc.")):
            ours[name] = value
        else:
            report["unplaced"].append(key)
    return split_in_proj(ours), report


def load_official_checkpoint(model, path, strict=True, trusted=False):
    """Load an official checkpoint file into `model`, a Query2Label built with the matching config
    (for the released R101 files: replace(PRESETS["official_r101"], num_classes=80, pretrained=False)).

    Shape mismatches always raise ValueError naming every such key, and nothing is loaded. With
    strict=True (default) a key that could not be placed or a model key left unfilled raises too;
    with strict=False they are only reported. Returns the report of convert_official_state_dict plus
    "missing" (model keys the file did not fill) and "unexpected" (converted keys the model lacks).
    trusted=True allows pickled non-tensor objects (torch.load(weights_only=False)): only for files
    whose source you trust.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as error:
        raise ValueError(f"could not read {path} as a PyTorch checkpoint: {error}\n(if it holds "
                         "non-tensor objects and you trust its source, pass trusted=True)") from error
    ours, report = convert_official_state_dict(checkpoint)
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
             for k, v in ours.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} tensors do not fit this model (check num_classes, d_model, "
                         "backbone, input_proj):\n  " + "\n  ".join(wrong))
    report["missing"] = sorted(set(own) - set(ours))
    report["unexpected"] = sorted(set(ours) - set(own))
    problems = [f"{kind}: {key}" for kind in ("unplaced", "unexpected", "missing") for key in report[kind]]
    if strict and problems:
        raise ValueError(f"{path}: {len(problems)} keys do not match this model (strict=False loads the "
                         "rest and reports them):\n  " + "\n  ".join(problems))
    model.load_state_dict({k: v for k, v in ours.items() if k in own}, strict=False)
    return report


# * Self-check and benchmark ---------------------------------------------------------------------

def max_diff(a, b):
    return (a.detach() - b.detach()).abs().max().item()


def self_check():
    """Parity with torch.nn on small float64 shapes, weights copied across, dropout 0."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    d, h, B = 32, 4, 2
    print("max |ours - torch.nn|, float64, weights copied across (0 = bit-identical: the same operations)")
    ref = nn.MultiheadAttention(d, h, batch_first=True, **f64)
    ours = MultiHeadAttention(d, h).double()
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
        ref = nn.TransformerEncoderLayer(d, h, 64, 0.0, batch_first=True, norm_first=pre, **f64)
        ours = TransformerEncoderLayer(d, h, 64, 0.0, normalize_before=pre).double()
        ours.load_state_dict(split_in_proj(ref.state_dict()))
        enc = max_diff(ours(x), ref(x))
        ref = nn.TransformerDecoderLayer(d, h, 64, 0.0, batch_first=True, norm_first=pre, **f64)
        ours = TransformerDecoderLayer(d, h, 64, 0.0, normalize_before=pre, self_attention=True).double()
        ours.load_state_dict(split_in_proj(ref.state_dict()))
        dec = max_diff(ours(tgt, x)[0], ref(tgt, x))
        print(f"{'pre' if pre else 'post'}-norm encoder layer vs nn.TransformerEncoderLayer: {enc:.1e}, "
              f"decoder layer vs nn.TransformerDecoderLayer: {dec:.1e}")
    ref = nn.Transformer(d, h, 1, 2, 64, 0.0, batch_first=True, **f64)
    ours = Transformer(d, h, 1, 2, 64, 0.0, decoder_self_attention=True, encoder_norm=True).double()
    ours.load_state_dict(split_in_proj(ref.state_dict()))
    diff = max_diff(ours(x, tgt=tgt)[0], ref(x, tgt))
    print(f"encoder-decoder vs nn.Transformer (1 + 2 layers, post-norm): {diff:.1e}")

    config = dataclasses.replace(PRESETS["demo"], num_classes=20)
    model = Query2Label(config).eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        logits, attention = model(images, return_attention=True)
    count = sum(p.numel() for p in model.parameters())
    head = count - sum(p.numel() for p in model.backbone.parameters())
    print(f"demo model ({config.backbone}, d {config.d_model}, K {config.num_classes}): {count:,} parameters "
          f"({head:,} after the backbone); images {tuple(images.shape)} -> logits {tuple(logits.shape)}, "
          f"attention {tuple(attention.shape)}")


class TorchAttention(nn.Module):
    """nn.MultiheadAttention behind our forward signature: the reference in the benchmark."""

    def __init__(self, ours, need_weights_default):
        super().__init__()
        self.mha = nn.MultiheadAttention(ours.d_model, ours.num_heads, ours.dropout, batch_first=True)
        ours.copy_to_torch(self.mha)
        self.need_weights_default = need_weights_default

    def forward(self, query, key, value, need_weights=False, average_weights=True, attn_mask=None,
                key_padding_mask=None):
        return self.mha(query, key, value, need_weights=need_weights or self.need_weights_default,
                        attn_mask=attn_mask, key_padding_mask=key_padding_mask)


def with_torch_attention(module, need_weights_default=False):
    """A copy of `module` whose MultiHeadAttention layers are nn.MultiheadAttention with the same weights."""
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, MultiHeadAttention):
                setattr(parent, name, TorchAttention(child, need_weights_default))
    return module


def time_interleaved(candidates, repeats):
    """Seconds of one call per candidate, {name: [(wall, cpu) per round]}, over `repeats` rounds.

    Each round runs every candidate once, back to back in a rotated order, so a noisy spell on a
    shared machine hits them all; ratios are then taken within a round (see `ratio`). `cpu` is this
    process's CPU time (all threads): it counts the work done rather than the time spent waiting
    for a core, so it is the steadier figure on a busy machine; on a quiet machine the two agree."""
    times = {name: [] for name in candidates}
    names = list(candidates)
    for round_ in range(repeats + 1):  # round 0 warms up
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            wall, cpu = time.perf_counter(), time.process_time()
            candidates[name]()
            if round_:
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def show(times):
    wall, cpu = (statistics.median(x) * 1e3 for x in zip(*times, strict=True))
    return f"{wall:7.0f} ms wall {cpu:7.0f} ms cpu"


def ratio(times, reference):
    """Median over rounds of the per-round ratio: robust to the machine's load drifting during a run."""
    wall, cpu = (statistics.median(a[i] / b[i] for a, b in zip(times, reference, strict=True)) for i in (0, 1))
    return f"{wall:.3f} wall, {cpu:.3f} cpu"


def benchmark(repeats, batch):
    """Forward+backward times in training mode (dropout 0.1), ours against nn.MultiheadAttention."""
    torch.manual_seed(0)
    d, h, N = 2048, 4, 196  # the official R101 head at 448 px: 14 x 14 tokens
    print(f"fp32 CPU, {torch.get_num_threads()} threads, batch {batch}, training mode (dropout 0.1), "
          f"forward+backward; medians of {repeats} interleaved rounds (ratios: median of the per-round ratios), "
          "wall-clock / process CPU time")
    fused = MultiHeadAttention(d, h, dropout=0.1)
    explicit = copy.deepcopy(fused)
    explicit.fused = False
    candidates = {"nn.MHA(need_weights=False)": with_torch_attention(nn.Sequential(fused))[0],
                  "nn.MHA(need_weights=True)": with_torch_attention(nn.Sequential(fused), True)[0],
                  "ours explicit": explicit, "ours fused": fused}
    for title, Lq in (("cross-attention: 80 label queries over 196 tokens", 80),
                      ("encoder self-attention over 196 tokens", N)):
        memory, pos = torch.randn(batch, N, d, requires_grad=True), torch.randn(1, N, d)
        labels, query_pos = torch.randn(batch, Lq, d, requires_grad=True), torch.randn(1, Lq, d)

        def step(attention):
            def run():  # called exactly as our encoder / decoder layers call it
                k = memory + pos
                q = k if Lq == N else labels + query_pos
                attention(q, k, memory, need_weights=attention is explicit)[0].sum().backward()
            return run

        t = time_interleaved({name: step(a) for name, a in candidates.items()}, repeats)
        print(f"\n{title}, width {d}, {h} heads")
        for name in candidates:
            print(f"  {name:27s} {show(t[name])}")
        for name, target in (("ours explicit", 1.15), ("ours fused", 1.0)):
            print(f"  {name} / nn.MHA(need_weights=False): {ratio(t[name], t['nn.MHA(need_weights=False)'])} "
                  f"(target <= {target});  / nn.MHA(need_weights=True), as DETR and the official code "
                  f"call it: {ratio(t[name], t['nn.MHA(need_weights=True)'])}")

    print(f"\nwhole head after the backbone (projection, position, encoder, decoder, classifier), "
          f"80 classes, {N} tokens (a 448 px image at stride 32):")
    for preset in ("official_r101", "demo"):
        config = dataclasses.replace(PRESETS[preset], num_classes=80, pretrained=False)
        model = Query2Label(config).train()
        features = torch.randn(batch, model.backbone.num_channels, 14, 14, requires_grad=True)
        models = {"ours": model, "torch": with_torch_attention(model)}
        t = time_interleaved({k: lambda m=m: m.forward_head(features).sum().backward() for k, m in models.items()},
                             repeats)
        params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.backbone.parameters())
        per_image = statistics.median(wall for wall, _ in t["ours"]) * 1e3 / batch
        print(f"  {preset} (d {config.d_model}, ff {config.dim_feedforward}, {params / 1e6:.1f} M parameters): "
              f"{show(t['ours'])} per batch of {batch} ({per_image:.0f} ms wall per image);"
              f" / the same head on nn.MultiheadAttention: {ratio(t['ours'], t['torch'])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Stage 3 self-check (parity with torch.nn) or benchmark.")
    parser.add_argument("--benchmark", action="store_true",
                        help="time attention and the whole head against torch.nn instead (a few minutes)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per candidate (default 5)")
    parser.add_argument("--batch", type=int, default=16, help="batch size for the benchmark (default 16)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's choice); 1 gives steadier figures on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    benchmark(args.repeats, args.batch) if args.benchmark else self_check()
    print(f"\ndone in {time.perf_counter() - started:.1f} s")
