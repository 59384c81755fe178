"""segprune on real architectures written by others: timm, torchvision, segmentation_models_pytorch, transformers.

Every model is built with random weights (nothing is downloaded), converted to float64 with randomised norm
statistics (so a masked channel differs from a live one), and pruned at ratio 0.5 with the l1 criterion, each in its
own child process with a time limit. Per model: whether the pruned model equals the masked model of what was removed
(measured here, independently of prune's own verification, on the full example input), the share of channels that
were prunable (producer channels: an attention head counts its head size), params and MACs after / before, prune
time, what verification froze, and how many warnings were
issued. Beside it, where it runs, the leading peer (torch-pruning's MagnitudePruner, global, ratio 0.5, the
classifier layers ignored): whether it ran, whether its pruned model still runs, and its params ratio.

    pip install -e .[zoo]        # timm, segmentation-models-pytorch, transformers, torchvision, torch-pruning
    python benchmarks/third_party.py [--only convnext_atto,smp_unet_resnet18] [--timeout 600]

writes benchmarks/results/third_party.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, write_result  # noqa: E402

SIZE = 64


def _timm(name, **kw):
    import timm

    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kw)


def _tv(name, **kw):
    import torchvision

    return lambda: getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None,
                                                                   num_classes=5, **kw)


def _smp(arch, encoder, **kw):
    import segmentation_models_pytorch as smp

    return lambda: getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=5, **kw)


def _hf_segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(num_labels=5, hidden_sizes=[16, 32, 48, 64], decoder_hidden_size=64, depths=[1, 1, 1, 1],
                             num_attention_heads=[1, 2, 2, 4])
    return SegformerForSemanticSegmentation(config)


def _hf_upernet():
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    backbone = ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, hidden_size=64, auxiliary_in_channels=64,
                           auxiliary_channels=32, num_labels=5)
    return UperNetForSemanticSegmentation(config)


def _hf_dpt():
    from transformers import DPTConfig, DPTForSemanticSegmentation

    config = DPTConfig(image_size=SIZE, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=128, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 32, 64, 64],
                       fusion_hidden_size=32, num_labels=5)
    return DPTForSemanticSegmentation(config)


def _hf_mask2former():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], window_size=4, image_size=SIZE,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=5, hidden_dim=32, num_queries=8, encoder_layers=1,
                               decoder_layers=2, num_attention_heads=4, dim_feedforward=64, feature_size=32,
                               mask_feature_size=32, encoder_feedforward_dim=64, common_stride=4)
    return Mask2FormerForUniversalSegmentation(config)


class _LinearHead(torch.nn.Module):
    """A DINOv2-style ViT's patch tokens through a linear layer to class logits at 1/patch resolution (the DINOv2
    linear segmentation probe)."""

    def __init__(self, vit, classes=5):
        super().__init__()
        self.vit, self.head = vit, torch.nn.Linear(vit.num_features, classes)

    def forward(self, x):
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]
        side = x.shape[-1] // self.vit.patch_embed.patch_size[0]
        return self.head(tokens).transpose(1, 2).reshape(x.shape[0], -1, side, side)


def _dinov2_linear():
    import timm

    return _LinearHead(timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=SIZE, patch_size=16,
                                         num_classes=0))


class _DETRDecoder(torch.nn.Module):
    """A DETR-style head: a resnet18's last features as tokens, nn.TransformerEncoder/Decoder layers (every
    attention an nn.MultiheadAttention), learned queries, class and box outputs."""

    def __init__(self, dim=64, queries=8):
        super().__init__()
        import timm

        self.backbone = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(4,))
        self.proj = torch.nn.Conv2d(512, dim, 1)
        self.encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(dim, 4, 2 * dim, 0.0,
                                                                                      batch_first=True), 1)
        self.decoder = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(dim, 4, 2 * dim, 0.0,
                                                                                      batch_first=True), 2)
        self.queries = torch.nn.Parameter(torch.randn(1, queries, dim))
        self.cls, self.box = torch.nn.Linear(dim, 6), torch.nn.Linear(dim, 4)

    def forward(self, x):
        memory = self.encoder(self.proj(self.backbone(x)[0]).flatten(2).transpose(1, 2))
        found = self.decoder(self.queries.expand(x.shape[0], -1, -1), memory)
        return self.cls(found), self.box(found).sigmoid()


MODELS = {
    # timm: the classic and the modern blocks the issue names
    "timm/resnet18": _timm("resnet18"),
    "timm/convnext_atto": _timm("convnext_atto"),
    "timm/res2net50_14w_8s": _timm("res2net50_14w_8s"),
    "timm/mixnet_s": _timm("mixnet_s"),
    "timm/cspresnet50": _timm("cspresnet50"),
    "timm/skresnet18": _timm("skresnet18"),
    "timm/rexnet_100": _timm("rexnet_100"),
    "timm/inception_next_tiny": _timm("inception_next_tiny"),
    "timm/mobilenetv3_small_100": _timm("mobilenetv3_small_100"),
    "timm/efficientnet_b0": _timm("efficientnet_b0"),
    "timm/regnetx_002": _timm("regnetx_002"),
    "timm/nf_regnet_b0": _timm("nf_regnet_b0"),
    "timm/resnetv2_50x1_bit": _timm("resnetv2_50x1_bit"),
    "timm/resnetv2_50x1_bit+ws": _timm("resnetv2_50x1_bit"),  # pruned with weight standardisation baked (opt-in)
    "timm/vit_tiny_patch16": _timm("vit_tiny_patch16_224", img_size=SIZE),
    "timm/vit_small_patch16": _timm("vit_small_patch16_224", img_size=SIZE),
    "timm/deit_small_patch16": _timm("deit_small_patch16_224", img_size=SIZE),
    "timm/dinov2_small+linear": _dinov2_linear,
    "detr_style(nn.MultiheadAttention)": lambda: _DETRDecoder(),
    "timm/poolformer_s12": _timm("poolformer_s12"),
    "timm/ghostnet_100": _timm("ghostnet_100"),
    # torchvision segmentation
    "torchvision/fcn_resnet50": _tv("fcn_resnet50", aux_loss=True),
    "torchvision/deeplabv3_mobilenet_v3_large": _tv("deeplabv3_mobilenet_v3_large"),
    "torchvision/lraspp_mobilenet_v3_large": _tv("lraspp_mobilenet_v3_large"),
    # segmentation_models_pytorch
    "smp/Unet(resnet18)": _smp("Unet", "resnet18"),
    "smp/Unet(convnext_atto)": _smp("Unet", "tu-convnext_atto"),
    "smp/FPN(resnet18)": _smp("FPN", "resnet18"),
    "smp/DeepLabV3Plus(resnet18)": _smp("DeepLabV3Plus", "resnet18"),
    "smp/PSPNet(resnet18)": _smp("PSPNet", "resnet18"),
    "smp/UPerNet(resnet18)": _smp("UPerNet", "resnet18"),
    "smp/UPerNet(convnext_atto)": _smp("UPerNet", "tu-convnext_atto"),
    "smp/Segformer(mit_b0)": _smp("Segformer", "mit_b0"),
    "smp/Segformer(mit_b1)": _smp("Segformer", "mit_b1"),
    "smp/Segformer(mit_b2)": _smp("Segformer", "mit_b2"),
    # transformers
    "transformers/Segformer": _hf_segformer,
    "transformers/UperNet(ConvNext)": _hf_upernet,
    "transformers/DPT": _hf_dpt,
    "transformers/Mask2Former": _hf_mask2former,
}


# the part of a model an issue goal names (#23: "Mask2Former's transformer decoder"): its prunable share is reported too
PARTS = {"transformers/Mask2Former": "model.transformer_module."}
# models pruned with an opt-in mode (segprune.prune(allow_approximate=...)); the row's name says which
APPROXIMATE = {"timm/resnetv2_50x1_bit+ws": ("weight_standardization",)}


def randomize_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def build(name):
    torch.manual_seed(0)
    model = randomize_norms(MODELS[name]()).double().eval()
    x = torch.randn(1, 3, SIZE, SIZE, dtype=torch.float64)
    return model, ({"pixel_values": x} if name.startswith("transformers/") else x)


def ours(name) -> dict:
    import segprune
    from segprune.prune.cost import CostModel
    from segprune.prune.oracle import masked_copy, outputs, relative_error

    model, x = build(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            result = segprune.prune(model, x, ratio=0.5, criterion="l1", allow_approximate=APPROXIMATE.get(name, ()))
        except ValueError as err:  # every channel frozen: the model is returned as it is, and the warnings say why
            return _nothing_prunable(err, caught)
        seconds = time.perf_counter() - start
    groups, removed = result.groups, result.removed
    masked = masked_copy(model, groups, removed, result.plan.replace)
    swapped = masked_copy(model, [], {}, result.plan.replace)  # the model as prune traced it (modules swapped)
    error = relative_error(outputs(masked, x), outputs(result.model, x))
    widths = {g.id: _widths(g) for g in groups}
    total = sum(int(w.sum()) for w in widths.values())
    prunable = sum(int(widths[g.id][g.prunable].sum()) for g in groups)
    params = sum(p.numel() for p in result.model.parameters()) / sum(p.numel() for p in model.parameters())
    part = _part_share(groups, widths, PARTS[name]) if name in PARTS else {}
    messages = sorted({str(w.message) for w in caught if "segprune" in str(w.message)})
    v = result.verification
    return {"exact": error < 1e-6, "error": error, "prunable": prunable / max(total, 1),
            "channels": total, "removed": result.channels_removed, "params_ratio": params,
            "macs_ratio": CostModel(swapped, groups).relative(removed, "macs"), "seconds": seconds,
            "verify_seconds": v.seconds, "verify_frozen": len(v.frozen), "folded": len(v.folded),
            "warnings": len(messages), "warning_samples": [m[:300] for m in messages[:5]], **part}


def _part_share(groups, widths, prefix) -> dict:
    """The prunable share of the groups whose producers all lie under module `prefix`."""
    inside = [g for g in groups if (outs := [m.module for m in g.members if m.role == "out"])
              and all(o.startswith(prefix) for o in outs)]
    total = sum(int(widths[g.id].sum()) for g in inside)
    return {"part": prefix.rstrip("."), "part_prunable": sum(int(widths[g.id][g.prunable].sum()) for g in inside)
            / max(total, 1)}


def _widths(group) -> np.ndarray:
    """The channels each element of `group` stands for in its widest producer: 1, or an attention head's size."""
    width = np.ones(group.size, dtype=np.int64)
    for m in group.members:
        if m.role == "out":
            width = np.maximum(width, np.bincount(m.index, minlength=group.size))
    return width


def _nothing_prunable(err, caught) -> dict:
    messages = sorted({str(w.message) for w in caught if "segprune" in str(w.message)})
    return {"exact": True, "error": 0.0, "prunable": 0.0, "channels": 0, "removed": 0, "params_ratio": 1.0,
            "macs_ratio": 1.0, "seconds": 0.0, "verify_seconds": 0.0, "verify_frozen": 0, "folded": 0,
            "warnings": len(messages), "note": str(err), "warning_samples": [m[:300] for m in messages[:5]]}


def peer(name) -> dict:
    import torch_pruning as tp

    model, x = build(name)
    example = x
    before = sum(p.numel() for p in model.parameters())
    ignored = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
               and getattr(m, "out_features", getattr(m, "out_channels", 0)) in (5, 10)]
    start = time.perf_counter()
    try:
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=0.5, global_pruning=True, ignored_layers=ignored,
                                           output_transform=_first_tensor)
        pruner.step()
        seconds = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - the peer's failures are what this column records
        return {"status": f"crashed while pruning: {type(err).__name__}: {str(err)[:200]}"}
    try:
        with torch.no_grad():
            model(**x) if isinstance(x, dict) else model(x)
    except Exception as err:  # noqa: BLE001
        return {"status": f"pruned model fails: {type(err).__name__}: {str(err)[:200]}"}
    return {"status": "ran", "params_ratio": sum(p.numel() for p in model.parameters()) / before, "seconds": seconds}


def _first_tensor(out):
    from segprune._utils import tensors

    return sum(t.double().sum() for t in tensors(out) if t.is_floating_point())


def child(which: str, name: str, timeout: int) -> dict:
    try:
        done = subprocess.run([sys.executable, __file__, "--one", which, "--name", name], capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout} s"}
    if done.returncode != 0:
        return {"status": "failed", "stderr": done.stderr[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median_seconds(runs: list[dict]) -> dict:
    """The first run's record with the median of every run's prune seconds (and each run's, when several)."""
    timed = [r["seconds"] for r in runs if "seconds" in r]
    if len(runs) == 1 or not timed:
        return runs[0]
    return {**runs[0], "seconds": float(np.median(timed)), "seconds_runs": timed}


def markdown(rows: dict) -> str:
    lines = ["| model | exact | prunable | params | MACs | prune s | verify froze | warnings | peer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        o, p = row["ours"], row["peer"]
        if "exact" not in o:
            lines.append(f"| {name} | {o.get('status', 'failed')} | | | | | | | {_peer(p)} |")
            continue
        exact = "yes" if o["exact"] else f"NO ({o['error']:.1e})"
        share = f"{o['prunable']:.0%}" + (f" ({o['part']}: {o['part_prunable']:.0%})" if "part" in o else "")
        lines.append(f"| {name} | {exact} | {share} | "
                     f"{o['params_ratio']:.2f}× | {o['macs_ratio']:.2f}× | {_seconds(o)} | {o['verify_frozen']} | "
                     f"{o['warnings']} | {_peer(p)} |")
    return "\n".join(lines) + "\n"


def _peer(p: dict) -> str:
    if p.get("status") != "ran":
        return p.get("status", "?")[:60]
    return f"{p['params_ratio']:.2f}× params" + (f", {_seconds(p)} s" if "seconds" in p else "")


def _seconds(r: dict) -> str:
    """One run to a tenth of a second; the median of several (`--rounds`) to a hundredth, with their count."""
    runs = r.get("seconds_runs")
    return f"{r['seconds']:.1f}" if not runs else f"{r['seconds']:.2f} (median of {len(runs)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated model names")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for our prune of one model")
    parser.add_argument("--peer-timeout", type=int, default=300, help="seconds for the peer's prune of one model")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--reuse-peer", action="store_true", help="take the peer's columns from the last results")
    parser.add_argument("--rounds", type=int, default=1, help="prune each model this many times, ours and the "
                        "peer's interleaved, one process each: the prune seconds are the median (a noisy machine)")
    parser.add_argument("--results", default="third_party", help="results/<this>.json and .md (a table of its own "
                        "for an --only list, e.g. third_party_attention)")
    parser.add_argument("--one", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(ours(args.name) if args.one == "ours" else peer(args.name)))
        return
    names = [n for n in args.only.split(",") if n] or list(MODELS)
    path = RESULTS / f"{args.results}.json"
    last = json.loads(path.read_text())["models"] if (args.only or args.reuse_peer) and path.exists() else {}
    rows = dict(last) if args.only else {}  # --only updates those rows of the last results
    for name in names:
        ours_runs, peer_runs = [], []
        for _ in range(max(1, args.rounds)):
            ours_runs.append(child("ours", name, args.timeout))
            if args.reuse_peer and name in last:
                peer_runs = [last[name]["peer"]]
            else:
                peer_runs.append({"status": "not run"} if args.no_peer else child("peer", name, args.peer_timeout))
        rows[name] = {"ours": _median_seconds(ours_runs), "peer": _median_seconds(peer_runs)}
        print(name, json.dumps(rows[name])[:400], flush=True)
    ok = [r["ours"] for r in rows.values() if "exact" in r["ours"]]
    summary = {"models": len(rows), "exact": sum(r["exact"] for r in ok),
               "warned_or_exact": sum(r["exact"] or r["warnings"] > 0 for r in ok),
               "peer_ran": sum(r["peer"].get("status") == "ran" for r in rows.values())}
    write_result(args.results, {"benchmark": "third_party", "input": [1, 3, SIZE, SIZE], "ratio": 0.5,
                                 "criterion": "l1", "dtype": "float64", "machine": machine(), "summary": summary,
                                 "models": rows})
    (RESULTS / f"{args.results}.md").write_text(f"segprune on third-party models (`python benchmarks/third_party.py`): "
                                            f"{summary}\n\n" + markdown(rows))


if __name__ == "__main__":
    main()
