"""Run a segmentation model on images, as `segprune predict` does: an eager model or an ONNX file, one image at a
time at any size, whole, resized to the size the model was trained at, or in overlapping tiles for large images.

An image is normalised as the datasets do (ImageNet mean and std by default); logits come back at the image's own
size, so a mask lines up with its image whatever happened in between. Tiles reuse
:func:`segprune.eval.metrics.sliding_window` (logits averaged where tiles overlap, small images padded).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from segprune._utils import eval_mode
from segprune.data.base import IMAGENET_MEAN, IMAGENET_STD, read_rgb
from segprune.eval.metrics import predict
from segprune.export.runtimes import get_runtime, parse, runtime_names


class OnnxModel:
    """An ONNX segmentation model run by a registered runtime (onnxruntime by default, or OpenVINO, TensorRT: any
    that compiles ONNX files), called like an eager one: ``model(x)`` with a float tensor (N, 3, H, W) returns the
    logits tensor (N, K, H, W) (the file's first output).

    Args:
        path: The ``.onnx`` file (as :func:`segprune.export.onnx.export_onnx` writes it).
        runtime: A runtime spec (``segprune.export.runtimes``), e.g. ``"openvino:fp32"``.
        threads: Intra-op threads; None leaves the runtime's default.
        divisible: H and W the exported model needs multiples of (its ``needs_divisible_input``; a U-Net's 16):
            the file does not record it, and whole images are padded to it.

    Attributes:
        input_size: (H, W) when the file fixes the input size (an export without dynamic H and W), else None.
    """

    def __init__(self, path: str | Path, *, runtime: str = "onnxruntime", threads: int | None = None,
                 divisible: int = 1):
        rt, precision = parse(runtime)
        if rt.source != "onnx":
            raise ValueError(f"runtime {rt.name!r} does not run ONNX files; choose one of "
                             f"{', '.join(n for n in runtime_names() if get_runtime(n).source == 'onnx')}")
        self.path = Path(path)
        self.compiled = rt.compile(self.path, None, device=rt.devices[0], precision=precision, threads=threads)
        dims = _input_dims(self.path)
        fixed = lambda d: all(isinstance(v, int) and v > 0 for v in d)  # noqa: E731 - symbolic dims are not
        self.input_size = tuple(dims[2:]) if fixed(dims[2:]) else None
        self.batch = dims[0] if fixed(dims[:1]) else None
        self.needs_divisible_input = divisible

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch is not None and len(x) != self.batch:  # a file with a fixed batch: one image at a time
            return torch.cat([self(x[k : k + 1]) for k in range(len(x))])
        first = self.compiled.outputs(self.compiled.prepare(x.detach().cpu().float()))[0]
        return torch.from_numpy(first.astype(np.float32))


def _input_dims(path: Path) -> list[int | None]:
    """The first input's dimensions as the file declares them (None where symbolic)."""
    try:
        import onnx  # optional: the `onnx` extra, which every ONNX runtime here comes with
    except ImportError as err:
        raise ImportError("running an ONNX model needs onnx: pip install 'segprune[onnx]'") from err
    graph = onnx.load(str(path), load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def as_model(model: nn.Module | OnnxModel | str | Path):
    """``model`` itself, or an :class:`OnnxModel` for the path of an ``.onnx`` file."""
    return OnnxModel(model) if isinstance(model, str | Path) else model


def to_tensor(image, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """An image (path, PIL image, or (H, W, 3) uint8 array) as a normalised float32 batch (1, 3, H, W)."""
    array = np.asarray(load_image(image), dtype=np.float32) / 255
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]


def load_image(image) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array of a path (read errors name the file), a PIL image or an array."""
    if isinstance(image, str | Path):
        image = read_rgb(image)
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {array.dtype} {array.shape}")
    return array


def tile_stride(tile, overlap: float) -> tuple[int, int]:
    """The step between tiles of size ``tile`` (h, w or one side) that overlap by the fraction ``overlap``."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    h, w = (tile, tile) if isinstance(tile, int) else tile
    return max(1, round(h * (1 - overlap))), max(1, round(w * (1 - overlap)))


def image_logits(model, image, *, size=None, tile=None, overlap: float = 1 / 3, flip: bool = False,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 device="cpu") -> torch.Tensor:
    """Logits (K, H, W) of one image at its own size.

    Args:
        model: An ``nn.Module`` (on ``device``) returning logits or ``{"out": logits}``, an :class:`OnnxModel`, or
            the path of an ``.onnx`` file.
        image: A path, PIL image or (H, W, 3) uint8 array.
        size: Resize the image to (H, W) first (the size the model was trained at) and the logits back after.
            An ONNX file of fixed input size is given that size when neither ``size`` nor ``tile`` is set.
        tile: Sliding-window inference with tiles of (h, w) (or one side): what large images need; an image
            smaller than a tile is padded, not resized.
        overlap: Fraction by which neighbouring tiles overlap; their logits are averaged there.
        flip: Also run the mirrored image and average.
        mean: Normalisation mean (the training data's).
        std: Normalisation standard deviation.
        device: Where the input goes (the model must already be there).
    """
    model = as_model(model)
    x = to_tensor(image, mean=mean, std=std).to(device)
    height, width = x.shape[-2:]
    size = _default_size(model, size, tile)
    if size is not None:
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    stride = tile_stride(tile, overlap) if tile is not None else None
    with eval_mode(model) if isinstance(model, nn.Module) else contextlib.nullcontext(), torch.inference_mode():
        logits = _padded(lambda t: predict(model, t, crop=tile, stride=stride, flip=flip), x,
                         1 if tile is not None else getattr(model, "needs_divisible_input", 1))
    if logits.shape[-2:] != (height, width):
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return logits[0].float().cpu()


def predict_image(model, image, **kwargs) -> np.ndarray:
    """Class labels (H, W) of one image at its own size; ``kwargs`` as for :func:`image_logits`."""
    return image_logits(model, image, **kwargs).argmax(0).numpy()


def _default_size(model, size, tile):
    """``size``, or the fixed input size of an ONNX file when neither size nor tile is given; a tile must fit it."""
    fixed = getattr(model, "input_size", None)
    if fixed is None:
        return size
    if tile is not None:
        if tuple((tile, tile) if isinstance(tile, int) else tile) != tuple(fixed):
            raise ValueError(f"{model.path}: the file takes only {fixed[0]}x{fixed[1]} inputs; use tile {fixed} or "
                             "export with dynamic H and W")
        return size
    return size if size is not None else fixed


def _padded(run, x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``run(x)`` on ``x`` zero-padded (the mean pixel) at the bottom and right to multiples of ``multiple``, the
    padding cut off the logits again (a model that declares ``needs_divisible_input`` refuses other sizes)."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not pad_h and not pad_w:
        return run(x)
    logits = run(F.pad(x, (0, pad_w, 0, pad_h)))
    if logits.shape[-2:] != (height + pad_h, width + pad_w):  # a model whose logits are smaller than its input
        logits = F.interpolate(logits, size=(height + pad_h, width + pad_w), mode="bilinear", align_corners=False)
    return logits[..., :height, :width]


class Predictor:
    """A model with the settings it predicts with, for the API: ``Predictor(model, size=(360, 480)).predict(image)``.

    Args:
        model: An ``nn.Module``, an :class:`OnnxModel` or the path of an ``.onnx`` file.
        num_classes: Classes the model predicts (for colouring); by default found on the first prediction.
        class_names: Names of the classes, in label order.
        palette: (num_classes, 3) RGB colours of the classes (a dataset's own), or None for the report's.
        **settings: ``size``, ``tile``, ``overlap``, ``flip``, ``mean``, ``std``, ``device`` of
            :func:`image_logits`.
    """

    def __init__(self, model, *, num_classes: int | None = None, class_names: Sequence[str] = (), palette=None,
                 **settings):
        self.model, self.settings = as_model(model), settings
        self.num_classes, self.class_names, self.palette = num_classes, tuple(class_names), palette
        unknown = set(settings) - {"size", "tile", "overlap", "flip", "mean", "std", "device"}
        if unknown:
            raise TypeError(f"Predictor: unknown setting(s) {', '.join(sorted(unknown))}")

    def logits(self, image) -> torch.Tensor:
        """Logits (K, H, W) of one image (path, PIL image or (H, W, 3) uint8 array) at its own size."""
        logits = image_logits(self.model, image, **self.settings)
        self.num_classes = self.num_classes or logits.shape[0]
        return logits

    def predict(self, image) -> np.ndarray:
        """Class labels (H, W) of one image at its own size."""
        return self.logits(image).argmax(0).numpy()
