"""`segprune demo|run|prune|finetune|groups|train|eval|report|export|bench`: a thin layer over the library
(never imported by it).

`segprune train` also runs under `torchrun --nproc_per_node=N -m segprune.cli train ...` (DDP; rank 0 writes).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _summary(report: dict, out: str) -> None:
    print(f"mIoU {report['before']['miou']:.4f} -> {report['after']['miou']:.4f}, MACs x"
          f"{report['after']['macs'] / report['before']['macs']:.3f}; report in {out}/report.md")
    if "fg_iou" in report["after"]:  # a binary (person / background) dataset
        print(f"foreground IoU {report['before']['fg_iou']:.4f} -> {report['after']['fg_iou']:.4f}")


def cmd_demo(args) -> None:
    if args.task == "instance":
        return _instance_demo(args)
    from segprune.pipeline import recipe_from, run

    args.out = args.out or "segprune-demo"
    report = run(recipe_from(None, _overrides(args.set)), args.out, force=args.force, progress=not args.quiet)
    if args.quiet:
        _summary(report, args.out)


def _instance_demo(args) -> None:
    """`segprune demo --task instance`: YOLACT on the synthetic instances (segprune.instance_pipeline)."""
    from segprune.instance_pipeline import demo_recipe, run_instance

    out = args.out or "segprune-instance-demo"
    report = run_instance(demo_recipe(_overrides(args.set)), out, force=args.force, progress=not args.quiet)
    if args.quiet:
        b, a = report["before"], report["after"]
        print(f"box AP {b['box_ap']:.4f} -> {a['box_ap']:.4f}, mask AP {b['mask_ap']:.4f} -> {a['mask_ap']:.4f}, "
              f"params x{a['params'] / b['params']:.3f}, MACs x{a['macs'] / b['macs']:.3f}; report in {out}/report.md")


def cmd_run(args) -> None:
    from segprune.pipeline import recipe_from, run

    overrides = _overrides(args.set)
    if args.data:  # KIND[:PATH], e.g. human:folder (as for `segprune train`)
        overrides["data"], root = _data_spec(args.data)
        if root:
            overrides["data_root"] = root
    recipe = recipe_from(args.recipe, overrides)
    out = args.out or f"runs/{recipe.name}"
    report = run(recipe, out, force=args.force, progress=not args.quiet)
    if args.quiet:
        _summary(report, out)


def cmd_prune(args) -> None:
    import torch

    import segprune
    from segprune import checkpoint

    if args.method == "taylor":
        raise ValueError("taylor needs training data: run a recipe with `method: taylor` (segprune run)")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"{out} already holds a checkpoint; pass --force to overwrite")
    model, plan, config = checkpoint.load(args.checkpoint), checkpoint.load_plan(args.checkpoint), \
        checkpoint.load_config(args.checkpoint)
    x = torch.zeros(1, 3, *args.size)
    example = model.prune_inputs(x) if hasattr(model, "prune_inputs") else x  # YOLACT: prototypes <-> coefficients
    crit = "bn_scale" if args.method in ("slimming", "cap") else args.method
    target = dict(target_macs=args.target_macs) if args.target_macs else dict(ratio=args.ratio)
    result = segprune.prune(model, example, criterion=crit, round_to=args.round_to, min_keep=args.min_keep, **target)
    checkpoint.save(out, result.model, config=config, plan=plan.then(result.plan))
    print(f"removed {result.channels_removed} of {result.channels_prunable} prunable channels -> {out}")


def cmd_finetune(args) -> None:
    from segprune import checkpoint
    from segprune.pipeline import loaders, recipe_from
    from segprune.train.loop import fit

    model, config = checkpoint.load(args.checkpoint), checkpoint.load_config(args.checkpoint)
    if config.get("task") == "instance":
        from segprune.train.instance import finetune_instances, instance_recipe

        recipe = instance_recipe(config, args.recipe, _overrides(args.set))
        finetune_instances(model, recipe, progress=not args.quiet)
    else:
        recipe = recipe_from(args.recipe, _overrides(args.set))
        train_loader, _, _ = loaders(recipe)
        fit(model, train_loader, epochs=recipe.finetune_epochs, lr=recipe.finetune_lr, optimizer=recipe.optimizer,
            device=recipe.device, progress=not args.quiet, desc="fine-tune")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise FileExistsError(f"{out} already holds a checkpoint; pass --force to overwrite")
    checkpoint.save(out, model, config=checkpoint.load_config(args.checkpoint),
                    plan=checkpoint.load_plan(args.checkpoint))
    print(f"fine-tuned {recipe.finetune_epochs} epochs -> {out}")


def cmd_check(args) -> None:
    from inspect import signature

    from segprune.data import build_dataset
    from segprune.data.check import check_dataset
    from segprune.data.datasets import DATASETS

    if args.task == "instance":
        return _check_instances(args)
    kind, root = _data_spec(args.data)
    if kind not in DATASETS:
        raise ValueError(f"unknown dataset {kind!r}; known: {', '.join(sorted(DATASETS))}")
    params = signature(DATASETS[kind]).parameters
    splits = args.split if "split" in params else ["all"]
    bad = 0
    for split in splits:
        kw = {"split": split} if "split" in params else {}
        if "check_sizes" in params:
            kw["check_sizes"] = False  # read each file once, in the check itself, so every bad one is reported
        dataset = build_dataset(kind, root=root, **kw)
        problems = check_dataset(dataset)
        bad += len(problems)
        print(f"{kind} {split}: {len(dataset)} samples, {len(problems)} bad")
        for line in problems:
            print(f"  {line}")
    if bad:
        raise ValueError(f"{bad} bad sample(s) in {args.data}")


def _check_instances(args) -> None:
    """`segprune check --task instance`: the annotation file's findings, then every image read."""
    import warnings

    from segprune.data.instances import DATA_LOSS, check_instances, instance_dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the summary warning repeats what is printed here
        dataset = instance_dataset(args.data, size=None)
    problems = getattr(dataset, "problems", None)
    for line in [] if problems is None else [problems.summary(), *problems.lines()]:
        print(f"  {line}")
    failures = check_instances(dataset)
    lost = 0 if problems is None else sum(problems.count(kind) for kind in DATA_LOSS)
    print(f"{args.data}: {len(dataset)} images, {len(failures)} unreadable, {lost} annotation problem(s)")
    for line in failures:
        print(f"  {line}")
    if failures or lost:
        raise ValueError(f"{len(failures)} unreadable image(s) and {lost} annotation problem(s) in {args.data}")


def cmd_groups(args) -> None:
    import torch

    import segprune
    from segprune.models import create_model

    model = create_model(args.model, num_classes=args.num_classes, width=args.width)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = segprune.channel_groups(model, torch.zeros(1, 3, args.size, args.size))
    for g in groups:
        print(g)
    prunable = sum(int(g.prunable.sum()) for g in groups)
    print(f"{len(groups)} groups, {prunable} prunable channels of {sum(g.size for g in groups)}")
    for w in caught:
        print(f"warning: {w.message}")


def _data_spec(spec: str) -> tuple[str, str]:
    """`KIND:PATH` (or just `KIND`, e.g. `synthetic`) as (kind, root)."""
    kind, _, root = spec.partition(":")
    return kind.strip(), root.strip()


def _train_recipe(args):
    from segprune.pipeline import recipe_from

    overrides = _overrides(args.set)
    if args.model:
        overrides["model"] = args.model
    if args.data:
        overrides["data"], root = _data_spec(args.data)
        if root:
            overrides["data_root"] = root
    return recipe_from(args.recipe, overrides)


def cmd_train(args) -> None:
    from segprune.train import distributed
    from segprune.train.run import run_training

    recipe = _train_recipe(args)
    out = Path(args.out or f"runs/{recipe.name}")
    device = distributed.setup(recipe.device)
    try:
        if args.task == "instance":
            from segprune.train.instance import run_instance_training

            run_instance_training(recipe, out, device, resume=args.resume, force=args.force, quiet=args.quiet)
        else:
            run_training(recipe, out, device, resume=args.resume, force=args.force, quiet=args.quiet)
    finally:
        distributed.cleanup()


def _eval_dataset(args, config: dict):
    from dataclasses import asdict
    from inspect import signature

    kind, root = _data_spec(args.data)
    if kind == "synthetic":
        from segprune.data.synthetic import SyntheticScenes
        from segprune.pipeline import Recipe

        r = {**asdict(Recipe()), **config.get("recipe", {})}  # the scenes the model was trained on
        return SyntheticScenes(num_samples=args.samples or r["val_samples"], size=tuple(r["size"]), seed=r["seed"],
                               num_classes=config.get("model_kwargs", {}).get("num_classes", r["num_classes"]),
                               split=args.split)
    from segprune.data import DATASETS, build_dataset, eval_transforms

    if kind not in DATASETS:
        raise ValueError(f"unknown dataset {kind!r}; known: {', '.join(sorted(DATASETS))}")
    kwargs = {"split": args.split} if "split" in signature(DATASETS[kind]).parameters else {}
    return build_dataset(kind, root=root, transform=eval_transforms(size=args.eval_size), **kwargs)


def cmd_eval(args) -> None:
    from torch.utils.data import DataLoader, Subset

    from segprune import checkpoint
    from segprune.eval.metrics import evaluate

    config = checkpoint.load_config(args.checkpoint)
    if config.get("task") == "instance" or args.task == "instance":
        return _eval_instances(args, config)
    model = checkpoint.load(args.checkpoint).to(args.device)
    dataset = _eval_dataset(args, config)
    num_classes = config.get("model_kwargs", {}).get("num_classes", dataset.num_classes)
    if dataset.num_classes != num_classes:
        raise ValueError(f"the model predicts {num_classes} classes, the {args.data} data has {dataset.num_classes}")
    names = getattr(dataset, "class_names", None) or [str(k) for k in range(num_classes)]
    if args.samples:
        dataset = Subset(dataset, range(min(args.samples, len(dataset))))
    metrics = evaluate(model, DataLoader(dataset, batch_size=args.batch_size), num_classes=num_classes,
                       device=args.device, crop=args.crop, stride=args.stride, flip=args.flip)
    line = f"mIoU {metrics['miou']:.4f}  pixel acc {metrics['pixel_acc']:.4f}  mean acc {metrics['mean_acc']:.4f}"
    print(line + (f"  foreground IoU {metrics['fg_iou']:.4f}" if "fg_iou" in metrics else ""))
    for name, iou in zip(names, metrics["iou"]):
        print(f"  {name:<16} {iou:.4f}")


def cmd_report(args) -> None:
    from segprune.report.writer import combined_report

    combined = combined_report(args.runs, args.out, force=args.force)
    print(f"report of {len(combined['runs'])} run(s) -> {Path(args.out) / 'report.html'}")
    for note in combined["notes"]:
        print(f"  note: {note}")


def _eval_instances(args, config: dict) -> None:
    """`segprune eval` of an instance model: COCO box and mask AP."""
    from dataclasses import asdict

    from torch.utils.data import Subset

    from segprune import checkpoint
    from segprune.data.instances import instance_dataset
    from segprune.pipeline import Recipe
    from segprune.train.instance import evaluate_model

    if config.get("task") != "instance":
        raise ValueError(f"{args.checkpoint} holds a semantic model ({config.get('model')}); drop --task instance")
    r = {**asdict(Recipe()), **config.get("recipe", {})}  # the input size and scenes the model was trained on
    num_classes = config["model_kwargs"]["num_classes"]
    dataset = instance_dataset(args.data, size=tuple(args.eval_size or r["size"]), seed=r["seed"], split=args.split,
                               num_samples=args.samples or r["val_samples"], num_classes=num_classes)
    if dataset.num_classes != num_classes:
        raise ValueError(f"the model predicts {num_classes} classes, the {args.data} data has {dataset.num_classes}")
    if args.samples and len(dataset) > args.samples:
        dataset = Subset(dataset, range(args.samples))
    model = checkpoint.load(args.checkpoint).to(args.device)
    metrics = evaluate_model(model, dataset, batch_size=args.batch_size, device=args.device)
    for kind, name in (("bbox", "box"), ("segm", "mask")):
        m = metrics[kind]
        print(f"{name:<4} AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}  "
              f"APs {m['APs']:.4f}  APm {m['APm']:.4f}  APl {m['APl']:.4f}")


def cmd_bench(args) -> None:
    from segprune.eval.bench import bench, table, write_json

    result = bench(args.checkpoints, input_size=tuple(args.input_size), batch=args.batch, rounds=args.rounds,
                   runs=args.runs, warmup=args.warmup, threads=args.threads, fuse=args.fuse, onnx=args.onnx)
    print(table(result))
    if args.json:
        write_json(result, args.json)
        print(f"JSON in {args.json}")


def cmd_export(args) -> None:
    from segprune import checkpoint
    from segprune.eval.bench import check_takes, example_input
    from segprune.export import export_onnx, export_torchscript, fuse_conv_bn

    outs = [p for p in (args.onnx, args.torchscript) if p]
    if not outs:
        raise ValueError("export needs --onnx OUT.onnx and/or --torchscript OUT.pt")
    for out in outs:
        if Path(out).exists() and not args.force:
            raise FileExistsError(f"{out} already exists; pass --force to overwrite")
    model = checkpoint.load(args.checkpoint)
    x = example_input(args.checkpoint, tuple(args.input_size or _trained_size(args.checkpoint)), args.batch)
    check_takes(args.checkpoint, model, x)
    if args.fuse:
        model = fuse_conv_bn(model, x)
    try:
        if args.onnx:
            r = export_onnx(model, x, args.onnx, opset=args.opset, dynamic=args.dynamic, atol=args.atol, rtol=args.rtol)
            axes = ", ".join(r["dynamic_axes"].values()) or "none"
            print(f"{r['path']}: {r['file_bytes'] / 1024:,.1f} KiB, opset {r['opset']} ({r['exporter']} exporter), "
                  f"dynamic axes: {axes}; onnxruntime max abs diff {r['max_abs_diff']:.2e} on {r['checked_shapes']}")
            for note in r["notes"]:
                print(f"  note: {note}")
        if args.torchscript:
            r = export_torchscript(model, x, args.torchscript)
            print(f"{r['path']}: {r['file_bytes'] / 1024:,.1f} KiB, max abs diff {r['max_abs_diff']:.2e}")
    except ImportError as err:
        raise ValueError(str(err)) from err


def _trained_size(folder) -> tuple[int, int]:
    """The input size a checkpoint's recipe trained at (``config.json``), else 512×512."""
    from segprune import checkpoint

    size = checkpoint.load_config(folder).get("recipe", {}).get("size")
    return tuple(size) if isinstance(size, list) and len(size) == 2 else (512, 512)


def _deploy_parsers(sub) -> None:
    """`segprune bench` and `segprune export`."""
    b = sub.add_parser("bench", help="compare checkpoint folders: params, MACs, sizes, interleaved latency")
    b.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint folders; ratios are vs the first")
    b.add_argument("--input-size", type=int, nargs=2, required=True, metavar=("H", "W"))
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--threads", type=int, default=1, help="intra-op CPU threads (PyTorch and onnxruntime)")
    b.add_argument("--rounds", type=int, default=7, help="interleaved rounds (A B A B ...)")
    b.add_argument("--runs", type=int, default=10, help="timed runs per checkpoint per round")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True, help="fold Conv+BN first")
    b.add_argument("--onnx", action="store_true", help="also export each and time it in onnxruntime (CPU)")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    b.set_defaults(func=cmd_bench)
    e = sub.add_parser("export", help="export a checkpoint folder to ONNX (checked with onnxruntime) / TorchScript")
    e.add_argument("checkpoint")
    e.add_argument("--onnx", default=None, metavar="OUT.onnx")
    e.add_argument("--torchscript", default=None, metavar="OUT.pt")
    e.add_argument("--fuse", action="store_true", help="fold Conv+BN into the convs first")
    e.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="example input for the export and the parity check (default: the size the checkpoint's "
                        "recipe trained at, else 512 512)")
    e.add_argument("--batch", type=int, default=1)
    e.add_argument("--opset", type=int, default=17)
    e.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=True,
                   help="dynamic batch, H and W where the model allows")
    e.add_argument("--atol", type=float, default=1e-4, help="largest max abs difference onnxruntime vs PyTorch")
    e.add_argument("--rtol", type=float, default=0.0, help="plus this times the largest absolute logit")
    e.add_argument("--force", action="store_true", help="overwrite existing output files")
    e.set_defaults(func=cmd_export)


def _run_options(p, default_out=None):
    p.add_argument("--out", default=default_out, help="run folder")
    p.add_argument("--force", action="store_true", help="overwrite a run already in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting (segprune.pipeline.Recipe), e.g. --set epochs=4")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def parser() -> argparse.ArgumentParser:
    from segprune.pipeline import METHODS

    p = argparse.ArgumentParser(prog="segprune", description="Structured pruning for segmentation networks.")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sparsity-train, prune, fine-tune, fuse and report on synthetic scenes")
    _run_options(demo)
    demo.add_argument("--task", choices=("semantic", "instance"), default="semantic",
                      help="instance: YOLACT (test_yolact) with box/mask AP; default --out segprune-instance-demo")
    demo.set_defaults(func=cmd_demo)
    run = sub.add_parser("run", help="run a recipe (flat YAML) end to end")
    run.add_argument("recipe", help="e.g. recipes/slimming_camvid_cpu.yaml")
    run.add_argument("--data", default=None, metavar="KIND[:PATH]", help="the recipe's data, e.g. human:PATH")
    _run_options(run)
    run.set_defaults(func=cmd_run)
    pr = sub.add_parser("prune", help="prune a checkpoint folder")
    pr.add_argument("checkpoint")
    pr.add_argument("--method", choices=METHODS, default="bn_scale")
    pr.add_argument("--ratio", type=float, default=0.5, help="fraction of prunable channels removed")
    pr.add_argument("--target-macs", type=float, default=None, help="remove until MACs <= this fraction")
    pr.add_argument("--round-to", type=int, default=None)
    pr.add_argument("--min-keep", type=float, default=0.1)
    pr.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"), help="example input size")
    pr.add_argument("--out", required=True)
    pr.add_argument("--force", action="store_true")
    pr.set_defaults(func=cmd_prune)
    ft = sub.add_parser("finetune", help="fine-tune a checkpoint folder on a recipe's data")
    ft.add_argument("checkpoint")
    ft.add_argument("--recipe", default=None)
    _run_options(ft)
    ft.set_defaults(func=cmd_finetune)
    check = sub.add_parser("check", help="read every sample of a dataset and report every bad file")
    check.add_argument("--data", required=True, metavar="KIND:PATH", help="e.g. camvid:../shared/data/camvid")
    check.add_argument("--split", nargs="+", default=["train", "val", "test"])
    check.add_argument("--task", choices=("semantic", "instance"), default="semantic",
                       help="instance: COCO instances, --data coco:IMAGES_DIR:ANNOTATIONS_JSON")
    check.set_defaults(func=cmd_check)
    groups = sub.add_parser("groups", help="list the channel groups of a registered model")
    groups.add_argument("model")
    groups.add_argument("--num-classes", type=int, default=19)
    groups.add_argument("--width", type=float, default=1.0)
    groups.add_argument("--size", type=int, default=256)
    groups.set_defaults(func=cmd_groups)
    tr = sub.add_parser("train", help="train a registered model (resumable; runs under torchrun for DDP)")
    tr.add_argument("--model", default=None, help="registered model name (default: the recipe's)")
    tr.add_argument("--data", default=None, metavar="KIND[:PATH]", help="e.g. camvid:data/camvid or synthetic")
    tr.add_argument("--recipe", default=None, help="flat YAML recipe")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    tr.add_argument("--task", choices=("semantic", "instance"), default="semantic",
                    help="instance: a YOLACT model on --data synthetic or coco:IMAGES_DIR:ANNOTATIONS_JSON")
    _run_options(tr)
    tr.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="mIoU, per-class IoU and accuracies of a checkpoint folder")
    ev.add_argument("checkpoint")
    ev.add_argument("--data", required=True, metavar="KIND[:PATH]", help="e.g. camvid:data/camvid or synthetic")
    ev.add_argument("--split", default="val")
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--samples", type=int, default=0, help="evaluate the first N samples only (0 = all)")
    ev.add_argument("--eval-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="resize images first")
    ev.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"), help="sliding-window size")
    ev.add_argument("--stride", type=int, nargs=2, default=None, metavar=("H", "W"), help="sliding-window step")
    ev.add_argument("--flip", action="store_true", help="average with the mirrored image's prediction")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--task", choices=("semantic", "instance"), default="semantic",
                    help="instance: box and mask AP (COCOeval); taken from the checkpoint when it records it")
    ev.set_defaults(func=cmd_eval)
    rep = sub.add_parser("report", help="one report (HTML, Markdown, JSON) over several run folders")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders holding report.json")
    rep.add_argument("--out", default="segprune-report", help="folder for report.html, report.md, report.json")
    rep.add_argument("--force", action="store_true", help="overwrite a report already in --out")
    rep.set_defaults(func=cmd_report)
    _deploy_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "train" and args.resume and args.force:
        print("segprune: error: --resume continues a run, --force starts it over: pass one", file=sys.stderr)
        return 2
    if args.command == "finetune" and not args.out:
        args.out = str(Path(args.checkpoint).with_name(Path(args.checkpoint).name + "-finetuned"))
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"segprune: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
