"""Model registry: entrypoints, default configs, checkpoint tags and lookup (timm's contract).

A family file declares a module-level ``default_cfgs`` dict (``"arch.tag": ModelCfg``) and decorates thin
entrypoints with :func:`register_model`. An entrypoint takes keyword architecture overrides and returns an
``nn.Module``; weights are loaded centrally by :func:`zoo.factory.create_model`, never by the entrypoint.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import importlib
import json
import os
import re
import sys
from pathlib import Path
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

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


# sha256 of released files, keyed by CheckpointSource.location, for sources whose family entry pins none. Each value
# is the "Git LFS Details: SHA256" that the Hugging Face file page lists (the page named in the comment); a download
# that does not match is not kept. MODEL_CARD.md lists the tags these cover ("verified").
PINNED_SHA256: dict[str, str] = {
    # https://huggingface.co/timm/nextvit_small.bd_ssld_6m_in1k/blob/main/model.safetensors (commit 4bdc94b)
    "hf://timm/nextvit_small.bd_ssld_6m_in1k/model.safetensors":
        "cc15a70eae88347934fea2b1b2a9f809e48e67e94875fcbdb666525a50643956",
    # https://huggingface.co/timm/fastvit_t12.apple_in1k/blob/main/model.safetensors (commit 368fd09)
    "hf://timm/fastvit_t12.apple_in1k/model.safetensors":
        "ec5022429778ac28f0abc778568143ce56b2ac028c4c1939cc61c86f9c63ae73",
    # https://huggingface.co/timm/fastvit_sa12.apple_in1k/blob/main/model.safetensors (commit 4a83ca7)
    "hf://timm/fastvit_sa12.apple_in1k/model.safetensors":
        "4c41bc351018c691167b661e3bb03bcd713a2915ef7128e118877ca0ca5b5afa",
    # https://huggingface.co/timm/fastvit_sa12.apple_dist_in1k/blob/main/model.safetensors (commit bd7cc24)
    "hf://timm/fastvit_sa12.apple_dist_in1k/model.safetensors":
        "18b9da4a792331715218461c78c2560781771a5cbbbd8e028940d6f964298bbb",
    # https://huggingface.co/timm/fastvit_sa24.apple_dist_in1k/blob/main/model.safetensors (commit 6234320)
    "hf://timm/fastvit_sa24.apple_dist_in1k/model.safetensors":
        "c38594c380a5542da9e6ac3c36af95ab180d54e8982c822c677e452e03217a10",
    # https://huggingface.co/timm/fastvit_t8.apple_dist_in1k/blob/refs%2Fpr%2F1/model.safetensors (commit 6970f66,
    # "Add model"; main's tree lists model.safetensors as last changed by that same commit)
    "hf://timm/fastvit_t8.apple_dist_in1k/model.safetensors":
        "9e31da81a225d20bc9e326baf1cc88ccc0e68fe2c43ea0154a870c409747f6aa",
}


# Mapping keys of ModelCfg that are not fields: where the weights are, in timm's PretrainedCfg names.
_SOURCE_KEYS = ("url", "file", "hf_hub_id", "hf_hub_filename", "has_weights")


@dataclass(frozen=True)
class ModelCfg(Mapping):
    """Default configuration of one ``arch.tag``: data config, head metadata, provenance, weights.

    It is also a read-only mapping with timm's ``PretrainedCfg`` keys (``cfg["input_size"]``, ``cfg.get("mean")``,
    ``cfg["hf_hub_id"]``), so ``model.pretrained_cfg`` / ``model.default_cfg`` work with timm's data helpers
    (``timm.data.resolve_model_data_config(model)``, ``resolve_data_config({}, model=model)``).
    """

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
    # timm PretrainedCfg fields (same names and meaning)
    architecture: str = ""  # set by register_model
    tag: str = ""  # set by register_model
    test_input_size: tuple[int, ...] | None = None
    test_crop_pct: float | None = None
    min_input_size: tuple[int, ...] | None = None
    fixed_input_size: bool = False
    crop_mode: str = "center"

    @property
    def has_weights(self) -> bool:
        return self.source is not None

    # ---- timm-style mapping view
    def _mapping_keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self)) + _SOURCE_KEYS

    def __getitem__(self, key: str) -> Any:
        if key in _SOURCE_KEYS:
            src = self.source
            if key == "has_weights":
                return self.has_weights
            if src is None:
                return None
            if key == "url":
                return None if (src.url or "").startswith("file://") else src.url
            if key == "file":
                if src.url and src.url.startswith("file://"):
                    import urllib.parse
                    import urllib.request

                    return urllib.request.url2pathname(urllib.parse.urlparse(src.url).path)
                return None
            return src.hf_hub_id if key == "hf_hub_id" else src.hf_filename
        if key in self.__dataclass_fields__:
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self):
        return iter(self._mapping_keys())

    def __len__(self) -> int:
        return len(self._mapping_keys())

    def __contains__(self, key: object) -> bool:
        return key in self.__dataclass_fields__ or key in _SOURCE_KEYS

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["source"] = self.source.location if self.source else None
        return d

    def for_features(self) -> "ModelCfg":
        """The config of a ``features_only`` model: no classifier (timm's ``pretrained_cfg_for_features``)."""
        return dataclasses.replace(self, num_classes=0, classifier=None)


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
    config from the module's ``default_cfgs[name]`` if present. Each config gets its ``architecture`` and ``tag``.
    A family listed in ``zoo/models.py`` must also be in the model index (``python -m zoo.registry``) so that
    ``zoo list`` finds it without importing any model code.
    """
    name = fn.__name__
    mod = sys.modules[fn.__module__]
    cfgs: dict[str, ModelCfg] = getattr(mod, "default_cfgs", {})
    tags = {k.split(".", 1)[1]: v for k, v in cfgs.items() if k.split(".", 1)[0] == name and "." in k}
    if name in cfgs:
        tags.setdefault("", cfgs[name])
    if not tags:
        raise ValueError(f"register_model: no default config for {name!r} in {fn.__module__}.default_cfgs")
    tags = {t: dataclasses.replace(c, architecture=name, tag=t) for t, c in tags.items()}
    default_tag = next((t for t, c in tags.items() if c.has_weights), next(iter(tags)))
    if name in _registry and _registry[name].module != fn.__module__:
        raise ValueError(f"model {name!r} is already registered by {_registry[name].module}")
    _registry[name] = _Entry(name, fn, fn.__module__, tags, default_tag, getattr(mod, "checkpoint_filter_fn", None))
    return fn


# ------------------------------------------------------------------------------------------- model index
# ``zoo list`` / ``zoo info`` / ``is_model`` read a generated index (names -> module, task, tags, configs, parameter
# count) instead of importing every family (torch, timm and model code take seconds to import). ``create_model``
# imports only the family of the requested model. tests/test_registry.py checks the index against the live registry.

INDEX_PATH = Path(__file__).with_name("model_index.json")
_MODELS_PY = Path(__file__).with_name("models.py")


def family_modules() -> list[str]:
    """The family modules ``zoo/models.py`` imports (one ``import zoo.<...>`` line per family), in order."""
    return re.findall(r"^import\s+(zoo\.[\w.]+)", _MODELS_PY.read_text(), flags=re.M)


@functools.lru_cache(maxsize=1)
def _index() -> dict[str, Any]:
    try:
        data = json.loads(INDEX_PATH.read_text())
    except FileNotFoundError:
        return {"modules": [], "models": {}}
    return data


def _import_unindexed_families() -> None:
    """Families listed in zoo/models.py but missing from the index (index not regenerated yet) are imported, so a
    new family is usable at once; tests/test_registry.py fails until the index is regenerated."""
    known = set(_index()["modules"])
    for m in family_modules():
        if m not in known and m not in sys.modules:
            importlib.import_module(m)


def _ensure_families_imported() -> None:
    import zoo.models  # noqa: F401  (imports every family so registrations happen)


def _as_tuples(x: Any) -> Any:
    """JSON lists back to the tuples ModelCfg holds."""
    if isinstance(x, list):
        return tuple(_as_tuples(v) for v in x)
    if isinstance(x, dict):
        return {k: _as_tuples(v) for k, v in x.items()}
    return x


def _entry_record(entry: _Entry, params: int) -> dict[str, Any]:
    return {
        "module": entry.module,
        "task": entry.tags[entry.default_tag].task,
        "default_tag": entry.default_tag,
        "params": params,
        "tags": {t: {"has_weights": c.has_weights, "cfg": c.to_dict()} for t, c in entry.tags.items()},
    }


def _count_params(entry: _Entry) -> int:
    import torch

    with torch.device("meta"):
        model = entry.fn()
    return sum(p.numel() for p in model.parameters())


def build_index(count_params: bool | Iterable[str] = True) -> dict[str, Any]:
    """The index of every model the families in zoo/models.py register (imports them all; parameters are counted
    on the ``meta`` device, for every model or only for the names given; -1 for the others)."""
    modules = family_modules()
    for m in modules:
        importlib.import_module(m)
    wanted = None if count_params is True else set(count_params or ())
    models = {n: _entry_record(e, _count_params(e) if wanted is None or n in wanted else -1)
              for n, e in sorted(_registry.items()) if e.module in modules}
    # a JSON round trip, so the result compares equal to what load_index reads back
    return json.loads(json.dumps({"modules": modules, "models": models}, default=str))


def write_index(path: Path = INDEX_PATH) -> Path:
    data = build_index()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    _index.cache_clear()
    return path


# ------------------------------------------------------------------------------------------------ lookup


def split_model_name(name: str) -> tuple[str, str | None]:
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def _all_names() -> set[str]:
    _import_unindexed_families()
    return set(_index()["models"]) | set(_registry)


def get_entry(name: str) -> _Entry:
    """The live registry entry of ``arch`` / ``arch.tag``, importing only that model's family."""
    arch, _ = split_model_name(name)
    if arch not in _registry:
        rec = _index()["models"].get(arch)
        if rec is not None:
            importlib.import_module(rec["module"])
        else:
            _import_unindexed_families()
    if arch not in _registry:
        close = difflib.get_close_matches(arch, sorted(_all_names()), n=5, cutoff=0.5)
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


def _record(name: str) -> dict[str, Any]:
    """Index-shaped record of a model: the live entry when its family is imported, else the index."""
    e = _registry.get(name)
    if e is not None:
        return {"module": e.module, "task": e.tags[e.default_tag].task, "default_tag": e.default_tag,
                "tags": {t: {"has_weights": c.has_weights} for t, c in e.tags.items()}}
    return _index()["models"][name]


def _natural_key(s: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s.lower())]


def _str_list(value: str | Iterable[str] | None) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _expand_filter(f: str) -> list[str]:
    return [f] if split_model_name(f)[1] else [f"{f}.*", f]


def list_models(
    filter: str | Iterable[str] = "",
    module: str | Iterable[str] = "",
    pretrained: bool = False,
    exclude_filters: str | Iterable[str] = "",
    name_matches_cfg: bool = False,
    include_tags: bool | None = None,
    *,
    task: str | None = None,
) -> list[str]:
    """Registered model names, like ``timm.list_models``, naturally sorted.

    Args:
        filter: glob(s) on the name (``"nextvit_*"``, ``["fastvit_t*", "nextvit_s*"]``); empty: all.
        module: only models of these family modules (``"nextvit"`` or ``"zoo.vision.nextvit"``).
        pretrained: only names with released weights.
        exclude_filters: glob(s) removed after ``filter``.
        name_matches_cfg: only names with a registered config (every zoo model has one; kept for timm parity).
        include_tags: list ``arch.tag`` names (default: the value of ``pretrained``).
        task: only models of this task (``"image-classification"``, ``"object-detection"``, ...).

    Reads the model index: no model code is imported.
    """
    include = _str_list(filter)
    exclude = _str_list(exclude_filters)
    modules = _str_list(module)
    if include_tags is None:
        include_tags = pretrained
    names: set[str] = set()
    for n in _all_names():
        rec = _record(n)
        if modules and not any(rec["module"] == m or rec["module"].rsplit(".", 1)[-1] == m for m in modules):
            continue
        if task is not None and rec["task"] != task:
            continue
        tags = rec["tags"]
        if include_tags:
            for t, c in tags.items():
                if not pretrained or c["has_weights"]:
                    names.add(f"{n}.{t}" if t else n)
        elif not pretrained or any(c["has_weights"] for c in tags.values()):
            names.add(n)
    if include_tags:
        include = [e for f in include for e in _expand_filter(f)]
        exclude = [e for f in exclude for e in _expand_filter(f)]
    if include:
        names = {n for n in names if any(fnmatch.fnmatchcase(n, f) for f in include)}
    for f in exclude:
        names = {n for n in names if not fnmatch.fnmatchcase(n, f)}
    return sorted(names, key=_natural_key)


def is_model(name: str) -> bool:
    return split_model_name(name)[0] in _all_names()


def model_info(name: str) -> dict[str, Any]:
    """Family, task, paper, parameter count, default config and tags of a registered model (from the index when
    the model is indexed: no model code is imported)."""
    arch, tag = split_model_name(name)
    rec = _index()["models"].get(arch)
    if rec is None or arch in _registry and _registry[arch].module not in _index()["modules"]:
        entry, tag, cfg = resolve_cfg(name)
        rec = _entry_record(entry, _count_params(entry))
        rec = json.loads(json.dumps(rec, default=str))
    tag = rec["default_tag"] if tag is None else tag
    if tag not in rec["tags"]:
        raise UnknownModelError(
            f"Model {arch!r} has no checkpoint tag {tag!r}; available tags: "
            f"{', '.join(t for t in rec['tags'] if t) or '(none)'}"
        )
    cfg = _as_tuples(rec["tags"][tag]["cfg"])
    return {
        "name": arch,
        "family": cfg["family"],
        "task": cfg["task"],
        "paper": cfg["paper"],
        "license": cfg["license"],
        "params": rec["params"],
        "default_tag": rec["default_tag"],
        "default_cfg": cfg,
        "tags": {t: _as_tuples(r["cfg"]) for t, r in rec["tags"].items()},
        "module": rec["module"],
    }


if __name__ == "__main__":  # python -m zoo.registry: regenerate zoo/model_index.json
    from zoo.registry import write_index as _write  # the package's module, where the families register

    print(f"wrote {_write()}")
