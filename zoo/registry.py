"""Model registry: entrypoints, default configs, checkpoint tags and lookup (timm's contract).

A family file declares a module-level ``default_cfgs`` dict (``"arch.tag": ModelCfg``) and decorates thin
entrypoints with :func:`register_model`. An entrypoint takes keyword architecture overrides and returns an
``nn.Module``; weights are loaded centrally by :func:`zoo.factory.create_model`, never by the entrypoint.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CheckpointSource:
    """Where a released checkpoint lives and how to read it.

    ``layout`` names the key layout of the file ("zoo", "official", "timm", "hf", ...); the family's
    ``checkpoint_filter_fn`` converts every known layout to ours.
    """

    url: str | None = None
    hf_hub_id: str | None = None
    hf_filename: str | None = None
    sha256: str | None = None
    layout: str = "zoo"
    file_name: str | None = None  # cache file name; defaults to the URL's / hub file's basename

    @property
    def location(self) -> str:
        if self.hf_hub_id:
            return f"hf://{self.hf_hub_id}/{self.hf_filename or 'model.safetensors'}"
        return self.url or "<no source>"


@dataclass(frozen=True)
class ModelCfg:
    """Default configuration of one ``arch.tag``: data config, head metadata, provenance, weights."""

    task: str = "image-classification"
    family: str = ""
    paper: str = ""  # arXiv id
    license: str = ""
    num_classes: int = 1000
    input_size: tuple[int, ...] = (3, 224, 224)
    pool_size: tuple[int, int] | None = (7, 7)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    first_conv: str | None = None
    classifier: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # published, e.g. {"top1": 82.5}
    source: CheckpointSource | None = None
    notes: str = ""

    @property
    def has_weights(self) -> bool:
        return self.source is not None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["source"] = self.source.location if self.source else None
        return d


@dataclass
class _Entry:
    name: str
    fn: Callable[..., Any]
    module: str
    tags: dict[str, ModelCfg]
    default_tag: str
    filter_fn: Callable[[dict, Any], dict] | None


_registry: dict[str, _Entry] = {}


def register_model(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register an entrypoint under its function name, with its module's ``default_cfgs`` tags.

    The first tag with weights is the default (timm's rule); a model without any tag gets an untagged
    config from the module's ``default_cfgs[name]`` if present.
    """
    name = fn.__name__
    mod = sys.modules[fn.__module__]
    cfgs: dict[str, ModelCfg] = getattr(mod, "default_cfgs", {})
    tags = {k.split(".", 1)[1]: v for k, v in cfgs.items() if k.split(".", 1)[0] == name and "." in k}
    if name in cfgs:
        tags.setdefault("", cfgs[name])
    if not tags:
        raise ValueError(f"register_model: no default config for {name!r} in {fn.__module__}.default_cfgs")
    default_tag = next((t for t, c in tags.items() if c.has_weights), next(iter(tags)))
    if name in _registry and _registry[name].module != fn.__module__:
        raise ValueError(f"model {name!r} is already registered by {_registry[name].module}")
    _registry[name] = _Entry(name, fn, fn.__module__, tags, default_tag, getattr(mod, "checkpoint_filter_fn", None))
    return fn


def _ensure_families_imported() -> None:
    import zoo.models  # noqa: F401  (imports every family so registrations happen)


def split_model_name(name: str) -> tuple[str, str | None]:
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def get_entry(name: str) -> _Entry:
    _ensure_families_imported()
    arch, _ = split_model_name(name)
    if arch not in _registry:
        close = difflib.get_close_matches(arch, list(_registry), n=5, cutoff=0.5)
        hint = f" Closest registered names: {', '.join(close)}." if close else ""
        raise UnknownModelError(f"Unknown model {name!r}.{hint} See zoo.list_models() for all names.")
    return _registry[arch]


def resolve_cfg(name: str) -> tuple[_Entry, str, ModelCfg]:
    """Return (entry, tag, cfg) for ``arch`` or ``arch.tag``."""
    entry = get_entry(name)
    _, tag = split_model_name(name)
    tag = entry.default_tag if tag is None else tag
    if tag not in entry.tags:
        raise UnknownModelError(
            f"Model {entry.name!r} has no checkpoint tag {tag!r}; available tags: "
            f"{', '.join(t for t in entry.tags if t) or '(none)'}"
        )
    return entry, tag, entry.tags[tag]


def list_models(pattern: str = "*", *, task: str | None = None, pretrained: bool = False) -> list[str]:
    """Registered names matching a glob; with ``pretrained=True`` every ``arch.tag`` that has weights."""
    _ensure_families_imported()
    out = []
    for name, e in sorted(_registry.items()):
        if task is not None and e.tags[e.default_tag].task != task:
            continue
        if pretrained:
            out += [f"{name}.{t}" for t, c in e.tags.items() if c.has_weights and fnmatch.fnmatch(f"{name}.{t}", pattern)]
        elif fnmatch.fnmatch(name, pattern):
            out.append(name)
    return out


def is_model(name: str) -> bool:
    _ensure_families_imported()
    return split_model_name(name)[0] in _registry


def model_info(name: str) -> dict[str, Any]:
    """Family, task, paper, parameter count, default config and tags of a registered model."""
    import torch

    entry, tag, cfg = resolve_cfg(name)
    with torch.device("meta"):
        model = entry.fn()
    return {
        "name": entry.name,
        "family": cfg.family,
        "task": cfg.task,
        "paper": cfg.paper,
        "license": cfg.license,
        "params": sum(p.numel() for p in model.parameters()),
        "default_tag": entry.default_tag,
        "default_cfg": cfg.to_dict(),
        "tags": {t: c.to_dict() for t, c in entry.tags.items()},
        "module": entry.module,
    }
