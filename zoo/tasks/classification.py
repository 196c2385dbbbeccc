"""Image classification on any registered model, with timm's optimizer and scheduler factories, and the
prediction writer for ``zoo predict``."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.classification import MulticlassAccuracy


class ImageClassification(L.LightningModule):
    """Train / evaluate ``zoo.create_model(model_name, **model_args)`` on a classification DataModule.

    Args:
        model_name: any registered name (``zoo list``), optionally ``arch.tag``.
        model_args: architecture overrides and create_model kwargs (``pretrained``, ``drop_path_rate``, ...).
        num_classes: classifier size.
        optimizer: timm optimizer name (``adamw``, ``sgd``, ``lamb``, ...) via ``timm.optim.create_optimizer_v2``;
            weight decay skips norms and biases.
        lr / weight_decay / momentum: optimizer settings. ``lr`` is the rate for ``lr_base_batch`` samples per
            update when ``lr_base_batch`` is set (linear scaling by the global batch, as most papers state it).
        sched: timm scheduler (``cosine``, ``step``, ``none``), stepped per update; ``warmup_epochs`` and
            ``min_lr`` as in timm.
        label_smoothing / mixup / cutmix: regularization (timm's Mixup + SoftTargetCrossEntropy when mixing).
    """

    def __init__(
        self,
        model_name: str = "nextvit_small",
        model_args: dict[str, Any] | None = None,
        num_classes: int = 1000,
        optimizer: str = "adamw",
        lr: float = 1e-3,
        lr_base_batch: int | None = None,
        weight_decay: float = 0.05,
        momentum: float = 0.9,
        sched: str = "cosine",
        warmup_epochs: float = 0.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-6,
        label_smoothing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        import zoo

        args = dict(model_args or {})
        self.model = zoo.create_model(model_name, num_classes=num_classes, **args)
        if compile:
            self.model = torch.compile(self.model)
        self.mixup_fn = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup

            self.mixup_fn = Mixup(
                mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mixup_prob, label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        self.metrics = torch.nn.ModuleDict(
            {
                # micro: the fraction of images classified right (ImageNet top-1), not the per-class mean
                f"{split}_{k}": MulticlassAccuracy(num_classes, top_k=min(topk, num_classes), average="micro")
                for split in ("val", "test")
                for k, topk in (("top1", 1), ("top5", 5))
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.mixup_fn is not None:
            if x.shape[0] % 2:  # timm's Mixup pairs samples and needs an even batch
                x, y = x[:-1], y[:-1]
            x, soft = self.mixup_fn(x, y)
            loss = torch.sum(-soft * F.log_softmax(self(x), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch, split: str):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{split}/loss", loss, sync_dist=True)
        for k in ("top1", "top5"):
            m = self.metrics[f"{split}_{k}"]
            m(logits, y)
            self.log(f"{split}/acc_{k}" if k != "top1" else f"{split}/acc", m, prog_bar=(k == "top1"))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x).softmax(-1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The data config the model is trained with (input size, normalization) and the class names make the
        # checkpoint self-describing for `zoo export FILE` / zoo.deploy.load_trained_model.
        from zoo.training import data_config

        dm = self._trainer.datamodule if self._trainer is not None else None
        cfg = data_config(dm)
        if cfg:
            checkpoint["data_config"] = cfg
        names = getattr(dm, "class_names", None)
        if names:
            checkpoint["class_names"] = [str(n) for n in names]

    # optimizers ------------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        hp = self.hparams
        lr = hp.lr
        if hp.lr_base_batch:
            global_batch = self._global_batch_size()
            lr = hp.lr * global_batch / hp.lr_base_batch
        opt = create_optimizer_v2(self.model, opt=hp.optimizer, lr=lr, weight_decay=hp.weight_decay, momentum=hp.momentum)
        if hp.sched in (None, "none", ""):
            return opt
        from zoo.training import updates_per_epoch

        epochs = max(1, self.trainer.max_epochs or 1)
        sched, _ = create_scheduler_v2(
            opt, sched=hp.sched, num_epochs=epochs, warmup_epochs=hp.warmup_epochs, warmup_lr=hp.warmup_lr,
            min_lr=hp.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch(self.trainer),
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric):
        # timm schedulers are stepped by update count, not by torch's LRScheduler API.
        scheduler.step_update(num_updates=self.global_step)

    def _global_batch_size(self) -> int:
        dm = self.trainer.datamodule
        per_device = getattr(dm, "batch_size", None) or 1
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches


# ----------------------------------------------------------------------------------------- prediction writer


class ClassificationWriter(BasePredictionWriter):
    """Write ``zoo predict`` results of an image classifier: one row per image with its file (or ``split[index]``
    for in-memory data: its index), the true label when the data has one, and the top-k labels with their probabilities.

    Args:
        output_dir: folder for ``predictions.csv`` / ``predictions.json`` (default: the run's log directory).
        formats: any of ``csv`` and ``json``.
        top_k: how many labels per image.

    Labels are the datamodule's ``class_names``, else ImageNet's names for a 1000-class head, else indices. Files
    are written once, at the end (temporary file + rename); ``fast_dev_run`` writes nothing.
    """

    def __init__(self, output_dir: str | None = None, formats: list[str] = ("csv", "json"), top_k: int = 5):
        super().__init__(write_interval="batch")
        bad = set(formats) - {"csv", "json"}
        if bad or not formats:
            raise ValueError(f"ClassificationWriter: formats must be a non-empty subset of ['csv', 'json'], got {formats}")
        self.output_dir, self.formats, self.top_k = output_dir, list(formats), top_k
        self.rows: list[dict[str, Any]] = []
        self.paths: list[Path] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self.rows, self.paths = [], []

    @staticmethod
    def _names(trainer, pl_module, n: int) -> list[str]:
        names = list(getattr(trainer.datamodule, "class_names", None) or [])
        if len(names) == n:
            return [str(v) for v in names]
        if n == 1000:
            from timm.data import ImageNetInfo

            return [ImageNetInfo().index_to_description(i) for i in range(n)]
        return [str(i) for i in range(n)]

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        probs = prediction.float().cpu()
        names = self._names(trainer, pl_module, probs.shape[-1])
        k = min(self.top_k, probs.shape[-1])
        scores, idx = probs.topk(k, dim=-1)
        second = batch[1] if isinstance(batch, (list, tuple)) and len(batch) > 1 else None
        files = list(second) if isinstance(second, (list, tuple)) and all(isinstance(f, str) for f in second) else None
        targets = second.tolist() if isinstance(second, torch.Tensor) and second.ndim == 1 else None
        indices = list(batch_indices) if batch_indices is not None else [None] * len(probs)
        for j in range(len(probs)):
            row: dict[str, Any] = {"file": files[j] if files else f"#{indices[j]}"}
            if targets is not None:
                row["target"] = names[targets[j]] if 0 <= targets[j] < len(names) else str(targets[j])
            row["labels"] = [names[i] for i in idx[j].tolist()]
            row["scores"] = [round(v, 6) for v in scores[j].tolist()]
            self.rows.append(row)

    def on_predict_end(self, trainer, pl_module) -> None:
        if trainer.fast_dev_run or not self.rows:
            return
        out = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        for fmt in self.formats:
            path = out / f"predictions{suffix}.{fmt}"
            tmp = path.with_name(f".{path.name}.part")
            with open(tmp, "w", newline="") as f:
                if fmt == "json":
                    json.dump(self.rows, f, indent=1)
                else:
                    self._write_csv(f)
            os.replace(tmp, path)
            self.paths.append(path)
        rank_zero_info(f"wrote {len(self.rows)} predictions to {', '.join(str(p) for p in self.paths)}")

    def _write_csv(self, f) -> None:
        k = max(len(r["labels"]) for r in self.rows)
        cols = ["file"] + (["target"] if "target" in self.rows[0] else [])
        cols += [c for i in range(1, k + 1) for c in (f"label_{i}", f"score_{i}")]
        w = csv.writer(f)
        w.writerow(cols)
        for r in self.rows:
            top = [v for lab, s in zip(r["labels"], r["scores"]) for v in (lab, s)]
            w.writerow([r["file"]] + ([r["target"]] if "target" in r else []) + top)
