"""pareto-zoo: efficient architectures from recent papers, with a timm-style API.

    import zoo
    model = zoo.create_model("nextvit_small", pretrained=True)
"""
from zoo.registry import list_models, model_info, is_model, register_model, ModelCfg, CheckpointSource
from zoo.factory import create_model

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "model_info", "is_model", "register_model", "ModelCfg", "CheckpointSource"]
