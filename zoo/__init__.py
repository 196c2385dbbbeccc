"""pareto-zoo: efficient architectures from recent papers, with a timm-style API.

    import zoo
    model = zoo.create_model("nextvit_small", pretrained=True)
"""
import importlib

# Public names, imported on first use: `import zoo` (and so `zoo --help`, `zoo list`) stays free of torch, timm and
# model code; `zoo.create_model` pulls in torch and only the requested model's family.
_LAZY = {
    "create_model": "zoo.factory",
    "list_models": "zoo.registry",
    "model_info": "zoo.registry",
    "is_model": "zoo.registry",
    "register_model": "zoo.registry",
    "ModelCfg": "zoo.registry",
    "CheckpointSource": "zoo.registry",
    "ZooModel": "zoo.contract",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):  # `import zoo; zoo.checkpoints...` keeps working: submodules load on first use
        try:
            return importlib.import_module(f"zoo.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"zoo.{name}":
                raise
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "model_info", "is_model", "register_model", "ModelCfg", "CheckpointSource", "ZooModel",
           "get_tokenizer"]


def get_tokenizer(model_name: str):
    """The text tokenizer of a CLIP model (``zoo.get_tokenizer("mobileclip_s0")``), like ``open_clip.get_tokenizer``."""
    from zoo.data.clip_tokenizer import get_tokenizer as _get

    return _get(model_name)
