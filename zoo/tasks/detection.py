"""Object detection on any registered detector, with COCO mAP (pycocotools through torchmetrics).

A detector plugs in by implementing three methods (``DetectorProtocol``):

- ``forward(images) -> outputs``: raw predictions (tensors or tuples of tensors, export friendly);
- ``loss(outputs, targets, image_size) -> dict`` with the total under ``"loss"`` (other entries are logged);
  ``targets[i]`` has ``boxes`` (n, 4) xyxy in pixels of the input tensor and ``labels`` (n,) 0-based;
- ``postprocess(outputs, image_size) -> list[dict]`` with ``boxes`` (xyxy input pixels), ``scores``, ``labels``.

The task resizes nothing itself: the DataModule (:class:`zoo.data.COCODetection`) resizes images to the model input
and keeps the original ground truth; predictions are scaled back to original pixels before the metric, so mAP is
measured exactly as COCOeval measures it on the annotation file.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import lightning as L
import torch

MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100",
            "mar_small", "mar_medium", "mar_large")
COCO_STATS = MAP_KEYS  # the order of COCOeval.stats


class DetectorProtocol(Protocol):
    num_classes: int

    def __call__(self, images: torch.Tensor) -> Any: ...

    def loss(self, outputs: Any, targets: list[dict], image_size: tuple[int, int]) -> dict[str, torch.Tensor]: ...

    def postprocess(self, outputs: Any, image_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]: ...


def scale_boxes(boxes: torch.Tensor, from_size: Sequence[int], to_size: Sequence[int]) -> torch.Tensor:
    """Map xyxy boxes from an (H, W) image to another (H, W) (the inverse of a stretch resize), clipped."""
    fh, fw = float(from_size[0]), float(from_size[1])
    th, tw = float(to_size[0]), float(to_size[1])
    s = boxes.new_tensor([tw / fw, th / fh, tw / fw, th / fh])
    out = boxes * s
    return torch.stack([out[:, 0].clamp(0, tw), out[:, 1].clamp(0, th), out[:, 2].clamp(0, tw), out[:, 3].clamp(0, th)], 1)


def coco_thresholds() -> tuple[list[float], list[float]]:
    """COCOeval's IoU (0.50:0.05:0.95) and recall (0:0.01:1) thresholds, computed as pycocotools does (float64)."""
    import numpy as np

    iou = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
    rec = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
    return iou.tolist(), rec.tolist()


def mean_average_precision(class_metrics: bool = False, backend: str = "pycocotools"):
    """torchmetrics' MeanAveragePrecision configured to reproduce COCOeval exactly (xyxy boxes).

    torchmetrics' default thresholds come from ``torch.linspace`` in float32 (0.55 -> 0.550000011...), which moves
    recall samples that fall exactly on a threshold and changes AP in the 4th digit; pycocotools' float64
    thresholds are passed explicitly instead.
    """
    from torchmetrics.detection import MeanAveragePrecision

    iou, rec = coco_thresholds()
    return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=class_metrics, backend=backend,
                                iou_thresholds=iou, rec_thresholds=rec)


def metric_targets(targets: list[dict]) -> list[dict]:
    """Ground truth for the metric: the untouched COCO boxes (original pixels), area and crowd flags."""
    return [dict(boxes=t["gt_boxes"], labels=t["gt_labels"], area=t["area"], iscrowd=t["iscrowd"]) for t in targets]


def coco_evaluate(gt: dict, detections: list[dict], quiet: bool = True) -> dict[str, float]:
    """Run pycocotools' COCOeval directly: ``gt`` a COCO instances dict, ``detections`` COCO results
    (``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score``). Returns the 12 stats by name."""
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        dt = coco.loadRes(copy.deepcopy(detections)) if detections else COCO()
        ev = COCOeval(coco, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(v) for k, v in zip(COCO_STATS, ev.stats)}



def yolo_average_precision(predictions: list[dict], targets: list[dict],
                           iou_thresholds: Sequence[float] | None = None) -> dict[str, float]:
    """Box AP computed the way ultralytics' validator computes it (the figures DocLayout-YOLO and YOLOv10 report),
    on the same inputs as torchmetrics: per image ``boxes`` (xyxy), ``scores``, ``labels`` and ground-truth
    ``boxes``, ``labels``. Returns ``map`` (IoU 0.50:0.05:0.95), ``map_50``, ``map_75`` and ``map_per_class`` (for
    the labels in ``classes``: those present in the ground truth).

    How it differs from COCOeval (see MODEL_CARD.md, "DocLayout-YOLO"):

    - matching is greedy by IoU, not by score: at each IoU threshold all (ground truth, detection) pairs of the same
      class above the threshold are sorted by IoU, each detection keeps its highest-IoU pair, then each ground
      truth keeps one of those (the first in detection order: ultralytics does not re-sort by IoU in between);
    - AP integrates the precision envelope, with the points (0, 1) and (1, 0) added, linearly interpolated at 101
      recall points, by the trapezoid rule; COCOeval averages the envelope *sampled* at 101 recall thresholds and
      counts 0 beyond the highest recall reached;
    - no detection limit per image (COCOeval keeps the 100 best), no area ranges, no crowd regions;
    - classes are averaged over those present in the ground truth (a class with detections only is ignored, as in
      COCOeval); recall divides by ``n_gt + 1e-16``.
    """
    import numpy as np

    thr = np.asarray(coco_thresholds()[0] if iou_thresholds is None else iou_thresholds, dtype=np.float64)
    correct, conf, pred_cls, target_cls = [], [], [], []
    for p, t in zip(predictions, targets):
        by_score = torch.argsort(p["scores"].detach().cpu(), descending=True, stable=True).numpy()  # as NMS returns them
        pb = p["boxes"].detach().double().cpu().numpy().reshape(-1, 4)[by_score]
        pl = p["labels"].detach().cpu().numpy().reshape(-1)[by_score]
        tb = t["boxes"].detach().double().cpu().numpy().reshape(-1, 4)
        tl = t["labels"].detach().cpu().numpy().reshape(-1)
        target_cls.append(tl)
        hit = np.zeros((len(pb), len(thr)), dtype=bool)
        if len(pb) and len(tb):
            lt = np.maximum(tb[:, None, :2], pb[None, :, :2])
            rb = np.minimum(tb[:, None, 2:], pb[None, :, 2:])
            inter = np.clip(rb - lt, 0, None).prod(-1)
            area_t = (tb[:, 2:] - tb[:, :2]).prod(-1)
            area_p = (pb[:, 2:] - pb[:, :2]).prod(-1)
            iou = inter / (area_t[:, None] + area_p[None, :] - inter + 1e-7)
            iou = iou * (tl[:, None] == pl[None, :])
            for k, th in enumerate(thr):
                gi, di = np.nonzero(iou >= th)
                if not len(gi):
                    continue
                pairs = np.stack([gi, di, iou[gi, di]], 1)
                pairs = pairs[np.argsort(-pairs[:, 2], kind="stable")]
                pairs = pairs[np.unique(pairs[:, 1], return_index=True)[1]]  # one ground truth per detection
                pairs = pairs[np.unique(pairs[:, 0], return_index=True)[1]]  # one detection per ground truth
                hit[pairs[:, 1].astype(int), k] = True
        correct.append(hit)
        conf.append(p["scores"].detach().double().cpu().numpy().reshape(-1)[by_score])
        pred_cls.append(pl)
    tp = np.concatenate(correct) if correct else np.zeros((0, len(thr)), dtype=bool)
    conf, pred_cls = np.concatenate(conf or [np.zeros(0)]), np.concatenate(pred_cls or [np.zeros(0)])
    order = np.argsort(-conf, kind="stable")
    tp, pred_cls = tp[order], pred_cls[order]
    classes, n_gt = np.unique(np.concatenate(target_cls or [np.zeros(0)]), return_counts=True)
    ap = np.zeros((len(classes), len(thr)))
    grid = np.linspace(0, 1, 101)
    for ci, c in enumerate(classes):
        sel = pred_cls == c
        if not sel.any():
            continue
        tpc = tp[sel].cumsum(0)
        fpc = (~tp[sel]).cumsum(0)
        recall = tpc / (n_gt[ci] + 1e-16)
        precision = tpc / (tpc + fpc)
        for k in range(len(thr)):
            mrec = np.concatenate([[0.0], recall[:, k], [1.0]])
            mpre = np.concatenate([[1.0], precision[:, k], [0.0]])
            mpre = np.flip(np.maximum.accumulate(np.flip(mpre)))  # the precision envelope
            ap[ci, k] = np.trapezoid(np.interp(grid, mrec, mpre), grid)
    out = {"map": float(ap.mean()) if ap.size else 0.0, "map_per_class": ap.mean(1).tolist(),
           "classes": [int(c) for c in classes]}
    for name, value in (("map_50", 0.5), ("map_75", 0.75)):
        k = np.nonzero(np.isclose(thr, value))[0]
        if len(k):
            out[name] = float(ap[:, k[0]].mean()) if len(classes) else 0.0
    return out

class ObjectDetection(L.LightningModule):
    """Train / evaluate ``zoo.create_model(model_name, **model_args)`` for detection.

    Args:
        model_name: a registered detector (``zoo list --task object-detection``), optionally ``arch.tag``.
        model_args: architecture overrides and create_model kwargs (``pretrained``, ``checkpoint_path``, ...).
        num_classes: foreground classes (the DataModule's ``num_classes``); ``None`` keeps the model's default.
        optimizer: timm optimizer name (``momentum`` = SGD with Nesterov off, as TF; ``sgd``, ``adamw``, ...);
            weight decay skips norms and biases (TF's L2 covers conv weights only; TF's ``l2_regularizer(w)`` equals
            ``weight_decay = w`` in SGD).
        lr / lr_base_batch: ``lr`` is for ``lr_base_batch`` images per update when set (linear scaling).
        sched: ``cosine`` (timm's CosineLRScheduler stepped per update, linear warmup from ``warmup_lr``) or ``none``.
        warmup_steps / warmup_epochs: warmup length in updates (takes precedence) or epochs.
        class_metrics: also log per-class AP.
        map_backend: torchmetrics backend (``pycocotools`` reproduces COCOeval exactly).
        channels_last: run the network in channels-last memory format (faster depthwise convs on CPU).
    """

    def __init__(
        self,
        model_name: str = "ssdlite_mobiledet_cpu",
        model_args: dict[str, Any] | None = None,
        num_classes: int | None = None,
        optimizer: str = "momentum",
        lr: float = 0.8,
        lr_base_batch: int | None = None,
        weight_decay: float = 4e-5,
        momentum: float = 0.9,
        sched: str = "cosine",
        warmup_steps: int | None = None,
        warmup_epochs: float = 0.0,
        warmup_lr: float = 0.13333,
        min_lr: float = 0.0,
        grad_clip_norm: float | None = None,
        class_metrics: bool = False,
        map_backend: str = "pycocotools",
        channels_last: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        import zoo

        self.model = zoo.create_model(model_name, num_classes=num_classes, **dict(model_args or {}))
        for method in ("loss", "postprocess"):
            if not callable(getattr(self.model, method, None)):
                raise TypeError(f"{model_name} is not a detector: it has no {method}() method (see "
                                f"zoo.tasks.detection.DetectorProtocol)")
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # kept out of the module tree so the state dict has only ``model.*`` keys
        self.__dict__["_net"] = torch.compile(self.model) if compile else self.model
        self.val_map = mean_average_precision(class_metrics, map_backend)
        self.test_map = mean_average_precision(class_metrics, map_backend)

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        cfg = getattr(self.model, "pretrained_cfg", None)
        if getattr(dm, "_image_size", 0) is None and cfg is not None:
            dm.image_size = int(cfg.input_size[-1])  # "resized per the model config"
        if stage in ("fit", "validate", "test"):
            n = getattr(dm, "num_classes", None)
            if n is not None and n > self.model.num_classes:
                raise ValueError(
                    f"the data has {n} classes but {self.hparams.model_name} predicts {self.model.num_classes}; "
                    f"set model.init_args.num_classes: {n} (or use data label_map: contiguous)")

    def forward(self, x: torch.Tensor):
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._net(x)

    # --------------------------------------------------------------------------------------------- steps
    @staticmethod
    def _loss_targets(targets: list[dict]) -> list[dict]:
        return [dict(boxes=t["boxes"], labels=t["labels"]) for t in targets]

    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self.model.loss(self(images), self._loss_targets(targets), tuple(images.shape[-2:]))
        bs = images.shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs)
        for k, v in losses.items():
            if k != "loss":
                self.log(f"train/{k}", v.float(), batch_size=bs)
        return losses["loss"]

    def predictions(self, images: torch.Tensor, targets: list[dict], outputs=None) -> list[dict]:
        """Post-processed detections in original-image pixels."""
        size = tuple(images.shape[-2:])
        dets = self.model.postprocess(self(images) if outputs is None else outputs, size)
        out = []
        for d, t in zip(dets, targets):
            orig = t["orig_size"].tolist()
            out.append(dict(boxes=scale_boxes(d["boxes"].float(), size, orig), scores=d["scores"].float(),
                            labels=d["labels"].long()))
        return out

    def _eval_step(self, batch, split: str):
        images, targets = batch
        outputs = self(images)
        losses = self.model.loss(outputs, self._loss_targets(targets), tuple(images.shape[-2:]))
        self.log(f"{split}/loss", losses["loss"], batch_size=images.shape[0], sync_dist=True)
        metric = self.val_map if split == "val" else self.test_map
        metric.update(self.predictions(images, targets, outputs), metric_targets(targets))

    def _eval_epoch_end(self, split: str):
        metric = self.val_map if split == "val" else self.test_map
        res = metric.compute()
        metric.reset()
        for k in MAP_KEYS:
            self.log(f"{split}/{k}", res[k].float(), prog_bar=k in ("map", "map_50"), sync_dist=False)
        if self.hparams.class_metrics and res["map_per_class"].numel() > 1:
            for c, v in zip(res["classes"].tolist(), res["map_per_class"].tolist()):
                self.log(f"{split}/map_class_{c}", float(v))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def predict_step(self, batch, batch_idx):
        images, metas = batch
        dets = self.predictions(images, metas)
        return [dict(d, path=m.get("path"), image_id=m.get("image_id"), orig_size=m["orig_size"].tolist())
                for d, m in zip(dets, metas)]

    # -------------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        hp = self.hparams
        lr = hp.lr
        if hp.lr_base_batch:
            lr = hp.lr * self._global_batch_size() / hp.lr_base_batch
        opt = create_optimizer_v2(self.model, opt=hp.optimizer, lr=lr, weight_decay=hp.weight_decay,
                                  momentum=hp.momentum)
        if hp.sched in (None, "", "none"):
            return opt
        if hp.sched != "cosine":
            raise ValueError(f"sched must be 'cosine' or 'none', got {hp.sched!r}")
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = hp.warmup_steps
        if warmup is None:
            epochs = max(1, self.trainer.max_epochs or 1)
            warmup = int(round(hp.warmup_epochs * total / epochs))
        warmup = min(int(warmup), total - 1)
        # TF cosine_decay_with_warmup: linear warmup_lr -> lr over warmup steps, then cosine over the rest
        sched = CosineLRScheduler(opt, t_initial=max(1, total - warmup), lr_min=hp.min_lr, warmup_t=warmup,
                                  warmup_lr_init=hp.warmup_lr if warmup else lr, warmup_prefix=True,
                                  t_in_epochs=False)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric):
        scheduler.step_update(num_updates=self.global_step)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.hparams.grad_clip_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip_norm, gradient_clip_algorithm="norm")
        elif gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    def _global_batch_size(self) -> int:
        dm = self.trainer.datamodule
        per_device = getattr(dm, "batch_size", None) or 1
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches
