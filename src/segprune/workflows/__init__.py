"""Workflows: what a run does, above the library floors (data, models, prune, train, eval, export, report).

- :mod:`~segprune.workflows.recipe`: the flat typed Recipe, read from YAML and ``--set`` overrides;
- :mod:`~segprune.workflows.methods`: the one registry of methods (sparsity, criterion, strategy);
- :mod:`~segprune.workflows.tasks`: the Task interface (semantic, instance);
- :mod:`~segprune.workflows.data`: datasets and loaders of a recipe or a ``--data`` string, ``segprune check``;
- :mod:`~segprune.workflows.rundir`: output folders (claim: the one refusal of a used output; clear, seed, log);
- :mod:`~segprune.workflows.compress` (``segprune run|demo``), :mod:`~segprune.workflows.train`
  (``segprune train``), :mod:`~segprune.workflows.steps` (``prune|finetune|eval|groups`` on checkpoints and
  models), :mod:`~segprune.workflows.bench` (``segprune bench``), :mod:`~segprune.workflows.deploy`
  (``segprune export``), :mod:`~segprune.workflows.inference` (``segprune predict|report``).

Nothing below this floor imports it; ``cli.py`` parses arguments and calls it.
"""

from segprune.workflows.compress import run
from segprune.workflows.methods import METHODS, Method
from segprune.workflows.recipe import Recipe, recipe_from
from segprune.workflows.tasks import TASKS, Task
from segprune.workflows.train import run_training

__all__ = ["METHODS", "TASKS", "Method", "Recipe", "Task", "recipe_from", "run", "run_training"]
