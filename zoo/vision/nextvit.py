"""Next-ViT (arXiv 2207.05501; official code bytedance/Next-ViT, ported to timm as ``nextvit_*``).

Hybrid backbone of Next Convolution Blocks (NCB: multi-head convolutional attention + MLP) and Next Transformer
Blocks (NTB: efficient MHSA with spatial reduction, then MHCA on the remaining channels, concatenated) arranged by
the "Next Hybrid Strategy". Parameter names follow timm's layout; converters accept the official layout.

Deploy form: every BatchNorm that precedes a linear layer (NCB ``norm``, NTB ``norm1``/``norm2`` and the E-MHSA
spatial-reduction norm) is folded into that layer, and every conv+BN pair into the conv. Only the final ``norm``
(after a residual sum, before pooling) stays, so ``forward_features`` keeps its meaning.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, DropPath, trunc_normal_
from timm.models import checkpoint_seq
from torch import nn

from zoo.contract import SmallCfg, ZooModel
from zoo.layers import ConvNorm, bn_affine, fold_bn_into_conv, fold_pre_bn_into_linear
from zoo.registry import CheckpointSource, ModelCfg, register_model

HEAD_DIM = 32
NORM_EPS = 1e-5


def _identity_if(deploy: bool, module: nn.Module) -> nn.Module:
    return nn.Identity() if deploy else module


class PatchEmbed(ConvNorm):
    """Per-block channel change: 2x2 average pool (stride 2, ceil mode) then 1x1 conv + BN."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, deploy: bool = False):
        super().__init__(in_chs, out_chs, 1, deploy=deploy)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) if stride == 2 else nn.Identity()

    def forward(self, x):
        return self.act(self.norm(self.conv(self.pool(x))))  # ConvNorm's forward after the pool (no super(): TorchScript)


def patch_embed(in_chs: int, out_chs: int, stride: int = 1, deploy: bool = False) -> nn.Module:
    return PatchEmbed(in_chs, out_chs, stride, deploy) if (stride == 2 or in_chs != out_chs) else nn.Identity()


class MHCA(nn.Module):
    """Multi-head convolutional attention: grouped 3x3 conv (one group per 32 channels) -> BN -> ReLU -> 1x1 conv."""

    def __init__(self, dim: int, deploy: bool = False):
        super().__init__()
        self.group_conv3x3 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim // HEAD_DIM, bias=deploy)
        self.norm = _identity_if(deploy, nn.BatchNorm2d(dim, eps=NORM_EPS))
        self.act = nn.ReLU(inplace=True)
        self.projection = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x):
        return self.projection(self.act(self.norm(self.group_conv3x3(x))))

    @torch.no_grad()
    def reparameterize(self):
        if isinstance(self.norm, nn.BatchNorm2d):
            c = self.group_conv3x3
            w, b = fold_bn_into_conv(c.weight, c.bias, self.norm)
            fused = nn.Conv2d(
                c.in_channels, c.out_channels, 3, 1, 1, groups=c.groups, bias=True, device=w.device, dtype=w.dtype
            )
            fused.weight.copy_(w)
            fused.bias.copy_(b)
            self.group_conv3x3, self.norm = fused, nn.Identity()


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float, drop: float = 0.0):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class NCB(nn.Module):
    """Next Convolution Block: x = PE(x); x += MHCA(x); x += MLP(BN(x))."""

    def __init__(self, in_chs, out_chs, stride=1, drop_path=0.0, drop=0.0, mlp_ratio=3.0, deploy=False):
        super().__init__()
        self.patch_embed = patch_embed(in_chs, out_chs, stride, deploy)
        self.mhca = MHCA(out_chs, deploy)
        self.attn_drop_path = DropPath(drop_path)
        self.norm = _identity_if(deploy, nn.BatchNorm2d(out_chs, eps=NORM_EPS))
        self.mlp = Mlp(out_chs, mlp_ratio, drop)
        self.mlp_drop_path = DropPath(drop_path)

    def forward(self, x):
        x = self.patch_embed(x)
        x = x + self.attn_drop_path(self.mhca(x))
        return x + self.mlp_drop_path(self.mlp(self.norm(x)))

    @torch.no_grad()
    def reparameterize(self):
        if isinstance(self.norm, nn.BatchNorm2d):
            fold_pre_bn_into_linear(self.mlp.fc1, *bn_affine(self.norm))
            self.norm = nn.Identity()


class EMHSA(nn.Module):
    """Efficient MHSA: keys/values come from the token sequence average-pooled by sr^2 consecutive tokens.

    The pooling is 1-D over the row-major flattened sequence (windows cross row borders), exactly as the official
    code (bytedance/Next-ViT#2) and timm do; released weights depend on it.
    """

    def __init__(self, dim: int, sr_ratio: int = 1, attn_drop: float = 0.0, proj_drop: float = 0.0, deploy=False):
        super().__init__()
        self.num_heads = dim // HEAD_DIM
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        self.area = sr_ratio**2
        # Identity when unused, so TorchScript can compile the sr_ratio branch of forward
        self.pool = nn.AvgPool1d(self.area, self.area) if sr_ratio > 1 else nn.Identity()
        self.norm = _identity_if(deploy or sr_ratio == 1, nn.BatchNorm1d(dim, eps=NORM_EPS))

    def forward(self, x):  # x: (B, N, C)
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)
        kv = x
        if self.sr_ratio > 1:
            kv = self.norm(self.pool(x.transpose(1, 2))).transpose(1, 2)
        k = self.k(kv).reshape(B, -1, h, C // h).transpose(1, 2)
        v = self.v(kv).reshape(B, -1, h, C // h).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))

    @torch.no_grad()
    def fold_input_norm(self, scale: torch.Tensor, shift: torch.Tensor):
        """Fold a per-channel affine applied to the input (the block's norm1) and our own pooled-token BN."""
        fold_pre_bn_into_linear(self.q, scale, shift)
        # Average pooling is linear per channel, so norm1 commutes with it; compose it with the sr BatchNorm.
        if self.sr_ratio > 1 and isinstance(self.norm, nn.BatchNorm1d):
            s2, t2 = bn_affine(self.norm)
            scale, shift = scale * s2, shift * s2 + t2
            self.norm = nn.Identity()
        fold_pre_bn_into_linear(self.k, scale, shift)
        fold_pre_bn_into_linear(self.v, scale, shift)


class NTB(nn.Module):
    """Next Transformer Block: E-MHSA on 75% of the channels, MHCA on the rest, concatenated, then an MLP."""

    def __init__(
        self, in_chs, out_chs, stride=1, drop_path=0.0, drop=0.0, sr_ratio=1, mlp_ratio=2.0, mix_ratio=0.75,
        deploy=False,
    ):
        super().__init__()
        mhsa_chs = max(HEAD_DIM, int(out_chs * mix_ratio) // HEAD_DIM * HEAD_DIM)
        mhca_chs = out_chs - mhsa_chs
        self.patch_embed = patch_embed(in_chs, mhsa_chs, stride, deploy)
        self.norm1 = _identity_if(deploy, nn.BatchNorm2d(mhsa_chs, eps=NORM_EPS))
        self.e_mhsa = EMHSA(mhsa_chs, sr_ratio, proj_drop=drop, deploy=deploy)
        self.mhsa_drop_path = DropPath(drop_path * mix_ratio)
        self.projection = PatchEmbed(mhsa_chs, mhca_chs, 1, deploy)
        self.mhca = MHCA(mhca_chs, deploy)
        self.mhca_drop_path = DropPath(drop_path * (1 - mix_ratio))
        self.norm2 = _identity_if(deploy, nn.BatchNorm2d(out_chs, eps=NORM_EPS))
        self.mlp = Mlp(out_chs, mlp_ratio, drop)
        self.mlp_drop_path = DropPath(drop_path)

    def forward(self, x):
        x = self.patch_embed(x)
        B, C, H, W = x.shape
        tokens = self.norm1(x).flatten(2).transpose(1, 2)
        x = x + self.mhsa_drop_path(self.e_mhsa(tokens)).transpose(1, 2).reshape(B, C, H, W)
        out = self.projection(x)
        out = out + self.mhca_drop_path(self.mhca(out))
        x = torch.cat([x, out], dim=1)
        return x + self.mlp_drop_path(self.mlp(self.norm2(x)))

    @torch.no_grad()
    def reparameterize(self):
        if isinstance(self.norm1, nn.BatchNorm2d):
            self.e_mhsa.fold_input_norm(*bn_affine(self.norm1))
            self.norm1 = nn.Identity()
        if isinstance(self.norm2, nn.BatchNorm2d):
            fold_pre_bn_into_linear(self.mlp.fc1, *bn_affine(self.norm2))
            self.norm2 = nn.Identity()


class NextStage(nn.Module):
    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x):
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class NextViT(ZooModel):
    """Next-ViT backbone + classifier, following timm's model API (:class:`zoo.contract.ZooModel`).

    Args:
        depths: blocks per stage.
        ncb_widths / ntb_widths: output channels of the NCBs / NTBs of each stage (``None``: the stage has no NTB).
        ntb_period: in stage 2 every ``ntb_period``-th block is an NTB (official: 5, i.e. [NCB x4, NTB] repeated);
            stages 1 and 3 end with one NTB; stage 0 is all NCB.
        stem_chs: widths of the first three stem convs (the fourth outputs ``stem_chs[-1]``).
        sr_ratios: E-MHSA spatial reduction per stage.
        deploy: build the inference form (BatchNorms folded; load deploy-form weights into it).
    """

    tail_module = "norm"  # forward_features ends with the final BatchNorm (forward_intermediates(norm=True) uses it)
    tail_is_norm = True

    def __init__(
        self,
        depths: Sequence[int] = (3, 4, 10, 3),
        ncb_widths: Sequence[int] = (96, 192, 384, 768),
        ntb_widths: Sequence[Optional[int]] = (None, 256, 512, 1024),
        ntb_period: int = 5,
        stem_chs: Sequence[int] = (64, 32, 64),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        deploy: bool = False,
    ):
        super().__init__()
        # Next-ViT has exactly 4 stages (the stage-2 NTB rule and the 4 strides assume it); fail early and clearly
        # instead of silently building another net or hitting an IndexError deep in the loop.
        for arg, val, want in (("depths", depths, 4), ("ncb_widths", ncb_widths, 4), ("ntb_widths", ntb_widths, 4),
                               ("sr_ratios", sr_ratios, 4), ("stem_chs", stem_chs, 3)):
            if len(val) != want:
                raise ValueError(f"NextViT: {arg} needs {want} values (one per {'stage' if want == 4 else 'stem conv'}), "
                                 f"got {len(val)}: {tuple(val)!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.deploy = deploy
        self.grad_checkpointing = False
        s = list(stem_chs)
        self.stem = nn.Sequential(
            ConvNorm(in_chans, s[0], 3, 2, act_layer=nn.ReLU, deploy=deploy),
            ConvNorm(s[0], s[1], 3, 1, act_layer=nn.ReLU, deploy=deploy),
            ConvNorm(s[1], s[2], 3, 1, act_layer=nn.ReLU, deploy=deploy),
            ConvNorm(s[2], s[2], 3, 2, act_layer=nn.ReLU, deploy=deploy),
        )
        n = sum(depths)
        dpr = [drop_path_rate * i / max(1, n - 1) for i in range(n)]  # python floats: also works on the meta device
        chs, idx = s[2], 0
        stages, self.feature_info = [], []
        for i, d in enumerate(depths):
            blocks = []
            for j in range(d):
                is_ntb = ntb_widths[i] is not None and (
                    (j + 1) % ntb_period == 0 if i == 2 else j == d - 1
                )
                stride = 2 if (j == 0 and i > 0) else 1
                if is_ntb:
                    out = ntb_widths[i]
                    blk = NTB(chs, out, stride, dpr[idx], proj_drop_rate, sr_ratios[i], deploy=deploy)
                else:
                    out = ncb_widths[i]
                    blk = NCB(chs, out, stride, dpr[idx], proj_drop_rate, deploy=deploy)
                blocks.append(blk)
                chs, idx = out, idx + 1
            stages.append(NextStage(blocks))
            self.feature_info.append(dict(num_chs=chs, reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = chs
        self.norm = nn.BatchNorm2d(chs, eps=NORM_EPS)
        self.head = ClassifierHead(chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # timm model API: forward / forward_head, set_grad_checkpointing, group_matcher come from ZooModel ---------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return self.norm(x)


# ------------------------------------------------------------------------------------------- checkpoints


def checkpoint_filter_fn(state_dict: dict, model: NextViT) -> dict:
    """Official layout (``features.{k}`` flat block list, ``mlp.conv1/2``, ``proj_head.0``) -> ours.

    timm's layout is ours already, so timm checkpoints pass through unchanged.
    """
    if not any(k.startswith("features.") or k.startswith("proj_head.") for k in state_dict):
        return dict(state_dict)
    depths = [len(s.blocks) for s in model.stages]
    flat = [(i, j) for i, d in enumerate(depths) for j in range(d)]
    out = {}
    for k, v in state_dict.items():
        if k.startswith("features."):
            n, rest = k[len("features."):].split(".", 1)
            i, j = flat[int(n)]
            k = f"stages.{i}.blocks.{j}.{rest}"
        k = k.replace("mlp.conv1.", "mlp.fc1.").replace("mlp.conv2.", "mlp.fc2.").replace("proj_head.0.", "head.fc.")
        out[k] = v
    return out


def _cfg(metrics=None, source=None, **kw) -> ModelCfg:
    base = dict(
        family="nextvit", paper="2207.05501", license="apache-2.0", crop_pct=0.95, interpolation="bicubic",
        first_conv="stem.0.conv", classifier="head.fc", metrics=metrics or {}, source=source,
    )
    base.update(kw)
    return ModelCfg(**base)


def _timm_hub(name: str) -> CheckpointSource:
    # timm re-hosts the official ImageNet weights on the Hugging Face hub (timm key layout, safetensors).
    return CheckpointSource(hf_hub_id=f"timm/{name}", hf_filename="model.safetensors", layout="timm")


_R384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
default_cfgs = {
    "nextvit_small.bd_in1k": _cfg({"top1": 82.5}, _timm_hub("nextvit_small.bd_in1k")),
    "nextvit_small.bd_in1k_384": _cfg({"top1": 83.6}, _timm_hub("nextvit_small.bd_in1k_384"), **_R384),
    "nextvit_small.bd_ssld_6m_in1k": _cfg({"top1": 84.8}, _timm_hub("nextvit_small.bd_ssld_6m_in1k")),
    "nextvit_small.bd_ssld_6m_in1k_384": _cfg({"top1": 85.8}, _timm_hub("nextvit_small.bd_ssld_6m_in1k_384"), **_R384),
    "nextvit_base.bd_in1k": _cfg({"top1": 83.2}, _timm_hub("nextvit_base.bd_in1k")),
    "nextvit_base.bd_in1k_384": _cfg({"top1": 84.3}, _timm_hub("nextvit_base.bd_in1k_384"), **_R384),
    "nextvit_base.bd_ssld_6m_in1k": _cfg({"top1": 85.1}, _timm_hub("nextvit_base.bd_ssld_6m_in1k")),
    "nextvit_base.bd_ssld_6m_in1k_384": _cfg({"top1": 86.1}, _timm_hub("nextvit_base.bd_ssld_6m_in1k_384"), **_R384),
    "nextvit_large.bd_in1k": _cfg({"top1": 83.6}, _timm_hub("nextvit_large.bd_in1k")),
    "nextvit_large.bd_in1k_384": _cfg({"top1": 84.7}, _timm_hub("nextvit_large.bd_in1k_384"), **_R384),
    "nextvit_large.bd_ssld_6m_in1k": _cfg({"top1": 85.4}, _timm_hub("nextvit_large.bd_ssld_6m_in1k")),
    "nextvit_large.bd_ssld_6m_in1k_384": _cfg({"top1": 86.4}, _timm_hub("nextvit_large.bd_ssld_6m_in1k_384"), **_R384),
}


# tests/test_contract.py: every block type (NCB, NTB with spatial reduction) at a fraction of the size
small_cfgs = {
    "nextvit_*": SmallCfg(dict(depths=(1, 1, 2, 1), ntb_period=2, stem_chs=(16, 16, 32), ncb_widths=(32, 64, 96, 128),
                               ntb_widths=(None, 96, 128, 192)), img_size=64),
}


def _create(defaults: dict, kwargs: dict) -> NextViT:
    return NextViT(**{**defaults, **kwargs})


@register_model
def nextvit_small(**kwargs) -> NextViT:
    return _create(dict(depths=(3, 4, 10, 3), drop_path_rate=0.1), kwargs)


@register_model
def nextvit_base(**kwargs) -> NextViT:
    return _create(dict(depths=(3, 4, 20, 3), drop_path_rate=0.2), kwargs)


@register_model
def nextvit_large(**kwargs) -> NextViT:
    return _create(dict(depths=(3, 4, 30, 3), drop_path_rate=0.2), kwargs)
