"""FMViT (arXiv 2311.05707, Tan, Geng, Xie 2023): a RECONSTRUCTION, not the authors' model.

No code or weights were ever released (github.com/tany0699/FMViT holds only "Code coming soon") and the paper body
could not be read from any stored source (searched again for this file: arXiv/ar5iv, HF papers, paperswithcode,
catalyzex, emergentmind, bohrium, code and issue indexes; only the abstract is available). What is known:

- [abstract] a hybrid CNN/ViT that mixes high- and low-frequency features; deploy-friendly parts named gMLP
  ("Convolutional Multigroup Reparameterization"), RLMHSA ("Lightweight Multi-head Self-Attention") and CFB
  ("Convolutional Fusion Block"); TensorRT and CoreML targets; baselines ResNet-101, EfficientNet-B5 and MobileOne.
- [third-party table transcription, igm503/heedless-backbones family_data/FMViT.yml] five sizes T/S/M/B/L with
  2.0/6.4/12.8/24.3/35.3 M params, 0.3/0.8/2.0/4.2/7.1 G(FL|MAC)s at 224 and 72.9/78.5/80.3/82.4/83.3 % top-1.

Everything else is the project's own design (``shared/reference/fmvit.md``, "DESIGN PROPOSAL"), modelled on Next-ViT's
NCB/NTB and on MobileOne/FastViT reparameterization and sized to the five targets. Every such choice is a field of
:class:`FMViTConfig` (with the reason), so it can be changed when facts appear.

Blocks (training form -> deploy form after ``reparameterize()``):
    CFB   x = PE(x); x += ConvMixer(x); x += gMLP(BN(x))
          ConvMixer: grouped 3x3 MobileOne block (3x3-BN + 1x1-BN + identity-BN) -> ReLU -> 1x1 conv
          gMLP: RepMG1x1 (C -> rC) -> ReLU -> RepMG1x1 (rC -> C); RepMG1x1 = sum of 1x1 conv-BN with groups {1,2,4}
    FMB   (frequency mixing) xl = PE(x -> C_l); xl += RLMHSA(BN(xl))              low frequency (global attention)
          xh = Conv1x1-BN(xl -> C_h); xh += ConvMixer(xh)                      high frequency (local conv)
          x = cat(xl, xh); x += gMLP(BN(x))
    RLMHSA  Q = 1x1(x); r = AvgPool_sr(x) + DWConv_sr-BN(x) (2-D K/V reduction); K, V = 1x1(r); SDPA; 1x1 out
Deploy: every multi-branch conv becomes one conv, each RepMG1x1 one dense 1x1 conv, AvgPool + DWConv-BN one depthwise
conv, each pre-norm BN is folded into the following conv(s), and the head BN into the classifier: the deploy graph
has no BatchNorm and no parallel branches.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import DropPath, SelectAdaptivePool2d, make_divisible, trunc_normal_
from timm.models import checkpoint_seq
from torch import nn

from zoo.contract import SmallCfg, ZooModel
from zoo.layers import ConvNorm, bn_affine, fold_bn_into_conv, fold_pre_bn_into_linear
from zoo.registry import ModelCfg, register_model
from zoo.vision.fastvit import MobileOneBlock  # FastViT's public reparameterizable 3-branch conv


# ------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FMViTConfig:
    """Every architecture choice of the reconstruction. [P] = project's proposal (not from the paper);
    [T] = sized to the third-party table's params / FLOPs targets."""

    # [P][T] Blocks per stage: 'C' = CFB (high-frequency conv block), 'F' = FMB (frequency-mixing block). The Next-ViT
    # "hybrid strategy": stage 0 conv only, stages 1 and 3 end with one FMB, stage 2 repeats (CCCCF).
    layouts: Tuple[str, ...] = ("C", "F", "CCCCF", "F")
    cfb_widths: Tuple[int, ...] = (32, 64, 128, 256)  # [P][T] output channels of the CFBs of each stage
    fmb_widths: Tuple[Optional[int], ...] = (None, 96, 160, 352)  # [P][T] output channels of the FMBs (None: no FMB)
    # [P] stem, stride 4 in total: two MobileOne 3x3 convs (T, S) or Next-ViT's four (M, B, L; strides 2, 1, 1, 2)
    stem_chs: Tuple[int, ...] = (16, 32)
    stem_strides: Tuple[int, ...] = (2, 2)
    cfb_mlp_ratio: float = 2.0  # [P][T] gMLP hidden ratio in CFBs (2 for T, 3 otherwise)
    fmb_mlp_ratio: float = 2.0  # [P] gMLP hidden ratio in FMBs (Next-ViT's NTB uses 2)
    mlp_groups: Tuple[int, ...] = (1, 2, 4)  # [P] gMLP: parallel 1x1 conv-BN branches with these group counts
    head_dim: int = 32  # [P] attention head width and channels per group of the grouped 3x3 (Next-ViT: 32)
    mixer_kernel: int = 3  # [P] ConvMixer kernel (grouped, one group per head_dim channels, as Next-ViT's MHCA)
    mixer_scale_branch: bool = True  # [P] ConvMixer's MobileOne 1x1 branch (the identity-BN branch is always there)
    attn_ratio: float = 0.75  # [P] FMB: share of channels in the attention (low-frequency) path, as Next-ViT
    attn_width_divisor: int = 32  # [P] ... rounded to the nearest multiple of this (half up; never below one multiple)
    sr_ratios: Tuple[int, ...] = (8, 4, 2, 1)  # [P] RLMHSA 2-D K/V reduction per stage (Next-ViT / PVT values)
    kv_avgpool_branch: bool = True  # [P] K/V reduction = AvgPool_sr + DWConv_sr-BN (folds into one depthwise conv)
    drop_path_rate: float = 0.0  # [P] stochastic depth, linear over all blocks (0/.05/.1/.1/.2 for T/S/M/B/L)

    def __post_init__(self):
        # YAML / CLI overrides arrive as lists
        for f in ("layouts", "cfb_widths", "fmb_widths", "stem_chs", "stem_strides", "mlp_groups", "sr_ratios"):
            object.__setattr__(self, f, tuple(getattr(self, f)))

    def attn_width(self, stage: int) -> int:
        """Channels of the FMB attention path in ``stage`` (the rest of the FMB width goes to the conv path)."""
        w = self.fmb_widths[stage]
        return make_divisible(w * self.attn_ratio, self.attn_width_divisor, round_limit=0.0)

    def validate(self) -> "FMViTConfig":
        n = len(self.layouts)
        for f in ("cfb_widths", "fmb_widths", "sr_ratios"):
            if len(getattr(self, f)) != n:
                raise ValueError(f"FMViT config: {f} has {len(getattr(self, f))} entries but layouts has {n} stages")
        if len(self.stem_chs) != len(self.stem_strides) or math.prod(self.stem_strides) != 4:
            raise ValueError(
                f"FMViT config: stem_chs {self.stem_chs} and stem_strides {self.stem_strides} must have the same length "
                "and the strides must multiply to 4 (feature maps are at strides 4, 8, 16, 32)"
            )
        if self.head_dim < 1 or any(g < 1 for g in self.mlp_groups) or not self.mlp_groups:
            raise ValueError(f"FMViT config: head_dim ({self.head_dim}) and mlp_groups ({self.mlp_groups}) must be >= 1")

        def need(stage, what, value, divisor, why):
            if value <= 0 or value % divisor:
                raise ValueError(
                    f"FMViT config, stage {stage}: {what} = {value} is not a positive multiple of {divisor} ({why}); "
                    f"change the stage's width or {('head_dim' if 'head' in why else 'mlp_groups')}"
                )

        def mlp_ok(stage, what, width, ratio):
            for g in self.mlp_groups:
                need(stage, f"{what} width", width, g, f"gMLP branch with groups={g}")
                need(stage, f"{what} gMLP hidden width", int(width * ratio), g, f"gMLP branch with groups={g}")

        for i, layout in enumerate(self.layouts):
            if not layout or set(layout) - {"C", "F"}:
                raise ValueError(f"FMViT config, stage {i}: layout {layout!r} must be a non-empty string of 'C' and 'F'")
            if "C" in layout:
                w = self.cfb_widths[i]
                need(i, "CFB width", w, self.head_dim, "one head_dim-wide group per channel block in the grouped 3x3")
                mlp_ok(i, "CFB", w, self.cfb_mlp_ratio)
            if "F" in layout:
                if self.fmb_widths[i] is None:
                    raise ValueError(f"FMViT config, stage {i}: layout {layout!r} has an FMB but fmb_widths[{i}] is None")
                w = self.fmb_widths[i]
                cl = self.attn_width(i)
                need(i, "FMB attention width", cl, self.head_dim, "attention heads of head_dim channels")
                need(i, "FMB conv width (FMB width - attention width)", w - cl, self.head_dim,
                     "one head_dim-wide group per channel block in the grouped 3x3")
                mlp_ok(i, "FMB", w, self.fmb_mlp_ratio)
            if self.sr_ratios[i] < 1:
                raise ValueError(f"FMViT config, stage {i}: sr_ratio {self.sr_ratios[i]} must be >= 1")
        return self


# [P][T] The five sizes (shared/reference/fmvit.md, proposal sizing table); targets in TARGETS below.
FMVIT_CONFIGS = {
    "tiny": FMViTConfig(),
    "small": FMViTConfig(
        layouts=("CC", "CF", "CCCCF", "CCF"), cfb_widths=(32, 96, 192, 384), fmb_widths=(None, 128, 256, 512),
        cfb_mlp_ratio=3.0, drop_path_rate=0.05,
    ),
    "medium": FMViTConfig(
        layouts=("C", "CF", "CCCCF" * 2, "CF"), cfb_widths=(64, 128, 256, 512), fmb_widths=(None, 160, 352, 672),
        stem_chs=(32, 16, 32, 64), stem_strides=(2, 1, 1, 2), cfb_mlp_ratio=3.0, drop_path_rate=0.1,
    ),
    "base": FMViTConfig(
        layouts=("CCC", "CCF", "CCCCF" * 3, "CF"), cfb_widths=(64, 160, 320, 640), fmb_widths=(None, 224, 416, 864),
        stem_chs=(32, 16, 32, 64), stem_strides=(2, 1, 1, 2), cfb_mlp_ratio=3.0, drop_path_rate=0.1,
    ),
    "large": FMViTConfig(
        layouts=("CCC", "CF", "CCCCF" * 4, "F"), cfb_widths=(96, 192, 384, 768), fmb_widths=(None, 256, 512, 1024),
        stem_chs=(48, 24, 48, 96), stem_strides=(2, 1, 1, 2), cfb_mlp_ratio=3.0, drop_path_rate=0.2,
    ),
}

# Reported by the paper (via the third-party table transcription): params (M), G(FL|MAC)s at 224, ImageNet top-1 (%).
TARGETS = {
    "fmvit_tiny": (2.0, 0.3, 72.9),
    "fmvit_small": (6.4, 0.8, 78.5),
    "fmvit_medium": (12.8, 2.0, 80.3),
    "fmvit_base": (24.3, 4.2, 82.4),
    "fmvit_large": (35.3, 7.1, 83.3),
}


# ------------------------------------------------------------------------------------------------- blocks


def _new_conv(like: torch.Tensor, in_chs: int, out_chs: int, k: int, stride: int, groups: int, weight, bias) -> nn.Conv2d:
    conv = nn.Conv2d(in_chs, out_chs, k, stride, 0 if k == stride else k // 2, groups=groups, bias=True,
                     device=like.device, dtype=like.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


class ConvBN(nn.Module):
    """conv (no bias) + BatchNorm, one training-time branch."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x):
        return self.bn(self.conv(x))


class RepMultiGroupConv1x1(nn.Module):
    """gMLP's "multi-group" 1x1 conv [P]: sum of 1x1 conv-BN branches with different group counts.

    A grouped 1x1 weight is block-diagonal, so each folded branch expands to a dense (out, in) matrix and all branches
    sum into one dense, biased 1x1 conv (``conv``) at deploy.
    """

    def __init__(self, in_chs: int, out_chs: int, groups: Sequence[int] = (1, 2, 4), deploy: bool = False):
        super().__init__()
        self.in_chs, self.out_chs = in_chs, out_chs
        self.deployed = deploy
        if deploy:
            self.conv = nn.Conv2d(in_chs, out_chs, 1)
            self.branches = nn.ModuleList()
        else:
            self.conv = nn.Identity()  # placeholder so TorchScript sees both forms
            self.branches = nn.ModuleList(ConvBN(in_chs, out_chs, 1, groups=g) for g in groups)

    def forward(self, x):
        if self.deployed:
            return self.conv(x)
        out = x
        for i, b in enumerate(self.branches):
            out = b(x) if i == 0 else out + b(x)
        return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.deployed:
            return
        ref = self.branches[0].conv.weight
        w = torch.zeros(self.out_chs, self.in_chs, dtype=torch.float64, device=ref.device)
        b = torch.zeros(self.out_chs, dtype=torch.float64, device=ref.device)
        for br in self.branches:
            g = br.conv.groups
            bw, bb = fold_bn_into_conv(br.conv.weight, None, br.bn)
            bw = bw.double().reshape(self.out_chs, self.in_chs // g)
            # block-diagonal expansion: group j's outputs see only group j's inputs
            w += torch.block_diag(*bw.reshape(g, self.out_chs // g, self.in_chs // g).unbind(0))
            b += bb.double()
        self.conv = _new_conv(ref, self.in_chs, self.out_chs, 1, 1, 1, w.reshape(self.out_chs, self.in_chs, 1, 1).to(ref.dtype), b.to(ref.dtype))
        self.branches = nn.ModuleList()
        self.deployed = True


class GroupMlp(nn.Module):
    """gMLP [P]: RepMG1x1 (C -> rC) -> ReLU -> RepMG1x1 (rC -> C). Deploy form: a plain two-layer 1x1-conv MLP."""

    def __init__(self, dim: int, ratio: float, groups: Sequence[int], deploy: bool = False):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = RepMultiGroupConv1x1(dim, hidden, groups, deploy)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = RepMultiGroupConv1x1(hidden, dim, groups, deploy)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

    @torch.no_grad()
    def fold_input_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Fold a per-channel affine applied before the MLP (the pre-norm BN) into fc1."""
        self.fc1.reparameterize()
        fold_pre_bn_into_linear(self.fc1.conv, scale, shift)


class ConvMixer(nn.Module):
    """Local (high-frequency) token mixer [P]: grouped kxk MobileOne block (kxk-BN, 1x1-BN and identity-BN branches;
    one group per head_dim channels) -> ReLU -> 1x1 conv. Deploy form: one grouped kxk conv -> ReLU -> 1x1 conv."""

    def __init__(self, dim: int, cfg: FMViTConfig, deploy: bool = False):
        super().__init__()
        self.rep_conv = MobileOneBlock(
            dim, dim, cfg.mixer_kernel, 1, groups=dim // cfg.head_dim, use_act=True,
            use_scale_branch=cfg.mixer_scale_branch, act_layer=nn.ReLU, deploy=deploy,
        )
        self.proj = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x):
        return self.proj(self.rep_conv(x))


class PatchEmbed(nn.Module):
    """Channel change / downsampling (Next-ViT's): 2x2 average pool (stride 2, ceil mode) when downsampling, then a
    1x1 conv-BN (BN folded at deploy)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, deploy: bool = False):
        super().__init__()
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) if stride == 2 else nn.Identity()
        self.proj = ConvNorm(in_chs, out_chs, 1, deploy=deploy)

    def forward(self, x):
        return self.proj(self.pool(x))


def _patch_embed(in_chs: int, out_chs: int, stride: int, deploy: bool) -> nn.Module:
    return PatchEmbed(in_chs, out_chs, stride, deploy) if (stride == 2 or in_chs != out_chs) else nn.Identity()


def _norm(dim: int, deploy: bool) -> nn.Module:
    return nn.Identity() if deploy else nn.BatchNorm2d(dim)


class KVReduce(nn.Module):
    """RLMHSA's 2-D K/V token reduction [P]: AvgPool(sr, sr) + depthwise sr x sr stride-sr conv-BN.

    Average pooling is a depthwise conv with weights 1/sr^2, so the sum folds into one depthwise conv (``conv``).
    """

    def __init__(self, dim: int, sr: int, avgpool_branch: bool = True, deploy: bool = False):
        super().__init__()
        self.dim, self.sr = dim, sr
        self.deployed = deploy
        self.use_pool = avgpool_branch
        if deploy:
            self.conv = nn.Conv2d(dim, dim, sr, sr, groups=dim)
            self.pool = nn.Identity()
            self.dw = nn.Identity()
        else:
            self.conv = nn.Identity()
            self.pool = nn.AvgPool2d(sr, sr) if avgpool_branch else nn.Identity()
            self.dw = ConvBN(dim, dim, sr, sr, groups=dim)

    def forward(self, x):
        if self.deployed:
            return self.conv(x)
        if self.use_pool:
            return self.pool(x) + self.dw(x)
        return self.dw(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.deployed:
            return
        ref = self.dw.conv.weight
        w, b = fold_bn_into_conv(ref, None, self.dw.bn)
        w = w.double()
        if self.use_pool:
            w = w + 1.0 / self.sr**2
        self.conv = _new_conv(ref, self.dim, self.dim, self.sr, self.sr, self.dim, w.to(ref.dtype), b)
        self.pool, self.dw = nn.Identity(), nn.Identity()
        self.deployed = True

    @torch.no_grad()
    def fold_input_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Make ``self(x)`` equal the old ``self(scale * x + shift)`` (the conv is depthwise, so per channel)."""
        self.reparameterize()
        w = self.conv.weight
        self.conv.bias.add_(shift * w.sum(dim=(1, 2, 3)))
        w.mul_(scale.reshape(-1, 1, 1, 1))


class RLMHSA(nn.Module):
    """Reparameterizable lightweight multi-head self-attention [P] (CMT's LMHSA with a 2-D, foldable K/V reduction).

    No positional bias [P]: the surrounding convs carry position, as in Next-ViT.
    """

    def __init__(self, dim: int, head_dim: int, sr: int, avgpool_branch: bool = True, deploy: bool = False):
        super().__init__()
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.q = nn.Conv2d(dim, dim, 1)
        self.reduce = KVReduce(dim, sr, avgpool_branch, deploy) if sr > 1 else nn.Identity()
        self.k = nn.Conv2d(dim, dim, 1)
        self.v = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h, d = self.num_heads, self.head_dim
        q = self.q(x).reshape(B, h, d, -1).transpose(-1, -2)
        r = self.reduce(x)
        k = self.k(r).reshape(B, h, d, -1).transpose(-1, -2)
        v = self.v(r).reshape(B, h, d, -1).transpose(-1, -2)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return self.proj(o.transpose(-1, -2).reshape(B, C, H, W))

    @torch.no_grad()
    def fold_input_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Fold the pre-norm BN: into Q directly, and into K/V through the (linear, depthwise) reduction."""
        fold_pre_bn_into_linear(self.q, scale, shift)
        if isinstance(self.reduce, KVReduce):
            self.reduce.fold_input_affine(scale, shift)
        else:
            fold_pre_bn_into_linear(self.k, scale, shift)
            fold_pre_bn_into_linear(self.v, scale, shift)


class CFB(nn.Module):
    """Convolutional Fusion Block [P] (the high-frequency block; Next-ViT NCB counterpart):
    x = PE(x); x += ConvMixer(x); x += gMLP(BN(x))."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, cfg: FMViTConfig, drop_path: float = 0.0, deploy=False):
        super().__init__()
        self.patch_embed = _patch_embed(in_chs, out_chs, stride, deploy)
        self.mixer = ConvMixer(out_chs, cfg, deploy)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm = _norm(out_chs, deploy)
        self.mlp = GroupMlp(out_chs, cfg.cfb_mlp_ratio, cfg.mlp_groups, deploy)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        x = self.patch_embed(x)
        x = x + self.drop_path1(self.mixer(x))
        return x + self.drop_path2(self.mlp(self.norm(x)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if isinstance(self.norm, nn.BatchNorm2d):
            self.mlp.fold_input_affine(*bn_affine(self.norm))
            self.norm = nn.Identity()


class FMB(nn.Module):
    """Frequency-Mixing Block [P] (Next-ViT NTB counterpart): RLMHSA on ``attn_chs`` channels (low frequency), a
    ConvMixer on a 1x1 projection of them (high frequency), concatenated (mixed), then a gMLP."""

    def __init__(self, in_chs: int, out_chs: int, attn_chs: int, stride: int, sr: int, cfg: FMViTConfig,
                 drop_path: float = 0.0, deploy: bool = False):
        super().__init__()
        conv_chs = out_chs - attn_chs
        self.patch_embed = _patch_embed(in_chs, attn_chs, stride, deploy)
        self.norm1 = _norm(attn_chs, deploy)
        self.attn = RLMHSA(attn_chs, cfg.head_dim, sr, cfg.kv_avgpool_branch, deploy)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.projection = ConvNorm(attn_chs, conv_chs, 1, deploy=deploy)
        self.mixer = ConvMixer(conv_chs, cfg, deploy)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _norm(out_chs, deploy)
        self.mlp = GroupMlp(out_chs, cfg.fmb_mlp_ratio, cfg.mlp_groups, deploy)
        self.drop_path3 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        x = self.patch_embed(x)
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        h = self.projection(x)
        h = h + self.drop_path2(self.mixer(h))
        x = torch.cat([x, h], dim=1)
        return x + self.drop_path3(self.mlp(self.norm2(x)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if isinstance(self.norm1, nn.BatchNorm2d):
            self.attn.fold_input_affine(*bn_affine(self.norm1))
            self.norm1 = nn.Identity()
        if isinstance(self.norm2, nn.BatchNorm2d):
            self.mlp.fold_input_affine(*bn_affine(self.norm2))
            self.norm2 = nn.Identity()


class FMViTStage(nn.Module):
    def __init__(self, blocks: List[nn.Module]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class NormClassifierHead(nn.Module):
    """BatchNorm -> global pool -> dropout -> linear [P] (the head norm sits on the final map, before pooling).

    Deploy form: average pooling and an eval-mode BN are both per-channel linear maps, so the BN folds into ``fc``.
    Its affine is kept as ``pre_scale`` / ``pre_shift`` buffers (a plain mul/add, used only for ``pre_logits``,
    without a classifier, or before a non-average pool), so every output and a later ``reset()`` stay exact.
    """

    def __init__(self, dim: int, num_classes: int, pool_type: str = "avg", drop_rate: float = 0.0, deploy: bool = False):
        super().__init__()
        self.dim = dim
        self.deployed = deploy
        self.norm = nn.Identity() if deploy else nn.BatchNorm2d(dim)
        self.register_buffer("pre_scale", torch.ones(dim), persistent=deploy)
        self.register_buffer("pre_shift", torch.zeros(dim), persistent=deploy)
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.affine_in_fc = deploy and self._can_fold()

    def _can_fold(self) -> bool:
        return isinstance(self.fc, nn.Linear) and self.global_pool.pool_type == "avg"

    def _affine(self, x):
        shape = [1, self.dim] + [1] * (x.dim() - 2)
        return x * self.pre_scale.reshape(shape) + self.pre_shift.reshape(shape)

    def forward(self, x, pre_logits: bool = False):
        if not self.deployed:
            x = self.global_pool(self.norm(x))
            return x if pre_logits else self.fc(self.drop(x))
        if self.affine_in_fc:
            x = self.global_pool(x)
            return self._affine(x) if pre_logits else self.fc(self.drop(x))
        x = self.global_pool(self._affine(x))
        return x if pre_logits else self.fc(self.drop(x))

    def reset(self, num_classes: int, pool_type: Optional[str] = None) -> None:
        if pool_type is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        ref = self.pre_scale
        self.fc = nn.Linear(self.dim, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0 else nn.Identity()
        if self.deployed:
            self.affine_in_fc = self._can_fold()
            if self.affine_in_fc:
                fold_pre_bn_into_linear(self.fc, self.pre_scale, self.pre_shift)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.deployed:
            return
        scale, shift = bn_affine(self.norm)
        self.register_buffer("pre_scale", scale.detach().clone(), persistent=True)
        self.register_buffer("pre_shift", shift.detach().clone(), persistent=True)
        self.norm = nn.Identity()
        self.deployed = True
        self.affine_in_fc = self._can_fold()
        if self.affine_in_fc:
            fold_pre_bn_into_linear(self.fc, scale, shift)


# -------------------------------------------------------------------------------------------------- model


class FMViT(ZooModel):
    """FMViT reconstruction with timm's model API (``zoo.contract.ZooModel``: intermediates, pruning, head reset).

    Args:
        cfg: the architecture (:class:`FMViTConfig`); keyword ``**arch`` overrides replace its fields.
        in_chans, num_classes, global_pool, drop_rate: as in timm.
        deploy: build the inference form directly (to load deploy-form weights).
    """

    def __init__(
        self,
        cfg: Optional[FMViTConfig] = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        deploy: bool = False,
        **arch,
    ):
        super().__init__()
        cfg = dataclasses.replace(cfg or FMViTConfig(), **arch).validate()
        self.arch = cfg
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.deploy = deploy
        self.grad_checkpointing = False

        stem, c = [], in_chans
        for out, s in zip(cfg.stem_chs, cfg.stem_strides):
            stem.append(MobileOneBlock(c, out, 3, s, use_act=True, act_layer=nn.ReLU, deploy=deploy))
            c = out
        self.stem = nn.Sequential(*stem)

        n = sum(len(layout) for layout in cfg.layouts)
        dpr = [cfg.drop_path_rate * i / max(1, n - 1) for i in range(n)]  # python floats: works on the meta device
        stages, self.feature_info, idx = [], [], 0
        for i, layout in enumerate(cfg.layouts):
            blocks = []
            for j, kind in enumerate(layout):
                stride = 2 if (j == 0 and i > 0) else 1
                if kind == "F":
                    out = cfg.fmb_widths[i]
                    blk = FMB(c, out, cfg.attn_width(i), stride, cfg.sr_ratios[i], cfg, dpr[idx], deploy)
                else:
                    out = cfg.cfb_widths[i]
                    blk = CFB(c, out, stride, cfg, dpr[idx], deploy)
                blocks.append(blk)
                c, idx = out, idx + 1
            stages.append(FMViTStage(blocks))
            self.feature_info.append(dict(num_chs=c, reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = c
        self.head = NormClassifierHead(c, num_classes, global_pool, drop_rate, deploy)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # [P] convs keep PyTorch's default (Kaiming-uniform) init, as MobileOne / FastViT; Linear layers get
        # trunc_normal(0.02). Next-ViT's trunc_normal(0.02) on every conv makes the weights so small that Adam's early
        # steps change them by ~10 % each, and the BN running statistics (of many parallel branches) lag far behind
        # the batch statistics: eval accuracy stays at chance for several epochs on short schedules.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # timm model API: forward / forward_head, set_grad_checkpointing, group_matcher come from ZooModel ---------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.stages(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every block in place (same as ``zoo.deploy.reparameterize(model, inplace=True)``)."""
        for m in list(self.modules()):
            if m is not self and hasattr(m, "reparameterize"):
                m.reparameterize()
        self.deploy = True


# -------------------------------------------------------------------------------------------- registration

# Measured here (deploy form, 224 px, tests/vision/test_fmvit.py asserts these): params (M), GMACs.
MEASURED = {
    "fmvit_tiny": (1.98, 0.29),
    "fmvit_small": (6.63, 0.82),
    "fmvit_medium": (12.32, 2.00),
    "fmvit_base": (23.63, 4.22),
    "fmvit_large": (35.43, 7.14),
}


def _cfg(name: str) -> ModelCfg:
    params, gflops, top1 = TARGETS[name]
    mp, mg = MEASURED[name]
    notes = (
        f"RECONSTRUCTION: no official code or weights exist; the architecture is this project's design sized to the "
        f"paper's table. Deploy form at 224 px: {mp:.2f} M params, {mg:.2f} GMACs measured; {params} M, {gflops} G "
        f"reported. top1 is the paper's reported value for its own unreleased model, not a result of this code."
    )
    return ModelCfg(
        family="fmvit", paper="2311.05707", license="n/a (no weights)", crop_pct=0.95, interpolation="bicubic",
        first_conv="stem.0.conv_kxk.0.conv", classifier="head.fc", metrics={"top1": top1}, notes=notes,
    )


default_cfgs = {name: _cfg(name) for name in TARGETS}

# tests/test_contract.py: every block kind (MobileOne stem, CFB with stride 2 and channel change, FMB with K/V reduction
# sr 4 / 2 and without at sr 1) at one shared small size, so the five sizes share the TorchScript / FX checks.
small_cfgs = {
    "fmvit_*": SmallCfg(dict(layouts=("C", "F", "CF", "F"), cfb_widths=(32, 32, 64, 64), fmb_widths=(None, 96, 96, 128),
                             stem_chs=(16, 32), stem_strides=(2, 2), cfb_mlp_ratio=2.0, drop_path_rate=0.0), img_size=64),
}


def _create(size: str, kwargs: dict) -> FMViT:
    return FMViT(FMVIT_CONFIGS[size], **kwargs)


@register_model
def fmvit_tiny(**kwargs) -> FMViT:
    return _create("tiny", kwargs)


@register_model
def fmvit_small(**kwargs) -> FMViT:
    return _create("small", kwargs)


@register_model
def fmvit_medium(**kwargs) -> FMViT:
    return _create("medium", kwargs)


@register_model
def fmvit_base(**kwargs) -> FMViT:
    return _create("base", kwargs)


@register_model
def fmvit_large(**kwargs) -> FMViT:
    return _create("large", kwargs)
