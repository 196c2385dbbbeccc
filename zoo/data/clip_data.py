"""Data for CLIP models: zero-shot ImageFolder evaluation, embedded digit image-caption pairs, and the multi-modal
reinforced dataset of MobileCLIP (DataCompDR layout) with the ``reinforce`` step that writes it.

DataCompDR sample layout (HF ``apple/DataCompDR-12M``), one tar member per field, grouped by key:
``url.txt`` (image source), ``syn.json`` (``{"syn_text": [...]}``: synthetic captions), ``paug.json``
(``{"param_aug": [...]}``: K stored augmentations), ``npz`` (``image_emb``: (K, D) teacher embeddings of each
augmentation; ``text_emb``: (1 + S, D) of the ground-truth caption then the S synthetic ones; D = teachers x width,
concatenated), ``json`` (metadata, here the ground-truth ``caption``). DataCompDR stores no pixels (the images come
from DataComp by url); our embedded set adds a ``png`` member so it is self-contained. One stored augmentation is either
a bare random-resized-crop box ``[top, left, height, width]`` on the stored image, or DataCompDR's compressed form
``[crop box, RandAugment ops or null]`` with each op ``[index into RAND_AUGMENT_OPS, signed magnitude]`` (ml-mobileclip
``training/dr/transforms.py``: the transforms with random parameters in its fixed order, random_resized_crop then
rand_augment); ``param_aug`` may also be that list of K augmentations as a JSON string, as DataCompDR stores it. Both
are replayed exactly (:func:`replay_augmentation`).

``python -m zoo.data.clip_data --teacher CKPT --model-name NAME --out DIR`` runs the reinforce step on the digits.
"""
from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import io
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

# ------------------------------------------------------------------------------ OpenAI ImageNet names/templates


def openai_imagenet_metadata() -> tuple[list[str], list[str]]:
    """(1000 class names, 80 templates) of OpenAI's CLIP ImageNet evaluation, read from open_clip's
    ``zero_shot_metadata.py`` source with ``ast`` (the file is parsed, never imported or run)."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.submodule_search_locations[0]) / "zero_shot_metadata.py" if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError("OpenAI's ImageNet class names and templates are read from open-clip-torch's "
                                "zero_shot_metadata.py: pip install open-clip-torch, or pass classnames/templates")
    tree = ast.parse(path.read_text())
    found: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node.value
    names = list(ast.literal_eval(found["IMAGENET_CLASSNAMES"]))
    templates = []
    for lam in found["OPENAI_IMAGENET_TEMPLATES"].elts:  # lambda c: f"... {c} ..." -> "... {} ..."
        parts = lam.body.values if isinstance(lam.body, ast.JoinedStr) else [lam.body]
        templates.append("".join("{}" if isinstance(p, ast.FormattedValue) else str(p.value) for p in parts))
    return names, templates


class ZeroShotImageFolderDataModule(L.LightningDataModule):
    """Zero-shot evaluation on ``root/<split>/<class>/*`` (any ImageFolder), batches ``(image, label)``.

    Args:
        model_name: the CLIP model (its data config gives the transform).
        classnames: ``"imagenet"`` (OpenAI's 1000 names, folders sorted as ImageNet's wnids), ``"folders"`` (the
            folder names, ``_`` as spaces) or a list.
        templates: ``"openai"`` (OpenAI's 80 ImageNet prompts) or a list of ``{}`` format strings.
    """

    def __init__(self, root: str, model_name: str = "mobileclip_s0", split: str = "val", classnames: Any = "imagenet",
                 templates: Any = "openai", batch_size: int = 64, num_workers: int = 4):
        super().__init__()
        self.root, self.model_name, self.split = Path(root), model_name, split
        self.batch_size, self.num_workers = batch_size, num_workers
        self._classnames, self._templates = classnames, templates
        self.classnames: list[str] | None = None
        self.templates: list[str] | None = None

    def setup(self, stage: str | None = None) -> None:
        from torchvision.datasets import ImageFolder

        import zoo
        from zoo.vision.mobileclip import image_transform

        folder = self.root / self.split
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} does not exist: expected {self.root}/<split>/<class>/<images>")
        cfg = zoo.registry.resolve_cfg(self.model_name)[2]
        self.dataset = ImageFolder(str(folder), transform=image_transform(cfg))
        if self._classnames == "imagenet" or self._templates == "openai":
            names, templates = openai_imagenet_metadata()
        if self._classnames == "imagenet":
            if len(self.dataset.classes) != len(names):
                raise ValueError(f"classnames='imagenet' needs the 1000 ImageNet class folders, {folder} has "
                                 f"{len(self.dataset.classes)}; use classnames='folders' or pass a list")
            self.classnames = names
        elif self._classnames == "folders":
            self.classnames = [c.replace("_", " ") for c in self.dataset.classes]
        else:
            self.classnames = list(self._classnames)
        self.templates = templates if self._templates == "openai" else list(self._templates)

    def _loader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers)

    def val_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()


# ----------------------------------------------------------------------------------------- embedded digits

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_GT_FORMS = ("a handwritten {w}", "the digit {d}", "a photo of the number {w}", "{w}", "handwritten digit {d}")
_SYN_FORMS = ("an image showing the numeral {d}", "a scanned handwritten {w}", "the number {w} written by hand",
              "a small grey picture of a {w}", "a pixelated figure {d}, that is {w}")
DIGIT_TEMPLATES = ("a photo of the digit {}.", "a handwritten {}.")


def digits_split(seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.1):
    """sklearn's 1,797 digits, a fixed stratified split: {split: (images uint8 (N, 8, 8), labels)}."""
    from sklearn.datasets import load_digits

    data = load_digits()
    img = (data.images / 16.0 * 255).round().astype(np.uint8)
    rng = np.random.default_rng(seed)
    out = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(data.target == c))
        n_test, n_val = int(len(idx) * test_fraction), int(len(idx) * val_fraction)
        out["test"] += idx[:n_test].tolist()
        out["val"] += idx[n_test:n_test + n_val].tolist()
        out["train"] += idx[n_test + n_val:].tolist()
    return {k: (img[np.array(v)], data.target[np.array(v)]) for k, v in out.items()}


def digit_captions(label: int, index: int) -> tuple[str, list[str]]:
    """(ground-truth caption, 5 synthetic paraphrases) of a digit image; the GT form varies with the sample."""
    w, d = DIGIT_WORDS[label], str(label)
    return _GT_FORMS[index % len(_GT_FORMS)].format(w=w, d=d), [f.format(w=w, d=d) for f in _SYN_FORMS]


def to_model_pixels(img_u8: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 8, 8) or (N, h, w) uint8 grey -> (N, 3, size, size) floats in [0, 1] (MobileCLIP: no normalisation)."""
    x = img_u8.float().unsqueeze(1) / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous()


def random_crop_params(h: int, w: int, rng: random.Random, scale=(0.6, 1.0)) -> list[int]:
    """A random-resized-crop box [top, left, height, width] (aspect 3/4..4/3) inside an h x w image."""
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch, cw = int(round((area / ratio) ** 0.5)), int(round((area * ratio) ** 0.5))
        if 0 < ch <= h and 0 < cw <= w:
            return [rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw]
    return [0, 0, h, w]


# torchvision's RandAugment op set in the order DataCompDR indexes it (ml-mobileclip training/dr/transforms.py)
RAND_AUGMENT_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")


def decode_augmentation(params) -> tuple[list[int], list[tuple[str, float]] | None]:
    """One stored augmentation -> (crop box ``[top, left, height, width]``, RandAugment ``[(op name, magnitude)]`` or
    None). Accepts a bare crop box or DataCompDR's compressed ``[crop box, [[op index, magnitude], ...] or null]``."""
    if len(params) == 4 and all(isinstance(v, (int, float)) for v in params):
        return [int(v) for v in params], None
    if not 1 <= len(params) <= 2 or not isinstance(params[0], (list, tuple)) or len(params[0]) != 4:
        raise ValueError(f"stored augmentation {params!r}: expected a crop box [top, left, height, width] or "
                         "DataCompDR's [crop box, rand_augment ops or null] (no mixup/cutmix pair id)")
    ops = params[1] if len(params) == 2 else None
    if ops is not None:
        bad = [o for o in ops if len(o) != 2 or not 0 <= int(o[0]) < len(RAND_AUGMENT_OPS)]
        if bad:
            raise ValueError(f"stored RandAugment ops {bad}: each must be [op index 0..{len(RAND_AUGMENT_OPS) - 1}, "
                             "magnitude]")
        ops = [(RAND_AUGMENT_OPS[int(i)], float(m)) for i, m in ops]
    return [int(v) for v in params[0]], ops


def random_rand_augment(rng: random.Random, size: int, num_ops: int = 2, magnitude: int = 9,
                        num_bins: int = 31) -> list[list]:
    """RandAugment parameters drawn like torchvision's ``RandAugment(num_ops, magnitude, num_bins)`` (its defaults,
    DataCompDR's setting), in DataCompDR's compressed form ``[[op index, signed magnitude], ...]``."""
    from torchvision.transforms import RandAugment

    space = RandAugment()._augmentation_space(num_bins, (size, size))
    ops = []
    for _ in range(num_ops):
        i = rng.randrange(len(RAND_AUGMENT_OPS))
        mags, signed = space[RAND_AUGMENT_OPS[i]]
        m = float(mags[magnitude]) if mags.ndim > 0 else 0.0
        ops.append([i, -m if signed and rng.random() < 0.5 else m])
    return ops


def replay_augmentation(img: torch.Tensor, params: Sequence, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Replay one stored augmentation (:func:`decode_augmentation`) on a (C, H, W) image in [0, 1]: crop, resize to
    ``size`` (``interpolation``: ``"bilinear"``, as our digits shards were written, or ``"bicubic"``, DataCompDR's
    ``random_resized_crop``, antialiased like the PIL resize it ran on, clamped to [0, 1]), then the RandAugment ops
    in order on the uint8 image (torchvision's op functions, nearest interpolation, no fill: RandAugment's defaults).
    Deterministic: the same parameters give the same pixels."""
    (t, l, h, w), ops = decode_augmentation(params)
    if interpolation == "bilinear":
        crop = img[:, t:t + h, l:l + w].unsqueeze(0)
        out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
    elif interpolation == "bicubic":
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        out = TF.resized_crop(img, t, l, h, w, [size, size], interpolation=InterpolationMode.BICUBIC,
                              antialias=True).clamp(0, 1)
    else:
        raise ValueError(f"interpolation={interpolation!r}: expected 'bilinear' or 'bicubic'")
    if ops:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.autoaugment import _apply_op  # the op table RandAugment itself applies

        u8 = (out * 255).round().clamp(0, 255).to(torch.uint8)
        for name, magnitude in ops:
            u8 = _apply_op(u8, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
        out = u8.float() / 255
    return out


class DigitsCaptionsDataset(Dataset):
    """Digit images (3 x size x size, [0, 1]) with a tokenized ground-truth caption (and, with ``synthetic``, a random
    synthetic one), for plain CLIP training; retrieval pairs for evaluation when ``retrieval=True``. ``augment``:
    a random-resized crop per access, drawn as the reinforce step draws its stored ones."""

    def __init__(self, images, labels, tokenizer, size: int, synthetic: bool = True, seed: int = 0,
                 augment: bool = False):
        self.images, self.labels = torch.as_tensor(images), torch.as_tensor(labels)
        self.tok, self.size, self.synthetic = tokenizer, size, synthetic  # tokenizer: texts -> (N, context) ids
        self.rng, self.augment = random.Random(seed), augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        gt, syn = digit_captions(int(self.labels[i]), i)
        img = to_model_pixels(self.images[i:i + 1], self.size)[0]
        if self.augment:
            img = replay_augmentation(img, random_crop_params(self.size, self.size, self.rng), self.size)
        item = {"image": img, "text": self.tok(gt)[0]}
        if self.synthetic:
            item["syn_text"] = self.tok(self.rng.choice(syn))[0]
        return item


class DigitsCLIPDataModule(L.LightningDataModule):
    """Embedded image-caption pairs from sklearn's digits. Train: ``{"image", "text", "syn_text"}`` dicts (plain CLIP,
    e.g. the teacher). Val/test: zero-shot ``(image, label)`` batches with ``classnames`` = digit words, and on test a
    second loader of retrieval pairs (recall@k). ``augment``: random-resized crops of the training images (the
    teacher's setting: a teacher that never saw crops embeds the reinforce step's stored crops poorly)."""

    def __init__(self, model_name: str = "mobileclip_s0", image_size: int = 32, batch_size: int = 64, seed: int = 0,
                 num_workers: int = 0, context_length: int = 77, augment: bool = False):
        super().__init__()
        self.augment = augment
        self.model_name, self.image_size, self.batch_size, self.seed = model_name, image_size, batch_size, seed
        self.num_workers, self.context_length = num_workers, context_length
        self.classnames, self.templates = list(DIGIT_WORDS), list(DIGIT_TEMPLATES)

    def setup(self, stage: str | None = None) -> None:
        import functools

        import zoo

        self.splits = digits_split(self.seed)
        self.tokenizer = functools.partial(zoo.get_tokenizer(self.model_name), context_length=self.context_length)

    def train_dataloader(self):
        img, lab = self.splits["train"]
        ds = DigitsCaptionsDataset(img, lab, self.tokenizer, self.image_size, seed=self.seed,
                                   augment=getattr(self, "augment", False))
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=g,
                          num_workers=self.num_workers)

    def _zero_shot(self, split):
        img, lab = self.splits[split]
        x = to_model_pixels(torch.as_tensor(img), self.image_size)
        return DataLoader(torch.utils.data.TensorDataset(x, torch.as_tensor(lab)), batch_size=256)

    def val_dataloader(self):
        return self._zero_shot("val")

    def test_dataloader(self):
        img, lab = self.splits["test"]
        pairs = DigitsCaptionsDataset(img, lab, self.tokenizer, self.image_size, synthetic=False)
        return [self._zero_shot("test"), DataLoader(pairs, batch_size=256)]


# ------------------------------------------------------------------------------------------- reinforce step


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _encode(fn, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([F.normalize(fn(x[i:i + batch]), dim=-1) for i in range(0, len(x), batch)])


@torch.no_grad()
def reinforce(teachers: Sequence, images: np.ndarray, labels: np.ndarray, out_dir: str | os.PathLike, *,
              num_augs: int = 4, image_size: int = 32, store_size: int = 32, shard_size: int = 500, seed: int = 0,
              context_length: int | None = None, rand_augment: tuple[int, int] | None = None) -> list[Path]:
    """Write the reinforced digits dataset: per image ``num_augs`` crop boxes (with ``rand_augment=(num_ops,
    magnitude)`` also RandAugment ops, stored in DataCompDR's compressed form), 5 synthetic captions and the teacher
    ensemble's embeddings of every augmentation and caption, as DataCompDR-layout tar shards ``shard-NNNNN.tar``.

    ``teachers`` are CLIP models (``encode_image`` / ``encode_text``); their normalised embeddings are concatenated
    (DataCompDR: 2 x 768). Shards are written under a temporary name and renamed when complete; an existing shard is
    never overwritten (pick a new ``out_dir``)."""
    import zoo

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("shard-*.tar")):
        raise FileExistsError(f"{out} already holds shards; reinforce into a new folder")
    tok = zoo.get_tokenizer("mobileclip_s0")
    ctx = context_length or min(t.context_length for t in teachers)
    rng = random.Random(seed)
    stored = to_model_pixels(torch.as_tensor(images), store_size)  # the pixels kept in the shard
    paths = []
    for t in teachers:
        t.eval()
    from PIL import Image

    for start in range(0, len(labels), shard_size):
        idx = list(range(start, min(start + shard_size, len(labels))))
        caps = [digit_captions(int(labels[i]), i) for i in idx]
        params = [[random_crop_params(store_size, store_size, rng) for _ in range(num_augs)] for _ in idx]
        if rand_augment is not None:
            params = [[[box, random_rand_augment(rng, image_size, *rand_augment)] for box in ps] for ps in params]
        views = torch.stack([replay_augmentation(stored[i], p, image_size) for i, ps in zip(idx, params) for p in ps])
        tokens = tok([c for gt, syn in caps for c in (gt, *syn)], context_length=ctx)
        img_emb = torch.cat([_encode(t.encode_image, views) for t in teachers], -1).reshape(len(idx), num_augs, -1)
        txt_emb = torch.cat([_encode(t.encode_text, tokens) for t in teachers], -1).reshape(len(idx), -1, img_emb.shape[-1])
        path = out / f"shard-{start // shard_size:05d}.tar"
        tmp = path.with_name(f".{path.name}.part")
        with tarfile.open(tmp, "w") as tar:
            for n, i in enumerate(idx):
                key = f"{i:08d}"
                gt, syn = caps[n]
                buf = io.BytesIO()
                np.savez(buf, image_emb=img_emb[n].numpy().astype(np.float16), text_emb=txt_emb[n].numpy().astype(np.float16))
                png = io.BytesIO()
                Image.fromarray((stored[i, 0].numpy() * 255).round().astype(np.uint8), mode="L").save(png, "PNG")
                _add(tar, f"{key}.url.txt", f"sklearn-digits://{i}".encode())
                _add(tar, f"{key}.syn.json", json.dumps({"syn_text": syn}).encode())
                _add(tar, f"{key}.paug.json", json.dumps({"param_aug": params[n]}).encode())
                _add(tar, f"{key}.npz", buf.getvalue())
                _add(tar, f"{key}.json", json.dumps({"caption": gt, "label": int(labels[i])}).encode())
                _add(tar, f"{key}.png", png.getvalue())
        os.replace(tmp, path)
        paths.append(path)
    return paths


def read_shards(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Samples of DataCompDR-layout shards: dicts keyed by field (``syn.json``, ``paug.json``, ``npz``, ...)."""
    samples: dict[str, dict[str, Any]] = {}
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                key, _, field = m.name.partition(".")
                samples.setdefault(key, {})[field] = tar.extractfile(m).read()
    out = []
    for key in sorted(samples):
        s = samples[key]
        missing = [f for f in ("syn.json", "paug.json", "npz", "json") if f not in s]
        if missing:
            raise ValueError(f"sample {key} lacks {missing}: not a DataCompDR-layout shard")
        npz = np.load(io.BytesIO(s["npz"]))
        paug = json.loads(s["paug.json"])["param_aug"]
        paug = json.loads(paug) if isinstance(paug, str) else paug  # DataCompDR: the list as a JSON string
        out.append(dict(key=key, syn=json.loads(s["syn.json"])["syn_text"], paug=paug,
                        meta=json.loads(s["json"]), image_emb=npz["image_emb"], text_emb=npz["text_emb"],
                        png=s.get("png")))
    return out


class ReinforcedDataset(Dataset):
    """Each access draws one stored augmentation (replayed), the ground-truth caption and one synthetic caption, with
    the matching teacher embeddings (``image_emb`` of that augmentation, ``text_emb`` / ``syn_text_emb``)."""

    def __init__(self, samples, tokenizer, image_size: int, seed: int = 0):
        from PIL import Image

        self.samples, self.tok, self.size = samples, tokenizer, image_size
        self.rng = random.Random(seed)
        self.pixels = [torch.from_numpy(np.array(Image.open(io.BytesIO(s["png"])))).float().div(255).expand(3, -1, -1)
                       for s in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        a = self.rng.randrange(len(s["paug"]))
        j = self.rng.randrange(len(s["syn"]))
        return {"image": replay_augmentation(self.pixels[i], s["paug"][a], self.size),
                "text": self.tok(s["meta"]["caption"])[0], "syn_text": self.tok(s["syn"][j])[0],
                "image_emb": torch.from_numpy(s["image_emb"][a].astype(np.float32)),
                "text_emb": torch.from_numpy(s["text_emb"][0].astype(np.float32)),
                "syn_text_emb": torch.from_numpy(s["text_emb"][1 + j].astype(np.float32))}


class ReinforcedDataModule(DigitsCLIPDataModule):
    """Training batches from reinforced shards (``shards``: a folder or a list of tar files); evaluation as
    :class:`DigitsCLIPDataModule` (zero-shot on the digits val/test splits, retrieval on test)."""

    def __init__(self, shards: str | list[str], model_name: str = "mobileclip_s0", image_size: int = 32,
                 batch_size: int = 64, seed: int = 0, num_workers: int = 0, context_length: int = 77):
        super().__init__(model_name, image_size, batch_size, seed, num_workers, context_length)
        self.shards = shards

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        paths = sorted(Path(self.shards).glob("shard-*.tar")) if isinstance(self.shards, str) and Path(
            self.shards).is_dir() else [Path(p) for p in ([self.shards] if isinstance(self.shards, str) else self.shards)]
        if not paths:
            raise FileNotFoundError(f"no shard-*.tar in {self.shards}: run the reinforce step first "
                                    f"(python -m zoo.data.clip_data --help)")
        self.train_set = ReinforcedDataset(read_shards(paths), self.tokenizer, self.image_size, self.seed)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=g,
                          num_workers=self.num_workers)


# ------------------------------------------------------------------------- DataCompDR-12M: shards + image store

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
JOIN_FIELDS = ("key", "uid", "url")


def iter_tar_samples(path: str | os.PathLike):
    """(key, {field: bytes}) of a webdataset tar, in order (a sample's members are contiguous; ``KEY.FIELD``)."""
    with tarfile.open(path) as tar:
        key, fields = None, {}
        for m in tar:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            k, _, field = base.partition(".")
            if k != key and fields:
                yield key, fields
                fields = {}
            key = k
            fields[field] = tar.extractfile(m).read()
        if fields:
            yield key, fields


def _image_field(fields) -> str | None:
    return next((f for f in fields if f.lower() in IMAGE_EXTS), None)


class ImageStore:
    """The pixels of DataCompDR samples, which ship only ``url.txt`` (the images stay with their owners).

    Either ``root``: what img2dataset wrote (``--output_format webdataset``: ``*.tar`` of ``KEY.jpg`` + ``KEY.txt``
    (the caption) + ``KEY.json`` (``url``, ``key`` and any ``--save_additional_columns`` such as ``uid``); or
    ``--output_format files``: the same members as files, in any sub-folders), joined to a DataCompDR sample by
    ``join``: ``"key"`` (the member names agree), ``"uid"`` (the store's ``json`` ``uid`` = DataCompDR ``json``
    ``uid``) or ``"url"`` (the store's ``json`` ``url`` = DataCompDR ``url.txt``). Or ``url_mirror``: a local mirror
    where ``scheme://host/path`` lives at ``url_mirror/host/path`` (``wget -x`` layout). The index is built once
    (tar members are read later by offset, so forked DataLoader workers share it safely)."""

    def __init__(self, root: str | os.PathLike | None = None, join: str = "key",
                 url_mirror: str | os.PathLike | None = None):
        if (root is None) == (url_mirror is None):
            raise ValueError("ImageStore needs exactly one of root (img2dataset output) or url_mirror (a local mirror)")
        if join not in JOIN_FIELDS:
            raise ValueError(f"join={join!r}: expected one of {JOIN_FIELDS}")
        self.join, self.root, self.mirror = join, Path(root) if root else None, Path(url_mirror) if url_mirror else None
        self.index: dict[str, dict[str, Any]] = {}
        if self.root is not None:
            if not self.root.exists():
                raise FileNotFoundError(f"image store {self.root} does not exist: download the images first "
                                        "(data/README.md, DataCompDR-12M)")
            self._build_index()

    def _add(self, fields: dict[str, Any], key: str, where: str) -> None:
        img = _image_field(fields)
        if img is None:
            return  # img2dataset also writes failed samples' json/txt without an image
        if self.join == "key":
            name = key
        else:
            meta = json.loads(fields["json"]() if callable(fields.get("json")) else fields.get("json") or b"{}")
            if self.join not in meta:
                raise ValueError(f"image store sample {key} in {where} has no '{self.join}' in its json: re-run "
                                 f"img2dataset with --save_additional_columns '[\"{self.join}\"]' or use join='key'")
            name = str(meta[self.join])
        self.index[name] = {"image": fields[img], "caption": fields.get("txt"), "where": f"{where}:{key}.{img}"}

    def _build_index(self) -> None:
        tars = sorted(self.root.rglob("*.tar")) if self.root.is_dir() else [self.root]
        for tp in (t for t in tars if t.suffix == ".tar"):
            with tarfile.open(tp) as tar:
                groups: dict[str, dict[str, Any]] = {}
                for m in tar:
                    if m.isfile():
                        k, _, field = m.name.rsplit("/", 1)[-1].partition(".")
                        groups.setdefault(k, {})[field] = (str(tp), m.offset_data, m.size)
                for k, f in groups.items():
                    if self.join != "key" and "json" in f:
                        f = {**f, "json": functools.partial(_read_at, *f["json"])}
                    self._add(f, k, tp.name)
        if self.root.is_dir():
            files: dict[str, dict[str, Any]] = {}
            for fp in self.root.rglob("*"):
                if fp.is_file() and fp.suffix != ".tar":
                    k, _, field = fp.name.partition(".")
                    files.setdefault(str(fp.parent / k), {})[field] = fp
            for stem, f in files.items():
                if self.join != "key" and "json" in f:
                    f = {**f, "json": f["json"].read_bytes}
                self._add(f, Path(stem).name, str(Path(stem).parent))

    def _mirror_path(self, url: str) -> Path:
        from urllib.parse import unquote, urlsplit

        u = urlsplit(url.strip())
        rel = Path(unquote(u.netloc)) / unquote(u.path).lstrip("/")
        path = (self.mirror / rel).resolve()
        if self.mirror.resolve() not in path.parents:
            raise ValueError(f"url {url!r} maps outside the mirror {self.mirror}")
        return path

    def get(self, key: str, uid: str | None, url: str) -> tuple[bytes, str | None]:
        """(image bytes, caption or None) of one DataCompDR sample; a clear error naming the key when it is missing."""
        if self.mirror is not None:
            path = self._mirror_path(url)
            if not path.is_file():
                raise FileNotFoundError(f"no image for DataCompDR sample {key}: its url {url.strip()!r} maps to "
                                        f"{path}, which does not exist in the mirror {self.mirror}")
            cap = path.with_suffix(".txt")
            return path.read_bytes(), cap.read_text() if cap.is_file() else None
        name = {"key": key, "uid": uid, "url": url.strip()}[self.join]
        entry = self.index.get(name) if name is not None else None
        if entry is None:
            raise FileNotFoundError(f"no image for DataCompDR sample {key} ({self.join} {name!r}) in the image store "
                                    f"{self.root} ({len(self.index)} images indexed): download it (img2dataset) or "
                                    "drop the sample's shard; images are joined by "
                                    f"{'the sample key' if self.join == 'key' else repr(self.join)}")
        cap = entry["caption"]
        return _read(entry["image"]), (_read(cap).decode() if cap is not None else None)


def _read_at(path: str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _read(ref) -> bytes:
    if isinstance(ref, tuple):
        return _read_at(*ref)
    return ref.read_bytes() if isinstance(ref, Path) else ref


def _shard_paths(shards: str | os.PathLike | Sequence[str]) -> list[Path]:
    import glob

    items = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    paths: list[Path] = []
    for it in items:
        p = Path(it)
        paths += sorted(p.glob("*.tar")) if p.is_dir() else [Path(g) for g in sorted(glob.glob(str(it)))]
    if not paths:
        raise FileNotFoundError(f"no DataCompDR shards (*.tar) at {shards}")
    return paths


class DataCompDRDataset(torch.utils.data.IterableDataset):
    """Streams DataCompDR shards (``url.txt``, ``syn.json``, ``paug.json``, ``npz``, ``json``; no pixels) and joins
    each sample's image from an :class:`ImageStore`. Per sample: one stored augmentation replayed (crop box in the
    original image's pixels, ``interpolation`` resize, RandAugment ops), normalised with ``mean`` / ``std``; the
    ground-truth caption (the store's ``KEY.txt``, else a ``caption`` in the sample's json) and one random synthetic
    caption, tokenized; the teacher embeddings of that augmentation and of both captions. Shards are split over
    distributed ranks and DataLoader workers and shuffled per epoch (``set_epoch``) with a ``shuffle_buffer``.
    ``on_missing="skip"`` passes over samples whose image is not in the store (DataComp urls rot), warning with the
    first key and then with a count every 1,000; the default stops with the key."""

    def __init__(self, shards, store: ImageStore, tokenizer, image_size: int, mean=(0.0, 0.0, 0.0),
                 std=(1.0, 1.0, 1.0), interpolation: str = "bicubic", seed: int = 0, shuffle_buffer: int = 1000,
                 verify_sha256: bool = False, on_missing: str = "error"):
        super().__init__()
        if on_missing not in ("error", "skip"):
            raise ValueError(f"on_missing={on_missing!r}: expected 'error' or 'skip'")
        self.on_missing, self.skipped = on_missing, 0
        self.paths, self.store, self.tok, self.size = _shard_paths(shards), store, tokenizer, image_size
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        self.interpolation, self.seed, self.buffer, self.verify = interpolation, seed, shuffle_buffer, verify_sha256
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_shards(self) -> list[Path]:
        import torch.distributed as dist

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        order = list(self.paths)
        random.Random(self.seed + self.epoch).shuffle(order)
        return order[rank * nw + wid::world * nw]

    def decode(self, key: str, f: dict[str, bytes], rng: random.Random) -> dict[str, torch.Tensor]:
        import hashlib

        from PIL import Image

        missing = [k for k in ("url.txt", "syn.json", "paug.json", "npz", "json") if k not in f]
        if missing:
            raise ValueError(f"DataCompDR sample {key} lacks {missing}")
        meta = json.loads(f["json"])
        url = f["url.txt"].decode()
        raw, caption = self.store.get(key, meta.get("uid"), url)
        if self.verify and meta.get("sha256") and hashlib.sha256(raw).hexdigest() != meta["sha256"]:
            raise ValueError(f"DataCompDR sample {key}: the image's sha256 differs from the json's {meta['sha256']} "
                             f"(another or re-encoded image from {url!r}); its stored crops and embeddings would not match")
        caption = caption if caption is not None else meta.get("caption")
        if caption is None:
            raise ValueError(f"no ground-truth caption for DataCompDR sample {key}: DataCompDR stores only its "
                             "embedding; download with img2dataset --caption_col (writes KEY.txt) or add 'caption' "
                             "to the json")
        img = Image.open(io.BytesIO(raw)).convert("RGB")
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)
        paug = json.loads(f["paug.json"])["param_aug"]
        paug = json.loads(paug) if isinstance(paug, str) else paug
        npz = np.load(io.BytesIO(f["npz"]))
        syn = json.loads(f["syn.json"])["syn_text"]
        a, j = rng.randrange(len(paug)), rng.randrange(len(syn))
        (t, l, h, w), _ = decode_augmentation(paug[a])
        if t < 0 or l < 0 or h <= 0 or w <= 0 or t + h > x.shape[1] or l + w > x.shape[2]:
            raise ValueError(f"DataCompDR sample {key}: stored crop box [top {t}, left {l}, height {h}, width {w}] "
                             f"does not fit its image of {x.shape[1]}x{x.shape[2]}: the store holds a resized "
                             "copy; download the images at their original size (img2dataset --resize_mode no)")
        view = replay_augmentation(x, paug[a], self.size, self.interpolation)
        return {"image": (view - self.mean) / self.std, "text": self.tok(caption.strip())[0],
                "syn_text": self.tok(syn[j])[0],
                "image_emb": torch.from_numpy(npz["image_emb"][a].astype(np.float32)),
                "text_emb": torch.from_numpy(npz["text_emb"][0].astype(np.float32)),
                "syn_text_emb": torch.from_numpy(npz["text_emb"][1 + j].astype(np.float32))}

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(hash((self.seed, self.epoch, info.id if info else 0)))
        buf: list[dict[str, torch.Tensor]] = []
        for path in self._my_shards():
            for key, fields in iter_tar_samples(path):
                try:
                    buf.append(self.decode(key, fields, rng))
                except FileNotFoundError as e:
                    if self.on_missing == "error":
                        raise
                    self.skipped += 1
                    if self.skipped == 1 or self.skipped % 1000 == 0:
                        import warnings

                        warnings.warn(f"{self.skipped} DataCompDR sample(s) without an image skipped so far "
                                      f"(this worker); latest: {e}", stacklevel=2)
                    continue
                if len(buf) >= self.buffer:
                    yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf


class DataCompDRDataModule(L.LightningDataModule):
    """Training on DataCompDR-12M / -1B shards (HF ``apple/DataCompDR-12M``) with the images joined from a separate
    store (see :class:`ImageStore`, data/README.md); zero-shot validation on an ImageFolder (``zero_shot_root``, e.g.
    ImageNet val with OpenAI's names and templates), as the paper's ``--imagenet-val``.

    Args:
        shards: folder, glob or list of DataCompDR tars. images / join / url_mirror: the image store.
        zero_shot_root / zero_shot_split / zero_shot_classnames / zero_shot_templates: as
            :class:`ZeroShotImageFolderDataModule` (``root``, ``split``, ``classnames``, ``templates``).
        image_size: default the model's input size; interpolation: the stored crops' resize (DataCompDR: bicubic).
        verify_sha256: check each image against the json's sha256 (a different image would not match its crops).
        on_missing: ``"error"`` (stop at a sample without an image, naming it) or ``"skip"`` (warned, counted).
    """

    def __init__(self, shards: str | list[str], images: str | None = None, join: str = "key",
                 url_mirror: str | None = None, model_name: str = "mobileclip_b", image_size: int | None = None,
                 interpolation: str = "bicubic", batch_size: int = 256, num_workers: int = 4, seed: int = 0,
                 context_length: int = 77, shuffle_buffer: int = 1000, verify_sha256: bool = False,
                 on_missing: str = "error",
                 zero_shot_root: str | None = None, zero_shot_split: str = "val", zero_shot_classnames: Any = "imagenet",
                 zero_shot_templates: Any = "openai", eval_batch_size: int = 64):
        super().__init__()
        self.save_hyperparameters()
        self.classnames: list[str] | None = None
        self.templates: list[str] | None = None
        self.zero_shot: ZeroShotImageFolderDataModule | None = None

    def setup(self, stage: str | None = None) -> None:
        import zoo

        hp = self.hparams
        cfg = zoo.registry.resolve_cfg(hp.model_name)[2]
        tok = functools.partial(zoo.get_tokenizer(hp.model_name), context_length=hp.context_length)
        store = ImageStore(hp.images, hp.join, hp.url_mirror)
        self.train_set = DataCompDRDataset(hp.shards, store, tok, hp.image_size or cfg.input_size[-1], cfg.mean,
                                           cfg.std, hp.interpolation, hp.seed, hp.shuffle_buffer, hp.verify_sha256,
                                           hp.on_missing)
        if hp.zero_shot_root:
            self.zero_shot = ZeroShotImageFolderDataModule(hp.zero_shot_root, hp.model_name, hp.zero_shot_split,
                                                           hp.zero_shot_classnames, hp.zero_shot_templates,
                                                           hp.eval_batch_size,
                                                           hp.num_workers)
            self.zero_shot.setup(stage)
            self.classnames, self.templates = self.zero_shot.classnames, self.zero_shot.templates

    def train_dataloader(self):
        self.train_set.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers,
                          drop_last=True, persistent_workers=False)

    def val_dataloader(self):
        return self.zero_shot.val_dataloader() if self.zero_shot is not None else []

    def test_dataloader(self):
        return self.zero_shot.test_dataloader() if self.zero_shot is not None else []


def write_datacompdr_toy(out_dir: str | os.PathLike, n: int = 8, *, shard_size: int = 4, num_augs: int = 3,
                         emb_dim: int = 8, teachers: int = 2, image_hw: tuple[int, int] = (40, 48), seed: int = 0,
                         store: str = "tar") -> tuple[Path, Path]:
    """A tiny dataset in the real DataCompDR-12M layout, for tests and for trying the pipeline: ``out/shards/*.tar``
    with ``url.txt``, ``syn.json``, ``paug.json`` (``param_aug`` as a JSON string of DataCompDR's compressed
    crop + RandAugment form), ``npz`` (random fp16 "teacher" embeddings), ``json`` (``uid``, ``sha256``) and NO image;
    and ``out/images``: an img2dataset-style store (``store="tar"``: one ``00000.tar``; ``"files"``: a folder; or
    ``"mirror"``: ``host/path`` files as a url mirror) of random JPEGs with ``KEY.txt`` captions and ``KEY.json``
    (``url``, ``key``, ``uid``). Returns (shards folder, image store folder)."""
    import hashlib

    from PIL import Image

    rng, g = random.Random(seed), np.random.default_rng(seed)
    out = Path(out_dir)
    shards, images = out / "shards", out / "images"
    shards.mkdir(parents=True)
    images.mkdir(parents=True)
    h, w = image_hw
    store_tar = tarfile.open(images / "00000.tar", "w") if store == "tar" else None
    for start in range(0, n, shard_size):
        with tarfile.open(shards / f"{start // shard_size:08d}.tar", "w") as tar:
            for i in range(start, min(start + shard_size, n)):
                key, uid, url = f"{i:09d}", f"{g.integers(1 << 62):032x}", f"https://img{i % 3}.example.com/p/{i}.jpg"
                buf = io.BytesIO()
                Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
                jpg = buf.getvalue()
                paug = [[random_crop_params(h, w, rng, scale=(0.3, 1.0)), random_rand_augment(rng, 16)]
                        for _ in range(num_augs)]
                npz = io.BytesIO()
                np.savez(npz, image_emb=g.standard_normal((num_augs, teachers * emb_dim)).astype(np.float16),
                         text_emb=g.standard_normal((6, teachers * emb_dim)).astype(np.float16))
                _add(tar, f"{key}.url.txt", url.encode())
                _add(tar, f"{key}.syn.json", json.dumps({"syn_text": [f"synthetic caption {s} of {i}"
                                                                      for s in range(5)]}).encode())
                _add(tar, f"{key}.paug.json", json.dumps({"param_aug": json.dumps(paug)}).encode())
                _add(tar, f"{key}.npz", npz.getvalue())
                _add(tar, f"{key}.json", json.dumps({"uid": uid, "sha256": hashlib.sha256(jpg).hexdigest()}).encode())
                caption = f"a photo of random noise number {i}".encode()
                meta = json.dumps({"url": url, "key": key, "uid": uid, "caption": caption.decode()}).encode()
                if store_tar is not None:
                    for field, data in (("jpg", jpg), ("txt", caption), ("json", meta)):
                        _add(store_tar, f"{key}.{field}", data)
                elif store == "files":
                    d = images / f"{start // shard_size:05d}"
                    d.mkdir(exist_ok=True)
                    for field, data in (("jpg", jpg), ("txt", caption), ("json", meta)):
                        (d / f"{key}.{field}").write_bytes(data)
                elif store == "mirror":
                    p = images / f"img{i % 3}.example.com" / "p" / f"{i}.jpg"
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(jpg)
                    p.with_suffix(".txt").write_bytes(caption)
                else:
                    raise ValueError(f"store={store!r}: expected 'tar', 'files' or 'mirror'")
    if store_tar is not None:
        store_tar.close()
    return shards, images


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zoo.data.clip_data",
                                description="reinforce step: teacher embeddings + synthetic captions + stored "
                                            "augmentations of the embedded digits (train split), as DataCompDR shards")
    p.add_argument("--teacher", action="append", required=True, help="teacher checkpoint (repeat for an ensemble)")
    p.add_argument("--model-name", required=True, help="the teachers' registered model name")
    p.add_argument("--model-args", default="{}", help="JSON architecture overrides of the teachers")
    p.add_argument("--out", required=True)
    p.add_argument("--num-augs", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--fraction", type=float, default=1.0,
                   help="reinforce only this share of each digit's train images (a data-limited student, as the "
                        "paper's students see far less data than their teachers were trained on)")
    p.add_argument("--rand-augment", type=int, nargs=2, default=None, metavar=("NUM_OPS", "MAGNITUDE"),
                   help="also store RandAugment ops per augmentation (DataCompDR: 2 9, torchvision's defaults)")
    a = p.parse_args(argv)
    import zoo

    torch.manual_seed(a.seed)
    teachers = [zoo.create_model(a.model_name, checkpoint_path=t, **json.loads(a.model_args)).eval() for t in a.teacher]
    img, lab = digits_split(a.seed)["train"]
    if not 0.0 < a.fraction <= 1.0:
        raise SystemExit(f"--fraction {a.fraction}: expected a share in (0, 1]")
    if a.fraction < 1.0:  # the first images of each class (the split is already shuffled per class)
        keep = np.concatenate([np.flatnonzero(lab == c)[:max(1, int(round(a.fraction * (lab == c).sum())))]
                               for c in range(10)])
        img, lab = img[np.sort(keep)], lab[np.sort(keep)]
    paths = reinforce(teachers, img, lab, a.out, num_augs=a.num_augs, image_size=a.image_size, seed=a.seed,
                      shard_size=a.shard_size, rand_augment=tuple(a.rand_augment) if a.rand_augment else None)
    print(f"wrote {len(paths)} shard(s) to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
