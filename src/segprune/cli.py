"""`segprune demo|run|prune|finetune|check|groups|train|eval|report|export|bench`: argument parsing over
:mod:`segprune.workflows` and the library (never imported by them).

`segprune train` also runs under `torchrun --nproc_per_node=N -m segprune.cli train ...` (DDP; rank 0 writes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segprune import checkpoint
from segprune.export.runtimes import runtime_names, spec_type
from segprune.train import distributed
from segprune.workflows import bench as benchmark
from segprune.workflows.compress import run
from segprune.workflows.data import check_data, check_instance_data, with_data
from segprune.workflows.deploy import export_checkpoint
from segprune.workflows.inference import predict_images, report_folders
from segprune.workflows.methods import checkpoint_methods
from segprune.workflows.recipe import demo_recipe, model_args, recipe_from, with_model
from segprune.workflows.steps import (
    checkpoint_task,
    evaluate_checkpoint,
    finetune_checkpoint,
    model_groups,
    prune_checkpoint,
)
from segprune.workflows.tasks import DEFAULT_TASK, TASKS, recorded_task, task_of
from segprune.workflows.train import run_training


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _summary(report: dict, out: str) -> None:
    """The one line a --quiet run prints."""
    b, a = report["before"], report["after"]
    cost = f"params x{a['params'] / b['params']:.3f}, MACs x{a['macs'] / b['macs']:.3f}; report in {out}/report.md"
    first, *more = recorded_task(report).change(b, a)
    print(f"{first}, " + cost)
    for line in more:
        print(line)


def cmd_demo(args) -> None:
    out = args.out or task_of(args.task).demo_out
    report = run(demo_recipe(args.task, _overrides(args.set)), out, force=args.force, progress=not args.quiet)
    if args.quiet:
        _summary(report, out)


def cmd_run(args) -> None:
    recipe = recipe_from(args.recipe, with_data(_overrides(args.set), args.data))
    out = args.out or f"runs/{recipe.name}"
    report = run(recipe, out, force=args.force, progress=not args.quiet)
    if args.quiet:
        _summary(report, out)


def cmd_prune(args) -> None:
    result = prune_checkpoint(args.checkpoint, args.out, method_name=args.method, ratio=args.ratio,
                              target_macs=args.target_macs, round_to=args.round_to, min_keep=args.min_keep,
                              size=tuple(args.size), force=args.force, target_latency=args.target_latency,
                              latency_table_path=args.latency_table, latency_runtime=args.latency_runtime,
                              latency_threads=args.latency_threads, latency_tries=args.latency_tries)
    print(f"removed {result.channels_removed} of {result.channels_prunable} prunable channels -> {args.out}")
    if result.latency:
        got = result.latency
        print(f"latency on {got['runtime']}: {got['measured_ratio']:.3f} of the unpruned model's, measured (target "
              f"{got['target']:.3f}, {'met' if got['met'] else 'missed'}; {len(got['tries'])} allocation(s) tried)")


def cmd_finetune(args) -> None:
    out = args.out or str(Path(args.checkpoint).with_name(Path(args.checkpoint).name + "-finetuned"))
    recipe = finetune_checkpoint(args.checkpoint, out, recipe_path=args.recipe, overrides=_overrides(args.set),
                                 force=args.force, progress=not args.quiet)
    print(f"fine-tuned {recipe.finetune_epochs} epochs -> {out}")


def cmd_check(args) -> None:
    if not task_of(args.task).per_pixel:  # instance: COCO annotations
        return _check_instances(args)
    kind, checks = check_data(args.data, args.split)
    for check in checks:
        print(f"{kind} {check.summary()}")
        for line in check.problems:
            print(f"  {line}")
        if check.size_note():
            print(f"  note: {check.size_note()}")
    bad = sum(len(c.problems) for c in checks)
    if bad:
        raise ValueError(f"{bad} bad sample(s) in {args.data}")


def _check_instances(args) -> None:
    """`segprune check --task instance`: the annotation file's findings, then every image read."""
    found = check_instance_data(args.data)
    for line in found["notes"]:
        print(f"  {line}")
    failures, lost = found["unreadable"], found["lost"]
    print(f"{args.data}: {found['images']} images, {len(failures)} unreadable, {lost} annotation problem(s)")
    for line in failures:
        print(f"  {line}")
    if failures or lost:
        raise ValueError(f"{len(failures)} unreadable image(s) and {lost} annotation problem(s) in {args.data}")


def cmd_groups(args) -> None:
    groups, caught = model_groups(args.model, num_classes=args.num_classes, width=args.width, size=args.size,
                                  model_args=args.model_args)
    for g in groups:
        print(g)
    prunable = sum(int(g.prunable.sum()) for g in groups)
    print(f"{len(groups)} groups, {prunable} prunable channels of {sum(g.size for g in groups)}")
    for message in caught:
        print(f"warning: {message}")


def cmd_train(args) -> None:
    overrides = with_model(args.recipe, with_data(_overrides(args.set), args.data), args.model)
    if args.task:  # else the recipe's
        overrides["task"] = args.task
    recipe = recipe_from(args.recipe, overrides)
    out = Path(args.out or f"runs/{recipe.name}")
    args.out = str(out)  # for the resume hint after Ctrl-C
    device = distributed.setup(recipe.device)
    try:
        run_training(recipe, out, device, resume=args.resume, force=args.force, quiet=args.quiet)
    finally:
        distributed.cleanup()


def cmd_eval(args) -> None:
    config = checkpoint.load_config(args.checkpoint)
    task = checkpoint_task(config)
    if args.task and task_of(args.task) is not task:
        raise ValueError(f"{args.checkpoint} holds a {task.name} model ({config.get('model')}); "
                         f"drop --task {args.task}")
    metrics, names = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, samples=args.samples,
                                         batch_size=args.batch_size, eval_size=args.eval_size, device=args.device,
                                         **(dict(crop=args.crop, stride=args.stride, flip=args.flip)
                                            if task.per_pixel else {}))
    if "coco" in metrics:
        for kind, name in (("bbox", "box"), ("segm", "mask")):
            m = metrics["coco"][kind]
            print(f"{name:<4} AP {m['AP']:.4f}  AP50 {m['AP50']:.4f}  AP75 {m['AP75']:.4f}  "
                  f"APs {m['APs']:.4f}  APm {m['APm']:.4f}  APl {m['APl']:.4f}")
        return
    line = f"mIoU {metrics['miou']:.4f}  pixel acc {metrics['pixel_acc']:.4f}  mean acc {metrics['mean_acc']:.4f}"
    print(line + (f"  foreground IoU {metrics['fg_iou']:.4f}" if "fg_iou" in metrics else ""))
    for name, iou in zip(names, metrics["iou"]):
        print(f"  {name:<16} {iou:.4f}")


def cmd_report(args) -> None:
    combined = report_folders(args.runs, args.out, force=args.force, threads=args.threads)
    where = combined.get("path") or Path(args.out) / "report.html"
    print(f"report of {len(combined['runs'])} run(s) -> {where}")
    for note in combined["notes"]:
        print(f"  note: {note}")


def cmd_predict(args) -> None:
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in
                (("size", args.size), ("tile", args.tile), ("overlap", args.overlap)) if v is not None}
    summary = predict_images(args.model, args.images, args.out, force=args.force, device=args.device,
                             runtime=args.runtime, **settings)
    failed = [entry for entry in summary["images"] if "error" in entry]
    print(f"{len(summary['images']) - len(failed)} image(s) -> {args.out} (masks *_mask.png, overlays, "
          "predictions.json)")
    for entry in failed:
        print(f"  {entry['error']}", file=sys.stderr)
    if failed:
        raise ValueError(f"{len(failed)} image(s) could not be predicted (listed above)")


def cmd_bench(args) -> None:
    result = benchmark.bench(args.checkpoints, input_size=tuple(args.input_size), batch=args.batch,
                             rounds=args.rounds, runs=args.runs, warmup=args.warmup, threads=args.threads,
                             fuse=args.fuse, onnx=args.onnx, runtimes=args.runtime, json_path=args.json,
                             force=args.force)
    print(benchmark.table(result))
    if args.json:
        print(f"JSON in {args.json}")


def cmd_export(args) -> None:
    results = export_checkpoint(args.checkpoint, onnx=args.onnx, torchscript=args.torchscript, fuse=args.fuse,
                                input_size=args.input_size, batch=args.batch, opset=args.opset,
                                dynamic=args.dynamic, atol=args.atol, rtol=args.rtol, force=args.force)
    if "onnx" in results:
        r = results["onnx"]
        axes = ", ".join(r["dynamic_axes"].values()) or "none"
        print(f"{r['path']}: {r['file_bytes'] / 1024:,.1f} KiB, opset {r['opset']} ({r['exporter']} exporter), "
              f"dynamic axes: {axes}; onnxruntime max abs diff {r['max_abs_diff']:.2e} on {r['checked_shapes']}")
        for note in r["notes"]:
            print(f"  note: {note}")
    if "torchscript" in results:
        r = results["torchscript"]
        print(f"{r['path']}: {r['file_bytes'] / 1024:,.1f} KiB, max abs diff {r['max_abs_diff']:.2e}")


def _deploy_parsers(sub) -> None:
    """`segprune bench` and `segprune export`."""
    b = sub.add_parser("bench", help="compare checkpoint folders: params, MACs, sizes, interleaved latency")
    b.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint folders; ratios are vs the first")
    b.add_argument("--input-size", type=int, nargs=2, required=True, metavar=("H", "W"))
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--threads", type=int, default=1, help="intra-op CPU threads of every runtime")
    b.add_argument("--rounds", type=int, default=7, help="interleaved rounds (A B A B ...)")
    b.add_argument("--runs", type=int, default=10, help="timed runs per checkpoint per round")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True, help="fold Conv+BN first")
    b.add_argument("--runtime", nargs="+", type=spec_type, default=["eager"], metavar="RUNTIME[:PRECISION]",
                   help=f"time on these runtimes, side by side: {', '.join(runtime_names())} (e.g. openvino:fp32)")
    b.add_argument("--onnx", action="store_true", help="also time on onnxruntime (as --runtime eager onnxruntime)")
    b.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    b.add_argument("--force", action="store_true", help="overwrite an existing --json file")
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
                   help="override a recipe setting (segprune.workflows.Recipe), e.g. --set epochs=4")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segprune", description="Structured pruning for segmentation networks.")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sparsity-train, prune, fine-tune, fuse and report on synthetic scenes")
    _run_options(demo)
    demo.add_argument("--task", choices=tuple(TASKS), default=DEFAULT_TASK,
                      help="instance: YOLACT (test_yolact) with box/mask AP; default --out segprune-instance-demo")
    demo.set_defaults(func=cmd_demo)
    run = sub.add_parser("run", help="run a recipe (flat YAML) end to end")
    run.add_argument("recipe", help="e.g. recipes/slimming_camvid_cpu.yaml")
    run.add_argument("--data", default=None, metavar="KIND[:PATH]", help="the recipe's data, e.g. human:PATH")
    _run_options(run)
    run.set_defaults(func=cmd_run)
    pr = sub.add_parser("prune", help="prune a checkpoint folder")
    pr.add_argument("checkpoint")
    pr.add_argument("--method", choices=checkpoint_methods(), default="bn_scale",
                    help="the method's channel criterion (methods that need training data run in recipes)")
    pr.add_argument("--ratio", type=float, default=0.5, help="fraction of prunable channels removed")
    pr.add_argument("--target-macs", type=float, default=None, help="remove until MACs <= this fraction")
    pr.add_argument("--target-latency", type=float, default=None,
                    help="remove until the latency measured on --latency-runtime <= this fraction (within 5 %%)")
    pr.add_argument("--latency-table", default="", metavar="TABLE.json",
                    help="a LatencyTable of this model (default: measured at --size and kept in --out)")
    pr.add_argument("--latency-runtime", type=spec_type, default="eager", metavar="RUNTIME[:PRECISION]",
                    help=f"the deployment runtime: {', '.join(runtime_names())}")
    pr.add_argument("--latency-threads", type=int, default=1)
    pr.add_argument("--latency-tries", type=int, default=5,
                    help="allocations measured on the runtime and corrected; 0: trust the table")
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
    check.add_argument("--task", choices=tuple(TASKS), default=DEFAULT_TASK,
                       help="instance: COCO instances, --data coco:IMAGES_DIR:ANNOTATIONS_JSON")
    check.set_defaults(func=cmd_check)
    groups = sub.add_parser("groups", help="list the channel groups of a registered model or a library's")
    groups.add_argument("model", help="a zoo name, or smp:ARCH, timm:NAME, transformers:CLASS")
    groups.add_argument("--model-args", type=model_args, default={}, metavar="YAML",
                        help="the builder's keyword arguments, e.g. '{encoder_name: mit_b0}'")
    groups.add_argument("--num-classes", type=int, default=19)
    groups.add_argument("--width", type=float, default=1.0)
    groups.add_argument("--size", type=int, default=256)
    groups.set_defaults(func=cmd_groups)
    tr = sub.add_parser("train", help="train a registered model (resumable; runs under torchrun for DDP)")
    tr.add_argument("--model", default=None, help="registered model name or builder spec, e.g. smp:Segformer "
                    "with --set model_args='{encoder_name: mit_b0}' (default: the recipe's)")
    tr.add_argument("--data", default=None, metavar="KIND[:PATH]", help="e.g. camvid:data/camvid or synthetic")
    tr.add_argument("--recipe", default=None, help="flat YAML recipe")
    tr.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    tr.add_argument("--task", choices=tuple(TASKS), default=None,
                    help="default: the recipe's (semantic); instance: a YOLACT model on --data synthetic or "
                         "coco:IMAGES_DIR:ANNOTATIONS_JSON")
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
    ev.add_argument("--task", choices=tuple(TASKS), default=None,
                    help="instance: box and mask AP (COCOeval); taken from the checkpoint when it records it")
    ev.set_defaults(func=cmd_eval)
    rep = sub.add_parser("report", help="one report (HTML, Markdown, JSON) over several run folders")
    rep.add_argument("runs", nargs="+", metavar="RUN_DIR",
                     help="run folders holding report.json, or folders holding a checkpoint (measured first)")
    rep.add_argument("--out", default="segprune-report", help="folder for report.html, report.md, report.json")
    rep.add_argument("--force", action="store_true", help="overwrite a report already in --out")
    rep.add_argument("--threads", type=int, default=1, help="CPU threads when checkpoint folders are measured")
    rep.set_defaults(func=cmd_report)
    pd = sub.add_parser("predict", help="masks and overlays of images from a checkpoint folder or an ONNX file")
    pd.add_argument("model", metavar="CHECKPOINT|MODEL.onnx")
    pd.add_argument("images", nargs="+", metavar="IMAGE|FOLDER")
    pd.add_argument("--out", required=True, help="folder for <name>_mask.png, <name>_overlay.jpg, predictions.json")
    pd.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="resize images to this first")
    pd.add_argument("--tile", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="sliding-window tiles for large images (overlapping logits averaged)")
    pd.add_argument("--overlap", type=float, default=None, help="tile overlap as a fraction (default 1/3)")
    pd.add_argument("--device", default="cpu")
    pd.add_argument("--runtime", type=spec_type, default="onnxruntime", metavar="RUNTIME[:PRECISION]",
                    help="what runs an .onnx MODEL: a registered runtime that takes ONNX (e.g. openvino)")
    pd.add_argument("--force", action="store_true", help="overwrite predictions already in --out")
    pd.set_defaults(func=cmd_predict)
    _deploy_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"segprune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segprune: interrupted{_resume_hint(args, argv)}", file=sys.stderr)
        return 130
    return 0


def _resume_hint(args, argv: list[str] | None) -> str:
    """For a training run with a checkpoint to continue from: the command that resumes it."""
    out = getattr(args, "out", None)
    if args.command != "train" or not out or not (Path(out) / "checkpoints" / "latest").is_file():
        return "" if args.command != "train" else " before the first checkpoint: run the same command again"
    words = [w for w in (argv if argv is not None else sys.argv[1:]) if w != "--force"]
    return f"; continue with: segprune {' '.join(words)} --resume"


if __name__ == "__main__":
    sys.exit(main())
