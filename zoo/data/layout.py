"""Document-layout detection data: YOLO-format folders (what ultralytics / DocLayout-YOLO users have) and the
generated DocSynth pages (:mod:`zoo.data.docsynth`), both read through the COCO code of :mod:`zoo.data.detection`
(same transforms, same ground truth for COCOeval, same loaders and prediction path).

YOLO format: one ``.txt`` per image with one object per line, ``class cx cy w h`` (normalized to [0, 1]) or a polygon
``class x1 y1 x2 y2 ...`` (DocSynth300K's rendered labels are 4-point polygons; the box is the polygon's extent).
The label file of ``.../images/.../name.jpg`` is ``.../labels/.../name.txt`` (the last ``images`` folder of the path
becomes ``labels``), as ultralytics finds it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

from zoo.data.detection import IMAGE_EXTENSIONS, AnnotationError, COCODetection, CocoDetectionDataset, DetectionTransform

log = logging.getLogger(__name__)

EMPTY_LABEL_POLICIES = ("keep", "skip", "error")


def yolo_label_path(image: Path) -> Path:
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    raise AnnotationError(f"{image}: no 'images' folder in the path, so its YOLO label file cannot be found "
                          f"(the layout is .../images/<split>/NAME.jpg with .../labels/<split>/NAME.txt)")


def _list_split(root: Path, spec: str | Sequence[str]) -> list[Path]:
    """Images of a split given as ultralytics does: a folder, a ``.txt`` file of image paths, or a list of them."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in _list_split(root, s)]
    p = Path(os.path.expanduser(str(spec)))
    p = p if p.is_absolute() else root / p
    if p.suffix == ".txt" and p.is_file():
        files = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if line:
                f = Path(line)
                files.append(f if f.is_absolute() else (root / f).resolve())
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{p}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}")
        return files
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and "labels" not in f.parts)
        if not files:
            raise FileNotFoundError(f"{p}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        return files
    raise FileNotFoundError(f"split {spec!r}: {p} is neither a folder of images nor a .txt list of images")


def read_yolo_labels(label_file: Path, num_classes: int) -> list[tuple[int, float, float, float, float]]:
    """(class, x0, y0, x1, y1) normalized boxes of one label file. Errors name the file, the line and the rule."""
    boxes = []
    for n, line in enumerate(label_file.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{label_file}:{n}"
        try:
            values = [float(v) for v in parts]
        except ValueError:
            raise AnnotationError(f"{where}: {line.strip()!r} is not numbers; a YOLO label line is 'class cx cy w h' "
                                  f"(or 'class x1 y1 x2 y2 ...' for a polygon)") from None
        cls, coords = values[0], values[1:]
        if len(coords) != 4 and (len(coords) < 6 or len(coords) % 2):
            raise AnnotationError(f"{where}: {len(values)} values; a YOLO label line is 'class cx cy w h' (5 values) "
                                  f"or a polygon 'class x1 y1 x2 y2 x3 y3 ...'")
        if cls != int(cls) or not 0 <= cls < num_classes:
            raise AnnotationError(f"{where}: class id {parts[0]} is out of range for the {num_classes} class names "
                                  f"(0..{num_classes - 1}); fix the label or the dataset's names")
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in coords):
            raise AnnotationError(f"{where}: coordinates {parts[1:]} are outside [0, 1]; YOLO labels are normalized by "
                                  f"the image width and height (divide pixel coordinates by them)")
        if len(coords) == 4:
            cx, cy, w, h = coords
            x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        else:
            xs, ys = coords[0::2], coords[1::2]
            x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
        boxes.append((int(cls), max(0.0, x0), max(0.0, y0), min(1.0, x1), min(1.0, y1)))
    return boxes


def yolo_to_coco(images: Sequence[Path], names: Sequence[str], empty_labels: str = "keep",
                 source: str = "") -> tuple[dict[str, Any], dict[str, int]]:
    """A COCO instances dict (boxes in pixels, category ids 1..K) from YOLO-labelled images, and the counts of
    images with labels, with an empty label file and without one."""
    from PIL import Image, UnidentifiedImageError

    if empty_labels not in EMPTY_LABEL_POLICIES:
        raise ValueError(f"empty_labels must be one of {EMPTY_LABEL_POLICIES}, got {empty_labels!r}")
    out_images, anns = [], []
    counts = {"labelled": 0, "empty": 0, "missing": 0, "skipped": 0}
    for img_path in images:
        label_file = yolo_label_path(img_path)
        boxes = read_yolo_labels(label_file, len(names)) if label_file.is_file() else None
        if not boxes:
            kind = "missing" if boxes is None else "empty"
            counts[kind] += 1
            if empty_labels == "error":
                raise AnnotationError(f"{label_file}: {'no label file' if boxes is None else 'empty label file'} for "
                                      f"{img_path}; a page without objects needs empty_labels='keep' (background) or "
                                      f"'skip'")
            if empty_labels == "skip":
                counts["skipped"] += 1
                continue
        else:
            counts["labelled"] += 1
        try:
            with Image.open(img_path) as im:
                W, H = im.size
        except (UnidentifiedImageError, OSError) as e:
            raise AnnotationError(f"cannot read image {img_path}: {e}; remove it or replace it with a valid "
                                  f"image") from e
        image_id = len(out_images) + 1
        out_images.append({"id": image_id, "file_name": str(img_path), "width": W, "height": H})
        for cls, x0, y0, x1, y1 in boxes or ():
            w, h = (x1 - x0) * W, (y1 - y0) * H
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cls + 1,
                         "bbox": [x0 * W, y0 * H, w, h], "area": w * h, "iscrowd": 0})
    if not out_images:
        raise AnnotationError(f"{source}: no images left ({counts}); nothing to train or evaluate on")
    cats = [{"id": i + 1, "name": str(n)} for i, n in enumerate(names)]
    return {"images": out_images, "annotations": anns, "categories": cats}, counts


class YOLODetection(COCODetection):
    """YOLO-format detection folders (``images/<split>/*.jpg`` + ``labels/<split>/*.txt``), e.g. DocLayNet, D4LA or
    DocSynth300K as DocLayout-YOLO prepares them.

    Args:
        root: dataset folder (ultralytics' ``path``); splits are relative to it.
        data_yaml: an ultralytics dataset yaml (``path``, ``train``, ``val``, ``test``, ``names``); its values fill
            the arguments left unset (a relative ``path`` is relative to the yaml's folder).
        train / val / test: a folder of images, a ``.txt`` list of image paths, or a list of them. ``test``
            defaults to ``val``.
        names: class names (list, or ``{index: name}`` as in the yaml); required unless the yaml has them.
        empty_labels: a page with an empty or missing label file is ``keep`` (a background page, as ultralytics),
            ``skip`` (left out) or ``error``. The counts per split are logged and kept in ``label_counts``.
        Other arguments as :class:`zoo.data.detection.COCODetection` (resizing to the model input, augmentation,
        loaders, ``predict_path``).
    """

    def __init__(
        self,
        root: str | None = None,
        data_yaml: str | None = None,
        train: str | list[str] | None = None,
        val: str | list[str] | None = None,
        test: str | list[str] | None = None,
        names: list[str] | dict[int, str] | None = None,
        empty_labels: str = "keep",
        predict_path: str | None = None,
        model_name: str | None = None,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        augment: str = "flip",
        photometric: bool = False,
    ):
        if empty_labels not in EMPTY_LABEL_POLICIES:
            raise ValueError(f"empty_labels must be one of {EMPTY_LABEL_POLICIES}, got {empty_labels!r}")
        spec: dict[str, Any] = {}
        yaml_dir = None
        if data_yaml:
            import yaml

            yaml_file = Path(os.path.expanduser(data_yaml))
            if not yaml_file.is_file():
                raise FileNotFoundError(f"data_yaml {yaml_file} does not exist")
            spec = yaml.safe_load(yaml_file.read_text()) or {}
            yaml_dir = yaml_file.parent
        if root is not None:  # the caller's path: relative to the working directory
            root_path = Path(os.path.expanduser(str(root)))
        elif spec.get("path") is not None:  # the yaml's path: relative to the yaml's folder
            root_path = Path(os.path.expanduser(str(spec["path"])))
            root_path = root_path if root_path.is_absolute() else yaml_dir / root_path
        elif yaml_dir is not None:
            root_path = yaml_dir
        else:
            raise ValueError("YOLODetection needs root= (the dataset folder) or data_yaml=")
        names = names if names is not None else spec.get("names")
        if names is None:
            raise ValueError("YOLODetection needs the class names: names=[...] or a data_yaml with 'names'")
        if isinstance(names, dict):
            keys = sorted(int(k) for k in names)
            if keys != list(range(len(keys))):
                raise ValueError(f"names keys must be 0..K-1, got {keys[:10]}")
            names = [names[k] if k in names else names[str(k)] for k in keys]
        self.yolo_root, self.names, self.empty_labels = root_path, [str(n) for n in names], empty_labels
        self.splits = {"train": train if train is not None else spec.get("train", "images/train"),
                       "val": val if val is not None else spec.get("val", "images/val")}
        self.splits["test"] = test if test is not None else spec.get("test") or self.splits["val"]
        self.label_counts: dict[str, dict[str, int]] = {}
        super().__init__(root=str(root_path), predict_path=predict_path, model_name=model_name, image_size=image_size,
                         mean=mean, std=std, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed, augment=augment, photometric=photometric)
        del self._hparams  # the parent saved its own arguments; keep exactly this class's (they rebuild it)
        self.save_hyperparameters(ignore=["model_name"] if model_name is None else None)

    def _resolve_paths(self, *args):
        self.generated = False
        return {split: (self.yolo_root, Path(str(spec))) for split, spec in self.splits.items()}

    def prepare_data(self) -> None:
        pass

    def _dataset(self, split: str) -> CocoDetectionDataset:
        if split not in self._datasets:
            images = _list_split(self.yolo_root, self.splits[split])
            data, counts = yolo_to_coco(images, self.names, self.empty_labels, f"{self.yolo_root} split {split}")
            self.label_counts[split] = counts
            if counts["empty"] or counts["missing"]:
                log.warning("%s split %s: %d page(s) with an empty label file, %d without one: %s (empty_labels=%r)",
                            self.yolo_root, split, counts["empty"], counts["missing"],
                            "left out" if self.empty_labels == "skip" else "kept as background", self.empty_labels)
            mean, std = self._norm()
            aug = self.augment if split == "train" else "none"
            tf = DetectionTransform((self.image_size, self.image_size), mean, std, aug,
                                    self.photometric and split == "train")
            self._datasets[split] = CocoDetectionDataset(self.yolo_root, self.yolo_root / f"{split} (YOLO labels)",
                                                         tf, "contiguous", data=data)
        return self._datasets[split]


class DocSynthDetection(COCODetection):
    """Pages generated by Mesh-candidate BestFit (:func:`zoo.data.docsynth.write_docsynth`), written once into a
    cache folder named by the options (``$ZOO_HOME/data/docsynth_v1_seed<seed>_<hash>``, or ``data_dir``) and read
    back as COCO. Deterministic in ``seed`` and the options.

    Args:
        splits: pages per split (``train`` / ``val`` / ``test``).
        categories: subset of the procedural classes (default: the ten DocStructBench classes).
        pool_ann / pool_images: take the elements from this COCO-format layout dataset instead.
        width_range / ratio_range: page width in pixels and height / width (the reference: 1200-2000, 0.7-1.5).
        candidate_num / small_fraction / max_small / shrink: the algorithm's settings (500, 0.01, 5, (0.8, 0.95)).
        Other arguments as :class:`zoo.data.detection.COCODetection`.
    """

    def __init__(
        self,
        splits: dict[str, int] | None = None,
        categories: list[str] | None = None,
        pool_ann: str | None = None,
        pool_images: str | None = None,
        width_range: tuple[int, int] = (1200, 2000),
        ratio_range: tuple[float, float] = (0.7, 1.5),
        candidate_num: int = 500,
        small_fraction: float = 0.01,
        max_small: int = 5,
        shrink: tuple[float, float] = (0.8, 0.95),
        image_format: str = "png",
        data_dir: str | None = None,
        predict_path: str | None = None,
        model_name: str | None = None,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        augment: str = "flip",
        photometric: bool = False,
    ):
        if bool(pool_ann) != bool(pool_images):
            raise ValueError("DocSynthDetection: pool_ann and pool_images go together")
        self.docsynth = dict(splits=dict(splits or {"train": 2000, "val": 100, "test": 100}),
                             categories=list(categories) if categories else None, pool_ann=pool_ann,
                             pool_images=pool_images, width_range=list(width_range), ratio_range=list(ratio_range),
                             candidate_num=candidate_num, small_fraction=small_fraction, max_small=max_small,
                             shrink=list(shrink), image_format=image_format)
        super().__init__(root=None, predict_path=predict_path, model_name=model_name, image_size=image_size,
                         mean=mean, std=std, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed, augment=augment, photometric=photometric,
                         data_dir=data_dir)
        del self._hparams  # the parent saved its own arguments; keep exactly this class's (they rebuild it)
        self.save_hyperparameters(ignore=["model_name"] if model_name is None else None)

    def _shapes_root(self) -> Path:
        from zoo.checkpoints import zoo_home
        from zoo.data.docsynth import DOCSYNTH_VERSION

        key = json.dumps({**self.docsynth, "seed": self.seed}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        base = Path(self.data_dir) if self.data_dir else zoo_home() / "data"
        return base / f"docsynth_v{DOCSYNTH_VERSION}_seed{self.seed}_{digest}"

    def _resolve_paths(self, *args):
        r = self._shapes_root()
        return {s: (r / s / "images", r / s / "annotations.json") if s in self.docsynth["splits"] else None
                for s in ("train", "val", "test")}

    def prepare_data(self) -> None:
        from zoo.data import docsynth

        o = self.docsynth
        pool = docsynth.coco_element_pool(o["pool_ann"], o["pool_images"]) if o["pool_ann"] else \
            docsynth.procedural_element_pool(seed=self.seed, categories=o["categories"])
        docsynth.write_docsynth(self._shapes_root(), o["splits"], seed=self.seed, pool=pool,
                                width_range=o["width_range"], ratio_range=o["ratio_range"],
                                candidate_num=o["candidate_num"], small_fraction=o["small_fraction"],
                                max_small=o["max_small"], shrink=o["shrink"], image_format=o["image_format"],
                                exist_ok=True)
