"""Box and mask AP of instance predictions with pycocotools' ``COCOeval``, the standard COCO protocol.

Predictions (one dict per image, as YOLACT's postprocess returns them: ``boxes`` (P, 4) xyxy pixels,
``scores`` (P,), ``labels`` (P,) in 0..K-1, ``masks`` bool (P, H, W)) live in the frame of the network input.
They are mapped back to each image's original size (boxes scaled, masks resized with nearest neighbour at pixel
centres, the same resampling the datasets use) and their labels back to the original category ids (the
contiguous labels are the category ids in increasing order), then masks are RLE-encoded with
``pycocotools.mask.encode`` on Fortran-ordered uint8 arrays.

The ground truth is a pycocotools ``COCO`` object, or a dataset with ``coco_dict()`` (``CocoInstances``: the
kept images and annotations with their crowd regions, so ``COCOeval`` ignores detections on crowds as in the
official protocol; ``SyntheticInstances``: built in memory). Only the images that have predictions are
evaluated, so a subset can be scored; an image with an empty prediction counts (it misses its objects).

COCOeval reports -1 where a figure is undefined (e.g. no ground truth of that area range); that is kept.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _pycocotools():
    try:
        from pycocotools import mask
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:
        raise ImportError("mask AP needs pycocotools: pip install segprune[coco]") from error
    return COCO, COCOeval, mask


def coco_from_dict(data: dict):
    """A pycocotools ``COCO`` object over an in-memory ``{"images", "annotations", "categories"}`` dict."""
    COCO, _, _ = _pycocotools()
    coco = COCO()
    coco.dataset = {k: list(data[k]) for k in ("images", "annotations", "categories")}
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints its progress
        coco.createIndex()
    return coco


def ground_truth(dataset_or_coco):
    """The ``COCO`` ground truth of a dataset with ``coco_dict()``, or the ``COCO`` object itself."""
    if hasattr(dataset_or_coco, "coco_dict"):
        return coco_from_dict(dataset_or_coco.coco_dict())
    if hasattr(dataset_or_coco, "imgs") and hasattr(dataset_or_coco, "getCatIds"):
        return dataset_or_coco
    raise TypeError(f"expected a pycocotools COCO object or a dataset with coco_dict(), got "
                    f"{type(dataset_or_coco).__name__}")


def _by_image(predictions, dataset_or_coco) -> dict[int, dict]:
    """Predictions keyed by image id: a mapping as is, a sequence aligned with ``dataset.image_ids``."""
    if isinstance(predictions, Mapping):
        return {int(k): v for k, v in predictions.items()}
    ids = getattr(dataset_or_coco, "image_ids", None)
    if ids is None:
        raise TypeError("with a COCO object as ground truth, pass predictions as a mapping {image_id: prediction}")
    if len(predictions) > len(ids):
        raise ValueError(f"{len(predictions)} predictions for a dataset of {len(ids)} images")
    return {int(i): p for i, p in zip(ids, predictions)}


def _to_original(prediction: dict, orig_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(P, 4) xyxy boxes and (P, h, w) bool masks of a prediction in the original (h, w) frame."""
    masks = torch.as_tensor(prediction["masks"]).bool()
    boxes = torch.as_tensor(prediction["boxes"], dtype=torch.float32).reshape(-1, 4)
    height, width = masks.shape[-2:]
    if (height, width) != tuple(orig_size):
        scale = torch.tensor([orig_size[1] / width, orig_size[0] / height] * 2)
        boxes = boxes * scale
        if len(masks):
            masks = F.interpolate(masks[None].to(torch.uint8), size=tuple(orig_size), mode="nearest-exact")[0].bool()
        else:
            masks = torch.zeros(0, *orig_size, dtype=torch.bool)
    return boxes.cpu().numpy(), masks.cpu().numpy()


def image_results(image_id: int, prediction: dict, coco_gt, category_ids: Sequence[int]) -> tuple[list, list]:
    """COCO result entries (boxes, RLE masks) of one image's prediction, in its original frame and category ids."""
    _, _, mask_api = _pycocotools()
    if image_id not in coco_gt.imgs:
        raise ValueError(f"prediction for image id {image_id}, which the ground truth does not list")
    info = coco_gt.imgs[image_id]
    boxes, masks = _to_original(prediction, (int(info["height"]), int(info["width"])))
    scores = torch.as_tensor(prediction["scores"]).reshape(-1).tolist()
    labels = torch.as_tensor(prediction["labels"]).reshape(-1).tolist()
    if not len(boxes) == len(masks) == len(scores) == len(labels):
        raise ValueError(f"image {image_id}: boxes, masks, scores and labels differ in length")
    boxes_out, masks_out = [], []
    for box, mask, score, label in zip(boxes, masks, scores, labels):
        if not 0 <= label < len(category_ids):
            raise ValueError(f"image {image_id}: label {label} outside 0..{len(category_ids) - 1}")
        common = {"image_id": image_id, "category_id": category_ids[label], "score": float(score), "iscrowd": 0}
        x0, y0, x1, y1 = map(float, box)
        boxes_out.append({**common, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
        rle = mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))
        masks_out.append({**common, "segmentation": rle, "area": float(mask_api.area(rle)),
                          "bbox": mask_api.toBbox(rle).tolist()})
    return boxes_out, masks_out


class CocoEvaluator:
    """Collects detections image by image, RLE-encoded at once (no dense masks pile up), then runs COCOeval.

    Args:
        dataset_or_coco_gt: See :func:`evaluate_instances`.
        iou_types: Which of ``"bbox"`` and ``"segm"`` to score.
    """

    def __init__(self, dataset_or_coco_gt, *, iou_types: Sequence[str] = ("bbox", "segm")):
        unknown = set(iou_types) - {"bbox", "segm"}
        if unknown:
            raise ValueError(f"iou_types must be 'bbox' and/or 'segm', got {sorted(unknown)}")
        self.iou_types = tuple(iou_types)
        self.coco_gt = ground_truth(dataset_or_coco_gt)
        self.category_ids = sorted(self.coco_gt.getCatIds())
        self.found: dict[str, list[dict]] = {"bbox": [], "segm": []}
        self.image_ids: set[int] = set()

    def add(self, image_id: int, prediction: dict) -> None:
        """Add one image's prediction (an image with none still counts: its objects are missed)."""
        boxes, masks = image_results(int(image_id), prediction, self.coco_gt, self.category_ids)
        self.found["bbox"] += boxes
        self.found["segm"] += masks
        self.image_ids.add(int(image_id))

    def compute(self) -> dict[str, dict[str, float]]:
        """COCOeval's statistics per IoU type over the images added (see :func:`evaluate_instances`)."""
        ids = sorted(self.image_ids)
        return {kind: _summarise(self.coco_gt, self.found[kind], kind, ids) for kind in self.iou_types}


def _results(coco_gt, anns: list[dict]):
    """A result ``COCO`` object without ``loadRes`` (which fails on an empty list)."""
    anns = [{**a, "id": k + 1} for k, a in enumerate(anns)]
    return coco_from_dict({"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                           "annotations": anns})


def _summarise(coco_gt, anns: list[dict], iou_type: str, image_ids: list[int]) -> dict[str, float]:
    _, COCOeval, _ = _pycocotools()
    evaluator = COCOeval(coco_gt, _results(coco_gt, anns), iouType=iou_type)
    evaluator.params.imgIds = image_ids
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="pycocotools")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats)}


def evaluate_instances(
    predictions: Sequence[dict] | Mapping[int, dict], dataset_or_coco_gt, *, iou_types: Sequence[str] = ("bbox", "segm")
) -> dict[str, dict[str, float]]:
    """COCO box and mask AP of instance predictions.

    Args:
        predictions: One prediction dict per image (see the module docstring): a sequence in the order of
            ``dataset.image_ids``, or a mapping from image id to prediction (e.g. for a subset).
        dataset_or_coco_gt: A dataset with ``coco_dict()`` (``CocoInstances``, ``SyntheticInstances``) or a
            pycocotools ``COCO`` ground truth (then ``predictions`` must be a mapping).
        iou_types: Which of ``"bbox"`` and ``"segm"`` to score.

    Returns:
        ``{"bbox": {...}, "segm": {...}}`` with AP (IoU .50:.95), AP50, AP75, APs/APm/APl and the ARs, each in
        [0, 1] (-1 where COCOeval leaves it undefined).
    """
    evaluator = CocoEvaluator(dataset_or_coco_gt, iou_types=iou_types)
    for image_id, prediction in _by_image(predictions, dataset_or_coco_gt).items():
        evaluator.add(image_id, prediction)
    return evaluator.compute()
