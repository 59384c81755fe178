"""`segprune demo|groups`: a thin layer over the library (the library never imports this file)."""

from __future__ import annotations

import argparse
import sys
import warnings


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def cmd_demo(args) -> None:
    from segprune.demo import config_from, run_demo

    report = run_demo(args.out, config_from(_overrides(args.set)), force=args.force, progress=not args.quiet)
    if args.quiet:
        print(f"before mIoU {report['before']['miou']:.4f} -> after {report['after']['miou']:.4f}; "
              f"report in {args.out}/report.md")


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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segprune", description="Structured pruning for segmentation networks.")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sparsity-train, prune, fine-tune, fuse and report on synthetic scenes")
    demo.add_argument("--out", default="segprune-demo", help="run folder (default: ./segprune-demo)")
    demo.add_argument("--force", action="store_true", help="overwrite a run already in --out")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a setting of segprune.demo.DemoConfig, e.g. --set epochs=4")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)
    groups = sub.add_parser("groups", help="list the channel groups of a registered model")
    groups.add_argument("model")
    groups.add_argument("--num-classes", type=int, default=19)
    groups.add_argument("--width", type=float, default=1.0)
    groups.add_argument("--size", type=int, default=256)
    groups.set_defaults(func=cmd_groups)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"segprune: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
