"""Blocks and helpers shared by several families. Families import from here and from timm.layers."""
from zoo.layers.fuse import fold_bn_into_conv, fold_pre_bn_into_linear, bn_affine
from zoo.layers.conv import ConvNorm

__all__ = ["ConvNorm", "fold_bn_into_conv", "fold_pre_bn_into_linear", "bn_affine"]
