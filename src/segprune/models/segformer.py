"""SegFormer (Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with Transformers",
NeurIPS 2021, arXiv:2105.15203): a Mix-Transformer (MiT) encoder and an all-MLP decoder.

Four stages of overlapping patch embeddings (conv 7×7 stride 4, then 3×3 stride 2) with LayerNorm, each followed by
transformer blocks of efficient self-attention (keys and values from a map reduced by a strided conv, ratio
``sr_ratios``) and a Mix-FFN (linear → 3×3 depthwise conv → GELU → linear); the decoder maps each stage to
``decoder_dim`` channels with a 1×1 conv, upsamples them to stride 4, concatenates, fuses (1×1 ConvBnAct) and
classifies, and the logits are upsampled to the input size. MiT-b0 at width 1: dims (32, 64, 160, 256), heads
(1, 2, 5, 8), two blocks per stage, decoder 256.

Written for pruning: each attention keeps its head size in ``head_dim`` (the stream is LayerNorm-normalised, so its
channels are frozen, and a size computed from the stream's width would tie the heads to it); heads, the Mix-FFN's
hidden channels and the decoder's channels are cut. Deviations: no stochastic depth or dropout.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ConvBnAct, check_num_classes, scale_width
from .registry import register_model

MIT_B0 = dict(dims=(32, 64, 160, 256), heads=(1, 2, 5, 8), depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1))


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: a strided conv, flattened to tokens (N, H·W, C), LayerNorm."""

    def __init__(self, in_channels: int, dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size, stride, kernel_size // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        height, width = x.shape[2], x.shape[3]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from the token map reduced ``sr_ratio`` times."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        self.num_heads, self.head_dim, self.sr_ratio = num_heads, dim // num_heads, sr_ratio
        self.scale = (dim // num_heads) ** -0.5  # a constant: cutting a head's features keeps the trained scale
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        b, n = x.shape[0], x.shape[1]
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(x.transpose(1, 2).reshape(b, -1, height, width)).flatten(2).transpose(1, 2))
        kv = self.kv(x).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class MixFFN(nn.Module):
    """Linear → 3×3 depthwise conv on the token map (SegFormer's positional information) → GELU → linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        x = self.fc1(x)
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, height, width)).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + Mix-FFN(LN(x))."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), EfficientAttention(dim, num_heads, sr_ratio)
        self.norm2, self.mlp = nn.LayerNorm(dim), MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        x = x + self.attn(self.norm1(x), height, width)
        return x + self.mlp(self.norm2(x), height, width)


class Stage(nn.Module):
    """Patch embedding, blocks, LayerNorm; returns the (N, C, H, W) map."""

    def __init__(self, in_channels: int, dim: int, num_heads: int, depth: int, sr_ratio: int, mlp_ratio: float,
                 first: bool):
        super().__init__()
        self.embed = PatchEmbed(in_channels, dim, 7 if first else 3, 4 if first else 2)
        self.blocks = nn.ModuleList(Block(dim, num_heads, sr_ratio, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x, height, width = self.embed(x)
        for block in self.blocks:
            x = block(x, height, width)
        return self.norm(x).transpose(1, 2).reshape(x.shape[0], -1, height, width)


class SegFormer(nn.Module):
    """MiT encoder, all-MLP decoder; ``forward`` returns ``{"out": logits at the input size}``."""

    use_aux = False
    exportable = True
    needs_divisible_input = 1

    def __init__(self, *, num_classes: int, in_channels: int = 3, dims=MIT_B0["dims"], heads=MIT_B0["heads"],
                 depths=MIT_B0["depths"], sr_ratios=MIT_B0["sr_ratios"], mlp_ratio: float = 4.0,
                 decoder_dim: int = 256):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        c_in = [in_channels, *dims[:-1]]
        self.stages = nn.ModuleList(Stage(c, d, h, n, r, mlp_ratio, i == 0) for i, (c, d, h, n, r) in
                                    enumerate(zip(c_in, dims, heads, depths, sr_ratios, strict=True)))
        self.linear = nn.ModuleList(nn.Conv2d(d, decoder_dim, 1) for d in dims)
        self.fuse = ConvBnAct(len(dims) * decoder_dim, decoder_dim, 1)
        self.classifier = nn.Conv2d(decoder_dim, num_classes, 1)
        self.apply(_init)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size, feats = x.shape[-2:], []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        ref = feats[0].shape[-2:]
        maps = [F.interpolate(lin(f), size=ref, mode="bilinear", align_corners=False) if i else lin(f)
                for i, (lin, f) in enumerate(zip(self.linear, feats, strict=True))]
        logits = self.classifier(self.fuse(torch.cat(maps[::-1], dim=1)))
        return {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}


def _init(m: nn.Module) -> None:
    """SegFormer's initialisation: truncated-normal linears (std 0.02), He-normal convs (fan-out over groups)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, std=(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups)) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _create_segformer(*, num_classes: int, width: float = 1.0, heads=MIT_B0["heads"], decoder_dim: int = 256,
                      **kwargs) -> SegFormer:
    """MiT-b0 with every width (stage dims, decoder) scaled by ``width``; head counts are kept, so heads shrink."""
    dims = tuple(scale_width(d, width, min_channels=h) // h * h for d, h in zip(MIT_B0["dims"], heads, strict=True))
    return SegFormer(num_classes=num_classes, dims=dims, heads=heads,
                     decoder_dim=scale_width(decoder_dim, width), **kwargs)


@register_model
def segformer_mit_b0(*, num_classes: int, **kwargs) -> SegFormer:
    return _create_segformer(num_classes=num_classes, **kwargs)


@register_model
def test_segformer(*, num_classes: int, **kwargs) -> SegFormer:
    return _create_segformer(num_classes=num_classes, **{"width": 0.2, "heads": (1, 2, 2, 4),
                                                         "depths": (1, 1, 1, 1), "mlp_ratio": 2.0,
                                                         "decoder_dim": 64, **kwargs})
