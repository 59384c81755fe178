"""The step-by-step commands on checkpoint folders: prune, fine-tune, evaluate (`segprune prune|finetune|eval`), and
the channel groups of a registered model (`segprune groups`).

Each checks where it will write before it works, so a refused ``--out`` costs nothing. A checkpoint folder holds
its config (model, its arguments, the recipe it was trained with, the task), so a step after training reads the
data, sizes and task from there unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
from torch import nn

from segprune import checkpoint
from segprune.eval.latency import LatencyMeter, cpu_model, measure_latency_table
from segprune.export.runtimes import parse
from segprune.models import create_model
from segprune.models.builders import is_spec
from segprune.prune import channel_groups, prune
from segprune.prune.latency import LatencyTable
from segprune.train.loop import fit
from segprune.workflows import rundir
from segprune.workflows.methods import checkpoint_methods, method
from segprune.workflows.recipe import Recipe, recipe_from
from segprune.workflows.tasks import DEFAULT_TASK, Task, task_of


def model_groups(name: str, *, num_classes: int = 19, width: float = 1.0, size: int = 256,
                 model_args: dict | None = None) -> tuple[list, list[str]]:
    """`segprune groups`: the channel groups of model ``name`` (a zoo name at ``width``, or a builder spec with
    ``model_args``) traced on a ``size``² input, and the warnings the trace gave, as text."""
    model = create_model(name, num_classes=num_classes, **({} if is_spec(name) else {"width": width}),
                         **(model_args or {}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = channel_groups(model, torch.zeros(1, 3, size, size))
    return groups, [str(w.message) for w in caught]


def task_name(config: dict) -> str:
    """The task a checkpoint was trained for (checkpoints before tasks were semantic)."""
    return config.get("task", config.get("recipe", {}).get("task", DEFAULT_TASK))


def checkpoint_task(config: dict) -> Task:
    """The :class:`~segprune.workflows.tasks.Task` a checkpoint was trained for."""
    return task_of(task_name(config))


def prune_checkpoint(folder: str | Path, out: str | Path, *, method_name: str = "bn_scale", ratio: float = 0.5,
                     target_macs: float | None = None, round_to: int | None = None, min_keep: float = 0.1,
                     size: tuple[int, int] = (256, 256), force: bool = False, target_latency: float | None = None,
                     latency_table_path: str | Path = "", latency_runtime: str = "eager", latency_threads: int = 1,
                     latency_tries: int = 5):
    """Prune the model in checkpoint ``folder`` by the criterion of ``method_name`` into checkpoint ``out``
    (the plan composed with the one it had); returns the :class:`~segprune.prune.PruneResult`.

    ``target_latency``: prune to that fraction of the latency measured on ``latency_runtime`` (a registered runtime
    spec, e.g. ``openvino:fp32``) at ``size`` (see :func:`latency_step`)."""
    if method(method_name).needs_data:
        raise ValueError(f"method {method_name} needs training data: run a recipe with `method: {method_name}` "
                         f"(segprune run); on a checkpoint choose from {', '.join(checkpoint_methods())}")
    out = rundir.claim(out, force=force)
    model, plan, config = checkpoint.load(folder), checkpoint.load_plan(folder), checkpoint.load_config(folder)
    x = torch.zeros(1, 3, *size)
    example = checkpoint_task(config).prune_inputs(model, x)  # YOLACT: prototypes <-> coefficients
    target = dict(target_macs=target_macs) if target_macs else dict(ratio=ratio)
    if target_latency:
        target = latency_step(model, x, target=target_latency, table_path=latency_table_path, cache=out,
                              runtime=latency_runtime, threads=latency_threads, tries=latency_tries,
                              name=config.get("model"))
    result = prune(model, example, criterion=method(method_name).criterion, round_to=round_to, min_keep=min_keep,
                   **target)
    checkpoint.save(out, result.model, config=config, plan=plan.then(result.plan))
    return result


def step_recipe(config: dict, path: str | Path | None = None, overrides: dict | None = None) -> Recipe:
    """The recipe of a step after training: the file at ``path``, else the checkpoint's own (settings this version
    no longer knows are dropped), with ``overrides``."""
    known = {f.name for f in dataclasses.fields(Recipe)}
    saved = {k: v for k, v in config.get("recipe", {}).items() if k in known}
    base = {"task": task_name(config), **saved} if path is None else {}
    recipe = recipe_from(path, {**base, **(overrides or {})})
    if "num_classes" in base and "num_classes" not in (overrides or {}) and \
            saved["num_classes"] != config.get("model_kwargs", {}).get("num_classes"):
        recipe.given -= {"num_classes"}  # a saved default the model was not built with: its data chose the count
    return recipe


def finetune_checkpoint(folder: str | Path, out: str | Path, *, recipe_path: str | Path | None = None,
                        overrides: dict | None = None, force: bool = False, progress: bool = True) -> Recipe:
    """Fine-tune the model in checkpoint ``folder`` ``finetune_epochs`` at ``finetune_lr`` on its recipe's
    training data (or ``recipe_path``'s) into checkpoint ``out``; returns the recipe used."""
    out = rundir.claim(out, force=force)
    model, config = checkpoint.load(folder), checkpoint.load_config(folder)
    recipe = step_recipe(config, recipe_path, overrides or {})
    task = checkpoint_task(config)
    train_loader, _, num_classes = task.loaders(recipe)
    if num_classes != config.get("model_kwargs", {}).get("num_classes", num_classes):
        raise ValueError(f"the model predicts {config['model_kwargs']['num_classes']} classes, the {recipe.data} "
                         f"data has {num_classes}")
    rundir.seed_everything(recipe.seed)
    fit(model, train_loader, epochs=recipe.finetune_epochs, lr=recipe.finetune_lr, optimizer=recipe.optimizer,
        device=recipe.device, progress=progress, desc="fine-tune", loss=task.loss(recipe, model, train_loader))
    checkpoint.save(out, model, config=config, plan=checkpoint.load_plan(folder))
    return recipe


def evaluate_checkpoint(folder: str | Path, data: str, *, split: str = "val", samples: int = 0,
                        batch_size: int = 4, eval_size: tuple[int, int] | None = None, device="cpu",
                        **predict_kwargs) -> tuple[dict, list[str]]:
    """Accuracy of checkpoint ``folder`` on ``data`` (``KIND[:PATH]``): (metrics, class names).

    Semantic models: mIoU, per-class IoU and accuracies (``predict_kwargs``: crop, stride, flip for sliding
    windows and flip testing); instance models: COCO box and mask AP.
    """
    config = checkpoint.load_config(folder)
    return checkpoint_task(config).evaluate_checkpoint(folder, config, data, split=split, samples=samples,
                                                       batch_size=batch_size, eval_size=eval_size, device=device,
                                                       **predict_kwargs)


def latency_step(model: nn.Module, example: torch.Tensor, *, target: float, table_path: str | Path = "",
                 cache: Path | None = None, runtime: str = "eager", threads: int = 1, tries: int = 5,
                 name: str | None = None) -> dict:
    """``prune`` arguments that cut ``model`` to ``target`` of its latency on ``runtime``: the table (see
    :func:`latency_table`) allocates, and with ``tries`` > 0 a :class:`~segprune.eval.latency.LatencyMeter`
    measures each allocation on the runtime and corrects it until within 5 %; ``tries`` 0: the table alone."""
    table = latency_table(model, example, path=table_path, cache=cache, runtime=runtime, threads=threads, name=name)
    if not tries:
        return dict(target_latency=target, latency=table)
    meter = LatencyMeter(model, example, runtime, threads=threads)
    return dict(target_latency=target, latency=table, measure=meter, latency_tries=tries)


def table_file(runtime: str, threads: int) -> str:
    """Where a run folder keeps its latency table: ``latency_table_<runtime>[_<precision>]_t<threads>.json``."""
    rt, precision = parse(runtime)
    return f"latency_table_{rt.name}{'' if precision == rt.precisions[0] else '_' + precision}_t{threads}.json"


def latency_table(model: nn.Module, example: torch.Tensor, *, path: str | Path = "", cache: Path | None = None,
                  runtime: str = "eager", threads: int = 1, name: str | None = None) -> LatencyTable:
    """The latency table of ``model`` at ``example``'s shape on ``runtime``: read from ``path`` (refused, with what
    differs, when measured on another runtime, precision, thread count, CPU, input or model), else measured once and
    kept in the folder ``cache`` (:func:`table_file`) for the next run."""
    cached = cache / table_file(runtime, threads) if cache is not None else None
    source = Path(path) if path else cached
    if source is not None and source.is_file():
        rt, precision = parse(runtime)
        return LatencyTable.load(source, runtime=rt.name, precision=precision, threads=threads,
                                 input=tuple(example.shape), cpu=cpu_model(), model=model)
    if path:
        raise FileNotFoundError(f"{path}: no such latency table")
    table = measure_latency_table(model, example, runtime=runtime, threads=threads, name=name)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        table.save(cached)
    return table
