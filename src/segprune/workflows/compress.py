"""The compression run every recipe runs (and `segprune demo` runs with the defaults), for either task:

train (with the method's sparsity, if any) -> prune (one pass, several with fine-tuning between, one of Miao et
al.'s schedules, or Liu et al.'s post-pruning path) -> fine-tune (optionally distilled from the unpruned model)
-> fuse Conv+BN -> measure before and after (accuracy, params, MACs, weights file, interleaved CPU latency)
-> report + checkpoint of the pruned model.

The "before" model is the one as trained and unfused; "after" is pruned, fine-tuned and fused, so part of the
accuracy change is the extra training (the report says so).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segprune import checkpoint
from segprune._utils import IGNORE_INDEX, eval_mode, logits
from segprune.eval.profile import compare_latency, profile
from segprune.eval.validation import miou_metric, val_miou
from segprune.export.fuse import fuse_conv_bn
from segprune.prune import CAPSparsity, channel_groups, prune, prune_blocks, slim_layers
from segprune.prune.criteria import CRITERIA
from segprune.prune.plan import Plan
from segprune.prune.postprune import pruning_path, select
from segprune.prune.schedules import layer_by_layer, two_stage_global
from segprune.prune.trace import trace
from segprune.report.common import table
from segprune.report.plots import plot_path
from segprune.report.run import write_report
from segprune.train.aux import AuxLoss, add_losses
from segprune.train.distill import distillation
from segprune.train.loop import SegmentationLoss, fit
from segprune.workflows import rundir
from segprune.workflows.data import class_names, inferred_classes_note
from segprune.workflows.methods import criterion, method, regularizer
from segprune.workflows.recipe import Recipe, as_plain, slim_widths
from segprune.workflows.steps import latency_step, table_file
from segprune.workflows.tasks import Task, gamma_histogram, task_of


def run(r: Recipe, out: str | Path, *, force: bool = False, progress: bool = True) -> dict:
    """Run recipe `r` into folder `out`; returns the report (also out/report.json, report.md, report.html,
    recipe.yaml, log.txt, and the pruned checkpoint in out/pruned)."""
    task = task_of(r.task)
    task.check(r)
    out = rundir.claim(out, force=force)
    plain = as_plain(r)
    rundir.start(out, plain)
    start, log = time.perf_counter(), rundir.RunLog(out / "log.txt", progress)
    rundir.seed_everything(r.seed, r.threads)
    train_loader, val, num_classes = task.loaders(r)
    if note := inferred_classes_note(train_loader):
        log(note)
    model, model_kwargs, weights_note = task.build_model(r, num_classes)
    model = model.to(r.device)
    if weights_note:
        log(weights_note)
    stages = Stages(r, train_loader, example=torch.zeros(1, 3, *r.size, device=r.device), val=val,
                    num_classes=num_classes, out=out, log=log, progress=progress)
    groups = channel_groups(model, task.prune_inputs(model, stages.example))
    histograms = stages.train(model, groups)
    before = stages.measure(model)
    log(f"    {task.summary(before)}")
    pruned, plan, removed = stages.compress(model, groups)
    checkpoint.save(out / "pruned", pruned, plan=plan, config=task.config(r, model_kwargs, val, plain))

    log("4/4 fusing Conv+BN and measuring (latency interleaved before/after)")
    deployed = fuse_conv_bn(task.deployable(pruned), stages.example)
    after = stages.measure(deployed)
    latency = compare_latency({"before": task.deployable(model), "after": deployed}, stages.example,
                              threads=r.threads, rounds=r.latency_rounds, runs=r.latency_runs)
    for side, row in (("before", before), ("after", after)):
        row["latency_ms"], row["latency"] = latency[side]["median_ms"], latency[side]
    report = {"title": task.title(r), **task.record(), "recipe": plain,
              "seconds": time.perf_counter() - start, "before": before, "after": after,
              "pruning": {**stages.pruning_record(model, groups, removed), **stages.latency_record(pruned)},
              "gamma_histograms": histograms,
              "notes": notes(r, task), "widths": layer_widths(model, pruned, groups),
              "class_names": class_names(val),
              "curves": stages.curve_record()}
    write_report(out, report,  # the overlays are drawn, or their failure noted, inside write_report
                 samples=lambda: task.samples(model, deployed, val, r, num_classes))
    log(table(before, after, rows=task.rows))
    if "fg_iou" in after:
        log(f"foreground IoU {before['fg_iou']:.4f} -> {after['fg_iou']:.4f} (mIoU over the two classes "
            f"{before['miou']:.4f} -> {after['miou']:.4f})")
    log(f"done in {report['seconds']:.0f} s: {out / 'report.md'}")
    return report


class Stages:
    """The stages of one run, sharing its recipe, task, data, example input, folder and log: `train`, `measure`,
    `compress` (the structure step, then `passes`, `schedule` or `postprune`). `run` strings them together; a
    benchmark or test may call one alone."""

    def __init__(self, r: Recipe, train_loader, *, example: torch.Tensor, val=None, num_classes: int = 0,
                 out: Path | None = None, log=print, progress: bool = False):
        self.r, self.task, self.example, self.train_loader, self.val = r, task_of(r.task), example, train_loader, val
        self.num_classes, self.out, self.log, self.progress = num_classes, out, log, progress
        self.curves: dict[str, list[float]] = {}  # mean training loss per epoch, by stage (train, fine-tune, ...)
        self.val_miou: list[float] = []  # validation mIoU after each training epoch
        self.table = None  # target_latency: the latency table of the unpruned model
        self.closed_loop = None  # ... and what measuring each allocation on the runtime found (PruneResult.latency)

    # --- training ---------------------------------------------------------------------------------------------
    def train(self, model: nn.Module, groups) -> list[list[int]]:
        """Train `r.epochs` with the method's sparsity; returns the |γ| histogram after every epoch."""
        r, histograms = self.r, []
        reg = regularizer(r.method, model, groups, lam=r.lam, warmup=r.warmup, cap_affinity=r.cap_affinity,
                          cap_weight=r.cap_weight, cap_temperature=r.cap_temperature)
        self.log(f"1/4 training {r.model} (width {r.width}) for {r.epochs} epochs on {r.data}; method {r.method}")

        def on_epoch(epoch: int, loss: float) -> None:
            histograms.append(gamma_histogram(model))
            self.log(f"    epoch {epoch + 1}/{r.epochs}: loss {loss:.4f}")

        self.fit(model, epochs=r.epochs, lr=r.lr, regularizer=reg, desc="train", on_epoch=on_epoch,
                 validate=self.validation())
        if isinstance(reg, CAPSparsity):
            reg.remove()  # nothing of CAP stays in the model
        self.log(f"    |gamma| histogram after training: {histograms[-1] if histograms else []}")
        return histograms

    def fit(self, model: nn.Module, *, loader=None, extra_loss=None, **kwargs):
        """`fit` with the task's loss and the recipe's auxiliary heads (`aux_layers`) attached for its duration."""
        r, loader = self.r, loader if loader is not None else self.train_loader
        common = dict(optimizer=r.optimizer, device=r.device, progress=kwargs.pop("progress", self.progress))
        if not r.aux_layers:
            losses = fit(model, loader, loss=self.task.loss(r, model, self.train_loader), extra_loss=extra_loss,
                         **common, **kwargs)
        else:
            with AuxLoss(model, r.aux_layers, r.aux_weights, example_inputs=self.example) as aux:
                loss = SegmentationLoss(aux.criterion(self.task.pixel_loss(r, self.train_loader)))
                losses = fit(model, loader, loss=loss, extra_loss=add_losses(extra_loss, aux.extra_loss), **common,
                             **kwargs)
        self.curves.setdefault(kwargs.get("desc", "train"), []).extend(losses)
        return losses

    def validation(self):
        """Validation mIoU (the task's ``epoch_metric``) after every training epoch, kept for the report's curves;
        None for a task validated only at the end."""
        key = self.task.epoch_metric
        if key is None or self.val is None:
            return None

        def validate(model: nn.Module) -> float:
            metrics = self.task.evaluate(model, self.val, self.r, num_classes=self.num_classes, device=self.r.device)
            self.val_miou.append(metrics[key])
            return metrics[key]
        return validate

    def finetune(self, model: nn.Module, epochs: int, teacher: nn.Module | None = None, desc: str = "fine-tune"):
        r = self.r
        extra = distillation(teacher, alpha=r.kd_alpha, temperature=r.kd_temperature) if teacher else None
        return self.fit(model, epochs=epochs, lr=r.finetune_lr, extra_loss=extra, desc=desc)

    def measure(self, model: nn.Module) -> dict:
        """Accuracy on the validation data and the static cost of the deployable model."""
        metrics = self.task.evaluate(model, self.val, self.r, num_classes=self.num_classes, device=self.r.device)
        return {**metrics, **profile(self.task.deployable(model), self.example)}

    # --- pruning ----------------------------------------------------------------------------------------------
    def compress(self, model: nn.Module, groups):
        """The structure step, then the method's strategy; returns (pruned and fine-tuned model, plan, channels
        removed)."""
        r = self.r
        structured, structure_plan, fraction = self.structure(model)
        # the channel stage's target stays a fraction of the original model's MACs
        if structure_plan is not None:
            self.r = replace(r, target_macs=min(1.0, r.target_macs / fraction) if r.target_macs else 0.0)
        what = f"to {r.target_macs:.0%} of the MACs" if r.target_macs else f"{r.ratio:.0%} of prunable channels"
        if method(r.method).strategy == "path":
            what = f"along a path of {r.path_step:g} MACs a step down to {r.path_min_macs:.0%}, then selecting"
        self.log(f"2/4 pruning {what} ({r.method}), 3/4 fine-tuning {r.finetune_epochs} epochs")
        try:
            if method(r.method).strategy == "path":
                pruned, plan, removed = self.postprune(structured)
            elif r.schedule != "iterative":
                pruned, plan, removed = self.schedule(structured)
            else:
                pruned, plan, removed = self.passes(structured, groups if structure_plan is None else None)
        finally:
            self.r = r
        return pruned, plan if structure_plan is None else structure_plan.then(plan), removed

    def passes(self, model: nn.Module, groups):
        """`iterations` passes of prune + fine-tune; returns (pruned model, composed plan, channels removed)."""
        r = self.r
        teacher = model if r.kd_alpha > 0 else None
        current, plan, removed = model, None, 0
        for it in range(r.iterations):
            step = dict(target_macs=r.target_macs ** ((it + 1) / r.iterations) if r.target_macs else None,
                        ratio=None if r.target_macs else 1 - (1 - r.ratio) ** (1 / r.iterations))
            if r.target_latency:  # one pass (Recipe.check), on the table of the unpruned model
                step = self.latency_step(current)
            result = prune(current, self.task.prune_inputs(current, self.example), criterion=self.criterion(current),
                           min_keep=r.min_keep, round_to=r.round_to or None, groups=groups if it == 0 else None,
                           rescore=r.rescore, **step)
            removed += result.channels_removed
            self.closed_loop = result.latency
            plan = result.plan if plan is None else plan.then(result.plan)
            self.log(f"    pass {it + 1}/{r.iterations}: removed {result.channels_removed} channels")
            self.finetune(result.model, math.ceil(r.finetune_epochs / r.iterations), teacher)
            current = result.model
        return current, plan, removed

    def latency_step(self, model: nn.Module) -> dict:
        """The recipe's latency target on its runtime (the table read, or measured and kept in the run folder;
        each allocation measured and corrected, `latency_tries`); conditions, tries and ratios go into the report."""
        r = self.r
        step = latency_step(model, self.example, target=r.target_latency, table_path=r.latency_table,
                            cache=self.out, runtime=r.latency_runtime, threads=r.latency_threads,
                            tries=r.latency_tries, name=r.model)
        self.table = step["latency"]
        self.log(f"    latency table on {r.latency_runtime} ({r.latency_threads} thread(s)): "
                 f"{self.table.predict():.2f} ms predicted for the unpruned model")
        return step

    def criterion(self, model: nn.Module):
        """The method's channel criterion (Taylor: scored on 8 training batches with plain cross-entropy)."""
        batches = [b for _, b in zip(range(8), self.train_loader)] if self.r.method == "taylor" else ()
        return criterion(self.r.method, model, batches,
                         lambda out, y: F.cross_entropy(out, y, ignore_index=IGNORE_INDEX))

    def schedule(self, model: nn.Module):
        """Miao et al.'s schedules to `target_macs`: two-stage global (prune part, fine-tune `stage_a_epochs`,
        re-score, prune the rest, fine-tune `finetune_epochs`) or layer by layer (`layer_epochs` after each
        group)."""
        r = self.r
        name = method(r.method).criterion
        if not r.target_macs or name not in CRITERIA:
            raise ValueError(f"schedule {r.schedule} needs target_macs > 0 and a weight criterion (method one of "
                             f"{sorted(CRITERIA)}, slimming or cap), got target_macs={r.target_macs}, method "
                             f"{r.method}")
        teacher = model if r.kd_alpha > 0 else None
        common = dict(target_macs=r.target_macs, finetune=lambda m, epochs: self.finetune(m, epochs, teacher),
                      criterion=name, min_keep=r.min_keep)
        if r.schedule == "two_stage":
            result = two_stage_global(model, self.example, stage_a=r.stage_a,
                                      epochs=(r.stage_a_epochs, r.finetune_epochs), round_to=r.round_to or None,
                                      **common)
        else:
            result = layer_by_layer(model, self.example, epochs_per_layer=r.layer_epochs, **common)
        reached = f" to MACs {result.stages[-1]['macs']:.3f} of the model given" if result.stages else ""
        self.log(f"    {r.schedule}: {len(result.stages)} cuts{reached}; retraining {result.retrain_seconds:.1f} s")
        return result.model, result.plan, sum(s["removed"] for s in result.stages)

    def postprune(self, model: nn.Module):
        """Post-pruning (Liu): the weakest-link path scored on `path_batches` training batches, one sub-network
        chosen on the validation split, retrained `finetune_epochs`; writes path.json and path.png."""
        r = self.r
        pixel_loss = self.task.pixel_loss(r, self.train_loader)
        batches = [(x.to(r.device), y.to(r.device)) for _, (x, y) in zip(range(r.path_batches), self.train_loader)]
        recover_batches = [b for _, b in zip(range(r.path_recover_steps), self.train_loader)]
        recover = (lambda m: self.fit(m, loader=recover_batches, epochs=1, lr=r.finetune_lr, progress=False,
                                      desc="recover")) if recover_batches else None
        path = pruning_path(model, self.example, batches, val_miou(self.val, self.num_classes, device=r.device),
                            step=int(r.path_step) if r.path_step >= 1 else r.path_step, criterion=r.path_criterion,
                            selector=r.path_selector, recover=recover, min_macs=r.path_min_macs, min_keep=r.min_keep,
                            loss_fn=lambda out, y: pixel_loss(logits(out), y),
                            log=self.log)
        chosen = select(path, delta=r.path_delta, rule=r.path_rule)
        path.save(self.out / "path.json", selected=chosen)
        plot_path(path, self.out / "path.png", selected=chosen)
        step = path.steps[chosen]
        self.log(f"    selected step {chosen} of {len(path) - 1} ({r.path_rule}): MACs "
                 f"{step.macs / path.steps[0].macs:.3f}, validation mIoU {step.miou:.4f} (best "
                 f"{max(s.miou for s in path.steps):.4f})")
        pruned = path.model_at(chosen, model)
        self.fit(pruned, epochs=r.finetune_epochs, lr=r.finetune_lr, desc="retrain")  # with the recipe's aux heads
        return pruned, step.plan, step.removed

    def structure(self, model: nn.Module):
        """Miao et al.'s structure step, before channel pruning: remove residual blocks (`layer_pruning`), then set
        named layers' widths (`slim_widths`). Returns (model, plan or None, its MACs as a fraction of the
        original)."""
        r = self.r
        if not r.layer_pruning and not r.slim_widths:
            return model, None, 1.0
        current, plan = model, Plan()
        if r.layer_pruning:
            batches = [(x.to(r.device), y.to(r.device)) for _, (x, y) in zip(range(r.layer_batches),
                                                                              self.train_loader)]
            metric = miou_metric(_logit_classes(model, self.example)) if r.layer_metric == "miou" else None
            result = prune_blocks(current, self.example, batches, tolerance=r.layer_tolerance,
                                  max_blocks=r.layer_max or None, loss_fn=self.task.pixel_loss(r, self.train_loader),
                                  metric_fn=metric)
            self.log(f"    layer pruning: removed {len(result.removed)} blocks {[b.name for b in result.removed]}")
            current, plan = result.model, plan.then(result.plan)
        if r.slim_widths:
            crit = "bn_scale" if method(r.method).sparsity else "l1"
            result = slim_layers(current, self.example, slim_widths(r.slim_widths), criterion=crit)
            self.log(f"    slimmed {r.slim_widths}: removed {result.channels_removed} channels")
            current, plan = result.model, plan.then(result.plan)
        macs = lambda m: sum(trace(m, self.example, modes=("eval",)).macs.values())  # noqa: E731
        return current, plan, macs(current) / max(macs(model), 1)

    def curve_record(self) -> dict:
        """Loss per epoch of every stage, with the training stage's validation mIoU."""
        curves = {stage: {"epoch": list(range(1, len(losses) + 1)), "loss": losses}
                  for stage, losses in self.curves.items()}
        if self.val_miou and "train" in curves and len(self.val_miou) == len(curves["train"]["loss"]):
            curves["train"]["val_miou"] = list(self.val_miou)
        return curves

    def latency_record(self, pruned: nn.Module) -> dict:
        """With `target_latency`: the target, the runtime, the latency ratio the table predicts for `pruned` and,
        closed-loop, the ratio measured on the runtime, whether it met the target and every try."""
        if self.table is None:
            return {}
        r = self.r
        measured = {k: self.closed_loop[k] for k in ("measured_ratio", "met", "tries")} if self.closed_loop else {}
        return {"latency_allocation": {
            "target": r.target_latency, "runtime": r.latency_runtime, "threads": r.latency_threads,
            "table": r.latency_table or table_file(r.latency_runtime, r.latency_threads),
            "predicted_ratio": self.table.ratio_of(pruned), **measured}}

    def pruning_record(self, model: nn.Module, groups, removed: int) -> dict:
        """What was removed of what could be (the task's :meth:`~segprune.workflows.tasks.Task.pruning_record`)."""
        return self.task.pruning_record(model, groups, removed, log=self.log)


def _logit_classes(model: nn.Module, example) -> int:
    with eval_mode(model), torch.no_grad():
        out = model(example)
    return logits(out).shape[1]


def layer_widths(before: nn.Module, after: nn.Module, groups) -> dict[str, list[int]]:
    """{layer: [output channels before, after]} of every conv with prunable output channels, in model order
    (0 after: the layer is gone or bypassed)."""
    prunable = {name for g in groups if not g.frozen for name in g.modules("out")}
    pruned = dict(after.named_modules())
    return {name: [m.out_channels, getattr(pruned.get(name), "out_channels", 0)] for name, m in before.named_modules()
            if name in prunable and hasattr(m, "out_channels")}


def notes(r: Recipe, task: Task) -> list[str]:
    """What a report's reader must know to read its figures."""
    first = (f"before = the model as trained ({r.epochs} epochs, method {r.method}, unfused); after = pruned, "
             f"fine-tuned {r.finetune_epochs} more epochs, Conv+BN fused: part of its {task.accuracy_name} change is "
             "that extra training.")
    return [first, *task.notes(r)]
