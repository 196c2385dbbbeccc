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
from zoo.contract import BACKBONE_TASKS, feature_take_indices
from zoo.registry import ModelCfg, resolve_cfg, split_model_name

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


def _apply_cfg_args(cfg: ModelCfg, pretrained_cfg, pretrained_cfg_overlay) -> ModelCfg:
    """timm's ``pretrained_cfg`` (a tag, a dict or a ModelCfg replacing the tag's) and ``pretrained_cfg_overlay``
    (a dict of keys to change). ``file`` / ``url`` / ``hf_hub_id`` (+ ``hf_hub_filename``) set where the weights are."""
    import dataclasses
    from pathlib import Path

    from zoo.registry import CheckpointSource

    def overlay(base: ModelCfg, d: dict, what: str) -> ModelCfg:
        d = dict(d)
        src = None
        if d.get("file"):
            src = CheckpointSource(url=Path(d["file"]).expanduser().resolve().as_uri(), layout="auto")
        elif d.get("url"):
            src = CheckpointSource(url=d["url"], layout="auto")
        elif d.get("hf_hub_id"):
            src = CheckpointSource(hf_hub_id=d["hf_hub_id"], hf_filename=d.get("hf_hub_filename"), layout="auto")
        for k in ("file", "url", "hf_hub_id", "hf_hub_filename", "has_weights", "state_dict", "custom_load"):
            d.pop(k, None)
        unknown = sorted(set(d) - set(base.__dataclass_fields__))
        if unknown:
            raise TypeError(f"{what}: unknown config keys {unknown}; known: {sorted(base.__dataclass_fields__)}")
        if src is not None:
            d["source"] = src
        for k, v in d.items():  # JSON / CLI lists -> the tuples ModelCfg holds
            if isinstance(v, list):
                d[k] = tuple(v)
        return dataclasses.replace(base, **d)

    if isinstance(pretrained_cfg, ModelCfg):
        cfg = pretrained_cfg
    elif isinstance(pretrained_cfg, dict):
        cfg = overlay(cfg, pretrained_cfg, "pretrained_cfg")
    elif pretrained_cfg is not None:
        raise TypeError(f"pretrained_cfg must be a tag name, a dict or a ModelCfg, got {type(pretrained_cfg).__name__}")
    if pretrained_cfg_overlay:
        cfg = overlay(cfg, pretrained_cfg_overlay, "pretrained_cfg_overlay")
    return cfg


def create_model(
    model_name: str,
    pretrained: bool = False,
    pretrained_cfg: str | dict | ModelCfg | None = None,
    pretrained_cfg_overlay: dict | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    scriptable: bool | None = None,
    exportable: bool | None = None,
    no_jit: bool | None = None,
    *,
    num_classes: int | None = None,
    in_chans: int | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | int | None = None,
    feature_cls: str | type | None = None,
    deploy: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> nn.Module:
    """Create a registered model, like ``timm.create_model``.

    Args:
        model_name: ``arch`` or ``arch.tag`` (the tag picks the released checkpoint and its config).
        pretrained: download (once) and load the tag's released weights.
        pretrained_cfg: a tag name, or a dict / ModelCfg replacing the tag's config (timm's argument).
        pretrained_cfg_overlay: config keys to change, e.g. ``dict(file="weights.safetensors")`` to load released
            weights from a local file with ``pretrained=True`` (also ``url=``, ``hf_hub_id=``, ``mean=``, ...).
        checkpoint_path: a local checkpoint in our, the official or timm's layout (detected automatically),
            in training or deploy form.
        cache_dir: where downloads go (default ``$ZOO_HOME``).
        scriptable / exportable / no_jit: timm's layer config during construction (``timm.layers.set_layer_config``).
        num_classes: classifier size; differing from the checkpoint re-initializes the classifier (logged).
        in_chans: input channels; with weights, the first conv is adapted (timm's ``adapt_input_conv``).
        features_only: return the multi-scale feature maps ``feature_info`` describes.
        out_indices: which feature levels to return with ``features_only`` (default: all; int n: the last n).
        feature_cls: the feature wrapper, as timm: ``"list"`` (default), ``"dict"``, ``"hook"``, ``"fx"`` or
            ``"getter"`` (uses ``forward_intermediates``), or a class.
        deploy: return the inference form (branches and foldable BatchNorms merged).
        device / dtype: build the model there, in that floating dtype (weights are loaded after).
        **overrides: architecture arguments (depths, widths, drop_path_rate, ...). ``None`` values are ignored.
    """
    if isinstance(pretrained_cfg, str):  # a tag, as timm: create_model("arch", pretrained_cfg="tag")
        model_name, pretrained_cfg = f"{split_model_name(model_name)[0]}.{pretrained_cfg}", None
    entry, tag, cfg = resolve_cfg(model_name)
    cfg = _apply_cfg_args(cfg, pretrained_cfg, pretrained_cfg_overlay)
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    elif ((cfg.task in BACKBONE_TASKS or cfg.task == "semantic-segmentation") and cfg.classifier) \
            or cfg.task == "object-detection":
        kwargs["num_classes"] = cfg.num_classes  # the tag's head size, like timm (e.g. an in21k / Cityscapes tag)
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
                " (or pass pretrained_cfg_overlay=dict(file=PATH) / checkpoint_path=PATH)"
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
    layer_cfg = {k: v for k, v in dict(scriptable=scriptable, exportable=exportable, no_jit=no_jit).items()
                 if v is not None}
    with contextlib.ExitStack() as stack:
        if layer_cfg:
            from timm.layers import set_layer_config

            stack.enter_context(set_layer_config(**layer_cfg))
        if on_meta:
            stack.enter_context(torch.device("meta"))
        elif device is not None:
            stack.enter_context(torch.device(device))
        model = entry.fn(deploy=True, **kwargs) if build_deploy_form else entry.fn(**kwargs)
    if dtype is not None and not on_meta:
        model = model.to(dtype=dtype)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg  # timm's back-compat alias
    model.model_name = entry.name
    if raw is not None:
        load_into(model, raw, model_name, num_classes=num_classes, in_chans=in_chans, where=where, assign=on_meta)
        if on_meta and (device is not None or dtype is not None):
            model = model.to(device=device, dtype=dtype)
    if deploy and not build_deploy_form:
        from zoo.deploy import reparameterize

        model = reparameterize(model.eval(), inplace=True)
    if features_only:
        model = features(model, out_indices, feature_cls)
    return model


FEATURE_CLASSES = ("list", "dict", "hook", "fx", "getter")


def features(model: nn.Module, out_indices: Sequence[int] | int | None = None, feature_cls: str | type | None = None,
             **feature_kwargs: Any) -> nn.Module:
    """Wrap a backbone so it returns the feature maps of ``out_indices`` (default: every level in feature_info).

    ``feature_cls`` picks timm's wrapper: ``"list"`` (FeatureListNet; a family's own ``as_feature_extractor`` when it
    has one), ``"dict"`` (FeatureDictNet), ``"hook"`` (FeatureHookNet), ``"fx"`` (FeatureGraphNet) or ``"getter"``
    (FeatureGetterNet over ``forward_intermediates``), or a class taking ``(model, out_indices=..., **kwargs)``.
    """
    from timm.models import FeatureDictNet, FeatureGraphNet, FeatureHookNet, FeatureListNet
    from timm.models._features import FeatureGetterNet  # not re-exported by timm.models

    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"{type(model).__name__} has no feature_info: features_only is not supported")
    n = len(info)
    idx = tuple(feature_take_indices(n, out_indices)[0])
    name = feature_cls.lower() if isinstance(feature_cls, str) else feature_cls
    if isinstance(name, str) and name not in FEATURE_CLASSES:
        raise ValueError(f"feature_cls={feature_cls!r} is not known; use one of {', '.join(FEATURE_CLASSES)} or a class")
    cfg = getattr(model, "pretrained_cfg", None)
    if name in (None, "list") and hasattr(model, "as_feature_extractor"):  # families timm's wrapper cannot walk
        net = model.as_feature_extractor(idx)
    elif name in (None, "list"):
        net = FeatureListNet(model, out_indices=idx, flatten_sequential=True, **feature_kwargs)
    elif name == "dict":
        net = FeatureDictNet(model, out_indices=idx, flatten_sequential=True, **feature_kwargs)
    elif name == "hook":
        net = FeatureHookNet(model, out_indices=idx, **feature_kwargs)
    elif name == "fx":
        net = FeatureGraphNet(model, out_indices=idx, **feature_kwargs)
    elif name == "getter":
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{type(model).__name__} has no forward_intermediates: feature_cls='getter' is not supported")
        net = FeatureGetterNet(model, out_indices=list(idx), **feature_kwargs)
    else:
        net = feature_cls(model, out_indices=idx, **feature_kwargs)
    if cfg is not None:
        net.pretrained_cfg = net.default_cfg = cfg.for_features() if hasattr(cfg, "for_features") else cfg
    net.model_name = getattr(model, "model_name", None)
    return net
