"""The Lightning CLI behind ``zoo fit|validate|test|predict`` and the callbacks / plugins recipes use.

Recipes are plain LightningCLI YAML (subclass mode for model and data). On top of Lightning's defaults:
- ``-c NAME`` also resolves a packaged recipe name (``quickstart``, ``nextvit/imagenet1k``);
- the saved ``config.yaml`` is overwritten on reruns into the same folder;
- checkpoints are written atomically (temporary file + rename);
- random-number-generator states and the position inside the epoch are checkpointed, so a run killed
  mid-epoch and resumed with ``--ckpt_path last`` continues exactly as if it had not been interrupted.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO


def updates_per_epoch(trainer: L.Trainer) -> int:
    """Optimizer updates per epoch, for per-update LR schedules built in ``configure_optimizers``.

    Lightning's ``estimated_stepping_batches`` builds the train dataloader before a resumed run's loop state is
    restored, and the fit loop then keeps that loader, so the saved position inside the epoch would be ignored.
    When resuming we drop that early loader so the fit loop builds it again after the restore.
    """
    epochs = max(1, trainer.max_epochs or 1)
    n = max(1, int(trainer.estimated_stepping_batches) // epochs)
    if trainer.ckpt_path is not None:
        trainer.fit_loop._combined_loader = None
    return n


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same folder, then rename it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.part")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class RNGStateCallback(Callback):
    """Checkpoint Python / NumPy / torch RNG states so a resumed run draws the same random numbers (dropout,
    drop path, augmentation) as an uninterrupted one."""

    def state_dict(self) -> dict[str, Any]:
        # Plain types and tensors only, so the checkpoint loads with torch.load(weights_only=True).
        name, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def on_train_start(self, trainer, pl_module) -> None:
        state = getattr(self, "_pending", None)
        if state is not None:
            random.setstate(state["python"])
            name, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            torch.set_rng_state(state["torch"])
            self._pending = None


class DeployExport(Callback):
    """At the end of fit, write the reparameterized deploy weights (safetensors) and an ONNX export (with the
    onnxruntime parity check) next to the Lightning checkpoints.

    Args:
        dirpath: output folder (default: the first ModelCheckpoint's folder, else ``trainer.log_dir``).
        onnx: also export ONNX (needs the ``export`` extra).
        input_size: (C, H, W) to export with; default: the datamodule's image size or the model config's.
    """

    def __init__(self, dirpath: str | None = None, onnx: bool = True, input_size: list[int] | None = None):
        self.dirpath, self.onnx, self.input_size = dirpath, onnx, input_size
        self.paths: dict[str, str] = {}

    def _out_dir(self, trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.dirpath:
            return Path(ckpt.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from zoo.checkpoints import save_file
        from zoo.deploy import export, reparameterize

        net = pl_module.model
        deployed = reparameterize(net.cpu().float())
        out = self._out_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"model_name": str(getattr(pl_module.hparams, "model_name", "")), "form": "deploy"}
        meta["model_args"] = repr(dict(getattr(pl_module.hparams, "model_args", None) or {}))
        meta["num_classes"] = str(getattr(pl_module.hparams, "num_classes", ""))
        save_file(deployed.state_dict(), out / "deploy.safetensors", metadata=meta)
        self.paths["deploy"] = str(out / "deploy.safetensors")
        if self.onnx:
            size = self.input_size
            dm = trainer.datamodule
            if size is None and dm is not None and hasattr(dm, "image_size"):
                size = [getattr(dm, "in_chans", 3), dm.image_size, dm.image_size]
            export(deployed, out / "model.onnx", "onnx", input_size=size, reparameterize=False, check=True)
            self.paths["onnx"] = str(out / "model.onnx")
        net.to(pl_module.device)


class ZooCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)  # tasks build optimizers with timm's factories
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, RNGStateCallback) for c in trainer.callbacks):
            trainer.callbacks.append(RNGStateCallback())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def resolve_config_args(argv: list[str]) -> list[str]:
    """Replace ``-c NAME`` / ``--config NAME`` by the packaged recipe's path when NAME is not a file."""
    from zoo.recipes import resolve_recipe

    out = list(argv)
    for i, a in enumerate(out):
        if a in ("-c", "--config") and i + 1 < len(out):
            out[i + 1] = str(resolve_recipe(out[i + 1]))
        elif a.startswith("--config="):
            out[i] = "--config=" + str(resolve_recipe(a.split("=", 1)[1]))
    return out


def run_lightning_cli(argv: list[str], **kwargs) -> ZooCLI:
    return ZooCLI(args=resolve_config_args(argv), **kwargs)
