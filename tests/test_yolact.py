"""YOLACT: shapes, anchors, Fast NMS, post-processing, the loss, and the engine on prototypes ↔ coefficients."""


import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import segprune
from segprune.data.instances import mask_boxes
from segprune.export.fuse import fuse_conv_bn
from segprune.models import create_model
from segprune.models.yolact import YolactLoss, fast_nms, postprocess
from segprune.models.yolact_loss import box_iou, decode, encode, point_form
from segprune.prune.oracle import masked_copy, outputs, relative_error
from tests.conftest import randomize_norms

K = 3


def build(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return create_model("test_yolact", num_classes=K, **kwargs)


def groups_of(model, example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return segprune.channel_groups(model, example)


def group_with(groups, module, role="out"):
    return next(g for g in groups if any(m.module == module and m.role == role for m in g.members))


# ------------------------------------------------------------------------------------------------- model and anchors
@pytest.mark.parametrize("size", [(64, 64), (70, 90)])
def test_shapes_in_train_and_eval_and_anchor_count(size):
    model, x = build(), torch.randn(2, 3, *size)
    out = model.train()(x)
    a = model.anchors(*size).shape[0]
    k = model.num_prototypes
    assert set(out) == {"cls", "box", "coef", "proto", "seg"}
    assert out["cls"].shape == (2, a, K + 1) and out["box"].shape == (2, a, 4) and out["coef"].shape == (2, a, k)
    hp, wp = -(-size[0] // 8) * 2, -(-size[1] // 8) * 2
    assert out["proto"].shape == (2, k, hp, wp) and out["seg"].shape == (2, K, hp // 2, wp // 2)
    assert out["coef"].abs().max() <= 1  # tanh
    with torch.no_grad():
        assert set(model.eval()(x)) == {"cls", "box", "coef", "proto"}


def test_anchors_of_the_paper_at_550():
    with torch.device("meta"):
        model = create_model("yolact_resnet50", num_classes=80)
    anchors = model.anchors(550, 550)
    assert anchors.shape == (3 * (69**2 + 35**2 + 18**2 + 9**2 + 5**2), 4) == (19248, 4)
    first = anchors[:3]  # P3, top-left cell, aspect ratios 1, 1/2, 2: w·h constant, w/h = ratio
    torch.testing.assert_close(first[:, :2], torch.full((3, 2), 0.5 / 69))
    torch.testing.assert_close(first[:, 2] * first[:, 3], torch.full((3,), (24 / 550) ** 2))
    torch.testing.assert_close(first[:, 2] / first[:, 3], torch.tensor([1.0, 0.5, 2.0]))
    assert "anchors" not in " ".join(model.state_dict())
    assert model.anchors(550, 550) is anchors  # cached per size


def test_anchors_keep_their_pixel_size_at_any_input_unless_scaled_like_the_reference():
    with torch.device("meta"):
        pixel = create_model("yolact_resnet50", num_classes=80)
        scaled = create_model("yolact_resnet50", num_classes=80, scale_anchors_with_input=True)
    torch.testing.assert_close(pixel.anchors(550, 550), scaled.anchors(550, 550))  # the same at the paper's size
    small = pixel.anchors(96, 128)[:3]  # P3's first cell: 24 px squares (ratio 1) on a 96×128 input
    torch.testing.assert_close(small[0, 2:] * torch.tensor([128.0, 96.0]), torch.tensor([24.0, 24.0]))
    shrunk = scaled.anchors(96, 128)[0, 2:] * torch.tensor([128.0, 96.0])  # the reference: 24/550 of each side
    torch.testing.assert_close(shrunk, torch.tensor([24 / 550 * 128, 24 / 550 * 96]))


def test_parameter_counts_of_the_full_models_on_meta():
    with torch.device("meta"):
        r50 = create_model("yolact_resnet50", num_classes=80)
        r101 = create_model("yolact_resnet101", num_classes=80)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(r50) == 31_164_943 and count(r101) == 50_157_071
    assert (count(r50.backbone), count(r50.fpn), count(r50.protonet), count(r50.head), count(r50.seg_head)) == (
        23_508_032, 3_868_672, 2_368_544, 1_399_135, 20_560)
    assert count(build()) <= 100_000


def test_backbone_weights_load_like_the_other_models(tmp_path):
    source = build()
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, path)
    torch.manual_seed(5)
    loaded = create_model("test_yolact", num_classes=K, backbone_weights=path)
    assert all(torch.equal(a, b) for a, b in zip(source.backbone.state_dict().values(),
                                                 loaded.backbone.state_dict().values()))


def test_box_coding_round_trips():
    anchors = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.2, 0.7, 0.1, 0.1]], dtype=torch.float64)
    boxes = torch.tensor([[0.3, 0.4, 0.6, 0.9], [0.1, 0.6, 0.25, 0.8]], dtype=torch.float64)
    torch.testing.assert_close(decode(encode(boxes, anchors), anchors), boxes)
    torch.testing.assert_close(decode(torch.zeros(2, 4, dtype=torch.float64), anchors), point_form(anchors))


# ---------------------------------------------------------------------------------------------------- inference
def brute_force_nms(boxes, scores, iou_threshold, score_threshold):
    """Per class: drop a box when any higher-scored box of its class (kept or not) overlaps it too much."""
    kept = set()
    for c in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda i: -float(scores[c, i]))
        for rank, i in enumerate(order):
            iou = [float(box_iou(boxes[i : i + 1], boxes[j : j + 1])[0, 0]) for j in order[:rank]]
            if float(scores[c, i]) > score_threshold and all(v <= iou_threshold for v in iou):
                kept.add((i, c))
    return kept


def test_fast_nms_matches_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 0.6
    boxes = torch.cat([xy, xy + 0.1 + torch.rand(40, 2, generator=g) * 0.3], dim=1)
    scores = torch.rand(3, 40, generator=g)
    index, score, label = fast_nms(boxes, scores, iou_threshold=0.4, top_k=40, score_threshold=0.2)
    got = set(zip(index.tolist(), label.tolist()))
    assert got == brute_force_nms(boxes, scores, 0.4, 0.2)
    assert 0 < len(got) < 100  # neither nothing nor everything: the test can fail
    torch.testing.assert_close(score, scores[label, index])


def test_postprocess_format_and_a_hand_built_detection():
    model = build().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    anchors = model.anchors(64, 64)
    out["cls"][:] = -10.0
    out["cls"][..., 0] = 10.0  # background everywhere ...
    out["cls"][0, 200, 2] = 20.0  # ... but one confident class-1 anchor in image 0
    out["box"][0, 200] = 0.0  # its box is its anchor
    dets = postprocess(out, anchors, (64, 64), top_k=5)
    assert len(dets) == 2 and len(dets[1]["scores"]) == 0 and dets[1]["masks"].shape == (0, 64, 64)
    d = dets[0]
    assert set(d) == {"boxes", "scores", "labels", "masks"}
    assert d["labels"].tolist() == [1] and d["labels"].dtype == torch.int64 and d["scores"][0] > 0.99
    torch.testing.assert_close(d["boxes"][0], point_form(anchors[200:201])[0].clamp(0, 1) * 64)
    assert d["masks"].dtype == torch.bool and d["masks"].shape == (1, 64, 64)
    x1, y1, x2, y2 = d["boxes"][0].tolist()
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[max(0, int(y1) - 8) : int(y2) + 9, max(0, int(x1) - 8) : int(x2) + 9] = False  # a proto pixel of slack
    assert not d["masks"][0][outside].any()


def test_postprocess_of_an_untrained_model_keeps_at_most_top_k_best_first():
    model = build().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    out["cls"] = torch.randn_like(out["cls"]) * 3
    d = postprocess(out, model.anchors(64, 64), (64, 64), top_k=10)[0]
    assert 0 < len(d["scores"]) <= 10 and (d["scores"][:-1] >= d["scores"][1:]).all()
    assert (d["boxes"] >= 0).all() and (d["boxes"] <= 64).all() and d["labels"].max() < K
    with pytest.raises(ValueError, match="anchors"):
        postprocess(out, model.anchors(32, 32), (64, 64))


# ---------------------------------------------------------------------------------------------------------- loss
def synthetic_batch():
    """Image 0: two rectangles of classes 0 and 2; image 1: no instance (M = 0)."""
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 10:34] = 1
    masks[1, 30:60, 36:62] = 1
    first = {"boxes": torch.tensor([[10.0, 8, 34, 40], [36, 30, 62, 60]]), "labels": torch.tensor([0, 2]),
             "masks": masks}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 64, 64, dtype=torch.uint8)}
    images = torch.rand(2, 3, 64, 64) * 0.2
    images[0, :, 8:40, 10:34] += 0.8
    images[0, 0, 30:60, 36:62] += 0.8
    return images, [first, empty]


def test_loss_is_finite_and_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model, criterion = build().train(), YolactLoss(K)
    images, targets = synthetic_batch()
    anchors = model.anchors(64, 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(20):
        loss, parts = criterion(model(images), targets, anchors)
        assert torch.isfinite(loss) and set(parts) == {"box", "conf", "mask", "seg"}
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    assert history[-1] < 0.5 * history[0]
    assert all(v > 0 for v in parts.values())


def test_loss_parts_by_hand():
    """All-zero predictions: every CE term is ln(K + 1), every mask and seg pixel ln 2, so the parts are known."""
    model = build()
    anchors = model.anchors(64, 64)
    a = anchors.shape[0]
    out = {"cls": torch.zeros(1, a, K + 1), "box": torch.zeros(1, a, 4), "coef": torch.zeros(1, a, 8),
           "proto": torch.randn(1, 8, 16, 16), "seg": torch.zeros(1, K, 8, 8)}
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 16:48, 16:48] = 1  # proto pixels 4..11: a box of 8×8, cropped with one pixel of padding to 10×10
    target = {"boxes": torch.tensor([[16.0, 16, 48, 48]]), "labels": torch.tensor([1]), "masks": masks}
    _, parts = YolactLoss(K)(out, [target], anchors)
    ln2 = torch.log(torch.tensor(2.0)).item()
    assert parts["conf"] == pytest.approx(4 * torch.log(torch.tensor(K + 1.0)).item(), rel=1e-5)  # 1 pos : 3 neg
    assert parts["mask"] == pytest.approx(6.125 * ln2 * 100 / 64, rel=1e-5)
    assert parts["seg"] == pytest.approx(K * ln2, rel=1e-5)
    assert parts["box"] > 0


def test_loss_of_a_batch_without_instances():
    model, criterion = build().train(), YolactLoss(K)
    images, targets = synthetic_batch()
    loss, parts = criterion(model(images[1:]), targets[1:], model.anchors(64, 64))
    assert torch.isfinite(loss) and parts["box"] == parts["mask"] == parts["conf"] == 0.0 and parts["seg"] > 0
    loss.backward()  # the semantic head still learns the background
    _, parts = YolactLoss(K, min_negatives=8)(model(images[1:]), targets[1:], model.anchors(64, 64))
    assert parts["conf"] > 0  # ... and with a floor of mined negatives, the classifier too


def test_loss_rejects_targets_that_do_not_fit():
    model, criterion = build().train(), YolactLoss(K)
    images, targets = synthetic_batch()
    out = model(images)
    bad = [{**targets[0], "labels": torch.tensor([0, K])}, targets[1]]
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        criterion(out, bad, model.anchors(64, 64))
    with pytest.raises(ValueError, match="anchors"):
        criterion(out, targets, model.anchors(32, 32))


def small_and_thin_scene():
    """64×64: an ellipse, a bar 3 pixels wide (under one prototype pixel at stride 4) and a 6×6 square."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    masks = torch.zeros(3, 64, 64, dtype=torch.uint8)
    masks[0] = ((yy - 24) / 14) ** 2 + ((xx - 22) / 17) ** 2 < 1
    masks[1, 8:56, 47:50] = 1
    masks[2, 47:53, 13:19] = 1
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.7 * masks.float()
    return image[None], {"boxes": mask_boxes(masks), "labels": torch.arange(3), "masks": masks}


def test_overfitting_one_image_learns_small_and_thin_masks():
    """Regression: the masks postprocess returns match all three instances (IoU > 0.7) after 100 steps. With targets
    downsampled to the prototypes (bilinear, > 0.5) the bar vanished from its own target (IoU 0); with ReLU
    prototypes the square's mask died (IoU 0, its loss stuck); before the fix: [0.86, 0, 0.60]."""
    torch.manual_seed(0)
    model, criterion = build().train(), YolactLoss(K)
    image, target = small_and_thin_scene()
    anchors = model.anchors(64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        loss, _ = criterion(model(image), [target], anchors)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # BN still in training mode: the image's own statistics, which 100 steps' averages lag
        found = postprocess(model(image), anchors, (64, 64))[0]
    masks = found["masks"][found["scores"] > 0.5]
    best = [max(float((m & gt).sum() / (m | gt).sum()) for m in masks) for gt in target["masks"].bool()]
    assert min(best) > 0.7, best


# ---------------------------------------------------------------------------------------------------- pruning
def test_prototypes_and_coefficients_form_one_prunable_group():
    model, x = build(), torch.randn(1, 3, 64, 64)
    plain = group_with(groups_of(model, x), "protonet.9")
    assert plain.frozen and "reaches the model's output" in plain.reason
    group = group_with(groups_of(model, model.prune_inputs(x)), "protonet.9")
    assert not group.frozen and group.size == model.num_prototypes == 8
    assert {(m.module, m.role) for m in group.members} == {("protonet.9", "out"), ("head.coef", "out")}
    coef = next(m for m in group.members if m.module == "head.coef")
    assert coef.index.tolist() == list(range(8)) * 3  # coefficient i of every anchor type is prototype i


def _kept(index, removed):
    return torch.tensor([i for i, c in enumerate(index.tolist()) if c not in set(removed.tolist())])


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_oracle_on_raw_outputs_and_assembled_masks(ratio):
    torch.manual_seed(0)
    model = randomize_norms(build()).double().eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    example = model.prune_inputs(x)
    groups = groups_of(model, example)
    result = segprune.prune(model, example, ratio=ratio, criterion="random", seed=1, groups=groups)
    masked = masked_copy(model, groups, result.removed)
    # cls, box and the masks of every anchor before NMS, sigmoid(einsum(proto, coef))
    assert relative_error(outputs(masked, example), outputs(result.model, example)) < 1e-6
    assert relative_error(outputs(model, example), outputs(result.model, example)) > 1e-6
    # the raw outputs: equal on the kept prototypes; the removed ones are dead in the masked copy
    group = group_with(groups, "protonet.9")
    removed = result.removed.get(group.id, [])
    assert len(removed) > 0, "the prototype group lost nothing: the test would prove little"
    keep = _kept(next(m for m in group.members if m.module == "protonet.9").index, torch.as_tensor(removed))
    with torch.no_grad():
        ref, got = masked.eval()(x), result.model.eval()(x)
    assert got["proto"].shape[1] == got["coef"].shape[2] == len(keep) == result.model.num_prototypes
    pairs = [(ref["cls"], got["cls"]), (ref["box"], got["box"]), (ref["proto"][:, keep], got["proto"]),
             (ref["coef"][..., keep], got["coef"])]
    assert all(relative_error([a], [b]) < 1e-6 for a, b in pairs)
    dead = [i for i in range(ref["proto"].shape[1]) if i not in keep.tolist()]
    assert ref["proto"][:, dead].abs().max() == 0 and ref["coef"][..., dead].abs().max() == 0


@pytest.mark.slow
def test_oracle_on_the_full_size_model():
    torch.manual_seed(0)
    model = randomize_norms(create_model("yolact_resnet50", num_classes=80)).double().eval()
    x = torch.randn(1, 3, 96, 96, dtype=torch.float64)
    example = model.prune_inputs(x)
    groups = groups_of(model, example)
    result = segprune.prune(model, example, ratio=0.3, criterion="random", seed=0, groups=groups)
    assert result.model.num_prototypes < 32
    masked = outputs(masked_copy(model, groups, result.removed), example)
    assert relative_error(masked, outputs(result.model, example)) < 1e-6


def test_pruned_head_stays_one_shared_module():
    model, x = build(), torch.randn(1, 3, 64, 64)
    result = segprune.prune(model, model.prune_inputs(x), ratio=0.5, criterion="l1")
    pruned = result.model
    assert pruned.head.upfeature[0].out_channels < model.head.upfeature[0].out_channels
    calls = []
    handle = pruned.head.register_forward_hook(lambda m, i, o: calls.append((id(m), i[0].shape[1])))
    pruned.eval()(x)
    handle.remove()
    assert len(calls) == 5 and len(set(calls)) == 1  # the same module, on inputs of the same width, at every level
    assert sum(isinstance(m, type(model.head)) for m in pruned.modules()) == 1


def test_the_seeds_compression_sparsity_bn_scale_pruning_and_fusion():
    """Network slimming as in the seed: the YOLACT loss plus λ·sign(γ) moves the backbone's BN scales, a global
    |γ| threshold prunes (only the backbone has BN), and Conv–BN fusion is exact on the pruned model."""
    model, (images, targets) = randomize_norms(build()).train(), synthetic_batch()
    groups = groups_of(model, model.prune_inputs(images))
    sparsity = segprune.BNSparsity(model, lam=1e-2, groups=groups)
    gamma = model.backbone.stem[0].bn.weight
    loss, _ = YolactLoss(K)(model(images), targets, model.anchors(64, 64))
    loss.backward()
    before = gamma.grad.clone()
    sparsity(model)
    torch.testing.assert_close(gamma.grad - before, 1e-2 * torch.sign(gamma.detach()))
    result = segprune.prune(model.eval(), model.prune_inputs(images), ratio=0.4, criterion="bn_scale", groups=groups)
    old = dict(model.named_parameters())
    changed = {name for name, p in result.model.named_parameters() if p.shape != old[name].shape}
    assert any(n.startswith("backbone.") for n in changed)
    assert all(n.startswith(("backbone.", "fpn.lateral")) for n in changed)  # the laterals lose inputs only
    fused = fuse_conv_bn(result.model, images)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert relative_error(outputs(result.model, images), outputs(fused, images)) < 1e-5


# ------------------------------------------------------------------------------------- contraction rules, alone
class Contraction(nn.Module):
    """Prototypes times per-anchor coefficients, spelled with `op`."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.proto = nn.Sequential(nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5), nn.ReLU())
        self.coef = nn.Conv2d(6, 2 * 5, 3, padding=1)

    def forward(self, x):
        f = self.stem(x)
        p, c = self.proto(f), self.coef(f)
        n, _, h, w = c.shape
        c = torch.tanh(c.permute(0, 2, 3, 1).reshape(n, h * w * 2, -1))  # (N, A, k)
        if self.op == "einsum":
            return torch.einsum("nkhw,nak->nahw", p, c)
        flat = p.flatten(2)  # (N, k, H·W)
        if self.op == "bmm":
            return torch.bmm(c, flat)
        return flat.transpose(1, 2) @ c.transpose(1, 2)  # matmul, the reference's proto @ coef.t()


@pytest.mark.parametrize("op", ["einsum", "bmm", "matmul"])
def test_contraction_couples_both_operands_and_prunes_exactly(op):
    torch.manual_seed(0)
    model = randomize_norms(Contraction(op)).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    groups = groups_of(model, x)
    group = group_with(groups, "proto.0")
    assert not group.frozen and {m.module for m in group.members} == {"proto.0", "proto.1", "coef"}
    result = segprune.prune(model, x, ratio=0.4, criterion="random", seed=1, groups=groups)
    kept = result.model.proto[0].out_channels
    assert kept < 5 and result.model.coef.out_channels == 2 * kept
    assert relative_error(outputs(masked_copy(model, groups, result.removed), x), outputs(result.model, x)) < 1e-9


class Unsupported(nn.Module):
    """Contractions the engine must not cut: a constant matrix, a channel sum, an ellipsis."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.a = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.register_buffer("mix", torch.randn(4, 4))

    def forward(self, x):
        y = self.a(x)
        if self.case == "constant":
            return torch.einsum("nchw,cd->ndhw", y, self.mix)
        if self.case == "sum":
            return torch.einsum("nchw->nhw", y)
        return torch.einsum("nc...->n...", y)


@pytest.mark.parametrize(("case", "reason"), [("constant", "not traced"), ("sum", "sums over"),
                                              ("ellipsis", "einsum")])
def test_contractions_the_engine_cannot_cut_are_frozen(case, reason):
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        groups = segprune.channel_groups(Unsupported(case), torch.randn(1, 3, 4, 4))
    group = group_with(groups, "a.0")
    assert group.frozen and reason in group.reason


def test_reshape_split_couples_every_anchor_type():
    model = Contraction("einsum")
    group = group_with(groups_of(model, torch.randn(1, 3, 6, 6)), "coef")
    coef = next(m for m in group.members if m.module == "coef")
    assert coef.index.tolist() == [0, 1, 2, 3, 4] * 2



