"""BatchNorm folding used by every reparameterizable family.

A BatchNorm in eval mode is a per-channel affine map ``y = s * x + t`` with ``s = gamma / sqrt(var + eps)`` and
``t = beta - s * mean``. After a conv it folds into the conv's weight and bias; before a 1x1 conv / Linear it folds
into that layer's input side.
"""
from __future__ import annotations

import torch
from torch import nn


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of an eval-mode BatchNorm."""
    var = bn.running_var
    mean = bn.running_mean
    scale = (bn.weight if bn.weight is not None else torch.ones_like(var)) / torch.sqrt(var + bn.eps)
    shift = (bn.bias if bn.bias is not None else torch.zeros_like(mean)) - mean * scale
    return scale, shift


@torch.no_grad()
def fold_bn_into_conv(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as a single conv (BN after the conv)."""
    scale, shift = bn_affine(bn)
    w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = shift + (bias * scale if bias is not None else 0)
    return w, b


@torch.no_grad()
def fold_pre_bn_into_linear(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Rewrite ``layer`` (Linear or 1x1 Conv2d, groups=1) in place so ``layer(x)`` equals the old ``layer(scale*x+shift)``."""
    w = layer.weight
    w2 = w.reshape(w.shape[0], w.shape[1])
    extra = w2 @ shift
    layer.weight.copy_((w2 * scale[None, :]).reshape(w.shape))
    if layer.bias is None:
        layer.bias = nn.Parameter(extra.to(w.dtype))
    else:
        layer.bias.add_(extra)
