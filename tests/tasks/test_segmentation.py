"""SemanticSegmentation: mIoU conventions against hand-computed confusion matrices, Lovász-softmax, parameter groups,
schedule, sliding window, and a real Lightning fit / validate / test on generated scenes."""
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from zoo.tasks.segmentation import (SemanticSegmentation, lovasz_softmax, poly_warmup_factor, segmentation_scores,
                                    slide_inference)


def _confmat(preds, labels, num_classes, ignore=255):
    from torchmetrics.classification import MulticlassConfusionMatrix

    m = MulticlassConfusionMatrix(num_classes, ignore_index=ignore)
    for p, l in zip(preds, labels):  # two "images": dataset-level accumulation
        m.update(torch.tensor(p), torch.tensor(l))
    return m.compute()


def test_miou_conventions_against_hand_computed_confusion_matrix():
    # 4 classes. Class 2 never appears in labels or predictions (union 0); class 3 is predicted but never labelled.
    labels = [[[0, 0, 1, 255]], [[1, 1, 0, 0]]]
    preds = [[[0, 1, 1, 3]], [[1, 3, 0, 0]]]
    cm = _confmat(preds, labels, 4)
    # rows = label, cols = prediction; the 255 pixel is ignored
    assert cm.tolist() == [[3, 1, 0, 0], [0, 2, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    # hand: IoU0 = 3 / (4 + 3 - 3) = 3/4; IoU1 = 2 / (3 + 3 - 2) = 1/2; IoU2 = 0/0; IoU3 = 0 / (0 + 1 - 0) = 0
    mm = segmentation_scores(cm, "mmseg")
    pd = segmentation_scores(cm, "paddleseg")
    assert mm["miou"] == pytest.approx((3 / 4 + 1 / 2 + 0) / 3)  # nanmean: class 2 skipped
    assert pd["miou"] == pytest.approx((3 / 4 + 1 / 2 + 0 + 0) / 4)  # absent class counts as 0
    assert math.isnan(mm["iou"][2]) and pd["iou"][2] == 0
    assert mm["aacc"] == pd["aacc"] == pytest.approx(5 / 7)
    # mAcc (recall per class): class 0: 3/4, class 1: 2/3; classes 2 and 3 have no labelled pixel
    assert mm["macc"] == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert pd["macc"] == pytest.approx((3 / 4 + 2 / 3) / 4)
    with pytest.raises(ValueError, match="convention"):
        segmentation_scores(cm, "voc")


def _naive_lovasz(logits, labels, ignore=255):
    """The reference's per-class loop (PaddleSeg lovasz_softmax_flat, classes='present')."""
    c = logits.shape[1]
    probs = logits.softmax(1).permute(0, 2, 3, 1).reshape(-1, c)
    lab = labels.reshape(-1)
    keep = lab != ignore
    probs, lab = probs[keep], lab[keep]
    losses = []
    for k in range(c):
        fg = (lab == k).float()
        if fg.sum() == 0:
            continue
        errors = (fg - probs[:, k]).abs()
        srt, perm = errors.sort(descending=True)
        gts = fg[perm]
        inter = gts.sum() - gts.cumsum(0)
        union = gts.sum() + (1 - gts).cumsum(0)
        jac = 1 - inter / union
        jac[1:] = jac[1:] - jac[:-1].clone()
        losses.append((srt * jac).sum())
    return torch.stack(losses).mean()


def test_lovasz_softmax_matches_the_reference_loop_and_has_gradients():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (2, 6, 7), generator=g)  # class 4 absent: not averaged ('present')
    labels[0, :2] = 255
    loss = lovasz_softmax(logits, labels)
    assert loss.item() == pytest.approx(_naive_lovasz(logits.detach(), labels).item(), abs=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    perfect = F.one_hot(labels.clamp(max=3), 5).permute(0, 3, 1, 2).float() * 50
    assert lovasz_softmax(perfect, labels).item() < 1e-6
    assert lovasz_softmax(logits, torch.full_like(labels, 255)).item() == 0.0


def test_poly_schedule_with_warmup():
    f = poly_warmup_factor(total=100, lr=6e-4, warmup_steps=10, warmup_lr=1e-6, min_lr=0.0, power=1.0)
    assert f(0) * 6e-4 == pytest.approx(1e-6)
    assert f(5) * 6e-4 == pytest.approx(1e-6 + (6e-4 - 1e-6) * 0.5)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)  # halfway through the 90 decay steps
    assert f(100) == pytest.approx(0.0)


def test_slide_inference_equals_whole_image_for_a_pointwise_model():
    conv = torch.nn.Conv2d(3, 4, 1)
    x = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        out = slide_inference(conv, x, 4, crop=(16, 24), stride=(11, 13))
        assert torch.allclose(out, conv(x), atol=1e-6)
        small = slide_inference(conv, x[..., :10, :10], 4, crop=(16, 24), stride=(11, 13))  # padded, cropped back
        assert small.shape == (2, 4, 10, 10)


def test_param_groups_skip_decay_on_norms_and_pos_embed_and_scale_the_head():
    task = SemanticSegmentation("pp_mobileseg_tiny", model_args={"depths": [1, 1]}, num_classes=6, lr=1e-3,
                                weight_decay=0.01, head_lr_mult=10.0)
    groups = task.param_groups()
    names = {n: g for g in groups for n in g["param_names"]}
    assert len(names) == sum(1 for _ in task.model.parameters())
    assert names["backbone.trans1.transformer_blocks.0.attn.pos_emb_rowq.pos_embed"]["weight_decay"] == 0
    assert names["backbone.smb1.conv.norm.weight"]["weight_decay"] == 0
    assert names["backbone.smb1.conv.conv.weight"]["weight_decay"] == 0.01
    assert names["backbone.smb1.conv.conv.weight"]["lr"] == pytest.approx(1e-3)
    assert names["decode_head.conv_seg.weight"]["lr"] == pytest.approx(1e-2)
    assert names["decode_head.linear_fuse.norm.weight"]["lr"] == pytest.approx(1e-2)
    assert names["decode_head.linear_fuse.norm.weight"]["weight_decay"] == 0


def test_fit_validate_test_on_generated_scenes(tmp_path):
    """A real Lightning run: 3 updates, then validation and test with both mIoU conventions logged."""
    from zoo.data.segmentation import GeneratedScenes

    L.seed_everything(0)
    dm = GeneratedScenes(counts={"train": 6, "val": 3, "test": 2}, height=48, width=48, crop_size=(48, 48),
                         batch_size=3, eval_batch_size=2)
    task = SemanticSegmentation("pp_mobileseg_tiny", model_args={"depths": [1, 1]}, num_classes=6,
                                loss="ce_lovasz", warmup_steps=1, eval_mode="slide", slide_crop=(32, 32),
                                slide_stride=(16, 16))
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    trainer.fit(task, dm)
    assert trainer.global_step == 3
    res = trainer.test(task, dm, verbose=False)[0]
    for k in ("test/miou", "test/miou_mmseg", "test/miou_paddleseg", "test/aacc", "test/macc"):
        assert 0.0 <= res[k] <= 1.0
    assert res["test/miou_paddleseg"] <= res["test/miou_mmseg"] + 1e-6
    with pytest.raises(ValueError, match="classes"):
        L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False).fit(
            SemanticSegmentation("pp_mobileseg_tiny", model_args={"depths": [1, 1]}, num_classes=5), dm)
