"""Using a trained model: `segprune predict` (masks and overlays for images) and `segprune report` on folders that
hold a checkpoint but no report (the step-by-step commands: train, prune, finetune).

A checkpoint's config says what the model expects: its recipe's input size and data (synthetic scenes are
normalised with their own statistics, real datasets with ImageNet's), and the class names where the run recorded
them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from segprune import checkpoint
from segprune.data import IMAGENET_MEAN, IMAGENET_STD
from segprune.data.synthetic import SyntheticScenes
from segprune.eval.inference import OnnxModel, Predictor
from segprune.eval.profile import compare_latency, profile
from segprune.report.combined import combined_report
from segprune.report.common import FILES
from segprune.report.model import write_model_report
from segprune.report.predictions import SUMMARY, write_predictions
from segprune.workflows import rundir
from segprune.workflows.data import class_names, semantic_datasets
from segprune.workflows.steps import checkpoint_task, step_recipe


def predictor(source: str | Path, *, device="cpu", runtime: str = "onnxruntime", **settings) -> Predictor:
    """A :class:`~segprune.eval.inference.Predictor` for a checkpoint folder (or an ``.onnx`` file exported from
    one, run by ``runtime``, with ``settings`` given by hand): ``segprune.predictor("runs/demo/pruned").predict(
    "image.png")``.

    ``settings`` (``size``, ``tile``, ``overlap``, ``flip``, ``mean``, ``std``) override what the checkpoint's
    recipe implies; with neither ``size`` nor ``tile``, images run at their own size.
    """
    if str(source).endswith(".onnx"):
        return Predictor(OnnxModel(source, runtime=runtime), **settings)
    config = checkpoint.load_config(source)
    if not (task := checkpoint_task(config)).per_pixel:
        raise ValueError(f"{source}: predict writes per-pixel masks; this checkpoint holds an {task.name} model")
    recipe = config.get("recipe", {})
    synthetic = recipe.get("data", "synthetic") == "synthetic"
    defaults = dict(mean=SyntheticScenes.MEAN if synthetic else IMAGENET_MEAN,
                    std=SyntheticScenes.STD if synthetic else IMAGENET_STD)
    model = checkpoint.load(source).to(device)
    return Predictor(model, num_classes=config.get("model_kwargs", {}).get("num_classes"),
                     class_names=config.get("class_names", ()), device=device, **{**defaults, **settings})


def predict_images(source: str | Path, images, out: str | Path, *, force: bool = False, **settings) -> dict:
    """Masks (palette PNGs keeping the labels) and overlays of ``images`` (files or folders) in ``out``, with
    predictions.json; ``out`` is checked before the model is loaded. Returns the summary."""
    rundir.claim(out, writes=(SUMMARY,), force=force)
    return write_predictions(predictor(source, **settings), images, out)


def checkpoint_in(folder: str | Path) -> Path:
    """The checkpoint a folder holds: itself, or its ``model/`` (segprune train) or ``pruned/`` (segprune run)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such run folder")
    for candidate in (folder, folder / "model", folder / "pruned"):
        if all((candidate / name).is_file() for name in checkpoint.FILES):
            return candidate
    raise FileNotFoundError(f"{folder}: no report.json and no checkpoint (weights.safetensors, plan.json, "
                            "config.json) in it, its model/ or its pruned/")


def report_folders(folders, out: str | Path, *, force: bool = False, threads: int = 1) -> dict:
    """`segprune report`: compression runs (report.json with before/after) are combined as they are; folders that
    hold only a checkpoint are evaluated on their recipe's validation split, measured (latency interleaved
    across them) and each gets its own report.json/md/html; several are then combined as steps, each against the
    first (the unpruned model), like `segprune bench`. ``out`` is claimed before any work wherever a combined
    report goes there (not for one checkpoint folder, whose report is its own)."""
    folders = [Path(f) for f in folders]
    runs = [f for f in folders if _is_run(f)]
    if len(runs) == len(folders) or (not runs and len(folders) > 1):
        rundir.claim(out, writes=FILES, force=force)
    if len(runs) == len(folders):
        return combined_report(folders, out)
    if runs:
        raise ValueError(f"segprune report: mix of compression runs ({', '.join(map(str, runs))}) and checkpoint "
                         "folders; report them separately")
    rows = _measure_models(folders, threads)
    for folder, row in zip(folders, rows):
        write_model_report(folder, title=row["title"], metrics=row["metrics"], class_names=row["class_names"],
                           cost=row["cost"], recipe=row["recipe"], split=row["split"])
    if len(folders) == 1:
        return {"runs": [str(folders[0])], "notes": [], "path": str(folders[0] / "report.html")}
    steps = [_as_step(row, rows[0]) for row in rows]
    return combined_report(folders, out, reports=steps)


def _is_run(folder: Path) -> bool:
    """Whether ``folder`` holds a compression run's report (a broken one is named by the combined report), and not
    a one-model report of an earlier `segprune report`, which is measured again."""
    path = folder / "report.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("kind") != "model"
    except (ValueError, UnicodeDecodeError, AttributeError):
        return True


def _measure_models(folders: list[Path], threads: int) -> list[dict]:
    rows, models, example = [], {}, None
    for folder in folders:
        ckpt = checkpoint_in(folder)
        config = checkpoint.load_config(ckpt)
        task = checkpoint_task(config)
        if not task.per_pixel:
            raise ValueError(f"{folder}: segprune report of a checkpoint folder takes semantic models; {task.name} "
                             "runs are reported by segprune run / demo")
        recipe = step_recipe(config)
        model = checkpoint.load(ckpt)
        _, val, num_classes = semantic_datasets(recipe)
        metrics = task.evaluate(model, DataLoader(val, batch_size=recipe.batch_size), recipe,
                                num_classes=num_classes, device="cpu")
        example = torch.zeros(1, 3, *recipe.size)
        rows.append({"title": f"{folder.name}: {config.get('model', '?')}", "metrics": metrics,
                     "class_names": class_names(val),
                     "cost": profile(model, example), "recipe": dataclasses.asdict(recipe), "split": recipe.val_split})
        models[str(folder)] = model
    first = next(iter(models.values()))
    for row, model in zip(rows, models.values()):
        row["widths"] = conv_widths(first, model)
    latency = compare_latency(models, example, threads=threads, rounds=3, runs=5)
    for folder, row in zip(folders, rows):
        row["cost"].update(latency_ms=latency[str(folder)]["median_ms"], latency=latency[str(folder)])
    return rows


def _as_step(row: dict, first: dict) -> dict:
    """A model measured in a step-by-step run, as a compression row against the first model."""
    side = lambda r: {**{k: v for k, v in r["metrics"].items() if not isinstance(v, dict)}, **r["cost"]}  # noqa: E731
    return {"title": row["title"], "recipe": row["recipe"], "before": side(first), "after": side(row),
            "widths": row["widths"], "notes": ["step-by-step: 'before' is the first folder's model, 'after' this "
                                               "folder's"]}


def conv_widths(before: nn.Module, after: nn.Module) -> dict[str, list[int]]:
    """{conv: [output channels in `before`, in `after`]} (0: gone), in model order."""
    kept = dict(after.named_modules())
    return {name: [m.out_channels, getattr(kept.get(name), "out_channels", 0)] for name, m in before.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd)}
