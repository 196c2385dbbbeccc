"""Deploy: reparameterize trained models into their inference form, export them and check parity."""
from zoo.deploy.reparam import reparameterize, count_foldable_batchnorms
from zoo.deploy.export import export, ExportParityError, load_trained_model, onnx_parity
from zoo.deploy.quantize import quantize, QuantizationError, QuantizationResult, FAMILY_RULES

__all__ = ["reparameterize", "count_foldable_batchnorms", "export", "ExportParityError", "onnx_parity",
           "load_trained_model", "quantize", "QuantizationError", "QuantizationResult", "FAMILY_RULES"]
