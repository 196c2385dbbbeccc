"""MobileDets (arXiv 2004.14525) backbones and the SSDLite detectors built on them.

MobileDets are NAS-searched detection backbones that mix inverted bottlenecks (IBN) with "fused" IBN (a full kxk
conv instead of 1x1 expand + depthwise) and Tucker (compressed) convolutions, one variant per accelerator: CPU,
EdgeTPU, DSP and GPU. The reference is TensorFlow only: the TF1 Object Detection API
(``research/object_detection/models/ssd_mobiledet_feature_extractor.py``, the SSDLite heads in
``feature_map_generators.py`` / ``convolutional_box_predictor``, the anchors of ``multiple_grid_anchor_generator.py``)
and the ``ssdlite_mobiledet_*_320x320_coco_sync_4x4.config`` files. Everything here follows those semantics:

- channel rounding ``scale_filters`` (round half up to a multiple of 8, minimum 8); IBN expansion width ``cin * e``
  without rounding; Tucker ranks rounded with ``scale_filters``;
- CPU: hard-swish everywhere and squeeze-excite (biased 1x1 convs, block activation, true sigmoid) in every IBN;
  EdgeTPU / DSP / GPU: ReLU6, no SE;
- backbone BatchNorm eps 0.01 / decay 0.99, head BatchNorm eps 0.001 / decay 0.97 (PyTorch momentum = 1 - decay);
- input range [-1, 1] (``mean = std = 0.5`` on [0, 1] pixels).

Convolutions pad symmetrically by default (``pad_type=""``); ``pad_type="same"`` reproduces TF's SAME padding
(asymmetric on stride-2 layers), which converted TF weights need for bit-faithful outputs.

Detector API (shared with every detector of :mod:`zoo.tasks.detection`):
``forward(images) -> (cls_logits (B, N, num_classes + 1), box_deltas (B, N, 4))`` (raw, export friendly),
``loss(outputs, targets, image_size) -> dict``, ``postprocess(outputs, image_size) -> list[dict]``;
:class:`DetectionPostprocess` wraps a detector for export with fixed-size, padded detections.
"""
import math
from typing import Any, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, trunc_normal_
from timm.layers.padding import pad_same
from timm.layers.squeeze_excite import SEModule
from timm.models import checkpoint_seq
from torch import nn
from torchvision.ops import batched_nms, box_iou, nms, sigmoid_focal_loss

from zoo.contract import SmallCfg, ZooModel
from zoo.layers import ConvNorm
from zoo.registry import ModelCfg, register_model

# (eps, momentum) with PyTorch momentum = 1 - TF decay.
BACKBONE_BN = (0.01, 0.01)  # extract_features: epsilon 0.01, decay 0.99
HEAD_BN = (0.001, 0.03)  # config conv_hyperparams: epsilon 0.001, decay 0.97
_TRUNC = 0.87962566103423978  # std of a unit normal truncated at +-2 std


def scale_filters(filters: int, multiplier: float, base: int = 8) -> int:
    """TF's ``_scale_filters``: ``filters * multiplier`` rounded half up to a multiple of ``base``, at least ``base``."""
    return max(int(int(int(filters) * multiplier / base + 0.5) * base), base)


# ------------------------------------------------------------------------------------------------ blocks


class ConvBnAct(ConvNorm):
    """Conv (no bias) + BatchNorm + activation with TF's BN settings and optional TF SAME padding."""

    def __init__(
        self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
        act_layer: type[nn.Module] | None = None, bn: tuple[float, float] = BACKBONE_BN, pad_type: str = "",
        deploy: bool = False,
    ):
        if pad_type not in ("", "same"):
            raise ValueError(f"pad_type must be '' (symmetric) or 'same' (TensorFlow SAME), got {pad_type!r}")
        self.dynamic_pad = pad_type == "same" and stride > 1
        super().__init__(
            in_chs, out_chs, kernel_size, stride, padding=0 if self.dynamic_pad else kernel_size // 2,
            groups=groups, act_layer=act_layer, norm_eps=bn[0], deploy=deploy,
        )
        if isinstance(self.norm, nn.BatchNorm2d):
            self.norm.momentum = bn[1]
        self.pad_kernel: List[int] = [kernel_size, kernel_size]  # plain lists: TorchScript-friendly pad_same args
        self.pad_stride: List[int] = [stride, stride]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_pad:
            x = pad_same(x, self.pad_kernel, self.pad_stride)
        return self.act(self.norm(self.conv(x)))  # ConvNorm's forward (no super(): TorchScript)


class InvertedBottleneck(nn.Module):
    """IBN: 1x1 expand to ``cin * e`` -> kxk depthwise (stride) -> [SE] -> 1x1 linear project [+ shortcut]."""

    def __init__(self, in_chs, out_chs, kernel_size=3, expansion=8, stride=1, residual=True, act_layer=nn.ReLU6,
                 se=False, pad_type="", deploy=False):
        super().__init__()
        if expansion <= 1:
            raise ValueError(f"IBN expansion must be > 1 (got {expansion}); use the no-expansion block instead")
        mid = int(in_chs) * expansion
        self.conv_pw = ConvBnAct(in_chs, mid, 1, act_layer=act_layer, deploy=deploy)
        self.conv_dw = ConvBnAct(mid, mid, kernel_size, stride, groups=mid, act_layer=act_layer, pad_type=pad_type,
                                 deploy=deploy)
        self.se = SEModule(mid, rd_channels=scale_filters(mid, 0.25), act_layer=act_layer) if se else nn.Identity()
        self.conv_pwl = ConvBnAct(mid, out_chs, 1, deploy=deploy)
        self.has_skip = residual
        if residual and (stride != 1 or in_chs != out_chs):
            raise ValueError(f"residual IBN needs stride 1 and in == out channels, got {in_chs}->{out_chs} s{stride}")

    def forward(self, x):
        y = self.conv_pwl(self.se(self.conv_dw(self.conv_pw(x))))
        return y + x if self.has_skip else y


class InvertedBottleneckNoExpansion(nn.Module):
    """kxk depthwise -> [SE] -> 1x1 linear project; never residual."""

    def __init__(self, in_chs, out_chs, kernel_size=3, stride=1, act_layer=nn.ReLU6, se=False, pad_type="",
                 deploy=False):
        super().__init__()
        self.conv_dw = ConvBnAct(in_chs, in_chs, kernel_size, stride, groups=in_chs, act_layer=act_layer,
                                 pad_type=pad_type, deploy=deploy)
        self.se = SEModule(in_chs, rd_channels=scale_filters(in_chs, 0.25), act_layer=act_layer) if se else nn.Identity()
        self.conv_pw = ConvBnAct(in_chs, out_chs, 1, deploy=deploy)
        self.has_skip = False

    def forward(self, x):
        return self.conv_pw(self.se(self.conv_dw(x)))


class FusedInvertedBottleneck(nn.Module):
    """Fused IBN: full kxk conv ``cin -> cin * e`` (stride) -> [SE] -> 1x1 linear project [+ shortcut]."""

    def __init__(self, in_chs, out_chs, kernel_size=3, expansion=8, stride=1, residual=True, act_layer=nn.ReLU6,
                 se=False, pad_type="", deploy=False):
        super().__init__()
        if expansion <= 1:
            raise ValueError(f"fused IBN expansion must be > 1 (got {expansion})")
        mid = int(in_chs) * expansion
        self.conv_exp = ConvBnAct(in_chs, mid, kernel_size, stride, act_layer=act_layer, pad_type=pad_type,
                                  deploy=deploy)
        self.se = SEModule(mid, rd_channels=scale_filters(mid, 0.25), act_layer=act_layer) if se else nn.Identity()
        self.conv_pwl = ConvBnAct(mid, out_chs, 1, deploy=deploy)
        self.has_skip = residual
        if residual and (stride != 1 or in_chs != out_chs):
            raise ValueError(f"residual fused IBN needs stride 1 and in == out, got {in_chs}->{out_chs} s{stride}")

    def forward(self, x):
        y = self.conv_pwl(self.se(self.conv_exp(x)))
        return y + x if self.has_skip else y


class TuckerConv(nn.Module):
    """Tucker / compressed conv: 1x1 to ``scale_filters(cin, r_in)`` -> kxk full conv to ``scale_filters(cout, r_out)``
    (stride) -> 1x1 linear to ``cout`` [+ shortcut]."""

    def __init__(self, in_chs, out_chs, kernel_size=3, in_rank_ratio=0.25, out_rank_ratio=0.25, stride=1,
                 residual=True, act_layer=nn.ReLU6, pad_type="", deploy=False):
        super().__init__()
        in_rank, out_rank = scale_filters(in_chs, in_rank_ratio), scale_filters(out_chs, out_rank_ratio)
        self.conv_in = ConvBnAct(in_chs, in_rank, 1, act_layer=act_layer, deploy=deploy)
        self.conv_mid = ConvBnAct(in_rank, out_rank, kernel_size, stride, act_layer=act_layer, pad_type=pad_type,
                                  deploy=deploy)
        self.conv_out = ConvBnAct(out_rank, out_chs, 1, deploy=deploy)
        self.has_skip = residual
        if residual and (stride != 1 or in_chs != out_chs):
            raise ValueError(f"residual Tucker conv needs stride 1 and in == out, got {in_chs}->{out_chs} s{stride}")

    def forward(self, x):
        y = self.conv_out(self.conv_mid(self.conv_in(x)))
        return y + x if self.has_skip else y


# ------------------------------------------------------------------------------------------- block lists
# One tuple per block, grouped by endpoint C1..C5 (strides 2, 4, 8, 16, 32):
#   ("ne", out, k, se)                          IBN without expansion
#   ("ibn", out, k, expansion, stride, residual)
#   ("fused", out, k, expansion, stride, residual)
#   ("tucker", out, k, in_rank_ratio, out_rank_ratio, stride, residual)
# Transcribed from ssd_mobiledet_feature_extractor.py (mobiledet_{cpu,dsp,edgetpu,gpu}_backbone); cross-checked with
# official/vision/modeling/backbones/mobiledet.py (MD_*_BLOCK_SPECS).


def _ibn(c, k=3, e=8, s=1, r=True):
    return ("ibn", c, k, e, s, r)


def _fused(c, k=3, e=8, s=1, r=True):
    return ("fused", c, k, e, s, r)


def _tucker(c, rin, rout, s=1, r=True, k=3):
    return ("tucker", c, k, rin, rout, s, r)


ARCH_SPECS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        stem=16, act="hard_swish", se=True,
        stages=[
            [("ne", 8, 3, True)],
            [_ibn(16, e=4, s=2, r=False)],
            [_ibn(32, e=8, s=2, r=False), _ibn(32, e=4), _ibn(32, e=4), _ibn(32, e=4)],
            [_ibn(72, k=5, e=8, s=2, r=False), _ibn(72, e=8), _ibn(72, k=5, e=4), _ibn(72, e=4),
             _ibn(72, e=8, r=False),  # not residual although 72 -> 72 at stride 1 (TF1 and TF2 specs agree)
             _ibn(72, e=8), _ibn(72, e=8), _ibn(72, e=8)],
            [_ibn(104, k=5, e=8, s=2, r=False), _ibn(104, k=5, e=4), _ibn(104, k=5, e=4), _ibn(104, e=4),
             _ibn(144, e=8, r=False)],
        ],
    ),
    "dsp": dict(
        stem=32, act="relu6", se=False,
        stages=[
            [("ne", 24, 3, False)],
            [_fused(32, e=4, s=2, r=False), _fused(32, e=4), _ibn(32, e=4), _tucker(32, 0.25, 0.75)],
            [_fused(64, e=8, s=2, r=False), _ibn(64, e=4), _fused(64, e=4), _fused(64, e=4)],
            [_fused(120, e=8, s=2, r=False), _ibn(120, e=4), _ibn(120, e=8), _ibn(120, e=8),
             _fused(144, e=8, r=False), _ibn(144, e=8), _ibn(144, e=8), _ibn(144, e=8)],
            [_ibn(160, e=4, s=2, r=False), _ibn(160, e=4), _fused(160, e=4), _tucker(160, 0.75, 0.75),
             _ibn(240, e=8, r=False)],
        ],
    ),
    "edgetpu": dict(
        stem=32, act="relu6", se=False,
        stages=[
            [_tucker(16, 0.25, 0.75, r=False)],
            [_fused(16, e=8, s=2, r=False), _fused(16, e=4), _fused(16, e=8), _fused(16, e=4)],
            [_fused(40, k=5, e=8, s=2, r=False), _fused(40, e=4), _fused(40, e=4), _fused(40, e=4)],
            [_ibn(72, e=8, s=2, r=False), _ibn(72, e=8), _fused(72, e=4), _fused(72, e=4),
             _ibn(96, k=5, e=8, r=False), _ibn(96, k=5, e=8), _ibn(96, e=8), _ibn(96, e=8)],
            [_ibn(120, k=5, e=8, s=2, r=False), _ibn(120, e=8), _ibn(120, k=5, e=4), _ibn(120, e=8),
             _ibn(384, k=5, e=8, r=False)],
        ],
    ),
    "gpu": dict(
        stem=32, act="relu6", se=False,
        stages=[
            [_tucker(16, 0.25, 0.25, r=False)],
            [_fused(32, e=8, s=2, r=False), _tucker(32, 0.25, 0.25), _tucker(32, 0.25, 0.25),
             _tucker(32, 0.25, 0.25)],
            [_fused(64, e=8, s=2, r=False), _fused(64, e=8), _fused(64, e=8), _fused(64, e=4)],
            # TF "block 4" (stride 16) then "block 5" (endpoint C4)
            [_fused(128, e=8, s=2, r=False), _fused(128, e=4), _fused(128, e=4), _fused(128, e=4),
             _fused(128, e=8, r=False), _fused(128, e=8), _fused(128, e=8), _fused(128, e=8)],
            # "block 6" (stride 32) then "block 7" (endpoint C5)
            [_fused(128, e=4, s=2, r=False), _fused(128, e=4), _fused(128, e=4), _fused(128, e=4),
             _ibn(384, e=8, r=False)],
        ],
    ),
}

_ACTS = {"relu6": nn.ReLU6, "hard_swish": nn.Hardswish}  # nn.Hardswish == TF's swish6: x * relu6(x + 3) / 6


def _make_block(spec: tuple, in_chs: int, multiplier: float, act, se: bool, pad_type: str, deploy: bool):
    kind, out = spec[0], scale_filters(spec[1], multiplier)
    common = dict(act_layer=act, pad_type=pad_type, deploy=deploy)
    if kind == "ne":
        _, _, k, use_se = spec
        return InvertedBottleneckNoExpansion(in_chs, out, k, se=use_se, **common), out
    if kind == "ibn":
        _, _, k, e, s, r = spec
        return InvertedBottleneck(in_chs, out, k, e, s, r, se=se, **common), out
    if kind == "fused":
        _, _, k, e, s, r = spec
        return FusedInvertedBottleneck(in_chs, out, k, e, s, r, se=se, **common), out
    if kind == "tucker":
        _, _, k, rin, rout, s, r = spec
        return TuckerConv(in_chs, out, k, rin, rout, s, r, **common), out
    raise ValueError(f"unknown MobileDet block kind {kind!r}")


def _init_tf_he(m: nn.Module) -> None:
    """TF's he_normal (truncated normal, fan-in) for every conv; depthwise fan-in is k*k (TF's depthwise He init)."""
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            fan_in = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            std = math.sqrt(2.0 / fan_in) / _TRUNC
            trunc_normal_(mod.weight, std=std, a=-2 * std, b=2 * std)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


# -------------------------------------------------------------------------------------------- backbone


class MobileDet(ZooModel):
    """MobileDet backbone with timm's model API (a classifier head is optional; ``num_classes=0`` removes it).

    ``forward_features`` returns the C5 map; ``forward_intermediates``-style access to C1..C5 goes through
    ``create_model(..., features_only=True)`` (``feature_info`` lists the five endpoints).
    """

    def __init__(
        self,
        arch: str = "cpu",
        multiplier: float = 1.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        pad_type: str = "",
        deploy: bool = False,
    ):
        super().__init__()
        if arch not in ARCH_SPECS:
            raise ValueError(f"unknown MobileDet arch {arch!r}; choose one of {sorted(ARCH_SPECS)}")
        spec = ARCH_SPECS[arch]
        act = _ACTS[spec["act"]]
        self.arch, self.multiplier, self.num_classes, self.in_chans = arch, multiplier, num_classes, in_chans
        self.grad_checkpointing = False
        chs = scale_filters(spec["stem"], multiplier)
        self.stem = ConvBnAct(in_chans, chs, 3, 2, act_layer=act, pad_type=pad_type, deploy=deploy)
        stages, self.feature_info, reduction = [], [], 2
        for i, blocks in enumerate(spec["stages"]):
            mods = []
            for b in blocks:
                stride = b[4] if b[0] in ("ibn", "fused") else (b[5] if b[0] == "tucker" else 1)
                reduction *= stride
                m, chs = _make_block(b, chs, multiplier, act, spec["se"], pad_type, deploy)
                mods.append(m)
            stages.append(nn.Sequential(*mods))
            self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = chs
        self.head = ClassifierHead(chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        _init_tf_he(self.stem)
        _init_tf_he(self.stages)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)")

    def run_stage(self, index: int, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    def forward_endpoints(self, x: torch.Tensor) -> List[torch.Tensor]:
        """C1..C5 feature maps."""
        x = self.stem(x)
        out: List[torch.Tensor] = []
        for stage in self.stages:  # same as run_stage (TorchScript cannot pass a module to a method)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            out.append(x)
        return out

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_endpoints(x)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------ anchors and boxes


class SSDAnchorGenerator:
    """TF OD API ``create_ssd_anchors`` / ``MultipleGridAnchorGenerator`` (``ssd_anchor_generator`` in the configs).

    Layer scales are ``min_scale + (max_scale - min_scale) * i / (num_layers - 1)``; each layer gets one anchor per
    aspect ratio plus one of scale ``sqrt(s_i * s_{i+1})`` (``s_num_layers = 1``) and ratio
    ``interpolated_scale_aspect_ratio``; with ``reduce_boxes_in_lowest_layer`` the first layer has the three boxes
    (0.1, 1.0), (s_0, 2.0), (s_0, 0.5). Anchor centres are ``(i + 0.5) / H_l``; heights ``s / sqrt(a)`` and widths
    ``s * sqrt(a)``, normalized by ``min(H, W)`` of the image so that a ratio-1 anchor is square on non-square
    images. Anchors are in normalized xyxy coordinates, not clipped, ordered (level, y, x, anchor) like TF.
    """

    def __init__(
        self,
        num_layers: int = 6,
        min_scale: float = 0.2,
        max_scale: float = 0.95,
        aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5, 3.0, 0.3333),
        interpolated_scale_aspect_ratio: float = 1.0,
        reduce_boxes_in_lowest_layer: bool = True,
    ):
        scales = [min_scale + (max_scale - min_scale) * i / (num_layers - 1) for i in range(num_layers)] + [1.0]
        self.box_specs: list[list[tuple[float, float]]] = []
        for layer in range(num_layers):
            s, s_next = scales[layer], scales[layer + 1]
            if layer == 0 and reduce_boxes_in_lowest_layer:
                specs = [(0.1, 1.0), (s, 2.0), (s, 0.5)]
            else:
                specs = [(s, float(a)) for a in aspect_ratios]
                if interpolated_scale_aspect_ratio > 0:
                    specs.append((math.sqrt(s * s_next), float(interpolated_scale_aspect_ratio)))
            self.box_specs.append(specs)
        # cached as NumPy so no tensor created while tracing (export, fake tensors) is ever reused in eager mode
        self._cache: dict[tuple, np.ndarray] = {}

    def num_anchors_per_location(self) -> list[int]:
        return [len(s) for s in self.box_specs]

    def __call__(self, feature_shapes: Sequence[tuple[int, int]], image_size: tuple[int, int]) -> torch.Tensor:
        key = (tuple(map(tuple, feature_shapes)), tuple(image_size))
        if key not in self._cache:
            self._cache[key] = self._generate(feature_shapes, image_size)
        return torch.from_numpy(self._cache[key].copy())

    def _generate(self, feature_shapes, image_size) -> np.ndarray:
        if len(feature_shapes) != len(self.box_specs):
            raise ValueError(f"{len(feature_shapes)} feature maps but the anchor generator has {len(self.box_specs)} layers")
        ih, iw = image_size
        m = min(ih, iw)
        base_h, base_w = m / ih, m / iw
        out = []
        for (gh, gw), specs in zip(feature_shapes, self.box_specs):
            sc = np.array([s for s, _ in specs], dtype=np.float64)
            ar = np.sqrt(np.array([a for _, a in specs], dtype=np.float64))
            hs, ws = sc / ar * base_h, sc * ar * base_w
            cy, cx = (np.arange(gh) + 0.5) / gh, (np.arange(gw) + 0.5) / gw
            cy, cx = np.broadcast_to(cy[:, None, None], (gh, gw, len(specs))), np.broadcast_to(cx[None, :, None], (gh, gw, len(specs)))
            h, w = np.broadcast_to(hs, (gh, gw, len(specs))), np.broadcast_to(ws, (gh, gw, len(specs)))
            out.append(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1).reshape(-1, 4))
        return np.concatenate(out).astype(np.float32)


class BoxCoder:
    """TF's ``FasterRcnnBoxCoder``: codes ``(ty, tx, th, tw) = (dy / ha * sy, dx / wa * sx, log(h / ha) * sh,
    log(w / wa) * sw)`` with scale factors ``(sy, sx, sh, sw) = (10, 10, 5, 5)``; boxes are xyxy."""

    EPS = 1e-8

    def __init__(self, scale_factors: Sequence[float] = (10.0, 10.0, 5.0, 5.0), max_log_ratio: float = math.log(1000.0 / 16)):
        self.scale_factors = tuple(float(s) for s in scale_factors)
        self.max_log_ratio = max_log_ratio  # clamp before exp (torchvision's guard); TF has none

    @staticmethod
    def _center(b: torch.Tensor):
        w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
        return b[..., 1] + h / 2, b[..., 0] + w / 2, h, w

    def encode(self, boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        sy, sx, sh, sw = self.scale_factors
        ya, xa, ha, wa = self._center(anchors)
        y, x, h, w = self._center(boxes)
        ha, wa, h, w = ha + self.EPS, wa + self.EPS, h + self.EPS, w + self.EPS
        return torch.stack([(y - ya) / ha * sy, (x - xa) / wa * sx, torch.log(h / ha) * sh, torch.log(w / wa) * sw], -1)

    def decode(self, codes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        sy, sx, sh, sw = self.scale_factors
        ya, xa, ha, wa = self._center(anchors)
        ty, tx = codes[..., 0] / sy, codes[..., 1] / sx
        th = (codes[..., 2] / sh).clamp(max=self.max_log_ratio)
        tw = (codes[..., 3] / sw).clamp(max=self.max_log_ratio)
        h, w = torch.exp(th) * ha, torch.exp(tw) * wa
        yc, xc = ty * ha + ya, tx * wa + xa
        return torch.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], -1)


def argmax_match(iou: torch.Tensor, matched_threshold: float = 0.5, unmatched_threshold: float = 0.5,
                 force_match_for_each_row: bool = True) -> torch.Tensor:
    """TF's ``ArgMaxMatcher`` on a (num_gt, num_anchors) IoU matrix: per anchor the matched gt index, -1 for
    background, -2 for ignored (IoU between the two thresholds). With ``force_match_for_each_row`` every gt also
    claims its best anchor (the later gt wins a shared anchor, as in TF)."""
    n = iou.shape[1]
    if iou.shape[0] == 0:
        return torch.full((n,), -1, dtype=torch.long, device=iou.device)
    best, idx = iou.max(0)
    matches = torch.where(best >= matched_threshold, idx, torch.full_like(idx, -1))
    if unmatched_threshold < matched_threshold:
        matches = torch.where((best >= unmatched_threshold) & (best < matched_threshold), torch.full_like(idx, -2), matches)
    if force_match_for_each_row:
        best_anchor = iou.argmax(1)
        rows = torch.arange(iou.shape[0], device=iou.device)
        forced = torch.full((n,), -1, dtype=torch.long, device=iou.device).scatter_reduce(
            0, best_anchor, rows, reduce="amax", include_self=True)
        matches = torch.where(forced >= 0, forced, matches)
    return matches


# ------------------------------------------------------------------------------------------- SSDLite head


class ExtraLayer(nn.Module):
    """SSDLite extra feature map: 1x1 conv to depth/2 -> 3x3 depthwise stride 2 -> 1x1 conv to depth (BN + ReLU6)."""

    def __init__(self, in_chs: int, depth: int, min_depth: int = 16, pad_type: str = "", deploy: bool = False):
        super().__init__()
        mid = max(depth // 2, min_depth)
        kw = dict(act_layer=nn.ReLU6, bn=HEAD_BN, deploy=deploy)
        self.conv_pw = ConvBnAct(in_chs, mid, 1, **kw)
        self.conv_dw = ConvBnAct(mid, mid, 3, 2, groups=mid, pad_type=pad_type, **kw)
        self.conv_pwl = ConvBnAct(mid, max(depth, min_depth), 1, **kw)

    def forward(self, x):
        return self.conv_pwl(self.conv_dw(self.conv_pw(x)))


class DepthwisePredictor(nn.Module):
    """``convolutional_box_predictor`` with ``use_depthwise``: 3x3 depthwise + BN + ReLU6 -> biased 1x1 conv."""

    def __init__(self, in_chs: int, out_chs: int, pad_type: str = "", deploy: bool = False):
        super().__init__()
        self.conv_dw = ConvBnAct(in_chs, in_chs, 3, groups=in_chs, act_layer=nn.ReLU6, bn=HEAD_BN, pad_type=pad_type,
                                 deploy=deploy)
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=True)

    def forward(self, x):
        return self.conv_pw(self.conv_dw(x))


class SSDLiteMobileDet(nn.Module):
    """SSDLite with a MobileDet backbone (the ``ssdlite_mobiledet_*_320x320_coco`` configs).

    Feature maps C4, C5 and four extra layers (depths 512, 256, 256, 128); per map a depthwise box predictor and
    a depthwise class predictor with ``num_classes + 1`` slots (slot 0 = background, as TF; ``num_classes: 90``
    gives COCO's 91 slots); 6-level SSD anchors (2034 at 320x320); Faster R-CNN box coder (10, 10, 5, 5); argmax
    matcher 0.5 / 0.5 with forced matches; sigmoid focal loss (alpha 0.75, gamma 2) + smooth L1 (delta 1)
    normalized by the number of matches (and the box loss by the code size); sigmoid scores and per-class NMS
    (IoU 0.6, 100 detections). Labels given to :meth:`loss` and returned by :meth:`postprocess` are 0-based
    foreground classes ``0 .. num_classes - 1``.

    Args:
        arch: backbone variant (``cpu``, ``edgetpu``, ``dsp``, ``gpu``).
        num_classes: foreground classes.
        multiplier: backbone width multiplier (TF ``depth_multiplier``).
        extra_depths / min_depth: SSDLite extra layers.
        pre_nms_top_k: keep only the top-k (anchor, class) scores before NMS; ``None`` runs per-class NMS on every
            candidate above ``score_thresh`` (TF's post-processing, exact). The final ``max_det`` detections are
            identical whenever at least ``max_det`` detections survive NMS among the top-k.
        pad_type: ``""`` (symmetric) or ``"same"`` (TF SAME padding, for converted TF weights).
    """

    def __init__(
        self,
        arch: str = "cpu",
        num_classes: int = 90,
        multiplier: float = 1.0,
        in_chans: int = 3,
        extra_depths: Sequence[int] = (512, 256, 256, 128),
        min_depth: int = 16,
        min_scale: float = 0.2,
        max_scale: float = 0.95,
        aspect_ratios: Sequence[float] = (1.0, 2.0, 0.5, 3.0, 0.3333),
        box_coder_scales: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        matched_threshold: float = 0.5,
        unmatched_threshold: float = 0.5,
        focal_alpha: float = 0.75,
        focal_gamma: float = 2.0,
        box_loss_weight: float = 1.0,
        cls_loss_weight: float = 1.0,
        class_prior_bias: float = -4.6,
        score_thresh: float = 1e-8,
        nms_iou: float = 0.6,
        max_det: int = 100,
        pre_nms_top_k: int | None = None,
        pad_type: str = "",
        deploy: bool = False,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (foreground classes), got {num_classes}")
        self.arch, self.num_classes = arch, int(num_classes)
        self.backbone = MobileDet(arch, multiplier, num_classes=0, in_chans=in_chans, pad_type=pad_type, deploy=deploy)
        chs = [self.backbone.feature_info[3]["num_chs"], self.backbone.feature_info[4]["num_chs"]]
        self.extras = nn.ModuleList()
        for d in extra_depths:
            self.extras.append(ExtraLayer(chs[-1], d, min_depth, pad_type, deploy))
            chs.append(max(d, min_depth))
        self.anchor_generator = SSDAnchorGenerator(len(chs), min_scale, max_scale, aspect_ratios)
        na = self.anchor_generator.num_anchors_per_location()
        self.box_heads = nn.ModuleList(DepthwisePredictor(c, a * 4, pad_type, deploy) for c, a in zip(chs, na))
        self.cls_heads = nn.ModuleList(
            DepthwisePredictor(c, a * (num_classes + 1), pad_type, deploy) for c, a in zip(chs, na))
        self.box_coder = BoxCoder(box_coder_scales)
        self.matched_threshold, self.unmatched_threshold = matched_threshold, unmatched_threshold
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.box_loss_weight, self.cls_loss_weight = box_loss_weight, cls_loss_weight
        self.score_thresh, self.nms_iou, self.max_det, self.pre_nms_top_k = score_thresh, nms_iou, max_det, pre_nms_top_k
        self.feature_channels = chs
        self._init_head(class_prior_bias)

    @torch.no_grad()
    def _init_head(self, class_prior_bias: float) -> None:
        # Extra layers: truncated normal std 0.03; predictors: normal std 0.03, class bias -4.6 (the configs).
        for m in self.extras.modules():
            if isinstance(m, nn.Conv2d):
                trunc_normal_(m.weight, std=0.03, a=-0.06, b=0.06)
        for heads, bias in ((self.box_heads, 0.0), (self.cls_heads, class_prior_bias)):
            for m in heads.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.03)
                    if m.bias is not None:
                        nn.init.constant_(m.bias, bias)

    # ---------------------------------------------------------------------------------------------- forward
    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The six SSD feature maps (C4, C5, four extra layers)."""
        c = self.backbone.forward_endpoints(x)
        feats = [c[3], c[4]]
        for layer in self.extras:
            feats.append(layer(feats[-1]))
        return feats

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw predictions: ``(cls_logits (B, N, num_classes + 1), box_deltas (B, N, 4))``, anchors ordered
        (level, y, x, anchor); decode with :meth:`postprocess` or :class:`DetectionPostprocess`."""
        feats = self.forward_features(x)
        b = x.shape[0]
        cls, box = [], []
        for f, bh, ch in zip(feats, self.box_heads, self.cls_heads):
            box.append(bh(f).permute(0, 2, 3, 1).reshape(b, -1, 4))
            cls.append(ch(f).permute(0, 2, 3, 1).reshape(b, -1, self.num_classes + 1))
        return torch.cat(cls, 1), torch.cat(box, 1)

    def feature_shapes(self, image_size: tuple[int, int]) -> list[tuple[int, int]]:
        """Spatial sizes of the six maps for an input size (every stride-2 layer maps n -> ceil(n / 2))."""
        h, w = image_size
        shapes = []
        for level in range(1, 10):
            h, w = -(-h // 2), -(-w // 2)
            if level >= 4:
                shapes.append((h, w))
        return shapes

    def anchors(self, image_size: tuple[int, int], device=None) -> torch.Tensor:
        """Normalized xyxy anchors for an input of ``image_size`` (H, W)."""
        image_size = (int(image_size[0]), int(image_size[1]))
        return self.anchor_generator(self.feature_shapes(image_size), image_size).to(device)

    # ------------------------------------------------------------------------------------------------ loss
    def loss(self, outputs: tuple[torch.Tensor, torch.Tensor], targets: list[dict], image_size: tuple[int, int]) -> dict:
        """SSD loss. ``targets[i]``: ``boxes`` (n, 4) xyxy in pixels of the input tensor, ``labels`` (n,) in
        ``[0, num_classes)``; an image may have no boxes (all anchors are background)."""
        cls_logits, box_deltas = outputs
        if len(targets) != cls_logits.shape[0]:
            raise ValueError(f"loss: {len(targets)} targets for a batch of {cls_logits.shape[0]} images")
        h, w = image_size
        anchors = self.anchors(image_size, cls_logits.device)
        if anchors.shape[0] != cls_logits.shape[1]:
            raise ValueError(f"loss: image_size {tuple(image_size)} gives {anchors.shape[0]} anchors but the outputs "
                             f"have {cls_logits.shape[1]}; pass the size of the input tensor")
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=cls_logits.device)
        cls_t, box_t, pos_masks = [], [], []
        for i, t in enumerate(targets):
            boxes, labels = _check_target(t, i, self.num_classes)
            boxes = boxes.to(cls_logits.device, torch.float32) / scale
            labels = labels.to(cls_logits.device)
            matches = argmax_match(box_iou(boxes, anchors), self.matched_threshold, self.unmatched_threshold)
            pos = matches >= 0
            # encode_background_as_zeros (all four configs): unmatched anchors have all-zero targets, so the
            # background slot (kept for the 91-slot layout) is always pushed towards 0
            onehot = torch.zeros(anchors.shape[0], self.num_classes + 1, device=cls_logits.device)
            if pos.any():
                onehot[pos.nonzero().squeeze(1), labels[matches[pos]] + 1] = 1.0
            cls_t.append(torch.where((matches == -2).unsqueeze(1), torch.full_like(onehot, -1.0), onehot))
            gt = boxes[matches.clamp(min=0)] if boxes.shape[0] else torch.zeros_like(anchors)
            box_t.append(self.box_coder.encode(gt, anchors))
            pos_masks.append(pos)
        cls_t, box_t, pos = torch.stack(cls_t), torch.stack(box_t), torch.stack(pos_masks)
        num_pos = pos.sum()
        normalizer = num_pos.clamp(min=1).float()
        valid = cls_t[..., :1] >= 0  # ignored anchors (between thresholds) carry no loss
        cls_loss = sigmoid_focal_loss(cls_logits.float(), cls_t.clamp(min=0), self.focal_alpha, self.focal_gamma)
        cls_loss = (cls_loss * valid).sum() / normalizer
        box_loss = F.smooth_l1_loss(box_deltas.float()[pos], box_t[pos], beta=1.0, reduction="sum") / (normalizer * 4)
        total = self.cls_loss_weight * cls_loss + self.box_loss_weight * box_loss
        return {"loss": total, "loss_cls": cls_loss.detach(), "loss_box": box_loss.detach(), "num_pos": num_pos.detach()}

    # ----------------------------------------------------------------------------------------- post-process
    @torch.no_grad()
    def postprocess(self, outputs: tuple[torch.Tensor, torch.Tensor], image_size: tuple[int, int]) -> list[dict]:
        """Detections per image: ``boxes`` (k, 4) xyxy in input pixels (clipped), ``scores`` (k,), ``labels`` (k,)
        0-based, at most ``max_det``, sorted by score."""
        cls_logits, box_deltas = outputs
        h, w = image_size
        if self.pre_nms_top_k is not None:
            boxes, scores, labels, num = self.postprocess_padded(outputs, image_size, self.pre_nms_top_k)
            return [dict(boxes=boxes[i, :n], scores=scores[i, :n], labels=labels[i, :n])
                    for i, n in enumerate(num.tolist())]
        anchors = self.anchors(image_size, cls_logits.device)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=cls_logits.device)
        out = []
        for logits, deltas in zip(cls_logits.float(), box_deltas.float()):
            boxes = self._decode_clip(deltas, anchors) * scale
            scores = logits[:, 1:].sigmoid()
            anchor_idx, cls = (scores > self.score_thresh).nonzero(as_tuple=True)
            sc = scores[anchor_idx, cls]
            keep = batched_nms(boxes[anchor_idx], sc, cls, self.nms_iou)[: self.max_det]
            out.append(dict(boxes=boxes[anchor_idx[keep]], scores=sc[keep], labels=cls[keep]))
        return out

    def _decode_clip(self, deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        return self.box_coder.decode(deltas, anchors).clamp(0.0, 1.0)  # TF clips to the [0, 1] window

    def postprocess_padded(self, outputs, image_size: tuple[int, int], pre_nms_top_k: int = 1000):
        """Batched, fixed-shape post-processing (exportable): ``boxes (B, max_det, 4)`` in input pixels,
        ``scores (B, max_det)``, ``labels (B, max_det)`` (-1 and zeros past ``num_detections (B,)``)."""
        cls_logits, box_deltas = outputs
        b, n, _ = cls_logits.shape
        c = self.num_classes
        h, w = image_size
        anchors = self.anchors(image_size, cls_logits.device)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=cls_logits.device)
        boxes = self._decode_clip(box_deltas.float(), anchors) * scale  # (B, N, 4)
        scores = cls_logits.float()[..., 1:].sigmoid().reshape(b, n * c)
        k = min(int(pre_nms_top_k), n * c)
        top, idx = scores.topk(k, dim=1)  # sorted, descending
        anchor_idx, cls = idx // c, idx % c
        cand = torch.gather(boxes, 1, anchor_idx.unsqueeze(-1).expand(b, k, 4))
        img = torch.arange(b, device=cls.device).unsqueeze(1).expand(b, k)
        valid = top > self.score_thresh
        # invalid candidates go to their own group far from everything, so they never suppress a valid one
        group = torch.where(valid, img * c + cls, torch.full_like(cls, b * c))
        keep = _offset_nms(cand.reshape(-1, 4), top.reshape(-1), group.reshape(-1), self.nms_iou)
        kept = torch.zeros(b * k, dtype=torch.bool, device=cls.device).index_fill(0, keep, True).view(b, k) & valid
        # the first max_det kept candidates in score order: rank kept ones by position, push the rest behind
        m = min(self.max_det, k)
        pos = torch.arange(k, device=cls.device).unsqueeze(0).expand(b, k)
        order = torch.where(kept, pos, pos + k).topk(m, dim=1, largest=False).indices
        sel = torch.gather(kept, 1, order)
        out_boxes = torch.gather(cand, 1, order.unsqueeze(-1).expand(b, m, 4)) * sel.unsqueeze(-1)
        out_scores = torch.gather(top, 1, order) * sel
        out_labels = torch.where(sel, torch.gather(cls, 1, order), torch.full_like(order, -1))
        return out_boxes, out_scores, out_labels, sel.sum(1)


def _offset_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou: float) -> torch.Tensor:
    """Per-group NMS in one call by shifting each group's boxes apart (torchvision's coordinate trick, used
    unconditionally: ``batched_nms`` picks a per-class loop on large CPU inputs, which torch.export cannot trace)."""
    offsets = groups.to(boxes.dtype) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou)


def _check_target(t: dict, i: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate one target dict; errors name the image, the box and the fix instead of failing inside the loss."""
    if "boxes" not in t or "labels" not in t:
        raise ValueError(f"target {i}: needs 'boxes' (n, 4) and 'labels' (n,), got keys {sorted(t)}")
    boxes, labels = torch.as_tensor(t["boxes"]), torch.as_tensor(t["labels"])
    if boxes.numel() == 0:
        return boxes.reshape(0, 4).float(), labels.reshape(0).long()
    if boxes.ndim != 2 or boxes.shape[1] != 4 or labels.shape != boxes.shape[:1]:
        raise ValueError(f"target {i}: boxes must be (n, 4) and labels (n,), got {tuple(boxes.shape)} and {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"target {i}: labels must be integers, got {labels.dtype}")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        j = int(bad.nonzero()[0])
        raise ValueError(f"target {i}: label {int(labels[j])} (box {j}) is outside [0, {num_classes}); labels are "
                         f"0-based foreground classes; set num_classes to at least {int(labels.max()) + 1} or fix the "
                         f"annotation's category mapping")
    if not torch.isfinite(boxes).all():
        raise ValueError(f"target {i}: boxes contain NaN or inf")
    deg = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if deg.any():
        j = int(deg.nonzero()[0])
        raise ValueError(f"target {i}: box {j} {boxes[j].tolist()} is degenerate (x2 <= x1 or y2 <= y1; boxes are "
                         f"xyxy); drop such boxes before training (zoo.data.detection does, as COCO loaders do)")
    return boxes.float(), labels.long()


class DetectionPostprocess(nn.Module):
    """Wrap a detector so ``forward(images)`` returns fixed-size detections, for ONNX / TorchScript export:
    ``(boxes (B, max_det, 4) xyxy in input pixels, scores (B, max_det), labels (B, max_det) with -1 padding,
    num_detections (B,))``. NMS is torchvision's (exported as ONNX ``NonMaxSuppression``)."""

    def __init__(self, detector: SSDLiteMobileDet, pre_nms_top_k: int = 1000):
        super().__init__()
        self.detector, self.pre_nms_top_k = detector, pre_nms_top_k
        self.pretrained_cfg = getattr(detector, "pretrained_cfg", None)

    def forward(self, x: torch.Tensor):
        return self.detector.postprocess_padded(self.detector(x), tuple(x.shape[-2:]), self.pre_nms_top_k)


# ------------------------------------------------------------------------------------------- checkpoints
# No converter ships: the official weights are TF1 checkpoints (see MODEL_CARD.md, "MobileDets", for the mapping) and
# none can be fetched or read here to test one. Checkpoints in our layout (e.g. from `zoo fit`) load directly.


# ------------------------------------------------------------------------------------------ registrations

_PUBLISHED = {  # config headers (author-provided): COCO14 minival / COCO17 val mAP, MACs, params incl. BN stats
    "cpu": dict(map=24.1, map_coco17_val=23.5),
    "edgetpu": dict(map=26.0, map_coco17_val=25.2),
    "dsp": dict(map=28.9, map_coco17_val=28.4),
    "gpu": dict(map=28.7, map_coco17_val=27.5),
}
_NOTES = {
    "cpu": "0.45B MACs, 4.21M variables (incl. BN statistics), 113 ms on a Pixel 1 CPU",
    "edgetpu": "1.53B MACs, 4.20M variables, 6.9 ms on the Pixel 4 EdgeTPU",
    "dsp": "2.82B MACs, 7.16M variables, 12.3 ms on the Pixel 4 DSP",
    "gpu": "5.07B MACs, 13.11M variables, 11.0 ms fp32 / 3.2 ms fp16 / 2.3 ms int8 on Jetson Xavier (TensorRT 7.1)",
}
_COMMON = dict(
    family="mobiledets", paper="2004.14525", license="apache-2.0", input_size=(3, 320, 320), pool_size=None,
    crop_pct=1.0, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), first_conv="stem.conv",
)


def _det_cfg(arch: str) -> ModelCfg:
    return ModelCfg(
        task="object-detection", num_classes=90, first_conv="backbone.stem.conv", classifier=None,
        metrics=_PUBLISHED[arch],
        notes=f"SSDLite MobileDet-{arch.upper()} 320x320 (TF1 OD API, trained from scratch on COCO; official weights "
              f"are TF1 only, no PyTorch weights). {_NOTES[arch]}.",
        **{k: v for k, v in _COMMON.items() if k != "first_conv"},
    )


def _backbone_cfg(arch: str) -> ModelCfg:
    return ModelCfg(
        task="image-classification", classifier="head.fc",
        pool_size=(10, 10),  # C5 is stride 32: 10 x 10 at 320 px
        notes=f"MobileDet-{arch.upper()} backbone (endpoints C1..C5 via features_only); no ImageNet weights exist.",
        **{k: v for k, v in _COMMON.items() if k != "pool_size"},
    )


default_cfgs = {
    **{f"mobiledet_{a}": _backbone_cfg(a) for a in ARCH_SPECS},
    **{f"ssdlite_mobiledet_{a}": _det_cfg(a) for a in ARCH_SPECS},
}


# tests/test_contract.py: a quarter of the width (every block type of each variant is kept)
small_cfgs = {"mobiledet_*": SmallCfg(dict(multiplier=0.25), img_size=64)}


@register_model
def mobiledet_cpu(**kwargs) -> MobileDet:
    return MobileDet(**{"arch": "cpu", **kwargs})


@register_model
def mobiledet_edgetpu(**kwargs) -> MobileDet:
    return MobileDet(**{"arch": "edgetpu", **kwargs})


@register_model
def mobiledet_dsp(**kwargs) -> MobileDet:
    return MobileDet(**{"arch": "dsp", **kwargs})


@register_model
def mobiledet_gpu(**kwargs) -> MobileDet:
    return MobileDet(**{"arch": "gpu", **kwargs})


@register_model
def ssdlite_mobiledet_cpu(**kwargs) -> SSDLiteMobileDet:
    return SSDLiteMobileDet(**{"arch": "cpu", **kwargs})


@register_model
def ssdlite_mobiledet_edgetpu(**kwargs) -> SSDLiteMobileDet:
    return SSDLiteMobileDet(**{"arch": "edgetpu", **kwargs})


@register_model
def ssdlite_mobiledet_dsp(**kwargs) -> SSDLiteMobileDet:
    return SSDLiteMobileDet(**{"arch": "dsp", **kwargs})


@register_model
def ssdlite_mobiledet_gpu(**kwargs) -> SSDLiteMobileDet:
    return SSDLiteMobileDet(**{"arch": "gpu", **kwargs})
