"""``create_model``: build a registered model, load released or local weights, adapt head / input channels, wrap features."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Sequence

import torch
from torch import nn

from zoo import checkpoints
from zoo.registry import ModelCfg, resolve_cfg

log = logging.getLogger(__name__)


def _get_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _adapt_input_channels(state_dict: dict, cfg: ModelCfg, in_chans: int) -> None:
    from timm.models import adapt_input_conv

    key = f"{cfg.first_conv}.weight"
    if cfg.first_conv and key in state_dict:
        state_dict[key] = adapt_input_conv(in_chans, state_dict[key])
        log.info("adapted %s from 3 to %d input channels", key, in_chans)


def _classifier_keys(model: nn.Module, cfg: ModelCfg) -> tuple[str, ...]:
    if not cfg.classifier:
        return ()
    return tuple(k for k in model.state_dict() if k.startswith(cfg.classifier + "."))


def load_into(
    model: nn.Module,
    raw: dict,
    name: str,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    where: str = "",
    assign: bool = False,
) -> None:
    """Convert a raw checkpoint (ours / official / timm layout), adapt head and stem, and load strictly."""
    entry, _, cfg = resolve_cfg(name)
    sd = checkpoints.clean_state_dict(raw)
    if entry.filter_fn is not None:  # the family's converter from official / timm layouts
        sd = entry.filter_fn(sd, model)
    allow: tuple[str, ...] = ()
    if in_chans is not None and in_chans != 3:
        _adapt_input_channels(sd, cfg, in_chans)
    head_keys = _classifier_keys(model, cfg)
    # the checkpoint's classifier keys (the model has none when num_classes=0: its head is an Identity)
    ck_head = [k for k in sd if cfg.classifier and k.startswith(cfg.classifier + ".")]
    ck_classes = next((sd[k].shape[0] for k in ck_head if k.endswith("weight")), None)
    model_classes = getattr(model, "num_classes", None)
    if ck_head and ck_classes is not None and model_classes is not None and ck_classes != model_classes:
        for k in ck_head:
            sd.pop(k, None)
        allow = head_keys
        log.warning(
            "%s: checkpoint has %d classes, model has %s: the classifier %s was re-initialized",
            name, ck_classes, model_classes, cfg.classifier,
        )
    checkpoints.load_weights(model, sd, allow_missing=allow, context=f"{name} <- {where}", assign=assign)


def _deploy_form_keys(entry, kwargs: dict) -> set[str] | None:
    """State-dict keys of the deploy form, or None for families without one (their constructors take no ``deploy``)."""
    with torch.device("meta"):
        try:
            model = entry.fn(deploy=True, **kwargs)
        except TypeError as e:
            if "deploy" in str(e):
                return None
            raise
    return set(model.state_dict())


def _checkpoint_num_classes(entry, cfg: ModelCfg, raw: dict, kwargs: dict) -> int | None:
    """Rows of the classifier weight in a checkpoint (any known layout), or None if it has no classifier."""
    if not cfg.classifier:
        return None
    key = f"{cfg.classifier}.weight"
    sd = checkpoints.clean_state_dict(raw)
    if key not in sd and entry.filter_fn is not None:  # official / timm layouts name the head differently
        try:
            with torch.device("meta"):
                sd = entry.filter_fn(sd, entry.fn(**kwargs))
        except Exception:  # noqa: BLE001 - cannot tell; the strict load below reports any mismatch
            return None
    w = sd.get(key)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim >= 1 else None


def create_model(
    model_name: str,
    pretrained: bool = False,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    deploy: bool = False,
    cache_dir: str | os.PathLike | None = None,
    **overrides: Any,
) -> nn.Module:
    """Create a registered model, like ``timm.create_model``.

    Args:
        model_name: ``arch`` or ``arch.tag`` (the tag picks the released checkpoint and its config).
        pretrained: download (once) and load the tag's released weights.
        num_classes: classifier size; differing from the checkpoint re-initializes the classifier (logged).
        in_chans: input channels; with weights, the first conv is adapted (timm's ``adapt_input_conv``).
        checkpoint_path: a local checkpoint in our, the official or timm's layout (detected automatically),
            in training or deploy form.
        features_only: return the multi-scale feature maps ``feature_info`` describes (timm's FeatureListNet).
        out_indices: which feature levels to return with ``features_only``.
        deploy: return the inference form (branches and foldable BatchNorms merged).
        cache_dir: where downloads go (default ``$ZOO_HOME``).
        **overrides: architecture arguments (depths, widths, drop_path_rate, ...). ``None`` values are ignored.
    """
    entry, tag, cfg = resolve_cfg(model_name)
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    elif cfg.task == "image-classification" and cfg.classifier:
        kwargs["num_classes"] = cfg.num_classes  # the tag's head size, like timm (e.g. an in21k tag)
    if in_chans is not None:
        kwargs["in_chans"] = in_chans

    raw = None
    where = ""
    if checkpoint_path is not None:
        raw, where = checkpoints.load_file(checkpoint_path), str(checkpoint_path)
        if num_classes is None:  # a fine-tuned file keeps its own head instead of getting a random one
            n = _checkpoint_num_classes(entry, cfg, raw, kwargs)
            if n is not None:
                kwargs["num_classes"] = n
    elif pretrained:
        if cfg.source is None:
            raise checkpoints.CheckpointError(
                f"{entry.name}{'.' + tag if tag else ''} has no released weights; tags with weights: "
                f"{', '.join(t for t, c in entry.tags.items() if c.has_weights) or '(none)'}"
            )
        path = checkpoints.download(cfg.source, cache_dir=cache_dir)
        raw, where = checkpoints.load_file(path), cfg.source.location

    build_deploy_form = deploy
    if raw is not None:
        # A deploy-form checkpoint loads straight into the deploy form (whether or not deploy=True was asked: it
        # cannot be unfolded); a training-form one loads into the training form, folded afterwards if deploy=True.
        deploy_keys = _deploy_form_keys(entry, kwargs)
        build_deploy_form = deploy_keys is not None and set(checkpoints.clean_state_dict(raw)) == deploy_keys
        if build_deploy_form and not deploy:
            log.info("%s: %s holds deploy-form weights; building the deploy form", entry.name, where)
    # Families whose module sets `load_on_meta = True` (large LMs) are built on the meta device when weights follow
    # and get the checkpoint tensors assigned, so loading never holds a second copy of the weights.
    on_meta = raw is not None and bool(getattr(sys.modules.get(entry.module), "load_on_meta", False))
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        model = entry.fn(deploy=True, **kwargs) if build_deploy_form else entry.fn(**kwargs)
    model.pretrained_cfg = cfg
    model.model_name = entry.name
    if raw is not None:
        load_into(model, raw, model_name, num_classes=num_classes, in_chans=in_chans, where=where, assign=on_meta)
    if deploy and not build_deploy_form:
        from zoo.deploy import reparameterize

        model = reparameterize(model.eval(), inplace=True)
    if features_only:
        model = features(model, out_indices)
    return model


def features(model: nn.Module, out_indices: Sequence[int] | None = None) -> nn.Module:
    """Wrap a backbone so it returns the feature maps of ``out_indices`` (default: every level in feature_info)."""
    if hasattr(model, "as_feature_extractor"):  # families whose layout timm's wrapper cannot walk
        return model.as_feature_extractor(out_indices)
    from timm.models import FeatureListNet

    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"{type(model).__name__} has no feature_info: features_only is not supported")
    idx = tuple(range(len(info))) if out_indices is None else tuple(out_indices)
    bad = [i for i in idx if not -len(info) <= i < len(info)]
    if bad:
        raise ValueError(f"out_indices {bad} out of range: the model has {len(info)} feature levels")
    net = FeatureListNet(model, out_indices=idx, flatten_sequential=True)
    net.pretrained_cfg = getattr(model, "pretrained_cfg", None)
    return net
