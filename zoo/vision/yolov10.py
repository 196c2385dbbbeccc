"""YOLOv10 (arXiv 2405.14458): the building blocks, the NMS-free dual-head detector and its training loss.

Follows the THU-MIG / ultralytics definition (the ``yolov10{n,s,m,b,l,x}.yaml`` layer lists, also shipped by
``opendatalab/DocLayout-YOLO``), so released weights map onto these modules key for key (``bn`` -> ``norm``, layer
indices -> names; :func:`official_key_map`):

- ``Conv`` = conv (no bias) + BatchNorm (eps 1e-3, momentum 0.03: ultralytics' ``initialize_weights``) + SiLU;
- ``C2f`` (CSP with chained bottlenecks), ``CIB`` / ``C2fCIB`` (compact inverted block, optionally with the 7x7
  ``RepVGGDW`` large kernel), ``SCDown`` (1x1 then stride-2 depthwise), ``SPPF``, ``PSA`` (partial self-attention);
- the v10 head: two branches of identical structure, one-to-many (``topk=10``) and one-to-one (``topk=1``), both
  trained with the TaskAlignedAssigner (alpha 0.5, beta 6) on CIoU x7.5 + BCE x0.5 + DFL x1.5; the one-to-one branch
  reads *detached* features; inference uses only the one-to-one branch and a top-k selection (no NMS).

Detector API (shared with every detector of :mod:`zoo.tasks.detection`): ``forward(images)`` returns raw, export
friendly tensors ``(o2o_box (B, A, 4*reg_max), o2o_cls (B, A, nc)[, o2m_box, o2m_cls])`` (the one-to-many pair only
in the training form), ``loss(outputs, targets, image_size)`` and ``postprocess(outputs, image_size)``.
:class:`YOLOv10Postprocess` wraps a detector for export: decoding and top-k in the graph, batch-size free, labels
computed without a ``Mod`` op (TensorRT could not parse it: DocLayout-YOLO issue 49).

Loss scale: as in ultralytics, the total is the per-batch loss **times the batch size** (their ``lr0`` / ``nbs``
settings assume it; with SGD ``lr`` 0.01 and ``accumulate_grad_batches = 64 / batch`` the update equals theirs).
"""
import copy
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead
from timm.models import checkpoint_seq
from torch import nn
from torchvision.ops import complete_box_iou_loss

from zoo.contract import SmallCfg, ZooModel
from zoo.layers import ConvNorm, fold_bn_into_conv
from zoo.registry import ModelCfg, register_model

BN_EPS, BN_MOMENTUM = 1e-3, 0.03  # ultralytics initialize_weights()


# ------------------------------------------------------------------------------------------------ blocks


class Conv(ConvNorm):
    """ultralytics ``Conv``: conv (no bias) + BatchNorm + SiLU (``act=False``: no activation); deploy form: one biased conv."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: Optional[int] = None, g: int = 1, act: bool = True,
                 deploy: bool = False):
        super().__init__(c1, c2, k, s, padding=p, groups=g, act_layer=nn.SiLU if act else None, norm_eps=BN_EPS,
                         deploy=deploy)
        if isinstance(self.norm, nn.BatchNorm2d):
            self.norm.momentum = BN_MOMENTUM


class Bottleneck(nn.Module):
    """Two kxk Convs with an optional residual (``shortcut`` and c1 == c2)."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, k: Tuple[int, int] = (3, 3), e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, k[0])
        self.cv2 = Conv(c_, c2, k[1])
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP block: ``cv1`` 1x1 -> two halves; ``n`` blocks chained on the second half; all (2+n) parts -> ``cv2`` 1x1."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, e: float = 0.5):
        super().__init__()
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(self.make_blocks(n, shortcut))

    def make_blocks(self, n: int, shortcut: bool) -> List[nn.Module]:
        return [Bottleneck(self.c, self.c, shortcut, (3, 3), e=1.0) for _ in range(n)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).chunk(2, 1)  # unpacked, not list(): FX cannot iterate a proxy
        y = [a, b]
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class RepVGGDW(nn.Module):
    """7x7 + 3x3 depthwise branches (BN, no act) summed, then SiLU; deploy form: one 7x7 depthwise conv."""

    def __init__(self, ed: int, deploy: bool = False):
        super().__init__()
        self.conv = Conv(ed, ed, 7, 1, 3, g=ed, act=False, deploy=deploy)
        self.conv1: Optional[Conv] = None if deploy else Conv(ed, ed, 3, 1, 1, g=ed, act=False)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1 is not None:
            return self.act(self.conv(x) + self.conv1(x))
        return self.act(self.conv(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.conv1 is None:
            return
        self.conv.reparameterize()
        self.conv1.reparameterize()
        # a 3x3 kernel is a 7x7 kernel with a zero border: add it into the centre
        self.conv.conv.weight.add_(F.pad(self.conv1.conv.weight, [2, 2, 2, 2]))
        self.conv.conv.bias.add_(self.conv1.conv.bias)
        self.conv1 = None


class CIB(nn.Module):
    """Compact inverted block: DW3x3 -> 1x1 (2c_) -> DW3x3 (or RepVGGDW when ``lk``) -> 1x1 -> DW3x3, residual."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, e: float = 0.5, lk: bool = False):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = nn.Sequential(
            Conv(c1, c1, 3, g=c1),
            Conv(c1, 2 * c_, 1),
            RepVGGDW(2 * c_) if lk else Conv(2 * c_, 2 * c_, 3, g=2 * c_),
            Conv(2 * c_, c2, 1),
            Conv(c2, c2, 3, g=c2),
        )
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv1(x)
        return x + y if self.add else y


class C2fCIB(C2f):
    """C2f with CIB blocks."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = False, lk: bool = False, e: float = 0.5):
        self.lk = lk
        super().__init__(c1, c2, n, shortcut, e)

    def make_blocks(self, n: int, shortcut: bool) -> List[nn.Module]:
        return [CIB(self.c, self.c, shortcut, e=1.0, lk=self.lk) for _ in range(n)]


class SCDown(nn.Module):
    """Spatial-channel decoupled downsampling: 1x1 Conv (channels), then a stride-s depthwise kxk (no act)."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 2):
        super().__init__()
        self.cv1 = Conv(c1, c2, 1)
        self.cv2 = Conv(c2, c2, k, s, g=c2, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(self.cv1(x))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained kxk max-pools concatenated (= SPP with k, 2k-1, 3k-2)."""

    def __init__(self, c1: int, c2: int, k: int = 5):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1)
        self.cv2 = Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class Attention(nn.Module):
    """Multi-head self-attention over all positions with 1x1-conv q/k/v (key dim = head_dim * attn_ratio) and a
    depthwise 3x3 positional term on v."""

    def __init__(self, dim: int, num_heads: int = 8, attn_ratio: float = 0.5):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"Attention: dim {dim} must be a positive multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.key_dim = int(self.head_dim * attn_ratio)
        self.scale = self.key_dim ** -0.5
        self.qkv = Conv(dim, dim + 2 * self.key_dim * num_heads, 1, act=False)
        self.proj = Conv(dim, dim, 1, act=False)
        self.pe = Conv(dim, dim, 3, 1, g=dim, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = h * w
        q, k, v = self.qkv(x).view(b, self.num_heads, 2 * self.key_dim + self.head_dim, n).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)
        x = (v @ attn.transpose(-2, -1)).view(b, c, h, w) + self.pe(v.reshape(b, c, h, w))
        return self.proj(x)


class PSA(nn.Module):
    """Partial self-attention: half the channels go through attention + FFN (residuals), the other half bypass."""

    def __init__(self, c1: int, c2: int, e: float = 0.5):
        super().__init__()
        if c1 != c2:
            raise ValueError(f"PSA keeps the width: c1 ({c1}) must equal c2 ({c2})")
        self.c = int(c1 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv(2 * self.c, c1, 1)
        self.attn = Attention(self.c, attn_ratio=0.5, num_heads=max(1, self.c // 64))
        self.ffn = nn.Sequential(Conv(self.c, self.c * 2, 1), Conv(self.c * 2, self.c, 1, act=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), dim=1)
        b = b + self.attn(b)
        b = b + self.ffn(b)
        return self.cv2(torch.cat((a, b), 1))


class DFL(nn.Module):
    """Distribution focal loss integral: softmax over ``reg_max`` bins, expectation via a frozen 1x1 conv holding
    0..reg_max-1 (a parameter, as the reference, so parameter counts and checkpoints match)."""

    def __init__(self, c1: int = 16):
        super().__init__()
        self.c1 = c1
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            if not self.conv.weight.is_meta:
                self.conv.weight.copy_(torch.arange(c1, dtype=torch.float32).view(1, c1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, A, 4 * c1) -> distances (B, A, 4)."""
        b, a, _ = x.shape
        p = x.view(b, a, 4, self.c1).softmax(-1)
        return (p * self.conv.weight.view(self.c1).to(p.dtype)).sum(-1)


# Stage / neck block builders by name: (c1, c2, n, **kwargs) -> module. Other families add theirs with
# :func:`register_block` (DocLayout-YOLO's GL-CRM), so a layer list is plain data.
BLOCK_TYPES: Dict[str, Callable[..., nn.Module]] = {
    "c2f": lambda c1, c2, n, shortcut=False: C2f(c1, c2, n, shortcut),
    "c2fcib": lambda c1, c2, n, shortcut=False, lk=False: C2fCIB(c1, c2, n, shortcut, lk),
}


def register_block(name: str, builder: Callable[..., nn.Module]) -> None:
    """Make a CSP block type available to layer lists (``builder(c1, c2, n, **kwargs)``)."""
    BLOCK_TYPES[name] = builder


def make_block(spec: Tuple[str, Dict[str, Any]], c1: int, c2: int, n: int) -> nn.Module:
    kind, kw = spec
    if kind not in BLOCK_TYPES:
        raise ValueError(f"unknown YOLOv10 block type {kind!r}; known: {sorted(BLOCK_TYPES)}")
    return BLOCK_TYPES[kind](c1, c2, n, **kw)


# ------------------------------------------------------------------------------------------ scale table


def make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


# scale: (depth, width, max_channels), then the CSP block of backbone layers 2, 4, 6, 8 and neck layers 13, 16, 19, 22
# (the yaml's layer indices), each (type, kwargs). Repeats before scaling: 3, 6, 6, 3 and 3 for every neck block.
_C2F_T = ("c2f", dict(shortcut=True))
_C2F = ("c2f", dict(shortcut=False))
_CIB_T = ("c2fcib", dict(shortcut=True))
_CIB_LK = ("c2fcib", dict(shortcut=True, lk=True))
SCALES: Dict[str, Dict[str, Any]] = {
    "n": dict(scale=(0.33, 0.25, 1024), backbone=(_C2F_T, _C2F_T, _C2F_T, _C2F_T), neck=(_C2F, _C2F, _C2F, _CIB_LK)),
    "s": dict(scale=(0.33, 0.50, 1024), backbone=(_C2F_T, _C2F_T, _C2F_T, _CIB_LK), neck=(_C2F, _C2F, _C2F, _CIB_LK)),
    "m": dict(scale=(0.67, 0.75, 768), backbone=(_C2F_T, _C2F_T, _C2F_T, _CIB_T), neck=(_C2F, _C2F, _CIB_T, _CIB_T)),
    "b": dict(scale=(0.67, 1.00, 512), backbone=(_C2F_T, _C2F_T, _C2F_T, _CIB_T), neck=(_CIB_T, _C2F, _CIB_T, _CIB_T)),
    "l": dict(scale=(1.00, 1.00, 512), backbone=(_C2F_T, _C2F_T, _C2F_T, _CIB_T), neck=(_CIB_T, _C2F, _CIB_T, _CIB_T)),
    "x": dict(scale=(1.00, 1.25, 512), backbone=(_C2F_T, _C2F_T, _CIB_T, _CIB_T), neck=(_CIB_T, _C2F, _CIB_T, _CIB_T)),
}
_BACKBONE_REPEATS = (3, 6, 6, 3)
_NECK_REPEATS = (3, 3, 3, 3)


class _Scaler:
    def __init__(self, depth: float, width: float, max_channels: int):
        self.depth, self.width, self.max_channels = depth, width, max_channels

    def ch(self, c: int) -> int:
        return make_divisible(min(c, self.max_channels) * self.width, 8)

    def n(self, n: int) -> int:
        return max(round(n * self.depth), 1) if n > 1 else n


# ---------------------------------------------------------------------------------------------- backbone


class YOLOv10Backbone(ZooModel):
    """YOLOv10 layers 0-10 as a timm-style backbone: ``stem`` (P1/2) and four stages ending at P2/4, P3/8, P4/16 and
    P5/32 (the last one with SPPF and PSA); a timm ``ClassifierHead`` (``num_classes=0`` inside the detector).

    Args:
        scale: ``(depth, width, max_channels)`` multipliers of the yaml.
        blocks: the CSP block of layers 2, 4, 6, 8, each ``(type, kwargs)`` (see :data:`BLOCK_TYPES`).
        repeats: their repeats before depth scaling.
    """

    def __init__(
        self,
        scale: Sequence[float] = SCALES["n"]["scale"],
        blocks: Sequence[Tuple[str, Dict[str, Any]]] = SCALES["n"]["backbone"],
        repeats: Sequence[int] = _BACKBONE_REPEATS,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ):
        super().__init__()
        s = _Scaler(*scale)
        c1, c2, c3, c4, c5 = (s.ch(c) for c in (64, 128, 256, 512, 1024))
        self.num_classes, self.in_chans = num_classes, in_chans
        self.grad_checkpointing = False
        self.stem = Conv(in_chans, c1, 3, 2)
        self.stages = nn.Sequential(
            nn.Sequential(Conv(c1, c2, 3, 2), make_block(blocks[0], c2, c2, s.n(repeats[0]))),
            nn.Sequential(Conv(c2, c3, 3, 2), make_block(blocks[1], c3, c3, s.n(repeats[1]))),
            nn.Sequential(SCDown(c3, c4, 3, 2), make_block(blocks[2], c4, c4, s.n(repeats[2]))),
            nn.Sequential(SCDown(c4, c5, 3, 2), make_block(blocks[3], c5, c5, s.n(repeats[3])), SPPF(c5, c5, 5),
                          PSA(c5, c5)),
        )
        self.feature_info = [dict(num_chs=c, reduction=r, module=f"stages.{i}")
                             for i, (c, r) in enumerate(zip((c2, c3, c4, c5), (4, 8, 16, 32)))]
        self.num_features = self.head_hidden_size = c5
        self.head = ClassifierHead(c5, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    def forward_endpoints(self, x: torch.Tensor) -> List[torch.Tensor]:
        """P3, P4, P5 (strides 8, 16, 32)."""
        x = self.stem(x)
        out: List[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:
                out.append(x)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# -------------------------------------------------------------------------------------------------- neck


class YOLOv10Neck(nn.Module):
    """PAN of layers 11-22: top-down (upsample + concat, ``td_p4`` 13, ``td_p3`` 16), bottom-up (``bu_conv3`` 17 +
    ``bu_p4`` 19, ``bu_conv4`` SCDown 20 + ``bu_p5`` 22)."""

    def __init__(self, s: _Scaler, in_chs: Sequence[int], blocks: Sequence[Tuple[str, Dict[str, Any]]],
                 repeats: Sequence[int] = _NECK_REPEATS):
        super().__init__()
        p3, p4, p5 = in_chs
        w256, w512, w1024 = s.ch(256), s.ch(512), s.ch(1024)
        self.td_p4 = make_block(blocks[0], p5 + p4, w512, s.n(repeats[0]))
        self.td_p3 = make_block(blocks[1], w512 + p3, w256, s.n(repeats[1]))
        self.bu_conv3 = Conv(w256, w256, 3, 2)
        self.bu_p4 = make_block(blocks[2], w256 + w512, w512, s.n(repeats[2]))
        self.bu_conv4 = SCDown(w512, w512, 3, 2)
        self.bu_p5 = make_block(blocks[3], w512 + p5, w1024, s.n(repeats[3]))
        self.out_chs = (w256, w512, w1024)

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        p3, p4, p5 = feats[0], feats[1], feats[2]
        t4 = self.td_p4(torch.cat([F.interpolate(p5, scale_factor=2.0, mode="nearest"), p4], 1))
        n3 = self.td_p3(torch.cat([F.interpolate(t4, scale_factor=2.0, mode="nearest"), p3], 1))
        n4 = self.bu_p4(torch.cat([self.bu_conv3(n3), t4], 1))
        n5 = self.bu_p5(torch.cat([self.bu_conv4(n4), p5], 1))
        return [n3, n4, n5]


# -------------------------------------------------------------------------------------------------- head


class HeadBranch(nn.Module):
    """One branch of the v10 head: per level a box tower (Conv3x3, Conv3x3, 1x1 -> 4*reg_max) and a class tower
    ([DW3x3, 1x1], [DW3x3, 1x1], 1x1 -> nc)."""

    def __init__(self, num_classes: int, chs: Sequence[int], reg_max: int = 16):
        super().__init__()
        c2 = max(16, chs[0] // 4, reg_max * 4)
        c3 = max(chs[0], min(num_classes, 100))
        self.box = nn.ModuleList(
            nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1)) for c in chs)
        self.cls = nn.ModuleList(
            nn.Sequential(nn.Sequential(Conv(c, c, 3, g=c), Conv(c, c3, 1)),
                          nn.Sequential(Conv(c3, c3, 3, g=c3), Conv(c3, c3, 1)),
                          nn.Conv2d(c3, num_classes, 1)) for c in chs)

    def forward(self, feats: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Level-concatenated ``(box (B, A, 4*reg_max), cls (B, A, nc))``, anchors ordered (level, y, x)."""
        boxes: List[torch.Tensor] = []
        clss: List[torch.Tensor] = []
        for i, (bt, ct) in enumerate(zip(self.box, self.cls)):
            f = feats[i]
            boxes.append(bt(f).flatten(2))
            clss.append(ct(f).flatten(2))
        return torch.cat(boxes, 2).transpose(1, 2), torch.cat(clss, 2).transpose(1, 2)

    @torch.no_grad()
    def init_bias(self, strides: Sequence[int], num_classes: int) -> None:
        # ultralytics Detect.bias_init: box 1.0, class log(5 / nc / (640 / s)^2) (0.01 objects per 640 image)
        for bt, ct, s in zip(self.box, self.cls, strides):
            if bt[-1].bias.is_meta:
                continue
            bt[-1].bias.fill_(1.0)
            ct[-1].bias.fill_(math.log(5 / num_classes / (640 / s) ** 2))


class V10DetectHead(nn.Module):
    """The dual head: ``one2one`` (deep copy of ``one2many`` at initialisation, as the reference) reads detached
    features; ``one2many`` is ``None`` in the deploy form."""

    def __init__(self, num_classes: int, chs: Sequence[int], reg_max: int = 16, strides: Sequence[int] = (8, 16, 32),
                 dual: bool = True):
        super().__init__()
        self.num_classes, self.reg_max = num_classes, reg_max
        branch = HeadBranch(num_classes, chs, reg_max)
        branch.init_bias(strides, num_classes)
        self.one2one = copy.deepcopy(branch)
        self.one2many: Optional[HeadBranch] = branch if dual else None
        # reg_max 1 (the doclayout-yolo 0.0.4 wheel's Detect default): the box tower predicts distances directly
        self.dfl: Optional[DFL] = DFL(reg_max) if reg_max > 1 else None

    def distances(self, box: torch.Tensor) -> torch.Tensor:
        """Box-tower output (B, A, 4*reg_max) -> (l, t, r, b) distances (B, A, 4) in grid units."""
        if self.dfl is not None:
            return self.dfl(box)
        return box

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        o2o_box, o2o_cls = self.one2one([f.detach() for f in feats])
        if self.one2many is not None:
            o2m_box, o2m_cls = self.one2many(feats)
            return [o2o_box, o2o_cls, o2m_box, o2m_cls]
        return [o2o_box, o2o_cls]


# ------------------------------------------------------------------------------------------- box helpers


def make_anchors(feature_shapes: Sequence[Tuple[int, int]], strides: Sequence[int], device=None,
                 dtype: torch.dtype = torch.float32, offset: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Anchor centres in grid units (A, 2) (x, y) and their strides (A, 1), ordered (level, y, x)."""
    points, stride_t = [], []
    for (h, w), s in zip(feature_shapes, strides):
        sy, sx = torch.meshgrid(torch.arange(h, device=device, dtype=dtype) + offset,
                                torch.arange(w, device=device, dtype=dtype) + offset, indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_t.append(torch.full((h * w, 1), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(stride_t)


def dist2bbox(dist: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(left, top, right, bottom) distances -> xyxy boxes (last dim)."""
    lt, rb = dist.split(2, -1)
    return torch.cat((points - lt, points + rb), -1)


def bbox2dist(points: torch.Tensor, boxes: torch.Tensor, reg_max: int) -> torch.Tensor:
    """xyxy boxes -> (l, t, r, b) distances clamped to [0, reg_max - 1 - 0.01] (the DFL target range)."""
    x1y1, x2y2 = boxes.chunk(2, -1)
    return torch.cat((points - x1y1, x2y2 - points), -1).clamp(0, reg_max - 1 - 0.01)


def ciou(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Elementwise complete IoU of xyxy boxes (torchvision's CIoU loss, eps 1e-7, as 1 - loss)."""
    return 1.0 - complete_box_iou_loss(b1, b2, reduction="none", eps=1e-7)


# ------------------------------------------------------------------------------------------- assignment


class TaskAlignedAssigner:
    """TOOD's task-aligned assignment as ultralytics runs it for YOLOv8/v10.

    Metric ``t = s^alpha * CIoU^beta`` (s: the predicted score of the gt class, CIoU clamped at 0) over anchors whose
    centre lies inside the gt box; the ``topk`` anchors per gt are candidates; an anchor claimed by several gts goes
    to the one of highest CIoU. Targets: the gt box, and a one-hot class score scaled by ``t / max t * max CIoU``
    per gt.
    """

    def __init__(self, topk: int = 10, num_classes: int = 80, alpha: float = 0.5, beta: float = 6.0, eps: float = 1e-9):
        self.topk, self.num_classes, self.alpha, self.beta, self.eps = topk, num_classes, alpha, beta, eps

    @torch.no_grad()
    def __call__(self, pd_scores: torch.Tensor, pd_boxes: torch.Tensor, anc_points: torch.Tensor,
                 gt_labels: torch.Tensor, gt_boxes: torch.Tensor, mask_gt: torch.Tensor):
        """pd_scores (B, A, C) probabilities, pd_boxes (B, A, 4) xyxy pixels, anc_points (A, 2) pixels, gt_labels
        (B, M) long, gt_boxes (B, M, 4), mask_gt (B, M) bool. Returns target boxes (B, A, 4), target scores (B, A, C)
        and the foreground mask (B, A)."""
        b, a, c = pd_scores.shape
        m = gt_boxes.shape[1]
        if m == 0:
            return torch.zeros_like(pd_boxes), torch.zeros_like(pd_scores), torch.zeros(b, a, dtype=torch.bool,
                                                                                        device=pd_scores.device)
        # anchor centre strictly inside the gt box
        lt = anc_points[None, None] - gt_boxes[:, :, None, :2]
        rb = gt_boxes[:, :, None, 2:] - anc_points[None, None]
        in_gts = torch.cat((lt, rb), -1).amin(-1) > self.eps  # (B, M, A)
        cand = in_gts & mask_gt[:, :, None]
        overlaps = torch.zeros(b, m, a, dtype=pd_boxes.dtype, device=pd_boxes.device)
        scores = torch.zeros_like(overlaps)
        bi, gi, ai = cand.nonzero(as_tuple=True)
        if bi.numel():
            overlaps[bi, gi, ai] = ciou(gt_boxes[bi, gi], pd_boxes[bi, ai]).clamp(min=0).to(overlaps.dtype)
            scores[bi, gi, ai] = pd_scores[bi, ai, gt_labels[bi, gi]].to(scores.dtype)
        align = scores.pow(self.alpha) * overlaps.pow(self.beta)
        # top-k anchors per gt (padding gts pick nothing); an index picked twice (all-zero metrics) does not count
        k = min(self.topk, a)
        topk_idx = align.topk(k, dim=-1).indices
        topk_idx = topk_idx.masked_fill(~mask_gt[:, :, None], 0)
        count = torch.zeros(b, m, a, dtype=torch.int8, device=align.device)
        count.scatter_add_(-1, topk_idx, torch.ones_like(topk_idx, dtype=torch.int8))
        mask_pos = ((count == 1) & cand).to(align.dtype)
        # an anchor assigned to several gts keeps the one it overlaps most
        fg = mask_pos.sum(1)  # (B, A)
        if bool((fg > 1).any()):
            best = F.one_hot(overlaps.argmax(1), m).permute(0, 2, 1).to(mask_pos.dtype)
            mask_pos = torch.where((fg > 1)[:, None, :], best, mask_pos)
            fg = mask_pos.sum(1)
        gt_idx = mask_pos.argmax(1)  # (B, A)
        fg_mask = fg > 0
        batch = torch.arange(b, device=gt_idx.device)[:, None]
        t_labels = gt_labels[batch, gt_idx].clamp(min=0)
        t_boxes = gt_boxes[batch, gt_idx]
        t_scores = F.one_hot(t_labels, c).to(pd_scores.dtype) * fg_mask[..., None]
        align = align * mask_pos
        norm = (align * (overlaps * mask_pos).amax(-1, keepdim=True) / (align.amax(-1, keepdim=True) + self.eps))
        t_scores = t_scores * norm.amax(1)[..., None]
        return t_boxes, t_scores, fg_mask


# ---------------------------------------------------------------------------------------------- detector


def _check_targets(targets: List[dict], num_classes: int, batch: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    if len(targets) != batch:
        raise ValueError(f"loss: {len(targets)} targets for a batch of {batch} images")
    out = []
    for i, t in enumerate(targets):
        if "boxes" not in t or "labels" not in t:
            raise ValueError(f"target {i}: needs 'boxes' (n, 4) xyxy pixels and 'labels' (n,), got keys {sorted(t)}")
        boxes, labels = torch.as_tensor(t["boxes"]), torch.as_tensor(t["labels"])
        if boxes.numel() == 0:
            out.append((boxes.reshape(0, 4).float(), labels.reshape(0).long()))
            continue
        if boxes.ndim != 2 or boxes.shape[1] != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"target {i}: boxes must be (n, 4) and labels (n,), got {tuple(boxes.shape)} and "
                             f"{tuple(labels.shape)}")
        if labels.is_floating_point():
            raise ValueError(f"target {i}: labels must be integers, got {labels.dtype}")
        bad = (labels < 0) | (labels >= num_classes)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise ValueError(f"target {i}: label {int(labels[j])} (box {j}) is outside [0, {num_classes}); set "
                             f"num_classes to at least {int(labels.max()) + 1} or fix the class mapping")
        if not bool(torch.isfinite(boxes).all()):
            raise ValueError(f"target {i}: boxes contain NaN or inf")
        if bool(((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any()):
            raise ValueError(f"target {i}: a box has x2 <= x1 or y2 <= y1 (boxes are xyxy pixels); drop such boxes")
        out.append((boxes.float(), labels.long()))
    return out


class YOLOv10(nn.Module):
    """YOLOv10 detector: :class:`YOLOv10Backbone`, :class:`YOLOv10Neck`, :class:`V10DetectHead`.

    Args:
        variant: ``n``, ``s``, ``m``, ``b``, ``l`` or ``x`` (the scale table :data:`SCALES`).
        num_classes: foreground classes (80 for COCO).
        scale / backbone_blocks / neck_blocks / backbone_repeats / neck_repeats: override the variant's layer list.
        reg_max: DFL bins (16, the YOLOv10 / DocLayout-YOLO GitHub code); 1 predicts distances directly (no DFL, as
            the ``doclayout-yolo`` 0.0.4 wheel builds its yaml models).
        dual_head: keep the one-to-many branch (training form); ``False`` (and ``deploy=True``) has only one-to-one.
        deploy: inference form: one-to-one branch only, every Conv+BN folded, RepVGGDW merged.
        max_det / score_thresh: post-processing (reference: 300 detections; conf 0.001 for validation).
        box_gain / cls_gain / dfl_gain, tal_topk / tal_topk_one2one / tal_alpha / tal_beta: loss settings.
    """

    strides = (8, 16, 32)

    def __init__(
        self,
        variant: str = "n",
        num_classes: int = 80,
        in_chans: int = 3,
        scale: Optional[Sequence[float]] = None,
        backbone_blocks: Optional[Sequence[Tuple[str, Dict[str, Any]]]] = None,
        neck_blocks: Optional[Sequence[Tuple[str, Dict[str, Any]]]] = None,
        backbone_repeats: Sequence[int] = _BACKBONE_REPEATS,
        neck_repeats: Sequence[int] = _NECK_REPEATS,
        reg_max: int = 16,
        dual_head: bool = True,
        deploy: bool = False,
        max_det: int = 300,
        score_thresh: float = 0.001,
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        dfl_gain: float = 1.5,
        tal_topk: int = 10,
        tal_topk_one2one: int = 1,
        tal_alpha: float = 0.5,
        tal_beta: float = 6.0,
    ):
        super().__init__()
        if variant not in SCALES:
            raise ValueError(f"YOLOv10 variant {variant!r} is not known; use one of {', '.join(SCALES)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (foreground classes), got {num_classes}")
        spec = SCALES[variant]
        scale = tuple(scale if scale is not None else spec["scale"])
        s = _Scaler(*scale)
        self.variant, self.num_classes, self.in_chans, self.reg_max = variant, int(num_classes), in_chans, reg_max
        self.backbone = YOLOv10Backbone(scale, backbone_blocks or spec["backbone"], backbone_repeats, num_classes=0,
                                        in_chans=in_chans)
        chs = [self.backbone.feature_info[i]["num_chs"] for i in (1, 2, 3)]
        self.neck = YOLOv10Neck(s, chs, neck_blocks or spec["neck"], neck_repeats)
        self.head = V10DetectHead(num_classes, self.neck.out_chs, reg_max, self.strides, dual=dual_head and not deploy)
        self.max_det, self.score_thresh = max_det, score_thresh
        self.gains = (box_gain, cls_gain, dfl_gain)
        self.tal = (tal_topk, tal_topk_one2one, tal_alpha, tal_beta)
        if deploy:
            from zoo.deploy import reparameterize

            reparameterize(self, inplace=True)

    # ---------------------------------------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The three neck outputs (strides 8, 16, 32)."""
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"YOLOv10 needs an input whose height and width are multiples of 32 (the P5 stride), "
                             f"got {h}x{w}; resize or letterbox-pad the image")
        return self.neck(self.backbone.forward_endpoints(x))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Raw outputs ``[o2o_box, o2o_cls]`` (+ ``[o2m_box, o2m_cls]`` in the training form): box (B, A, 4*reg_max)
        DFL logits, cls (B, A, nc) logits; decode with :meth:`postprocess` / :meth:`decode`."""
        return self.head(self.forward_features(x))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Deploy form: drop the one-to-many branch (blocks fold themselves via zoo.deploy.reparameterize)."""
        self.head.one2many = None

    # ------------------------------------------------------------------------------------------ geometry
    def feature_shapes(self, image_size: Sequence[int]) -> List[Tuple[int, int]]:
        h, w = int(image_size[0]), int(image_size[1])
        return [(h // s, w // s) for s in self.strides]

    def decode(self, box_logits: torch.Tensor, cls_logits: torch.Tensor, image_size: Sequence[int]):
        """Boxes (B, A, 4) xyxy input pixels and class probabilities (B, A, nc)."""
        pts, st = make_anchors(self.feature_shapes(image_size), self.strides, box_logits.device, torch.float32)
        if pts.shape[0] != box_logits.shape[1]:
            raise ValueError(f"image_size {tuple(image_size)} gives {pts.shape[0]} anchors but the outputs have "
                             f"{box_logits.shape[1]}; pass the size of the input tensor")
        boxes = dist2bbox(self.head.distances(box_logits.float()), pts) * st
        return boxes, cls_logits.float().sigmoid()

    # ------------------------------------------------------------------------------------------------ loss
    def loss(self, outputs: Sequence[torch.Tensor], targets: List[dict], image_size: Sequence[int]) -> Dict[str, torch.Tensor]:
        """One-to-many (topk 10) + one-to-one (topk 1) losses, each box (CIoU) x7.5 + cls (BCE) x0.5 + DFL x1.5,
        times the batch size (ultralytics' convention). ``targets[i]``: ``boxes`` (n, 4) xyxy pixels of the input
        tensor, ``labels`` (n,) in ``[0, num_classes)``."""
        if len(outputs) != 4:
            raise ValueError("loss needs the training form's outputs (one-to-one and one-to-many branches); this "
                             "model is in deploy form (one-to-one only): build it with deploy=False to train")
        o2o_box, o2o_cls, o2m_box, o2m_cls = outputs
        b = o2o_box.shape[0]
        checked = _check_targets(targets, self.num_classes, b)
        device = o2o_box.device
        pts, st = make_anchors(self.feature_shapes(image_size), self.strides, device, torch.float32)
        if pts.shape[0] != o2o_box.shape[1]:
            raise ValueError(f"loss: image_size {tuple(image_size)} gives {pts.shape[0]} anchors but the outputs "
                             f"have {o2o_box.shape[1]}; pass the size of the input tensor")
        m = max([len(lb) for _, lb in checked] + [0])
        gt_boxes = torch.zeros(b, m, 4, device=device)
        gt_labels = torch.zeros(b, m, dtype=torch.long, device=device)
        mask_gt = torch.zeros(b, m, dtype=torch.bool, device=device)
        for i, (bx, lb) in enumerate(checked):
            n = len(lb)
            gt_boxes[i, :n] = bx.to(device)
            gt_labels[i, :n] = lb.to(device)
            mask_gt[i, :n] = True
        topk_o2m, topk_o2o, alpha, beta = self.tal
        parts_o2m = self._branch_loss(o2m_box, o2m_cls, pts, st, gt_boxes, gt_labels, mask_gt, topk_o2m, alpha, beta)
        parts_o2o = self._branch_loss(o2o_box, o2o_cls, pts, st, gt_boxes, gt_labels, mask_gt, topk_o2o, alpha, beta)
        total = (parts_o2m.sum() + parts_o2o.sum()) * b
        out = {"loss": total}
        for name, parts in (("o2m", parts_o2m), ("o2o", parts_o2o)):
            for j, k in enumerate(("box", "cls", "dfl")):
                out[f"{name}_{k}"] = parts[j].detach()
        return out

    def _branch_loss(self, box_logits, cls_logits, pts, st, gt_boxes, gt_labels, mask_gt, topk, alpha, beta):
        box_logits, cls_logits = box_logits.float(), cls_logits.float()
        dist = self.head.distances(box_logits)  # (B, A, 4) in grid units
        pred_boxes = dist2bbox(dist, pts)  # grid units
        assigner = TaskAlignedAssigner(topk, self.num_classes, alpha, beta)
        t_boxes, t_scores, fg = assigner(cls_logits.detach().sigmoid(), pred_boxes.detach() * st, pts * st,
                                         gt_labels, gt_boxes, mask_gt)
        t_sum = t_scores.sum().clamp(min=1)
        cls_loss = F.binary_cross_entropy_with_logits(cls_logits, t_scores, reduction="sum") / t_sum
        dfl_loss = box_logits.sum() * 0.0
        if bool(fg.any()):
            t_boxes = t_boxes / st  # grid units
            weight = t_scores.sum(-1)[fg]
            iou_loss = (complete_box_iou_loss(pred_boxes[fg], t_boxes[fg], reduction="none", eps=1e-7) * weight).sum() / t_sum
        else:
            iou_loss = dfl_loss
        if bool(fg.any()) and self.reg_max > 1:
            target = bbox2dist(pts, t_boxes, self.reg_max)[fg]  # (P, 4)
            logits = box_logits[fg].view(-1, self.reg_max)
            tl = target.long().clamp(max=self.reg_max - 2)
            wl = (tl + 1).float() - target
            flat_l, flat_wl = tl.view(-1), wl.view(-1)
            dfl = (F.cross_entropy(logits, flat_l, reduction="none") * flat_wl
                   + F.cross_entropy(logits, flat_l + 1, reduction="none") * (1 - flat_wl)).view(-1, 4).mean(-1)
            dfl_loss = (dfl * weight).sum() / t_sum
        g = self.gains
        return torch.stack((iou_loss * g[0], cls_loss * g[1], dfl_loss * g[2]))

    # ----------------------------------------------------------------------------------------- post-process
    def postprocess_padded(self, outputs: Sequence[torch.Tensor], image_size: Sequence[int], max_det: Optional[int] = None):
        """The reference's ``v10postprocess`` on the one-to-one branch, batched and fixed-shape: top-k anchors by their
        best class score, then top-k over (anchor, class). Returns ``boxes (B, k, 4)`` xyxy input pixels, ``scores
        (B, k)``, ``labels (B, k)`` (int64), sorted by score; no NMS, no threshold."""
        boxes, scores = self.decode(outputs[0], outputs[1], image_size)
        return v10_topk(boxes, scores, self.max_det if max_det is None else max_det)

    @torch.no_grad()
    def postprocess(self, outputs: Sequence[torch.Tensor], image_size: Sequence[int]) -> List[dict]:
        """Detections per image: ``boxes`` (k, 4) xyxy input pixels, ``scores``, ``labels`` (0-based), at most
        ``max_det``, scores above ``score_thresh``, sorted by score."""
        boxes, scores, labels = self.postprocess_padded(outputs, image_size)
        out = []
        for bx, sc, lb in zip(boxes, scores, labels):
            keep = sc > self.score_thresh
            out.append(dict(boxes=bx[keep], scores=sc[keep], labels=lb[keep]))
        return out


def v10_topk(boxes: torch.Tensor, scores: torch.Tensor, max_det: int):
    """Top-k selection of YOLOv10 (``ops.v10postprocess``) on decoded ``boxes (B, A, 4)`` and ``scores (B, A, nc)``.
    The label is ``index - (index // nc) * nc``: the same value as ``index % nc`` without an ONNX ``Mod`` node."""
    b, a, nc = scores.shape
    k = min(int(max_det), a)
    best, idx = scores.amax(-1).topk(k, dim=-1)
    boxes = torch.gather(boxes, 1, idx.unsqueeze(-1).expand(b, k, 4))
    scores = torch.gather(scores, 1, idx.unsqueeze(-1).expand(b, k, nc))
    top, flat = scores.flatten(1).topk(k, dim=-1)
    anchor = torch.div(flat, nc, rounding_mode="floor")
    labels = flat - anchor * nc
    boxes = torch.gather(boxes, 1, anchor.unsqueeze(-1).expand(b, k, 4))
    return boxes, top, labels


class YOLOv10Postprocess(nn.Module):
    """Wrap a YOLOv10 detector so ``forward(images)`` returns ``(boxes (B, k, 4) xyxy input pixels, scores (B, k),
    labels (B, k))`` with k = ``max_det`` (fewer when the image has fewer anchors): decoding and top-k in the graph,
    for ONNX / TorchScript export and batched prediction."""

    def __init__(self, detector: YOLOv10, max_det: Optional[int] = None):
        super().__init__()
        self.detector = detector
        self.max_det = int(detector.max_det if max_det is None else max_det)
        self.pretrained_cfg = getattr(detector, "pretrained_cfg", None)

    def forward(self, x: torch.Tensor):
        out = self.detector(x)
        return self.detector.postprocess_padded(out, x.shape[-2:], self.max_det)


# ------------------------------------------------------------------------------------------ key mapping

# yaml layer index -> our module path (backbone 0-10, neck 13-22, head 23)
LAYER_NAMES: Dict[int, str] = {
    0: "backbone.stem", 1: "backbone.stages.0.0", 2: "backbone.stages.0.1", 3: "backbone.stages.1.0",
    4: "backbone.stages.1.1", 5: "backbone.stages.2.0", 6: "backbone.stages.2.1", 7: "backbone.stages.3.0",
    8: "backbone.stages.3.1", 9: "backbone.stages.3.2", 10: "backbone.stages.3.3", 13: "neck.td_p4",
    16: "neck.td_p3", 17: "neck.bu_conv3", 19: "neck.bu_p4", 20: "neck.bu_conv4", 22: "neck.bu_p5",
}
_HEAD_PARTS = {"cv2": "one2many.box", "cv3": "one2many.cls", "one2one_cv2": "one2one.box",
               "one2one_cv3": "one2one.cls", "dfl": "dfl"}


def official_key_map(key: str, head_index: int = 23) -> str:
    """An ultralytics / DocLayout-YOLO key (``model.4.m.0.cv1.bn.weight``) -> ours
    (``backbone.stages.1.1.m.0.cv1.norm.weight``)."""
    parts = key.split(".")
    if parts[0] == "model" and len(parts) > 1 and parts[1].isdigit():
        parts = parts[1:]
    if not parts[0].isdigit():
        raise KeyError(f"checkpoint key {key!r} is not an ultralytics layer key (model.<index>.<...>)")
    idx = int(parts[0])
    rest = parts[1:]
    if idx == head_index:
        if not rest or rest[0] not in _HEAD_PARTS:
            raise KeyError(f"checkpoint key {key!r}: unknown detection-head part")
        prefix, rest = "head." + _HEAD_PARTS[rest[0]], rest[1:]
    elif idx in LAYER_NAMES:
        prefix = LAYER_NAMES[idx]
    else:
        raise KeyError(f"checkpoint key {key!r}: layer {idx} has no parameters in YOLOv10 (upsample / concat)")
    # the BatchNorm of every ultralytics Conv is `bn`; ours (zoo.layers.ConvNorm) is `norm`
    rest = ["norm" if p == "bn" else p for p in rest]
    return ".".join([prefix] + rest)


def _is_official_key(k: str) -> bool:
    parts = k.split(".")
    return parts[0].isdigit() or (parts[0] == "model" and len(parts) > 2 and parts[1].isdigit())


def checkpoint_filter_fn(state_dict: dict, model: Optional[nn.Module] = None) -> dict:
    """Our layout passes through; ultralytics / DocLayout-YOLO layouts (``model.<i>.*`` keys, or ``<i>.*`` once the
    ``model.`` prefix is stripped, e.g. the tensors :func:`zoo.checkpoints.load_pickled_module_tensors` extracts from
    a released ``.pt``) are renamed by :func:`official_key_map`."""
    if not any(_is_official_key(k) for k in state_dict):
        return dict(state_dict)
    return {official_key_map(k): v for k, v in state_dict.items()}


# ------------------------------------------------------------------------------------------ registrations

_YOLOV10_METRICS = {  # README of THU-MIG/yolov10: COCO val2017 AP (640 px)
    "n": dict(map=38.5), "s": dict(map=46.3), "m": dict(map=51.1), "b": dict(map=52.5), "l": dict(map=53.2),
    "x": dict(map=54.4),
}


def _det_cfg(variant: str) -> ModelCfg:
    return ModelCfg(
        task="object-detection", family="yolov10", paper="2405.14458", license="agpl-3.0", num_classes=80,
        input_size=(3, 640, 640), pool_size=None, crop_pct=1.0, interpolation="bilinear", mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0), first_conv="backbone.stem.conv", classifier=None, metrics=_YOLOV10_METRICS[variant],
        notes=f"YOLOv10-{variant.upper()} (NMS-free dual assignment); inputs in [0, 1], sides multiples of 32. COCO "
              f"weights are AGPL-3.0 (THU-MIG); no released tag is wired here.",
    )


def _backbone_cfg(variant: str) -> ModelCfg:
    return ModelCfg(
        task="image-feature-extraction", family="yolov10", paper="2405.14458", license="agpl-3.0", num_classes=1000,
        input_size=(3, 640, 640), pool_size=(20, 20), crop_pct=1.0, interpolation="bilinear", mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0), first_conv="stem.conv", classifier="head.fc",
        notes=f"YOLOv10-{variant.upper()} backbone (layers 0-10: P2..P5 via features_only, SPPF + PSA at P5) with a "
              f"timm classifier head; no ImageNet weights exist.",
    )


default_cfgs = {
    **{f"yolov10{v}": _det_cfg(v) for v in SCALES},
    **{f"yolov10{v}_backbone": _backbone_cfg(v) for v in SCALES},
}

# tests/test_contract.py: 1/8 width, one block per CSP, and the same block list for every scale (C2f, C2fCIB, CIB
# with the RepVGGDW large kernel: every block type), so the six backbones share one code path
small_cfgs = {
    "yolov10*_backbone": SmallCfg(dict(scale=(0.33, 0.125, 1024), repeats=(1, 1, 1, 1),
                                       blocks=(_C2F_T, _C2F_T, _CIB_T, _CIB_LK)), img_size=64),
}


@register_model
def yolov10n(**kwargs) -> YOLOv10:
    return YOLOv10(**{"variant": "n", **kwargs})


@register_model
def yolov10s(**kwargs) -> YOLOv10:
    return YOLOv10(**{"variant": "s", **kwargs})


@register_model
def yolov10m(**kwargs) -> YOLOv10:
    return YOLOv10(**{"variant": "m", **kwargs})


@register_model
def yolov10b(**kwargs) -> YOLOv10:
    return YOLOv10(**{"variant": "b", **kwargs})


@register_model
def yolov10l(**kwargs) -> YOLOv10:
    return YOLOv10(**{"variant": "l", **kwargs})


@register_model
def yolov10x(**kwargs) -> YOLOv10:
    return YOLOv10(**{"variant": "x", **kwargs})


def _backbone(variant: str, **kwargs) -> YOLOv10Backbone:
    spec = SCALES[variant]
    return YOLOv10Backbone(**{"scale": spec["scale"], "blocks": spec["backbone"], **kwargs})


@register_model
def yolov10n_backbone(**kwargs) -> YOLOv10Backbone:
    return _backbone("n", **kwargs)


@register_model
def yolov10s_backbone(**kwargs) -> YOLOv10Backbone:
    return _backbone("s", **kwargs)


@register_model
def yolov10m_backbone(**kwargs) -> YOLOv10Backbone:
    return _backbone("m", **kwargs)


@register_model
def yolov10b_backbone(**kwargs) -> YOLOv10Backbone:
    return _backbone("b", **kwargs)


@register_model
def yolov10l_backbone(**kwargs) -> YOLOv10Backbone:
    return _backbone("l", **kwargs)


@register_model
def yolov10x_backbone(**kwargs) -> YOLOv10Backbone:
    return _backbone("x", **kwargs)
