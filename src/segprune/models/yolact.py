"""YOLACT (Bolya, Zhou, Xiao, Lee, "YOLACT: Real-time Instance Segmentation", ICCV 2019, arXiv:1904.02689).

A ResNet backbone (7×7 stem, output stride 32); an FPN on C3–C5 (1×1 laterals to 256 channels, bilinear top-down
adds, a 3×3 conv + ReLU per level) with two extra stride-2 3×3 convs on top, giving P3–P7; a protonet on P3 (three
3×3 convs, ×2 bilinear upsample, a 3×3 conv, a 1×1 conv to k = 32 prototypes, ReLU after each but the last: see the
deviations); one prediction head shared by every level (a 3×3 conv + ReLU, then 3×3 convs to (K + 1) class logits,
4 box offsets and k tanh mask coefficients per anchor); anchors with aspect ratios 1, 1/2, 2 at scales 24, 48, 96,
192, 384 (for a 550 input) on P3–P7; in training, a 1×1 semantic-segmentation head on P3 (K logits). Inference
(``postprocess``): SSD box decoding, Fast NMS (the paper's matrix form, per class), masks ``sigmoid(P·cᵀ)`` with the
logits upsampled (bilinear) to the input, cropped to the box padded by one prototype pixel, as the loss teaches them.
The loss is in ``yolact_loss.py``.

Outputs, channels first so the pruning engine's channel dim is dim 1: ``cls`` (N, A, K + 1) logits (0 = background),
``box`` (N, A, 4) encoded offsets, ``coef`` (N, A, k), ``proto`` (N, k, Hp, Wp) and, in training, ``seg`` (N, K, Hs,
Ws). ``anchors(h, w)`` gives the A anchors (cx, cy, w, h), normalised, of an h×w input (A = 19248 at 550×550).

Deviations from the released implementation: anchors have the paper's aspect ratios (the released config makes them
square, "for backward compatibility with a bug"); anchor scales are pixels of the network input, whatever its size
(24..384 = 3 × the level's stride). The reference scales them with the input (scale / 550 of the input size, its
im400 / im700 configs; ``scale_anchors_with_input=True`` here): the same at 550, but at a small input the anchors
shrink while the strides do not, so anchors fall far apart relative to their size and few of them overlap an object
by IoU >= 0.5. On the 96×96 synthetic demo scenes (objects of median 22 px) that left one forced match per object:
after 20 epochs box AP 0.02 % and mask AP 0.02 %, against 6.5 % and 5.5 % with pixel anchors (same budget, seed 0).
With ``scale_anchors_with_input`` on a non-square input an anchor's w is a fraction of the width, its h of the
height, as in the reference's normalised coordinates after its square resize; the backbone's BN is trainable
(network slimming needs γ to move; freeze it in the trainer to follow the reference); ``forward(x,
assemble=True)`` returns the masks of every anchor before NMS, ``sigmoid(einsum(proto, coef))``, in place of
``proto`` and ``coef`` (see Pruning). As the reference: Xavier-uniform init and zero biases after the backbone
(He-normal in the backbone, or loaded weights).

Deviation: the prototypes are linear (``proto_activation="linear"``, the default; ``"relu"`` is the paper's). With
ReLU prototypes a mask logit ``P·cᵀ`` is exactly 0 wherever every prototype is 0, and there no gradient reaches the
prototypes: that region of the mask is stuck at probability 0.5, which the 0.5 threshold reads as background, and a
prototype channel killed by one large step stays dead. With few prototypes (test_yolact has 8) this dominates:
overfitting 8 synthetic 96×128 scenes (width 1/8, AdamW 3e-3, 300 epochs), 57 % of the prototype values were 0,
5 of 55 confident detections had an empty mask and mask AP stayed at 0.39 against a box AP of 0.96. Linear
prototypes, the input-resolution mask loss (``yolact_loss.py``) and masks upsampled as logits here reach mask AP
0.73 (AP50 0.98, no empty mask; box AP 0.96); with ReLU prototypes and the other two, 0.50 (6 empty masks). The last
layer is an ``nn.Identity`` in place of the ReLU, so indices and state-dict keys are the same for both.

Size (80 COCO classes, k = 32; ``tests/test_yolact.py`` checks these on the meta device): yolact_resnet50 has
31,164,943 parameters: backbone 23,508,032 (ResNet-50 without its classifier), FPN 3,868,672, protonet 2,368,544,
shared head 1,399,135, semantic head 20,560 (training only: 31,144,383 at inference); yolact_resnet101 has
50,157,071. At 550×550, eval mode, the convolutions take 59.14 GMACs (ResNet-50) and 82.34 GMACs (ResNet-101), from
the engine's trace (``channel_groups(...).total_macs``). No parameter count is taken from the paper (its tables give
fps and AP); 31.2 M float32 parameters make a weight file of about 125 MB.

Pruning: prototypes and coefficients are the model's outputs, so a plain trace keeps them (they "reach the model's
output"). Trace with ``model.prune_inputs(x)`` instead: the forward then contracts them inside the model, and the
engine couples prototype i with coefficient i of every anchor type (the reshape of the head's (N, A·k, H, W) output
into (N, H·W·A, k) makes the three coefficient channels one channel; the einsum makes it the prototype's), so the
protonet's last conv and the head's coefficient conv lose the same k indices. The head's weights are one module
called on every level: its call sites share one channel space.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import ResNet, load_backbone_weights, resnet
from .layers import LayerFn, check_num_classes, init_weights, scale_width
from .registry import register_model
from .yolact_loss import YolactLoss, box_iou, crop_masks, decode, mask_logits

__all__ = ["Yolact", "YolactLoss", "fast_nms", "postprocess"]

ASPECT_RATIOS = (1.0, 0.5, 2.0)
ANCHOR_SCALES = (24, 48, 96, 192, 384)  # pixels of a 550×550 input, one per level P3..P7
REFERENCE_SIZE = 550


class FPN(nn.Module):
    """Feature pyramid on C3..C5 plus `extra` stride-2 convs: returns P3..P(5 + extra), all `channels` wide."""

    def __init__(self, in_channels: list[int], channels: int, extra: int = 2):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        self.downsample = nn.ModuleList(nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(extra))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        x = self.lateral[-1](feats[-1])
        merged = [x]
        for lateral, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            x = F.interpolate(x, size=f.shape[-2:], mode="bilinear", align_corners=False) + lateral(f)
            merged.insert(0, x)
        levels = [F.relu(smooth(m)) for smooth, m in zip(self.smooth, merged)]
        for down in self.downsample:  # no ReLU here, as the reference
            levels.append(down(levels[-1]))
        return levels


PROTO_ACTIVATIONS = ("linear", "relu")


def protonet(in_channels: int, channels: int, num_prototypes: int, activation: str = "linear") -> nn.Sequential:
    """3×3 convs ×3, ×2 upsample, 3×3 conv, 1×1 conv to the prototypes; ReLU after each but the last, whose
    `activation` is "linear" (an Identity, so the layer indices and state keys stay those of "relu") or "relu"."""
    if activation not in PROTO_ACTIVATIONS:
        raise ValueError(f"proto_activation must be one of {PROTO_ACTIVATIONS}, got {activation!r}")
    layers = []
    for i in range(4):
        if i == 3:
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1), nn.ReLU()]
    last = nn.ReLU() if activation == "relu" else nn.Identity()
    return nn.Sequential(*layers, nn.Conv2d(channels, num_prototypes, 1), last)


def per_anchor(t: Tensor, num_anchors: int) -> Tensor:
    """(N, A·c, H, W) -> (N, H·W·A, c): location-major, anchor type next, as the anchors are laid out."""
    n, channels, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n, h * w * num_anchors, channels // num_anchors)


class PredictionHead(nn.Module):
    """One head for every level: class logits, box offsets and tanh mask coefficients per anchor."""

    def __init__(self, channels: int, num_classes: int, num_prototypes: int, num_anchors: int = 3):
        super().__init__()
        self.num_anchors = num_anchors
        self.upfeature = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
        self.cls = nn.Conv2d(channels, num_anchors * (num_classes + 1), 3, padding=1)
        self.box = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        self.coef = nn.Conv2d(channels, num_anchors * num_prototypes, 3, padding=1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        y = self.upfeature(x)
        a = self.num_anchors
        return {"cls": per_anchor(self.cls(y), a), "box": per_anchor(self.box(y), a),
                "coef": torch.tanh(per_anchor(self.coef(y), a))}


def make_anchors(level_sizes: list[tuple[int, int]], scales: list[float], ratios=ASPECT_RATIOS) -> Tensor:
    """(cx, cy, w, h) normalised, for each level, row, column and aspect ratio in that order (A, 4)."""
    out = []
    for (h, w), scale in zip(level_sizes, scales):
        grid = [(torch.arange(n, dtype=torch.float64) + 0.5) / n for n in (h, w)]
        cy, cx = torch.meshgrid(*grid, indexing="ij")
        root = torch.tensor(ratios, dtype=torch.float64).sqrt()
        size = torch.stack([scale * root, scale / root], dim=1)  # (R, 2): w, h
        centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2).expand(-1, len(ratios), 2)
        out.append(torch.cat([centres, size.expand(h * w, -1, -1)], dim=-1).reshape(-1, 4))
    return torch.cat(out).float()


class Yolact(nn.Module):
    """YOLACT on a backbone publishing ``out_channels`` and returning [stem, C2, C3, C4, C5] at strides 2..32."""

    needs_divisible_input = 1  # any size: every stride-2 layer maps n to ceil(n / 2), and anchors follow
    exportable = True  # the raw head outputs below; anchors, NMS and mask assembly stay in Python (postprocess)
    export_outputs = ("cls", "box", "coef", "proto")
    task = "instance"

    def __init__(self, backbone: nn.Module, *, num_classes: int, width: float = 1.0, num_prototypes: int = 32,
                 aux_head: bool = True, anchor_scales: tuple[float, ...] = ANCHOR_SCALES,
                 scale_anchors_with_input: bool = False, proto_activation: str = "linear"):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.backbone = backbone
        channels = scale_width(256, width)
        self.fpn = FPN(backbone.out_channels[2:], channels, extra=len(anchor_scales) - 3)
        self.protonet = protonet(channels, channels, num_prototypes, proto_activation)
        self.head = PredictionHead(channels, num_classes, num_prototypes)
        self.seg_head = nn.Conv2d(channels, num_classes, 1) if aux_head else None
        self.anchor_scales = tuple(float(s) for s in anchor_scales)  # pixels (of a 550 input when scaled)
        self.scale_anchors_with_input = scale_anchors_with_input
        self._anchors: dict[tuple[int, int], Tensor] = {}
        init_weights(self.backbone)
        for m in nn.ModuleList([self.fpn, self.protonet, self.head, self.seg_head]).modules():
            if isinstance(m, nn.Conv2d):  # the reference's init after the backbone
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def use_aux(self) -> bool:
        """Whether training mode returns ``"seg"``."""
        return self.seg_head is not None

    @property
    def num_prototypes(self) -> int:
        """k, read from the protonet's last conv (pruning changes it)."""
        return self.protonet[-2].out_channels

    def anchors(self, h: int, w: int) -> Tensor:
        """The (A, 4) anchors (cx, cy, w, h), normalised, of an h×w input; cached per size, never in the state."""
        if (h, w) not in self._anchors:
            sizes, (fh, fw) = [], (h, w)
            for level in range(2 + len(self.anchor_scales)):  # strides 2, 4, .., 2^(levels + 2)
                fh, fw = -(-fh // 2), -(-fw // 2)
                if level >= 2:
                    sizes.append((fh, fw))
            if self.scale_anchors_with_input:  # the reference: fractions of the input, as at 550
                anchors = make_anchors(sizes, [s / REFERENCE_SIZE for s in self.anchor_scales])
            else:  # pixels: w normalised by the width, h by the height
                anchors = make_anchors(sizes, list(self.anchor_scales))
                anchors[:, 2:] /= anchors.new_tensor([w, h])
            self._anchors[(h, w)] = anchors
        return self._anchors[(h, w)]

    def prune_inputs(self, x: Tensor) -> dict:
        """Example inputs for the pruning engine under which prototypes and coefficients are prunable together."""
        return {"x": x, "assemble": True}

    def forward(self, x: Tensor, *, assemble: bool = False) -> dict[str, Tensor]:
        levels = self.fpn(self.backbone(x)[2:])
        heads = [self.head(level) for level in levels]  # one module, shared weights, every level
        out = {key: torch.cat([h[key] for h in heads], dim=1) for key in ("cls", "box", "coef")}
        out["proto"] = self.protonet(levels[0])
        if assemble:
            out["masks"] = torch.sigmoid(torch.einsum("nkhw,nak->nahw", out.pop("proto"), out.pop("coef")))
        if self.training and self.seg_head is not None:
            out["seg"] = self.seg_head(levels[0])
        return out


# --- inference ----------------------------------------------------------------------------------------------------
def fast_nms(boxes: Tensor, scores: Tensor, *, iou_threshold: float = 0.5, top_k: int = 200,
             score_threshold: float = 0.05) -> tuple[Tensor, Tensor, Tensor]:
    """Fast NMS (the paper's section 3.4): per class, keep a box unless a higher-scored box of its class overlaps it
    by more than `iou_threshold`, whether or not that box was itself kept.

    Args:
        boxes: (A, 4) xyxy.
        scores: (K, A) per-class scores.
        top_k: candidates per class, by score.

    Returns:
        (box index, score, class) of each kept detection.
    """
    k = min(top_k, scores.shape[1])
    if k == 0:
        empty = scores.new_zeros(0, dtype=torch.long)
        return empty, scores.new_zeros(0), empty
    scores, order = scores.sort(dim=1, descending=True)
    scores, order = scores[:, :k], order[:, :k]
    candidates = boxes[order]  # (K, k, 4)
    iou = box_iou(candidates, candidates).triu(diagonal=1)
    keep = (iou.max(dim=1).values <= iou_threshold) & (scores > score_threshold)
    classes = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(keep)
    return order[keep], scores[keep], classes[keep]


def postprocess(outputs: dict[str, Tensor], anchors: Tensor, image_size: tuple[int, int], *,
                score_thresh: float = 0.05, nms_iou: float = 0.5, top_k: int = 100, mask_thresh: float = 0.5,
                pre_nms_top_k: int = 200) -> list[dict[str, Tensor]]:
    """Detections per image: {"boxes" (P, 4) xyxy pixels, "scores" (P,), "labels" (P,) in 0..K-1, "masks" bool
    (P, H, W)}, at most `top_k`, best first.

    Args:
        outputs: the model's eval-mode outputs (``cls``, ``box``, ``coef``, ``proto``).
        anchors: ``model.anchors(H, W)`` of this input size.
        image_size: the network input's (H, W).
    """
    if anchors.shape[0] != outputs["cls"].shape[1]:
        raise ValueError(f"{anchors.shape[0]} anchors for {outputs['cls'].shape[1]} predictions: use "
                         "model.anchors(h, w) of this input size")
    outputs = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in outputs.items()}
    anchors = anchors.to(outputs["box"])  # (NMS in half precision would merge boxes that differ)
    boxes = decode(outputs["box"], anchors)
    scores = outputs["cls"].softmax(dim=-1)[..., 1:]
    kw = dict(score_thresh=score_thresh, nms_iou=nms_iou, top_k=top_k, mask_thresh=mask_thresh,
              pre_nms_top_k=pre_nms_top_k)
    return [_detect(b, s, c, p, tuple(image_size), **kw)
            for b, s, c, p in zip(boxes, scores, outputs["coef"], outputs["proto"])]


def _detect(boxes, scores, coef, proto, image_size, *, score_thresh, nms_iou, top_k, mask_thresh, pre_nms_top_k):
    candidate = scores.max(dim=1).values > score_thresh
    boxes, scores, coef = boxes[candidate], scores[candidate].t(), coef[candidate]
    index, kept, labels = fast_nms(boxes, scores, iou_threshold=nms_iou, top_k=pre_nms_top_k,
                                   score_threshold=score_thresh)
    best = kept.argsort(descending=True)[:top_k]
    index, kept, labels = index[best], kept[best], labels[best]
    h, w = image_size
    box = boxes[index].clamp(0, 1)
    if len(index):  # logits upsampled, then cropped by one prototype pixel around the box: as the loss is taught
        logits, padding = mask_logits(proto, coef[index], (h, w))
        masks = crop_masks(torch.sigmoid(logits), box, padding) > mask_thresh
    else:
        masks = torch.zeros(0, h, w, dtype=torch.bool, device=proto.device)
    return {"boxes": box * box.new_tensor([w, h, w, h]), "scores": kept, "labels": labels, "masks": masks}


# --- builders -----------------------------------------------------------------------------------------------------
def _create_yolact(backbone: str, *, num_classes: int, in_channels: int = 3, width: float = 1.0,
                   backbone_width: float | None = None, num_prototypes: int = 32, aux_head: bool = True,
                   norm_layer: LayerFn = nn.BatchNorm2d, act_layer: LayerFn = nn.ReLU,
                   backbone_weights: str | Path | None = None, proto_activation: str = "linear",
                   anchor_scales: tuple[float, ...] = ANCHOR_SCALES,
                   scale_anchors_with_input: bool = False) -> Yolact:
    encoder: ResNet = resnet(backbone, in_channels=in_channels, width=width if backbone_width is None else
                             backbone_width, output_stride=32, norm_layer=norm_layer, act_layer=act_layer)
    model = Yolact(encoder, num_classes=num_classes, width=width, num_prototypes=num_prototypes, aux_head=aux_head,
                   proto_activation=proto_activation, anchor_scales=tuple(anchor_scales),
                   scale_anchors_with_input=scale_anchors_with_input)
    if backbone_weights is not None:
        load_backbone_weights(model.backbone, backbone_weights)
    return model


@register_model
def yolact_resnet50(*, num_classes: int, **kwargs) -> Yolact:
    return _create_yolact("resnet50", num_classes=num_classes, **kwargs)


@register_model
def yolact_resnet101(*, num_classes: int, **kwargs) -> Yolact:
    return _create_yolact("resnet101", num_classes=num_classes, **kwargs)


@register_model
def test_yolact(*, num_classes: int, **kwargs) -> Yolact:
    return _create_yolact("resnet_tiny", num_classes=num_classes, **{"width": 1 / 16, "backbone_width": 1 / 32,
                                                                    "num_prototypes": 8, **kwargs})

