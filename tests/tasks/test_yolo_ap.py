"""The ultralytics-style AP (`yolo_average_precision`) on hand-made cases, next to COCOeval on the same detections:
the two differ in how they integrate precision and in how they match detections to ground truth."""
from __future__ import annotations

import pytest
import torch

from zoo.tasks.detection import coco_evaluate, yolo_average_precision


def _both(gt_boxes, det_boxes, scores):
    gt = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": [{"id": 1, "name": "x"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                           "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": 0} for i, b in enumerate(gt_boxes)]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
            for b, s in zip(det_boxes, scores)]
    pred = [{"boxes": torch.tensor(det_boxes, dtype=torch.float32), "scores": torch.tensor(scores),
             "labels": torch.zeros(len(det_boxes), dtype=torch.long)}]
    target = [{"boxes": torch.tensor(gt_boxes, dtype=torch.float32), "labels": torch.zeros(len(gt_boxes), dtype=torch.long)}]
    return yolo_average_precision(pred, target), coco_evaluate(gt, dets)


def test_precision_integration_differs_from_coco():
    # two objects; detections in score order: hit, miss, hit -> (recall, precision) = (.5, 1), (.5, .5), (1, 2/3)
    g1, g2 = [10, 10, 30, 30], [50, 50, 80, 80]
    yolo, coco = _both([g1, g2], [g1, [0, 60, 20, 90], g2], [0.9, 0.8, 0.7])
    # envelope 1 on [0, .5), 2/3 on [.5, 1), and the appended (1, 0) point; trapezoid over 101 points:
    # 49 steps of 1, the step into .5, 49 steps of 2/3, the last step down to 0
    expected = 0.49 + (1 + 2 / 3) / 200 + 0.49 * 2 / 3 + (2 / 3) / 200
    assert yolo["map_50"] == pytest.approx(expected, abs=1e-9) and yolo["map"] == pytest.approx(expected, abs=1e-9)
    # COCOeval: the envelope sampled at recall 0, .01, ..., 1 -> 51 samples of 1 and 50 of 2/3
    assert coco["map_50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-6)


def test_matching_does_not_fall_back_to_the_second_best_ground_truth():
    # two overlapping objects; both detections overlap g1 best. COCOeval gives the lower-scored one g2 (its best
    # *unmatched* object); ultralytics keeps one detection per object by IoU and counts the other as a false positive.
    g1, g2 = [0, 0, 10, 10], [2, 0, 12, 10]
    yolo, coco = _both([g1, g2], [[0.5, 0, 10.5, 10], [0, 0, 10, 10.5]], [0.8, 0.9])
    assert coco["map_50"] == pytest.approx(1.0)
    # hit then miss -> envelope 1 up to recall .5, then the line from (.5, .5) down to (1, 0)
    assert yolo["map_50"] == pytest.approx(0.49 + (1 + 0.5) / 200 + 0.125, abs=1e-9)
    assert yolo["classes"] == [0] and yolo_average_precision([], [])["map"] == 0.0
