"""Instance segmentation evaluation: a YOLACT model's detections on a dataset, and their COCO box and mask AP."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from segprune._utils import eval_mode, unwrap
from segprune.data.instances import make_instance_loader
from segprune.eval.coco_metrics import CocoEvaluator
from segprune.models.yolact import postprocess


@torch.inference_mode()
def iterate_predictions(model: nn.Module, loader, *, device="cpu", original_size: bool = False,
                        **postprocess_kwargs):
    """Yield ``(image_id, prediction)`` for every image of ``loader``, predictions on the CPU.

    Args:
        model: An instance model (YOLACT): ``anchors(h, w)`` and outputs for ``postprocess``.
        loader: Batches of (images, list of targets).
        device: Where the model runs.
        original_size: Boxes and masks in each image's original frame (``target["orig_size"]``): the soft masks
            are upsampled there before thresholding, as YOLACT's own evaluation does. Otherwise in the input's.
        postprocess_kwargs: For :func:`segprune.models.yolact.postprocess` (score threshold, NMS IoU, top k).

    The model runs in eval mode; its train/eval mode is restored afterwards.
    """
    model = unwrap(model)
    with eval_mode(model):
        for images, targets in loader:
            size = tuple(images.shape[-2:])
            outputs, anchors = model(images.to(device)), model.anchors(*size)
            for i, target in enumerate(targets):
                frame = tuple(target["orig_size"]) if original_size else size
                one = {k: v[i : i + 1] for k, v in outputs.items()}
                found = postprocess(one, anchors, frame, **postprocess_kwargs)[0]
                yield target["image_id"], {k: v.cpu() for k, v in found.items()}


def predict_instances(model: nn.Module, loader, *, device="cpu", **kwargs) -> dict[int, dict]:
    """Postprocessed predictions of every image in ``loader``, keyed by image id (see :func:`iterate_predictions`;
    dense masks of a large set do not fit in memory: :func:`evaluate_model` encodes them as it goes)."""
    return dict(iterate_predictions(model, loader, device=device, **kwargs))


def evaluate_model(model: nn.Module, dataset: Dataset, *, batch_size: int = 4, device="cpu",
                   **postprocess_kwargs) -> dict[str, dict[str, float]]:
    """COCO box and mask AP of ``model`` on ``dataset`` (an instance dataset, or a ``Subset`` of one).

    Predictions are made in each image's original frame (see :func:`iterate_predictions`) and RLE-encoded image
    by image, so memory holds no more than one image's dense masks.
    """
    loader = make_instance_loader(dataset, batch_size=batch_size, shuffle=False, seed=0)
    evaluator = CocoEvaluator(dataset.dataset if isinstance(dataset, Subset) else dataset)
    found = iterate_predictions(model, loader, device=device, original_size=True, **postprocess_kwargs)
    for image_id, prediction in found:
        evaluator.add(image_id, prediction)
    return evaluator.compute()
