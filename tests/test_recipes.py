"""Every YAML under recipes/ parses, instantiates and runs two batches on tiny data, so no recipe rots.

Recipes that point at real datasets get their data swapped for a tiny stand-in of the same format, built here;
multi-GPU settings are overridden to one CPU process. A DataModule class without a rule below fails the test:
add a rule when you add a recipe for a new kind of data.
"""
from pathlib import Path

import pytest
import yaml

from zoo.recipes import list_recipes, recipes_root, resolve_recipe
from zoo.training import run_lightning_cli

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(RECIPES_DIR.rglob("*.yaml"))
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.num_nodes=1",
       "--trainer.precision=32", "--trainer.fast_dev_run=2"]


def _tiny_image_folder(root: Path, classes=2, per_class=4, size=40) -> Path:
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _image_folder_args(tmp: Path) -> list[str]:
    root = _tiny_image_folder(tmp / "imagefolder")
    return [f"--data.init_args.root={root}", "--data.init_args.batch_size=2", "--data.init_args.num_workers=0"]


def _small_crop_args(data_cls: str, model_name: str | None) -> list[str]:
    """64 px instead of 224 for the ImageNet recipes: their full-size models step 3-10x faster and the same code runs
    (the recipe's data config, augmentation and model; only the crop is smaller). Models whose own input is 64 px
    or less (the CIFAR SNNs, 32 px, with a classifier sized for it) keep their size."""
    if data_cls != "zoo.data.ImageFolderDataModule" or not model_name:
        return []
    from zoo.registry import model_info

    size = model_info(model_name.split(".")[0])["default_cfg"]["input_size"]
    return ["--data.init_args.input_size=[3, 64, 64]"] if max(size[1:]) > 64 else []


def _text_args(tmp: Path) -> list[str]:
    """A few local text files and the byte tokenizer (real recipes point at a corpus and a trained tokenizer)."""
    d = tmp / "text"
    d.mkdir()
    for i in range(6):
        (d / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i} + 1\n" * 40)
    return [f"--data.init_args.files=[{d}/*.txt]", "--data.init_args.tokenizer=byte", "--data.init_args.seq_len=32",
            "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--data.init_args.val_tokens=256",
            "--data.init_args.val_fraction=0.2", "--data.init_args.test_fraction=0.2",
            "--data.init_args.pretokenized=null"]


def _detection_args(tmp: Path) -> list[str]:
    """A tiny generated shapes set written in COCO format, read back through the real COCO paths."""
    from zoo.data.detection import make_shapes_dataset

    root = make_shapes_dataset(tmp / "coco", splits={"train": 4, "val": 2})
    return [f"--data.init_args.train_ann={root}/train/annotations.json", f"--data.init_args.train_images={root}/train/images",
            f"--data.init_args.val_ann={root}/val/annotations.json", f"--data.init_args.val_images={root}/val/images",
            "--data.init_args.root=null", "--data.init_args.batch_size=2", "--data.init_args.eval_batch_size=2",
            "--data.init_args.num_workers=0", "--data.init_args.image_size=64"]  # SSD runs at any size; COCO's 320 costs 25x


def _reinforced_args(tmp: Path) -> list[str]:
    """Reinforced (DataCompDR-layout) digit shards from a tiny random teacher, written by the real reinforce step."""
    import zoo
    from zoo.data import clip_data

    teacher = zoo.create_model("mobileclip2_s0", embed_dim=16, dynamic_img_size=True, text_args=dict(width=16, heads=2, layers=1),
                               image_args=dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64))).eval()
    img, lab = clip_data.digits_split()["train"]
    clip_data.reinforce([teacher], img[:16], lab[:16], tmp / "dr", num_augs=2)
    return [f"--data.init_args.shards={tmp / 'dr'}", "--data.init_args.batch_size=8"]


def _datacompdr_args(tmp: Path) -> list[str]:
    """A tiny set in the real DataCompDR-12M layout (shards without images) + an img2dataset-style store joined by uid."""
    from zoo.data import clip_data

    shards, images = clip_data.write_datacompdr_toy(tmp / "dcdr", n=8)
    return [f"--data.init_args.shards={shards}", f"--data.init_args.images={images}", "--data.init_args.join=uid",
            "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--data.init_args.image_size=32",
            "--data.init_args.shuffle_buffer=4"]


def _segmentation_args(layout: str):
    """ADE20K / Cityscapes layouts filled with a few generated scenes, read back through the real folder code."""
    def rule(tmp: Path) -> list[str]:
        from zoo.data.segmentation import write_scenes

        root = write_scenes(tmp / layout, layout, {"train": 4, "val": 2}, height=48, width=64)
        return [f"--data.init_args.root={root}", "--data.init_args.crop_size=[48, 48]", "--data.init_args.eval_size=null",
                "--data.init_args.batch_size=2", "--data.init_args.num_workers=0"]
    return rule



def _yolo_layout_args(tmp: Path) -> list[str]:
    """A tiny YOLO-format layout folder (images/ + labels/, class ids 0..2, valid for every layout recipe's names)."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for i in range(n):
            (tmp / "yolo" / "images" / split).mkdir(parents=True, exist_ok=True)
            (tmp / "yolo" / "labels" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(tmp / "yolo" / "images" / split / f"{i}.png")
            (tmp / "yolo" / "labels" / split / f"{i}.txt").write_text(f"{i % 3} 0.5 0.5 0.4 0.3\n")
    return [f"--data.init_args.root={tmp / 'yolo'}", "--data.init_args.train=images/train", "--data.init_args.val=images/val",
            "--data.init_args.test=null", "--data.init_args.image_size=64", "--data.init_args.batch_size=2",
            "--data.init_args.eval_batch_size=2", "--data.init_args.num_workers=0"]

# data class_path -> function(tmp_path) returning CLI overrides that make the recipe run on tiny local data.
TINY_DATA_RULES = {
    "zoo.data.segmentation.GeneratedScenes": lambda tmp: [
        "--data.init_args.counts={train: 4, val: 2, test: 2}", "--data.init_args.height=48",
        "--data.init_args.width=48", "--data.init_args.crop_size=[48, 48]", "--data.init_args.batch_size=2",
        "--data.init_args.eval_batch_size=2"],
    "zoo.data.segmentation.ADE20K": _segmentation_args("ade20k"),
    "zoo.data.segmentation.Cityscapes": _segmentation_args("cityscapes"),
    "zoo.data.DigitsDataModule": lambda tmp: ["--data.init_args.batch_size=8"],
    "zoo.data.ImageFolderDataModule": _image_folder_args,
    "zoo.data.text.TextDataModule": _text_args,
    "zoo.data.detection.COCODetection": _detection_args,
    "zoo.data.layout.YOLODetection": _yolo_layout_args,
    "zoo.data.layout.DocSynthDetection": lambda tmp: [
        "--data.init_args.splits={train: 4, val: 2, test: 2}", "--data.init_args.width_range=[96, 128]",
        f"--data.init_args.data_dir={tmp / 'docsynth'}", "--data.init_args.image_size=64",
        "--data.init_args.batch_size=2", "--data.init_args.eval_batch_size=2"],
    "zoo.data.clip_data.DigitsCLIPDataModule": lambda tmp: ["--data.init_args.batch_size=8"],
    "zoo.data.clip_data.ReinforcedDataModule": _reinforced_args,
    "zoo.data.clip_data.DataCompDRDataModule": _datacompdr_args,
}


# model_name -> CLI overrides that shrink models too big to step on this machine (the FSDP recipe of LFM2-1.2B/2.6B;
# it runs as written, sharded over 2 CPU processes, in tests/language/test_lm_fsdp.py)
TINY_MODEL_RULES = {
    name: ["--model.init_args.model_args={hidden_size: 64, layer_types: [conv, full_attention], num_attention_heads: 4, "
           "num_key_value_heads: 2, intermediate_size: 128, block_auto_adjust_ff_dim: false}",
           "--model.init_args.fsdp_param_dtype=null"]
    for name in ("lfm2_1_2b", "lfm2_2_6b")
}
# the DocLayout-YOLO paper recipes at yolov10n's depth and width (same GL-CRM layer list): two steps of the full m
# take minutes on this machine
TINY_MODEL_RULES["doclayout_yolo_m"] = ["--model.init_args.model_args={scale: [0.33, 0.25, 1024]}"]
# MobileCLIP-B (DataCompDR-12M recipe): one ViT block (the conv stem fixes its width) and one narrow text layer
TINY_MODEL_RULES["mobileclip_b"] = [
    "--model.init_args.model_args={embed_dim: 16, dynamic_img_size: true, image_args: {depth: 1, img_size: 32}, "
    "text_args: {width: 32, heads: 2, layers: 1}}"]


# model_name -> model_args merged over the recipe's own (so the recipe's keys still reach the model constructor):
# LFM2-350M's two full-size AdamW steps cost ~15 s of CPU; the recipe's optimizer, schedule and data run the same
# on two layers of each kind (conv, attention)
TINY_MODEL_ARGS = {
    "lfm2_350m": dict(hidden_size=64, layer_types=["conv", "full_attention"], num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, block_auto_adjust_ff_dim=False),
}


def _tiny_model_args(cfg: dict) -> list[str]:
    init = cfg.get("model", {}).get("init_args", {})
    tiny = TINY_MODEL_ARGS.get(init.get("model_name"))
    if tiny is None:
        return []
    import json

    return [f"--model.init_args.model_args={json.dumps({**(init.get('model_args') or {}), **tiny})}"]


def _is_lightning_recipe(cfg: dict) -> bool:
    return isinstance(cfg, dict) and ("model" in cfg or "trainer" in cfg)


def test_recipes_are_found_and_packaged():
    names = list_recipes()
    assert "quickstart" in names and "nextvit/imagenet1k" in names
    assert len(names) == len(RECIPES)
    assert resolve_recipe("quickstart") == recipes_root() / "quickstart.yaml"
    with pytest.raises(FileNotFoundError, match="quickstar"):
        resolve_recipe("quickstar")


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(RECIPES_DIR)) for p in RECIPES])
def test_recipe_runs_two_batches(recipe, tmp_path, monkeypatch):
    cfg = yaml.safe_load(recipe.read_text())
    if not _is_lightning_recipe(cfg):
        pytest.fail(f"{recipe} is not a Lightning CLI recipe; give it a smoke test here")
    data_cls = cfg.get("data", {}).get("class_path")
    assert data_cls in TINY_DATA_RULES, f"no tiny-data rule for {data_cls} (recipe {recipe}); add one above"
    monkeypatch.chdir(tmp_path)
    model_rule = TINY_MODEL_RULES.get(cfg.get("model", {}).get("init_args", {}).get("model_name"), [])
    model_rule = model_rule + _tiny_model_args(cfg)
    data_args = TINY_DATA_RULES[data_cls](tmp_path)
    data_args += _small_crop_args(data_cls, cfg.get("model", {}).get("init_args", {}).get("model_name"))
    before = set(tmp_path.rglob("*"))
    cli = run_lightning_cli(["fit", "-c", str(recipe), *CPU, *data_args, *model_rule])
    assert cli.trainer.state.finished, f"{recipe} did not finish"
    assert cli.trainer.global_step == 2
    # fast_dev_run is a sanity check: no checkpoint, export, log or config may survive it (in the cwd or anywhere)
    new = set(tmp_path.rglob("*")) - before
    left = [p for p in new if p.suffix in RUN_ARTIFACTS or p.name in ("checkpoints", "runs", "lightning_logs")]
    assert not left, f"{recipe}: fast_dev_run left {left}"


# what a run writes (checkpoints, exports, metrics, config); none of it may survive a fast_dev_run
RUN_ARTIFACTS = {".ckpt", ".safetensors", ".onnx", ".pt2", ".csv", ".yaml"}


def _callbacks(cfg: dict) -> list[dict]:
    cbs = (cfg.get("trainer") or {}).get("callbacks") or []
    return [cb for cb in cbs if isinstance(cb, dict)]


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(RECIPES_DIR)) for p in RECIPES])
def test_recipe_outputs_live_in_the_run_folder(recipe):
    """Checkpoints, exports, logs and predictions go under <default_root_dir>/version_N (Lightning's layout):
    a fixed folder in a recipe would ignore --trainer.default_root_dir and let reruns overwrite each other."""
    cfg = yaml.safe_load(recipe.read_text())
    trainer = cfg.get("trainer") or {}
    loggers = trainer.get("logger")
    for lg in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(lg, dict):
            assert "save_dir" not in (lg.get("init_args") or {}), f"{recipe}: the logger's save_dir follows default_root_dir"
    for cb in _callbacks(cfg):
        args = cb.get("init_args") or {}
        for key in ("dirpath", "output_dir"):
            assert not args.get(key), f"{recipe}: {cb['class_path']} {key}={args.get(key)!r} is a fixed folder"
    assert str(trainer.get("default_root_dir", "")).startswith("runs/"), f"{recipe}: set default_root_dir: runs/<name>"
