"""DocLayout-YOLO (arXiv 2410.12628): YOLOv10-m with the Global-to-Local Controllable Receptive Module (GL-CRM).

Three backbone stages of YOLOv10-m are replaced by ``G2L_CRM`` (``yolov10m-doclayout.yaml`` of
``opendatalab/DocLayout-YOLO``): P3 with dilated blocks (kernel 5, dilations 1, 2, 3), P4 (kernel 3, dilations
1, 3, 5), P5 with plain CIB blocks; four blocks each. Neck, head, assignment, loss and post-processing are YOLOv10's
(:mod:`zoo.vision.yolov10`, whose public blocks this file builds on).

GL-CRM details that matter for weight compatibility (``g2l_crm.py``):

- :class:`DilatedBlock` runs **one** kxk conv weight and **one** BatchNorm at every dilation rate, then the **shared**
  1x1 ``cv2``; with ``fuse="glu"`` the branch-major concatenation (3c channels) is gated by
  ``sigmoid(SiLU(BN(depthwise 1x1)))`` and reduced by a 1x1 conv with ``groups=c`` (each group mixes three
  *consecutive* channels of the concatenation); a residual adds the input;
- :class:`DilatedBottleneck`: Conv3x3 -> DilatedBlock -> Conv3x3, plus a second residual.

Released weights (Hugging Face ``juliozhao/DocLayout-YOLO-*``) are pickled ultralytics model objects; they are read
without running any pickled code (:func:`zoo.checkpoints.load_pickled_module_tensors`) and renamed by
:func:`checkpoint_filter_fn`; :func:`convert_checkpoint` writes a safetensors file in our layout.
"""
import os
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.contract import SmallCfg
from zoo.registry import CheckpointSource, ModelCfg, register_model
from zoo.vision.yolov10 import CIB, SCALES, Conv, YOLOv10, YOLOv10Backbone, checkpoint_filter_fn, register_block


class DilatedBlock(nn.Module):
    """The controllable receptive module: one shared kxk conv + BN + SiLU at each dilation, the shared 1x1 ``cv2``,
    GLU-gated (or summed) fusion back to ``c`` channels, residual.

    Deploy form: the shared BatchNorm folds into the shared kernel (``dcv.conv`` gets a bias), the other Convs fold
    as usual; the dilation branches stay (their receptive fields differ).
    """

    def __init__(self, c: int, dilation: Sequence[int] = (1, 2, 3), k: int = 3, fuse: str = "sum", shortcut: bool = True):
        super().__init__()
        if fuse not in ("glu", "sum"):
            raise ValueError(f"DilatedBlock fuse must be 'glu' or 'sum', got {fuse!r}")
        if not dilation:
            raise ValueError("DilatedBlock needs at least one dilation rate")
        self.dilation: List[int] = [int(d) for d in dilation]
        self.k = k
        self.cv2 = Conv(c, c, 1)
        self.add = shortcut
        self.glu = fuse == "glu"
        nd = len(self.dilation)
        if self.glu:
            self.conv_gating = Conv(c * nd, c * nd, 1, g=c * nd)
            self.conv1x1 = Conv(c * nd, c, 1, g=c)
        else:
            self.conv_gating = None
            self.conv1x1 = Conv(c, c, 1, g=c)
        self.dcv = Conv(c, c, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dcv = self.dcv
        branches: List[torch.Tensor] = []
        for d in self.dilation:
            y = F.conv2d(x, dcv.conv.weight, dcv.conv.bias, 1, d * (self.k // 2), d)
            branches.append(self.cv2(dcv.act(dcv.norm(y))))
        if self.conv_gating is not None:
            dx = torch.cat(branches, 1)
            dx = self.conv1x1(dx * torch.sigmoid(self.conv_gating(dx)))
        else:
            dx = branches[0]
            for t in branches[1:]:
                dx = dx + t
            dx = self.conv1x1(dx)
        return x + dx if self.add else dx


class DilatedBottleneck(nn.Module):
    """Conv3x3 -> :class:`DilatedBlock` -> Conv3x3, residual when ``shortcut`` and c1 == c2."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, dilation: Sequence[int] = (1, 2, 3), block_k: int = 3,
                 fuse: str = "sum", e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 3)
        self.cv2 = Conv(c_, c2, 3)
        self.dilated_block = DilatedBlock(c_, dilation, block_k, fuse)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.dilated_block(self.cv1(x)))
        return x + y if self.add else y


class G2L_CRM(nn.Module):  # noqa: N801 - the reference's name
    """C2f-style CSP whose chained blocks are :class:`DilatedBottleneck` (``use_dilated``) or YOLOv10 ``CIB``."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, use_dilated: bool = False,
                 dilation: Sequence[int] = (1, 2, 3), block_k: int = 3, fuse: str = "sum", e: float = 0.5):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        if use_dilated:
            blocks = [DilatedBottleneck(self.c, self.c, shortcut, dilation, block_k, fuse, e=1.0) for _ in range(n)]
        else:
            blocks = [CIB(self.c, self.c, shortcut, e=1.0) for _ in range(n)]
        self.m = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).chunk(2, 1)  # unpacked, not list(): FX cannot iterate a proxy
        y = [a, b]
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


register_block("g2l_crm", lambda c1, c2, n, **kw: G2L_CRM(c1, c2, n, **kw))

# yolov10m-doclayout.yaml: layers 4, 6, 8 (repeats 6 -> 4 at depth 0.67)
DOCLAYOUT_BACKBONE = (
    SCALES["m"]["backbone"][0],
    ("g2l_crm", dict(shortcut=True, use_dilated=True, dilation=(1, 2, 3), block_k=5, fuse="glu")),
    ("g2l_crm", dict(shortcut=True, use_dilated=True, dilation=(1, 3, 5), block_k=3, fuse="glu")),
    ("g2l_crm", dict(shortcut=True, use_dilated=False)),
)
DOCLAYOUT_REPEATS = (3, 6, 6, 6)

# Label names of the released heads. DocStructBench: the 10 classes of the general model (order of its `names`).
DOCSTRUCTBENCH_LABELS = ("title", "plain text", "abandon", "figure", "figure_caption", "table", "table_caption",
                         "table_footnote", "isolate_formula", "formula_caption")
DOCLAYNET_LABELS = ("Caption", "Footnote", "Formula", "List-item", "Page-footer", "Page-header", "Picture",
                    "Section-header", "Table", "Text", "Title")


class DocLayoutYOLO(YOLOv10):
    """YOLOv10-m with GL-CRM backbone stages (``num_classes`` 10 = DocStructBench by default).

    Accepts every :class:`~zoo.vision.yolov10.YOLOv10` argument; ``label_names`` names the classes (defaults to the
    DocStructBench names for a 10-class head, the DocLayNet names for 11, indices otherwise).
    """

    def __init__(self, num_classes: int = 10, label_names: Sequence[str] = None, **kwargs):
        kwargs.setdefault("variant", "m")
        kwargs.setdefault("backbone_blocks", DOCLAYOUT_BACKBONE)
        kwargs.setdefault("backbone_repeats", DOCLAYOUT_REPEATS)
        super().__init__(num_classes=num_classes, **kwargs)
        if label_names is None:
            label_names = {10: DOCSTRUCTBENCH_LABELS, 11: DOCLAYNET_LABELS}.get(num_classes,
                                                                                  [str(i) for i in range(num_classes)])
        if len(label_names) != num_classes:
            raise ValueError(f"label_names has {len(label_names)} names for {num_classes} classes")
        self.label_names = list(label_names)


def convert_checkpoint(src: str, dst: str) -> dict:
    """Convert a released DocLayout-YOLO ``.pt`` (a pickled ultralytics model) to a safetensors file in our layout,
    without executing any pickled code. Returns the converted state dict."""
    from zoo.checkpoints import load_pickled_module_tensors, save_file

    raw = load_pickled_module_tensors(src)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in checkpoint_filter_fn(raw).items()}
    save_file(sd, os.fspath(dst))
    return sd


# ------------------------------------------------------------------------------------------ registrations

_HF = "juliozhao/DocLayout-YOLO-"
_COMMON = dict(
    task="object-detection", family="doclayout_yolo", paper="2410.12628", license="apache-2.0", pool_size=None,
    crop_pct=1.0, interpolation="bilinear", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    first_conv="backbone.stem.conv", classifier=None,
)


def _cfg(num_classes: int, size: int, notes: str, metrics=None, hub=None, filename=None) -> ModelCfg:
    src = CheckpointSource(hf_hub_id=_HF + hub, hf_filename=filename, layout="ultralytics_pickle") if hub else None
    return ModelCfg(num_classes=num_classes, input_size=(3, size, size), notes=notes, metrics=metrics or {}, source=src,
                    **_COMMON)


default_cfgs = {
    "doclayout_yolo_m.docstructbench": _cfg(
        10, 1024, "General model fine-tuned on DocStructBench (10 classes; data not public). Paper/third-party "
        "DocStructBench mAP not verified.", hub="DocStructBench", filename="doclayout_yolo_docstructbench_imgsz1024.pt"),
    "doclayout_yolo_m.docsynth300k_pretrain": _cfg(
        74, 1600, "Pretrained on DocSynth-300K (74 classes), 500 epochs at 1600 px.", hub="DocSynth300K-pretrain",
        filename="doclayout_yolo_docsynth300k_imgsz1600.pt"),
    "doclayout_yolo_m.d4la_from_scratch": _cfg(
        27, 1600, "D4LA (27 classes) from scratch, 1600 px.", metrics=dict(map_50=81.7, map=69.8),
        hub="D4LA-from_scratch", filename="doclayout_yolo_d4la_imgsz1600_from_scratch.pt"),
    "doclayout_yolo_m.d4la_docsynth300k": _cfg(
        27, 1600, "D4LA (27 classes) fine-tuned from the DocSynth-300K pretrain, 1600 px. The file name in the HF "
        "repo was not confirmed: pass pretrained_cfg_overlay=dict(hf_hub_filename=...) if it differs.",
        metrics=dict(map_50=82.4, map=70.3), hub="D4LA-Docsynth300K_pretrained",
        filename="doclayout_yolo_d4la_imgsz1600_docsynth_pretrain.pt"),
    "doclayout_yolo_m.doclaynet_docsynth300k": _cfg(
        11, 1120, "DocLayNet (11 classes) fine-tuned from the DocSynth-300K pretrain, 1120 px.",
        metrics=dict(map_50=93.4, map=79.7), hub="DocLayNet-Docsynth300K_pretrained",
        filename="doclayout_yolo_doclaynet_imgsz1120_docsynth_pretrain.pt"),
    "doclayout_yolo_m.doclaynet_from_scratch": _cfg(
        11, 1120, "DocLayNet (11 classes) from scratch, 1120 px. The file name in the HF repo was not confirmed: "
        "pass pretrained_cfg_overlay=dict(hf_hub_filename=...) if it differs.", metrics=dict(map_50=93.0, map=77.7),
        hub="DocLayNet-from_scratch", filename="doclayout_yolo_doclaynet_imgsz1120_from_scratch.pt"),
}


default_cfgs["doclayout_yolo_m_backbone"] = ModelCfg(
    **{**_COMMON, "task": "image-feature-extraction", "pool_size": (32, 32), "first_conv": "stem.conv",
       "classifier": "head.fc"},
    num_classes=1000, input_size=(3, 1024, 1024),
    notes="DocLayout-YOLO backbone (YOLOv10-m layers 0-10 with GL-CRM at P3, P4, P5) with a timm classifier head; "
          "the detector's weights load into the detector, not into this backbone alone.")

# tests/test_contract.py: 1/8 width, one block per stage (every GL-CRM variant kept: k5 glu, k3 glu, CIB)
small_cfgs = {"doclayout_yolo_m_backbone": SmallCfg(dict(scale=(0.33, 0.125, 1024), repeats=(1, 1, 1, 1)), img_size=64)}


@register_model
def doclayout_yolo_m(**kwargs) -> DocLayoutYOLO:
    return DocLayoutYOLO(**kwargs)


@register_model
def doclayout_yolo_m_backbone(**kwargs) -> YOLOv10Backbone:
    return YOLOv10Backbone(**{"scale": SCALES["m"]["scale"], "blocks": DOCLAYOUT_BACKBONE, "repeats": DOCLAYOUT_REPEATS,
                              **kwargs})
