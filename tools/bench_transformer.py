"""Stage 3 benchmark: our attention and the whole Query2Label head against torch.nn, on the CPU.

    python tools/bench_transformer.py [--rounds 5] [--batch 16] [--threads 1]

Forward+backward in training mode (dropout 0.1): attention at the official R101 head's size
(d 2048, 4 heads, 196 tokens = a 448 px image at stride 32), our explicit and fused paths against
nn.MultiheadAttention with and without weights; then the whole head after the backbone, ours
against the same head with nn.MultiheadAttention swapped in. Ratios are medians of per-round
ratios of interleaved rounds (tools/timing.py); wall-clock and process CPU time.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages live one folder up

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from tools.timing import median, ratio, show, time_interleaved  # noqa: E402

transformer = importlib.import_module("03_transformer")  # module names may not start with a digit


class TorchAttention(nn.Module):
    """nn.MultiheadAttention behind our forward signature: the reference."""

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
            if isinstance(child, transformer.MultiHeadAttention):
                setattr(parent, name, TorchAttention(child, need_weights_default))
    return module


def both_ratios(times, reference):
    return f"{ratio(times, reference):.3f} wall, {ratio(times, reference, 1):.3f} cpu"


def benchmark(rounds, batch):
    torch.manual_seed(0)
    d, h, N = 2048, 4, 196  # the official R101 head at 448 px: 14 x 14 tokens
    print(f"fp32 CPU, {torch.get_num_threads()} threads, batch {batch}, training mode (dropout 0.1), "
          f"forward+backward; medians of {rounds} interleaved rounds (ratios: median of the per-round ratios), "
          "wall-clock / process CPU time")
    fused = transformer.MultiHeadAttention(d, h, dropout=0.1)
    explicit = copy.deepcopy(fused)
    explicit.fused = False
    candidates = {"nn.MHA(need_weights=False)": with_torch_attention(nn.Sequential(fused))[0],
                  "nn.MHA(need_weights=True)": with_torch_attention(nn.Sequential(fused), True)[0],
                  "ours explicit": explicit, "ours fused": fused}
    for title, Lq in (("cross-attention: 80 label queries over 196 tokens", 80),
                      ("encoder self-attention over 196 tokens", N)):
        memory, pos = torch.randn(batch, N, d, requires_grad=True), torch.randn(1, N, d)
        labels, query_pos = torch.randn(batch, Lq, d, requires_grad=True), torch.randn(1, Lq, d)

        def step(attention, Lq=Lq, memory=memory, pos=pos, labels=labels, query_pos=query_pos):
            def run():  # called exactly as our encoder / decoder layers call it
                k = memory + pos
                q = k if Lq == N else labels + query_pos
                attention(q, k, memory, need_weights=attention is explicit)[0].sum().backward()
            return run

        t = time_interleaved({name: step(a) for name, a in candidates.items()}, rounds)
        print(f"\n{title}, width {d}, {h} heads")
        for name in candidates:
            print(f"  {name:27s} {show(t[name])}")
        for name, target in (("ours explicit", 1.15), ("ours fused", 1.0)):
            print(f"  {name} / nn.MHA(need_weights=False): {both_ratios(t[name], t['nn.MHA(need_weights=False)'])} "
                  f"(target <= {target});  / nn.MHA(need_weights=True), as DETR and the official code "
                  f"call it: {both_ratios(t[name], t['nn.MHA(need_weights=True)'])}")

    print(f"\nwhole head after the backbone (projection, position, encoder, decoder, classifier), "
          f"80 classes, {N} tokens (a 448 px image at stride 32):")
    for preset in ("official_r101", "demo"):
        config = dataclasses.replace(transformer.PRESETS[preset], num_classes=80, pretrained=False)
        model = transformer.Query2Label(config).train()
        features = torch.randn(batch, model.backbone.num_channels, 14, 14, requires_grad=True)
        models = {"ours": model, "torch": with_torch_attention(model)}
        t = time_interleaved({k: lambda m=m, f=features: m.forward_head(f).sum().backward() for k, m in models.items()},
                             rounds)
        params = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.backbone.parameters())
        print(f"  {preset} (d {config.d_model}, ff {config.dim_feedforward}, {params / 1e6:.1f} M parameters): "
              f"{show(t['ours'])} per batch of {batch} ({median(t['ours']) * 1e3 / batch:.0f} ms wall per image);"
              f" / the same head on nn.MultiheadAttention: {both_ratios(t['ours'], t['torch'])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per candidate (default: 5)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default: 16)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's choice); 1 gives steadier figures on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    benchmark(args.rounds, args.batch)
