"""The demo: the whole product on the embedded synthetic scenes, in a few minutes on a laptop CPU.

sparsity-train (L1 on BN scales) -> prune by one global |gamma| threshold -> fine-tune -> fuse Conv+BN ->
measure before and after (mIoU, params, MACs, weights file, interleaved CPU latency) -> report + checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from segprune import checkpoint
from segprune.data.synthetic import SyntheticScenes
from segprune.eval.metrics import evaluate
from segprune.eval.profile import compare_latency, profile
from segprune.export.fuse import fuse_conv_bn
from segprune.models import create_model
from segprune.prune import BNSparsity, channel_groups, prune
from segprune.report.writer import table, write_report
from segprune.train.loop import fit


@dataclass
class DemoConfig:
    """Everything the demo does, with defaults sized for 2 CPU cores and under 5 minutes."""

    model: str = "pspnet_resnet18"
    width: float = 0.25
    num_classes: int = 6
    size: tuple[int, int] = (96, 128)
    train_samples: int = 320
    val_samples: int = 96
    batch_size: int = 8
    epochs: int = 12
    finetune_epochs: int = 8
    optimizer: str = "adamw"  # converges in a dozen CPU epochs; "sgd" (poly LR) is the papers' choice
    lr: float = 0.006
    finetune_lr: float = 0.002
    lam: float = 5e-4  # L1 on BN scales, added to their gradients
    ratio: float = 0.5  # fraction of prunable channels removed
    criterion: str = "bn_scale"
    threads: int = 2
    seed: int = 0


def _loaders(cfg: DemoConfig):
    kw = dict(size=cfg.size, num_classes=cfg.num_classes, seed=cfg.seed)
    train = SyntheticScenes(num_samples=cfg.train_samples, split="train", **kw)
    val = SyntheticScenes(num_samples=cfg.val_samples, split="val", **kw)
    g = torch.Generator().manual_seed(cfg.seed)
    return (DataLoader(train, batch_size=cfg.batch_size, shuffle=True, generator=g, drop_last=True),
            DataLoader(val, batch_size=cfg.batch_size))


def _measure(model, val_loader, example, cfg) -> dict:
    return {"miou": evaluate(model, val_loader, num_classes=cfg.num_classes)["miou"], **profile(model, example)}


def run_demo(out: str | Path, cfg: DemoConfig | None = None, *, force: bool = False, progress: bool = True) -> dict:
    """Run the demo into folder `out` and return the report (also written to out/report.json and report.md)."""
    cfg, out = cfg or DemoConfig(), Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} already holds a run; choose another --out or pass --force")
    out.mkdir(parents=True, exist_ok=True)
    start, log = time.perf_counter(), _Log(out / "log.txt", progress)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    train_loader, val_loader = _loaders(cfg)
    model_kwargs = {"num_classes": cfg.num_classes, "width": cfg.width}
    model = create_model(cfg.model, **model_kwargs)
    example = torch.zeros(1, 3, *cfg.size)
    groups = channel_groups(model, example)

    log(f"1/4 sparsity training {cfg.model} (width {cfg.width}) for {cfg.epochs} epochs, lambda {cfg.lam}")
    fit(model, train_loader, epochs=cfg.epochs, lr=cfg.lr, optimizer=cfg.optimizer, progress=progress,
        regularizer=BNSparsity(model, lam=cfg.lam, groups=groups), desc="sparsity-train")
    before = _measure(model, val_loader, example, cfg)

    log(f"2/4 pruning {cfg.ratio:.0%} of prunable channels by {cfg.criterion} (one global threshold)")
    result = prune(model, example, ratio=cfg.ratio, criterion=cfg.criterion, groups=groups)
    log(f"    removed {result.channels_removed} of {result.channels_prunable} prunable channels")

    log(f"3/4 fine-tuning for {cfg.finetune_epochs} epochs")
    fit(result.model, train_loader, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, optimizer=cfg.optimizer,
        progress=progress, desc="fine-tune")
    checkpoint.save(out / "pruned", result.model, plan=result.plan,
                    config={"model": cfg.model, "model_kwargs": model_kwargs})

    log("4/4 fusing Conv+BN and measuring (latency interleaved before/after)")
    deployed = fuse_conv_bn(result.model, example)
    after = _measure(deployed, val_loader, example, cfg)
    latency = compare_latency({"before": model, "after": deployed}, example, threads=cfg.threads)
    before["latency_ms"], after["latency_ms"] = latency["before"]["median_ms"], latency["after"]["median_ms"]
    before["latency"], after["latency"] = latency["before"], latency["after"]
    report = _report(cfg, before, after, result, time.perf_counter() - start)
    write_report(out, report)
    log(table(before, after))
    log(f"done in {report['seconds']:.0f} s: {out / 'report.md'}")
    return report


def _report(cfg, before, after, result, seconds) -> dict:
    return {"title": f"demo: {cfg.model} on synthetic scenes", "config": asdict(cfg), "seconds": seconds,
            "before": before, "after": after,
            "pruning": {"removed_channels": result.channels_removed, "prunable_channels": result.channels_prunable,
                        "removed_fraction": result.channels_removed / max(result.channels_prunable, 1),
                        "groups": len(result.groups)},
            "notes": ["before = the sparsity-trained model as trained (unfused); after = pruned, fine-tuned, "
                      "Conv+BN fused.", "mIoU on the synthetic val split; MACs = FLOPs / 2 for one "
                      f"1x3x{cfg.size[0]}x{cfg.size[1]} input (torch.utils.flop_counter)."]}


class _Log:
    """Print a line and keep it in the run's log file."""

    def __init__(self, path: Path, echo: bool):
        self.path, self.echo = path, echo

    def __call__(self, line: str) -> None:
        if self.echo:
            print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def config_from(overrides: dict) -> DemoConfig:
    """A DemoConfig with `overrides` applied; unknown keys and wrongly typed values raise ValueError."""
    cfg = DemoConfig()
    fields = asdict(cfg)
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(f"unknown setting {key!r}; known: {', '.join(fields)}")
        setattr(cfg, key, _typed(key, value, fields[key]))
    return cfg


def _typed(key, value, default):
    if isinstance(default, tuple):
        value = json.loads(value) if isinstance(value, str) else value
        return tuple(int(v) for v in value)
    try:
        return type(default)(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"setting {key}={value!r} is not a {type(default).__name__}") from err
