"""``lr_base_batch``: the configured ``lr`` is for ``lr_base_batch`` samples per update and scales linearly with the
global batch (per-device batch x devices x gradient accumulation), in every task that offers it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

TASKS = {
    "detection": ("zoo.tasks.detection", "ObjectDetection",
                  dict(model_name="ssdlite_mobiledet_cpu", num_classes=3,
                       model_args=dict(multiplier=0.25, extra_depths=[64, 32, 32, 16]))),
    "classification": ("zoo.tasks.classification", "ImageClassification",
                       dict(model_name="snn_vgg16", num_classes=3,
                            model_args=dict(spiking=False, cfg=(8, "A"), fc_dims=(16,), img_size=8, in_chans=1))),
    "iir_snn": ("zoo.snn.pipeline", "IIRClassification",
                dict(model_name="snn_vgg16", num_classes=3, model_args=dict(cfg=(8, "A"), fc_dims=(16,), img_size=8,
                                                                             in_chans=1))),
}


def _trainer(batch_size, devices, accumulate):
    # the attributes configure_optimizers reads from a Lightning Trainer (a multi-device run cannot start here)
    return SimpleNamespace(datamodule=SimpleNamespace(batch_size=batch_size), world_size=devices,
                           accumulate_grad_batches=accumulate, max_epochs=1, estimated_stepping_batches=10)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_lr_scales_linearly_with_the_global_batch(task):
    import importlib

    module, cls, kwargs = TASKS[task]
    Task = getattr(importlib.import_module(module), cls)
    for base, (bs, devices, accum), expected in [
        (512, (16, 4, 2), 0.8 * 128 / 512),  # 16 x 4 devices x 2 accumulation = 128 samples per update
        (512, (512, 1, 1), 0.8),  # the base batch itself: lr unchanged
        (None, (16, 4, 2), 0.8),  # no base batch: lr as given
    ]:
        t = Task(**kwargs, optimizer="sgd", lr=0.8, lr_base_batch=base, sched="none")
        t._trainer = _trainer(bs, devices, accum)
        out = t.configure_optimizers()
        opt = out["optimizer"] if isinstance(out, dict) else out
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([expected] * len(opt.param_groups)), (task, base)
