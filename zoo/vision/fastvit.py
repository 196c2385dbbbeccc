"""FastViT, the MobileCLIP image encoders MCi0-MCi4 and FastViTHD (the FastVLM vision encoder).

Papers: FastViT arXiv 2303.14189 (official code apple/ml-fastvit); MobileCLIP arXiv 2311.17049 (apple/ml-mobileclip);
MobileCLIP2 arXiv 2508.20691; FastVLM arXiv 2412.13303 (apple/ml-fastvlm, ``mci.py``). timm ports all of them as
``fastvit_*``; our parameter names follow timm's layout, and :func:`checkpoint_filter_fn` also reads Apple's layouts
(ml-fastvit ``network.N`` lists, MobileCLIP ``image_encoder.model.``, FastVLM/LLaVA ``model.vision_tower.``, open_clip
``visual.trunk.``, transformers ``vision_tower.timm_model.``), in training or deploy form.

Structure: a stride-4 stem of MobileOne blocks, then stages of RepMixer blocks (depthwise token mixing that folds into
a single 3x3 depthwise conv) and, late, attention blocks behind a reparameterizable conditional positional encoding
(RepCPE). Between stages a RepLKNet-style large-kernel conv (7x7 + 3x3, optionally with SE) halves the resolution.
The head is a 3x3 depthwise MobileOne block with SE that doubles the width (``final_conv``), average pooling and a
linear layer (the CLIP projection for MCi / FastViTHD). MCi3, MCi4 and FastViTHD have a fifth stage (stride 64).

Training form vs deploy form: every MobileOne block, large-kernel conv, RepMixer and RepCPE has ``reparameterize()``
(in place, idempotent) and builds its single-conv inference form directly with ``deploy=True`` (Apple / timm call it
``inference_mode``, accepted as an alias). As in the official code, the ConvFFN depthwise conv + BatchNorm and the
layer scales stay unfused, so deploy-form parameter counts and keys equal Apple's and timm's; ``extra_folds=True``
additionally folds those (every BatchNorm disappears) at the price of a state dict only this implementation reads.

Differences between implementations are constructor arguments (see MODEL_CARD.md): ``lkc_use_act`` (ml-fastvit
computes the downsampling conv's GELU and discards it; MobileCLIP and FastVLM apply it), ``layer_scale_init_value``
(ml-fastvit uses 1e-6 for SA36/MA36, timm 1e-5), ``feature_tap`` (which tensor the dense-prediction features are) and
``head_bias`` (Apple's CLIP projection has no bias; timm adds a zero one).
"""
import logging
import re
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, LayerNorm2d, SqueezeExcite, trunc_normal_
from timm.models import FeatureInfo, checkpoint_seq
from torch import nn

from zoo.contract import SmallCfg, ZooModel, feature_take_indices
from zoo.layers import bn_affine, fold_bn_into_conv, fold_pre_bn_into_linear
from zoo.registry import CheckpointSource, ModelCfg, register_model

log = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------------- helpers


def _identity_kernel(channels: int, groups: int, k: int, like: torch.Tensor) -> torch.Tensor:
    """Kernel of a (grouped) k x k conv that returns its input: a one at the centre tap of each channel's own input."""
    per_group = channels // groups
    w = torch.zeros(channels, per_group, k, k, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    w[idx, idx % per_group, k // 2, k // 2] = 1.0
    return w


def _pad_to(kernel: torch.Tensor, k: int) -> torch.Tensor:
    p = (k - kernel.shape[-1]) // 2
    return F.pad(kernel, [p, p, p, p]) if p else kernel


def _new_conv(in_chs, out_chs, k, stride, groups, weight, bias) -> nn.Conv2d:
    conv = nn.Conv2d(in_chs, out_chs, k, stride, k // 2, groups=groups, bias=True, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


@torch.no_grad()
def _set_conv_bn_to(branch: "ConvBN", weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Make ``bn(conv(x))`` equal a conv with ``weight`` / ``bias`` (BN becomes an exact identity plus shift)."""
    branch.conv.weight.copy_(weight)
    bn = branch.bn
    bn.weight.fill_(1.0)
    bn.bias.copy_(bias)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)


@torch.no_grad()
def _zero_branch(branch: nn.Module | None) -> None:
    if branch is None:
        return
    if isinstance(branch, ConvBN):
        branch.conv.weight.zero_()
        branch = branch.bn
    branch.weight.zero_()
    branch.bias.zero_()
    branch.running_mean.zero_()
    branch.running_var.fill_(1.0)


def _resolve_norm(norm_layer: str | Callable[..., nn.Module]) -> Callable[[int], nn.Module]:
    if callable(norm_layer):
        return norm_layer
    key = str(norm_layer).lower()
    if key in ("batchnorm", "batchnorm2d", "bn"):
        return nn.BatchNorm2d
    if key in ("layernorm", "layernorm2d", "ln", "layernormchannel"):
        return lambda c: LayerNorm2d(c, eps=1e-5)
    raise ValueError(f"norm_layer={norm_layer!r} is not known; use 'batchnorm' (FastViT, MCi0-2) or 'layernorm' (MCi3/4)")


class ConvBN(nn.Module):
    """conv (no bias) + BatchNorm; keys ``conv.*`` / ``bn.*`` as timm's ``ConvNormAct``."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x):
        return self.bn(self.conv(x))

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fold_bn_into_conv(self.conv.weight, None, self.bn)


# ------------------------------------------------------------------------------------------ reparam blocks


class MobileOneBlock(nn.Module):
    """MobileOne block (arXiv 2206.04040): parallel k x k conv-BN, 1x1 conv-BN and identity-BN branches, summed,
    then optional SE and activation. The deploy form is one biased k x k conv (``reparam_conv``).

    Args:
        use_scale_branch: add the 1x1 branch (only when k > 1).
        num_conv_branches: how many k x k conv-BN branches (FastViT uses 1; RepMixer's ``norm`` uses 0).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        use_se: bool = False,
        use_act: bool = True,
        use_scale_branch: bool = True,
        num_conv_branches: int = 1,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        deploy: bool = False,
    ):
        super().__init__()
        self.in_chs, self.out_chs, self.kernel_size, self.stride, self.groups = in_chs, out_chs, kernel_size, stride, groups
        self.deployed = deploy
        self.se = SqueezeExcite(out_chs, rd_divisor=1) if use_se else nn.Identity()  # rd 1/16, ReLU, sigmoid
        self.act = act_layer() if use_act else nn.Identity()
        # The form not built is None (not absent), so TorchScript resolves forward's branches statically.
        self.reparam_conv: Optional[nn.Conv2d] = None
        self.identity = self.conv_kxk = self.conv_scale = None
        if deploy:
            self.reparam_conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups)
        else:
            self.identity = nn.BatchNorm2d(in_chs) if (in_chs == out_chs and stride == 1) else None
            self.conv_kxk = (
                nn.ModuleList(ConvBN(in_chs, out_chs, kernel_size, stride, groups) for _ in range(num_conv_branches))
                if num_conv_branches > 0 else None
            )
            self.conv_scale = (
                ConvBN(in_chs, out_chs, 1, stride, groups) if (kernel_size > 1 and use_scale_branch) else None
            )

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.act(self.se(self.reparam_conv(x)))
        else:
            out: Optional[torch.Tensor] = None
            if self.identity is not None:
                out = self.identity(x)
            if self.conv_scale is not None:
                y = self.conv_scale(x)
                out = y if out is None else out + y
            if self.conv_kxk is not None:
                for branch in self.conv_kxk:
                    y = branch(x)
                    out = y if out is None else out + y
            assert out is not None, "a MobileOneBlock needs at least one branch"
            return self.act(self.se(out))

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the single conv equal to the sum of the branches (in float64, cast back)."""
        if self.deployed:
            return self.reparam_conv.weight, self.reparam_conv.bias
        k = self.kernel_size
        ref = next(self.parameters())
        w = torch.zeros(self.out_chs, self.in_chs // self.groups, k, k, dtype=torch.float64, device=ref.device)
        b = torch.zeros(self.out_chs, dtype=torch.float64, device=ref.device)
        for branch in list(self.conv_kxk or []) + ([self.conv_scale] if self.conv_scale is not None else []):
            bw, bb = branch.fused()
            w += _pad_to(bw.double(), k)
            b += bb.double()
        if self.identity is not None:
            scale, shift = bn_affine(self.identity)
            w += _identity_kernel(self.in_chs, self.groups, k, w) * scale.double().reshape(-1, 1, 1, 1)
            b += shift.double()
        return w.to(ref.dtype), b.to(ref.dtype)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.deployed:
            return
        w, b = self.fused()
        conv = _new_conv(self.in_chs, self.out_chs, self.kernel_size, self.stride, self.groups, w, b)
        self.identity = self.conv_kxk = self.conv_scale = None
        self.reparam_conv = conv
        self.deployed = True

    @torch.no_grad()
    def load_fused_(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Set the training-form branches so the block computes the conv (weight, bias) exactly (deploy -> train)."""
        if self.deployed:
            self.reparam_conv.weight.copy_(weight)
            self.reparam_conv.bias.copy_(bias)
            return
        if self.conv_kxk is None:
            raise ValueError("a MobileOneBlock without k x k branches cannot represent an arbitrary conv")
        _set_conv_bn_to(self.conv_kxk[0], weight, bias)
        for branch in list(self.conv_kxk[1:]) + [self.conv_scale, self.identity]:
            _zero_branch(branch)


class ReparamLargeKernelConv(nn.Module):
    """RepLKNet-style large-kernel conv (arXiv 2203.06717): k x k conv-BN + small-kernel conv-BN, then optional SE
    (rd 1/4, MCi) and activation. ``act_layer=None`` reproduces ml-fastvit, whose GELU output is discarded."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int,
        groups: int,
        small_kernel: int | None = 3,
        use_se: bool = False,
        act_layer: Callable[[], nn.Module] | None = None,
        deploy: bool = False,
    ):
        super().__init__()
        self.in_chs, self.out_chs, self.kernel_size, self.stride, self.groups = in_chs, out_chs, kernel_size, stride, groups
        self.deployed = deploy
        if small_kernel is not None and small_kernel > kernel_size:
            raise ValueError(f"small_kernel={small_kernel} must not exceed kernel_size={kernel_size}")
        self.reparam_conv: Optional[nn.Conv2d] = None  # None, not absent: TorchScript (see MobileOneBlock)
        self.large_conv = self.small_conv = None
        if deploy:
            self.reparam_conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups)
        else:
            self.large_conv = ConvBN(in_chs, out_chs, kernel_size, stride, groups)
            self.small_conv = ConvBN(in_chs, out_chs, small_kernel, stride, groups) if small_kernel else None
        self.se = SqueezeExcite(out_chs, rd_ratio=0.25) if use_se else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x):
        if self.reparam_conv is not None:
            out = self.reparam_conv(x)
        else:
            out = self.large_conv(x)
            if self.small_conv is not None:
                out = out + self.small_conv(x)
        return self.act(self.se(out))

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.deployed:
            return self.reparam_conv.weight, self.reparam_conv.bias
        w, b = self.large_conv.fused()
        w, b = w.double(), b.double()
        if self.small_conv is not None:
            sw, sb = self.small_conv.fused()
            w, b = w + _pad_to(sw.double(), self.kernel_size), b + sb.double()
        dt = self.large_conv.conv.weight.dtype
        return w.to(dt), b.to(dt)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.deployed:
            return
        w, b = self.fused()
        conv = _new_conv(self.in_chs, self.out_chs, self.kernel_size, self.stride, self.groups, w, b)
        self.large_conv = self.small_conv = None
        self.reparam_conv = conv
        self.deployed = True

    @torch.no_grad()
    def load_fused_(self, weight, bias) -> None:
        if self.deployed:
            self.reparam_conv.weight.copy_(weight)
            self.reparam_conv.bias.copy_(bias)
            return
        _set_conv_bn_to(self.large_conv, weight, bias)
        _zero_branch(self.small_conv)


class LayerScale2d(nn.Module):
    """Per-channel scale ``gamma`` of shape (C, 1, 1) (timm key ``gamma``)."""

    def __init__(self, dim: int, init_value: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim, 1, 1))

    def forward(self, x):
        return x * self.gamma


class RepMixer(nn.Module):
    """RepMixer token mixer: ``x + ls * (mixer(x) - norm(x))`` with depthwise MobileOne blocks; folds (skip included)
    into one depthwise k x k conv: ``W = I + ls * (W_mixer - W_norm)``, ``b = ls * (b_mixer - b_norm)``."""

    def __init__(self, dim: int, kernel_size: int = 3, layer_scale_init_value: float | None = 1e-5, deploy: bool = False):
        super().__init__()
        self.dim, self.kernel_size, self.deployed = dim, kernel_size, deploy
        self.reparam_conv: Optional[nn.Conv2d] = None  # None, not absent: TorchScript (see MobileOneBlock)
        self.norm = self.mixer = self.layer_scale = None
        if deploy:
            self.reparam_conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)
        else:
            self.norm = MobileOneBlock(dim, dim, kernel_size, groups=dim, use_act=False, use_scale_branch=False,
                                       num_conv_branches=0)
            self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim, use_act=False)
            self.layer_scale = (
                LayerScale2d(dim, layer_scale_init_value) if layer_scale_init_value is not None else nn.Identity()
            )

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        else:
            return x + self.layer_scale(self.mixer(x) - self.norm(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.deployed:
            return
        wm, bm = self.mixer.fused()
        wn, bn = self.norm.fused()
        dt = wm.dtype
        g = self.layer_scale.gamma.double().reshape(-1) if isinstance(self.layer_scale, LayerScale2d) else 1.0
        g4 = g.reshape(-1, 1, 1, 1) if isinstance(g, torch.Tensor) else g
        eye = _identity_kernel(self.dim, self.dim, self.kernel_size, wm.double())
        w = eye + g4 * (wm.double() - wn.double())
        b = g * (bm.double() - bn.double())
        conv = _new_conv(self.dim, self.dim, self.kernel_size, 1, self.dim, w.to(dt), b.to(dt))
        self.norm = self.mixer = self.layer_scale = None
        self.reparam_conv = conv
        self.deployed = True

    @torch.no_grad()
    def load_fused_(self, weight, bias) -> None:
        if self.deployed:
            self.reparam_conv.weight.copy_(weight)
            self.reparam_conv.bias.copy_(bias)
            return
        # ls = 1, norm(x) = 0, mixer = (W - I) * x + b  =>  x + mixer(x) - norm(x) = W * x + b
        if isinstance(self.layer_scale, LayerScale2d):
            self.layer_scale.gamma.fill_(1.0)
        _zero_branch(self.norm.identity)
        eye = _identity_kernel(self.dim, self.dim, self.kernel_size, weight)
        self.mixer.load_fused_(weight - eye, bias)


class RepConditionalPosEnc(nn.Module):
    """RepCPE (conditional positional encoding, arXiv 2102.10882): ``x + dwconv(x)``, folded into one depthwise conv."""

    def __init__(self, dim: int, kernel_size: int = 7, deploy: bool = False):
        super().__init__()
        self.dim, self.kernel_size, self.deployed = dim, kernel_size, deploy
        conv = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, bias=True)
        self.reparam_conv: Optional[nn.Conv2d] = None  # None, not absent: TorchScript (see MobileOneBlock)
        self.pos_enc: Optional[nn.Conv2d] = None
        if deploy:
            self.reparam_conv = conv
        else:
            self.pos_enc = conv

    def forward(self, x):
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        else:
            return x + self.pos_enc(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.deployed:
            return
        w = self.pos_enc.weight + _identity_kernel(self.dim, self.dim, self.kernel_size, self.pos_enc.weight)
        conv = _new_conv(self.dim, self.dim, self.kernel_size, 1, self.dim, w, self.pos_enc.bias)
        self.pos_enc = None
        self.reparam_conv = conv
        self.deployed = True

    @torch.no_grad()
    def load_fused_(self, weight, bias) -> None:
        target = self.reparam_conv if self.deployed else self.pos_enc
        eye = 0 if self.deployed else _identity_kernel(self.dim, self.dim, self.kernel_size, weight)
        target.weight.copy_(weight - eye)
        target.bias.copy_(bias)


# ------------------------------------------------------------------------------------------------- blocks


class ConvMlp(nn.Module):
    """ConvFFN: depthwise 7x7 conv + BN, 1x1 fc1, GELU, 1x1 fc2 (dropout after each fc)."""

    def __init__(self, dim: int, hidden: int, act_layer=nn.GELU, drop: float = 0.0):
        super().__init__()
        self.conv = ConvBN(dim, dim, 7, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)
        for m in (self.conv.conv, self.fc1, self.fc2):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.conv(x))))))

    @torch.no_grad()
    def fold_(self, out_scale: torch.Tensor | None = None) -> None:
        """Extra fold: BN into the depthwise conv (it becomes a plain biased conv) and ``out_scale`` into fc2."""
        if isinstance(self.conv, ConvBN):
            w, b = self.conv.fused()
            self.conv = _new_conv(w.shape[0], w.shape[0], 7, 1, w.shape[0], w, b)
        if out_scale is not None:
            s = out_scale.reshape(-1)
            self.fc2.weight.mul_(s.reshape(-1, 1, 1, 1))
            self.fc2.bias.mul_(s)


class RepMixerBlock(nn.Module):
    """``x = RepMixer(x); x = x + drop_path(ls * ConvFFN(x))``."""

    def __init__(self, dim, kernel_size=3, mlp_ratio=4.0, act_layer=nn.GELU, proj_drop=0.0, drop_path=0.0,
                 layer_scale_init_value: float | None = 1e-5, deploy=False, extra_folds=False):
        super().__init__()
        self.extra_folds = extra_folds
        self.token_mixer = RepMixer(dim, kernel_size, layer_scale_init_value, deploy)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer, proj_drop)
        self.layer_scale = LayerScale2d(dim, layer_scale_init_value) if layer_scale_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if deploy and extra_folds:
            self.mlp.conv = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
            self.layer_scale = nn.Identity()

    def forward(self, x):
        x = self.token_mixer(x)
        return x + self.drop_path(self.layer_scale(self.mlp(x)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        self.token_mixer.reparameterize()
        if self.extra_folds:
            ls = self.layer_scale.gamma if isinstance(self.layer_scale, LayerScale2d) else None
            self.mlp.fold_(ls)
            self.layer_scale = nn.Identity()


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions of a (B, C, H, W) map; head_dim 32, no qkv bias."""

    def __init__(self, dim: int, head_dim: int = 32, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention width {dim} is not a multiple of head_dim={head_dim}")
        self.num_heads, self.head_dim = dim // head_dim, head_dim
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).reshape(B, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        t = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        t = self.proj_drop(self.proj(t.transpose(1, 2).reshape(B, H * W, C)))
        return t.transpose(1, 2).reshape(B, C, H, W)


class AttentionBlock(nn.Module):
    """``x = x + drop_path(ls1 * MHSA(norm(x))); x = x + drop_path(ls2 * ConvFFN(x))``."""

    def __init__(self, dim, mlp_ratio=4.0, act_layer=nn.GELU, norm_layer=nn.BatchNorm2d, proj_drop=0.0, drop_path=0.0,
                 layer_scale_init_value: float | None = 1e-5, deploy=False, extra_folds=False):
        super().__init__()
        self.extra_folds = extra_folds
        self.norm = norm_layer(dim)
        self.token_mixer = Attention(dim)
        ls = (lambda: LayerScale2d(dim, layer_scale_init_value)) if layer_scale_init_value is not None else nn.Identity
        self.layer_scale_1 = ls()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer, proj_drop)
        self.layer_scale_2 = ls()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if deploy and extra_folds:
            self.reparameterize()  # same structure, fresh values

    def forward(self, x):
        x = x + self.drop_path1(self.layer_scale_1(self.token_mixer(self.norm(x))))
        return x + self.drop_path2(self.layer_scale_2(self.mlp(x)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if not self.extra_folds:
            return
        if isinstance(self.norm, nn.BatchNorm2d):  # a BN before a linear layer folds into it
            fold_pre_bn_into_linear(self.token_mixer.qkv, *bn_affine(self.norm))
            self.norm = nn.Identity()
        if isinstance(self.layer_scale_1, LayerScale2d):
            s = self.layer_scale_1.gamma.reshape(-1)
            self.token_mixer.proj.weight.mul_(s[:, None])
            self.token_mixer.proj.bias.mul_(s)
            self.layer_scale_1 = nn.Identity()
        ls2 = self.layer_scale_2.gamma if isinstance(self.layer_scale_2, LayerScale2d) else None
        self.mlp.fold_(ls2)
        self.layer_scale_2 = nn.Identity()


class PatchEmbed(nn.Module):
    """Downsampling between stages: large-kernel depthwise conv (stride 2, optional SE) + 1x1 MobileOne block."""

    def __init__(self, in_chs, out_chs, patch_size=7, stride=2, use_se=False, act_layer=nn.GELU, lkc_use_act=False,
                 deploy=False):
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(in_chs, out_chs, patch_size, stride, groups=in_chs, small_kernel=3, use_se=use_se,
                                   act_layer=act_layer if lkc_use_act else None, deploy=deploy),
            MobileOneBlock(out_chs, out_chs, 1, act_layer=act_layer, deploy=deploy),
        )

    def forward(self, x):
        return self.proj(x)


class FastVitStage(nn.Module):
    def __init__(self, dim, dim_out, depth, token_mixer: str, downsample: bool, se_downsample=False, down_patch_size=7,
                 down_stride=2, pos_emb_kernel: int | None = None, kernel_size=3, mlp_ratio=4.0, act_layer=nn.GELU,
                 norm_layer=nn.BatchNorm2d, proj_drop=0.0, drop_path: Sequence[float] = (),
                 layer_scale_init_value=1e-5, lkc_use_act=False, deploy=False, extra_folds=False):
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            self.downsample = PatchEmbed(dim, dim_out, down_patch_size, down_stride, se_downsample, act_layer,
                                         lkc_use_act, deploy)
        elif dim != dim_out:
            raise ValueError(f"a stage without downsampling must keep the width ({dim} != {dim_out})")
        else:
            self.downsample = nn.Identity()
        self.pos_emb = RepConditionalPosEnc(dim_out, pos_emb_kernel, deploy) if pos_emb_kernel else nn.Identity()
        if token_mixer == "repmixer":
            blocks = [RepMixerBlock(dim_out, kernel_size, mlp_ratio, act_layer, proj_drop, drop_path[j],
                                    layer_scale_init_value, deploy, extra_folds) for j in range(depth)]
        elif token_mixer == "attention":
            blocks = [AttentionBlock(dim_out, mlp_ratio, act_layer, norm_layer, proj_drop, drop_path[j],
                                     layer_scale_init_value, deploy, extra_folds) for j in range(depth)]
        else:
            raise ValueError(f"token mixer {token_mixer!r} is not known; use 'repmixer' or 'attention'")
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        x = self.pos_emb(self.downsample(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


# -------------------------------------------------------------------------------------------------- model


class FastVit(ZooModel):
    """FastViT / MCi / FastViTHD backbone with classifier (or CLIP projection) head, following timm's model API.

    Args:
        layers: blocks per stage (4 stages: stride 32; 5 stages: stride 64).
        token_mixers: ``"repmixer"`` or ``"attention"`` per stage.
        embed_dims, mlp_ratios: widths and ConvFFN expansion per stage.
        downsamples: downsample at the start of each stage (stage 0 never; a width change forces one).
        se_downsamples: SE (rd 1/4) in the downsampling conv of that stage (MCi0-2: stages 2 and 3).
        pos_embs: RepCPE kernel size before each stage's blocks (``None``: none).
        lkc_use_act: apply the GELU after the downsampling large-kernel conv. ml-fastvit computes and discards it
            (``False``, the FastViT weights were trained so); MobileCLIP and FastVLM apply it (``True``).
        stem_use_scale_branch: 1x1 branches in the stem MobileOne blocks (``False`` for MCi3/4, FastViTHD).
        layer_scale_init_value: initial layer scale (``None``: no layer scale). ml-fastvit: 1e-6 for SA36/MA36.
        norm_layer: norm before attention: ``"batchnorm"`` (FastViT, MCi0-2) or ``"layernorm"`` (MCi3/4, FastViTHD).
        cls_ratio: width ratio of ``final_conv`` (2.0).
        head_bias: bias in ``head.fc``. Apple's CLIP projection (``head.proj``) has none; timm's copy adds zeros.
        feature_tap: what ``features_only`` returns per stage. ``"stage"``: each stage's output (timm, ml-fastvlm).
            ``"ml_fastvit"``: the ml-fastvit ``fork_feat`` tensors, where a stage with a RepCPE is tapped right
            after the positional encoding, before its attention blocks (``out_indices=[0, 2, 4, 6]`` over the flat
            network list); use it only to reproduce detection/segmentation results made with that code.
        mm_projector_dim: build FastVLM's LLaVA ``mlp2x_gelu`` projector (``mm_projector``) from the ``final_conv``
            width to this language-model width (896 for FastVLM-0.5B, 1536 for 1.5B, 3584 for 7B).
        extra_folds: when reparameterizing, also fold the ConvFFN BatchNorm, the attention BatchNorm and the layer
            scales (deploy state dict then differs from Apple's / timm's).
        deploy: build the inference form (``inference_mode`` is accepted as an alias).
    """

    tail_module = "final_conv"  # forward_features ends with final_conv (a width-doubling conv, not a norm)

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 6, 2),
        token_mixers: Sequence[str] = ("repmixer",) * 4,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        mlp_ratios: Sequence[float] = (4,) * 4,
        downsamples: Sequence[bool] | None = None,
        se_downsamples: Sequence[bool] | None = None,
        pos_embs: Sequence[int | None] | None = None,
        repmixer_kernel_size: int = 3,
        down_patch_size: int = 7,
        down_stride: int = 2,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float | None = 1e-5,
        lkc_use_act: bool = False,
        stem_use_scale_branch: bool = True,
        cls_ratio: float = 2.0,
        norm_layer: str | Callable[..., nn.Module] = "batchnorm",
        act_layer: Callable[[], nn.Module] = nn.GELU,
        head_bias: bool = True,
        feature_tap: str = "stage",
        mm_projector_dim: int | None = None,
        extra_folds: bool = False,
        deploy: bool = False,
        inference_mode: bool | None = None,
    ):
        super().__init__()
        if inference_mode is not None:
            deploy = deploy or inference_mode
        n = len(layers)
        for name, seq in (("token_mixers", token_mixers), ("embed_dims", embed_dims), ("mlp_ratios", mlp_ratios)):
            if len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries but layers has {n}; give one per stage")
        if feature_tap not in ("stage", "ml_fastvit"):
            raise ValueError(f"feature_tap={feature_tap!r}: use 'stage' or 'ml_fastvit'")
        downsamples = tuple(downsamples) if downsamples is not None else (False,) + (True,) * (n - 1)
        se_downsamples = tuple(se_downsamples) if se_downsamples is not None else (False,) * n
        pos_embs = tuple(pos_embs) if pos_embs is not None else (None,) * n
        self._build_args = dict(
            layers=tuple(layers), token_mixers=tuple(token_mixers), embed_dims=tuple(embed_dims),
            mlp_ratios=tuple(mlp_ratios), downsamples=downsamples, se_downsamples=se_downsamples, pos_embs=pos_embs,
            repmixer_kernel_size=repmixer_kernel_size, down_patch_size=down_patch_size, down_stride=down_stride,
            in_chans=in_chans, num_classes=num_classes, global_pool=global_pool, layer_scale_init_value=layer_scale_init_value,
            lkc_use_act=lkc_use_act, stem_use_scale_branch=stem_use_scale_branch, cls_ratio=cls_ratio,
            norm_layer=norm_layer, act_layer=act_layer, head_bias=head_bias, feature_tap=feature_tap,
            mm_projector_dim=mm_projector_dim, extra_folds=extra_folds,
        )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.deploy = deploy
        self.extra_folds = extra_folds
        self.feature_tap = feature_tap
        self.global_pool = global_pool
        norm = _resolve_norm(norm_layer)

        c0 = embed_dims[0]
        self.stem = nn.Sequential(
            MobileOneBlock(in_chans, c0, 3, 2, act_layer=act_layer, use_scale_branch=stem_use_scale_branch, deploy=deploy),
            MobileOneBlock(c0, c0, 3, 2, groups=c0, act_layer=act_layer, use_scale_branch=stem_use_scale_branch,
                           deploy=deploy),
            MobileOneBlock(c0, c0, 1, act_layer=act_layer, use_scale_branch=stem_use_scale_branch, deploy=deploy),
        )
        total = sum(layers)
        dpr = [drop_path_rate * j / (total - 1) if total > 1 else 0.0 for j in range(total)]  # linear over all blocks
        stages, self.feature_info = [], []
        prev, reduction, start = c0, 4, 0
        for i in range(n):
            down = bool(downsamples[i]) or prev != embed_dims[i]
            if down and embed_dims[i] % prev:
                raise ValueError(f"embed_dims[{i}]={embed_dims[i]} must be a multiple of embed_dims[{i - 1 if i else 0}]"
                                 f"={prev}: the downsampling conv is grouped per input channel")
            reduction *= down_stride if down else 1
            stages.append(FastVitStage(
                prev, embed_dims[i], layers[i], token_mixers[i], down, bool(se_downsamples[i]), down_patch_size,
                down_stride, pos_embs[i], repmixer_kernel_size, mlp_ratios[i], act_layer, norm, proj_drop_rate,
                dpr[start:start + layers[i]], layer_scale_init_value, lkc_use_act, deploy, extra_folds,
            ))
            start += layers[i]
            prev = embed_dims[i]
            self.feature_info.append(dict(num_chs=prev, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_stages = n

        final = int(embed_dims[-1] * cls_ratio)
        self.final_conv = MobileOneBlock(embed_dims[-1], final, 3, groups=embed_dims[-1], use_se=True,
                                         act_layer=act_layer, deploy=deploy)
        self.num_features = self.head_hidden_size = final
        self.head_bias = head_bias
        self.head = ClassifierHead(final, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        if not head_bias and num_classes > 0:
            self.head.fc = nn.Linear(final, num_classes, bias=False)
        self.mm_projector = (
            nn.Sequential(nn.Linear(final, mm_projector_dim), nn.GELU(), nn.Linear(mm_projector_dim, mm_projector_dim))
            if mm_projector_dim else None
        )
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # timm model API (forward / forward_head and set_grad_checkpointing come from ZooModel) ----------------------
    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.pos_emb", (0,)),
                (r"^stages\.(\d+)\.\w+\.(\d+)", None),
            ],
        )

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)
        if not self.head_bias and num_classes > 0:
            self.head.fc = nn.Linear(self.num_features, num_classes, bias=False)
        if global_pool is not None:
            self.global_pool = global_pool

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stages and ``final_conv``: the (B, cls_ratio * C_last, H/s, W/s) map the head pools."""
        return self.final_conv(self.stages(self.stem(x)))

    def _take_indices(self, indices) -> list:
        return feature_take_indices(self.num_stages, indices)[0]

    def forward_visual_tokens(self, x: torch.Tensor, projection: str | None = None) -> torch.Tensor:
        """The visual token sequence a language model consumes (FastVLM): the ``final_conv`` map flattened row-major
        to (B, H/s * W/s, C). FastViTHD at 1024x1024: stride 64 -> 16 x 16 = 256 tokens of width 3072.

        Args:
            projection: ``None`` -> the raw 3072-d tokens (what FastVLM's projector reads, its ``image_embeddings``);
                ``"clip"`` -> each token through the CLIP projection ``head.fc`` (768-d for FastViTHD, no pooling);
                ``"llava"`` -> through the LLaVA ``mm_projector`` into the language model's width (needs
                ``mm_projector_dim``).
        """
        t = self.forward_features(x).flatten(2).transpose(1, 2)
        if projection is None or projection == "none":
            return t
        if projection == "clip":
            if self.num_classes <= 0:
                raise ValueError("projection='clip' needs a head: the model was built with num_classes=0")
            return self.head.fc(t)
        if projection == "llava":
            if self.mm_projector is None:
                raise ValueError("projection='llava' needs the LLaVA projector: build with mm_projector_dim=<LM width> "
                                 "(896 for FastVLM-0.5B, 1536 for 1.5B, 3584 for 7B)")
            return self.mm_projector(t)
        raise ValueError(f"projection={projection!r}: use None, 'clip' or 'llava'")

    def as_feature_extractor(self, out_indices: Sequence[int] | None = None) -> "FastVitFeatures":
        """``features_only``: a module returning the maps of ``out_indices`` (default: every stage, stride 64
        included for 5-stage models, as ml-fastvlm's ``out_indices=[0, 2, 4, 7, 10]``)."""
        return FastVitFeatures(self, self._take_indices(out_indices))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every reparameterizable block in place (same as ``zoo.deploy.reparameterize(model, inplace=True)``)."""
        for m in list(self.modules()):
            if m is not self and hasattr(m, "reparameterize"):
                m.reparameterize()
        self.deploy = True


class FastVitFeatures(nn.Module):
    """Multi-scale feature extractor over a FastVit (keys ``stem.*`` / ``stages.*`` as in the full model).

    ``feature_info`` is timm's ``FeatureInfo`` (``.channels()``, ``.reduction()``), as with timm's ``features_only``.
    """

    def __init__(self, model: FastVit, out_indices: Sequence[int]):
        super().__init__()
        self.out_indices = tuple(out_indices)
        last = max(self.out_indices)
        self.stem = model.stem
        self.stages = model.stages[: last + 1]
        self.feature_tap = model.feature_tap
        self.feature_info = FeatureInfo([dict(info) for info in model.feature_info], self.out_indices)
        self.pretrained_cfg = getattr(model, "pretrained_cfg", None)
        self.model_name = getattr(model, "model_name", None)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            if self.feature_tap == "ml_fastvit" and not isinstance(stage.pos_emb, nn.Identity):
                x = stage.pos_emb(stage.downsample(x))
                if i in self.out_indices:
                    out.append(x)
                x = stage.blocks(x)
            else:
                x = stage(x)
                if i in self.out_indices:
                    out.append(x)
        return out


# ------------------------------------------------------------------------------------------- checkpoints

_PREFIXES = (
    "model.vision_tower.vision_tower.model.",  # FastVLM (LLaVA) checkpoints
    "vision_tower.vision_tower.model.",
    "model.vision_tower.timm_model.",  # transformers FastVlmForConditionalGeneration
    "vision_tower.timm_model.",
    "image_encoder.model.",  # MobileCLIP .pt
    "module.visual.trunk.",  # open_clip
    "visual.trunk.",
)
_PROJECTOR_KEYS = {
    "model.mm_projector.0.": "mm_projector.0.", "model.mm_projector.2.": "mm_projector.2.",
    "model.multi_modal_projector.linear_1.": "mm_projector.0.", "model.multi_modal_projector.linear_2.": "mm_projector.2.",
    "multi_modal_projector.linear_1.": "mm_projector.0.", "multi_modal_projector.linear_2.": "mm_projector.2.",
}
_RENAMES = (
    ("rbr_conv", "conv_kxk"), ("rbr_scale", "conv_scale"), ("rbr_skip", "identity"), ("lkb_origin", "large_conv"),
    ("lkb_reparam", "reparam_conv"), ("convffn", "mlp"), ("se.reduce", "se.fc1"), ("se.expand", "se.fc2"),
)


def _select_tower(sd: dict) -> dict:
    """Keep the image tower (and a VLM projector) of CLIP / VLM checkpoints, without their prefixes."""
    for p in _PREFIXES:
        if any(k.startswith(p) for k in sd):
            out = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
            for k, v in sd.items():
                for src, dst in _PROJECTOR_KEYS.items():
                    if k.startswith(src):
                        out[dst + k[len(src):]] = v
            return out
    return dict(sd)


def _official_network_map(model: FastVit) -> list[str]:
    """Our prefix for each entry of ml-fastvit's flat ``network`` list: per stage [downsample], [pos_emb], blocks."""
    out = []
    for i, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            out.append(f"stages.{i}.downsample")
        if not isinstance(stage.pos_emb, nn.Identity):
            out.append(f"stages.{i}.pos_emb")
        out.append(f"stages.{i}.blocks")
    return out


def _official_to_ours(sd: dict, model: FastVit) -> dict:
    net = _official_network_map(model)
    out = {}
    for k, v in sd.items():
        if k.startswith("dist_head."):
            continue  # DeiT-style distillation head of the training code; not part of the released model
        if k.startswith("patch_embed."):
            k = "stem." + k[len("patch_embed."):]
        m = re.match(r"network\.(\d+)\.(.*)", k)
        if m:
            idx, rest = int(m.group(1)), m.group(2)
            if idx >= len(net):
                raise KeyError(f"checkpoint key {k!r}: network index {idx} does not exist in {len(net)}-entry layout")
            dst = net[idx]
            if dst.endswith(".pos_emb") and rest.startswith("pe."):
                rest = "pos_enc." + rest[3:]
            k = f"{dst}.{rest}"
        if k.startswith("conv_exp."):
            k = "final_conv." + k[len("conv_exp."):]
        for a, b in _RENAMES:
            k = k.replace(a, b)
        k = re.sub(r"(^|\.)(layer_scale(?:_[12])?)$", r"\1\2.gamma", k)
        if k in ("head.weight", "head.bias"):
            k = "head.fc." + k.split(".")[1]
        out[k] = v
    return out


def _convert_head(sd: dict, model: FastVit) -> dict:
    if "head.proj" in sd:  # Apple's CLIP projection, (in, out) and no bias
        proj = sd.pop("head.proj")
        sd["head.fc.weight"] = proj.t().contiguous()
        if model.head_bias:
            sd["head.fc.bias"] = torch.zeros(proj.shape[1], dtype=proj.dtype)
    elif not model.head_bias and "head.fc.bias" in sd:
        bias = sd["head.fc.bias"]
        if torch.count_nonzero(bias):
            raise ValueError("checkpoint head.fc has a non-zero bias but the model was built with head_bias=False; "
                             "build it with head_bias=True")
        sd.pop("head.fc.bias")
    elif model.head_bias and "head.fc.weight" in sd and "head.fc.bias" not in sd:
        sd["head.fc.bias"] = torch.zeros(sd["head.fc.weight"].shape[0], dtype=sd["head.fc.weight"].dtype)
    if model.mm_projector is None:
        dropped = [k for k in sd if k.startswith("mm_projector.")]
        for k in dropped:
            del sd[k]
        if dropped:
            log.info("dropped the FastVLM projector from the checkpoint (build with mm_projector_dim= to keep it)")
    return sd


def _is_deploy_form(keys) -> bool:
    return any(k.endswith("reparam_conv.weight") for k in keys)


def _twin(model: FastVit, deploy: bool) -> FastVit:
    twin = FastVit(**{**model._build_args, "deploy": deploy})
    return twin.to(next(model.parameters()).device)


def _deploy_to_train(sd: dict, model: FastVit) -> dict:
    """Express a deploy-form state dict in the training form, exactly: the fused conv goes into the k x k branch with
    an identity BatchNorm, the other branches start at zero (so FastVLM's deploy-only tower can be fine-tuned)."""
    deployed = _twin(model, deploy=True)
    from zoo.checkpoints import load_weights

    load_weights(deployed, sd, context="fastvit deploy-form checkpoint")
    train = _twin(model, deploy=False)
    dmods = dict(deployed.named_modules())
    with torch.no_grad():
        for name, m in train.named_modules():
            if isinstance(m, (MobileOneBlock, ReparamLargeKernelConv, RepMixer, RepConditionalPosEnc)):
                if isinstance(m, MobileOneBlock) and name.endswith(("token_mixer.norm", "token_mixer.mixer")):
                    continue  # handled by the RepMixer
                d = dmods[name]
                m.load_fused_(d.reparam_conv.weight, d.reparam_conv.bias)
        dsd = deployed.state_dict()
        out = train.state_dict()
        for k in out:
            if k in dsd and dsd[k].shape == out[k].shape and ".reparam_conv." not in k:
                out[k] = dsd[k]
    return {k: v.clone() for k, v in out.items()}


def _train_to_deploy(sd: dict, model: FastVit) -> dict:
    train = _twin(model, deploy=False)
    from zoo.checkpoints import load_weights

    load_weights(train, sd, context="fastvit training-form checkpoint")
    train.eval().reparameterize()
    return train.state_dict()


def checkpoint_filter_fn(state_dict: dict, model: FastVit) -> dict:
    """Any released FastViT / MCi / FastViTHD checkpoint layout -> ours, in the model's form.

    Reads: ours and timm's (identical); ml-fastvit (``patch_embed`` / ``network.N`` / ``conv_exp`` / ``rbr_*`` /
    ``lkb_*``, training and ``_reparam`` files); MobileCLIP ``image_encoder.model.`` (+ ``head.proj``); open_clip
    ``visual.trunk.``; FastVLM LLaVA ``model.vision_tower.vision_tower.model.`` (+ ``model.mm_projector``);
    transformers ``model.vision_tower.timm_model.`` (+ ``multi_modal_projector``). A deploy-form checkpoint loads
    into a training-form model exactly (for fine-tuning), a training-form one into a deploy-form model by folding.
    """
    sd = _select_tower(state_dict)
    if any(k.startswith(("network.", "patch_embed.", "conv_exp.")) for k in sd):
        sd = _official_to_ours(sd, model)
    sd = _convert_head(sd, model)
    scale_key = "stem.0.conv_scale.conv.weight"  # the factory adapts first_conv; the stem's 1x1 branch reads pixels too
    if scale_key in sd and getattr(model, "in_chans", 3) != sd[scale_key].shape[1]:
        from timm.models import adapt_input_conv

        sd[scale_key] = adapt_input_conv(model.in_chans, sd[scale_key])
    if not isinstance(model, FastVit) or next(model.parameters()).is_meta:
        return sd  # e.g. the factory peeking at the head size on a meta model: no values to convert
    model_deploy = _is_deploy_form(model.state_dict().keys())
    ckpt_deploy = _is_deploy_form(sd.keys())
    if ckpt_deploy != model_deploy and model.extra_folds:
        raise ValueError("extra_folds=True models only load checkpoints of their own form; build the model with "
                         "extra_folds=False to convert between training and deploy form")
    if ckpt_deploy and not model_deploy:
        log.info("deploy-form checkpoint: expanded into the training form (function unchanged)")
        sd = _deploy_to_train(sd, model)
    elif model_deploy and not ckpt_deploy and any(".conv_kxk." in k for k in sd):
        log.info("training-form checkpoint: folded into the deploy form")
        sd = _train_to_deploy(sd, model)
    return sd


# ------------------------------------------------------------------------------------------- configs

_FASTVIT_TOP1 = {  # apple/ml-fastvit README (ImageNet-1k, 256 px): (plain, distilled)
    "t8": (76.2, 77.2), "t12": (79.3, 80.3), "s12": (79.9, 81.1), "sa12": (80.9, 81.9),
    "sa24": (82.7, 83.4), "sa36": (83.6, 84.2), "ma36": (83.9, 84.6),
}


def _cfg(**kw) -> ModelCfg:
    base = dict(
        family="fastvit", paper="2303.14189", license="fastvit-license", input_size=(3, 256, 256), pool_size=(8, 8),
        crop_pct=0.9, interpolation="bicubic", first_conv="stem.0.conv_kxk.0.conv", classifier="head.fc",
    )
    base.update(kw)
    return ModelCfg(**base)


def _timm_hub(name: str) -> CheckpointSource:
    return CheckpointSource(hf_hub_id=f"timm/{name}", hf_filename="model.safetensors", layout="timm")


def _mclip_url(size: str) -> CheckpointSource:
    # Apple's MobileCLIP v1 release: the whole CLIP model; the image tower is under image_encoder.model.
    return CheckpointSource(url=f"https://docs-assets.developer.apple.com/ml-research/datasets/mobileclip/mobileclip_{size}.pt",
                            layout="official")


_MCLIP = dict(paper="2311.17049", license="apple-amlr", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), crop_pct=0.95,
              num_classes=512, interpolation="bilinear", notes="MobileCLIP image tower: head.fc is the CLIP projection")
_MCLIP2_L = dict(paper="2508.20691", license="apple-amlr", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, crop_pct=0.95,
                 num_classes=768, pool_size=(4, 4), interpolation="bilinear",
                 notes="MobileCLIP2 image tower: head.fc is the CLIP projection; OpenAI CLIP mean/std")
_FASTVLM = dict(
    paper="2412.13303", license="apple-amlr", task="image-feature-extraction", input_size=(3, 1024, 1024),
    pool_size=(16, 16), crop_pct=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bicubic",
    num_classes=768, first_conv="stem.0.reparam_conv",
)

def _apple_fastvit(variant: str, distilled: bool) -> CheckpointSource:
    # apple/ml-fastvit README: fused ("_reparam", deploy form) files in Apple's layout, state dict under 'state_dict'.
    folder = "image_classification_distilled_models" if distilled else "image_classification_models"
    return CheckpointSource(
        url=f"https://docs-assets.developer.apple.com/ml-research/models/fastvit/{folder}/fastvit_{variant}_reparam.pth.tar",
        layout="official", file_name=f"fastvit_{variant}{'_dist' if distilled else ''}_reparam.pth.tar")


_DIST_NOTE = "distilled from RegNetY-16GF (DeiT hard distillation)"
_REPARAM_NOTE = ("Apple's own fused (deploy-form) file; loads into the deploy form, or exactly into the training form "
                 "for fine-tuning")
default_cfgs: dict[str, ModelCfg] = {}
for _v, (_top1, _dist) in _FASTVIT_TOP1.items():
    _crop = 0.95 if _v == "ma36" else 0.9
    default_cfgs[f"fastvit_{_v}.apple_in1k"] = _cfg(metrics={"top1": _top1}, crop_pct=_crop,
                                                    source=_timm_hub(f"fastvit_{_v}.apple_in1k"))
    default_cfgs[f"fastvit_{_v}.apple_dist_in1k"] = _cfg(metrics={"top1": _dist}, crop_pct=_crop, notes=_DIST_NOTE,
                                                         source=_timm_hub(f"fastvit_{_v}.apple_dist_in1k"))
    default_cfgs[f"fastvit_{_v}.apple_in1k_reparam"] = _cfg(metrics={"top1": _top1}, crop_pct=_crop,
                                                            source=_apple_fastvit(_v, False), notes=_REPARAM_NOTE)
    default_cfgs[f"fastvit_{_v}.apple_dist_in1k_reparam"] = _cfg(
        metrics={"top1": _dist}, crop_pct=_crop, source=_apple_fastvit(_v, True), notes=f"{_DIST_NOTE}; {_REPARAM_NOTE}")
default_cfgs.update({
    "fastvit_mci0.apple_mclip": _cfg(metrics={"imagenet_zeroshot_top1": 67.8}, source=_mclip_url("s0"), **_MCLIP),
    "fastvit_mci0.apple_mclip2_dfndr2b": _cfg(
        metrics={"imagenet_zeroshot_top1": 71.5}, source=_timm_hub("fastvit_mci0.apple_mclip2_dfndr2b"),
        **{**_MCLIP, "paper": "2508.20691", "crop_pct": 1.0}),
    "fastvit_mci1.apple_mclip": _cfg(metrics={"imagenet_zeroshot_top1": 72.6}, source=_mclip_url("s1"), **_MCLIP),
    "fastvit_mci2.apple_mclip": _cfg(metrics={"imagenet_zeroshot_top1": 74.4}, source=_mclip_url("s2"), **_MCLIP),
    "fastvit_mci2.apple_mclip2_dfndr2b": _cfg(
        metrics={"imagenet_zeroshot_top1": 77.2}, source=_timm_hub("fastvit_mci2.apple_mclip2_dfndr2b"),
        **{**_MCLIP, "paper": "2508.20691"}),
    "fastvit_mci3.apple_mclip2_dfndr2b": _cfg(
        metrics={"imagenet_zeroshot_top1": 80.7}, source=_timm_hub("fastvit_mci3.apple_mclip2_dfndr2b"), **_MCLIP2_L),
    "fastvit_mci4.apple_mclip2_dfndr2b": _cfg(
        metrics={"imagenet_zeroshot_top1": 81.9}, source=_timm_hub("fastvit_mci4.apple_mclip2_dfndr2b"), **_MCLIP2_L),
    "fastvithd.apple_fastvlm_0_5b": _cfg(
        source=CheckpointSource(hf_hub_id="apple/FastVLM-0.5B", hf_filename="model.safetensors", layout="llava"),
        notes="vision tower (+ LLaVA projector if mm_projector_dim=896) of the FastVLM-0.5B checkpoint; the file "
              "holds the whole VLM. For 1.5B/7B pass checkpoint_path= (a file or a folder of *.safetensors).",
        **_FASTVLM),
})


# tests/test_contract.py: depth 1 and narrow widths; every structural flag of a variant (SE, act, norm, stages) is kept
small_cfgs = {
    "fastvit_mci3": SmallCfg(dict(layers=(1,) * 5, embed_dims=(16, 32, 64, 128, 256)), img_size=64),
    "fastvit_mci4": SmallCfg(dict(layers=(1,) * 5, embed_dims=(16, 32, 64, 128, 256)), img_size=64),
    "fastvithd": SmallCfg(dict(layers=(1,) * 5, embed_dims=(16, 32, 64, 128, 256)), img_size=64),
    "fastvit_*": SmallCfg(dict(layers=(1,) * 4, embed_dims=(16, 32, 64, 128)), img_size=64),
}


def _create(defaults: dict, kwargs: dict) -> FastVit:
    return FastVit(**{**defaults, **kwargs})


_SA = dict(pos_embs=(None, None, None, 7), token_mixers=("repmixer", "repmixer", "repmixer", "attention"))
_MCI = dict(mlp_ratios=(3,) * 4, se_downsamples=(False, False, True, True), lkc_use_act=True, num_classes=512, **_SA)
_MCI_L = dict(
    mlp_ratios=(4,) * 5, pos_embs=(None, None, None, 7, 7),
    token_mixers=("repmixer", "repmixer", "repmixer", "attention", "attention"), lkc_use_act=True,
    norm_layer="layernorm", stem_use_scale_branch=False, num_classes=768,
)


@register_model
def fastvit_t8(**kwargs) -> FastVit:
    return _create(dict(layers=(2, 2, 4, 2), embed_dims=(48, 96, 192, 384), mlp_ratios=(3,) * 4), kwargs)


@register_model
def fastvit_t12(**kwargs) -> FastVit:
    return _create(dict(layers=(2, 2, 6, 2), embed_dims=(64, 128, 256, 512), mlp_ratios=(3,) * 4), kwargs)


@register_model
def fastvit_s12(**kwargs) -> FastVit:
    return _create(dict(layers=(2, 2, 6, 2), embed_dims=(64, 128, 256, 512), mlp_ratios=(4,) * 4), kwargs)


@register_model
def fastvit_sa12(**kwargs) -> FastVit:
    return _create(dict(layers=(2, 2, 6, 2), embed_dims=(64, 128, 256, 512), **_SA), kwargs)


@register_model
def fastvit_sa24(**kwargs) -> FastVit:
    return _create(dict(layers=(4, 4, 12, 4), embed_dims=(64, 128, 256, 512), **_SA), kwargs)


@register_model
def fastvit_sa36(**kwargs) -> FastVit:
    # ml-fastvit initializes the layer scales of SA36 / MA36 at 1e-6 (timm: 1e-5); matters only from scratch.
    return _create(dict(layers=(6, 6, 18, 6), embed_dims=(64, 128, 256, 512), layer_scale_init_value=1e-6, **_SA), kwargs)


@register_model
def fastvit_ma36(**kwargs) -> FastVit:
    return _create(dict(layers=(6, 6, 18, 6), embed_dims=(76, 152, 304, 608), layer_scale_init_value=1e-6, **_SA), kwargs)


@register_model
def fastvit_mci0(**kwargs) -> FastVit:
    """MobileCLIP-S0 image encoder (MCi0)."""
    return _create(dict(layers=(2, 6, 10, 2), embed_dims=(64, 128, 256, 512), **_MCI), kwargs)


@register_model
def fastvit_mci1(**kwargs) -> FastVit:
    """MobileCLIP-S1 image encoder (MCi1)."""
    return _create(dict(layers=(4, 12, 20, 4), embed_dims=(64, 128, 256, 512), **_MCI), kwargs)


@register_model
def fastvit_mci2(**kwargs) -> FastVit:
    """MobileCLIP-S2 image encoder (MCi2)."""
    return _create(dict(layers=(4, 12, 24, 4), embed_dims=(80, 160, 320, 640), **_MCI), kwargs)


@register_model
def fastvit_mci3(**kwargs) -> FastVit:
    """MobileCLIP(2)-S3 image encoder (MCi3): 5 stages, stride 64, LayerNorm before attention."""
    return _create(dict(layers=(2, 12, 24, 4, 2), embed_dims=(96, 192, 384, 768, 1536), **_MCI_L), kwargs)


@register_model
def fastvit_mci4(**kwargs) -> FastVit:
    """MobileCLIP(2)-S4 image encoder (MCi4)."""
    return _create(dict(layers=(2, 12, 24, 4, 4), embed_dims=(128, 256, 512, 1024, 2048), **_MCI_L), kwargs)


@register_model
def fastvithd(**kwargs) -> FastVit:
    """FastViTHD, FastVLM's vision encoder (ml-fastvlm ``mci.py``): MCi3's architecture, built in deploy form as the
    official code does (``deploy=False`` gives the training form), with Apple's bias-free 3072->768 CLIP projection.
    ``forward_visual_tokens`` returns the tokens the language model consumes."""
    return _create(dict(layers=(2, 12, 24, 4, 2), embed_dims=(96, 192, 384, 768, 1536), head_bias=False, deploy=True,
                        **_MCI_L), kwargs)
