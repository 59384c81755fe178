"""The Task interface and the registry of tasks, below the recipe (which checks a recipe's task against it).

A task is everything a run does differently for its kind of segmentation: how a recipe's data becomes loaders, the
training loss, what the engine traces, how a model is evaluated (and when: after every epoch, on every rank), what
is deployed, what its report and checkpoint record and show, and the CLI's one-line summaries. The workflows and the
CLI ask their task; none of them compares task names. The tasks themselves are in :mod:`segprune.workflows.tasks`;
a new one is a :class:`Task` subclass and one :func:`register_task` call.
"""

from __future__ import annotations

import torch
from torch import nn

from segprune import checkpoint
from segprune.models import create_model, rebuild_kwargs
from segprune.report.common import REPORT_TASKS, accuracy_of, rows_of

DEFAULT_TASK = "semantic"  # the recipe's default, and the task of runs and checkpoints saved before tasks


class Task:
    """What a run needs to know about its kind of segmentation."""

    name = ""
    methods: tuple[str, ...] | None = None  # the methods it supports (None: all)
    unsupported: tuple[str, ...] = ()  # recipe settings it refuses when they differ from the default
    demo: dict = {}  # `segprune demo --task NAME`: the recipe settings over the Recipe defaults
    demo_out = "segprune-demo"  # ... and its run folder when --out is not given
    accuracy_name = ""  # the accuracy in one word, for the report's notes ("mIoU", "AP")
    epoch_metric: str | None = None  # the metric validated after every training epoch (the report's curve), or None
    all_reduce_eval = True  # every rank evaluates its validation shard (False: rank 0 alone, on the whole set)
    per_pixel = False  # its models predict per-pixel classes from image/mask data (segprune predict, check, report)

    def record(self) -> dict:
        """What a report and a checkpoint config record of the task (the report floor renders reports by it)."""
        return {"task": self.name}

    @property
    def rows(self) -> list:
        """The report's before/after table rows (see :data:`segprune.report.common.REPORT_TASKS`)."""
        return rows_of(self.record())

    @property
    def accuracy(self) -> tuple[str, str]:
        """The accuracy its reports are judged by, as (key, label): e.g. ``("miou", "mIoU (%)")``."""
        return accuracy_of(self.record())

    def title(self, r) -> str:
        """The report's title."""
        return f"{r.name}: {r.model} ({r.method}, {self.name})"

    def notes(self, r) -> list[str]:
        """What a report's reader must know to read the task's figures (after the before/after line)."""
        return []

    def check(self, r, *, compress: bool = True) -> None:
        """Refuse a recipe this task cannot run (its compression run, or only its training), naming the setting."""
        if compress and self.methods is not None and r.method not in self.methods:
            raise ValueError(f"{self.name} runs support method {' or '.join(self.methods)}, got {r.method!r}")
        defaults = type(r)()
        for key in self.unsupported:
            if getattr(r, key) != getattr(defaults, key):
                raise ValueError(f"{self.name} runs do not support {key} (got {getattr(r, key)!r})")

    def check_sparsity(self, r) -> None:
        """Refuse a training regulariser (the recipe method's sparsity) the task's models cannot take."""

    def check_model(self, model: nn.Module, name: str) -> None:
        """Refuse a model of another task."""

    def build_model(self, r, num_classes: int) -> tuple[nn.Module, dict, str]:
        """The recipe's model (zoo or builder spec), checked for this task and started from ``r.weights``; the
        kwargs its checkpoints record (:func:`segprune.models.rebuild_kwargs`); a line on the weights ('' without)."""
        kwargs = r.model_kwargs(num_classes)
        model = create_model(r.model, **kwargs)
        self.check_model(model, r.model)
        note = ""
        if r.weights:
            loaded, fresh = checkpoint.load_pretrained(model, r.weights)
            note = f"weights: {loaded} tensor(s) from {r.weights}"
            if fresh:
                note += f"; {len(fresh)} left as initialised (the first: {fresh[0]})"
        return model, rebuild_kwargs(model, kwargs), note

    def loaders(self, r) -> tuple:
        """(train loader, validation data for :meth:`evaluate`, number of classes), one process."""
        raise NotImplementedError

    def shard_loaders(self, r, world: int, rank: int) -> tuple:
        """The same for one rank of ``world`` processes: the training shard of a global batch of
        ``r.batch_size``."""
        raise NotImplementedError

    def loss(self, r, model: nn.Module, train_loader):
        """The training loss ``loss(output, targets)``."""
        raise NotImplementedError

    def pixel_loss(self, r, train_loader) -> nn.Module:
        """The per-pixel criterion ``(logits, labels)`` that auxiliary heads (recipe ``aux_layers``) are trained
        with. A task without per-pixel labels has none: its recipes must not name ``aux_layers``."""
        raise NotImplementedError(f"{self.name} runs train no per-pixel loss (aux_layers)")

    def prune_inputs(self, model: nn.Module, example: torch.Tensor):
        """What the engine traces the model with: the model's own ``prune_inputs`` where it publishes them
        (YOLACT's couple prototypes to mask coefficients), else ``example``."""
        return model.prune_inputs(example) if hasattr(model, "prune_inputs") else example

    def evaluate(self, model: nn.Module, val, r, *, num_classes: int, device, all_reduce: bool = False) -> dict:
        """Accuracy of ``model`` on ``val``: a flat dict holding the report rows' accuracy keys."""
        raise NotImplementedError

    def evaluate_checkpoint(self, folder, config: dict, data: str, *, split: str, samples: int, batch_size: int,
                            eval_size, device, **predict_kwargs) -> tuple[dict, list[str]]:
        """`segprune eval`: the accuracy of checkpoint ``folder`` (its ``config``) on ``data``, and class names."""
        raise NotImplementedError

    def summary(self, metrics: dict) -> str:
        """The accuracy as one log line."""
        raise NotImplementedError

    def change(self, before: dict, after: dict) -> list[str]:
        """The accuracy before -> after, as the lines a --quiet run prints (the cost follows the first)."""
        raise NotImplementedError

    def pruning_record(self, model: nn.Module, groups, removed: int, log=print) -> dict:
        """The report's ``pruning``: what was removed of what could be."""
        prunable = sum(int(g.prunable.sum()) for g in groups)
        return {"removed_channels": removed, "prunable_channels": prunable,
                "removed_fraction": removed / max(prunable, 1), "groups": len(groups)}

    def deployable(self, model: nn.Module) -> nn.Module:
        """The model that is measured and exported (training-only parts dropped)."""
        return model

    def config(self, r, model_kwargs: dict, val, plain: dict) -> dict:
        """A checkpoint's config."""
        return {"model": r.model, "model_kwargs": model_kwargs, "recipe": plain}

    def samples(self, before, after, val, r, num_classes: int):
        """Validation images with both models' predictions for the report, or None."""
        return None


TASKS: dict[str, Task] = {}  # filled by segprune.workflows.tasks (imported with segprune.workflows)


def register_task(task: Task, *, rows: list | None = None, accuracy: tuple[str, str] | None = None) -> Task:
    """Add ``task`` under its name, refusing a duplicate; ``rows`` and ``accuracy``: how its reports are tabulated
    and judged (recorded as ``"task": name``), unless the report floor knows already."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    key = task.record().get("task")
    if rows is not None and key not in REPORT_TASKS:
        REPORT_TASKS[key] = (rows, accuracy or (rows[0][1], rows[0][0]))
    return task


def task_of(name: str) -> Task:
    """The task called ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def recorded_task(record: dict) -> Task:
    """The task a report (or checkpoint config) records; none recorded: the default task, as before tasks."""
    return task_of(record.get("task", DEFAULT_TASK))
