"""What `segprune predict` writes: for every input image, its mask (a palette PNG of the labels) and an overlay,
plus `predictions.json` (per image: the files written, its size, the share of each class, or why it failed).

One unreadable image does not stop the others: it is listed with its error and the caller decides the exit code.
The output folder is checked before any model runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segprune.data.base import IMAGE_SUFFIXES
from segprune.eval.inference import Predictor, load_image
from segprune.report import visual

SUMMARY = "predictions.json"


def image_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named by ``inputs``: files as given, folders expanded to their image files (sorted).

    Raises:
        FileNotFoundError: an input does not exist, or a folder holds no image files (named).
    """
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise FileNotFoundError(f"{item}: no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image file or folder")
    return files


def output_names(files: Sequence[Path]) -> list[str]:
    """A unique name per input: its stem, with its parent folder's name (then a number) where stems repeat."""
    stems = [f.stem for f in files]
    names = [f"{f.parent.name}_{f.stem}" if stems.count(f.stem) > 1 else f.stem for f in files]
    return [f"{n}_{k}" if names.count(n) > 1 else n for k, n in enumerate(names)]


def write_predictions(predictor: Predictor, inputs: Sequence[str | Path], out: str | Path, *, alpha: float = 0.5,
                      overlay_format: str = "jpg") -> dict:
    """Predict every image of ``inputs`` and write ``<name>_mask.png``, ``<name>_overlay.<overlay_format>`` and
    ``predictions.json`` into ``out``.

    Args:
        predictor: The model and its settings (size, tile, ...), see :class:`~segprune.eval.inference.Predictor`.
        inputs: Image files and folders of images.
        out: Output folder (created).
        alpha: Weight of the class colours in the overlays.
        overlay_format: ``jpg`` (small) or ``png`` (exact).

    Returns:
        The summary written to predictions.json: ``images`` (one entry per input: ``image``, and ``mask``,
        ``overlay``, ``size`` [H, W], ``class_share`` {class name: fraction of pixels} or ``error``), ``failed``
        (how many could not be predicted), ``num_classes``, ``class_names``.
    """
    out = Path(out)  # claimed by the caller (segprune.workflows.rundir): this writes over earlier predictions
    files = image_files(inputs)
    out.mkdir(parents=True, exist_ok=True)
    entries = [_predict_one(predictor, file, out, name, alpha, overlay_format)
               for file, name in zip(files, output_names(files))]
    summary = {"images": entries, "failed": sum("error" in e for e in entries),
               "num_classes": predictor.num_classes, "class_names": list(predictor.class_names)}
    tmp = out / f".{SUMMARY}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / SUMMARY)
    return summary


def _predict_one(predictor: Predictor, file: Path, out: Path, name: str, alpha: float, fmt: str) -> dict:
    """One image's entry; a read error (or any failure on this image) becomes its ``error``, naming the file."""
    try:
        image = load_image(file)
        labels = predictor.predict(image)
    except Exception as err:  # noqa: BLE001 - one bad image is reported, the others are still predicted
        text = str(err)
        return {"image": str(file), "error": text if str(file) in text else f"{file}: {type(err).__name__}: {text}"}
    k = predictor.num_classes
    mask = visual.save_mask_png(labels, out / f"{name}_mask.png", num_classes=k, palette=predictor.palette)
    overlay = visual.save_overlay(image, labels, out / f"{name}_overlay.{fmt}", num_classes=k, alpha=alpha,
                                  palette=predictor.palette)
    counts = np.bincount(labels.ravel(), minlength=k) / labels.size
    names = [predictor.class_names[c] if c < len(predictor.class_names) else f"class{c}" for c in range(k)]
    return {"image": str(file), "mask": mask.name, "overlay": overlay.name, "size": list(labels.shape),
            "class_share": {n: round(float(s), 6) for n, s in zip(names, counts) if s > 0}}
