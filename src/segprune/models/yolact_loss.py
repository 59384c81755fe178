"""YOLACT's training loss (Bolya et al., ICCV 2019, arXiv:1904.02689), and the box coding it shares with inference.

Per image: every anchor is matched to the ground-truth box it overlaps most (IoU >= 0.5 positive, < 0.4 background,
in between ignored; each box also takes its best anchor, so no instance goes unmatched, as in SSD). Then

- box: smooth-L1 on SSD-encoded offsets (variances 0.1 for the centre, 0.2 for the log size) of positive anchors;
- conf: cross-entropy over positives and the hardest negatives, 3 negatives per positive (online hard example mining,
  ranked by background loss; an image without instances mines none, as in the reference implementation);
- mask: BCE between the assembled mask ``sigmoid(P·cᵀ)`` of each positive anchor and its instance's mask over the
  ground-truth box (padded by one prototype pixel), normalised by the box area, for at most ``masks_to_train``
  positives per image (a random subset, as the reference). The reference crops only the prediction, so a target
  pixel outside its own box would cost a clamped log(0); here pixels outside never count. Written on logits (BCE with
  logits), which is the same inside the box and safe under autocast. Deviation (``mask_resolution="input"``, the
  default): the mask logits are upsampled (bilinear, as ``postprocess`` upsamples the masks) to the input and
  compared there with the instance masks as they come; the reference (``"proto"``) downsamples the instance masks to
  the prototypes (bilinear, then > 0.5), at stride 4. That target erases small and thin instances (a 25-pixel
  object keeps 0–2 prototype pixels; on 8 synthetic 96×128 scenes, upsampling the downsampled targets themselves
  gives a mean IoU of 0.73 with the true masks) and leaves the boundaries between prototype pixels untaught. It
  costs (P, H, W) floats per image for P <= ``masks_to_train`` positives, instead of (P, H/4, W/4);
- seg: per-class BCE of the semantic auxiliary head against the union of each class's instance masks.

box, conf and mask are divided by the number of positives in the batch, seg by the batch size; weights as the paper:
conf 1, box 1.5, mask 6.125, seg 1. Deviation: the forced best-anchor matches are made one box at a time in input
order (the reference resolves conflicts between boxes that share a best anchor by overlap order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segprune._utils import unwrap

VARIANCES = (0.1, 0.2)


def point_form(anchors: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2)."""
    return torch.cat([anchors[:, :2] - anchors[:, 2:] / 2, anchors[:, :2] + anchors[:, 2:] / 2], dim=1)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes: (..., n, 4) x (..., m, 4) -> (..., n, m)."""
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter).clamp(min=1e-12)


def encode(boxes: Tensor, anchors: Tensor) -> Tensor:
    """Normalised xyxy boxes matched to (cx, cy, w, h) anchors -> SSD offsets."""
    centre = ((boxes[:, :2] + boxes[:, 2:]) / 2 - anchors[:, :2]) / (VARIANCES[0] * anchors[:, 2:])
    size = torch.log((boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6) / anchors[:, 2:]) / VARIANCES[1]
    return torch.cat([centre, size], dim=1)


def decode(offsets: Tensor, anchors: Tensor) -> Tensor:
    """SSD offsets (..., A, 4) on (A, 4) anchors -> normalised xyxy boxes."""
    centre = anchors[:, :2] + offsets[..., :2] * VARIANCES[0] * anchors[:, 2:]
    size = anchors[:, 2:] * torch.exp(offsets[..., 2:] * VARIANCES[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def crop_masks(masks: Tensor, boxes: Tensor, padding: int = 1) -> Tensor:
    """Zero each mask (P, H, W) outside its normalised xyxy box (P, 4), widened by `padding` pixels."""
    _, h, w = masks.shape
    x1 = (torch.minimum(boxes[:, 0], boxes[:, 2]) * w - padding).clamp(min=0)
    x2 = (torch.maximum(boxes[:, 0], boxes[:, 2]) * w + padding).clamp(max=w)
    y1 = (torch.minimum(boxes[:, 1], boxes[:, 3]) * h - padding).clamp(min=0)
    y2 = (torch.maximum(boxes[:, 1], boxes[:, 3]) * h + padding).clamp(max=h)
    cols = torch.arange(w, device=masks.device, dtype=masks.dtype)[None, None, :]
    rows = torch.arange(h, device=masks.device, dtype=masks.dtype)[None, :, None]
    inside = (cols >= x1[:, None, None]) & (cols < x2[:, None, None]) & (rows >= y1[:, None, None])
    return masks * (inside & (rows < y2[:, None, None]))


def mask_logits(proto: Tensor, coef: Tensor, size: tuple[int, int] | None = None) -> tuple[Tensor, int]:
    """Mask logits P·cᵀ of coefficients (P, k) on prototypes (k, Hp, Wp), upsampled (bilinear) to `size` when given,
    and the crop padding that goes with them: one prototype pixel at that resolution. Shared by the loss and
    ``postprocess`` so that masks are predicted as they are taught."""
    logits = torch.einsum("khw,pk->phw", proto, coef)
    if size is None:
        return logits, 1
    logits = F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return logits, max(1, round(max(size[0] / proto.shape[-2], size[1] / proto.shape[-1])))


def match(boxes: Tensor, labels: Tensor, anchors: Tensor, pos_iou: float = 0.5, neg_iou: float = 0.4):
    """Match one image's normalised xyxy boxes (M, 4) to anchors (A, 4).

    Returns:
        conf target (A,): class + 1 for positives, 0 for background, -1 ignored; matched box index (A,).
    """
    count = anchors.shape[0]
    if boxes.shape[0] == 0:
        zeros = torch.zeros(count, dtype=torch.long, device=anchors.device)
        return zeros, zeros
    overlap = box_iou(boxes, point_form(anchors))  # (M, A)
    best, index = overlap.max(dim=0)
    for j, anchor in enumerate(overlap.argmax(dim=1).tolist()):  # every box keeps its best anchor
        best[anchor], index[anchor] = 2.0, j
    conf = labels[index] + 1
    conf[best < pos_iou] = -1
    conf[best < neg_iou] = 0
    return conf, index


class YolactLoss(torch.nn.Module):
    """``loss(outputs, targets, anchors) -> (total, {"box", "conf", "mask", "seg"})``.

    Args:
        num_classes: foreground classes K (the model's ``cls`` has K + 1 logits, index 0 background).
        conf_weight, box_weight, mask_weight, seg_weight: the paper's 1, 1.5, 6.125, 1.
        neg_pos_ratio: hard negatives per positive.
        masks_to_train: at most this many positives per image in the mask loss.
        min_negatives: hard negatives mined per image at least, so that images without instances teach the
            background too (0, the reference: such an image adds nothing to the confidence loss).
        mask_resolution: "input" (default): the assembled mask logits are upsampled (bilinear) to the input and
            compared with the instance masks as they come, over the box padded by one prototype pixel, normalised
            by the box area in input pixels; "proto", the reference: the instance masks are downsampled to the
            prototypes (bilinear, > 0.5). See the module docstring.
    """

    def __init__(self, num_classes: int, *, conf_weight: float = 1.0, box_weight: float = 1.5,
                 mask_weight: float = 6.125, seg_weight: float = 1.0, neg_pos_ratio: int = 3,
                 masks_to_train: int = 100, pos_iou: float = 0.5, neg_iou: float = 0.4, min_negatives: int = 0,
                 mask_resolution: str = "input"):
        super().__init__()
        if mask_resolution not in ("input", "proto"):
            raise ValueError(f"mask_resolution must be 'input' or 'proto', got {mask_resolution!r}")
        self.mask_resolution = mask_resolution
        self.num_classes = num_classes
        self.weights = {"conf": conf_weight, "box": box_weight, "mask": mask_weight, "seg": seg_weight}
        self.neg_pos_ratio, self.masks_to_train = neg_pos_ratio, masks_to_train
        self.pos_iou, self.neg_iou, self.min_negatives = pos_iou, neg_iou, min_negatives

    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], anchors: Tensor):
        cls = outputs["cls"]
        _check(cls, targets, anchors, self.num_classes)
        anchors = anchors.to(outputs["box"])
        targets = [{key: t[key].to(cls.device) for key in ("boxes", "labels", "masks")} for t in targets]
        size = tuple(targets[0]["masks"].shape[-2:])  # the input's (H, W): masks come at input resolution
        matched = [self._match(t, anchors, size) for t in targets]
        conf_t = torch.stack([m[0] for m in matched])
        num_pos = max(int((conf_t > 0).sum()), 1)
        parts = {"box": self._box_loss(outputs["box"], matched, anchors) / num_pos,
                 "conf": self._conf_loss(cls, conf_t) / num_pos,
                 "mask": self._mask_loss(outputs, targets, matched, size) / num_pos}
        if "seg" in outputs:
            parts["seg"] = _seg_loss(outputs["seg"], targets) / len(targets)
        total = sum(self.weights[k] * v for k, v in parts.items())
        return total, {k: float(self.weights[k] * v.detach()) for k, v in parts.items()}

    def _match(self, target, anchors, size):
        boxes = target["boxes"].to(anchors) / anchors.new_tensor([size[1], size[0], size[1], size[0]])
        conf, index = match(boxes, target["labels"].to(anchors.device), anchors, self.pos_iou, self.neg_iou)
        return conf, index, boxes

    def _box_loss(self, box, matched, anchors):
        loss = box.sum() * 0
        for offsets, (conf, index, boxes) in zip(box, matched):
            pos = conf > 0
            if pos.any():
                target = encode(boxes[index[pos]], anchors[pos])
                loss = loss + F.smooth_l1_loss(offsets[pos], target, reduction="sum")
        return loss

    def _conf_loss(self, cls, conf_t):
        """Cross-entropy over positives and the 3:1 hardest negatives (ranked by their background loss)."""
        background = torch.logsumexp(cls, dim=-1) - cls[..., 0]
        background = background.detach().masked_fill(conf_t != 0, 0.0)
        rank = background.argsort(dim=1, descending=True).argsort(dim=1)
        num_neg = (self.neg_pos_ratio * (conf_t > 0).sum(1, keepdim=True)).clamp(min=self.min_negatives)
        num_neg = num_neg.clamp(max=cls.shape[1] - 1)
        chosen = (conf_t > 0) | ((rank < num_neg) & (conf_t == 0))
        if not chosen.any():
            return cls.sum() * 0
        return F.cross_entropy(cls[chosen], conf_t[chosen], reduction="sum")

    def _mask_loss(self, outputs, targets, matched, size):
        proto, coef = outputs["proto"], outputs["coef"]
        loss = proto.sum() * 0
        for p, c, target, (conf, index, boxes) in zip(proto, coef, targets, matched):
            pos = (conf > 0).nonzero().flatten()
            if len(pos) > self.masks_to_train:
                pos = pos[torch.randperm(len(pos), device=pos.device)[: self.masks_to_train]]
            if len(pos) == 0:
                continue
            box = boxes[index[pos]]
            # BCE of sigmoid(P·cᵀ) cropped to the box, as the reference, written on logits (exact inside the box,
            # zero outside where the cropped prediction and target are both 0) so that it runs under autocast
            if self.mask_resolution == "input":  # upsampled as postprocess does; the masks as they come
                logits, padding = mask_logits(p, c[pos], size)
                gt = target["masks"][index[pos]].float()
            else:
                logits, padding = mask_logits(p, c[pos])
                gt = _downsample(target["masks"], p.shape[-2:])[index[pos]]
            height, width = logits.shape[-2:]
            bce = crop_masks(F.binary_cross_entropy_with_logits(logits, gt, reduction="none"), box, padding)
            area = ((box[:, 2] - box[:, 0]) * width * (box[:, 3] - box[:, 1]) * height).clamp(min=1)
            loss = loss + (bce.sum(dim=(1, 2)) / area).sum()
        return loss


def _seg_loss(seg: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
    """Per-class BCE with logits against the union of each class's instance masks, per pixel."""
    loss = seg.sum() * 0
    for logits, target in zip(seg, targets):
        goal = torch.zeros_like(logits)
        masks = _downsample(target["masks"], logits.shape[-2:])
        for mask, label in zip(masks, target["labels"].tolist()):
            goal[label] = torch.maximum(goal[label], mask)
        loss = loss + F.binary_cross_entropy_with_logits(logits, goal, reduction="sum") / logits[0].numel()
    return loss


def _downsample(masks: Tensor, size) -> Tensor:
    """Instance masks (M, H, W) -> float {0, 1} at `size` (bilinear, then > 0.5), as the reference."""
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size), dtype=torch.float32)
    resized = F.interpolate(masks[None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0]
    return (resized > 0.5).float()


def _check(cls: Tensor, targets, anchors: Tensor, num_classes: int) -> None:
    if len(targets) != cls.shape[0]:
        raise ValueError(f"{len(targets)} targets for a batch of {cls.shape[0]} images")
    if anchors.shape[0] != cls.shape[1]:
        raise ValueError(f"{anchors.shape[0]} anchors for {cls.shape[1]} predictions: use model.anchors(h, w) of "
                         "this input size")
    for i, t in enumerate(targets):
        labels = t["labels"]
        if len(labels) != len(t["boxes"]) or len(labels) != len(t["masks"]):
            raise ValueError(f"target {i}: {len(t['boxes'])} boxes, {len(labels)} labels, {len(t['masks'])} masks")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"target {i}: labels must lie in 0..{num_classes - 1}, got {labels.tolist()}")


class InstanceLoss:
    """``loss_fn(output, targets)`` for :func:`~segprune.train.loop.fit`: a YOLACT loss at the input's anchors.

    Args:
        model: The model (or DDP around it); it gives ``anchors(h, w)``.
        loss: ``loss(outputs, targets, anchors) -> (total, parts)``, e.g. ``YolactLoss(num_classes)``.

    The parts of the last batch (box, conf, mask, seg) are kept in ``self.parts`` for logging.
    """

    def __init__(self, model: nn.Module, loss: nn.Module):
        self.model, self.loss, self.parts = model, loss, {}

    def __call__(self, output: dict, targets: list[dict]) -> torch.Tensor:
        height, width = targets[0]["masks"].shape[-2:]
        device = output["cls"].device
        anchors = unwrap(self.model).anchors(int(height), int(width)).to(device)
        # only the tensors: the loss need not know image ids and original sizes (and may move every value)
        tensors = [{k: v for k, v in t.items() if isinstance(v, torch.Tensor)} for t in targets]
        with torch.autocast(device.type, enabled=False):
            total, self.parts = self.loss({k: v.float() for k, v in output.items()}, tensors, anchors)
        return total
