"""Detection data: the generated COCO-format shapes set, COCO json validation, box-consistent transforms,
resizing of arbitrary images and the prediction set."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from zoo.data.detection import (
    SHAPE_CLASSES, AnnotationError, COCODetection, CocoDetectionDataset, DetectionTransform, ImageListDataset,
    _shape_mask, load_coco_annotations, make_shapes_dataset, render_shapes_image,
)

SPLITS = {"train": 12, "val": 6, "test": 4}


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "set", SPLITS, seed=3, min_size=64, max_size=112)


def test_generated_set_is_coco_and_exact(shapes_root):
    from PIL import Image

    ann = json.loads((shapes_root / "train" / "annotations.json").read_text())
    assert [c["name"] for c in ann["categories"]] == list(SHAPE_CLASSES)
    assert len(ann["images"]) == SPLITS["train"] and len(ann["annotations"]) > SPLITS["train"]
    sizes = {(im["width"], im["height"]) for im in ann["images"]}
    assert len(sizes) > 1 and any(w != h for w, h in sizes)  # varied, non-square sizes
    for im in ann["images"]:
        with Image.open(shapes_root / "train" / "images" / im["file_name"]) as f:
            assert f.size == (im["width"], im["height"])
        boxes = [a["bbox"] for a in ann["annotations"] if a["image_id"] == im["id"]]
        for x, y, w, h in boxes:
            assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"] and w > 0 and h > 0
        for i, a in enumerate(boxes):  # objects never overlap, so every box is the visible extent
            for b in boxes[i + 1:]:
                assert a[0] + a[2] <= b[0] or b[0] + b[2] <= a[0] or a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1]
    for a in ann["annotations"]:
        assert 0 < a["area"] <= a["bbox"][2] * a["bbox"][3] and a["iscrowd"] == 0


@pytest.mark.parametrize("kind", SHAPE_CLASSES)
def test_shape_masks_touch_their_box_on_all_sides(kind):
    mask = _shape_mask(kind, 80, 90, cx=40.3, cy=37.8, rw=21.7, rh=15.2)
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    box = mask[y0:y1, x0:x1]
    assert box[0].any() and box[-1].any() and box[:, 0].any() and box[:, -1].any()
    assert mask.sum() == box.sum()


def test_generation_is_deterministic(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", {"train": 3}, seed=7, min_size=48, max_size=64)
    b = make_shapes_dataset(tmp_path / "b", {"train": 3}, seed=7, min_size=48, max_size=64)
    c = make_shapes_dataset(tmp_path / "c", {"train": 3}, seed=8, min_size=48, max_size=64)
    ja, jb, jc = ((p / "train" / "annotations.json").read_text() for p in (a, b, c))
    assert ja.replace("/a", "") == jb.replace("/b", "") and ja != jc
    for f in sorted((a / "train" / "images").iterdir()):
        assert f.read_bytes() == (b / "train" / "images" / f.name).read_bytes()


def test_render_can_produce_empty_images():
    rng = np.random.default_rng(0)
    img, objs = render_shapes_image(rng, 50, 60, empty_prob=1.0)
    assert img.shape == (50, 60, 3) and img.dtype == np.uint8 and objs == []


def test_datamodule_batches_and_box_scaling(shapes_root):
    dm = COCODetection(train_ann=str(shapes_root / "val/annotations.json"), train_images=str(shapes_root / "val/images"),
                       val_ann=str(shapes_root / "val/annotations.json"), val_images=str(shapes_root / "val/images"),
                       image_size=80, batch_size=3, augment="none")
    assert dm.num_classes == 5 and dm.class_names == list(SHAPE_CLASSES)
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (3, 3, 80, 80) and images.dtype == torch.float32
    assert -1.0 <= images.min() and images.max() <= 1.0  # MobileDet's [-1, 1] input range
    for t in targets:
        h, w = t["orig_size"].tolist()
        scale = torch.tensor([w / 80, h / 80, w / 80, h / 80])
        assert torch.allclose(t["boxes"] * scale, t["gt_boxes"], atol=1e-3)  # resized boxes = original boxes
        assert torch.equal(t["labels"], t["gt_labels"])


def test_model_config_sets_image_size_and_normalization(shapes_root):
    dm = COCODetection(root=None, data_dir=str(shapes_root.parent), model_name="ssdlite_mobiledet_cpu")
    assert dm.image_size == 320 and dm._norm() == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_augmentations_keep_boxes_on_the_objects():
    """A red rectangle on grey: after SSD crop + flip + resize, the box still covers red pixels only."""
    torch.manual_seed(0)
    img = torch.full((3, 90, 120), 128, dtype=torch.uint8)
    img[:, 20:50, 70:110] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    box = torch.tensor([[70.0, 20.0, 110.0, 50.0]])
    tf = DetectionTransform((64, 64), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), augment="ssd")
    seen_flip = False
    for _ in range(25):
        out, boxes, labels = tf(img, box, torch.tensor([2]))
        assert out.shape == (3, 64, 64)
        if len(boxes) == 0:  # the crop may exclude the object; it is then dropped with its label
            assert len(labels) == 0
            continue
        assert labels.tolist() == [2]
        x0, y0, x1, y1 = boxes[0].round().int().tolist()
        inner = out[:, y0 + 1:y1 - 1, x0 + 1:x1 - 1]
        assert inner.numel() and inner[0].min() > 0.9 and inner[1].max() < 0.1  # red inside
        red = (out[0] > 0.9) & (out[1] < 0.1)
        ys, xs = red.nonzero(as_tuple=True)
        assert xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1  # nothing red outside
        seen_flip |= (x0 + x1) / 2 < 32
    assert seen_flip


def _write_coco(path: Path, images, annotations, categories=None) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories if categories is not None else [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]}))
    return path


def test_bad_annotations_give_clear_errors(tmp_path):
    im = [{"id": 1, "file_name": "x.png", "width": 10, "height": 10}]
    with pytest.raises(AnnotationError, match="annotation 7 .*category_id 2, .*not in 'categories'"):
        load_coco_annotations(_write_coco(tmp_path / "a.json", im, [{"id": 7, "image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1]}]))
    with pytest.raises(AnnotationError, match="image_id 5"):
        load_coco_annotations(_write_coco(tmp_path / "b.json", im, [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1]}]))
    with pytest.raises(AnnotationError, match="bbox"):
        load_coco_annotations(_write_coco(tmp_path / "c.json", im, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1]}]))
    with pytest.raises(AnnotationError, match="'images' is empty"):
        load_coco_annotations(_write_coco(tmp_path / "d.json", [], []))
    with pytest.raises(AnnotationError, match="'categories' is empty"):
        load_coco_annotations(_write_coco(tmp_path / "e.json", im, [], categories=[]))
    with pytest.raises(FileNotFoundError):
        load_coco_annotations(tmp_path / "missing.json")


def test_coco_rules_for_crowd_degenerate_and_empty(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    for name, size in (("a.png", (40, 30)), ("b.png", (20, 20))):
        Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / "img" / name)
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 2, "file_name": "b.png", "width": 20, "height": 20}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 8], "area": 60, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0},  # degenerate
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [20, 10, 15, 15], "area": 100, "iscrowd": 1},  # crowd
        {"id": 4, "image_id": 1, "category_id": 1, "bbox": [35, 25, 10, 10], "area": 25, "iscrowd": 0},  # leaves the image
    ]
    ann = _write_coco(tmp_path / "ann.json", images, anns)
    ds = CocoDetectionDataset(tmp_path / "img", ann, DetectionTransform((32, 32), (0, 0, 0), (1, 1, 1)))
    assert ds.num_classes == 2 and ds.class_names == ["a", "b"]  # contiguous labels for ids 1 and 3
    _, t = ds[0]
    assert t["gt_boxes"].shape == (4, 4) and t["iscrowd"].tolist() == [0, 0, 1, 0]  # the metric sees all of them
    assert t["gt_labels"].tolist() == [1, 0, 0, 0]
    assert t["labels"].tolist() == [1, 0]  # training: no crowd, no degenerate box; out-of-image box clipped
    assert torch.allclose(t["boxes"][1], torch.tensor([35 * 32 / 40, 25 * 32 / 30, 32.0, 32.0]))
    _, empty = ds[1]  # an image without annotations is kept, all background
    assert empty["boxes"].shape == (0, 4) and empty["gt_boxes"].shape == (0, 4)
    by_id = CocoDetectionDataset(tmp_path / "img", ann, None, label_map="category_id")
    assert by_id.num_classes == 3 and by_id.gt(0)["gt_labels"].tolist() == [2, 0, 0, 0]
    with pytest.raises(ValueError, match="label_map"):
        CocoDetectionDataset(tmp_path / "img", ann, None, label_map="names")


def test_predict_set_resizes_any_image(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((37, 91), dtype=np.uint8)).save(tmp_path / "grey.png")  # 1 channel
    Image.fromarray(np.zeros((120, 45, 4), dtype=np.uint8)).save(tmp_path / "rgba.png")  # 4 channels
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "rgb.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageListDataset(tmp_path, DetectionTransform((48, 48), (0.5,) * 3, (0.5,) * 3))
    assert [Path(f).name for f in ds.files] == ["grey.png", "rgb.jpg", "rgba.png"]
    sizes = []
    for i in range(len(ds)):
        img, meta = ds[i]
        assert img.shape == (3, 48, 48)
        sizes.append(meta["orig_size"].tolist())
    assert sizes == [[37, 91], [64, 64], [120, 45]]
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageListDataset(tmp_path / "*.bmp")


def test_missing_split_is_a_clear_error(tmp_path):
    dm = COCODetection(root=str(tmp_path / "coco"))
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        dm.val_dataloader()
    dm2 = COCODetection(train_ann=str(tmp_path / "x.json"), train_images=str(tmp_path))
    with pytest.raises(ValueError, match="no val annotations"):
        dm2.val_dataloader()
