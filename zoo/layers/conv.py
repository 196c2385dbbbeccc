"""Conv + BatchNorm (+ activation) with a deploy form where the BatchNorm is folded into the conv."""
from __future__ import annotations

import torch
from torch import nn

from zoo.layers.fuse import fold_bn_into_conv


class ConvNorm(nn.Module):
    """``act(norm(conv(x)))``; with ``deploy=True`` (or after ``reparameterize()``) a single biased conv + act.

    Keys: ``conv.weight`` and ``norm.*`` in training form, ``conv.weight`` / ``conv.bias`` in deploy form.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        act_layer: type[nn.Module] | None = None,
        norm_eps: float = 1e-5,
        deploy: bool = False,
    ):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=deploy)
        self.norm = nn.Identity() if deploy else nn.BatchNorm2d(out_chs, eps=norm_eps)
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if not isinstance(self.norm, nn.BatchNorm2d):
            return
        w, b = fold_bn_into_conv(self.conv.weight, self.conv.bias, self.norm)
        c = self.conv
        fused = nn.Conv2d(
            c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups, bias=True,
            device=w.device, dtype=w.dtype,
        )
        fused.weight.copy_(w)
        fused.bias.copy_(b)
        self.conv = fused
        self.norm = nn.Identity()
