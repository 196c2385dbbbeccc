"""Image-classification DataModules: the embedded ``digits`` set and ImageFolder datasets on disk.

Both predict on any image file, folder or glob through ``predict_path`` (``zoo predict ... --data.init_args.
predict_path DIR``), preprocessed as in evaluation; ``zoo.tasks.classification.ClassificationWriter`` writes the
labels. Both expose ``data_config`` (timm's keys: the input size and normalization the model is trained with) and
``class_names``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from zoo.data.resumable import EpochSeededRandomSampler, ResumableDataLoader


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 10 classes), upsampled to ``image_size``.

    The split is fixed by ``seed`` and stratified per class (``val_fraction`` / ``test_fraction`` of each class),
    so every run, process and DDP rank sees the same partition. Pixels are scaled to [0, 1] then normalized with
    the dataset's own mean/std; ``in_chans`` replicates the grey channel.

    Args:
        image_size: side of the square images fed to the model (bilinear upsampling of the 8x8 originals).
        batch_size: per-device batch size.
        augment: random translations (+-1 original pixel) of training batches.
        predict_path: image file, folder or glob to predict on (default: the test split). Images are read as grey
            levels (ink bright on dark, like the digits), resized to ``image_size`` and normalized as in training;
            ``save_images`` writes digits in that form.
    """

    num_classes = 10
    class_names = [str(i) for i in range(10)]

    def __init__(
        self,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        in_chans: int = 3,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        augment: bool = True,
        predict_path: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.predict_path = predict_path
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.seed, self.in_chans, self.augment = seed, in_chans, augment
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._splits: dict[str, TensorDataset] | None = None

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8) / 16.0
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x.expand(-1, self.in_chans, -1, -1).contiguous()

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32)
        y = torch.tensor(data.target, dtype=torch.long)
        g = torch.Generator().manual_seed(self.seed)
        parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
        for c in range(10):
            idx = (y == c).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            n_test = round(len(idx) * self.test_fraction)
            n_val = round(len(idx) * self.val_fraction)
            parts["test"].append(idx[:n_test])
            parts["val"].append(idx[n_test:n_test + n_val])
            parts["train"].append(idx[n_test + n_val:])
        images = self._images(x)
        train_idx = torch.cat(parts["train"])
        mean, std = images[train_idx].mean(), images[train_idx].std()
        self._mean, self._std = float(mean), float(std)
        images = (images - mean) / std
        self._split_indices = {k: torch.cat(v) for k, v in parts.items()}
        self._splits = {k: TensorDataset(images[idx], y[idx]) for k, idx in self._split_indices.items()}

    def _loader(self, split: str) -> DataLoader:
        self.setup()
        return DataLoader(
            self._splits[split], batch_size=self.batch_size, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self):
        self.setup()
        ds = self._splits["train"]
        self._train_loader = ResumableDataLoader(
            ds, batch_size=self.batch_size, sampler=EpochSeededRandomSampler(ds, self.seed),
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )
        return self._train_loader

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if trainer is not None and trainer.training:
            loader = getattr(self, "_train_loader", None)
            if loader is not None:
                loader.mark_consumed()
            if self.augment:  # done here, in training order, so it draws from the checkpointed global RNG
                x, y = batch
                batch = (random_shift(x, max(1, self.image_size // 8)), y)
        return batch

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        if not self.predict_path:
            return self._loader("test")
        return DataLoader(ImageFilesDataset(self.predict_path, self._file_transform()), batch_size=self.batch_size,
                          num_workers=self.num_workers)

    @property
    def data_config(self) -> dict:
        """timm-style data config of what the model sees: grey digits replicated to ``in_chans`` channels."""
        self.setup()
        c = self.in_chans
        return dict(input_size=(c, self.image_size, self.image_size), interpolation="bilinear",
                    mean=(self._mean,) * c, std=(self._std,) * c, crop_pct=1.0)

    def _file_transform(self):
        from torchvision.transforms import v2

        cfg = self.data_config
        return v2.Compose([
            v2.Grayscale(self.in_chans), v2.Resize((self.image_size, self.image_size), antialias=True),
            v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg["mean"], cfg["std"]),
        ])

    def save_images(self, folder: str | os.PathLike, split: str = "test", n: int | None = None) -> list[Path]:
        """Write ``n`` images of a split as 8x8 PNGs named ``<index>_label<digit>.png`` (for trying ``predict_path``)."""
        from PIL import Image
        from sklearn.datasets import load_digits

        self.setup()
        data = load_digits()
        # the split's dataset holds normalized, upsampled images; recover which originals it holds by position
        order = self._split_indices[split][: n if n is not None else None]
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in order.tolist():
            img = (data.images[i] / 16.0 * 255).round().astype("uint8")
            path = out / f"{i:04d}_label{data.target[i]}.png"
            Image.fromarray(img, mode="L").save(path)
            paths.append(path)
        return paths


class ImageFilesDataset(torch.utils.data.Dataset):
    """Images to predict on: a file, a folder (recursively) or a glob. Items are ``(image, path)``."""

    def __init__(self, path: str | os.PathLike | Sequence[str], transform):
        from zoo.data.detection import list_images

        self.files = list_images(path)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.files[index]) as img:
            img = img.convert("RGB")
        return self.transform(img), str(self.files[index])


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y (circular; digit borders are background)."""
    shifts = torch.randint(-max_shift, max_shift + 1, (x.shape[0], 2)).tolist()
    return torch.stack([torch.roll(img, shifts=(dy, dx), dims=(1, 2)) for img, (dy, dx) in zip(x, shifts)])


def _posterize_zero_bits_compat() -> None:
    """timm's RandAugment ``PosterizeIncreasing`` keeps 0 bits at the top magnitude (``rand-m9-mstd0.5-inc1`` reaches
    it whenever the sampled magnitude clips at 10) and Pillow >= 13 rejects ``posterize(img, 0)``, which older Pillow
    turned into a black image. Give timm's op table that older meaning (idempotent; ops are looked up when a
    transform is built)."""
    from PIL import Image, ImageOps
    from timm.data import auto_augment as aa

    def posterize(img, bits_to_keep, **_):
        if bits_to_keep >= 8:
            return img
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)  # every bit dropped: black, as Pillow < 13 returned
        return ImageOps.posterize(img, bits_to_keep)

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in aa.NAME_TO_OP:
            aa.NAME_TO_OP[name] = posterize


class ImageFolderDataModule(L.LightningDataModule):
    """Real datasets laid out as ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (ImageNet style).

    Transforms come from the model's default config through timm's transform factory (train: RandAugment /
    random-resized-crop / random erasing as configured; eval: resize + center crop with ``crop_pct``). See
    data/README.md for preparing ImageNet-1k.

    ``predict_path`` (image file, folder or glob) predicts on those images with the eval transform; the dataset
    folders are then needed only for fit / validate / test (class names come from ``root/train`` when it exists).
    """

    def __init__(
        self,
        root: str,
        model_name: str = "nextvit_small",
        batch_size: int = 128,
        num_workers: int = 8,
        input_size: Sequence[int] | None = None,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        re_prob: float = 0.25,
        color_jitter: float = 0.4,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        predict_path: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(os.path.expanduser(root))
        self.predict_path = predict_path
        for split in (train_split, val_split) if not predict_path else ():
            if not (self.root / split).is_dir():
                raise FileNotFoundError(
                    f"ImageFolderDataModule: {self.root / split} does not exist. Lay the dataset out as "
                    f"{self.root}/{train_split}/<class>/<image> and {self.root}/{val_split}/<class>/<image> "
                    f"(see data/README.md)."
                )
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split or val_split
        self.model_name, self.input_size = model_name, input_size
        self.auto_augment, self.re_prob, self.color_jitter = auto_augment, re_prob, color_jitter

    @property
    def class_names(self) -> list[str]:
        """ImageFolder's classes (sorted sub-folders of the train split); empty when that folder is absent."""
        train = self.root / self.train_split
        return sorted(d.name for d in train.iterdir() if d.is_dir()) if train.is_dir() else []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def data_config(self) -> dict:
        """timm's data config: the model config's, at ``input_size`` when given (what the model is trained at)."""
        from zoo.registry import resolve_cfg

        _, _, cfg = resolve_cfg(self.model_name)
        return dict(
            input_size=tuple(self.input_size or cfg.input_size), interpolation=cfg.interpolation,
            mean=tuple(cfg.mean), std=tuple(cfg.std), crop_pct=cfg.crop_pct,
        )

    def _dataset(self, split: str, train: bool):
        from timm.data import create_transform
        from torchvision.datasets import ImageFolder

        _posterize_zero_bits_compat()
        cfg = self.data_config
        extra = dict(auto_augment=self.auto_augment, re_prob=self.re_prob, color_jitter=self.color_jitter) if train else {}
        return ImageFolder(str(self.root / split), transform=create_transform(**cfg, is_training=train, **extra))

    def _loader(self, split: str, train: bool) -> DataLoader:
        return DataLoader(
            self._dataset(split, train), batch_size=self.batch_size, shuffle=train, num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(), drop_last=train, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self):
        return self._loader(self.train_split, True)

    def val_dataloader(self):
        return self._loader(self.val_split, False)

    def test_dataloader(self):
        return self._loader(self.test_split, False)

    def predict_dataloader(self):
        if not self.predict_path:
            return self._loader(self.test_split, False)
        from timm.data import create_transform

        ds = ImageFilesDataset(self.predict_path, create_transform(**self.data_config, is_training=False))
        return DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers)
