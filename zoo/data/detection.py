"""Object-detection data: COCO-format datasets, an embedded generated shapes set, and a prediction writer.

- :class:`COCODetection` loads any COCO-format dataset (images + ``instances_*.json``) and, with no paths, an
  embedded procedurally generated set (:func:`make_shapes_dataset`) that is written in COCO format and read back
  through the same code, so the same COCO evaluation runs on it.
- Images of any size are resized to the model's input size (``image_size``, default: the model config's, like
  the TF ``fixed_shape_resizer``); predictions are mapped back to original pixels for evaluation and output.
- Boxes stay consistent under augmentation (torchvision ``transforms.v2``: SSD random IoU crop, horizontal flip,
  resize, then ``SanitizeBoundingBoxes``).
- Bad annotations are handled as COCO does or rejected with a message naming the file, annotation and fix:
  images without annotations are kept (all background); crowd and degenerate boxes are excluded from training
  but kept for evaluation (COCOeval ignores crowd regions); unknown category ids raise.

A batch is ``(images (B, 3, S, S), targets)`` where each target has ``boxes`` (xyxy, input pixels) and
``labels`` (0-based) for the loss, ``image_id``, ``orig_size`` (H, W), and the unmodified COCO ground truth in
original pixels (``gt_boxes``, ``gt_labels``, ``area``, ``iscrowd``) for the metric.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SHAPE_CLASSES = ("ellipse", "rectangle", "triangle", "cross", "ring")
SHAPES_VERSION = 1


# ------------------------------------------------------------------------------------- generated shapes set


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Value noise: a coarse random grid bilinearly upsampled to (h, w), values in [0, 1]."""
    gh, gw = h // cell + 2, w // cell + 2
    grid = rng.random((gh, gw))
    ys, xs = (np.arange(h) + 0.5) / cell, (np.arange(w) + 0.5) / cell
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a, b = grid[y0][:, x0], grid[y0][:, x0 + 1]
    c, d = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured background: two colours mixed by gratings + value noise, plus pixel noise. (h, w, 3) float."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    t = np.zeros((h, w))
    for _ in range(int(rng.integers(1, 4))):
        theta, period = rng.uniform(0, np.pi), rng.uniform(6, 40)
        t += np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period + rng.uniform(0, 2 * np.pi))
    t = 0.5 + 0.5 * t / max(1.0, np.abs(t).max())
    mix = rng.uniform(0.2, 0.8)
    t = mix * t + (1 - mix) * _smooth_noise(rng, h, w, int(rng.integers(8, 32)))
    c1, c2 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    return img + rng.normal(0, 6, (h, w, 3))


def _shape_mask(kind: str, h: int, w: int, cx: float, cy: float, rw: float, rh: float) -> np.ndarray:
    """Binary (h, w) mask of a shape sampled at pixel centres (no anti-aliasing, so its box is exact)."""
    mask = np.zeros((h, w), dtype=bool)
    y0, y1 = max(0, int(cy - rh) - 1), min(h, int(cy + rh) + 2)
    x0, x1 = max(0, int(cx - rw) - 1), min(w, int(cx + rw) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
    dx, dy = (xx - cx) / rw, (yy - cy) / rh
    if kind == "ellipse":
        m = dx**2 + dy**2 <= 1
    elif kind == "rectangle":
        m = (np.abs(dx) <= 1) & (np.abs(dy) <= 1)
    elif kind == "triangle":  # apex up
        m = (dy <= 1) & (np.abs(dx) <= (dy + 1) / 2)
    elif kind == "cross":
        arm = 0.34
        m = ((np.abs(dx) <= 1) & (np.abs(dy) <= arm)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= 1))
    elif kind == "ring":
        r2 = dx**2 + dy**2
        m = (r2 <= 1) & (r2 >= 0.55**2)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    mask[y0:y1, x0:x1] = m
    return mask


def render_shapes_image(rng: np.random.Generator, height: int, width: int, max_objects: int = 4,
                        min_frac: float = 0.15, max_frac: float = 0.6, empty_prob: float = 0.05):
    """One image (H, W, 3 uint8) and its objects: dicts with ``bbox`` [x, y, w, h] (the exact extent of the drawn
    pixels), ``area`` (drawn pixel count) and ``label`` (index into SHAPE_CLASSES). Objects do not overlap."""
    img = _background(rng, height, width)
    objects: list[dict[str, Any]] = []
    n = 0 if rng.random() < empty_prob else int(rng.integers(1, max_objects + 1))
    side = min(height, width)
    for _ in range(n):
        for _attempt in range(30):
            label = int(rng.integers(len(SHAPE_CLASSES)))
            r = rng.uniform(min_frac, max_frac) * side / 2
            aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
            rw, rh = r * math.sqrt(aspect), r / math.sqrt(aspect)
            if 2 * rw >= width - 2 or 2 * rh >= height - 2:
                continue
            cx, cy = rng.uniform(rw + 1, width - rw - 1), rng.uniform(rh + 1, height - rh - 1)
            x0, y0, x1, y1 = cx - rw - 2, cy - rh - 2, cx + rw + 2, cy + rh + 2
            if any(x0 < o["_box"][2] and o["_box"][0] < x1 and y0 < o["_box"][3] and o["_box"][1] < y1 for o in objects):
                continue
            mask = _shape_mask(SHAPE_CLASSES[label], height, width, cx, cy, rw, rh)
            if mask.sum() < 16:
                continue
            ys, xs = np.nonzero(mask)
            bx0, by0, bx1, by1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            bg = img[mask].mean(0)
            for _c in range(20):  # a fill colour that stands out from the background under the shape
                colour = rng.uniform(0, 255, 3)
                if np.abs(colour - bg).sum() > 150:
                    break
            shade = 1.0 + 0.12 * (rng.random(int(mask.sum())) - 0.5)
            img[mask] = colour * shade[:, None] + rng.normal(0, 4, (int(mask.sum()), 3))
            objects.append(dict(bbox=[bx0, by0, bx1 - bx0, by1 - by0], area=int(mask.sum()), label=label,
                                _box=(x0, y0, x1, y1)))
            break
    for o in objects:
        o.pop("_box")
    return np.clip(img, 0, 255).round().astype(np.uint8), objects


def make_shapes_dataset(
    root: str | os.PathLike,
    splits: dict[str, int] | None = None,
    seed: int = 0,
    min_size: int = 96,
    max_size: int = 192,
    max_objects: int = 4,
    min_frac: float = 0.15,
    max_frac: float = 0.6,
) -> Path:
    """Write the generated detection set in COCO format: ``root/<split>/images/*.png`` and
    ``root/<split>/annotations.json`` (categories 1..5 = SHAPE_CLASSES). Images have random sizes in
    [min_size, max_size] per side (not square), textured backgrounds and 0..max_objects non-overlapping shapes
    whose boxes are the exact extent of their pixels. Deterministic in ``seed``; written atomically."""
    from PIL import Image

    root = Path(root)
    splits = splits or {"train": 8000, "val": 200, "test": 200}
    if (root / "done").exists():
        return root
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)]
    for split_idx, (split, count) in enumerate(splits.items()):
        rng = np.random.default_rng([seed, split_idx, SHAPES_VERSION])
        (tmp / split / "images").mkdir(parents=True)
        images, annotations = [], []
        for i in range(count):
            h, w = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
            img, objs = render_shapes_image(rng, h, w, max_objects, min_frac, max_frac)
            name = f"{i:06d}.png"
            Image.fromarray(img).save(tmp / split / "images" / name)
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
            for o in objs:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": o["label"] + 1,
                                    "bbox": o["bbox"], "area": o["area"], "iscrowd": 0})
        ann = {"info": {"description": f"zoo generated shapes v{SHAPES_VERSION}, seed {seed}, split {split}"},
               "images": images, "annotations": annotations, "categories": categories}
        (tmp / split / "annotations.json").write_text(json.dumps(ann))
    (tmp / "done").write_text("ok\n")
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (root / "done").exists():
            raise
    return root


# ---------------------------------------------------------------------------------------------- datasets


class AnnotationError(ValueError):
    pass


def load_coco_annotations(ann_file: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a COCO ``instances`` json. Returns the parsed dict with ``images``, ``annotations`` and
    ``categories``; errors name the file, the entry and the fix."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} does not exist")
    data = json.loads(ann_file.read_text())
    for key in ("images", "categories"):
        if key not in data:
            raise AnnotationError(f"{ann_file}: no '{key}' list; a COCO instances file has 'images', 'annotations' "
                                  f"and 'categories'")
    data.setdefault("annotations", [])
    if not data["images"]:
        raise AnnotationError(f"{ann_file}: 'images' is empty; nothing to train or evaluate on")
    if not data["categories"]:
        raise AnnotationError(f"{ann_file}: 'categories' is empty; list the classes as {{'id': 1, 'name': ...}}")
    cat_ids = {c["id"] for c in data["categories"]}
    img_ids = {im["id"] for im in data["images"]}
    for a in data["annotations"]:
        if a.get("category_id") not in cat_ids:
            raise AnnotationError(
                f"{ann_file}: annotation {a.get('id')} (image {a.get('image_id')}) has category_id "
                f"{a.get('category_id')!r}, which is not in 'categories' (ids {sorted(cat_ids)[:20]}); fix the label "
                f"or add the category")
        if a.get("image_id") not in img_ids:
            raise AnnotationError(f"{ann_file}: annotation {a.get('id')} refers to image_id {a.get('image_id')!r}, "
                                  f"which is not in 'images'")
        bbox = a.get("bbox")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
            raise AnnotationError(f"{ann_file}: annotation {a.get('id')} has bbox {bbox!r}; COCO boxes are "
                                  f"[x, y, width, height] with finite numbers")
    return data


def _read_image(path: str | os.PathLike) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        raise RuntimeError(f"cannot read image {path}: {e}") from e


class CocoDetectionDataset(Dataset):
    """One split of a COCO-format dataset; ``label_map`` ``contiguous`` maps the sorted category ids to 0..K-1,
    ``category_id`` uses ``category_id - 1`` (COCO's 90-id layout, as TF's 91-slot heads). ``data``: an already
    validated annotation dict (e.g. converted from YOLO labels; ``ann_file`` then only names the source)."""

    def __init__(self, images_dir: str | os.PathLike, ann_file: str | os.PathLike, transform=None,
                 label_map: str = "contiguous", data: dict[str, Any] | None = None):
        self.images_dir, self.ann_file, self.transform = Path(images_dir), Path(ann_file), transform
        data = load_coco_annotations(ann_file) if data is None else data
        cats = sorted(data["categories"], key=lambda c: c["id"])
        if label_map == "contiguous":
            self.cat_to_label = {c["id"]: i for i, c in enumerate(cats)}
        elif label_map == "category_id":
            if min(c["id"] for c in cats) < 1:
                raise AnnotationError(f"{ann_file}: label_map='category_id' needs category ids >= 1")
            self.cat_to_label = {c["id"]: c["id"] - 1 for c in cats}
        else:
            raise ValueError(f"label_map must be 'contiguous' or 'category_id', got {label_map!r}")
        self.num_classes = max(self.cat_to_label.values()) + 1
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        self.class_names = ["" for _ in range(self.num_classes)]
        for c in cats:
            self.class_names[self.cat_to_label[c["id"]]] = c.get("name", str(c["id"]))
        self.images = sorted(data["images"], key=lambda im: im["id"])
        self.anns: dict[Any, list] = {im["id"]: [] for im in self.images}
        for a in data["annotations"]:
            self.anns[a["image_id"]].append(a)
        self.coco = data

    def __len__(self) -> int:
        return len(self.images)

    def gt(self, index: int) -> dict[str, torch.Tensor]:
        """Ground truth of one image exactly as in the json (original pixels, xyxy), for the metric."""
        anns = self.anns[self.images[index]["id"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        return dict(
            gt_boxes=boxes.float(),
            gt_labels=torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.long),
            area=torch.tensor([float(a.get("area", a["bbox"][2] * a["bbox"][3])) for a in anns], dtype=torch.float32),
            iscrowd=torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.long),
        )

    def __getitem__(self, index: int):
        info = self.images[index]
        img = _read_image(self.images_dir / info["file_name"])
        h, w = img.shape[-2:]
        gt = self.gt(index)
        # training boxes: not crowd, clipped to the image, non-degenerate (as torchvision's COCO reference does)
        keep = gt["iscrowd"] == 0
        boxes = gt["gt_boxes"][keep].clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        labels = gt["gt_labels"][keep]
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not ok.all():
            log.debug("%s: image %s: %d degenerate box(es) skipped for training", self.ann_file, info["id"],
                      int((~ok).sum()))
        boxes, labels = boxes[ok], labels[ok]
        image, boxes, labels = self.transform(img, boxes, labels) if self.transform else (img.float(), boxes, labels)
        target = dict(boxes=boxes, labels=labels, image_id=int(info["id"]), orig_size=torch.tensor([h, w]), **gt)
        return image, target


class ImageListDataset(Dataset):
    """Images for prediction: a file, a folder (recursively) or a glob pattern."""

    def __init__(self, path: str | os.PathLike | Sequence[str], transform=None):
        self.files = list_images(path)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        img = _read_image(self.files[index])
        h, w = img.shape[-2:]
        empty = torch.zeros(0, 4)
        image, _, _ = self.transform(img, empty, torch.zeros(0, dtype=torch.long)) if self.transform else (img.float(), None, None)
        return image, dict(path=str(self.files[index]), image_id=index, orig_size=torch.tensor([h, w]))


def list_images(path: str | os.PathLike | Sequence[str]) -> list[Path]:
    if isinstance(path, (list, tuple)):
        return [f for p in path for f in list_images(p)]
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
    else:
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found at {path!r}")
    return files


class DetectionTransform:
    """uint8 image + xyxy boxes -> normalized float image at ``size`` with the boxes moved along.

    ``augment``: ``"ssd"`` (SSD random IoU crop as TF's ``ssd_random_crop`` + horizontal flip, the MobileDet
    configs), ``"flip"`` or ``"none"``; ``photometric`` adds torchvision's RandomPhotometricDistort.
    """

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float], augment: str = "none",
                 photometric: bool = False):
        from torchvision.transforms import v2

        if augment not in ("ssd", "flip", "none"):
            raise ValueError(f"augment must be 'ssd', 'flip' or 'none', got {augment!r}")
        ops = []
        if photometric:
            ops.append(v2.RandomPhotometricDistort())
        if augment == "ssd":
            ops.append(v2.RandomIoUCrop())
        if augment in ("ssd", "flip"):
            ops.append(v2.RandomHorizontalFlip())
        ops += [v2.Resize(tuple(size), antialias=True), v2.SanitizeBoundingBoxes(min_size=1)]
        self.geometric = v2.Compose(ops)
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

    def __call__(self, img: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor):
        from torchvision import tv_tensors

        bb = tv_tensors.BoundingBoxes(boxes.float(), format="XYXY", canvas_size=tuple(img.shape[-2:]))
        img, tgt = self.geometric(tv_tensors.Image(img), {"boxes": bb, "labels": labels})
        return self.normalize(img).as_subclass(torch.Tensor), tgt["boxes"].as_subclass(torch.Tensor), tgt["labels"]


def collate_detection(batch):
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


# ---------------------------------------------------------------------------------------------- DataModule


class COCODetection(L.LightningDataModule):
    """COCO-format detection data, or (with no paths) the embedded generated shapes set.

    Args:
        root: a COCO 2017 layout (``root/annotations/instances_{train,val}2017.json``, ``root/{train,val}2017/``).
            ``None`` (and no ``*_ann``) uses the generated set, written once to ``$ZOO_HOME/data/``.
        train_ann / train_images / val_ann / val_images / test_ann / test_images: explicit paths (override root).
            The test split defaults to the validation split.
        predict_path: image file, folder or glob for ``zoo predict`` (default: the test split's images).
        model_name: take ``image_size`` / ``mean`` / ``std`` from this model's config when not given.
        image_size: side of the square model input every image is resized to (TF ``fixed_shape_resizer``).
        augment: ``ssd`` | ``flip`` | ``none`` for training (see :class:`DetectionTransform`).
        label_map: ``contiguous`` (sorted category ids -> 0..K-1) or ``category_id`` (id - 1; COCO's 90 ids).
        shapes: options of :func:`make_shapes_dataset` for the generated set (``splits``, sizes, ...).
    """

    def __init__(
        self,
        root: str | None = None,
        train_ann: str | None = None,
        train_images: str | None = None,
        val_ann: str | None = None,
        val_images: str | None = None,
        test_ann: str | None = None,
        test_images: str | None = None,
        predict_path: str | None = None,
        model_name: str | None = None,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        augment: str = "ssd",
        photometric: bool = False,
        label_map: str = "contiguous",
        shapes: dict[str, Any] | None = None,
        data_dir: str | None = None,
    ):
        super().__init__()
        # a None model_name would clash with the task's model_name when Lightning merges hparams
        self.save_hyperparameters(ignore=["model_name"] if model_name is None else None)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed, self.augment, self.photometric = num_workers, seed, augment, photometric
        self.label_map, self.predict_path, self.model_name = label_map, predict_path, model_name
        self._image_size, self._mean, self._std = image_size, mean, std
        self.in_chans = 3
        self.shapes = dict(shapes or {})
        self.generated = root is None and train_ann is None and val_ann is None
        self.data_dir = data_dir
        self._paths = self._resolve_paths(root, train_ann, train_images, val_ann, val_images, test_ann, test_images)
        self._datasets: dict[str, Dataset] = {}

    # configuration -------------------------------------------------------------------------------------
    def _model_cfg(self):
        if not self.model_name:
            return None
        from zoo.registry import resolve_cfg

        return resolve_cfg(self.model_name)[2]

    @property
    def image_size(self) -> int:
        if self._image_size is None:
            cfg = self._model_cfg()
            self._image_size = int(cfg.input_size[-1]) if cfg is not None else 320
        return int(self._image_size)

    @image_size.setter
    def image_size(self, value: int) -> None:
        self._image_size = int(value)

    def _norm(self) -> tuple[Sequence[float], Sequence[float]]:
        cfg = self._model_cfg()
        mean = self._mean or (cfg.mean if cfg is not None else (0.5, 0.5, 0.5))
        std = self._std or (cfg.std if cfg is not None else (0.5, 0.5, 0.5))
        return mean, std

    def _shapes_root(self) -> Path:
        from zoo.checkpoints import zoo_home

        opts = dict(self.shapes)
        splits = opts.get("splits") or {"train": 8000, "val": 200, "test": 200}
        tag = "-".join(f"{k}{v}" for k, v in splits.items())
        extra = "-".join(f"{k}{opts[k]}" for k in sorted(opts) if k != "splits")
        base = Path(self.data_dir) if self.data_dir else zoo_home() / "data"
        return base / f"shapes_v{SHAPES_VERSION}_seed{self.seed}_{tag}{('_' + extra) if extra else ''}"

    def _resolve_paths(self, root, train_ann, train_images, val_ann, val_images, test_ann, test_images):
        if self.generated:
            r = self._shapes_root()
            return {s: (r / s / "images", r / s / "annotations.json") for s in ("train", "val", "test")}
        paths: dict[str, tuple[Path, Path] | None] = {}
        rt = Path(os.path.expanduser(root)) if root else None
        for split, ann, imgs in (("train", train_ann, train_images), ("val", val_ann, val_images)):
            if ann is None and rt is not None:
                ann = rt / "annotations" / f"instances_{split}2017.json"
            if imgs is None and rt is not None:
                imgs = rt / f"{split}2017"
            if ann is None or imgs is None:
                paths[split] = None
            else:
                paths[split] = (Path(os.path.expanduser(str(imgs))), Path(os.path.expanduser(str(ann))))
        if test_ann is not None:
            timgs = test_images or (paths["val"][0] if paths.get("val") else None)
            if timgs is None:
                raise ValueError("COCODetection: test_ann given without test_images")
            paths["test"] = (Path(os.path.expanduser(str(timgs))), Path(os.path.expanduser(str(test_ann))))
        else:
            paths["test"] = paths.get("val")
        return paths

    def prepare_data(self) -> None:
        if self.generated:
            opts = {k: v for k, v in self.shapes.items()}
            make_shapes_dataset(self._shapes_root(), seed=self.seed, **opts)

    # datasets --------------------------------------------------------------------------------------------
    def _dataset(self, split: str) -> CocoDetectionDataset:
        if split not in self._datasets:
            if self._paths.get(split) is None:
                raise ValueError(f"COCODetection: no {split} annotations configured; pass root= (COCO 2017 layout) or "
                                 f"{split}_ann= and {split}_images=")
            if self.generated:
                self.prepare_data()
            imgs, ann = self._paths[split]
            mean, std = self._norm()
            size = (self.image_size, self.image_size)
            aug = self.augment if split == "train" else "none"
            tf = DetectionTransform(size, mean, std, aug, self.photometric and split == "train")
            self._datasets[split] = CocoDetectionDataset(imgs, ann, tf, self.label_map)
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        pass  # datasets are built lazily, after the task had a chance to set image_size from the model

    def _reference(self) -> CocoDetectionDataset:
        for split in ("train", "val", "test"):
            if self._paths.get(split) is not None:
                return self._dataset(split)
        raise ValueError("COCODetection: no annotation files configured")

    @property
    def num_classes(self) -> int:
        return self._reference().num_classes

    @property
    def class_names(self) -> list[str]:
        return self._reference().class_names

    @property
    def label_to_category(self) -> dict[int, int]:
        return self._reference().label_to_cat

    def coco_ground_truth(self, split: str = "val") -> dict[str, Any]:
        """The split's annotation json (the dict COCOeval would load)."""
        return self._dataset(split).coco

    # loaders -----------------------------------------------------------------------------------------------
    def train_dataloader(self):
        from zoo.data.resumable import EpochSeededRandomSampler, ResumableDataLoader

        ds = self._dataset("train")
        self._train_loader = ResumableDataLoader(
            ds, batch_size=self.batch_size, sampler=EpochSeededRandomSampler(ds, self.seed), drop_last=len(ds) > self.batch_size,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0, collate_fn=collate_detection,
        )
        return self._train_loader

    def _eval_loader(self, ds: Dataset) -> DataLoader:
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, collate_fn=collate_detection)

    def val_dataloader(self):
        return self._eval_loader(self._dataset("val"))

    def test_dataloader(self):
        return self._eval_loader(self._dataset("test"))

    def predict_dataloader(self):
        mean, std = self._norm()
        tf = DetectionTransform((self.image_size, self.image_size), mean, std, "none")
        if self.predict_path:
            ds = ImageListDataset(self.predict_path, tf)
        else:
            split = "test" if self._paths.get("test") is not None else "val"
            ref = self._dataset(split)
            ds = ImageListDataset([str(ref.images_dir / im["file_name"]) for im in ref.images], tf)
        return self._eval_loader(ds)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if trainer is not None and trainer.training:
            loader = getattr(self, "_train_loader", None)
            if loader is not None:
                loader.consumed += 1
        return batch


# ----------------------------------------------------------------------------------------- prediction writer


class DetectionWriter(BasePredictionWriter):
    """Write ``zoo predict`` results: per image ``<stem>.json`` (boxes xyxy in original pixels, scores, labels,
    class names, COCO category ids) and, with ``draw``, ``<stem>.png`` with the boxes drawn.

    Args:
        output_dir: folder for the files (created; default: ``predictions/`` in the run's log directory).
        score_threshold: detections below it are neither written nor drawn.
        draw: also write the image with boxes.
    """

    def __init__(self, output_dir: str | None = None, score_threshold: float = 0.3, draw: bool = True):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir) if output_dir else None
        self.score_threshold, self.draw = score_threshold, draw

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.output_dir is None:  # inside this run's own folder, never the working directory
            self.output_dir = Path(trainer.log_dir or trainer.default_root_dir) / "predictions"
        self.written: list[Path] = []

    def _names(self, trainer) -> tuple[list[str] | None, dict[int, int] | None]:
        dm = trainer.datamodule
        try:
            return list(dm.class_names), dict(dm.label_to_category)
        except (AttributeError, ValueError, FileNotFoundError):  # no annotation file (predict only): indices
            return None, None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        from torchvision.io import write_png
        from torchvision.utils import draw_bounding_boxes

        self.output_dir.mkdir(parents=True, exist_ok=True)
        names, to_cat = self._names(trainer)
        for det in prediction:
            keep = det["scores"] >= self.score_threshold
            boxes, scores, labels = det["boxes"][keep].cpu(), det["scores"][keep].cpu(), det["labels"][keep].cpu()
            path = Path(det.get("path") or f"image_{det['image_id']}")
            stem = path.stem
            if (self.output_dir / f"{stem}.json") in self.written:  # same stem in two folders
                stem = f"{stem}_{det['image_id']}"
            h, w = (int(v) for v in det["orig_size"])
            names_out = [names[i] if names and 0 <= i < len(names) else str(i) for i in labels.tolist()]
            record = {
                "image": str(path), "width": w, "height": h,
                "detections": [
                    {"box": [round(v, 2) for v in b], "score": round(s, 5), "label": lab, "name": n,
                     **({"category_id": to_cat.get(lab)} if to_cat else {})}
                    for b, s, lab, n in zip(boxes.tolist(), scores.tolist(), labels.tolist(), names_out)
                ],
            }
            out = self.output_dir / f"{stem}.json"
            out.write_text(json.dumps(record, indent=1))
            self.written.append(out)
            if self.draw and path.is_file():
                img = _read_image(path)
                text = [f"{n} {s:.2f}" for n, s in zip(names_out, scores.tolist())]
                drawn = draw_bounding_boxes(img, boxes, labels=text, colors="red", width=2) if len(boxes) else img
                write_png(drawn, str(self.output_dir / f"{stem}.png"))
