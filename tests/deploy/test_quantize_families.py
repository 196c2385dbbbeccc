"""int8 by construction: every model family in the registry goes through ``zoo.deploy.quantize`` (its FAMILY_RULES
entry, or the default one), runs in onnxruntime and agrees with its fp32 ONNX model.

One case per family module of the registry (vision and spiking; the language models have their own weight-only int8
paths), at a tiny size (the family's contract ``small_cfgs`` or the overrides below), random weights, 2 calibration
batches of 4 random inputs, 4 test inputs. A family registered later without a case here fails
``test_every_registered_family_has_an_int8_case``.

Tolerance (random weights and inputs, so the figures are a floor, not the trained accuracy the benchmark
measures): per output, the mean cosine similarity of int8 vs fp32 rows (last axis) >= 0.95 and the max abs error
<= 25 % of the fp32 output's max magnitude. MobileDet's fixed-size detections after NMS (the int8 head feeds fp32
decoding / NMS, so a small score change reorders the low-score tail): valid shapes, labels and boxes, and the
best detection per image of the same class on at least 3 of 4 images with a score within 0.25 of fp32.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import zoo
from zoo.contract import small_cfg
from zoo.deploy import quantize
from zoo.deploy.quantize import ort_session, rule_for
from zoo.registry import get_entry, list_models, model_info

SKIP_TASKS = ("text-generation",)  # language models: weight-only int8 (quantize_int8_), not ONNX static int8


def _small(name: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = small_cfg(name, importlib.import_module(get_entry(name).module)).kwargs
    return zoo.create_model(name, **{**kwargs, **extra}).eval()


def _clip(part: str):
    m = _small("mobileclip2_s0", embed_dim=32, dynamic_img_size=True,
               image_args=dict(layers=[1, 1, 1, 1], embed_dims=[16, 32, 64, 128]),
               text_args=dict(width=32, heads=2, layers=1, context_length=16))
    return m.visual if part == "image" else m.text


def _mobiledet_postprocess():
    from zoo.vision.mobiledets import DetectionPostprocess

    det = _small("ssdlite_mobiledet_cpu", num_classes=3, multiplier=0.25, max_det=20).train()
    for m in det.modules():  # BN statistics from data, so scores depend on the input as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        det(torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
        # channels constant on those 8 images (dead after ReLU6) get variances ~1e-10 that amplify float noise by up
        # to 1/sqrt(eps): onnxruntime and eager differed by 7 logits on the export check's half-bright image (a floor
        # of 0.01 still failed, 0.1 passed export but left the int8 top classes to noise)
        for m in det.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.clamp_(min=1.0)
        for h in det.cls_heads:  # spread the class scores: near-ties would leave the top-k / NMS order to float noise
            h.conv_pw.weight.normal_(0, 0.3)
    return DetectionPostprocess(det.eval(), pre_nms_top_k=50).eval()


# case -> (family module, model factory, input side (None: token ids)); the detectors stand for their module (their
# backbones are inside them)
CASES = {
    "nextvit": ("nextvit", lambda: _small("nextvit_small"), 64),
    "fastvit": ("fastvit", lambda: _small("fastvit_sa12"), 64),
    "fmvit": ("fmvit", lambda: _small("fmvit_tiny"), 64),
    "pp_mobileseg": ("pp_mobileseg", lambda: _small("pp_mobileseg_tiny"), 64),
    "snn T=1": ("iir_snn", lambda: _small("snn_vgg16", timesteps=1), 16),
    "yolov10": ("yolov10", lambda: _small("yolov10n", num_classes=3, scale=(0.33, 0.125, 1024)), 64),
    "doclayout_yolo": ("doclayout_yolo", lambda: _small("doclayout_yolo_m", num_classes=3,
                                                        scale=(0.33, 0.125, 1024)), 64),
    "mobiledet + postprocess": ("mobiledets", _mobiledet_postprocess, 64),
    "mobileclip image": ("mobileclip", lambda: _clip("image"), 64),
    "mobileclip text": ("mobileclip", lambda: _clip("text"), None),
}


def _registry_families() -> set[str]:
    return {get_entry(n).module.rsplit(".", 1)[-1] for n in list_models() if model_info(n)["task"] not in SKIP_TASKS}


def test_every_registered_family_has_an_int8_case():
    missing = _registry_families() - {module for module, _, _ in CASES.values()}
    assert not missing, f"families without an int8 case (add one to CASES): {sorted(missing)}"


@pytest.fixture(scope="module")
def data():
    """Shared inputs: calibration (2 batches of 4) and test (4) per input kind, seeded."""
    from zoo.data.clip_data import digit_captions

    def images(side, chans=3):  # the same inputs for a case whatever runs before it
        g = torch.Generator().manual_seed(0)
        return torch.rand(8, chans, side, side, generator=g), torch.rand(4, chans, side, side, generator=g)

    tok = zoo.get_tokenizer("mobileclip2_s0")
    texts = [c for i in range(12) for c in (digit_captions(i % 10, i)[0],)]
    tokens = tok(texts, context_length=16)
    return {"images": images, "tokens": (tokens[:8], tokens[8:])}


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_quantizes_and_agrees_with_fp32(case, data, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"  # nothing may be written to the current directory (onnxruntime's shape-inference dumps)
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    module, build, side = CASES[case]
    model = build()
    if side is None:
        calib, test = data["tokens"]
    else:
        chans = getattr(model, "in_chans", 3)
        calib, test = data["images"](side, chans)
    res = quantize(model, [calib[:4], calib[4:]], tmp_path / "m.int8.onnx", num_batches=2, min_samples=8,
                   test_data=test, input_size=None if side is None else tuple(calib.shape[1:]),
                   fp32_path=tmp_path / "m.fp32.onnx")
    rep = res.report
    assert not list(cwd.iterdir()), f"quantize left files in the current directory: {sorted(cwd.iterdir())}"
    assert rep["family"] == rule_for(getattr(model, "detector", model))[0]
    assert rep["dequantize_nodes"] > 0 and rep["images"] == 4
    if case == "mobiledet + postprocess":  # boxes, scores, labels (-1 padded), counts after int8 head + fp32 NMS
        outs = [s.run(None, {s.get_inputs()[0].name: test.numpy()}) for s in (res.session(), ort_session(
            res.fp32_path))]
        (boxes, scores, labels, count), (_, scores32, labels32, count32) = outs
        assert boxes.shape == (4, 20, 4) and scores.shape == labels.shape == (4, 20) and count.shape == (4,)
        assert ((labels >= -1) & (labels < 3)).all() and (count <= 20).all()
        valid = labels >= 0
        assert np.isfinite(boxes).all() and (boxes[valid] >= -1).all() and (boxes[valid] <= side + 1).all()
        assert rep["fp32_tail_nodes"] > 50  # decoding, TopK and NonMaxSuppression stay fp32
        # the best detection per image: same class on at least 3 of 4 images, score within 0.25
        assert (labels[:, 0] == labels32[:, 0]).sum() >= 3 and np.abs(scores[:, 0] - scores32[:, 0]).max() <= 0.25
        return
    for i, out in enumerate(rep["outputs"]):
        assert out["cosine_mean"] >= 0.95, (case, i, out)
        assert out["max_abs_err"] <= 0.25 * out["fp32_scale"], (case, i, out)
