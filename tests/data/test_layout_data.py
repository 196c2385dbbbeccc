"""YOLO-format detection folders: labels to COCO ground truth (boxes and polygons), the data yaml, the bad-input
rules (class id out of range, coordinates outside [0, 1], empty / missing label files, undecodable images)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from zoo.data.detection import AnnotationError
from zoo.data.layout import YOLODetection, read_yolo_labels, yolo_label_path

NAMES = ["text", "figure", "table"]


def _page(path: Path, w: int, h: int, labels: str | None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 255, np.uint8)).save(path)
    if labels is not None:
        lab = yolo_label_path(path)
        lab.parent.mkdir(parents=True, exist_ok=True)
        lab.write_text(labels)


@pytest.fixture
def yolo_root(tmp_path) -> Path:
    root = tmp_path / "ds"
    _page(root / "images/train/a.png", 80, 60, "0 0.5 0.5 0.5 0.5\n2 0.1 0.2 0.3 0.2 0.3 0.6 0.1 0.6\n")
    _page(root / "images/train/b.png", 64, 64, "1 0.25 0.25 0.5 0.5\n")
    _page(root / "images/train/empty.png", 64, 64, "")
    _page(root / "images/train/nolabel.png", 64, 64, None)
    _page(root / "images/val/c.png", 64, 48, "2 0.5 0.5 1.0 1.0\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: text\n  1: figure\n"
                                    "  2: table\n")
    return root


def test_labels_become_coco_ground_truth(yolo_root):
    dm = YOLODetection(data_yaml=str(yolo_root / "data.yaml"), image_size=32, batch_size=2)
    assert dm.num_classes == 3 and dm.class_names == NAMES
    ds = dm._dataset("train")
    coco = dm.coco_ground_truth("train")
    by_name = {Path(im["file_name"]).name: im for im in coco["images"]}
    assert set(by_name) == {"a.png", "b.png", "empty.png", "nolabel.png"}  # pages without objects kept (background)
    assert dm.label_counts["train"] == {"labelled": 2, "empty": 1, "missing": 1, "skipped": 0}
    a = [x for x in coco["annotations"] if x["image_id"] == by_name["a.png"]["id"]]
    np.testing.assert_allclose(a[0]["bbox"], [20, 15, 40, 30])  # cx cy w h (0.5 0.5 0.5 0.5) on 80x60
    np.testing.assert_allclose(a[1]["bbox"], [8, 12, 16, 24])  # polygon -> its extent
    assert [x["category_id"] for x in a] == [1, 3]
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (1, 3, 32, 32) and targets[0]["labels"].tolist() == [2]
    np.testing.assert_allclose(targets[0]["gt_boxes"][0].numpy(), [0, 0, 64, 48])
    assert len(ds) == 4 and dm.hparams["data_yaml"].endswith("data.yaml") and "shapes" not in dm.hparams


def test_empty_label_policies(yolo_root):
    skip = YOLODetection(root=str(yolo_root), names=NAMES, empty_labels="skip")
    assert len(skip._dataset("train")) == 2 and skip.label_counts["train"]["skipped"] == 2
    strict = YOLODetection(root=str(yolo_root), names=NAMES, empty_labels="error")
    with pytest.raises(AnnotationError, match=r"empty\.txt: empty label file"):
        strict._dataset("train")


@pytest.mark.parametrize("line, message", [
    ("3 0.5 0.5 0.2 0.2", "class id 3 is out of range for the 3 class names"),
    ("-1 0.5 0.5 0.2 0.2", "class id -1 is out of range"),
    ("0 0.5 0.5 1.2 0.2", r"outside \[0, 1\]"),
    ("0 120 80 30 30", r"outside \[0, 1\]; YOLO labels are normalized"),
    ("0 0.5 0.5 0.2", "5 values"),
    ("zero 0.5 0.5 0.2 0.2", "is not numbers"),
])
def test_bad_label_lines_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "labels" / "p.txt"
    f.parent.mkdir()
    f.write_text(f"1 0.5 0.5 0.1 0.1\n{line}\n")
    with pytest.raises(AnnotationError, match=message) as e:
        read_yolo_labels(f, 3)
    assert f"{f}:2:" in str(e.value)


def test_undecodable_image_named(yolo_root):
    bad = yolo_root / "images/val/broken.png"
    bad.write_bytes(b"not a png at all")
    yolo_label_path(bad).write_text("0 0.5 0.5 0.2 0.2\n")
    dm = YOLODetection(root=str(yolo_root), names=NAMES)
    with pytest.raises(AnnotationError, match=r"cannot read image .*broken\.png"):
        dm._dataset("val")


def test_split_lists_and_missing_names(yolo_root):
    (yolo_root / "train.txt").write_text("images/train/a.png\n./images/train/b.png\n")
    dm = YOLODetection(root=str(yolo_root), names={0: "text", 1: "figure", 2: "table"}, train="train.txt")
    assert len(dm._dataset("train")) == 2
    with pytest.raises(ValueError, match="class names"):
        YOLODetection(root=str(yolo_root))
    (yolo_root / "gone.txt").write_text("images/train/zzz.png\n")
    with pytest.raises(FileNotFoundError, match="zzz.png"):
        YOLODetection(root=str(yolo_root), names=NAMES, train="gone.txt")._dataset("train")
