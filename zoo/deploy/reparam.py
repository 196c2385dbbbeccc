"""Reparameterization: every block that can fold branches or BatchNorms implements ``reparameterize()``.

Contract for blocks: ``reparameterize()`` works in place, switches the block to its inference form, and is a no-op
when the block is already in that form (so parents may fold their children themselves).
"""
from __future__ import annotations

import copy

import torch
from torch import nn


@torch.no_grad()
def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``model`` in inference form (eval mode). Outer blocks are folded before the blocks they contain."""
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()

    def visit(m: nn.Module) -> None:
        if hasattr(m, "reparameterize") and m is not model:
            m.reparameterize()
        for child in list(m.children()):
            visit(child)

    visit(model)
    if hasattr(model, "reparameterize"):
        model.reparameterize()
    return model


def count_foldable_batchnorms(model: nn.Module) -> int:
    """BatchNorms left in a model; a fully reparameterized model of a BN-merging family has none."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
