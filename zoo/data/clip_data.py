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


def replay_augmentation(img: torch.Tensor, params: Sequence, size: int) -> torch.Tensor:
    """Replay one stored augmentation (:func:`decode_augmentation`) on a (C, H, W) image in [0, 1]: crop, resize to
    ``size`` (bilinear), then the RandAugment ops in order on the uint8 image (torchvision's op functions, nearest
    interpolation, no fill: RandAugment's defaults). Deterministic: the same parameters give the same pixels."""
    (t, l, h, w), ops = decode_augmentation(params)
    crop = img[:, t:t + h, l:l + w].unsqueeze(0)
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
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
    synthetic one), for plain CLIP training; retrieval pairs for evaluation when ``retrieval=True``."""

    def __init__(self, images, labels, tokenizer, size: int, synthetic: bool = True, seed: int = 0):
        self.images, self.labels = torch.as_tensor(images), torch.as_tensor(labels)
        self.tok, self.size, self.synthetic = tokenizer, size, synthetic  # tokenizer: texts -> (N, context) ids
        self.rng = random.Random(seed)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        gt, syn = digit_captions(int(self.labels[i]), i)
        item = {"image": to_model_pixels(self.images[i:i + 1], self.size)[0], "text": self.tok(gt)[0]}
        if self.synthetic:
            item["syn_text"] = self.tok(self.rng.choice(syn))[0]
        return item


class DigitsCLIPDataModule(L.LightningDataModule):
    """Embedded image-caption pairs from sklearn's digits. Train: ``{"image", "text", "syn_text"}`` dicts (plain CLIP,
    e.g. the teacher). Val/test: zero-shot ``(image, label)`` batches with ``classnames`` = digit words, and on test a
    second loader of retrieval pairs (recall@k)."""

    def __init__(self, model_name: str = "mobileclip_s0", image_size: int = 32, batch_size: int = 64, seed: int = 0,
                 num_workers: int = 0, context_length: int = 77):
        super().__init__()
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
        ds = DigitsCaptionsDataset(img, lab, self.tokenizer, self.image_size, seed=self.seed)
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
    p.add_argument("--rand-augment", type=int, nargs=2, default=None, metavar=("NUM_OPS", "MAGNITUDE"),
                   help="also store RandAugment ops per augmentation (DataCompDR: 2 9, torchvision's defaults)")
    a = p.parse_args(argv)
    import zoo

    torch.manual_seed(a.seed)
    teachers = [zoo.create_model(a.model_name, checkpoint_path=t, **json.loads(a.model_args)).eval() for t in a.teacher]
    img, lab = digits_split(a.seed)["train"]
    paths = reinforce(teachers, img, lab, a.out, num_augs=a.num_augs, image_size=a.image_size, seed=a.seed,
                      shard_size=a.shard_size, rand_augment=tuple(a.rand_augment) if a.rand_augment else None)
    print(f"wrote {len(paths)} shard(s) to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
