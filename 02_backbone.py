"""Stage 2: the image side of Query2Label: backbone, input projection, 2D position encoding.

Paper: Liu et al. 2021, sec. 3.1: a backbone turns the image (B, 3, S, S) into a feature map
(B, C, H, W), H = S / stride; an optional 1×1 conv projects C to the transformer width d; each of
the N = H·W positions gets DETR's 2D sine position encoding, added to the queries and keys.

    python 02_backbone.py            # feature shapes at two sizes, parameter counts, encoding figure
    python tools/bench_backbone.py   # CPU throughput ± channels_last, BN folding, resnet101 memory

Shapes (batch-first): B batch, C backbone channels, S input side, H×W feature map, d model width.
Next: 03_transformer.py reads these feature maps with one query per label.

Deviations from the official Query2Label code:
- Any timm backbone; token models (ViT, Swin) become a (B, C, H, W) grid via `forward_intermediates`.
- Finer grids on request: `output_stride=8/16` (dilated last stages) or `feature_stage=2` (stop there).
- Sine encoding for whatever H×W arrives (cached), not one input size (official issue #16); no padding
  mask (images are full squares). The learned one puts y before x (DETR: x first).
- `fold_bn=True` folds frozen BatchNorm into the convolution before it.
"""

import argparse
import math
import re
import time
import zipfile
from pathlib import Path

import timm
import torch
from torch import nn

WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")
DEMO_BACKBONES = ["test_resnet", "test_convnext", "test_efficientnet", "test_vit", "resnet10t", "resnet18",
                  "resnet101"]
FIGURE = Path("docs/figures/02_position_encoding.png")


# ----------------------------------------------------------------------------- backbone
class Backbone(nn.Module):
    """A timm model as images (B, 3, S, S) -> unpooled feature map (B, C, H, W); C = `num_channels`,
    `stride` = S / H. CNNs use `forward_features`; token models (ViT, Swin) `forward_intermediates`
    (prefix tokens dropped, final norm, tokens as the patch grid). A `weights` file wins over
    `pretrained`; `output_stride`, `feature_stage`, `fold_bn`: see the module's Deviations."""

    def __init__(self, name="resnet18", pretrained=False, weights=None, frozen_bn=True, freeze_stem=True,
                 verbose=True, output_stride=None, feature_stage=None, fold_bn=False, **timm_kwargs):
        super().__init__()
        self.name, self.feature_stage = name, feature_stage
        if output_stride is not None:
            timm_kwargs["output_stride"] = output_stride
        if feature_stage is not None:  # timm's feature extractor, cut after that stage
            timm_kwargs.update(features_only=True, out_indices=(feature_stage,))
        try:
            self.body = create_timm_model(name, pretrained=pretrained and weights is None, **timm_kwargs)
        except TypeError as error:  # a model without dilation support rejects output_stride
            raise ValueError(f"backbone {name!r} cannot build with {timm_kwargs}: {error}") from None
        if weights is not None:
            load_weights(self.body, weights, verbose=verbose)
        self.weights_source = (str(weights) if weights is not None
                               else "timm hub" if pretrained else "none (random init)")
        if verbose and weights is None and not pretrained:
            print(f"!!! backbone {name}: NO pretrained weights, random init. Fine for tests and the"
                  f" built-in data; for real data use pretrained=True or weights=FILE.")
        self.token_model = feature_stage is None and (getattr(self.body, "output_fmt", "NCHW") != "NCHW"
                                                      or hasattr(self.body, "num_prefix_tokens"))
        info = self.body.feature_info  # a features_only model's info covers the stages it keeps
        last = info.get_dicts()[-1] if feature_stage is not None else info[-1]
        self.stride = last["reduction"]
        if output_stride is not None and self.stride > output_stride:
            raise ValueError(f"backbone {name!r} ignored output_stride={output_stride} (its stride is "
                             f"{self.stride}); use a ResNet-style model or drop output_stride")
        self.num_channels = (last["num_chs"] if self.token_model or feature_stage is not None
                             else self.body.num_features)
        if freeze_stem and feature_stage is not None:  # timm's feature extractor has no group_matcher
            with torch.device("meta"):  # the whole model's, built without memory, keeps the same names
                self.body.group_matcher = timm.create_model(name).group_matcher
        self.frozen_names = freeze_stem_and_first_stage(self.body) if freeze_stem else []
        if fold_bn and not frozen_bn:
            raise ValueError("fold_bn needs frozen_bn: a training BatchNorm's statistics change")
        if frozen_bn:
            freeze_batchnorm(self.body)
        self.folded = fold_frozen_batchnorm(self.body) if fold_bn else 0  # conv + BN pairs folded

    def forward(self, x):  # x (B, 3, S, S)
        if self.feature_stage is not None:
            return self.body(x)[-1]  # (B, C, H, W): the last stage kept
        if self.token_model:
            S_h, S_w = x.shape[-2:]
            if S_h % self.stride or S_w % self.stride:
                raise ValueError(f"{self.name} needs sides divisible by {self.stride}; got {S_h}x{S_w}")
            return self.body.forward_intermediates(
                x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[-1]  # (B, C, H, W)
        return self.body.forward_features(x)  # (B, C, H, W)


def make_projection(in_channels, d_model, enabled=True):
    """1×1 convolution C -> d (a per-position linear map), or nn.Identity when disabled. Why: the
    transformer costs d² per token and C is large (2048 for ResNet-101); the official R101 has d = C."""
    if enabled:
        return nn.Conv2d(in_channels, d_model, kernel_size=1)
    if in_channels != d_model:
        raise ValueError(f"input projection off needs d_model = C; got C={in_channels}, d_model={d_model}")
    return nn.Identity()


# ----------------------------------------------------------------------------- position encodings
class PositionEmbeddingSine(nn.Module):
    """DETR's 2D sine encoding, computed for any H×W and cached per (size, device, dtype).

    F = d/2 features per axis, k = 0..F-1, y = row index (1..H), x = column index (1..W):
        y' = y / (H + eps) · scale,  x' = x / (W + eps) · scale          (normalize=True)
        ω_k = temperature ^ (2·⌊k/2⌋ / F)
        PE[k] = sin(y' / ω_k) for even k, cos(y' / ω_k) for odd k;   PE[F + k]: the same with x'
    Why: sin/cos pairs at geometric frequencies let attention tell positions apart and compute
    offsets; normalising to [0, 2π] makes a position a fraction of the image, whatever S is."""

    def __init__(self, d_model, temperature=10000, normalize=True, scale=2 * math.pi, eps=1e-6):
        super().__init__()
        if d_model % 4:
            raise ValueError(f"d_model={d_model} must be divisible by 4 (d/2 per axis, in sin/cos pairs)")
        self.num_pos_feats = d_model // 2
        self.temperature, self.normalize, self.scale, self.eps = temperature, normalize, scale, eps
        self._cache = {}

    def encode(self, H, W, device=None):  # -> (1, d, H, W), float32
        y = torch.arange(1, H + 1, dtype=torch.float32, device=device)  # cumsum of ones down the rows
        x = torch.arange(1, W + 1, dtype=torch.float32, device=device)
        if self.normalize:
            y = y / (y[-1] + self.eps) * self.scale
            x = x / (x[-1] + self.eps) * self.scale
        k = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        omega = self.temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / self.num_pos_feats)  # (F,)
        pos_y, pos_x = y[:, None] / omega, x[:, None] / omega  # (H, F), (W, F)
        pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)  # (H, F)
        pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)  # (W, F)
        pos = torch.cat((pos_y[:, None, :].expand(H, W, -1),
                         pos_x[None, :, :].expand(H, W, -1)), dim=2)  # (H, W, d)
        return pos.permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, d, H, W)

    def forward(self, x):  # x (B, *, H, W): only its size, device and dtype are used
        H, W = x.shape[-2:]
        if torch.compiler.is_compiling():  # traced by torch.compile / torch.export: no Python-side cache
            return self.encode(H, W, x.device).to(x.dtype)
        key = (H, W, x.device, x.dtype)
        if key not in self._cache:
            with torch.inference_mode(False):  # a cached inference tensor would break training later
                self._cache[key] = self.encode(H, W, x.device).to(x.dtype)
        return self._cache[key]  # (1, d, H, W); shared, do not modify in place


class PositionEmbeddingLearned(nn.Module):
    """Learned 2D encoding (DETR's option): PE(i, j) = [row_embed[i], col_embed[j]], d/2 features
    each, y first like the sine one; up to `max_size` positions per axis (64: 576 px at stride 16)."""

    def __init__(self, d_model, max_size=64):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"d_model={d_model} must be even (d/2 per axis)")
        self.row_embed, self.col_embed = (nn.Embedding(max_size, d_model // 2) for _ in range(2))
        for table in (self.row_embed, self.col_embed):
            nn.init.uniform_(table.weight)

    def forward(self, x):  # x (B, *, H, W)
        H, W = x.shape[-2:]
        limit = self.row_embed.num_embeddings
        if H > limit or W > limit:
            raise ValueError(f"feature map {H}x{W} exceeds the learned table ({limit} per axis); "
                             f"use max_size>={max(H, W)} or 'sine'")
        rows, cols = self.row_embed.weight[:H], self.col_embed.weight[:W]  # (H, d/2), (W, d/2)
        pos = torch.cat((rows[:, None, :].expand(H, W, -1),
                         cols[None, :, :].expand(H, W, -1)), dim=2)  # (H, W, d)
        return pos.permute(2, 0, 1).unsqueeze(0).to(x.dtype)  # (1, d, H, W)


def build_position_encoding(kind, d_model, **kwargs):
    """kind "sine" (the paper's, no parameters) or "learned" (2·max_size·d/2 parameters)."""
    if kind == "sine":
        return PositionEmbeddingSine(d_model, **kwargs)
    if kind == "learned":
        return PositionEmbeddingLearned(d_model, **kwargs)
    raise ValueError(f"unknown position encoding {kind!r}; expected 'sine' or 'learned'")


# ----------------------------------------------------------------------------- helpers: frozen BatchNorm
class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine values: y = (x - mean) / sqrt(var + eps) * w + b.
    Why: small per-GPU batches give noisy batch statistics, so DETR and Query2Label keep ImageNet's.
    All four are buffers (torchvision's names): no gradient, `.train()` changes nothing."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), fill))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # BatchNorm2d's step counter: unused here
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_and_shift(self):  # y = x * scale + shift, both (C,)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x):  # x (B, C, H, W)
        scale, shift = self.scale_and_shift()
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)  # (B, C, H, W)


def freeze_batchnorm(module):
    """Every BatchNorm2d in `module` replaced by a frozen copy, in place (returns `module`); timm's
    BatchNormAct2d (EfficientNet, TResNet) becomes its FrozenBatchNormAct2d, keeping the activation."""
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)) and module.running_mean is not None:
        if isinstance(module, timm.layers.BatchNormAct2d):
            frozen = timm.layers.FrozenBatchNormAct2d(module.num_features, eps=module.eps)
            frozen.act, frozen.drop = module.act, module.drop
        else:
            frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                if getattr(module, name) is not None:  # no weight/bias when affine=False
                    getattr(frozen, name).copy_(getattr(module, name))
        return frozen.to(module.running_mean.device)
    for name, child in module.named_children():
        new = freeze_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module


@torch.no_grad()
def fold_frozen_batchnorm(module):
    """Fold each FrozenBatchNorm2d that follows a conv into it (in place; returns how many): conv then
    frozen BN is one affine map: w' = w·scale, b' = (b - mean)·scale + beta, scale = gamma/sqrt(var + eps).
    Why: one pass over the activation less. Pairs: `convN` + `bnN` siblings, (Conv2d, BN) neighbours
    in a Sequential; the BN becomes nn.Identity. Fold AFTER loading weights (the state dict changes);
    an optimiser step then moves w', not w, so training differs from an unfolded model's."""
    folded = 0
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            match = re.fullmatch(r"bn(\d*)", name)
            if isinstance(parent, nn.Sequential):
                conv = children[i - 1][1] if i else None
            else:
                conv = getattr(parent, f"conv{match.group(1)}", None) if match else None
            if isinstance(conv, nn.Sequential) and len(conv):  # a Sequential stem ends in its conv
                conv = conv[-1]
            if type(child) is FrozenBatchNorm2d and isinstance(conv, nn.Conv2d):
                scale, shift = child.scale_and_shift()
                bias = (conv.bias if conv.bias is not None else 0) * scale + shift  # (C_out,)
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
                setattr(parent, name, nn.Identity())
                folded += 1
    return folded


def freeze_stem_and_first_stage(model):
    """requires_grad=False on timm's `group_matcher(coarse=True)` groups 0 and 1 (stem, first stage):
    ResNet conv1/bn1 + layer1 (the official recipe), ConvNeXt stem + stages.0, ViT patch_embed +
    blocks.0, ... Returns the frozen names."""
    if not hasattr(model, "group_matcher"):
        raise NotImplementedError(f"{type(model).__name__} has no timm group_matcher; use freeze_stem=False")
    groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))  # {group id: [names]}
    names = [name for group in sorted(groups)[:2] for name in groups[group]]
    for name, parameter in model.named_parameters():
        if name in names:
            parameter.requires_grad_(False)
    return names


# ----------------------------------------------------------------------------- helpers: weights and .pt files
class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be fetched (offline, not cached)."""


def create_timm_model(name, pretrained=False, **timm_kwargs):
    """timm model `name` ending in a feature map (no classifier, no pooling); `pretrained`: ImageNet
    weights from the hub or its cache, else a WeightsUnavailableError that says what to do."""
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; list candidates with timm.list_models('*{name}*')")
    source = timm.models.get_pretrained_cfg(name)
    if pretrained and not (source and (source.hf_hub_id or source.url or source.file)):
        raise WeightsUnavailableError(f"timm has no pretrained weights for {name!r}; pass --weights FILE")
    kwargs = dict(pretrained=pretrained, num_classes=0, global_pool="", **timm_kwargs)
    try:
        try:  # token models interpolate their position table to any input size with this flag
            return timm.create_model(name, dynamic_img_size=True, **kwargs)
        except TypeError as error:  # CNNs take any size already and reject the unknown argument
            if "dynamic_img_size" not in str(error):
                raise
        return timm.create_model(name, **kwargs)
    except OSError as error:  # every hub failure is an OSError: offline, unreachable, not cached, HTTP
        if not pretrained:
            raise
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        where = f"huggingface.co/{source.hf_hub_id}" if source.hf_hub_id else source.url
        raise WeightsUnavailableError(f"cannot get pretrained weights for {name!r} from {where} ({reason});"
                                      " offline? Download them elsewhere and pass --weights FILE, or train"
                                      " from scratch (drop --pretrained; much lower mAP)") from None


def load_weights(model, path, verbose=True):
    """A local weights file into `model` (Backbone or timm model) -> (missing, unexpected). timm reads
    .pth/.pt/.safetensors, unwraps {"state_dict"|"model": ...}; we strip "body."-style prefixes."""
    target = model.body if isinstance(model, Backbone) else model
    if getattr(model, "folded", 0):  # conv weights of a file are not the folded w' = w * scale
        raise ValueError(f"weights file {path}: this backbone's BatchNorm is folded; load, then fold")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"weights file {path}: unknown suffix {path.suffix!r}; expected {WEIGHT_SUFFIXES}")
    try:
        state = timm.models.load_state_dict(str(path), use_ema=True, weights_only=True)
    except Exception as error:  # corrupt file, pickle with code in it, wrong format...
        raise ValueError(f"cannot read weights file {path}: {type(error).__name__}: {error}") from None
    own = target.state_dict()
    prefix = max(["", "body.", "backbone.body.", "backbone.0.body."],
                 key=lambda p: sum(k.startswith(p) and k[len(p):] in own for k in state))
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise ValueError(f"weights file {path}: {len(wrong)} tensors have the wrong shape (another "
                         f"architecture?), e.g. {wrong[0]}")
    if not any(k in own for k in state):
        raise ValueError(f"weights file {path}: none of its {len(state)} keys matches the model"
                         f" (e.g. file {next(iter(state), '-')!r} vs model {next(iter(own))!r})")
    missing, unexpected = target.load_state_dict(state, strict=False)
    if verbose:  # the ImageNet classifier's keys (fc.*) are unexpected by design: listed apart
        head = (getattr(target, "pretrained_cfg", {}).get("classifier") or "fc").split(".")[0]
        groups = {"missing": missing, "unexpected": [k for k in unexpected if k.split(".")[0] != head],
                  "unexpected but expected": [k for k in unexpected if k.split(".")[0] == head]}
        print(f"loaded {len(own) - len(missing)}/{len(own)} tensors from {path}" + "".join(
            f"\n  {name} ({len(keys)}): {', '.join(keys[:8]) or 'none'}{' ...' * (len(keys) > 8)}"
            for name, keys in groups.items() if keys or name != "unexpected but expected"))
    return list(missing), list(unexpected)


class FileProblem(ValueError):
    """A file the user gave that cannot be used; the message names it and says what to do."""


def load_torch_file(path, what="checkpoint", trusted=False):
    """torch.load on the CPU with one-line errors (FileProblem) for the usual mistakes; pickled Python
    objects are refused unless `trusted` (they run code). Every stage that reads a .pt uses this."""
    path = Path(path)
    if path.is_dir():
        raise FileProblem(f"{what} {path} is a folder; give a file in it")
    if not path.is_file():
        raise FileProblem(f"{what} {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    size = f"{path.stat().st_size:,} bytes"
    if head == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise FileProblem(f"{what} {path} is a damaged zip archive ({size}): cut off while copied?")
    if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):
        raise FileProblem(f"{what} {path} is not a PyTorch file ({size} starting {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as error:  # pickled objects that weights_only refuses, or a damaged archive
        found, reason = re.search(r"GLOBAL (\S+)", str(error)), (str(error).strip().splitlines() or [""])[0]
        raise FileProblem(f"{what} {path} " + (
            f"holds pickled Python objects ({found.group(1)}), which weights_only=True refuses; if you "
            "trust its source, pass --trusted" if found else
            f"is not a readable PyTorch file ({type(error).__name__}: {reason[:160]})")) from None


# ----------------------------------------------------------------------------- figure
def plot_position_encoding(path=FIGURE, d_model=256, side=14):
    """Figure: four sine channels as images; cosine similarity of one position (+) to all others."""
    from matplotlib.figure import Figure

    def encode(module, n=side):  # -> (d, n, n)
        return module(torch.zeros(1, 1, n, n))[0].detach()

    ref, sine = (side // 3, side // 2), encode(PositionEmbeddingSine(d_model))
    torch.manual_seed(0)
    maps = [(sine, f"sine d={d_model}, {side}x{side}"),
            (encode(PositionEmbeddingSine(2048)), f"sine d=2048 (official R101), {side}x{side}"),
            (encode(PositionEmbeddingLearned(d_model)), "learned, at init"),
            (encode(PositionEmbeddingSine(d_model), 18), "sine, 18x18 (576 px)")]
    fig = Figure(figsize=(13, 6.6), layout="tight")
    axes = fig.subplots(2, 4)
    for ax, c, title in zip(axes[0], (0, 1, 16, d_model // 2 + 4),
                            ("y, k=0 (sin)", "y, k=1 (cos)", "y, k=16 (sin)", "x, k=4 (sin)"), strict=True):
        ax.imshow(sine[c], cmap="RdBu", vmin=-1, vmax=1)
        ax.set_title(f"channel {c}: {title}", fontsize=9)
    for ax, (pe, title) in zip(axes[1], maps, strict=True):
        flat = nn.functional.normalize(pe.flatten(1), dim=0)  # (d, N), unit columns
        sim = (flat[:, ref[0] * pe.shape[2] + ref[1]] @ flat).view(pe.shape[1:])  # (H, W) cosine to +
        image = ax.imshow(sim, cmap="viridis")  # own colour range: sine similarities stay close to 1
        ax.plot(ref[1], ref[0], "r+", markersize=12)
        ax.set_title(f"{title}\ncos-sim to +: {sim.min():.2f} .. {sim.max():.2f}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("2D sine position encoding (row 1: channels; row 2: cosine similarity of one position "
                 "to all)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    add = parser.add_argument  # * what to show
    add("--backbone", nargs="+", default=DEMO_BACKBONES,
        help="timm models to show, random init; default: " + " ".join(DEMO_BACKBONES))
    add("--sizes", nargs=2, type=int, default=[224, 448], help="two input sides; default: 224 448")
    add("--output-stride", type=int, choices=[8, 16, 32], help="finer grid (ResNets); default: the model's")
    add("--figure", type=Path, default=FIGURE, help="position-encoding picture; default: %(default)s")
    # * weights
    add("--pretrained", action="store_true", help="ImageNet weights from the timm hub; default: off")
    add("--weights", help="local weights file (.pth/.pt/.safetensors); default: none")
    args, start = parser.parse_args(), time.time()
    try:
        for name in args.backbone:
            model = Backbone(name, args.pretrained, args.weights, verbose=args.weights is not None,
                             output_stride=args.output_stride).eval()
            with torch.no_grad():
                shapes = [tuple(model(torch.randn(1, 3, S, S)).shape) for S in args.sizes]
            trainable, frozen = (sum(p.numel() for p in model.parameters() if p.requires_grad is t)
                                 for t in (True, False))
            print(f"{name:18s} C={model.num_channels:5d} stride={model.stride:2d} "
                  + "  ".join(f"{S}px->{s}" for S, s in zip(args.sizes, shapes, strict=True))
                  + f"  params trainable {trainable / 1e6:.2f}M frozen {frozen / 1e6:.3f}M"
                  f"  weights: {model.weights_source}")
    except (WeightsUnavailableError, FileNotFoundError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"wrote {plot_position_encoding(args.figure)}\ndone in {time.time() - start:.1f}s")
