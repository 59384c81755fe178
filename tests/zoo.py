"""Small architectures that exercise the couplings peers get wrong, for the oracle tests.

The seeds' own architectures come from the registry (`test_*` models); these add the patterns that
are not in them: an FPN whose head is shared across levels, a sigmoid attention gate, a GroupNorm
decoder, a single-channel gate broadcast onto many channels, a stage computed and then discarded,
channel split/chunk, slicing, flatten into a linear layer, and an op the engine does not know.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def cbr(cin, cout, k=3, norm=nn.BatchNorm2d, **kw):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2 * kw.get("dilation", 1), bias=False, **kw),
                         norm(cout), nn.ReLU())


class FPNShared(nn.Module):
    """Lateral 1x1 convs + top-down adds; one head applied to every level (shared weights)."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.c2, self.c3, self.c4 = cbr(3, 8), cbr(8, 12), cbr(12, 16)
        self.lat = nn.ModuleList([nn.Conv2d(c, 10, 1) for c in (8, 12, 16)])
        self.head = nn.Sequential(cbr(10, 10), nn.Conv2d(10, num_classes, 1))

    def forward(self, x):
        f2 = self.c2(x)
        f3 = self.c3(F.max_pool2d(f2, 2))
        f4 = self.c4(F.max_pool2d(f3, 2))
        p4 = self.lat[2](f4)
        p3 = self.lat[1](f3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        p2 = self.lat[0](f2) + F.interpolate(p3, scale_factor=2.0, mode="nearest")
        outs = [self.head(p) for p in (p2, p3, p4)]
        return {"out": outs[0] + F.interpolate(outs[1], size=x.shape[-2:], mode="bilinear", align_corners=False),
                "levels": outs[2]}


class AttentionGate(nn.Module):
    """x * sigmoid(gate(x)) with a per-channel gate, then a single-channel spatial gate broadcast onto C."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.stem = cbr(3, 12)
        self.gate = nn.Conv2d(12, 12, 1)
        self.spatial = nn.Conv2d(12, 1, 3, padding=1)
        self.body = cbr(12, 12)
        self.cls = nn.Conv2d(12, num_classes, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x * torch.sigmoid(self.gate(x))
        x = self.body(x) * torch.sigmoid(self.spatial(x))  # (N,1,H,W) broadcast: couples nothing
        return self.cls(x)


class GroupNormDecoder(nn.Module):
    """Encoder with BN, decoder with GroupNorm (channels of a group live and die together)."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.enc1, self.enc2 = cbr(3, 8), cbr(8, 16)
        gn = lambda c: nn.GroupNorm(4, c)  # noqa: E731
        self.dec1 = cbr(16, 16, norm=gn)
        self.dec2 = cbr(16 + 8, 12, norm=gn)
        self.cls = nn.Conv2d(12, num_classes, 1)

    def forward(self, x):
        a = self.enc1(x)
        b = self.enc2(F.max_pool2d(a, 2))
        d = F.interpolate(self.dec1(b), size=a.shape[-2:], mode="bilinear", align_corners=False)
        return self.cls(self.dec2(torch.cat([d, a], 1)))


class DiscardedStage(nn.Module):
    """An encoder that computes a stage and throws it away; its input must still be pruned consistently."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.s1, self.s2, self.unused = cbr(3, 8), cbr(8, 16), cbr(16, 24)
        self.cls = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        f = self.s2(self.s1(x))
        self.unused(f)  # computed, discarded
        return self.cls(f)


class SplitSliceLinear(nn.Module):
    """Channel chunk + slice + cat, a transposed conv, and a flatten -> linear image-level head."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.stem = cbr(3, 16)
        self.left, self.right = cbr(8, 8), cbr(8, 6)
        self.down = cbr(14 + 4, 12, stride=2)
        self.up = nn.ConvTranspose2d(12, 10, 2, stride=2)
        self.up_bn = nn.BatchNorm2d(10)
        self.cls = nn.Conv2d(10, num_classes, 1)
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x):
        s = self.stem(x)
        a, b = s.chunk(2, dim=1)
        y = torch.cat([self.left(a), self.right(b), s[:, 4:8]], 1)
        d = self.down(y)
        logits = self.fc(F.adaptive_avg_pool2d(d, 4).flatten(1))
        return {"out": self.cls(F.relu(self.up_bn(self.up(d)))), "image": logits}


class DepthwiseResidual(nn.Module):
    """Inverted residual blocks with depthwise convs and a dilated strided stem, PReLU, dropout."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.PReLU(8))
        self.block = nn.Sequential(nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6(),
                                   nn.Conv2d(24, 24, 3, padding=2, dilation=2, groups=24, bias=False),
                                   nn.BatchNorm2d(24), nn.ReLU6(), nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.grouped = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(12))
        self.drop = nn.Dropout2d(0.1)
        self.cls = nn.Conv2d(12, num_classes, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)
        y = F.interpolate(self.drop(F.relu(self.grouped(x))), scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.cls(y)


class UnknownOp(nn.Module):
    """Uses an op without a channel rule (roll along the channels): its channels must be frozen, with a warning."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.a, self.b = cbr(3, 16), cbr(16, 8)
        self.mid = cbr(8, 8)
        self.cls = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        return self.cls(self.mid(torch.roll(self.b(self.a(x)), 1, dims=1)))


class SubPixel(nn.Module):
    """Sub-pixel upsampling (conv -> pixel_shuffle, ESPNet/ENet-style decoders), pixel_unshuffle back, and an
    unfold/fold (im2col) pair: channels follow in blocks of r² (or one per kernel position)."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.a, self.b = cbr(3, 16), nn.Conv2d(16, 32, 3, padding=1)
        self.c = cbr(8, 8)
        self.d = nn.Conv2d(32, 12, 1)
        self.cls = nn.Conv2d(12, num_classes, 1)

    def forward(self, x):
        y = self.c(F.pixel_shuffle(self.b(self.a(x)), 2))  # (N, 32, H, W) -> (N, 8, 2H, 2W)
        y = self.d(F.pixel_unshuffle(y, 2))  # -> (N, 32, H, W)
        h, w = y.shape[-2:]
        y = F.fold(F.unfold(y, 3, padding=1), (h, w), 3, padding=1)  # each pixel summed over 9 patches
        return self.cls(F.relu(y))


class ChannelsLast(nn.Module):
    """A token MLP over channels-last features (permute -> linear -> permute back), a residual add, InstanceNorm,
    and a narrow along a spatial dim."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.stem = cbr(3, 12)
        self.mlp = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 12))
        self.norm = nn.InstanceNorm2d(12, affine=True)
        self.cls = nn.Conv2d(12, num_classes, 1)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = torch.narrow(self.norm(x), 2, 0, x.shape[2] - 1)
        return self.cls(F.pad(x, (0, 0, 0, 1)))


ZOO = {cls.__name__: cls for cls in (FPNShared, AttentionGate, GroupNormDecoder, DiscardedStage, SplitSliceLinear,
                                       DepthwiseResidual, UnknownOp, ChannelsLast, SubPixel)}


# --- soundness cases (issue #13): ops between producer and consumer that do not map 0 to 0, saved shapes, splits
class Between(nn.Module):
    """stem -> p (16 channels, the ones cut) -> `op` -> q -> cls; `kernel` 1 lets q take the constant into its bias,
    3 (zero-padded) does not."""

    def __init__(self, op, kernel=1, padding=None, num_classes=3, norm=True):
        super().__init__()
        self.op = op
        self.stem = cbr(3, 8)
        self.p = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)) if norm else nn.Conv2d(8, 16, 1)
        self.q = nn.Conv2d(16, 8, kernel, padding=kernel // 2 if padding is None else padding)
        self.cls = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        y = self.q(self.op(self, self.p(self.stem(x))))
        return self.cls(F.interpolate(y, size=x.shape[-2:]))


def _between(name, op, **kw):
    return type(name, (Between,), {"__init__": lambda self, num_classes=3: Between.__init__(self, op, **kw)})


class _AffineFree(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16, affine=False))


SOUNDNESS = {
    "SigmoidThen1x1": _between("SigmoidThen1x1", lambda m, y: torch.sigmoid(y)),
    "SigmoidThen3x3": _between("SigmoidThen3x3", lambda m, y: torch.sigmoid(y), kernel=3),
    "HardsigmoidThen3x3": _between("HardsigmoidThen3x3", lambda m, y: F.hardsigmoid(y), kernel=3),
    "AddConst": _between("AddConst", lambda m, y: y + 1.0),
    "OnesLike": _between("OnesLike", lambda m, y: y + torch.ones_like(y)),
    "Exp": _between("Exp", lambda m, y: torch.exp(y)),
    "Softplus": _between("Softplus", lambda m, y: F.softplus(y), kernel=3, padding=0),
    "PadValue": _between("PadValue", lambda m, y: F.pad(y, (1, 1, 1, 1), value=1.0), kernel=3, padding=0),
    "AffineFreeBN": _between("AffineFreeBN", lambda m, y: F.relu(m.free(y)), norm=False),
    "ParamAdd": _between("ParamAdd", lambda m, y: y + m.shift),
    # a one-channel spatial gate is no factor of the cut channels: sigmoid(0) * gate is still nonzero
    "GatedSigmoid": _between("GatedSigmoid", lambda m, y: torch.sigmoid(y) * F.relu(m.gate(y)), kernel=3),
}


def _with_parts(cls, **parts):
    init = cls.__init__

    def __init__(self, num_classes=3):
        init(self, num_classes)
        for name, make in parts.items():
            setattr(self, name, make())

    return type(cls.__name__, (cls,), {"__init__": __init__})


SOUNDNESS["AffineFreeBN"] = _with_parts(SOUNDNESS["AffineFreeBN"], free=lambda: nn.BatchNorm2d(16, affine=False))
SOUNDNESS["ParamAdd"] = _with_parts(SOUNDNESS["ParamAdd"], shift=lambda: nn.Parameter(torch.ones(1)))
SOUNDNESS["GatedSigmoid"] = _with_parts(SOUNDNESS["GatedSigmoid"], gate=lambda: nn.Conv2d(16, 1, 1))


class SavedShape(nn.Module):
    """transformers' DPT reassemble: a shape saved before a token projection, reused to fold the tokens back."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.stem = cbr(3, 16)
        self.proj = nn.Linear(16, 16)
        self.other = cbr(3, 8)
        self.cls, self.side = nn.Conv2d(16, num_classes, 1), nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        y = self.stem(x)
        shape = y.shape
        z = self.proj(y.flatten(2).transpose(1, 2))
        return self.cls(z.transpose(1, 2).reshape(shape)) + self.side(self.other(x))


class IntSplit(nn.Module):
    """res2net's split into fixed-size pieces, each through its own conv."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.stem = cbr(3, 16)
        self.branches = nn.ModuleList([cbr(8, 8), cbr(8, 8)])
        self.cls = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        parts = torch.split(self.stem(x), 8, dim=1)
        return self.cls(torch.cat([b(p) for b, p in zip(self.branches, parts)], 1))


SOUNDNESS.update({"SavedShape": SavedShape, "IntSplit": IntSplit})
ZOO.update(SOUNDNESS)


# --- modern blocks (issue #13): channels-last LayerNorm, ConvNeXt's MLP, layer scale
class LayerNorm2d(nn.LayerNorm):
    """timm's / smp's LayerNorm2d: a LayerNorm over the channels of NCHW, through two permutes."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, channels-last LayerNorm, Linear MLP (hidden channels: no norm between the two
    Linears, so they prune exactly), layer scale, residual. `conv_mlp`: timm's variant with 1x1 convs and a
    LayerNorm2d."""

    def __init__(self, dim, conv_mlp=False):
        super().__init__()
        self.conv_mlp = conv_mlp
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim) if conv_mlp else nn.LayerNorm(dim)
        mlp = (lambda a, b: nn.Conv2d(a, b, 1)) if conv_mlp else nn.Linear
        self.fc1, self.act, self.fc2 = mlp(dim, 4 * dim), nn.GELU(), mlp(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        if self.conv_mlp:
            x = self.fc2(self.act(self.fc1(self.norm(x)))) * self.gamma.reshape(1, -1, 1, 1)
        else:
            x = self.gamma * self.fc2(self.act(self.fc1(self.norm(x.permute(0, 2, 3, 1)))))
            x = x.permute(0, 3, 1, 2)
        return shortcut + x


class ConvNeXtTiny(nn.Module):
    """Stem (patchify conv + LayerNorm2d), two stages with a LayerNorm2d + strided-conv downsample, a UPerNet-like
    LayerNorm2d + 3x3 conv head."""

    def __init__(self, num_classes=3, conv_mlp=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), LayerNorm2d(8))
        self.stage1 = nn.Sequential(ConvNeXtBlock(8, conv_mlp), ConvNeXtBlock(8, conv_mlp))
        self.down = nn.Sequential(LayerNorm2d(8), nn.Conv2d(8, 16, 2, stride=2))
        self.stage2 = nn.Sequential(ConvNeXtBlock(16, conv_mlp))
        self.head = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), LayerNorm2d(12), nn.ReLU(), nn.Conv2d(12, 12, 1))
        self.cls = nn.Conv2d(12, num_classes, 1)

    def forward(self, x):
        y = self.head(self.stage2(self.down(self.stage1(self.stem(x)))))
        return F.interpolate(self.cls(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


class ConvNeXtConvMLP(ConvNeXtTiny):
    def __init__(self, num_classes=3):
        super().__init__(num_classes, conv_mlp=True)


MODERN = {"ConvNeXtTiny": ConvNeXtTiny, "ConvNeXtConvMLP": ConvNeXtConvMLP}
ZOO.update(MODERN)


# --- attention (issue #13): heads are not cut yet; what cannot be followed must be frozen, with a warning
class TokenAttention(nn.Module):
    """conv stem -> tokens -> multi-head self-attention (timm's fused qkv + SDPA, transformers' separate q/k/v +
    explicit softmax(q kᵀ) v, or nn.MultiheadAttention) -> MLP -> back to NCHW. The MLP hidden channels are
    prunable; heads are cut with the stream channels their widths are computed from, and nn.MultiheadAttention is
    swapped for SplitMultiheadAttention, whose heads are cut (issue #23)."""

    def __init__(self, num_classes=3, kind="sdpa", dim=16, heads=2):
        super().__init__()
        self.kind, self.heads = kind, heads
        self.stem = cbr(3, dim)
        if kind == "mha":
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        elif kind == "sdpa":
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.cls = nn.Conv2d(dim, num_classes, 1)

    def attend(self, t):
        b, n, c = t.shape
        if self.kind == "mha":
            return self.attn(t, t, t, need_weights=False)[0]
        if self.kind == "sdpa":
            q, k, v = self.qkv(t).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        split = lambda x: x.view(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(self.q(t)), split(self.k(t)), split(self.v(t))
        attn = torch.softmax(q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5, dim=-1)
        return self.proj((attn @ v).permute(0, 2, 1, 3).reshape(b, n, c))

    def forward(self, x):
        y = self.stem(x)
        b, c, h, w = y.shape
        t = y.flatten(2).transpose(1, 2)
        t = t + self.attend(t)
        t = t + self.fc2(F.gelu(self.fc1(t)))
        return self.cls(t.transpose(1, 2).reshape(b, c, h, w))


ATTENTION = {f"Attention_{kind}": type(f"Attention_{kind}", (TokenAttention,), {
    "__init__": (lambda k: lambda self, num_classes=3: TokenAttention.__init__(self, num_classes, k))(kind)})
    for kind in ("sdpa", "explicit", "mha")}


class HeadAttention(TokenAttention):
    """Attention whose heads can be cut: transformers' current SegFormer (`view(*shape, -1, head_dim)`, the head
    count inferred, SDPA with the scale fixed at init), its older form (`num_attention_heads` and `all_head_size`
    attributes, explicit softmax(q kᵀ / sqrt(head size)) v), and a per-feature split (`view(b, n, heads, -1)`,
    explicit scale: q/k and v features cut inside every head)."""

    def __init__(self, num_classes=3, kind="inferred", dim=16, heads=4):
        super().__init__(num_classes, "explicit", dim, heads)
        self.kind = kind
        del self.heads
        if kind == "attributes":
            self.num_attention_heads, self.attention_head_size, self.all_head_size = heads, dim // heads, dim
        elif kind == "inferred":
            self.head_dim, self.scaling = dim // heads, (dim // heads) ** -0.5
        else:
            self.num_heads, self.scale = heads, (dim // heads) ** -0.5

    def attend(self, t):
        b, n, _ = t.shape
        if self.kind == "attributes":
            split = lambda x: x.view(b, n, self.num_attention_heads, self.attention_head_size).permute(0, 2, 1, 3)  # noqa: E731,E501
            q, k, v = split(self.q(t)), split(self.k(t)), split(self.v(t))
            attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size), dim=-1)
            return self.proj((attn @ v).permute(0, 2, 1, 3).contiguous().view(b, n, self.all_head_size))
        if self.kind == "inferred":
            q, k, v = (f(t).view(b, n, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
            a = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        else:
            q, k, v = (f(t).view(b, n, self.num_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
            a = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(a.transpose(1, 2).reshape(b, n, -1))


HEADS = {f"Heads_{kind}": type(f"Heads_{kind}", (HeadAttention,), {
    "__init__": (lambda k: lambda self, num_classes=3: HeadAttention.__init__(self, num_classes, k))(kind)})
    for kind in ("inferred", "attributes", "features")}
ZOO.update(ATTENTION)
ZOO.update(HEADS)


class AttrSplit(nn.Module):
    """res2net (int `self.width`, pieces chained: sp = sp + spx[i]) or mixnet (list `self.splits`, one conv per
    piece): the sizes live in an attribute, which pruning rewrites."""

    def __init__(self, num_classes=3, sizes=None):
        super().__init__()
        self.stem = cbr(3, 12)
        if sizes is None:
            self.width = 4
            self.convs = nn.ModuleList([cbr(4, 4) for _ in range(2)])
        else:
            self.splits = sizes
            self.convs = nn.ModuleList([cbr(n, n, k=2 * i + 1) for i, n in enumerate(sizes)])
        self.cls = nn.Conv2d(12, num_classes, 1)

    def forward(self, x):
        y = self.stem(x)
        if hasattr(self, "width"):
            spx = torch.split(y, self.width, 1)
            sp, outs = spx[0], []
            for i, conv in enumerate(self.convs):
                sp = conv(sp if i == 0 else sp + spx[i])
                outs.append(sp)
            y = torch.cat([*outs, spx[-1]], 1)
        else:
            y = torch.cat([conv(p) for conv, p in zip(self.convs, torch.split(y, self.splits, 1))], 1)
        return self.cls(y)


class ListSplit(AttrSplit):
    def __init__(self, num_classes=3):
        super().__init__(num_classes, sizes=[6, 4, 2])


ZOO.update({"AttrSplit": AttrSplit, "ListSplit": ListSplit})


class StdConv(nn.Conv2d):
    """timm's StdConv2d (BiT) as timm writes it: each filter standardised over its inputs on every call."""

    eps = 1e-6

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv(nn.Conv2d):
    """timm's ScaledStdConv2d (NF-nets): standardised, times a learnt gain and gamma / sqrt(fan-in)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale, self.eps = self.weight[0].numel() ** -0.5, 1e-6
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                         weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                         eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


StdConv.__module__ = ScaledStdConv.__module__ = "timm.layers.std_conv"
StdConv.__qualname__, ScaledStdConv.__qualname__ = "StdConv2d", "ScaledStdConv2d"
