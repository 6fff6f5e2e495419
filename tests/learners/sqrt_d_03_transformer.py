"""A learner's multi-head attention for stage 3 with one classic slip: scores divided by sqrt(d), the
model width, instead of sqrt(dh), the head width. Used by tests/test_learner_mode.py.

Written from the lesson's docstring as a learner would (explicit path only, no fused kernel); the
rest of the stage is not written yet, so its tests skip ("does not define ... yet"). The first
failure must name the scores, show the inputs, expected and obtained values and the sqrt(dh) hint.
"""

import math

import torch
from torch import nn


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, num_heads, dropout=0.0, bias=True):
        super().__init__()
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.dropout, self.fused = dropout, False
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d_model, d_model, bias=bias)
                                                                for _ in range(4))

    def forward(self, query, key, value, need_weights=False, average_weights=True,
                attn_mask=None, key_padding_mask=None):
        B, Lq, d = query.shape
        Lk, h, dh = key.shape[1], self.num_heads, self.head_dim
        q = self.q_proj(query).view(B, Lq, h, dh).transpose(1, 2)  # (B, h, Lq, dh)
        k = self.k_proj(key).view(B, Lk, h, dh).transpose(1, 2)  # (B, h, Lk, dh)
        v = self.v_proj(value).view(B, Lk, h, dh).transpose(1, 2)  # (B, h, Lk, dh)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # the slip: sqrt(d), not sqrt(dh)
        if attn_mask is not None:
            mask = attn_mask.view(-1, h, Lq, Lk) if attn_mask.dim() == 3 else attn_mask
            scores = scores.masked_fill(mask, -math.inf) if mask.dtype == torch.bool else scores + mask
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
        weights = scores.softmax(dim=-1)  # (B, h, Lq, Lk)
        p = self.dropout if self.training else 0.0
        out = nn.functional.dropout(weights, p) @ v  # (B, h, Lq, dh)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Lq, d))
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_weights else weights
