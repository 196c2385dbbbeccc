"""YOLOv10 and DocLayout-YOLO: parameter counts against the reference, GL-CRM structure, the detector API (loss,
detached one-to-one branch, top-k post-processing), deploy form and the inputs it refuses."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import zoo
from tests.conftest import randomize_batchnorms
from zoo.vision.doclayout_yolo import DilatedBlock, DocLayoutYOLO
from zoo.vision.yolov10 import YOLOv10, v10_topk

# ../shared/reference/doclayout_yolo.md, counted from the reference code: (both heads, one-to-one head only)
COUNTS = {
    ("yolov10m", 80): (16_576_768, 15_389_968),
    ("doclayout_yolo_m", 10): (19_973_596, 18_827_326),
    ("doclayout_yolo_m", 11): (19_974_754, 18_827_905),
    ("doclayout_yolo_m", 27): (19_993_282, 18_837_169),
    ("doclayout_yolo_m", 74): (20_047_708, 18_864_382),
}
# YOLOv10 README (THU-MIG): inference parameters 2.3M / 7.2M / 15.4M / 19.1M / 24.4M / 29.5M (rounded; exact
# per-scale equality with the doclayout-yolo package: tests/vision/test_doclayout_yolo_reference.py)
README_M = {"n": 2.3, "s": 7.2, "m": 15.4, "b": 19.1, "l": 24.4, "x": 29.5}
# every block type kept (GL-CRM k5 / k3 / CIB, C2f, C2fCIB, SCDown, SPPF, PSA), 1/8 of the width, one block per CSP
TINY = dict(scale=(0.33, 0.125, 1024), backbone_repeats=(1, 1, 1, 1), neck_repeats=(1, 1, 1, 1))


def _n(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# the released heads' tags set the head size (no num_classes needed)
TAGS = {11: "doclaynet_docsynth300k", 27: "d4la_from_scratch", 74: "docsynth300k_pretrain"}


@pytest.mark.parametrize("name,nc", list(COUNTS))
def test_parameter_counts_equal_reference(name, nc):
    kw = {"num_classes": nc} if nc not in TAGS else {}
    full = f"{name}.{TAGS[nc]}" if nc in TAGS else name
    with torch.device("meta"):
        both = zoo.create_model(full, **kw)
        one = zoo.create_model(full, dual_head=False, **kw)
    assert both.num_classes == nc
    assert (_n(both), _n(one)) == COUNTS[(name, nc)]


def test_scale_table_matches_readme_and_glcrm_stage_counts():
    with torch.device("meta"):
        for v, m in README_M.items():
            assert abs(_n(zoo.create_model(f"yolov10{v}", dual_head=False)) / 1e6 - m) < 0.1, v
        dly = zoo.create_model("doclayout_yolo_m")
    stages = dly.backbone.stages
    assert [_n(stages[i][1]) for i in (1, 2, 3)] == [1_778_688, 4_737_024, 2_714_112]
    assert (_n(stages[3][2]), _n(stages[3][3])) == (831_168, 1_253_088)  # SPPF, PSA
    assert dly.num_classes == 10 and dly.label_names[0] == "title" and len(dly.label_names) == 10


def test_dilated_block_shares_kernel_and_groups():
    blk = DilatedBlock(96, (1, 2, 3), 3, "glu")
    assert blk.conv_gating.conv.groups == 288 and blk.conv1x1.conv.groups == 96
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in blk.modules()) == 1  # one shared kernel
    x = torch.randn(1, 96, 9, 9)
    assert blk(x).shape == x.shape
    # the branches really use dilations 1, 2, 3 of the same weight: zeroing that weight removes every branch
    with torch.no_grad():
        blk.dcv.conv.weight.zero_()
    y1 = blk(x)
    with torch.no_grad():
        blk.dcv.conv.weight.normal_()
    assert not torch.allclose(y1, blk(x))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = DocLayoutYOLO(num_classes=4, **TINY)
    randomize_batchnorms(m)
    with torch.no_grad():  # spread the class scores (the prior bias alone gives near-ties that top-k orders arbitrarily)
        for branch in (m.head.one2one, m.head.one2many):
            for tower in branch.cls:
                tower[-1].bias.normal_(-2.0, 1.0)
    return m


def _targets():
    return [dict(boxes=torch.tensor([[4.0, 5.0, 25.0, 20.0], [30.0, 32.0, 60.0, 60.0]]), labels=torch.tensor([1, 3])),
            dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long))]


def test_loss_backward_and_detached_one2one(tiny):
    tiny.train()
    x = torch.rand(2, 3, 64, 64)
    out = tiny(x)
    assert [tuple(o.shape) for o in out] == [(2, 84, 64), (2, 84, 4)] * 2  # 8^2 + 4^2 + 2^2 anchors
    losses = tiny.loss(out, _targets(), (64, 64))
    assert torch.isfinite(losses["loss"]) and losses["o2m_box"] > 0 and losses["o2o_cls"] > 0
    # the one-to-one loss alone reaches the one-to-one head but not the backbone / neck (detached features)
    tiny.zero_grad()
    parts = sum(losses[k] for k in ("o2o_box", "o2o_cls", "o2o_dfl"))
    assert parts.grad_fn is None  # logged parts are detached
    o2o_only = tiny._branch_loss(out[0], out[1], *_anchor_args(tiny, out), 1, 0.5, 6.0).sum()
    probe = [tiny.head.one2one.cls[0][-1].weight, tiny.backbone.stem.conv.weight, tiny.head.one2many.cls[0][-1].weight]
    g_o2o, g_stem, g_o2m = torch.autograd.grad(o2o_only, probe, retain_graph=True, allow_unused=True)
    assert g_o2o.abs().sum() > 0 and g_stem is None and g_o2m is None
    losses["loss"].backward()
    assert tiny.backbone.stem.conv.weight.grad.abs().sum() > 0


def _anchor_args(model, out):
    from zoo.vision.yolov10 import make_anchors

    pts, st = make_anchors(model.feature_shapes((64, 64)), model.strides)
    t = _targets()
    gt_boxes = torch.zeros(2, 2, 4)
    gt_boxes[0] = t[0]["boxes"]
    gt_labels = torch.zeros(2, 2, dtype=torch.long)
    gt_labels[0] = t[0]["labels"]
    mask = torch.tensor([[True, True], [False, False]])
    return pts, st, gt_boxes, gt_labels, mask


def test_loss_and_input_errors(tiny):
    x = torch.rand(1, 3, 128, 128)
    out = tiny(x)
    with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
        tiny.loss(out, [dict(boxes=torch.tensor([[1.0, 1, 9, 9]]), labels=torch.tensor([4]))], (128, 128))
    with pytest.raises(ValueError, match="x2 <= x1"):
        tiny.loss(out, [dict(boxes=torch.tensor([[9.0, 1, 1, 9]]), labels=torch.tensor([0]))], (128, 128))
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny(torch.rand(1, 3, 100, 128))
    with pytest.raises(ValueError, match="variant"):
        YOLOv10("q")


def test_v10_topk_equals_reference_rule():
    torch.manual_seed(1)
    boxes, scores = torch.rand(3, 50, 4), torch.rand(3, 50, 7)
    b, s, lab = v10_topk(boxes, scores, 10)
    # reference: labels = index % nc over the flattened (top anchors x classes) scores
    best, idx = scores.amax(-1).topk(10, -1)
    g = torch.gather(scores, 1, idx[..., None].expand(3, 10, 7)).flatten(1)
    top, flat = g.topk(10, -1)
    assert torch.equal(s, top) and torch.equal(lab, flat % 7)
    assert torch.equal(b, torch.gather(torch.gather(boxes, 1, idx[..., None].expand(3, 10, 4)), 1,
                                       (flat // 7)[..., None].expand(3, 10, 4)))


def test_deploy_form_equals_training_form(tiny):
    from zoo.deploy import reparameterize

    tiny.eval()
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        ref = tiny(x)
        dep = reparameterize(tiny)
        got = dep(x)
    assert dep.head.one2many is None and len(got) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in dep.modules())
    for r, g in zip(ref[:2], got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="deploy form"):
        dep.loss(got, _targets(), (64, 96))
    dets = dep.postprocess(got, (64, 96))
    assert len(dets) == 2 and dets[0]["boxes"].shape[1] == 4 and (dets[0]["scores"][:-1] >= dets[0]["scores"][1:]).all()
    with torch.no_grad():  # batched prediction equals image-by-image prediction
        single = dep.postprocess(dep(x[1:]), (64, 96))[0]
    torch.testing.assert_close(single["scores"], dets[1]["scores"], rtol=1e-5, atol=1e-6)


def test_onnx_export_with_postprocessing_has_no_mod_and_matches_eager(tiny, tmp_path):
    """The exported graph (backbone, heads, DFL decode, top-k) passes zoo.deploy.export's onnxruntime parity check at
    another batch size than exported (3 vs 2), and computes labels without a Mod node (TensorRT could not parse it)."""
    onnx = pytest.importorskip("onnx")
    from zoo.deploy import export
    from zoo.vision.yolov10 import YOLOv10Postprocess

    path = export(YOLOv10Postprocess(tiny, max_det=20), tmp_path / "dly.onnx", input_size=(3, 64, 64))
    graph = onnx.load(str(path))
    ops = {n.op_type for n in graph.graph.node} | {n.op_type for f in graph.functions for n in f.node}
    assert "Mod" not in ops and "TopK" in ops
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(5, 3, 64, 64)
    boxes, scores, labels = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert boxes.shape == (5, 20, 4) and labels.dtype.kind == "i" and (labels >= 0).all() and (labels < 4).all()
