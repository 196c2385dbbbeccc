"""MobileDets backbones and SSDLite detectors: structure and counts against the TF reference, anchors, box coding,
matching, loss input checks, post-processing, deploy form and ONNX export."""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import zoo
from tests.conftest import randomize_batchnorms
from zoo.vision.mobiledets import (
    ARCH_SPECS, BoxCoder, DetectionPostprocess, FusedInvertedBottleneck, InvertedBottleneck, MobileDet,
    SSDAnchorGenerator, SSDLiteMobileDet, TuckerConv, argmax_match, scale_filters,
)

ARCHS = ("cpu", "edgetpu", "dsp", "gpu")
# Counted from the TF reference code (../shared/reference/mobiledets.md): backbone, extra layers, box + class
# predictors, trainable total; the config headers' figures (4.21M / 4.20M / 7.16M / 13.11M) add BN statistics.
REFERENCE = {
    "cpu": (3_006_440, 366_144, 792_471, 4_165_055, 4_205_423),
    "edgetpu": (2_777_040, 427_584, 941_919, 4_146_543, 4_196_095),
    "dsp": (5_839_952, 390_720, 871_407, 7_102_079, 7_159_343),
    "gpu": (11_689_920, 427_584, 951_743, 13_069_247, 13_109_151),
}
C4_C5 = {"cpu": (72, 144), "edgetpu": (96, 384), "dsp": (144, 240), "gpu": (128, 384)}


def _n(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@functools.lru_cache(maxsize=None)
def _meta_detector(arch: str) -> SSDLiteMobileDet:
    """The full-size detector on the meta device, built once for the count / MAC / shape tests that only read it."""
    with torch.device("meta"):
        return zoo.create_model(f"ssdlite_mobiledet_{arch}").eval()  # 90 classes -> 91 slots, as the COCO configs


@functools.lru_cache(maxsize=None)
def _meta_backbone(arch: str) -> MobileDet:
    with torch.device("meta"):
        return MobileDet(arch, num_classes=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_counts_equal_reference(arch):
    det = _meta_detector(arch)
    with torch.device("meta"):
        backbone = zoo.create_model(f"mobiledet_{arch}", num_classes=0)
    bb, extra, heads, total, with_stats = REFERENCE[arch]
    assert _n(backbone) == bb
    assert _n(det.backbone) == bb
    assert _n(det.extras) == extra
    assert _n(det.box_heads) + _n(det.cls_heads) == heads
    assert _n(det) == total
    stats = sum(b.numel() for k, b in det.named_buffers() if k.endswith(("running_mean", "running_var")))
    assert _n(det) + stats == with_stats


# MACs at 320x320: the config headers (0.45B / 1.53B / 2.82B / 5.07B) and our count (zoo.bench.count_gmacs, conv +
# linear, pinned to the MODEL_CARD figures).
GMACS = {"cpu": (0.45, 0.444), "edgetpu": (1.53, 1.533), "dsp": (2.82, 2.816), "gpu": (5.07, 5.073)}


@pytest.mark.parametrize("arch", ARCHS)
def test_gmacs_at_320_equal_config_header(arch):
    from zoo.bench import count_gmacs

    det = _meta_detector(arch)
    gmacs = count_gmacs(det, torch.empty(1, 3, 320, 320, device="meta"))
    header, ours = GMACS[arch]
    assert round(gmacs, 3) == ours
    assert gmacs == pytest.approx(header, rel=0.015)  # the header's 2-digit figure (CPU: 0.444 vs "0.45B")


@pytest.mark.parametrize("arch", ARCHS)
def test_feature_maps_at_320(arch):
    det = _meta_detector(arch)
    with torch.device("meta"):
        feats = det.forward_features(torch.empty(1, 3, 320, 320))
        cls, box = det(torch.empty(2, 3, 320, 320))
    c4, c5 = C4_C5[arch]
    assert [tuple(f.shape[1:]) for f in feats] == [
        (c4, 20, 20), (c5, 10, 10), (512, 5, 5), (256, 3, 3), (256, 2, 2), (128, 1, 1)]
    assert det.feature_shapes((320, 320)) == [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    assert tuple(cls.shape) == (2, 2034, 91) and tuple(box.shape) == (2, 2034, 4)


def test_scale_filters_rounds_half_up_to_multiples_of_8():
    assert scale_filters(32, 0.25) == 8
    assert scale_filters(16, 0.75) == 16  # 12 -> 1.5 -> 2 -> 16
    assert scale_filters(20, 1.0) == 24  # 2.5 rounds up
    assert scale_filters(11, 1.0) == 8  # 1.375 -> 1 -> 8
    assert scale_filters(4, 1.0) == 8  # minimum 8
    assert scale_filters(160, 0.75) == 120


def test_block_semantics_of_the_cpu_variant():
    m = _meta_backbone("cpu")
    acts = {type(x) for x in m.modules() if isinstance(x, (nn.ReLU, nn.ReLU6, nn.Hardswish))}
    assert acts == {nn.Hardswish}  # hard-swish everywhere, stem included (SE too)
    c4 = list(m.stages[3])
    assert [b.has_skip for b in c4] == [False, True, True, True, False, True, True, True]  # the 5th is not residual
    ibn = c4[1]
    assert isinstance(ibn, InvertedBottleneck) and ibn.conv_pw.conv.out_channels == 72 * 8  # cin * e, no rounding
    assert ibn.se.fc1.out_channels == scale_filters(72 * 8, 0.25) and ibn.se.fc1.bias is not None
    assert m.stem.norm.eps == 0.01 and m.stem.norm.momentum == pytest.approx(0.01)
    assert m.stem.conv.bias is None


@pytest.mark.parametrize("arch", ("edgetpu", "dsp", "gpu"))
def test_other_variants_use_relu6_without_se(arch):
    m = _meta_backbone(arch)
    assert not any(isinstance(x, nn.Hardswish) for x in m.modules())
    assert not any(type(x).__name__ == "SEModule" for x in m.modules())
    kinds = {type(b) for s in m.stages for b in s}
    assert FusedInvertedBottleneck in kinds and TuckerConv in kinds


def test_tucker_ranks_and_block_counts():
    m = _meta_backbone("edgetpu")
    t = m.stages[0][0]  # T(16, 0.25, 0.75) after a 32-channel stem
    assert (t.conv_in.conv.out_channels, t.conv_mid.conv.out_channels, t.conv_out.conv.out_channels) == (8, 16, 16)
    for arch, spec in ARCH_SPECS.items():
        mm = _meta_backbone(arch)
        assert [len(s) for s in mm.stages] == [len(s) for s in spec["stages"]]
        assert [f["reduction"] for f in mm.feature_info] == [2, 4, 8, 16, 32]


def test_features_only_returns_c1_to_c5():
    net = zoo.create_model("mobiledet_cpu", features_only=True, multiplier=0.5)
    outs = net(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape[-2:]) for o in outs] == [(32, 48), (16, 24), (8, 12), (4, 6), (2, 3)]
    sel = zoo.create_model("mobiledet_dsp", features_only=True, out_indices=(3, 4))
    assert sel.feature_info.channels() == [144, 240]


def test_classifier_api():
    m = zoo.create_model("mobiledet_edgetpu", num_classes=7, multiplier=0.5)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    m.reset_classifier(0)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, m.num_features)


# --------------------------------------------------------------------------------------------------- anchors


def test_anchor_count_and_specs_at_320():
    gen = SSDAnchorGenerator()
    assert gen.num_anchors_per_location() == [3, 6, 6, 6, 6, 6]
    scales = [0.2 + 0.75 * i / 5 for i in range(6)] + [1.0]
    assert gen.box_specs[0] == [(0.1, 1.0), (0.2, 2.0), (0.2, 0.5)]
    for layer in range(1, 6):
        s, nxt = scales[layer], scales[layer + 1]
        assert [a for _, a in gen.box_specs[layer]] == [1.0, 2.0, 0.5, 3.0, 0.3333, 1.0]
        assert all(sc == pytest.approx(s) for sc, _ in gen.box_specs[layer][:5])
        assert gen.box_specs[layer][5][0] == pytest.approx(math.sqrt(s * nxt))
    det = SSDLiteMobileDet("cpu", num_classes=3, multiplier=0.25)
    anchors = det.anchors((320, 320))
    assert anchors.shape == (2034, 4) == (20 * 20 * 3 + (100 + 25 + 9 + 4 + 1) * 6, 4)


def test_anchor_geometry_and_order():
    gen = SSDAnchorGenerator()
    shapes = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
    a = gen(shapes, (320, 320))
    cx, cy = (a[:, 0] + a[:, 2]) / 2, (a[:, 1] + a[:, 3]) / 2
    w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    # layer 0, location (y=2, x=5), anchor 1 = (0.2, ratio 2): index (y * 20 + x) * 3 + a
    i = (2 * 20 + 5) * 3 + 1
    assert cx[i].item() == pytest.approx(5.5 / 20) and cy[i].item() == pytest.approx(2.5 / 20)
    assert w[i].item() == pytest.approx(0.2 * math.sqrt(2)) and h[i].item() == pytest.approx(0.2 / math.sqrt(2))
    # the last anchor: the 1x1 map, interpolated scale sqrt(0.95 * 1.0), centred
    assert cx[-1].item() == pytest.approx(0.5) and w[-1].item() == pytest.approx(math.sqrt(0.95), rel=1e-6)
    # not clipped: the largest anchors leave the unit square, as in TF
    assert a.min() < 0 and a.max() > 1
    # non-square images: ratio-1 anchors are square in pixels
    b = gen([(10, 20), (5, 10), (3, 5), (2, 3), (1, 2), (1, 1)], (160, 320))
    j = 10 * 20 * 3  # first anchor of layer 1 (scale 0.35, ratio 1)
    assert (b[j, 2] - b[j, 0]).item() * 320 == pytest.approx((b[j, 3] - b[j, 1]).item() * 160)


def test_any_input_size_is_accepted():
    det = SSDLiteMobileDet("cpu", num_classes=3, multiplier=0.25).eval()
    for size in ((100, 150), (64, 64), (33, 47)):
        cls, box = det(torch.randn(1, 3, *size))
        assert cls.shape[1] == det.anchors(size).shape[0] == box.shape[1]


# ---------------------------------------------------------------------------------------- coder / matcher


def test_box_coder_matches_faster_rcnn_coder():
    coder = BoxCoder()
    anchors = torch.tensor([[0.1, 0.2, 0.3, 0.6]])  # xyxy: centre (0.2, 0.4), w 0.2, h 0.4
    box = torch.tensor([[0.12, 0.3, 0.36, 0.5]])  # centre (0.24, 0.4), w 0.24, h 0.2
    code = coder.encode(box, anchors)[0]
    assert code.tolist() == pytest.approx([0.0, 0.04 / 0.2 * 10, math.log(0.5) * 5, math.log(1.2) * 5], abs=1e-5)
    boxes = torch.rand(50, 4) * 0.5
    boxes[:, 2:] += boxes[:, :2] + 0.01
    anc = torch.rand(50, 4) * 0.5
    anc[:, 2:] += anc[:, :2] + 0.01
    assert torch.allclose(coder.decode(coder.encode(boxes, anc), anc), boxes, atol=1e-5)


def test_argmax_matcher_thresholds_and_forced_matches():
    iou = torch.tensor([[0.7, 0.2, 0.1, 0.0],
                        [0.6, 0.3, 0.45, 0.0]])
    m = argmax_match(iou)
    # by IoU anchor 0 -> gt 0 and the rest are background; both gts' best anchor is 0, forced matching gives it
    # to the later gt (TF takes the maximum row index), and nothing else changes
    assert m.tolist() == [1, -1, -1, -1]
    iou2 = torch.tensor([[0.3, 0.2], [0.1, 0.4]])
    assert argmax_match(iou2).tolist() == [0, 1]  # below 0.5 but forced
    assert argmax_match(iou2, force_match_for_each_row=False).tolist() == [-1, -1]
    assert argmax_match(torch.zeros(0, 3)).tolist() == [-1, -1, -1]
    assert argmax_match(torch.tensor([[0.45, 0.9]]), 0.5, 0.4, False).tolist() == [-2, 0]


# ---------------------------------------------------------------------------------------------------- loss


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return SSDLiteMobileDet("cpu", num_classes=3, multiplier=0.25)


def test_loss_handles_empty_images_and_backpropagates(tiny):
    x = torch.randn(2, 3, 96, 96)
    targets = [dict(boxes=torch.tensor([[10.0, 12.0, 60.0, 50.0]]), labels=torch.tensor([2])),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    out = tiny(x)
    losses = tiny.loss(out, targets, (96, 96))
    assert torch.isfinite(losses["loss"]) and losses["num_pos"] >= 1
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in tiny.parameters() if p.grad is not None)
    empty = tiny.loss(out, [targets[1], targets[1]], (96, 96))
    assert torch.isfinite(empty["loss"]) and empty["loss_box"] == 0 and empty["num_pos"] == 0


def _focal(logit: float, target: int, alpha: float = 0.75, gamma: float = 2.0) -> float:
    """One sigmoid focal term, written out: -alpha_t (1 - p_t)^gamma log p_t."""
    p = 1.0 / (1.0 + math.exp(-logit))
    p_t, alpha_t = (p, alpha) if target else (1.0 - p, 1.0 - alpha)
    return -alpha_t * (1.0 - p_t) ** gamma * math.log(p_t)


def _smooth_l1(d: float) -> float:
    return 0.5 * d * d if abs(d) < 1.0 else abs(d) - 0.5


def test_loss_equals_hand_computed_small_case():
    """Four hand-placed anchors, two images, 3 classes (4 slots, slot 0 = background), matcher 0.5 / 0.4.

    Image 0: gt g0 = (5, 0, 55, 50) px label 2 and g1 = (50, 50, 80, 80) px label 0 on a 100x100 input.
      a0 = (0, 0, .5, .5):    IoU(g0) = .225 / .275 = 0.818 -> matched to g0 (slot 3), code (0, 1, 0, 0)
      a1 = (.5, .5, 1, 1):    IoU(g1) = .09 / .25 = 0.36 < 0.4, but g1's best anchor -> forced match (slot 1),
                              code (-2, -2, 5 ln .6, 5 ln .6)
      a2 = (0, .5, .5, 1):    IoU 0 -> background (all four slots target 0)
      a3 = (.25, 0, .75, .5): IoU(g0) = .15 / .35 = 0.429 in [0.4, 0.5) -> ignored: no class loss, no box loss
    Image 1: no boxes -> all four anchors background.
    cls = sum of focal terms over non-ignored anchors and all slots / 2 matches; box = sum of smooth L1 over the
    two matched anchors / (2 matches * code size 4).
    """
    torch.manual_seed(0)
    det = SSDLiteMobileDet("cpu", num_classes=3, multiplier=0.25, unmatched_threshold=0.4)
    anchors = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0], [0.25, 0.0, 0.75, 0.5]])
    det.anchors = lambda size, device=None: anchors.to(device)  # the hand-placed anchors replace the SSD grid
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(2, 4, 4, generator=g) * 2
    cls[0, 3] = 8.0  # the ignored anchor: confident "object" scores that would dominate if it were counted
    box = torch.randn(2, 4, 4, generator=g)
    box[0, 2:] = 10.0  # deltas of background / ignored anchors: large, must not count
    targets = [dict(boxes=torch.tensor([[5.0, 0.0, 55.0, 50.0], [50.0, 50.0, 80.0, 80.0]]), labels=torch.tensor([2, 0])),
               dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]
    codes = {(0, 0): [0.0, 1.0, 0.0, 0.0], (0, 1): [-2.0, -2.0, 5 * math.log(0.6), 5 * math.log(0.6)]}
    slot = {(0, 0): 3, (0, 1): 1}

    def expected(ignored):
        valid = [(i, a) for i in range(2) for a in range(4) if (i, a) not in ignored]
        c = sum(_focal(cls[i, a, k].item(), int(slot.get((i, a)) == k)) for i, a in valid for k in range(4)) / 2
        b = sum(_smooth_l1(box[i, a, j].item() - codes[i, a][j]) for i, a in codes for j in range(4)) / (2 * 4)
        return c, b

    got = det.loss((cls, box), targets, (100, 100))
    c, b = expected(ignored={(0, 3)})
    assert got["num_pos"].item() == 2
    assert got["loss_cls"].item() == pytest.approx(c, rel=1e-5)
    assert got["loss_box"].item() == pytest.approx(b, rel=1e-5)
    assert got["loss"].item() == pytest.approx(c + b, rel=1e-5)
    # matcher 0.5 / 0.5 (the configs): a3 is background, so its confident scores are now penalized
    det.unmatched_threshold = 0.5
    got = det.loss((cls, box), targets, (100, 100))
    c5, _ = expected(ignored=set())
    assert got["loss_cls"].item() == pytest.approx(c5, rel=1e-5) and c5 > c + 3


def test_optimizer_step_changes_parameters_and_lowers_the_loss():
    """A real training step: every parameter with a gradient moves, and the loss on the same batch goes down."""
    torch.manual_seed(0)
    det = SSDLiteMobileDet("cpu", num_classes=3, multiplier=0.25, extra_depths=(64, 32, 32, 16)).train()
    x = torch.randn(2, 3, 64, 64)
    targets = [dict(boxes=torch.tensor([[10.0, 12.0, 40.0, 34.0], [30.0, 30.0, 62.0, 60.0]]), labels=torch.tensor([2, 0])),
               dict(boxes=torch.tensor([[0.0, 0.0, 28.0, 50.0]]), labels=torch.tensor([1]))]
    opt = torch.optim.SGD(det.parameters(), lr=0.02, momentum=0.9)
    before = {n: p.detach().clone() for n, p in det.named_parameters()}
    losses, stepped = [], set()
    for _ in range(3):
        opt.zero_grad()
        loss = det.loss(det(x), targets, (64, 64))["loss"]
        loss.backward()
        stepped |= {n for n, p in det.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(det.loss(det(x), targets, (64, 64))["loss"].item())
    changed = {n for n, p in det.named_parameters() if not torch.equal(before[n], p.detach())}
    names = [n for n, _ in det.named_parameters()]
    # parameters moved (not just BatchNorm buffers), in every part of the network; nothing moved without a gradient
    # (the box heads of levels where no anchor matched have none)
    assert changed <= stepped and len(changed) > 0.85 * len(names)
    assert all(n in changed for n in names if n.startswith("backbone."))
    assert {n.split(".")[0] for n in changed} == {"backbone", "extras", "box_heads", "cls_heads"}
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.97 * losses[0], losses


@pytest.mark.parametrize(
    "target, match",
    [
        (dict(boxes=torch.tensor([[1.0, 2.0, 30.0, 40.0]]), labels=torch.tensor([3])), "label 3 .* outside \\[0, 3\\)"),
        (dict(boxes=torch.tensor([[1.0, 2.0, 30.0, 40.0]]), labels=torch.tensor([-1])), "outside"),
        (dict(boxes=torch.tensor([[30.0, 2.0, 30.0, 40.0]]), labels=torch.tensor([0])), "degenerate"),
        (dict(boxes=torch.tensor([[1.0, 2.0, float("nan"), 40.0]]), labels=torch.tensor([0])), "NaN"),
        (dict(boxes=torch.tensor([[1.0, 2.0, 30.0]]), labels=torch.tensor([0])), "\\(n, 4\\)"),
        (dict(boxes=torch.tensor([[1.0, 2.0, 30.0, 40.0]])), "labels"),
    ],
)
def test_bad_targets_raise_clear_errors(tiny, target, match):
    out = _separated_outputs(tiny, (64, 64))
    out = (out[0][:1], out[1][:1])
    with pytest.raises(ValueError, match=match):
        tiny.loss(out, [target], (64, 64))


def test_loss_rejects_mismatched_sizes(tiny):
    out = _separated_outputs(tiny, (64, 64))
    out = (out[0][:1], out[1][:1])
    with pytest.raises(ValueError, match="anchors"):
        tiny.loss(out, [dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))], (128, 128))
    with pytest.raises(ValueError, match="targets"):
        tiny.loss(out, [], (64, 64))


# ------------------------------------------------------------------------------------------ post-processing


def _separated_outputs(det, size, seed=0):
    """Raw outputs with well-separated scores (a trained-like regime), for post-processing checks."""
    g = torch.Generator().manual_seed(seed)
    n = det.anchors(size).shape[0]
    cls = torch.randn(2, n, det.num_classes + 1, generator=g) * 3 - 2
    box = torch.randn(2, n, 4, generator=g) * 0.5
    return cls, box


def test_postprocess_exact_and_padded_paths_agree(tiny):
    size = (96, 128)
    outputs = _separated_outputs(tiny, size)
    exact = tiny.postprocess(outputs, size)
    boxes, scores, labels, num = tiny.postprocess_padded(outputs, size, pre_nms_top_k=10_000)
    for i, d in enumerate(exact):
        assert len(d["scores"]) == tiny.max_det == int(num[i])
        assert torch.equal(d["labels"], labels[i, : num[i]]) and torch.allclose(d["scores"], scores[i, : num[i]])
        assert torch.allclose(d["boxes"], boxes[i, : num[i]])
        assert (d["scores"][:-1] >= d["scores"][1:]).all()
        assert d["labels"].min() >= 0 and d["labels"].max() < tiny.num_classes
        assert d["boxes"][:, 0::2].max() <= size[1] and d["boxes"][:, 1::2].max() <= size[0] and d["boxes"].min() >= 0
    # no two kept boxes of one class overlap above the NMS threshold
    from torchvision.ops import box_iou

    d = exact[0]
    for c in d["labels"].unique():
        b = d["boxes"][d["labels"] == c]
        iou = box_iou(b, b).fill_diagonal_(0)
        assert iou.max() <= tiny.nms_iou + 1e-6


def test_postprocess_padding_when_few_detections(tiny):
    size = (64, 64)
    cls, box = _separated_outputs(tiny, size)
    cls[:] = -30.0  # every score ~1e-13 < score_thresh
    cls[0, 5, 2] = 4.0
    boxes, scores, labels, num = tiny.postprocess_padded((cls, box), size)
    assert num.tolist() == [1, 0]
    assert labels[0, 0] == 1 and (labels[0, 1:] == -1).all() and (labels[1] == -1).all()
    assert (scores[0, 1:] == 0).all() and (boxes[1] == 0).all()
    assert [len(d["scores"]) for d in tiny.postprocess((cls, box), size)] == [1, 0]


# ------------------------------------------------------------------------------------------- deploy / export


def test_deploy_form_matches_training_form():
    torch.manual_seed(0)
    det = zoo.create_model("ssdlite_mobiledet_dsp", num_classes=4, multiplier=0.25).eval()
    randomize_batchnorms(det)  # running statistics and the affine gamma / beta
    assert not torch.equal(det.backbone.stem.norm.weight, torch.ones_like(det.backbone.stem.norm.weight))
    from zoo.deploy import count_foldable_batchnorms, reparameterize

    fused = reparameterize(det)
    assert count_foldable_batchnorms(fused) == 0
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        for a, b in zip(det(x), fused(x)):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    with torch.device("meta"):
        deployed = zoo.create_model("ssdlite_mobiledet_dsp", num_classes=4, multiplier=0.25, deploy=True)
    assert set(deployed.state_dict()) == set(fused.state_dict())


def test_same_padding_option():
    det = SSDLiteMobileDet("edgetpu", num_classes=2, multiplier=0.25, pad_type="same").eval()
    cls, _ = det(torch.randn(1, 3, 96, 96))
    assert cls.shape[1] == det.anchors((96, 96)).shape[0]
    with pytest.raises(ValueError, match="pad_type"):
        SSDLiteMobileDet("cpu", pad_type="valid")


def test_registry_metadata():
    names = zoo.list_models("*mobiledet*", task="object-detection")
    assert names == sorted(f"ssdlite_mobiledet_{a}" for a in ARCHS)
    cfg = zoo.create_model("ssdlite_mobiledet_cpu", multiplier=0.25).pretrained_cfg
    assert cfg.task == "object-detection" and cfg.family == "mobiledets" and cfg.input_size == (3, 320, 320)
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.metrics["map"] == 24.1


def test_onnx_export_parity_raw_and_postprocessed(tmp_path):
    """Both graphs pass zoo.deploy.export's onnxruntime parity check (run at another batch size than exported)."""
    pytest.importorskip("onnxruntime")
    from zoo.deploy import export

    torch.manual_seed(0)
    det = zoo.create_model("ssdlite_mobiledet_cpu", num_classes=3, multiplier=0.25, max_det=20)
    for m in det.modules():  # BN statistics from data (cumulative), so scores depend on the input as after training
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        for _ in range(2):
            det(torch.randn(4, 3, 96, 96))
        for h in det.cls_heads:  # spread the class scores so rankings are not decided by float noise
            h.conv_pw.weight.normal_(0, 0.3)
    det.eval()
    export(det, tmp_path / "raw.onnx", input_size=(3, 96, 96))
    post = DetectionPostprocess(det, pre_nms_top_k=50)
    export(post, tmp_path / "post.onnx", input_size=(3, 96, 96))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "post.onnx"), providers=["CPUExecutionProvider"])
    assert len(sess.get_outputs()) == 4  # boxes, scores, labels, num_detections
    boxes, scores, labels, num = sess.run(None, {sess.get_inputs()[0].name: torch.randn(3, 3, 96, 96).numpy()})
    assert boxes.shape == (3, 20, 4) and labels.shape == (3, 20) and num.shape == (3,)


def test_checkpoint_round_trip(tmp_path):
    from zoo.checkpoints import save_file

    torch.manual_seed(0)
    det = zoo.create_model("ssdlite_mobiledet_gpu", num_classes=2, multiplier=0.25).eval()
    save_file(det.state_dict(), tmp_path / "det.safetensors")
    again = zoo.create_model("ssdlite_mobiledet_gpu", num_classes=2, multiplier=0.25,
                             checkpoint_path=tmp_path / "det.safetensors").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(det(x), again(x)))
    from zoo.checkpoints import KeyMismatchError

    with pytest.raises(KeyMismatchError, match="cls_heads"):  # another label set: named, not silently dropped
        zoo.create_model("ssdlite_mobiledet_gpu", num_classes=3, multiplier=0.25, checkpoint_path=tmp_path / "det.safetensors")
