"""Segmentation data: generated scenes, ADE20K / Cityscapes layouts, PaddleSeg transforms, bad-input errors."""
import numpy as np
import pytest
import torch
from PIL import Image

from zoo.data.segmentation import (ADE20K, SCENE_CLASSES, Cityscapes, GeneratedScenes, GeneratedScenesDataset,
                                   SegEvalTransform, SegmentationDataError, SegTrainTransform, write_scenes)


def test_generated_scenes_are_deterministic_per_seed_with_overlaps_and_ignore():
    a, b = GeneratedScenesDataset(12, seed=3), GeneratedScenesDataset(12, seed=3)
    other = GeneratedScenesDataset(12, seed=4)
    img0, lab0 = a.raw(5)
    img1, lab1 = b.raw(5)
    assert np.array_equal(img0, img1) and np.array_equal(lab0, lab1)
    assert not np.array_equal(img0, other.raw(5)[0])
    labels = np.stack([a.raw(i)[1] for i in range(12)])
    values = set(np.unique(labels).tolist())
    assert values <= set(range(len(SCENE_CLASSES))) | {255}
    assert 255 in values and len(values - {255}) == len(SCENE_CLASSES)  # every class and some ignore regions
    # splits are disjoint streams
    assert not np.array_equal(GeneratedScenesDataset(2, 3, split_id=1).raw(0)[0], a.raw(0)[0])


def test_train_transform_scales_pads_crops_and_keeps_labels():
    import random

    random.seed(0)
    img = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    lab = torch.randint(0, 4, (40, 60))
    tf = SegTrainTransform(crop_size=(64, 64), min_scale=0.5, max_scale=0.5, scale_step=0.25)
    x, y = tf(img, lab)  # 0.5x -> 20x30, padded to 64x64: the padding is ignore
    assert x.shape == (3, 64, 64) and y.shape == (64, 64) and x.dtype == torch.float32
    assert (y == 255).sum() == 64 * 64 - 20 * 30
    assert set(y.unique().tolist()) <= {0, 1, 2, 3, 255}
    tf = SegTrainTransform(crop_size=(32, 32), min_scale=0.5, max_scale=2.0, scale_step=0.25)
    assert sorted({tf._scale() for _ in range(300)}) == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    ev = SegEvalTransform((2048, 512), 32)
    assert ev.output_size(480, 640) == (512, 704)  # keep ratio to short side 512, then multiples of 32
    x, y = ev(img, lab)
    assert y is lab and x.shape[-2:] == ev.output_size(40, 60)


def test_ade20k_layout_reduces_zero_label_and_cityscapes_layout_loads(tmp_path):
    root = write_scenes(tmp_path / "ade", "ade20k", {"train": 3, "val": 2}, height=40, width=56)
    dm = ADE20K(str(root), crop_size=(32, 32), eval_size=(128, 64), size_divisor=32, batch_size=2, num_workers=0)
    dm.setup("fit")
    raw = np.array(Image.open(sorted((root / "annotations" / "validation").glob("*.png"))[0]))
    img, lab = dm.dataset("val")[0]
    expect = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
    assert np.array_equal(lab.numpy(), expect) and lab.shape == (40, 56)
    assert img.shape[-2:] == (64, 96)  # evaluation resize: image only
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and y.shape == (2, 32, 32) and y.dtype == torch.int64
    root = write_scenes(tmp_path / "cs", "cityscapes", {"train": 2, "val": 1}, height=32, width=64)
    cs = Cityscapes(str(root), crop_size=(32, 32), batch_size=2, num_workers=0)
    img, lab = cs.dataset("val")[0]
    assert img.shape == (3, 32, 64) and int(lab[lab != 255].max()) < 19
    assert cs.num_classes == 19


def test_bad_inputs_name_the_file_and_the_rule(tmp_path):
    root = write_scenes(tmp_path / "ade", "ade20k", {"train": 2, "val": 1}, height=24, width=24)
    ann = sorted((root / "annotations" / "training").glob("*.png"))
    # labels outside [0, 150) and not 255 (stored 200 -> 199 after the ADE shift)
    bad = np.array(Image.open(ann[0]))
    bad[0, 0] = 200
    Image.fromarray(bad).save(ann[0])
    ds = ADE20K(str(root), num_workers=0).dataset("val")
    ds_train = ADE20K(str(root), num_workers=0, crop_size=(16, 16)).dataset("train")
    with pytest.raises(SegmentationDataError, match=rf"{ann[0].name}.*\[199\].*outside \[0, 150\)"):
        ds_train[0]
    # image / mask size mismatch
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(ann[1])
    with pytest.raises(SegmentationDataError, match=rf"{ann[1].name}.*same size"):
        ds_train[1]
    assert ds[0][1].shape == (24, 24)  # the untouched validation pair still loads
    # missing annotations folder
    (root / "annotations" / "validation").rename(root / "annotations" / "val_moved")
    with pytest.raises(FileNotFoundError, match="annotations folder .*validation.* does not exist"):
        ADE20K(str(root)).dataset("val")
    # an image without its mask
    (root / "annotations" / "val_moved").rename(root / "annotations" / "validation")
    next((root / "annotations" / "validation").glob("*.png")).unlink()
    with pytest.raises(FileNotFoundError, match="has no mask"):
        ADE20K(str(root)).dataset("val")
    # generated labels are checked too: a model with fewer classes than the data is refused by the task
    assert GeneratedScenes().num_classes == 6
