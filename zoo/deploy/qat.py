"""Quantization-aware fine-tuning as a Lightning callback (recipes: ``zoo.deploy.qat.QuantizationAwareTraining``).

Kept apart from ``zoo.deploy.quantize`` so importing the quantizer does not import Lightning.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class QuantizationAwareTraining(Callback):
    """Quantization-aware fine-tuning: train with int8 fake quantization (``torch.ao.quantization.FakeQuantize``)
    on the tensors ``zoo.deploy.quantize`` quantizes when it deploys the model (per-channel symmetric int8 weights;
    uint8 activations on every tensor of onnxruntime's QDQ graph: conv outputs before a hard-swish, its gate and
    product, SE gates and products, residual adds, ReLU6 outputs; see ``zoo.deploy.quantize.prepare_qat``), so the
    weights adapt to the int8 grid that is deployed; then export with ``zoo export --int8`` as usual. Add it to a recipe that starts from
    a trained fp32 checkpoint (``model_args: {checkpoint_path: ...}``) for models whose post-training int8 loses
    too much. Observers are frozen during validation; checkpoints keep the plain model's keys (loadable without
    this callback) and the fake quantizers are removed at the end of training (before ``DeployExport``).

    Args:
        activations: fake-quantize the activations.
        weights: fake-quantize the weights (``weights=False, activations=False``: no fake quantization at all, the
            same fine-tuning in fp32, e.g. as a control).
        freeze_bn: BatchNorm layers normalize with their running statistics and stop updating them, so every
            training forward computes what the deployed model (BatchNorm folded into the conv) computes and the
            ranges the fake quantizers observe are the deployed tensors' (with batch statistics they are not).
    """

    def __init__(self, activations: bool = True, weights: bool = True, freeze_bn: bool = True):
        self.activations, self.weights = activations, weights
        self.freeze_bn = freeze_bn
        self._handles: list | None = None
        self._bns: list = []

    def on_fit_start(self, trainer, pl_module) -> None:
        from torch import nn

        from zoo.deploy.quantize import prepare_qat

        self._handles = prepare_qat(pl_module.model, self.activations, self.weights)
        self._bns = [m for m in pl_module.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
            if self.freeze_bn else []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for bn in self._bns:  # Lightning puts the model back in train mode after validation / at each epoch
            bn.eval()

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._handles is not None:
            from zoo.deploy.quantize import set_qat_observers

            set_qat_observers(pl_module.model, self._handles, False)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._handles is not None:
            from zoo.deploy.quantize import set_qat_observers

            set_qat_observers(pl_module.model, self._handles, True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self._handles is not None:
            from zoo.deploy.quantize import plain_state_dict_keys

            checkpoint["state_dict"] = plain_state_dict_keys(checkpoint["state_dict"])

    def on_train_end(self, trainer, pl_module) -> None:
        if self._handles is not None:
            from zoo.deploy.quantize import remove_qat

            remove_qat(pl_module.model, self._handles)
            self._handles = None
