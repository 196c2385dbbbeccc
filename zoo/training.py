"""The Lightning CLI behind ``zoo fit|validate|test|predict`` and the callbacks / plugins recipes use.

Recipes are plain LightningCLI YAML (subclass mode for model and data). On top of Lightning's defaults:
- ``-c NAME`` also resolves a packaged recipe name (``quickstart``, ``nextvit/imagenet1k``);
- every run writes into its own versioned folder, ``<default_root_dir>/version_N`` with the recipes' loggers
  (the logger's ``save_dir`` is linked to ``trainer.default_root_dir``; ``ModelCheckpoint`` without ``dirpath`` puts
  its files in ``<log_dir>/checkpoints``, as Lightning does), so ``--trainer.default_root_dir DIR`` moves everything
  and a rerun never overwrites an earlier run;
- ``--ckpt_path last`` / ``best`` name the newest ``last.ckpt`` / the best checkpoint of the latest earlier run
  under that root (Lightning itself only looks inside the new run's empty folder);
- ``fast_dev_run`` writes nothing (Lightning's ``ModelCheckpoint.on_train_end`` still saves ``last.ckpt`` then);
- checkpoints are written atomically (temporary file + rename);
- random-number-generator states and the position inside the epoch are checkpointed, so a run killed
  mid-epoch and resumed with ``--ckpt_path last`` continues exactly as if it had not been interrupted.
"""
from __future__ import annotations

import json
import os
import random
import warnings
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


def data_config(datamodule) -> dict[str, Any] | None:
    """The preprocessing a model was trained with, as timm's data config (``input_size`` (C, H, W), ``mean``,
    ``std``, ``interpolation``, ``crop_pct``), from the datamodule's ``data_config``; ``None`` when it has none."""
    cfg = getattr(datamodule, "data_config", None) if datamodule is not None else None
    if not cfg:
        return None
    out = dict(cfg)
    out["input_size"] = [int(v) for v in out["input_size"]]
    return out


def training_output_metadata(pl_module, datamodule, input_size=None) -> dict[str, str]:
    """Safetensors metadata that makes a training output self-describing: architecture, head, the data config it
    was trained with and the class names. ``zoo.deploy.load_trained_model`` / ``zoo export FILE`` read it back."""
    hp = pl_module.hparams
    meta = {
        "model_name": str(getattr(hp, "model_name", "")),
        "model_args": json.dumps(dict(getattr(hp, "model_args", None) or {}), default=str),
        "num_classes": str(getattr(hp, "num_classes", "")),
    }
    cfg = data_config(datamodule) or {}
    if input_size is not None:
        cfg["input_size"] = [int(v) for v in input_size]
    if cfg:
        meta["data_config"] = json.dumps(cfg)
        meta["input_size"] = json.dumps(cfg["input_size"])
    names = getattr(datamodule, "class_names", None) if datamodule is not None else None
    if names:
        meta["class_names"] = json.dumps([str(n) for n in names])
    return meta


class DeployExport(Callback):
    """At the end of fit, write the reparameterized deploy weights (safetensors, with the architecture, data config
    and class names in its metadata) and an ONNX export (with the onnxruntime parity check) next to the run's
    checkpoints, i.e. inside the run's own log directory. ``fast_dev_run`` writes nothing.

    Args:
        dirpath: output folder (default: the first ModelCheckpoint's folder, else ``trainer.log_dir``).
        onnx: also export ONNX (needs the ``export`` extra).
        input_size: (C, H, W) to export with; default: the size the model was trained at (the datamodule's
            ``data_config``), else the model config's.
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
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        from zoo.checkpoints import save_file
        from zoo.deploy import export, reparameterize

        net = pl_module.model
        deployed = reparameterize(net.cpu().float())
        out = self._out_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        meta = training_output_metadata(pl_module, trainer.datamodule, self.input_size)
        meta["form"] = "deploy"
        save_file(deployed.state_dict(), out / "deploy.safetensors", metadata=meta)
        self.paths["deploy"] = str(out / "deploy.safetensors")
        if self.onnx:
            size = json.loads(meta["input_size"]) if "input_size" in meta else None
            export(deployed, out / "model.onnx", "onnx", input_size=size, reparameterize=False, check=True)
            self.paths["onnx"] = str(out / "model.onnx")
        net.to(pl_module.device)


def _root_dir(default_root_dir: str | None) -> str:
    return "." if default_root_dir is None else str(default_root_dir)  # Lightning's default: the working directory


def _spec_class(spec) -> type | None:
    """The class a parsed ``model`` / ``data`` section names (links run at parse time, before anything is built)."""
    import importlib

    path = spec.get("class_path") if isinstance(spec, dict) else getattr(spec, "class_path", None)
    if not path:
        return None
    module, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None  # jsonargparse reports the bad class_path itself


def _spec_init_args(spec) -> dict:
    args = spec.get("init_args") if isinstance(spec, dict) else getattr(spec, "init_args", None)
    if args is None:
        return {}
    return dict(args.as_dict() if hasattr(args, "as_dict") else args)


def _num_classes_from_data(data, model) -> int | None:
    """``model.num_classes`` from a DataModule that declares its classes (class attribute ``num_classes``: digits 10,
    ADE20K 150, ...) when the model section leaves it at the task's default; a value given for the model wins (an
    ADE20K-layout dataset of other classes: ``--model.init_args.num_classes N``), and folder datasets (classes counted
    when the folder is read) keep the model's value."""
    import inspect

    given = _spec_init_args(model).get("num_classes")
    n = getattr(_spec_class(data), "num_classes", None)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return given
    task = _spec_class(model)
    try:
        default = inspect.signature(task).parameters["num_classes"].default if task is not None else None
    except (KeyError, TypeError, ValueError):
        default = None
    return n if given is None or given == default else given


def _model_takes(model_name: str, param: str) -> bool:
    """Whether the registered model's class takes ``param`` in its constructor (e.g. ``img_size`` of the SNNs, whose
    classifier size depends on the input size); models that accept any input size do not."""
    import inspect
    import typing

    from zoo.registry import resolve_cfg

    try:
        entry = resolve_cfg(model_name)[0]
        cls = typing.get_type_hints(entry.fn).get("return")
    except Exception:  # noqa: BLE001 - an unknown name is reported when the model is built
        return False
    for fn in (entry.fn, cls):
        try:
            if fn is not None and param in inspect.signature(fn).parameters:
                return True
        except (TypeError, ValueError):
            continue
    return False


def _model_args_from_data(model_name: str, model_args: dict | None, data) -> dict | None:
    """``model_args`` with the input the data produces: ``in_chans`` (DataModules with that argument, e.g. digits) and
    ``img_size`` from the data's ``image_size`` for models whose size is fixed at construction (the SNNs). A recipe
    writes these values once, in ``data``; a contradicting value in ``model_args`` is an error."""
    given = _spec_init_args(data)
    args = dict(model_args or {})
    linked = {}
    if given.get("in_chans") is not None:
        linked["in_chans"] = given["in_chans"]
    if given.get("image_size") is not None and isinstance(model_name, str) and _model_takes(model_name, "img_size"):
        linked["img_size"] = given["image_size"]
    for key, value in linked.items():
        if key in args and args[key] != value:
            data_key = "image_size" if key == "img_size" else key
            raise ValueError(
                f"model_args {key}={args[key]} but data {data_key}={value}; {key} is linked from the data: "
                f"set --data.init_args.{data_key} only")
        args[key] = value
    return args if (args or model_args is not None) else None


def _run_roots(trainer) -> list[Path]:
    """Folders that hold the checkpoints of this recipe's runs: explicit ``dirpath``s, else every run folder under
    the first logger's root (``<save_dir>/<name>/<version>/checkpoints``), else ``default_root_dir/checkpoints``."""
    dirs: list[Path] = []
    for cb in trainer.checkpoint_callbacks:
        if cb.dirpath:
            dirs.append(Path(cb.dirpath))
        elif trainer.loggers:
            lg = trainer.loggers[0]
            root = Path(lg.save_dir or trainer.default_root_dir) / str(lg.name or "")
            dirs += [d for d in root.glob("*/checkpoints") if d.is_dir()]
        else:
            dirs.append(Path(trainer.default_root_dir) / "checkpoints")
    return list(dict.fromkeys(dirs))


def find_run_checkpoint(trainer, which: str) -> Path | None:
    """``last``: the newest ``last*.ckpt`` of this recipe's runs. ``best``: the best checkpoint recorded by the first
    ModelCheckpoint (the one Lightning's ``ckpt_path="best"`` uses) in the newest run that has checkpoints."""
    dirs = _run_roots(trainer)
    ckpts = [p for d in dirs for p in d.glob("*.ckpt") if p.is_file()]
    if not ckpts:
        return None
    if which == "last":
        lasts = [p for p in ckpts if p.name == "last.ckpt" or p.name.startswith("last-")]
        return max(lasts, key=lambda p: p.stat().st_mtime) if lasts else None
    newest = max(ckpts, key=lambda p: p.stat().st_mtime)
    cb = trainer.checkpoint_callback
    if cb is None:
        return None
    state = torch.load(newest, map_location="cpu", weights_only=True, mmap=True).get("callbacks", {})
    best = (state.get(cb.state_key) or {}).get("best_model_path")
    if not best:
        return None
    for cand in (Path(best), newest.parent / Path(best).name):  # the run folder may have been moved
        if cand.is_file():
            return cand
    return None


class ZooCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)  # tasks build optimizers with timm's factories
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"prog": "zoo"})  # usage / errors say `zoo fit ...`
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # The logger writes under trainer.default_root_dir, so `--trainer.default_root_dir DIR` moves the whole run
        # (logs, checkpoints, exports), as with Lightning's default logger. Recipes leave save_dir out.
        parser.link_arguments("trainer.default_root_dir", "trainer.logger.init_args.save_dir", compute_fn=_root_dir,
                              apply_on="parse")
        # Values model and data share are written once, in the model: DataModules that build their transforms
        # from a model config (ImageFolderDataModule, COCODetection, ...) take the task's model_name.
        parser.link_arguments("model.init_args.model_name", "data.init_args.model_name", apply_on="parse")
        # The other way, the data decides what the model sees: the number of classes (DataModules with fixed
        # classes), the input channels and, for models built for one input size (SNNs), that size.
        parser.link_arguments(("data", "model"), "model.init_args.num_classes",
                              compute_fn=_num_classes_from_data, apply_on="parse")
        parser.link_arguments(("model.init_args.model_name", "model.init_args.model_args", "data"),
                              "model.init_args.model_args", compute_fn=_model_args_from_data, apply_on="parse")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        init = self.config_init.get(str(self.subcommand)) if self.subcommand else None
        ckpt = init.get("ckpt_path") if init is not None else None
        if ckpt in ("last", "best"):
            found = find_run_checkpoint(self.trainer, ckpt)
            if found is not None:
                init["ckpt_path"] = str(found)
            elif self.subcommand != "fit":  # fit keeps Lightning's "nothing to resume: start fresh" warning
                where = ", ".join(str(d) for d in _run_roots(self.trainer)) or str(self.trainer.default_root_dir)
                raise ValueError(
                    f"--ckpt_path {ckpt}: no {ckpt} checkpoint of an earlier run of this recipe (looked in "
                    f"{where or 'no checkpoint folder'}); run `zoo fit` with it first, or pass a .ckpt file"
                )

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, RNGStateCallback) for c in trainer.callbacks):
            trainer.callbacks.append(RNGStateCallback())
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if trainer.fast_dev_run:
            # ModelCheckpoint skips every save under fast_dev_run except save_last in on_train_end.
            for cb in trainer.checkpoint_callbacks:
                cb.save_last = False
        return trainer


class RecipeNotFoundError(FileNotFoundError):
    """``-c NAME`` names neither a file nor a packaged recipe (the message suggests close names)."""


def resolve_config_args(argv: list[str]) -> list[str]:
    """Replace ``-c NAME`` / ``--config NAME`` by the packaged recipe's path when NAME is not a file."""
    from zoo.recipes import resolve_recipe

    def resolve(name: str) -> str:
        try:
            return str(resolve_recipe(name))
        except FileNotFoundError as e:
            raise RecipeNotFoundError(str(e)) from None

    out = list(argv)
    for i, a in enumerate(out):
        if a in ("-c", "--config") and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
        elif a.startswith("--config="):
            out[i] = "--config=" + resolve(a.split("=", 1)[1])
    return out


def run_lightning_cli(argv: list[str], **kwargs) -> ZooCLI:
    args = resolve_config_args(argv)
    with warnings.catch_warnings():
        # `zoo fit ...` hands its own argv over on purpose; Lightning warns whenever args and sys.argv both exist.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return ZooCLI(args=args, **kwargs)
