"""Semantic-segmentation data: ADE20K and Cityscapes on disk, and an embedded set of generated scenes.

A batch is ``(images (B, 3, H, W) float, labels (B, H, W) int64)``; labels are class indices with 255 = ignore.
Evaluation batches keep each label at its original size; when images in a batch differ in size both come as lists
(the task evaluates them one by one).

Transforms (PaddleSeg's, as the PP-MobileSeg configs use them), :class:`SegTrainTransform`: ``ResizeStepScaling``
(a random scale from ``min..max`` in ``step`` increments; bilinear image, nearest label), ``RandomPaddingCrop``
(bottom/right padding with 127.5 / 255 when smaller than the crop, then a random crop), ``RandomHorizontalFlip``,
``RandomDistort`` (brightness / contrast / saturation factors in ``1 +- range`` and hue in +-18 degrees, each with
probability 0.5, in random order), ``Normalize``. :class:`SegEvalTransform`: optional keep-ratio resize to
(long, short) rounded up to a multiple of ``size_divisor`` (ADE20K: (2048, 512), 32), ``Normalize``.

Bad data is rejected with the file and the rule: labels outside ``[0, num_classes)`` and 255, an image and mask of
different sizes, a missing images / annotations folder, an image without its mask.
"""
import math
import os
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SCENE_CLASSES = ("background", "ellipse", "rectangle", "triangle", "cross", "ring")
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")


class SegmentationDataError(ValueError):
    pass


# ------------------------------------------------------------------------------------------- transforms


def _resize(img: torch.Tensor, label: Optional[torch.Tensor], size: Tuple[int, int]):
    """(3, H, W) uint8/float image bilinearly (cv2 INTER_LINEAR, no antialias), (H, W) label by nearest."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img, label
    dtype = img.dtype
    out = F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    if dtype == torch.uint8:
        out = out.round().clamp(0, 255).to(torch.uint8)
    if label is not None:
        label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].to(label.dtype)
    return out, label


def _normalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = img.float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


class SegTrainTransform:
    """PaddleSeg's training pipeline (see the module docstring). ``crop_size`` is (H, W)."""

    def __init__(self, crop_size: Sequence[int] = (512, 512), min_scale: float = 0.5, max_scale: float = 2.0,
                 scale_step: float = 0.25, distort: float = 0.4, hue: float = 18.0, distort_prob: float = 0.5,
                 flip: bool = True, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), pad_value: float = 127.5):
        self.crop = (int(crop_size[0]), int(crop_size[1]))
        self.min_scale, self.max_scale, self.scale_step = min_scale, max_scale, scale_step
        self.distort, self.hue, self.distort_prob, self.flip = distort, hue, distort_prob, flip
        self.mean, self.std, self.pad_value = tuple(mean), tuple(std), pad_value

    def _scale(self) -> float:
        if self.min_scale == self.max_scale:
            return self.min_scale
        if self.scale_step <= 0:
            return random.uniform(self.min_scale, self.max_scale)
        n = int(round((self.max_scale - self.min_scale) / self.scale_step)) + 1
        return float(np.linspace(self.min_scale, self.max_scale, n)[random.randrange(n)])

    def _distort(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        ops = ["brightness", "contrast", "saturation", "hue"]
        random.shuffle(ops)
        for op in ops:
            if random.random() >= self.distort_prob:
                continue
            if op == "hue":
                if self.hue > 0:
                    img = TF.adjust_hue(img, random.uniform(-self.hue, self.hue) / 360.0)
            elif self.distort > 0:
                f = random.uniform(1 - self.distort, 1 + self.distort)
                img = getattr(TF, f"adjust_{op}")(img, f)
        return img

    def __call__(self, img: torch.Tensor, label: torch.Tensor):
        s = self._scale()
        h, w = img.shape[-2:]
        img, label = _resize(img, label, (max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))))
        ch, cw = self.crop
        h, w = img.shape[-2:]
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        if ph or pw:
            img = F.pad(img.float(), (0, pw, 0, ph), value=self.pad_value).round().to(torch.uint8)
            label = F.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
            h, w = img.shape[-2:]
        y, x = random.randint(0, h - ch), random.randint(0, w - cw)
        img, label = img[:, y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
        if self.flip and random.random() < 0.5:
            img, label = img.flip(-1), label.flip(-1)
        img = self._distort(img.contiguous())
        return _normalize(img, self.mean, self.std), label.contiguous()


class SegEvalTransform:
    """Optional keep-ratio resize of the image only (``target_size`` (long, short), rounded up to ``size_divisor``),
    then Normalize. The label stays at its original size: the task resizes logits to it."""

    def __init__(self, target_size: Optional[Sequence[int]] = None, size_divisor: Optional[int] = None,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)):
        self.target_size = tuple(target_size) if target_size else None
        self.size_divisor, self.mean, self.std = size_divisor, tuple(mean), tuple(std)

    def output_size(self, h: int, w: int) -> Tuple[int, int]:
        if self.target_size is None:
            return h, w
        scale = min(max(self.target_size) / max(h, w), min(self.target_size) / min(h, w))
        nh, nw = round(h * scale), round(w * scale)
        if self.size_divisor:
            nh = math.ceil(nh / self.size_divisor) * self.size_divisor
            nw = math.ceil(nw / self.size_divisor) * self.size_divisor
        return int(nh), int(nw)

    def __call__(self, img: torch.Tensor, label: torch.Tensor):
        img, _ = _resize(img, None, self.output_size(*img.shape[-2:]))
        return _normalize(img, self.mean, self.std), label


# ------------------------------------------------------------------------------------- generated scenes


def _stripes(h: int, w: int, rng: np.random.Generator, kind: str) -> np.ndarray:
    """A class-specific texture in [0, 1] (random phase and period), so classes differ in texture and shape."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    period = rng.uniform(4, 9)
    ph = rng.uniform(0, 2 * np.pi)
    if kind == "ellipse":
        t = np.sin(yy * 2 * np.pi / period + ph)
    elif kind == "rectangle":
        t = np.sign(np.sin(yy * 2 * np.pi / period + ph) * np.sin(xx * 2 * np.pi / period + ph))
    elif kind == "triangle":
        t = np.sin(xx * 2 * np.pi / period + ph)
    elif kind == "cross":
        t = np.sin((xx + yy) * 2 * np.pi / period / 1.4 + ph)
    else:  # ring: flat with grain
        t = rng.normal(0, 0.3, (h, w))
    return 0.5 + 0.5 * np.clip(t, -1, 1)


def render_scene(rng: np.random.Generator, height: int = 128, width: int = 128, min_shapes: int = 2,
                 max_shapes: int = 5, ignore_prob: float = 0.3):
    """One generated scene: (H, W, 3) uint8 image and (H, W) uint8 labels (0 background, 1..5 the shape classes of
    ``SCENE_CLASSES``, 255 ignore). Shapes overlap (later ones occlude earlier ones), each with its class's texture in
    random colours on a textured background; with ``ignore_prob`` a rectangle of the scene is marked ignore."""
    from zoo.data.detection import _background, _shape_mask  # the detection set's background and shape rasterizer

    img = _background(rng, height, width)
    label = np.zeros((height, width), np.uint8)
    side = min(height, width)
    for _ in range(int(rng.integers(min_shapes, max_shapes + 1))):
        cls = int(rng.integers(1, len(SCENE_CLASSES)))
        r = rng.uniform(0.12, 0.35) * side
        aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
        rw, rh = r * math.sqrt(aspect), r / math.sqrt(aspect)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        mask = _shape_mask(SCENE_CLASSES[cls], height, width, cx, cy, rw, rh)
        if mask.sum() < 12:
            continue
        c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        if np.abs(c1 - c2).sum() < 120:
            c2 = 255 - c1
        t = _stripes(height, width, rng, SCENE_CLASSES[cls])[mask][:, None]
        img[mask] = c1 * (1 - t) + c2 * t + rng.normal(0, 4, (int(mask.sum()), 3))
        label[mask] = cls
    if rng.random() < ignore_prob:
        h0, w0 = int(rng.integers(side // 10, side // 4)), int(rng.integers(side // 10, side // 4))
        y0, x0 = int(rng.integers(0, height - h0)), int(rng.integers(0, width - w0))
        label[y0:y0 + h0, x0:x0 + w0] = IGNORE_INDEX
    return np.clip(img, 0, 255).round().astype(np.uint8), label


class GeneratedScenesDataset(Dataset):
    """``count`` scenes rendered on demand; scene ``i`` of split ``split_id`` depends only on (seed, split_id, i)."""

    def __init__(self, count: int, seed: int = 0, split_id: int = 0, height: int = 128, width: int = 128,
                 transform=None, **scene_kwargs):
        self.count, self.seed, self.split_id = count, seed, split_id
        self.height, self.width, self.transform, self.scene_kwargs = height, width, transform, scene_kwargs
        self.num_classes = len(SCENE_CLASSES)

    def __len__(self) -> int:
        return self.count

    def raw(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_id, index])
        return render_scene(rng, self.height, self.width, **self.scene_kwargs)

    def __getitem__(self, index: int):
        img, label = self.raw(index)
        img_t = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        lab_t = torch.from_numpy(label.astype(np.int64))
        return self.transform(img_t, lab_t) if self.transform else (img_t.float(), lab_t)


def write_scenes(root: str | os.PathLike, layout: str = "ade20k", counts: Optional[Dict[str, int]] = None,
                 seed: int = 0, height: int = 64, width: int = 96) -> Path:
    """Write generated scenes in a real dataset's layout (``ade20k``: labels + 1 with 0 = ignore; ``cityscapes``:
    ``*_gtFine_labelTrainIds.png``), so the on-disk code paths can be exercised without the datasets."""
    from PIL import Image

    root = Path(root)
    counts = counts or {"train": 4, "val": 2}
    for split_id, (split, n) in enumerate(counts.items()):
        ds = GeneratedScenesDataset(n, seed, split_id, height, width)
        for i in range(n):
            img, label = ds.raw(i)
            if layout == "ade20k":
                sub = {"train": "training", "val": "validation"}.get(split, split)
                idir, adir = root / "images" / sub, root / "annotations" / sub
                stem = f"ADE_{sub}_{i:08d}"
                lab = np.where(label == IGNORE_INDEX, 0, label + 1).astype(np.uint8)
                iname, aname = f"{stem}.jpg", f"{stem}.png"
            elif layout == "cityscapes":
                idir, adir = root / "leftImg8bit" / split / "zoo", root / "gtFine" / split / "zoo"
                stem = f"zoo_{i:06d}_000019"
                lab = label
                iname, aname = f"{stem}_leftImg8bit.png", f"{stem}_gtFine_labelTrainIds.png"
            else:
                raise ValueError(f"layout must be 'ade20k' or 'cityscapes', got {layout!r}")
            idir.mkdir(parents=True, exist_ok=True)
            adir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(idir / iname, quality=95) if iname.endswith(".jpg") else \
                Image.fromarray(img).save(idir / iname)
            Image.fromarray(lab).save(adir / aname)
    return root


# ------------------------------------------------------------------------------------------ on-disk data


def read_image(path: Path) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        raise SegmentationDataError(f"cannot read image {path}: {e}") from e


def read_mask(path: Path) -> torch.Tensor:
    """A label PNG as (H, W) int64 (palette / grey 8- or 16-bit; a colour mask is refused)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise SegmentationDataError(
                    f"{path}: the mask has mode {im.mode}; label masks are single-channel PNGs of class indices "
                    f"(not colour visualisations)")
            arr = np.array(im)
    except OSError as e:
        raise SegmentationDataError(f"cannot read mask {path}: {e}") from e
    return torch.from_numpy(arr.astype(np.int64))


def check_labels(label: torch.Tensor, num_classes: int, path: Path, ignore_index: int = IGNORE_INDEX) -> None:
    bad = (label != ignore_index) & ((label < 0) | (label >= num_classes))
    if bool(bad.any()):
        values = sorted(set(label[bad].unique().tolist()))[:10]
        raise SegmentationDataError(
            f"{path}: label values {values} are outside [0, {num_classes}) and not the ignore index {ignore_index}; "
            f"every pixel must be a class index below num_classes={num_classes} or {ignore_index}")


class SegmentationFolderDataset(Dataset):
    """Image / mask pairs matched by name: ``image_dir/<rel>/<stem><image_suffix>`` with
    ``mask_dir/<rel>/<stem><mask_suffix>``. ``reduce_zero_label``: stored 0 becomes 255 and k becomes k - 1
    (ADE20K)."""

    def __init__(self, image_dir: str | os.PathLike, mask_dir: str | os.PathLike, num_classes: int,
                 transform=None, image_suffix: Optional[str] = None, mask_suffix: str = ".png",
                 reduce_zero_label: bool = False, what: str = "dataset"):
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        self.num_classes, self.transform, self.reduce_zero_label = num_classes, transform, reduce_zero_label
        for d, kind in ((self.image_dir, "images"), (self.mask_dir, "annotations")):
            if not d.is_dir():
                raise FileNotFoundError(f"{what}: the {kind} folder {d} does not exist; see data/README.md for the "
                                        f"expected layout")
        if image_suffix:
            images = sorted(self.image_dir.rglob(f"*{image_suffix}"))
        else:
            images = sorted(p for p in self.image_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise FileNotFoundError(f"{what}: no images{f' (*{image_suffix})' if image_suffix else ''} under "
                                    f"{self.image_dir}")
        self.items: List[Tuple[Path, Path]] = []
        for img in images:
            rel = img.relative_to(self.image_dir)
            stem = img.name[: -len(image_suffix)] if image_suffix else img.stem
            mask = self.mask_dir / rel.parent / f"{stem}{mask_suffix}"
            if not mask.is_file():
                raise FileNotFoundError(f"{what}: image {img} has no mask {mask}; every image needs its annotation "
                                        f"(same relative path and name)")
            self.items.append((img, mask))

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        img_path, mask_path = self.items[index]
        img, label = read_image(img_path), read_mask(mask_path)
        if tuple(img.shape[-2:]) != tuple(label.shape):
            raise SegmentationDataError(
                f"image {img_path} is {tuple(img.shape[-2:])} (H, W) but its mask {mask_path} is {tuple(label.shape)}; "
                f"an image and its mask must have the same size")
        if self.reduce_zero_label:
            ignore = (label == 0) | (label == IGNORE_INDEX)  # stored 255 stays ignore
            label = torch.where(ignore, torch.full_like(label, IGNORE_INDEX), label - 1)
        check_labels(label, self.num_classes, mask_path)
        return img, label

    def __getitem__(self, index: int):
        img, label = self.load(index)
        return self.transform(img, label) if self.transform else (img.float(), label)


def collate_segmentation(batch):
    images, labels = zip(*batch)
    if len({tuple(i.shape) for i in images}) == 1 and len({tuple(l.shape) for l in labels}) == 1:
        return torch.stack(images), torch.stack(labels)
    return list(images), list(labels)


# ------------------------------------------------------------------------------------------ DataModules


class SegmentationDataModule(L.LightningDataModule):
    """Shared loaders and transforms; subclasses define ``_make_dataset(split, transform)``.

    Args:
        crop_size: training crop (H, W); min_scale / max_scale / scale_step: ResizeStepScaling; distort: the
            brightness / contrast / saturation range of RandomDistort (hue +-``hue`` degrees); flip: horizontal flips.
        eval_size / size_divisor: keep-ratio resize of evaluation images to (long, short) (``None``: none).
        mean / std: Normalize.
        batch_size / eval_batch_size / num_workers / seed: loading (the training order depends only on seed and
            epoch, and resumes mid-epoch).
    """

    num_classes: int = 0
    class_names: Sequence[str] = ()

    def __init__(self, crop_size: Sequence[int] = (512, 512), min_scale: float = 0.5, max_scale: float = 2.0,
                 scale_step: float = 0.25, distort: float = 0.4, hue: float = 18.0, flip: bool = True,
                 eval_size: Optional[Sequence[int]] = None, size_divisor: Optional[int] = None,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 batch_size: int = 16, eval_batch_size: int = 1, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.batch_size, self.eval_batch_size, self.num_workers, self.seed = batch_size, eval_batch_size, num_workers, seed
        self.train_tf = SegTrainTransform(crop_size, min_scale, max_scale, scale_step, distort, hue, flip=flip,
                                          mean=mean, std=std)
        self.eval_tf = SegEvalTransform(eval_size, size_divisor, mean, std)
        self.crop_size = tuple(crop_size)
        self.image_size = int(crop_size[0])  # the export size DeployExport uses
        self.in_chans = 3
        self._datasets: Dict[str, Dataset] = {}

    def _make_dataset(self, split: str, transform) -> Dataset:
        raise NotImplementedError

    def dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            self._datasets[split] = self._make_dataset(split, self.train_tf if split == "train" else self.eval_tf)
        return self._datasets[split]

    def setup(self, stage: Optional[str] = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for s in splits.get(stage or "fit", ("train", "val")):
            self.dataset(s)

    def train_dataloader(self):
        from zoo.data.resumable import EpochSeededRandomSampler, ResumableDataLoader

        ds = self.dataset("train")
        self._train_loader = ResumableDataLoader(
            ds, batch_size=self.batch_size, sampler=EpochSeededRandomSampler(ds, self.seed),
            drop_last=len(ds) > self.batch_size, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, collate_fn=collate_segmentation,
            worker_init_fn=_seed_worker)
        return self._train_loader

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=collate_segmentation)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")

    def predict_dataloader(self):
        return self._eval_loader("test")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if trainer is not None and trainer.training:
            loader = getattr(self, "_train_loader", None)
            if loader is not None:
                loader.mark_consumed()
        return batch


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class GeneratedScenes(SegmentationDataModule):
    """The embedded default: procedurally generated scenes (:func:`render_scene`, 6 classes), rendered on demand and
    deterministic per ``seed``. ``train`` / ``val`` / ``test`` are disjoint streams of ``counts`` scenes of
    ``height`` x ``width``. Other arguments as :class:`SegmentationDataModule`."""

    num_classes = len(SCENE_CLASSES)
    class_names = SCENE_CLASSES

    def __init__(self, counts: Optional[Dict[str, int]] = None, height: int = 128, width: int = 128,
                 ignore_prob: float = 0.3, crop_size: Sequence[int] = (128, 128), min_scale: float = 0.5,
                 max_scale: float = 2.0, scale_step: float = 0.25, distort: float = 0.4, hue: float = 18.0,
                 flip: bool = True, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), batch_size: int = 16, eval_batch_size: int = 16,
                 num_workers: int = 0, seed: int = 0):
        super().__init__(crop_size, min_scale, max_scale, scale_step, distort, hue, flip, None, None, mean, std,
                         batch_size, eval_batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.counts = dict(counts or {"train": 2000, "val": 200, "test": 200})
        self.height, self.width, self.ignore_prob = height, width, ignore_prob

    def _make_dataset(self, split: str, transform) -> Dataset:
        if split not in self.counts:
            raise ValueError(f"GeneratedScenes has splits {list(self.counts)}, not {split!r}")
        return GeneratedScenesDataset(self.counts[split], self.seed, list(self.counts).index(split), self.height,
                                      self.width, transform, ignore_prob=self.ignore_prob)


class ADE20K(SegmentationDataModule):
    """ADE20K (SceneParsing ``ADEChallengeData2016``): ``root/images/{training,validation}/*.jpg`` and
    ``root/annotations/{training,validation}/*.png``; 150 classes, stored 0 (other) becomes 255 (PaddleSeg's
    ``label - 1``, mmseg's ``reduce_zero_label``). The test split is the validation split. Defaults are the
    PP-MobileSeg config's: 512x512 crops, scale 0.5-2.0, distort 0.4; evaluation resized to (2048, 512) keep-ratio,
    size divisor 32."""

    num_classes = 150

    def __init__(self, root: str = "data/ADEChallengeData2016", crop_size: Sequence[int] = (512, 512),
                 min_scale: float = 0.5, max_scale: float = 2.0, scale_step: float = 0.25, distort: float = 0.4,
                 hue: float = 18.0, flip: bool = True, eval_size: Optional[Sequence[int]] = (2048, 512),
                 size_divisor: Optional[int] = 32, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 std: Sequence[float] = (0.229, 0.224, 0.225), batch_size: int = 16, eval_batch_size: int = 1,
                 num_workers: int = 4, seed: int = 0):
        super().__init__(crop_size, min_scale, max_scale, scale_step, distort, hue, flip, eval_size, size_divisor,
                         mean, std, batch_size, eval_batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.root = Path(os.path.expanduser(root))

    def _make_dataset(self, split: str, transform) -> Dataset:
        sub = "training" if split == "train" else "validation"
        return SegmentationFolderDataset(self.root / "images" / sub, self.root / "annotations" / sub, 150, transform,
                                         image_suffix=".jpg", reduce_zero_label=True, what=f"ADE20K {split}")


class Cityscapes(SegmentationDataModule):
    """Cityscapes fine annotations: ``root/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
    ``root/gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`` (19 train ids, 255 ignore; create them with
    cityscapesscripts' ``createTrainIdLabelImgs``). The test split is the validation split. Defaults are the
    PP-MobileSeg Cityscapes config's: 1024x512 (W x H) crops, scale 0.125-1.5 in 0.125 steps, distort 0.5,
    Paddle's default Normalize (0.5 / 0.5), whole 2048x1024 evaluation."""

    num_classes = 19
    class_names = CITYSCAPES_CLASSES

    def __init__(self, root: str = "data/cityscapes", crop_size: Sequence[int] = (512, 1024), min_scale: float = 0.125,
                 max_scale: float = 1.5, scale_step: float = 0.125, distort: float = 0.5, hue: float = 18.0,
                 flip: bool = True, eval_size: Optional[Sequence[int]] = None, size_divisor: Optional[int] = None,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5), batch_size: int = 16,
                 eval_batch_size: int = 1, num_workers: int = 4, seed: int = 0):
        super().__init__(crop_size, min_scale, max_scale, scale_step, distort, hue, flip, eval_size, size_divisor,
                         mean, std, batch_size, eval_batch_size, num_workers, seed)
        self.save_hyperparameters()
        self.root = Path(os.path.expanduser(root))

    def _make_dataset(self, split: str, transform) -> Dataset:
        sub = "train" if split == "train" else "val"
        return SegmentationFolderDataset(self.root / "leftImg8bit" / sub, self.root / "gtFine" / sub, 19, transform,
                                         image_suffix="_leftImg8bit.png", mask_suffix="_gtFine_labelTrainIds.png",
                                         what=f"Cityscapes {split}")
