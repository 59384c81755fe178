"""The recipe: everything a run does, as one flat typed dataclass.

A YAML file overlays the defaults, `--set key=value` overrides are type-checked, unknown keys raise, and the resolved
recipe is saved with every run (recipe.yaml, and in every checkpoint's config). The fields come in sections, in
this order: what (task, model, data), training, the method (sparsity and pruning), fine-tuning, measurement, and the
options of single methods (post-pruning; Miao et al.'s schedules, auxiliary heads and structure step). Library
functions never take a Recipe: the workflows unpack it into keyword arguments.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import yaml

from segprune.export.runtimes import parse as parse_runtime
from segprune.models.builders import is_spec
from segprune.workflows.methods import METHODS
from segprune.workflows.taskbase import DEFAULT_TASK, TASKS, task_of

TASK_NAMES = TASKS.keys()  # a live view of the one registry of tasks (filled by segprune.workflows.tasks)
SCHEDULES = ("iterative", "two_stage", "layer_by_layer")
_TUPLE_ITEMS = {"aux_layers": str, "aux_weights": float}  # tuples of other settings hold ints


@dataclass
class Recipe:
    """Everything a run does, in sections (see the module docstring). The defaults are the demo: 2 CPU cores,
    about 2 minutes."""

    # the settings a recipe file or override named (the others hold defaults); not a setting, never saved
    given: ClassVar[frozenset[str]] = frozenset()
    # --- what: the task, the model and the data
    name: str = "demo"
    task: str = DEFAULT_TASK  # a registered Task: semantic, or instance (YOLACT: box and mask AP)
    model: str = "pspnet_resnet18"  # a zoo name, or another library's: smp:Segformer, transformers:<Class>, timm:<name>
    width: float = 0.25  # the demo's; 0 = the model's own default width (zoo models only)
    model_args: dict = field(default_factory=dict)  # the builder's keyword arguments, e.g. {encoder_name: mit_b0}
    weights: str = ""  # a local safetensors file the model starts from (pretrained; a head of another shape is new)
    data: str = "synthetic"  # or a dataset name of segprune.data.build_dataset, with data_root
    data_root: str = ""
    num_classes: int = 6  # synthetic data; a folder dataset infers it from its masks unless given
    size: tuple[int, int] = (96, 128)  # training crop (H, W); synthetic scene size
    eval_size: tuple[int, int] = (0, 0)  # resize validation images to (H, W); (0, 0) = their own size
    train_samples: int = 320  # synthetic: how many to generate; real data: use the first N (0 = all)
    val_samples: int = 96
    val_split: str = "val"
    # --- training
    batch_size: int = 8
    epochs: int = 12
    optimizer: str = "adamw"  # converges in a dozen CPU epochs; "sgd" (poly LR) is the papers' choice
    class_weights: bool = False  # weight the loss by the dataset's class weights (CamVid: SegNet's median frequency)
    lr: float = 0.006
    # --- the method: sparsity while training, then pruning (segprune.workflows.methods.METHODS)
    method: str = "slimming"  # one of METHODS
    lam: float = 5e-4  # sparsity on BN scales (slimming, cap), added to their gradients
    warmup: int = 0  # steps over which lam ramps up
    cap_affinity: str = "dot"
    cap_weight: str = "one_minus"
    cap_temperature: float = 0.1
    ratio: float = 0.5  # fraction of prunable channels removed (when target_macs is 0)
    target_macs: float = 0.0  # if > 0: remove until MACs <= this fraction of the original
    target_latency: float = 0.0  # if > 0: remove until the predicted latency <= this fraction (a latency table's)
    latency_table: str = ""  # the table file (segprune.LatencyTable); "" = measure it into the run folder
    latency_runtime: str = "eager"  # the deployment runtime (segprune.export.runtimes): name or name:precision
    latency_threads: int = 1  # ... and its intra-op threads
    latency_tries: int = 5  # allocations measured on the runtime and corrected until within 5 %; 0: the table alone
    min_keep: float = 0.1
    round_to: int = 0
    iterations: int = 1  # prune/fine-tune passes
    rescore: int = 1  # each pass's allocation in this many steps, re-scored before each (Taylor); 1 = one shot
    # --- fine-tuning
    finetune_epochs: int = 8
    finetune_lr: float = 0.002
    kd_alpha: float = 0.0  # distillation from the unpruned model during fine-tuning (0 = off)
    kd_temperature: float = 4.0
    # --- measurement and the machine
    threads: int = 2
    latency_rounds: int = 7  # interleaved before/after rounds of the latency measurement
    latency_runs: int = 10  # timed runs per model per round
    report_samples: int = 3  # validation images shown as input | truth | unpruned | pruned in report.html
    device: str = "cpu"
    seed: int = 0
    # `segprune train` only (segprune.train.loop.fit):
    accumulate: int = 1  # optimizer step every k batches (global batch = batch_size * k)
    amp: bool = False  # autocast: float16 + GradScaler on CUDA; on CPU only with amp_dtype=bfloat16
    amp_dtype: str = ""  # "" = float16 on CUDA; "bfloat16"
    checkpoint_every: int = 0  # training checkpoint every N optimizer steps (0 = at epoch ends only)
    sync_bn: bool = False  # SyncBatchNorm under torchrun (CUDA only)
    num_workers: int = 0  # data loader processes per training process
    # method "postprune" only (segprune.prune.postprune: weakest-link path -> selection -> retraining):
    path_step: float = 0.05  # MACs removed per path step, as a fraction of the original (>= 1: channels per step)
    path_min_macs: float = 0.1  # walk the path down to this fraction of the MACs
    path_criterion: str = "taylor"  # dL per channel: "taylor" or "ablation" (exact, small models only)
    path_selector: str = "rank"  # "rank" or "lasso" (He et al.: LASSO picks the channels, least squares refits)
    path_batches: int = 4  # training batches forming the pruning split
    path_recover_steps: int = 0  # fine-tuning batches between path steps (0 = none)
    path_rule: str = "delta"  # "delta": smallest within path_delta of the best validation mIoU; "1se"
    path_delta: float = 0.01  # mIoU as a fraction (0.01 = one point)
    # Miao et al. (segprune.prune.schedules; segprune.train.aux):
    schedule: str = "iterative"  # "iterative" (`iterations` passes), "two_stage" (global) or "layer_by_layer"
    stage_a: float = 0.5  # two_stage: the fraction of the MAC reduction removed in stage A (stage B: the rest)
    stage_a_epochs: int = 1  # two_stage: fine-tuning epochs after stage A (after stage B: finetune_epochs)
    layer_epochs: int = 1  # layer_by_layer: fine-tuning epochs after each channel group
    aux_layers: tuple[str, ...] = ()  # auxiliary heads on these layers while training and fine-tuning (not deployed)
    aux_weights: tuple[float, ...] = ()  # one loss weight per aux layer
    layer_pruning: bool = False  # first remove residual blocks (segprune.prune.blocks), least loss increase first
    layer_tolerance: float = 0.05  # ... while the loss on layer_batches training batches rises at most this much
    layer_max: int = 0  # ... and at most this many blocks (0 = no limit)
    layer_batches: int = 4
    layer_metric: str = "loss"  # or "miou": score blocks by the drop in mIoU (layer_tolerance then in mIoU, 0.01)
    slim_widths: str = ""  # then set layers' output widths, "name=width,..." (e.g. "ppm.branches=128,head.0=128")

    def model_kwargs(self, num_classes: int) -> dict:
        """What the model is built with: the class count, the width (unless 0: the model's own; always 0 for a
        library model, see `check`) and ``model_args``."""
        return {"num_classes": num_classes, **({"width": self.width} if self.width else {}), **self.model_args}

    def check(self) -> Recipe:
        if self.task not in TASK_NAMES:
            raise ValueError(f"unknown task {self.task!r}; choose from {', '.join(TASK_NAMES)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.width < 0:
            raise ValueError(f"width must be >= 0 (0 = the model's own), got {self.width}")
        if is_spec(self.model) and self.width:
            if "width" in self.given:
                raise ValueError(f"width scales segprune's zoo models; {self.model} takes its library's own size "
                                 "arguments in model_args")
            self.width = 0.0  # the demo's default is no setting of a library model (and is saved as none)
        if self.lam < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if not 0 <= self.ratio < 1 or not 0 <= self.target_macs <= 1 or self.iterations < 1:
            raise ValueError("ratio must be in [0, 1), target_macs in [0, 1] (0 = use ratio), iterations >= 1")
        if not 0 <= self.target_latency <= 1 or (self.target_latency and self.target_macs):
            raise ValueError(f"target_latency must be in [0, 1] and excludes target_macs, got {self.target_latency}")
        if self.target_latency and (self.iterations > 1 or self.schedule != "iterative"):
            raise ValueError("target_latency prunes in one pass (iterations 1, schedule iterative): the latency "
                             "table is measured on the unpruned model")
        parse_runtime(self.latency_runtime)  # unknown names and precisions are refused, naming the choices
        if self.rescore < 1:
            raise ValueError(f"rescore must be >= 1 (allocation steps; 1 = one shot), got {self.rescore}")
        if self.latency_threads < 1 or self.latency_tries < 0:
            raise ValueError(f"latency_threads must be >= 1 and latency_tries >= 0, got {self.latency_threads}, "
                             f"{self.latency_tries}")
        if self.accumulate < 1 or self.checkpoint_every < 0 or self.num_workers < 0:
            raise ValueError("accumulate must be >= 1, checkpoint_every >= 0 and num_workers >= 0")
        if self.path_delta < 0 or self.path_step <= 0 or self.path_batches < 1:
            raise ValueError("path_delta must be >= 0, path_step > 0 and path_batches >= 1")
        if self.schedule not in SCHEDULES or not 0 < self.stage_a <= 1:
            raise ValueError(f"schedule must be one of {SCHEDULES} and stage_a in (0, 1], got {self.schedule!r}, "
                             f"{self.stage_a}")
        if self.layer_tolerance < 0 or self.layer_max < 0 or self.layer_batches < 1:
            raise ValueError("layer_tolerance and layer_max must be >= 0, layer_batches >= 1")
        if self.layer_metric not in ("loss", "miou"):
            raise ValueError(f"layer_metric must be 'loss' or 'miou', got {self.layer_metric!r}")
        slim_widths(self.slim_widths)
        if len(self.aux_weights) != len(self.aux_layers):
            raise ValueError(f"aux_weights needs one weight per aux layer: {self.aux_weights} for {self.aux_layers}")
        if self.path_rule not in ("delta", "1se"):
            raise ValueError(f"path_rule must be 'delta' or '1se', got {self.path_rule!r}")
        return self


def recipe_from(path: str | Path | None = None, overrides: dict | None = None) -> Recipe:
    """A Recipe from a flat YAML file and `key=value` overrides; unknown keys and bad types raise ValueError."""
    values = {}
    if path is not None:
        loaded = read_recipe_file(path) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a recipe is a flat mapping of settings")
        values.update(loaded)
    values.update(overrides or {})
    recipe, known = Recipe(), {f.name: f for f in fields(Recipe)}
    for key, value in values.items():
        if key not in known:
            raise ValueError(_unknown(key, path, list(known)))
        setattr(recipe, key, _typed(key, value, getattr(Recipe(), key)))
    recipe.given = frozenset(values)
    return recipe.check()


def _unknown(key: str, path, known: list[str]) -> str:
    """The error of an unknown setting: the close name first (a typo is the usual cause), then every name."""
    where = f" in {path}" if path else ""
    close = difflib.get_close_matches(key, known, n=1)
    guess = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown setting {key!r}{where}{guess} (known: {', '.join(known)})"


def read_recipe_file(path: str | Path):
    """The parsed YAML (or JSON) of a recipe file; a syntax error is a one-line ValueError naming the file, line
    and column (the CLI prints ValueErrors as one line, not a traceback)."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        why = "; ".join(filter(None, (err.context, err.problem)))
        raise ValueError(f"{where}: not valid YAML ({why})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None


def _typed(key, value, default):
    try:
        if isinstance(default, dict):
            return model_args(value)
        if isinstance(default, tuple):
            value = _json_or_list(value) if isinstance(value, str) else value
            value = [value] if isinstance(value, (str, int, float)) else value
            return tuple(_TUPLE_ITEMS.get(key, int)(v) for v in value)
        if isinstance(default, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        return type(default)(value)
    except (TypeError, ValueError, json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "mapping (YAML: {name: value, ...})" if isinstance(default, dict) else type(default).__name__
        raise ValueError(f"setting {key}={value!r} is not a {kind}") from err


def model_args(value) -> dict:
    """A mapping, or YAML text of one (``"{encoder_name: mit_b0, decoder_channels: [64, 32]}"``)."""
    value = yaml.safe_load(value) if isinstance(value, str) else value
    if not isinstance(value, dict):
        raise ValueError(f"{value!r} is not a mapping (YAML: {{name: value, ...}})")
    return value


def _json_or_list(text: str):
    """A JSON list, or a comma-separated one (`--set aux_layers=backbone.layer2,backbone.layer3`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [part.strip() for part in text.split(",") if part.strip()]


def slim_widths(text: str) -> dict[str, int]:
    """`"ppm.branches=128,head.0=128"` -> {layer: width}; a malformed entry is a clear error."""
    widths = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, width = part.partition("=")
        if not name or not width.strip().isdigit():
            raise ValueError(f"slim_widths: {part!r} is not name=width (e.g. ppm.branches=128)")
        widths[name.strip()] = int(width)
    return widths


def as_plain(r: Recipe) -> dict:
    """The recipe as plain YAML/JSON values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(r).items()}


def demo_recipe(task: str = DEFAULT_TASK, overrides: dict | None = None) -> Recipe:
    """The demo's recipe for ``task`` (the Recipe defaults with the task's ``demo`` settings) with ``overrides``."""
    return recipe_from(None, {**task_of(task).demo, **(overrides or {})})


def with_model(path: str | Path | None, overrides: dict, model: str | None) -> dict:
    """Overrides for ``--model NAME``: the model, at its own default width unless the recipe file or ``--set``
    names one (the recipe default 0.25 belongs to the demo's PSPNet-R18, not to any model named on the CLI)."""
    if not model:
        return overrides
    from_file = read_recipe_file(path) if path else {}
    named = "width" in overrides or (isinstance(from_file, dict) and "width" in from_file)
    return {**overrides, "model": model, **({} if named else {"width": 0})}
