"""The timm model contract, written once for every zoo backbone.

Every classification / image-feature backbone subclasses :class:`ZooModel` (instead of ``nn.Module``). A family sets,
in its constructor, the attributes timm's models have (``num_classes``, ``in_chans``, ``num_features``,
``head_hidden_size``, ``feature_info``) and defines ``forward_features``; the base supplies the rest of timm's API
(a family overrides what its layout needs differently):

- ``forward`` / ``forward_head`` (a timm ``ClassifierHead``-like ``self.head``), ``get_classifier``,
  ``set_grad_checkpointing`` (the model's and each stage's ``grad_checkpointing`` flag) and ``group_matcher``
  (``stem`` / ``stages.i.blocks.j``);
- ``reset_classifier`` that keeps the model's device and dtype (a family's own ``reset_classifier`` is wrapped so
  the new head lands where the model lives; without one, a ``self.head`` that is timm's ``ClassifierHead`` or a plain
  ``nn.Linear`` is handled here);
- ``forward_intermediates(x, indices, norm, stop_early, output_fmt, intermediates_only)`` and
  ``prune_intermediate_layers(indices, prune_norm, prune_head)`` for the usual ``stem -> stages -> tail -> head``
  layout: one entry of ``self.stages`` per ``feature_info`` level, ``tail_module`` naming what ``forward_features``
  applies after the last stage (a final norm or conv; ``tail_is_norm`` when ``norm=True`` should apply it);
- ``default_cfg``: an alias of ``pretrained_cfg`` (set by :func:`zoo.create_model`), a dict-like
  :class:`zoo.registry.ModelCfg` that timm's ``resolve_model_data_config`` reads.

Items a family cannot meet are declared in :data:`CONTRACT_EXCEPTIONS` (one table, with the reason);
``tests/test_contract.py`` runs every registered backbone through the contract at the reduced size the family
declares in its module-level ``small_cfgs`` (see :class:`SmallCfg`).
"""
import contextlib
import fnmatch
import functools
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

# Tasks whose models must meet the whole contract (the registry's ``ModelCfg.task``).
BACKBONE_TASKS = ("image-classification", "image-feature-extraction")

# Contract items a family cannot meet, by model-name glob: {glob: {item: reason}}. Items: "forward_intermediates"
# (also prune_intermediate_layers and features_only feature_cls="getter"), "features_only" (every feature_cls),
# "torchscript", "fx", "fx_torchscript", "pool_size" (forward_features is not a spatial map), "global_pool"
# (reset_classifier(0, '') cannot return a 4-D map), "grad_checkpointing".
CONTRACT_EXCEPTIONS: Dict[str, Dict[str, str]] = {
    "snn_*": {
        "forward_intermediates": "a spiking net's intermediate maps are spike trains over timesteps: there is no "
                                 "single per-stage map to return (use SpikingNet.monitor / iter_timesteps)",
        "features_only": "no per-stage feature maps for the same reason (feature_info is empty)",
        "pool_size": "forward_features returns the flattened pre-logit spike counts (B, num_features), like the "
                     "reference code's classifier input; there is no spatial map or global pool",
        "global_pool": "the classifier reads the flattened map, so there is no pooling to remove",
        "grad_checkpointing": "BPTT keeps the membrane history of every timestep; set_grad_checkpointing raises",
        "torchscript": "the time loop (a generator over timesteps, per-layer state in nested dicts, modules passed "
                       "to a helper) is not TorchScript; FX tracing unrolls it, and the traced graph scripts "
                       "(torch.jit.script(fx_model) is tested)",
    },
}


def contract_exceptions(model_name: str) -> Dict[str, str]:
    """The contract items ``model_name`` is exempt from, with the reason (merged over every matching glob)."""
    out: Dict[str, str] = {}
    for pattern, items in CONTRACT_EXCEPTIONS.items():
        if fnmatch.fnmatch(model_name, pattern):
            out.update(items)
    return out


@dataclass(frozen=True)
class SmallCfg:
    """The reduced size a family's models run at in ``tests/test_contract.py``.

    A family module declares ``small_cfgs = {"<glob on model name>": SmallCfg(kwargs=..., img_size=...)}`` (first
    matching glob wins). ``kwargs`` are constructor overrides that keep every block type but shrink depth and
    width; ``img_size`` is the side of the test input (default: the config's, capped at 64 px).
    """

    kwargs: Dict[str, Any] = field(default_factory=dict)
    img_size: Optional[int] = None


def small_cfg(model_name: str, module: Any) -> SmallCfg:
    """The :class:`SmallCfg` a family module declares for ``model_name`` (an empty one if none matches)."""
    for pattern, cfg in getattr(module, "small_cfgs", {}).items():
        if fnmatch.fnmatch(model_name, pattern):
            return cfg if isinstance(cfg, SmallCfg) else SmallCfg(kwargs=dict(cfg))
    return SmallCfg()


# ---------------------------------------------------------------------------------------------- helpers


def feature_take_indices(num_features: int, indices: Optional[Union[int, Sequence[int]]] = None) -> Tuple[List[int], int]:
    """timm's rule: ``None`` -> every level, ``int n`` -> the last n, a sequence -> those (negative from the end).
    Returns (absolute indices, largest index); an index out of range is a ``ValueError`` naming the valid range."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"indices={indices}: take the last n levels with 1 <= n <= {num_features}")
        take = list(range(num_features - indices, num_features))
    else:
        take = []
        for i in indices:
            j = num_features + i if i < 0 else i
            if not 0 <= j < num_features:
                raise ValueError(f"feature index {i} (out_indices / indices) is out of range: the model has "
                                 f"{num_features} feature levels (0 to {num_features - 1}, or negative from the end)")
            take.append(j)
        if not take:
            raise ValueError("indices is empty: give at least one feature level")
    return take, max(take)


def _reference_tensor(model: nn.Module) -> Optional[torch.Tensor]:
    for t in model.parameters():
        if t.is_floating_point():
            return t
    for t in model.buffers():
        if t.is_floating_point():
            return t
    return None


@contextlib.contextmanager
def keep_device_dtype(model: nn.Module) -> Iterator[None]:
    """Modules created inside the block end up on the model's device and floating dtype (e.g. a new head built by
    ``reset_classifier`` on a CUDA / bfloat16 / meta model). Built directly on the device, then cast."""
    ref = _reference_tensor(model)
    if ref is None:
        yield
        return
    with torch.device(ref.device):
        yield
    for m in model.modules():  # cast only what was created in float32 on the way (already-matching tensors are kept)
        for name, p in list(m.named_parameters(recurse=False)):
            if p.is_floating_point() and p.dtype != ref.dtype:
                m._parameters[name] = nn.Parameter(p.detach().to(ref.dtype), requires_grad=p.requires_grad)
        for name, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point() and b.dtype != ref.dtype:
                m._buffers[name] = b.to(ref.dtype)


def _wrap_reset_classifier(fn):
    @functools.wraps(fn)
    def reset_classifier(self, num_classes: int, *args, **kwargs):
        with keep_device_dtype(self):
            return fn(self, num_classes, *args, **kwargs)

    reset_classifier._zoo_keeps_device = True
    return reset_classifier


# ------------------------------------------------------------------------------------------------ base


class ZooModel(nn.Module):
    """Base class of every zoo backbone: timm's model API on top of the family's ``stem / stages / tail / head``.

    Class attributes a family may set:
        tail_module: name of the module ``forward_features`` applies after the last stage (``"norm"`` for a final
            norm, ``"final_conv"`` for a final conv); ``None`` when the last stage's output is the feature map.
        tail_is_norm: the tail is a norm over the last stage's channels, so ``forward_intermediates(norm=True)``
            applies it to the last level (timm's rule) and ``prune_intermediate_layers(prune_norm=True)`` removes it.

    Override ``forward_stem`` / ``stage_modules`` / ``run_stage`` when the layout differs, or
    ``forward_intermediates`` / ``prune_intermediate_layers`` altogether.
    """

    tail_module: Optional[str] = None
    tail_is_norm: bool = False
    # default_cfg is an alias of pretrained_cfg; TorchScript must not try to compile the property
    __jit_unused_properties__ = ["default_cfg"]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        fn = cls.__dict__.get("reset_classifier")
        if fn is not None and not getattr(fn, "_zoo_keeps_device", False):
            cls.reset_classifier = _wrap_reset_classifier(fn)

    # ---- configuration
    @property
    def default_cfg(self):
        """timm's back-compat alias of ``pretrained_cfg``."""
        return self.__dict__.get("pretrained_cfg")

    @default_cfg.setter
    def default_cfg(self, value) -> None:
        self.__dict__["pretrained_cfg"] = value

    # ---- head
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        head = getattr(self, "head", None)
        return getattr(head, "fc", head)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New classifier for ``num_classes`` (0: none, ``forward`` returns pooled features); ``global_pool=''``
        also removes the pooling (``forward`` returns the feature map). Keeps the model's device and dtype."""
        head = getattr(self, "head", None)
        with keep_device_dtype(self):
            if hasattr(head, "reset"):  # timm ClassifierHead / NormMlpClassifierHead
                head.reset(num_classes, pool_type=global_pool)
            elif isinstance(head, (nn.Linear, nn.Identity)):
                if global_pool:
                    raise ValueError(f"{type(self).__name__} has no pooling to change (global_pool={global_pool!r})")
                self.head = nn.Linear(self.num_features, num_classes, bias=getattr(head, "bias", None) is not None) \
                    if num_classes > 0 else nn.Identity()
            else:
                raise NotImplementedError(f"{type(self).__name__} must define reset_classifier for its head")
        self.num_classes = num_classes
    reset_classifier._zoo_keeps_device = True

    # ---- timm's forward / head / training API for the stem -> stages -> tail -> head layout (override what differs)
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The head on the ``forward_features`` map (a timm ``ClassifierHead``-like ``self.head``)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Sets ``self.grad_checkpointing`` and the flag of every stage that has one (a stage's forward checkpoints
        its blocks when set: ``if self.grad_checkpointing and not torch.jit.is_scripting()``)."""
        self.grad_checkpointing = enable
        for stage in self.stage_modules():
            if hasattr(stage, "grad_checkpointing"):
                stage.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups (layer-wise LR decay): the stem, then one group per stage (coarse) or per block of
        ``stages.i.blocks.j``; families with another layout override it."""
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.blocks\.(\d+)")

    # ---- intermediates
    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def stage_modules(self) -> nn.Sequential:
        """One module per ``feature_info`` level, in order."""
        return self.stages

    def run_stage(self, index: int, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return stage(x)

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.tail_module)(x) if self.tail_module else x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's API: the per-stage maps of ``indices`` (None: all; int n: the last n; a sequence: those) and,
        unless ``intermediates_only``, the ``forward_features`` output.

        Args:
            norm: apply the final norm (when the tail is a norm) to the last level, as timm does.
            stop_early: do not run the stages after the last requested one (the final output is then that stage's).
            output_fmt: ``"NCHW"`` or ``"NHWC"`` (intermediates permuted channels-last).
        """
        fmt = str(getattr(output_fmt, "value", output_fmt))
        if fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt={output_fmt!r}: use 'NCHW' or 'NHWC'")
        stages = self.stage_modules()
        take, max_index = feature_take_indices(len(stages), indices)
        last = len(stages) - 1
        x = self.forward_stem(x)
        out: List[torch.Tensor] = []
        i = -1
        for i, stage in enumerate(stages):
            if stop_early and i > max_index:
                break
            x = self.run_stage(i, stage, x)
            if i in take:
                y = self.forward_tail(x) if (norm and self.tail_is_norm and i == last) else x
                out.append(y.permute(0, 2, 3, 1) if fmt == "NHWC" else y)
        if intermediates_only:
            return out
        if i == last:
            x = self.forward_tail(x)
        return x, out

    def prune_intermediate_layers(
        self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last of ``indices`` (and the tail / head) so the model only computes what
        ``forward_intermediates`` returns. Returns the absolute indices (negative ones are invalid afterwards)."""
        stages = self.stage_modules()
        take, max_index = feature_take_indices(len(stages), indices)
        cut = max_index < len(stages) - 1
        if self.tail_module:
            # a final norm goes with prune_norm; a final conv (width change) also goes with the head (timm's rule)
            drop_tail = cut or prune_norm or (prune_head and not self.tail_is_norm)
            if drop_tail:
                setattr(self, self.tail_module, nn.Identity())
                if not self.tail_is_norm:
                    self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        self.stages = stages[: max_index + 1]
        if cut:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or cut:
            self.reset_classifier(0, "")
        return take


def is_backbone_task(task: str) -> bool:
    return task in BACKBONE_TASKS
