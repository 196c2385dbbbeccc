"""PP-MobileSeg (arXiv 2304.05152; official code PaddleSeg release/2.8, Paddle only) for semantic segmentation.

Structure: the StrideFormer backbone -- four MobileNetV3 stages (``StackedMV3Block`` ``smb1..smb4``), the last two
each followed by a stack of SEA-attention transformer blocks (``trans1`` at 1/16, ``trans2`` at 1/32) whose attention
runs on a stride-2 copy of the map and is upsampled back -- then the Aggregated Attention Module (AAM) that gates and
sums the 1/8, 1/16 and 1/32 maps into one 256-channel map (Tiny: ``AAM`` at 1/16; Base: ``AAMSx8`` at 1/8). A tiny head
(depthwise 1x1 conv + BN + ReLU, dropout, 1x1 classifier) gives the logits, and the Valid Interpolate Module (VIM)
upsamples only the classes the low-resolution argmax predicts.

``upsample="bilinear"`` (the reference's default, ``intepolate`` in its configs) returns logits at input size;
``upsample="vim"`` returns an int32 label map in eval mode when the model has at least ``vim_min_classes`` (30)
classes, like the reference; otherwise logits. Our VIM is written with static-rank tensor ops (a presence mask,
``nonzero``, ``index_select``, ``interpolate``, ``argmax``, a gather), so it gives the reference's result and exports
to ONNX with a dynamic class set (the reference's ``unique`` + Python loop does not export, PaddleSeg#3350).

Module names follow PaddleSeg's where they exist (``smb*``, ``trans*``, ``inj_module``, ``decode_head``); convs with
BN use ``zoo.layers.ConvNorm`` (``conv`` / ``norm``) so every BN folds in the deploy form. :func:`checkpoint_filter_fn`
reads PaddleSeg ``.pdparams`` (read by :func:`zoo.checkpoints.load_paddle_pickle`, numpy arrays only, nothing
executed) and the mmsegmentation port's ``.pth``.

Differences from the reference: none in the function. The SE gate is Paddle's ``hardsigmoid(slope=0.2,
offset=0.5)`` (not torch's 1/6 slope); the SEA gate is ``relu6(x + 3) / 6``; the AAM gates are sigmoids.
"""
import logging
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, make_divisible
from torch.utils.checkpoint import checkpoint
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn

from zoo.contract import SmallCfg, ZooModel, feature_take_indices
from zoo.layers import ConvNorm
from zoo.registry import CheckpointSource, ModelCfg, register_model

log = logging.getLogger(__name__)

ADE20K_CLASSES = 150
CITYSCAPES_CLASSES = 19
VIM_MIN_CLASSES = 30  # the reference takes the VIM branch only from 30 classes on


# ------------------------------------------------------------------------------------------------ layers


class PaddleHardSigmoid(nn.Module):
    """Paddle's ``hardsigmoid(x, slope=0.2, offset=0.5) = clip(0.2 x + 0.5, 0, 1)``: the SE gate of PaddleSeg's
    MobileNetV3 blocks (torch's ``F.hardsigmoid`` has slope 1/6 and gives different outputs)."""

    def __init__(self, slope: float = 0.2, offset: float = 0.5, inplace: bool = False):
        super().__init__()
        self.slope, self.offset = slope, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.slope + self.offset).clamp(0.0, 1.0)


class BiasedConvNorm(ConvNorm):
    """ConvNorm whose conv has a bias in the training form too (the reference's stride conv)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 deploy: bool = False):
        super().__init__(in_chs, out_chs, kernel_size, stride, groups=groups, deploy=deploy)
        c = self.conv
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, c.padding, groups=groups, bias=True)


class PreActConvNorm(ConvNorm):
    """``norm(conv(act(x)))``: the reference's ``Sequential(act, Conv2DBN)`` projections."""

    def __init__(self, in_chs: int, out_chs: int, act_layer, bn_weight_init: float = 1.0, deploy: bool = False):
        super().__init__(in_chs, out_chs, 1, deploy=deploy)
        self.act = act_layer()
        if isinstance(self.norm, nn.BatchNorm2d):
            nn.init.constant_(self.norm.weight, bn_weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.act(x)))


def _act(name: str) -> type:
    acts = {"relu": nn.ReLU, "hardswish": nn.Hardswish, "relu6": nn.ReLU6}
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}; one of {sorted(acts)}")
    return acts[name]


class ResidualUnit(nn.Module):
    """MobileNetV3 inverted residual: 1x1 expand + BN + act, kxk depthwise + BN + act, [SE], 1x1 + BN."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, kernel_size: int, stride: int, use_se: bool,
                 act: str, deploy: bool = False):
        super().__init__()
        act_layer = _act(act)
        self.has_shortcut = stride == 1 and in_chs == out_chs
        self.expand_conv = ConvNorm(in_chs, mid_chs, 1, act_layer=act_layer, deploy=deploy)
        self.bottleneck_conv = ConvNorm(mid_chs, mid_chs, kernel_size, stride, groups=mid_chs, act_layer=act_layer,
                                        deploy=deploy)
        self.mid_se = (SqueezeExcite(mid_chs, rd_channels=mid_chs // 4, act_layer=nn.ReLU, gate_layer=PaddleHardSigmoid)
                       if use_se else nn.Identity())
        self.linear_conv = ConvNorm(mid_chs, out_chs, 1, deploy=deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_conv(self.mid_se(self.bottleneck_conv(self.expand_conv(x))))
        return x + y if self.has_shortcut else y


class StackedMV3Block(nn.Module):
    """One MobileNetV3 stage; rows are ``(kernel, expanded channels, out channels, se, act, stride)``. The first
    stage starts with the stem (3x3 stride-2 conv + BN + hardswish)."""

    def __init__(self, cfgs: Sequence[Sequence], stem: bool, in_chs: int, img_chans: int = 3, deploy: bool = False):
        super().__init__()
        in_chs = make_divisible(in_chs)
        self.conv = ConvNorm(img_chans, in_chs, 3, 2, act_layer=nn.Hardswish, deploy=deploy) if stem else None
        blocks = []
        for k, exp, c, se, act, s in cfgs:
            out = make_divisible(c)
            blocks.append(ResidualUnit(in_chs, make_divisible(exp), out, k, s, bool(se), act, deploy))
            in_chs = out
        self.blocks = nn.Sequential(*blocks)
        self.out_chs = in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            x = self.conv(x)
        return self.blocks(x)


class SqueezeAxialPositionalEmbedding(nn.Module):
    """A learned (1, dim, 16) embedding linearly interpolated to the squeezed axis length and added."""

    def __init__(self, dim: int, length: int = 16):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, dim, length))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _linear_like(self.pos_embed, x)


class SeaAttention(nn.Module):
    """Squeeze-enhanced axial attention with an optional stride-2 input (``stride_attention``).

    Queries/keys/values are 1x1 conv + BN. The detail branch is ``pwconv(act(dwconv3x3(cat(q, k, v))))``; the
    context branch attends along rows on ``mean over W`` and along columns on ``mean over H`` (each with squeeze-axial
    positional embeddings on q and k), broadcasts both back, adds v, projects, and gates the detail branch with
    ``relu6(x + 3) / 6``. With ``stride_attention`` the result is bilinearly upsampled to the input size.
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float = 2.0, act_layer=nn.ReLU6,
                 stride_attention: bool = True, deploy: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = key_dim ** -0.5
        self.nh_kd = key_dim * num_heads
        self.dh = int(attn_ratio * key_dim) * num_heads
        nh_kd, dh = self.nh_kd, self.dh
        self.stride_attention = stride_attention
        self.stride_conv = BiasedConvNorm(dim, dim, 3, 2, groups=dim, deploy=deploy) if stride_attention else None
        self.to_q = ConvNorm(dim, nh_kd, 1, deploy=deploy)
        self.to_k = ConvNorm(dim, nh_kd, 1, deploy=deploy)
        self.to_v = ConvNorm(dim, dh, 1, deploy=deploy)
        self.proj = PreActConvNorm(dh, dim, act_layer, bn_weight_init=0.0, deploy=deploy)
        self.proj_encode_row = PreActConvNorm(dh, dh, act_layer, bn_weight_init=0.0, deploy=deploy)
        self.pos_emb_rowq = SqueezeAxialPositionalEmbedding(nh_kd)
        self.pos_emb_rowk = SqueezeAxialPositionalEmbedding(nh_kd)
        self.proj_encode_column = PreActConvNorm(dh, dh, act_layer, bn_weight_init=0.0, deploy=deploy)
        self.pos_emb_columnq = SqueezeAxialPositionalEmbedding(nh_kd)
        self.pos_emb_columnk = SqueezeAxialPositionalEmbedding(nh_kd)
        qkv_chs = 2 * nh_kd + dh
        self.dwconv = ConvNorm(qkv_chs, qkv_chs, 3, groups=qkv_chs, act_layer=act_layer, deploy=deploy)
        self.pwconv = ConvNorm(qkv_chs, dim, 1, deploy=deploy)
        self.gate = nn.Hardsigmoid()  # relu6(x + 3) / 6

    def _axial(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention along one squeezed axis: q, k (B, nh_kd, N) with positions added, v (B, dh, N) -> (B, dh, N)."""
        b, _, n = q.shape
        qh = q.reshape(b, self.num_heads, -1, n).transpose(-1, -2)  # B, h, N, d
        kh = k.reshape(b, self.num_heads, -1, n)  # B, h, d, N
        vh = v.reshape(b, self.num_heads, -1, n).transpose(-1, -2)  # B, h, N, d_v
        attn = (qh @ kh * self.scale).softmax(-1)
        return (attn @ vh).transpose(-1, -2).reshape(b, self.dh, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        detail = self.pwconv(self.dwconv(torch.cat([q, k, v], 1)))
        row = self._axial(self.pos_emb_rowq(q.mean(-1)), self.pos_emb_rowk(k.mean(-1)), v.mean(-1))
        col = self._axial(self.pos_emb_columnq(q.mean(-2)), self.pos_emb_columnk(k.mean(-2)), v.mean(-2))
        row = self.proj_encode_row(row.unsqueeze(-1))  # B, dh, H, 1
        col = self.proj_encode_column(col.unsqueeze(-2))  # B, dh, 1, W
        out = self.gate(self.proj(v + row + col)) * detail
        if self.stride_conv is not None:
            out = _bilinear_like(out, shortcut)
        return out


class Mlp(nn.Module):
    """1x1 conv + BN, 3x3 depthwise conv (bias), act, 1x1 conv + BN."""

    def __init__(self, dim: int, hidden: int, act_layer=nn.ReLU6, drop: float = 0.0, deploy: bool = False):
        super().__init__()
        self.fc1 = ConvNorm(dim, hidden, 1, deploy=deploy)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.fc2 = ConvNorm(hidden, dim, 1, deploy=deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.dwconv(self.fc1(x))))))


class Block(nn.Module):
    def __init__(self, dim: int, key_dim: int, num_heads: int, mlp_ratio: float, attn_ratio: float,
                 drop_path: float, act_layer, stride_attention: bool, deploy: bool = False):
        super().__init__()
        self.attn = SeaAttention(dim, key_dim, num_heads, attn_ratio, act_layer, stride_attention, deploy)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, deploy=deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(x))


class BasicLayer(nn.Module):
    def __init__(self, depth: int, dim: int, key_dim: int, num_heads: int, mlp_ratio: float, attn_ratio: float,
                 drop_path: Sequence[float], act_layer, stride_attention: bool, deploy: bool = False):
        super().__init__()
        self.transformer_blocks = nn.Sequential(*[
            Block(dim, key_dim, num_heads, mlp_ratio, attn_ratio, drop_path[i], act_layer, stride_attention, deploy)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer_blocks(x)


# F.interpolate reads the input's rank and sizes in Python, which FX cannot trace: these helpers are leaves for
# torch.fx (torch.fx.wrap below) and plain functions for TorchScript and eager.
def _bilinear_like(x: torch.Tensor, ref: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    """``x`` bilinearly resized to ``ref``'s height and width."""
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=align_corners)


def _linear_like(pos: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (1, C, L) embedding linearly resized to the length of ``x``'s last axis."""
    return F.interpolate(pos, size=x.shape[-1:], mode="linear", align_corners=False)


def _half(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)


class AAM(nn.Module):
    """Aggregated Attention Module (PaddleSeg ``InjectionMultiSumallmultiallsum``), output at 1/16:
    ``sigmoid(A0) * sigmoid(A1) * sigmoid(A2) * (E0 + E1) + E2`` with the 1/8 input halved first."""

    def __init__(self, in_chs: Sequence[int], out_chs: int = 256, deploy: bool = False):
        super().__init__()
        self.embedding_list = nn.ModuleList([ConvNorm(c, out_chs, 1, deploy=deploy) for c in in_chs])
        self.act_embedding_list = nn.ModuleList([ConvNorm(c, out_chs, 1, deploy=deploy) for c in in_chs])

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        x8, x16, x32 = feats[0], feats[1], feats[2]
        low1 = _half(x8)
        low2 = _bilinear_like(x16, low1)
        a0 = self.act_embedding_list[0](low1).sigmoid()
        a1 = self.act_embedding_list[1](low2).sigmoid()
        a2 = _bilinear_like(self.act_embedding_list[2](x32).sigmoid(), low1)
        e2 = _bilinear_like(self.embedding_list[2](x32), low1)
        return a0 * a1 * a2 * (self.embedding_list[0](low1) + self.embedding_list[1](low2)) + e2


class AAMSx8(nn.Module):
    """Simplified AAM at 1/8 (PaddleSeg ``InjectionMultiSumallmultiallsumSimpx8``): ``sigmoid(A1) * sigmoid(A2) * E0
    + E2`` where E0 embeds the 1/8 map, A1 gates from 1/16 and A2 / E2 come from 1/32."""

    def __init__(self, in_chs: Sequence[int], out_chs: int = 256, deploy: bool = False):
        super().__init__()
        self.embedding_list = nn.ModuleList([ConvNorm(in_chs[i], out_chs, 1, deploy=deploy) for i in (0, 2)])
        self.act_embedding_list = nn.ModuleList([ConvNorm(in_chs[i], out_chs, 1, deploy=deploy) for i in (1, 2)])

    def forward(self, feats: List[torch.Tensor]) -> torch.Tensor:
        x8, x16, x32 = feats[0], feats[1], feats[2]
        e0 = self.embedding_list[0](x8)
        a1 = self.act_embedding_list[0](_bilinear_like(x16, e0)).sigmoid()
        a2 = _bilinear_like(self.act_embedding_list[1](x32).sigmoid(), e0)
        e2 = _bilinear_like(self.embedding_list[1](x32), e0)
        return a1 * a2 * e0 + e2


class StrideFormer(nn.Module):
    """The backbone: four MV3 stages, SEA transformer stacks after the last ``len(depths)`` stages, then AAM."""

    def __init__(self, cfgs, channels, embed_dims, key_dims=(16, 24), depths=(2, 2), num_heads=8, attn_ratio=2.0,
                 mlp_ratios=(2, 4), drop_path_rate=0.1, act_layer=nn.ReLU6, inj_type="AAM", out_chs=256,
                 stride_attention=True, in_chans=3, deploy=False):
        super().__init__()
        if len(cfgs) != 4 or len(depths) != 2:
            raise ValueError("StrideFormer has 4 MobileNetV3 stages and 2 transformer stages")
        # registered in execution order (smb3, trans1, smb4, trans2) so module walkers see the forward order
        stage_out = []
        for i, cfg in enumerate(cfgs):
            smb = StackedMV3Block(cfg, i == 0, channels[i], in_chans, deploy)
            setattr(self, f"smb{i + 1}", smb)
            stage_out.append(smb.out_chs)
            j = i - (len(cfgs) - len(depths))
            if j >= 0:
                if embed_dims[j] != smb.out_chs:
                    raise ValueError(f"embed_dims[{j}]={embed_dims[j]} must equal stage {i + 1}'s {smb.out_chs} channels")
                dpr = [drop_path_rate * i / max(1, depths[j] - 1) for i in range(depths[j])]  # linspace(0, rate, depth)
                setattr(self, f"trans{j + 1}", BasicLayer(depths[j], embed_dims[j], key_dims[j], num_heads,
                                                           mlp_ratios[j], attn_ratio, dpr, act_layer,
                                                           stride_attention, deploy))
        if inj_type not in ("AAM", "AAMSx8"):
            raise ValueError(f"inj_type must be 'AAM' or 'AAMSx8', got {inj_type!r}")
        self.inj_type = inj_type
        aam_in = stage_out[1:]
        self.inj_module = (AAM if inj_type == "AAM" else AAMSx8)(aam_in, out_chs, deploy)
        self.out_chs = out_chs
        self.out_reduction = 16 if inj_type == "AAM" else 8
        self.stage_chs = stage_out
        self.grad_checkpointing = False

    def stages(self) -> List[nn.Module]:
        return [self.smb1, self.smb2, nn.Sequential(self.smb3, self.trans1), nn.Sequential(self.smb4, self.trans2)]

    def forward_stages(self, x: torch.Tensor) -> List[torch.Tensor]:
        x4 = self.smb1(x)
        x8 = self.smb2(x4)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x16 = checkpoint(self.trans1, self.smb3(x8), use_reentrant=False)
            x32 = checkpoint(self.trans2, self.smb4(x16), use_reentrant=False)
        else:
            x16 = self.trans1(self.smb3(x8))
            x32 = self.trans2(self.smb4(x16))
        return [x4, x8, x16, x32]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.forward_stages(x)
        return self.inj_module(feats[1:])


class PPMobileSegHead(nn.Module):
    """Depthwise (``use_dw``) 1x1 conv + BN + ReLU, Dropout2d, 1x1 classifier conv."""

    def __init__(self, in_chs: int, num_classes: int, use_dw: bool = True, drop_rate: float = 0.1,
                 deploy: bool = False):
        super().__init__()
        self.linear_fuse = ConvNorm(in_chs, in_chs, 1, groups=in_chs if use_dw else 1, act_layer=nn.ReLU,
                                    deploy=deploy)
        self.dropout = nn.Dropout2d(drop_rate)
        self.conv_seg = nn.Conv2d(in_chs, num_classes, 1) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dropout(self.linear_fuse(x))
        return x if pre_logits else self.conv_seg(x)


# --------------------------------------------------------------------------------------------------- VIM


def vim_upsample(logits: torch.Tensor, size: List[int], align_corners: bool = False) -> torch.Tensor:
    """Valid Interpolate Module: the label map of ``argmax(interpolate(logits))`` computed on the classes present.

    1. the classes predicted anywhere in the batch at low resolution (sorted, as ``unique``);
    2. only those channels are bilinearly upsampled to ``size`` and arg-maxed;
    3. indices map back to class ids. Returns int32 (B, H, W).

    Exportable: a presence mask + ``nonzero`` gives a dynamic class count K, everything after is K-agnostic.
    Equals the full upsampling whenever no absent class would win after interpolation (e.g. every absent class is
    dominated by one present class at every low-resolution pixel: bilinear weights are a convex combination).
    """
    num_classes = logits.shape[1]
    low = logits.argmax(1)
    present = torch.zeros(num_classes, dtype=torch.bool, device=logits.device)
    present = present.index_fill(0, low.flatten(), True)
    labelset = present.nonzero().flatten()  # sorted, like unique
    picked = logits.index_select(1, labelset)
    up = F.interpolate(picked, size=size, mode="bilinear", align_corners=align_corners)
    return labelset[up.argmax(1)].to(torch.int32)


def _vim_like(logits: torch.Tensor, ref: torch.Tensor, align_corners: bool = False) -> torch.Tensor:
    return vim_upsample(logits, ref.shape[-2:], align_corners)


for _fn in ("_bilinear_like", "_linear_like", "_half", "_vim_like"):
    torch.fx.wrap(_fn)


# ------------------------------------------------------------------------------------------------- model


class PPMobileSeg(ZooModel):
    """PP-MobileSeg: StrideFormer + AAM backbone, tiny head, bilinear or VIM upsampling.

    Args:
        cfgs / channels / embed_dims / key_dims / depths / num_heads / mlp_ratios / inj_type: the variant
            (see :func:`pp_mobileseg_base`, :func:`pp_mobileseg_tiny`).
        num_classes: classifier size (150 ADE20K, 19 Cityscapes); 0 gives the pre-logits head output.
        upsample: ``"bilinear"`` (logits at input size; the reference's default) or ``"vim"`` (an int32 label map in
            eval mode when ``num_classes >= vim_min_classes``, else logits, exactly as the reference gates it).
        drop_rate: the head's Dropout2d (0.1); drop_path_rate: stochastic depth of the SEA blocks (0.1).
        deploy: build the inference form (every conv+BN folded).
    """

    def __init__(self, cfgs, channels, embed_dims, key_dims=(16, 24), depths=(2, 2), num_heads=8,
                 mlp_ratios=(2, 4), attn_ratio=2.0, inj_type="AAM", out_chs=256, num_classes=ADE20K_CLASSES,
                 in_chans=3, upsample="bilinear", vim_min_classes=VIM_MIN_CLASSES, align_corners=False,
                 drop_rate=0.1, drop_path_rate=0.1, head_use_dw=True, stride_attention=True, deploy=False):
        super().__init__()
        if upsample not in ("bilinear", "vim"):
            raise ValueError(f"upsample must be 'bilinear' or 'vim', got {upsample!r}")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.upsample, self.vim_min_classes, self.align_corners = upsample, vim_min_classes, align_corners
        self.drop_rate = drop_rate
        self.backbone = StrideFormer(cfgs, channels, embed_dims, key_dims, depths, num_heads, attn_ratio, mlp_ratios,
                                     drop_path_rate, nn.ReLU6, inj_type, out_chs, stride_attention, in_chans, deploy)
        self.decode_head = PPMobileSegHead(out_chs, num_classes, head_use_dw, drop_rate, deploy)
        self.num_features = self.head_hidden_size = out_chs
        reductions = (4, 8, 16, 32)
        modules = ("backbone.smb1", "backbone.smb2", "backbone.trans1", "backbone.trans2")
        self.feature_info = [dict(num_chs=c, reduction=r, module=m)
                             for c, r, m in zip(self.backbone.stage_chs, reductions, modules)]

    # timm-style API -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.decode_head.conv_seg

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new 1x1 classifier (0: none, ``forward_head`` returns the 256-channel pre-logits map). There is no
        global pooling in a segmentation head, so ``global_pool`` must be ``None`` or ``''``."""
        if global_pool:
            raise ValueError(f"PP-MobileSeg has no global pooling (global_pool={global_pool!r})")
        self.num_classes = num_classes
        self.decode_head.conv_seg = nn.Conv2d(self.num_features, num_classes, 1) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, object]:
        return dict(stem=r"^backbone\.smb1\.conv", blocks=[(r"^backbone\.(smb|trans)(\d+)", None),
                                                           (r"^backbone\.inj_module", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.grad_checkpointing = enable

    @torch.jit.ignore
    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, Sequence[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's API over the 1/4, 1/8, 1/16 and 1/32 stage outputs (``indices``: None, the last n, or a list); the
        final output is ``forward_features`` (the AAM map), which needs every stage, so ``stop_early`` only applies
        with ``intermediates_only``. ``norm`` has no effect (there is no final norm)."""
        fmt = str(getattr(output_fmt, "value", output_fmt))
        if fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt={output_fmt!r}: use 'NCHW' or 'NHWC'")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        bb = self.backbone
        feats: List[torch.Tensor] = []
        for i, fn in enumerate((bb.smb1, bb.smb2, nn.Sequential(bb.smb3, bb.trans1), nn.Sequential(bb.smb4, bb.trans2))):
            if stop_early and intermediates_only and i > max_index:
                break
            x = fn(x)
            feats.append(x)
        inter = [feats[i].permute(0, 2, 3, 1) if fmt == "NHWC" else feats[i] for i in take]
        if intermediates_only:
            return inter
        return bb.inj_module(feats[1:]), inter

    @torch.jit.ignore
    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Removes the head (with ``prune_head``); the stages all stay (the AAM reads the last three)."""
        take, _ = feature_take_indices(len(self.feature_info), indices)
        if prune_head:
            self.reset_classifier(0)
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The AAM output: 256 channels at 1/8 (Base, AAMSx8) or 1/16 (Tiny, AAM)."""
        return self.backbone(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Low-resolution logits (or the pre-logits map)."""
        return self.decode_head(x, pre_logits=pre_logits)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits bilinearly upsampled to the input size, whatever ``upsample`` is (for losses and metrics)."""
        return _bilinear_like(self.forward_head(self.forward_features(x)), x, self.align_corners)

    def uses_vim(self) -> bool:
        return self.upsample == "vim" and not self.training and self.num_classes >= self.vim_min_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward_head(self.forward_features(x))
        if self.uses_vim():
            return _vim_like(logits, x, self.align_corners)
        return _bilinear_like(logits, x, self.align_corners)

    @torch.jit.ignore
    def as_feature_extractor(self, out_indices: Optional[Sequence[int]] = None) -> nn.Module:
        return PPMobileSegFeatures(self, out_indices)


class PPMobileSegFeatures(nn.Module):
    """``features_only`` view: the stage outputs listed in ``out_indices`` (default all four)."""

    def __init__(self, model: PPMobileSeg, out_indices: Optional[Sequence[int]] = None):
        super().__init__()
        from timm.models import FeatureInfo

        idx = tuple(feature_take_indices(len(model.feature_info), out_indices)[0])
        self.out_indices = idx
        model.reset_classifier(0)
        self.model = model
        self.feature_info = FeatureInfo([dict(i) for i in model.feature_info], idx)
        self.pretrained_cfg = getattr(model, "pretrained_cfg", None)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.model.forward_intermediates(x, list(self.out_indices), intermediates_only=True)


# ------------------------------------------------------------------------------------------- variants

_BASE = dict(
    cfgs=[
        [[3, 16, 16, True, "relu", 1], [3, 64, 32, False, "relu", 2], [3, 96, 32, False, "relu", 1]],
        [[5, 128, 64, True, "hardswish", 2], [5, 240, 64, True, "hardswish", 1]],
        [[5, 384, 128, True, "hardswish", 2], [5, 384, 128, True, "hardswish", 1]],
        [[5, 768, 192, True, "hardswish", 2], [5, 768, 192, True, "hardswish", 1]],
    ],
    channels=[16, 32, 64, 128, 192], depths=[3, 3], embed_dims=[128, 192], num_heads=8, inj_type="AAMSx8",
)
_TINY = dict(
    cfgs=[
        [[3, 16, 16, True, "relu", 1], [3, 64, 32, False, "relu", 2], [3, 48, 24, False, "relu", 1]],
        [[5, 96, 32, True, "hardswish", 2], [5, 96, 32, True, "hardswish", 1]],
        [[5, 160, 64, True, "hardswish", 2], [5, 160, 64, True, "hardswish", 1]],
        [[3, 384, 128, True, "hardswish", 2], [3, 384, 128, True, "hardswish", 1]],
    ],
    channels=[16, 24, 32, 64, 128], depths=[2, 2], embed_dims=[64, 128], num_heads=4, inj_type="AAM",
)


# ------------------------------------------------------------------------------------------ converters

_SEGMENT_MAP = {"c": "conv", "bn": "norm", "_mean": "running_mean", "_variance": "running_var"}


def _convert_key(key: str) -> str:
    """PaddleSeg or mmseg-port key -> ours (no-op on our own keys)."""
    parts = key.split(".")
    out: List[str] = []
    i = 0
    while i < len(parts):
        p = parts[i]
        nxt = parts[i + 1] if i + 1 < len(parts) else ""
        if p == "mid_se" and nxt in ("conv1", "conv2"):  # Paddle SE
            out += ["mid_se", "conv_reduce" if nxt == "conv1" else "conv_expand"]
            i += 2
            continue
        if p == "mid_se" and nxt in ("conv_act1", "conv_act2"):  # mmseg SE: ConvModule(conv)
            out += ["mid_se", "conv_reduce" if nxt == "conv_act1" else "conv_expand"]
            i += 3
            continue
        if p == "stride_conv" and nxt in ("0", "1"):  # Paddle Sequential(conv, BN)
            out += ["stride_conv", "conv" if nxt == "0" else "norm"]
            i += 2
            continue
        if p in ("proj", "proj_encode_row", "proj_encode_column") and nxt == "1":  # Paddle Sequential(act, Conv2DBN)
            out.append(p)
            i += 2
            continue
        if p == "mlp" and nxt == "dwconv" and i + 2 < len(parts) and parts[i + 2] == "conv":  # mmseg ConvModule
            out += ["mlp", "dwconv"]
            i += 3
            continue
        out.append(_SEGMENT_MAP.get(p, p))
        i += 1
    return ".".join(out)


def paddle_linear_to_torch(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Transpose the weights of ``nn.Linear`` layers: Paddle stores them (in, out), torch (out, in)."""
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return {k: (v.t().contiguous() if k in linear and v.ndim == 2 else v) for k, v in state_dict.items()}


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """PaddleSeg (``.pdparams``: ``c``/``bn``/``_mean``/``_variance``, Sequential indices) or mmseg-port (``.pth``:
    ConvModule ``conv``/``bn``, ``conv_act1``) layouts -> ours. Backbone-only files (PaddleSeg's ``pretrain``
    releases, keys without ``backbone.``) load into the backbone; the head keeps its initialization (logged), as
    PaddleSeg's ``pretrained`` loading does."""
    sd = {k: v for k, v in state_dict.items() if not k.startswith("StructuredToParameterName@@")}
    sd = {_convert_key(k): v for k, v in sd.items()}
    own = model.state_dict()
    if not any(k.startswith("backbone.") for k in sd) and any(k.startswith("smb1.") for k in sd):
        sd = {f"backbone.{k}": v for k, v in sd.items()}
        extra = sorted(k for k in sd if k not in own)
        if extra:
            log.warning("backbone checkpoint: %d keys not in the model were dropped (%s ...)", len(extra), extra[:3])
        sd = {k: v for k, v in sd.items() if k in own}
        kept = [k for k in own if k not in sd]
        log.info("backbone checkpoint: %d head/other tensors keep their initialization", len(kept))
        for k in kept:
            sd[k] = own[k]
    for k, v in own.items():  # Paddle has no BN step counter
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros_like(v) if v.device.type != "meta" else v
    return paddle_linear_to_torch(sd, model)


# --------------------------------------------------------------------------------------------- configs

# tests/test_contract.py size (the contract test runs backbone tasks only; our tests use the same override)
small_cfgs = {"pp_mobileseg_*": SmallCfg(dict(depths=[1, 1]), img_size=64)}

_PADDLE = "https://bj.bcebos.com/paddleseg/dygraph/ade20k"


def _cfg(**kw) -> ModelCfg:
    base = dict(task="semantic-segmentation", family="pp_mobileseg", paper="2304.05152", license="apache-2.0",
                num_classes=ADE20K_CLASSES, input_size=(3, 512, 512), pool_size=None, crop_pct=1.0,
                interpolation="bilinear", first_conv="backbone.smb1.conv.conv", classifier="decode_head.conv_seg")
    base.update(kw)
    return ModelCfg(**base)


default_cfgs = {
    "pp_mobileseg_base.ade20k": _cfg(
        metrics={"miou": 41.57}, source=CheckpointSource(url=f"{_PADDLE}/pp_mobileseg_base/model.pdparams",
                                                         layout="paddle", file_name="pp_mobileseg_base_ade20k.pdparams"),
        notes="PaddleSeg release/2.8, ADE20K 512x512, 80k iters, batch 32; mIoU single-scale (PaddleSeg convention)"),
    "pp_mobileseg_base.ade20k_mmseg": _cfg(
        metrics={"miou": 41.57},
        source=CheckpointSource(url="https://download.openmmlab.com/mmsegmentation/v0.5/pp_mobileseg/"
                                    "pp_mobileseg_mobilenetv3_3rdparty-base-ed0be681.pth", layout="mmseg"),
        notes="the PaddleSeg ADE20K weights as converted by mmsegmentation's projects/pp_mobileseg"),
    "pp_mobileseg_base.cityscapes": _cfg(
        num_classes=CITYSCAPES_CLASSES, input_size=(3, 512, 1024), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        metrics={"miou": 77.83},
        notes="Cityscapes 1024x512 recipe (19 classes, Paddle's default Normalize 0.5/0.5); no released weights"),
    "pp_mobileseg_base.backbone_pretrain": _cfg(
        source=CheckpointSource(url=f"{_PADDLE}/pp_mobileseg/pretrain/model.pdparams", layout="paddle",
                                file_name="pp_mobileseg_base_pretrain.pdparams"),
        notes="StrideFormer-Base backbone initialization used by the ADE20K/Cityscapes configs; head untrained"),
    "pp_mobileseg_tiny.ade20k": _cfg(
        metrics={"miou": 36.39}, source=CheckpointSource(url=f"{_PADDLE}/pp_mobileseg_tiny/model.pdparams",
                                                         layout="paddle", file_name="pp_mobileseg_tiny_ade20k.pdparams"),
        notes="PaddleSeg release/2.8, ADE20K 512x512, 80k iters, batch 32"),
    "pp_mobileseg_tiny.cityscapes": _cfg(
        num_classes=CITYSCAPES_CLASSES, input_size=(3, 512, 1024), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        notes="Cityscapes 1024x512 recipe (19 classes); no released weights"),
    "pp_mobileseg_tiny.backbone_pretrain": _cfg(
        source=CheckpointSource(url=f"{_PADDLE}/pp_mobileseg_tiny_pretrain/model.pdparams", layout="paddle",
                                file_name="pp_mobileseg_tiny_pretrain.pdparams"),
        notes="StrideFormer-Tiny backbone initialization used by the tiny ADE20K config; head untrained"),
}


def _create(variant: dict, **kwargs) -> PPMobileSeg:
    args = dict(variant)
    args.update(kwargs)
    return PPMobileSeg(**args)


@register_model
def pp_mobileseg_base(**kwargs) -> PPMobileSeg:
    """PP-MobileSeg-Base: StrideFormer-Base + AAMSx8 (output 1/8), 5.94M parameters at 150 classes."""
    return _create(_BASE, **kwargs)


@register_model
def pp_mobileseg_tiny(**kwargs) -> PPMobileSeg:
    """PP-MobileSeg-Tiny: StrideFormer-Tiny + AAM (output 1/16), 1.49M parameters at 150 classes."""
    return _create(_TINY, **kwargs)
