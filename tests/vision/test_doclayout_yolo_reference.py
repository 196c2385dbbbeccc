"""DocLayout-YOLO against the ``doclayout-yolo`` package (AGPL, test-only: the ``dev`` extra; ``zoo`` never imports it)
on the same random weights, and the safe conversion of pickled whole-model checkpoints.

One tiny reference model (the package's ``yolov10m-doclayout.yaml`` at 1/8 width) is built once per module; its
pickled ``.pt`` goes through our converter (no code from the file runs) into ``zoo.create_model``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import types

import pytest
import torch
from torch import nn

import zoo
from tests.conftest import randomize_batchnorms

TINY_SCALE = [0.33, 0.125, 1024]
NC = 5


@contextlib.contextmanager
def _reg_max_16():
    """The 0.0.4 wheel's Detect hard-codes ``reg_max = 1``; the GitHub code (and released weights' heads) use 16.
    A class property that ignores the assignment builds the GitHub head with the wheel's code."""
    from doclayout_yolo.nn.modules.head import Detect

    Detect.reg_max = property(lambda self: 16, lambda self, v: None)
    try:
        yield
    finally:
        del Detect.reg_max


def _reference(yaml_name: str, reg_max: int):
    import doclayout_yolo
    from doclayout_yolo.nn.modules.head import Detect
    from doclayout_yolo.nn.tasks import YOLOv10DetectionModel, yaml_model_load

    cfg = yaml_model_load(os.path.join(os.path.dirname(doclayout_yolo.__file__), "cfg/models/v10", yaml_name))
    cfg["scales"] = {next(iter(cfg["scales"])): TINY_SCALE}
    torch.manual_seed(0)
    with _reg_max_16() if reg_max == 16 else contextlib.nullcontext():
        ref = YOLOv10DetectionModel(cfg, nc=NC, verbose=False)
    for m in ref.modules():
        if isinstance(m, Detect):
            m.__dict__["reg_max"] = reg_max
            m.max_det = 300
    randomize_batchnorms(ref)
    with torch.no_grad():  # non-trivial head biases (the init gives equal class scores everywhere)
        for p in ref.model[-1].parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return ref.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(reference, ours loaded from the reference's pickled .pt, the .pt path)."""
    ref = _reference("yolov10m-doclayout.yaml", 16)
    path = tmp_path_factory.mktemp("dly") / "doclayout_tiny.pt"
    torch.save({"model": copy.deepcopy(ref).half(), "ema": None, "epoch": -1, "train_args": {"imgsz": 64}}, path)
    ours = zoo.create_model("doclayout_yolo_m", num_classes=NC, scale=tuple(TINY_SCALE), checkpoint_path=path).eval()
    return ref, ours, path


def _ref_raw(levels, nc):
    """Reference per-level (B, 4*reg_max + nc, H, W) maps -> our (box (B, A, 4*reg_max), cls (B, A, nc))."""
    flat = torch.cat([t.flatten(2) for t in levels], 2).transpose(1, 2)
    return flat[..., :-nc], flat[..., -nc:]


def test_training_form_equals_reference(pair):
    ref, ours, _ = pair
    ours_f = copy.deepcopy(ours).float()
    ref_f = copy.deepcopy(ref).half().float()  # the .pt stores fp16, as ultralytics saves: compare at that precision
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        r = ref_f(x)
        o = ours_f(x)
    for (rb, rc), (ob, oc) in ((_ref_raw(r["one2one"][1], NC), o[:2]), (_ref_raw(r["one2many"][1], NC), o[2:])):
        torch.testing.assert_close(ob, rb, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(oc, rc, rtol=1e-4, atol=1e-4)
    # decoded one-to-one predictions (reference: xywh boxes + sigmoid scores, (B, 4 + nc, A))
    boxes, scores = ours_f.decode(o[0], o[1], (64, 96))
    y = r["one2one"][0].transpose(1, 2)
    xy, wh = y[..., :2], y[..., 2:4]
    torch.testing.assert_close(boxes, torch.cat((xy - wh / 2, xy + wh / 2), -1), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(scores, y[..., 4:], rtol=1e-4, atol=1e-5)


def test_loss_equals_reference(pair):
    from types import SimpleNamespace

    from doclayout_yolo.utils.loss import v10DetectLoss

    ref, ours, _ = pair
    ref_f = copy.deepcopy(ref).half().float().train()
    ref_f.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)
    ours_f = copy.deepcopy(ours).float().train()
    x = torch.rand(2, 3, 64, 64)
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 30.0], [20.0, 24.0, 60.0, 62.0]]), torch.tensor([[10.0, 10.0, 50.0, 40.0]])]
    labels = [torch.tensor([1, 4]), torch.tensor([2])]
    xyxy = torch.cat(boxes)
    batch = dict(batch_idx=torch.tensor([0.0, 0.0, 1.0]), cls=torch.cat(labels).float()[:, None],
                 bboxes=torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1) / 64,
                 resized_shape=[(64, 64)] * 2)
    ref_total, ref_parts = v10DetectLoss(ref_f)(ref_f(x), batch)
    ours_losses = ours_f.loss(ours_f(x), [dict(boxes=b, labels=lb) for b, lb in zip(boxes, labels)], (64, 64))
    ours_parts = torch.stack([ours_losses[f"{br}_{k}"] for br in ("o2m", "o2o") for k in ("box", "cls", "dfl")])
    torch.testing.assert_close(ours_parts, ref_parts.float(), rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(ours_losses["loss"], ref_total.float(), rtol=2e-4, atol=1e-5)


def test_deploy_form_and_postprocess_equal_reference(pair):
    """Our deploy form (one-to-one only, every BN folded, RepVGGDW merged) against the package's own export path
    (``v10postprocess``); the package cannot fuse DocLayout-YOLO (``fuse()`` deletes the BN that GL-CRM's shared
    dilated conv reads), which is why its predictor runs unfused."""
    from zoo.deploy import reparameterize
    from zoo.vision.yolov10 import YOLOv10Postprocess

    ref, ours, _ = pair
    ref_f = copy.deepcopy(ref).half().float()
    with pytest.raises(AttributeError):  # documents the reference's limitation (see MODEL_CARD.md)
        copy.deepcopy(ref_f).fuse(verbose=False)(torch.rand(1, 3, 64, 64))
    dep = reparameterize(copy.deepcopy(ours).float())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in dep.modules()) and dep.head.one2many is None
    ref_f.model[-1].export, ref_f.model[-1].format = True, "onnx"
    ref_f.model[-1].max_det = 50  # the reference's topk fails when max_det exceeds the anchors (84 at 64 px); ours caps it
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        r = ref_f(x)  # (B, 50, 6): xyxy, score, label
        b, s, lab = YOLOv10Postprocess(dep, max_det=50)(x)
    k = b.shape[1]
    torch.testing.assert_close(b, r[:, :k, :4], rtol=1e-4, atol=2e-3)
    torch.testing.assert_close(s, r[:, :k, 4], rtol=1e-4, atol=1e-5)
    assert torch.equal(lab.float(), r[:, :k, 5])


def test_yolov10n_fused_equals_reference_fused():
    """Plain YOLOv10 (C2f, C2fCIB with RepVGGDW, PSA): our deploy form against the package's fused model, with the
    wheel's reg_max=1 head (distances predicted directly)."""
    from zoo.checkpoints import clean_state_dict
    from zoo.vision.yolov10 import checkpoint_filter_fn

    ref = _reference("yolov10n.yaml", 1)
    ours = zoo.create_model("yolov10n", num_classes=NC, scale=tuple(TINY_SCALE), reg_max=1)
    sd = checkpoint_filter_fn(clean_state_dict(ref.state_dict()), ours)
    ours.load_state_dict(sd)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    ours = zoo.deploy.reparameterize(ours)
    ref.fuse(verbose=False)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        r = ref(x)["one2one"][0].transpose(1, 2)
        boxes, scores = ours.decode(*ours(x), (64, 64))
    xy, wh = r[..., :2], r[..., 2:4]
    torch.testing.assert_close(boxes, torch.cat((xy - wh / 2, xy + wh / 2), -1), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(scores, r[..., 4:], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- safe loading


class _Payload:
    """Unpickling this would run ``exec`` (creating the marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@contextlib.contextmanager
def _fake_modules(classes: dict[str, type]):
    """Make ``classes`` picklable under the reference's module paths without importing the reference."""
    saved = {}
    try:
        for qual, cls in classes.items():
            mod, name = qual.rsplit(".", 1)
            saved.setdefault(mod, sys.modules.get(mod))
            m = types.ModuleType(mod)
            setattr(m, name, cls)
            sys.modules[mod] = m
            cls.__module__, cls.__qualname__ = mod, name
        yield
    finally:
        for mod, old in saved.items():
            if old is None:
                sys.modules.pop(mod, None)
            else:
                sys.modules[mod] = old


def test_pickled_model_with_payload_gives_tensors_and_runs_nothing(tmp_path):
    from zoo.checkpoints import UnsafeCheckpointError, load_file, load_pickled_module_tensors

    class G2L_CRM(nn.Module):  # noqa: N801
        def __init__(self):
            super().__init__()
            self.cv1 = nn.Conv2d(3, 4, 1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.hook = _Payload(tmp_path / "ran_attr")  # a payload inside the module's own state

    class YOLOv10DetectionModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Sequential(G2L_CRM())

    marker = tmp_path / "ran_top"
    with _fake_modules({"doclayout_yolo.nn.modules.g2l_crm.G2L_CRM": G2L_CRM,
                        "doclayout_yolo.nn.tasks.YOLOv10DetectionModel": YOLOv10DetectionModel}):
        net = YOLOv10DetectionModel()
        with torch.no_grad():
            net.model[0].bn.running_mean.normal_()
        path = tmp_path / "evil.pt"
        torch.save({"model": net, "payload": _Payload(marker), "ema": None}, path)
    raw = path.read_bytes()
    assert b"exec" in raw or b"builtins" in raw  # the payload is really in the file

    got = load_pickled_module_tensors(path)
    assert not marker.exists() and not (tmp_path / "ran_attr").exists()
    want = net.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    # load_file recognises a pickled ultralytics/doclayout_yolo model and takes the same safe path
    assert set(load_file(path)) == set(want) and not marker.exists()
    # any other pickle that would run code is still refused
    other = tmp_path / "other.pt"
    torch.save({"w": torch.zeros(2), "payload": _Payload(marker)}, other)
    with pytest.raises(UnsafeCheckpointError):
        load_file(other)
    assert not marker.exists()


def test_convert_checkpoint_writes_safetensors_without_the_package(pair, tmp_path):
    """The real pickled reference model, converted in a fresh process: doclayout_yolo / ultralytics never imported."""
    import subprocess

    from safetensors.torch import load_file as st_load

    _, ours, path = pair
    out = tmp_path / "converted.safetensors"
    code = ("import sys; from zoo.vision.doclayout_yolo import convert_checkpoint; "
            f"convert_checkpoint({str(path)!r}, {str(out)!r}); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('doclayout_yolo', 'ultralytics')]; "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    disk = st_load(str(out))
    want = ours.state_dict()
    assert set(disk) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(disk[k], v.float() if v.is_floating_point() else v, msg=k)
    assert not list(tmp_path.glob(".*.part"))
