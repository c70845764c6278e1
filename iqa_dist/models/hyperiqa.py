"""HyperIQA (Su et al., CVPR 2020) on a timm backbone, with phase one's multi-scale fusion.

The backbone's four stages feed two paths:
- local distortion aware (LDA) pooling of every stage builds each image's target-net input
  (16 + 16 + 16 + 176 = 224 features);
- the stage features, brought to the hyper network's 7x7 grid and concatenated (1440 channels for
  Swin-T), feed the hyper network, which generates the weights and biases of a small per-image
  target net (224-112-56-28-14-1, sigmoid between layers) that outputs the score.

Regularisers keyed by sample: in training, `forward(x, noise)` takes this batch's uniforms
(b, noise_width), one row per sample, and every stochastic layer (the backbone's drop path, the
hyper and target nets' dropout) reads its draws from them instead of from torch's generator. The
caller makes row i a function of sample i alone, so the same sample is regularised the same way
whatever the batch is split into. Without `noise` the layers draw from torch's generator as usual.

This file knows nothing of devices, processes or precision: Accelerate wraps it from outside.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, drop_path
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import UserError, first_line
from .weights import ensure_hub_weights, missing_hub_weights


def pooling_matrix(size_in: int, size_out: int) -> Tensor:
    """(size_out, size_in): row i averages adaptive average pooling's window i, inputs
    floor(i * in / out) to ceil((i + 1) * in / out), as torch's AdaptiveAvgPool2d does."""
    m = torch.zeros(size_out, size_in)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-(i + 1) * size_in // size_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class AveragePool(nn.Module):
    """Adaptive average pooling of a (B, C, H, W) map, of the size the model is built for, to
    (B, C, out, out), as torch's AdaptiveAvgPool2d computes it, the cheapest way: nothing when the
    sizes are equal (Swin-T's 7x7 last stage to the 7x7 hyper map), avg_pool2d when the size
    divides (the same sums, bit for bit, in one kernel; at 224 px every pool of the presets), and
    otherwise (the demo's 64-px patches: a 16x16 stage to 7x7, a 2x2 one up to 7x7) two small
    matrix products with constant matrices made at set-up, the same windows and weights to ~1e-7:
    torch's adaptive pooling backward on the CPU is slow on a channels-last view (Swin's stages)
    and when it upsamples (16.5 -> 6.9 ms of the demo's 140-ms step). Another input size falls
    back to torch's own."""

    def __init__(self, size_in: int, size_out: int) -> None:
        super().__init__()
        self.size_in, self.size_out = size_in, size_out
        odd = size_in % size_out != 0
        self.register_buffer("matrix", pooling_matrix(size_in, size_out) if odd else None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.size_in, self.size_in):
            return F.adaptive_avg_pool2d(x, self.size_out)
        if self.size_in == self.size_out:
            return x
        if self.matrix is None:
            return F.avg_pool2d(x, self.size_in // self.size_out)
        m = self.matrix.to(x.dtype)
        return torch.einsum("ih,bchw,jw->bcij", m, x, m)


class LocalDistortionAware(nn.Module):
    """One stage's feature map (B, C, H, W) -> (B, out) slice of the target-net input.

    Stages 1-3 (reduce > 0): 1x1 conv to `reduce` channels, average pool to pooled x pooled, FC.
    Stage 4 (reduce = 0): global average pool, FC. At 224 px the pools equal HyperIQA's
    AvgPool2d(7) (56->8, 28->4, 14->2, 7->1); `size` is the stage map's side at the model's patch size.
    """

    def __init__(self, channels: int, reduce: int, pooled: int, out: int, size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, reduce, 1, bias=False) if reduce else nn.Identity()
        self.pool = AveragePool(size, pooled)
        self.fc = nn.Linear((reduce or channels) * pooled * pooled, out)

    def forward(self, x: Tensor, nhwc: bool = False) -> Tensor:
        """x: (B, C, H, W); nhwc says it is a permuted view of an NHWC tensor (Swin), whose 1x1
        conv runs as a linear map over the channels: the same math without a layout copy."""
        if nhwc and isinstance(self.conv, nn.Conv2d):
            x = F.linear(x.permute(0, 2, 3, 1), self.conv.weight.flatten(1)).permute(0, 3, 1, 2)
        else:
            x = self.conv(x)
        return self.fc(self.pool(x).flatten(1))


class StageAttention(nn.Module):
    """Per-image softmax weights over the stages, from their pooled descriptors (phase one's
    'attention' fusion, which it found worse than plain concat; kept for ablations)."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.fc = nn.Linear(sum(channels), len(channels))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        w = self.fc(torch.cat([f.mean((2, 3)) for f in feats], 1)).softmax(1) * len(feats)  # (B, S), mean 1
        return [f * w[:, i, None, None, None] for i, f in enumerate(feats)]


class Draws:
    """This forward's keyed drop-path scales, (b, L) (None outside a keyed forward): set by
    HyperIQA.forward, read by the backbone's KeyedDropPath layers, which timm's blocks call
    with x alone."""

    def __init__(self) -> None:
        self.path: Tensor | None = None


class KeyedDropPath(nn.Module):
    """timm's DropPath (stochastic depth, per sample), its keep-or-drop from column `index` of the
    forward's keyed scales (0 or 1 / keep), or from torch's generator when there are none."""

    def __init__(self, drop_prob: float, index: int, draws: Draws) -> None:
        super().__init__()
        self.drop_prob, self.index, self.draws = drop_prob, index, draws

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        if self.draws.path is None:
            return drop_path(x, self.drop_prob, True)
        scale = self.draws.path[:, self.index].to(x.dtype)  # a no-op when made in x's dtype
        return x * scale.view(-1, *([1] * (x.ndim - 1)))


def keyed_drop_paths(backbone: nn.Module, draws: Draws) -> list[float]:
    """Replaces every active timm DropPath of the backbone by a KeyedDropPath; their drop rates."""
    rates: list[float] = []
    for module in list(backbone.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, DropPath) and child.drop_prob > 0:
                setattr(module, name, KeyedDropPath(child.drop_prob, len(rates), draws))
                rates.append(child.drop_prob)
    return rates


def dropout(x: Tensor, p: float, training: bool, scale: Tensor | None) -> Tensor:
    """F.dropout, or with keyed draws: x times `scale` (b, *x.shape[1:] flattened), 0 or 1 / keep."""
    if scale is None or not training:
        return F.dropout(x, p, training)
    return x * scale.view(x.shape)


def target_net(x: Tensor, weights: list[Tensor], biases: list[Tensor], p: float, training: bool,
               drops: list[Tensor] | None = None) -> Tensor:
    """Runs every image through its own generated fully connected net.

    x: (B, D0) target input; weights[i]: (B, D_{i+1}, D_i); biases[i]: (B, D_{i+1}).
    Sigmoid (and dropout at rate p, keyed by `drops` when given) between layers, none after the
    last. Returns (B,).
    """
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = torch.baddbmm(b.unsqueeze(-1), w, x.unsqueeze(-1)).squeeze(-1)
        if i < len(weights) - 1:
            x = torch.sigmoid(x)
            if i < len(weights) - 2:  # phase one: dropout after the first three layers
                x = dropout(x, p, training, drops[i] if drops else None)
    return x.squeeze(-1)


class HyperNetwork(nn.Module):
    """Hyper feature map (B, C, f, f) -> weights and biases of the per-image target net.

    Weights of layer i come from a 3x3 conv whose in*out/f^2 output channels are reshaped to
    (out, in); the last layer's weight and every bias from linear layers on the pooled map.
    """

    def __init__(self, channels: int, cfg: ModelConfig) -> None:
        super().__init__()
        widths = [channels, *cfg.hyper_hidden, cfg.hyper_in]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(a, b, 1), nn.ReLU(inplace=True)]
        self.reduce = nn.Sequential(*layers)
        self.dropout = nn.Dropout(cfg.dropout)
        self.dims = [cfg.target_in, *cfg.target_hidden, 1]
        f2 = cfg.feature_size**2
        self.weight_convs = nn.ModuleList(
            nn.Conv2d(cfg.hyper_in, a * b // f2, 3, padding=1) for a, b in zip(self.dims[:-2], self.dims[1:-1])
        )
        self.last_weight = nn.Linear(cfg.hyper_in, self.dims[-2])
        self.bias_fcs = nn.ModuleList(nn.Linear(cfg.hyper_in, d) for d in self.dims[1:])

    def forward(self, fused: Tensor, drop: Tensor | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """drop: keyed dropout scales for the reduced map, (B, hyper_in * f * f), or None."""
        h = dropout(self.reduce(fused), self.dropout.p, self.training, drop)  # (B, hyper_in, f, f)
        pooled = h.mean((2, 3))  # (B, hyper_in)
        bsz = h.shape[0]
        # The weight convs all read h, and the last weight and the biases all read `pooled`: each
        # group runs as ONE conv / linear over its layers' concatenated parameters. The same sums in
        # 2 kernels instead of 10 forward (and ~25 fewer backward, where the many small launches
        # bound the step on a GPU); the layers stay separate modules, so checkpoints are unchanged.
        convs = self.weight_convs
        maps = F.conv2d(h, torch.cat([c.weight for c in convs]), torch.cat([c.bias for c in convs]), padding=1)
        weights = [m.reshape(bsz, d_out, d_in)  # a view: each chunk's (channels, f, f) block is contiguous
                   for m, d_in, d_out in zip(maps.split([c.out_channels for c in convs], 1), self.dims[:-2],
                                             self.dims[1:-1])]
        fcs = [self.last_weight, *self.bias_fcs]
        out = F.linear(pooled, torch.cat([fc.weight for fc in fcs]), torch.cat([fc.bias for fc in fcs]))
        last, *biases = out.split([fc.out_features for fc in fcs], 1)
        weights.append(last.reshape(bsz, 1, self.dims[-2]))
        return weights, biases


class HyperIQA(nn.Module):
    """Normalised patches (B, 3, S, S) -> quality scores (B,)."""

    def __init__(self, backbone: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        # timm's Swin returns NHWC stages, ResNet NCHW: the one place that knows.
        self.channels_last_features = str(getattr(backbone, "output_fmt", "NCHW")).endswith("NHWC")
        channels = backbone.feature_info.channels()
        if len(channels) != 4:
            raise UserError(f"model.backbone={cfg.backbone!r}: cannot serve as a HyperIQA backbone: it needs 4 feature "
                            f"stages, timm gives {len(channels)}")
        self.mean = tuple(backbone.pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN))
        self.std = tuple(backbone.pretrained_cfg.get("std", IMAGENET_DEFAULT_STD))
        stage4_out = cfg.target_in - 3 * cfg.lda_out
        sizes = [cfg.img_size // r for r in backbone.feature_info.reduction()]  # each stage map's side
        self.lda = nn.ModuleList(
            [LocalDistortionAware(c, cfg.lda_out * 2**i, 8 >> i, cfg.lda_out, n)
             for i, (c, n) in enumerate(zip(channels[:3], sizes))]
            + [LocalDistortionAware(channels[3], 0, 1, stage4_out, sizes[3])]
        )
        self.fuse_pools = nn.ModuleList(AveragePool(n, cfg.feature_size) for n in sizes)  # to the hyper map's grid
        self.attention = StageAttention(channels) if cfg.fusion == "attention" else None
        fused = channels[3] if cfg.fusion == "last" else sum(channels)
        self.hyper = HyperNetwork(fused, cfg)
        # keyed regularisers: the drop rates of the backbone's drop paths and, with dropout, the
        # elements of each dropout (the hyper net's reduced map, then three target-net layers)
        self.draws = Draws()
        rates = keyed_drop_paths(backbone, self.draws)
        self.register_buffer("path_drop", torch.tensor(rates, dtype=torch.float32), persistent=False)
        self.register_buffer("path_scale", 1.0 / (1.0 - self.path_drop), persistent=False)  # 1 / keep, per layer
        widths = [cfg.hyper_in * cfg.feature_size**2, *self.hyper.dims[1:len(self.hyper.dims) - 2]]
        self.drop_widths = widths if cfg.dropout > 0 else []
        # The original HyperIQA's initialisation: Kaiming-normal weights for the LDA layers and for
        # the layers that generate the target net; PyTorch's default for the 1x1 convs that reduce
        # the backbone features (its `conv1`), whose Kaiming init would make the generated target
        # weights ~10x larger at the start.
        generators = [*self.hyper.weight_convs, self.hyper.last_weight, *self.hyper.bias_fcs]
        for m in [*self.lda.modules(), *generators]:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def parameter_groups(self, lda_group: str) -> dict[str, list[nn.Parameter]]:
        """{"backbone": [...], "head": [...]}: the optimizer's two groups. The LDA layers go with
        the backbone (lda_group="backbone", as in the original code, where they are part of the
        ResNet module) or with the hyper network ("head")."""
        lda = list(self.lda.parameters())
        backbone = list(self.backbone.parameters()) + (lda if lda_group == "backbone" else [])
        taken = {id(p) for p in backbone}
        return {"backbone": backbone, "head": [p for p in self.parameters() if id(p) not in taken]}

    def stages(self, x: Tensor) -> list[Tensor]:
        """Backbone stage features as NCHW shapes: [(B, C_i, H_i, W_i)] x 4. Swin's NHWC stages
        come as permuted views, not copies (LDA and pooling read them in place)."""
        feats = self.backbone(x)
        if self.channels_last_features:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return feats

    def fuse(self, feats: list[Tensor]) -> Tensor:
        """Stage features -> hyper-network input (B, C_fused, f, f)."""
        if self.cfg.fusion == "last":
            return self.fuse_pools[3](feats[3]).contiguous()
        pooled = [pool(f) for pool, f in zip(self.fuse_pools, feats)]  # 56/28/14 -> 7 at 224 px
        if self.attention is not None:
            pooled = self.attention(pooled)
        # contiguous here, on the small 7x7 maps: the hyper network's conv weight gradients then
        # keep the layout DDP's buckets expect (no stride-mismatch copies)
        return torch.cat(pooled, 1).contiguous()

    @property
    def noise_width(self) -> int:
        """Uniforms per sample that a keyed training forward reads: drop paths, then dropouts."""
        return len(self.path_drop) + sum(self.drop_widths)

    def keyed_scales(self, noise: Tensor, like: Tensor) -> tuple[Tensor, list[Tensor]]:
        """noise (b, noise_width) uniforms -> (drop-path scales (b, L), dropout scales per layer),
        each 0 (dropped) or 1 / keep, in the dtype the layers compute in (autocast's, if on)."""
        dev = like.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else like.dtype
        n = len(self.path_drop)
        path = torch.where(noise[:, :n] >= self.path_drop, self.path_scale, 0.0).to(dtype)
        p = self.cfg.dropout
        drop = torch.where(noise[:, n:] >= p, 1.0 / (1.0 - p), 0.0).to(dtype) if self.drop_widths else None
        return path, list(drop.split(self.drop_widths, 1)) if drop is not None else []

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """x: (B, 3, S, S) normalised patches; noise: (B, noise_width) uniforms in [0, 1) keying
        this batch's regularisers in training (None: torch's generator). Returns (B,) scores."""
        keyed = noise is not None and self.training and self.noise_width > 0
        path, drops = self.keyed_scales(noise, x) if keyed else (None, [])
        self.draws.path = path
        try:
            feats = self.stages(x)
        finally:
            self.draws.path = None
        nhwc = self.channels_last_features
        target_in = torch.cat([lda(f, nhwc) for lda, f in zip(self.lda, feats)], 1)  # (B, target_in)
        weights, biases = self.hyper(self.fuse(feats), drops[0] if drops else None)
        return target_net(target_in, weights, biases, self.cfg.dropout, self.training, drops[1:])


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """timm backbone returning its last four stages; weights from the hub, a local file, or none.

    Any timm model whose `features_only` gives four stages serves: CNNs (ResNet, ConvNeXt,
    EfficientNet, RegNet: one stage per resolution) through timm's feature wrappers, and ViTs
    (every block at one resolution) through their `forward_intermediates`, whose last four blocks
    are the four stages. Models built for one input size (Swin, ViT: `fixed_input_size` in their
    timm config) are built for model.img_size."""
    kwargs = dict(features_only=True, out_indices=(-4, -3, -2, -1), drop_path_rate=cfg.drop_path, **cfg.backbone_kwargs)
    known = timm.models.get_pretrained_cfg(cfg.backbone) if timm.is_model(cfg.backbone.split(".")[0]) else None
    if known is not None and known.fixed_input_size:
        kwargs.setdefault("img_size", cfg.img_size)
    if cfg.pretrained == "none":
        kwargs["pretrained"] = False
    elif cfg.pretrained == "hub":
        ensure_hub_weights(cfg.backbone)  # in seconds, where a download would retry for most of a minute
        kwargs["pretrained"] = True
    else:
        path = Path(cfg.pretrained).expanduser()
        if not path.is_file():
            raise UserError(f"model.pretrained={cfg.pretrained!r}: no such file (give hub, none or a weights file)")
        if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
            raise UserError(f"model.pretrained={cfg.pretrained!r}: expected a .safetensors or .pth weights file")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return timm.create_model(cfg.backbone, **kwargs)
    except Exception as e:
        if isinstance(e, RuntimeError) and "Unknown model" in str(e):
            raise UserError(f"model.backbone={cfg.backbone!r}: {e}") from None
        if isinstance(e, (AssertionError, IndexError)) or "features_only" in str(e) or "feature_info" in str(e):
            # timm's feature wrappers assert on out_indices past the model's stages, and models
            # without feature extraction reject features_only or lack feature_info
            raise UserError(f"model.backbone={cfg.backbone!r}: cannot serve as a HyperIQA backbone: timm cannot give "
                            f"its last four feature stages with features_only ({type(e).__name__}: "
                            f"{first_line(e) or 'timm gives no reason'})") from None
        if isinstance(e, TypeError) and "unexpected keyword" in str(e):
            raise UserError(f"model.backbone={cfg.backbone!r} with model.backbone_kwargs={cfg.backbone_kwargs}: timm's "
                            f"model does not take these settings ({first_line(e)})") from None
        if cfg.pretrained == "hub" and isinstance(e, (LocalEntryNotFoundError, OSError)):
            raise missing_hub_weights(cfg.backbone, type(e).__name__) from None
        if cfg.pretrained not in ("hub", "none"):  # a user's file: damaged, or weights of another model
            first = first_line(e)
            raise UserError(f"model.pretrained={cfg.pretrained!r}: timm cannot load it as {cfg.backbone} weights "
                            f"({type(e).__name__}: {first}); a trained iqa-dist model is scored with predict or "
                            "evaluate, not loaded as a backbone") from None
        raise


def build_model(cfg: ModelConfig) -> HyperIQA:
    return HyperIQA(build_backbone(cfg), cfg)


def parameter_counts(model: HyperIQA) -> dict[str, int]:
    """Trainable parameters of the backbone, the rest (LDA + hyper network), and all."""
    backbone = sum(p.numel() for p in model.backbone.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"backbone": backbone, "hyper": total - backbone, "total": total}
