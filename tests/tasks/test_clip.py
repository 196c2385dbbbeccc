"""CLIP task: losses against open_clip's, retrieval recall, the reinforce step's DataCompDR shards and their replay,
zero-shot ImageFolder evaluation and a real Lightning fit/test."""
from __future__ import annotations

import functools
import tarfile

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.data import clip_data as cd
from zoo.tasks.clip import CLIPTask, clip_loss, distill_loss, retrieval_recall

TINY = dict(embed_dim=32, dynamic_img_size=True, image_args=dict(layers=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64)),
            text_args=dict(width=32, heads=2, layers=1, context_length=16))


def _feats(n=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, d, generator=g), dim=-1) for _ in range(4)]


def test_losses_match_open_clip():
    loss_mod = pytest.importorskip("open_clip.loss")
    img, txt, t_img, t_txt = _feats()
    scale = torch.tensor(20.0)
    assert clip_loss(img, txt, scale).item() == pytest.approx(loss_mod.ClipLoss()(img, txt, scale).item(), rel=1e-6)
    _, ref = loss_mod.DistillClipLoss()(img, txt, scale, t_img, t_txt, torch.tensor(100.0))
    assert distill_loss(img, txt, scale, t_img, t_txt, [100.0]).item() == pytest.approx(ref.item(), rel=1e-5)
    # two teachers: targets averaged after the softmax
    two = distill_loss(img, txt, scale, torch.cat([t_img, img], -1), torch.cat([t_txt, txt], -1), [100.0, 50.0])
    p = 0.5 * ((100 * t_img @ t_txt.t()).softmax(-1) + (50 * img @ txt.t()).softmax(-1))
    q = 0.5 * ((100 * t_img @ t_txt.t()).t().softmax(-1) + (50 * img @ txt.t()).t().softmax(-1))
    s = scale * img @ txt.t()
    want = 0.5 * (-(p * s.log_softmax(-1)).sum(-1).mean() - (q * s.t().log_softmax(-1)).sum(-1).mean())
    assert two.item() == pytest.approx(want.item(), rel=1e-5)


def test_local_losses_against_gathered_features_average_to_the_global_batch_loss():
    # open_clip's --local-loss --gather-with-grad (CLIPTask(gather_features=True) under DDP): each of 2 "ranks" scores
    # its 4 rows against all 8; the mean over ranks is the loss of the global batch of 8
    g = torch.Generator().manual_seed(1)
    img, txt, t_img, t_txt = (F.normalize(torch.randn(8, 12, generator=g), dim=-1) for _ in range(4))
    scale = torch.tensor(15.0)
    halves = [slice(0, 4), slice(4, 8)]
    local = [clip_loss(img[h], txt[h], scale, img, txt, offset=h.start) for h in halves]
    assert (sum(local) / 2).item() == pytest.approx(clip_loss(img, txt, scale).item(), rel=1e-6)
    local = [distill_loss(img[h], txt[h], scale, t_img[h], t_txt[h], [100.0, 50.0], img, txt, t_img, t_txt)
             for h in halves]
    want = distill_loss(img, txt, scale, t_img, t_txt, [100.0, 50.0])
    assert (sum(local) / 2).item() == pytest.approx(want.item(), rel=1e-6)
    rank_only = distill_loss(img[:4], txt[:4], scale, t_img[:4], t_txt[:4], [100.0, 50.0])
    assert rank_only.item() != pytest.approx(local[0].item())  # the gathered batch changes rank 0's loss


def test_retrieval_recall():
    img = torch.eye(4)
    txt = torch.eye(4)[[0, 1, 3, 2]]  # pairs 2 and 3 swapped
    r = retrieval_recall(img, txt, ks=(1, 2))
    assert r["i2t_r1"] == 0.5 and r["t2i_r1"] == 0.5 and r["i2t_r2"] == 1.0  # the right caption ranks second
    assert retrieval_recall(img, img)["i2t_r1"] == 1.0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    torch.manual_seed(0)
    teacher = zoo.create_model("mobileclip2_s0", **TINY).eval()
    img, lab = cd.digits_split()["train"]
    out = tmp_path_factory.mktemp("dr")
    paths = cd.reinforce([teacher, teacher], img[:24], lab[:24], out, num_augs=3, shard_size=16)
    return out, paths, teacher


def test_reinforce_writes_datacompdr_layout_and_replays(shards):
    out, paths, teacher = shards
    assert [p.name for p in paths] == ["shard-00000.tar", "shard-00001.tar"] and not list(out.glob(".*part"))
    with tarfile.open(paths[0]) as tar:
        fields = sorted(n.split(".", 1)[1] for n in tar.getnames() if n.startswith("00000000."))
    assert fields == ["json", "npz", "paug.json", "png", "syn.json", "url.txt"]
    samples = cd.read_shards(paths)
    s = samples[0]
    assert len(samples) == 24 and len(s["paug"]) == 3 and len(s["syn"]) == 5
    assert s["image_emb"].shape == (3, 64) and s["text_emb"].shape == (6, 64)  # 2 teachers x 32, GT + 5 synthetic
    ds = cd.ReinforcedDataset(samples, functools.partial(zoo.get_tokenizer("mobileclip2_s0"), context_length=16), 32)
    item = ds[0]
    with torch.no_grad():  # the replayed augmentation is the view the teacher embedded
        emb = F.normalize(teacher.encode_image(item["image"][None]), dim=-1)[0]
    assert any(torch.allclose(emb, torch.from_numpy(e[:32].astype(np.float32)), atol=3e-3) for e in s["image_emb"])
    assert set(item) == {"image", "text", "syn_text", "image_emb", "text_emb", "syn_text_emb"}
    with pytest.raises(FileExistsError):
        cd.reinforce([teacher], np.zeros((1, 8, 8), np.uint8), np.zeros(1, int), out)


def test_fit_reinforced_then_zero_shot_and_retrieval(shards, tmp_path):
    out, _, _ = shards
    torch.manual_seed(0)
    task = CLIPTask("mobileclip_s0", model_args=TINY, distill_weight=0.5, teacher_logit_scales=[100.0, 100.0],
                    warmup_steps=1)
    dm = cd.ReinforcedDataModule(str(out), model_name="mobileclip_s0", batch_size=8, context_length=16)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=1, default_root_dir=tmp_path)
    before = task.model.logit_scale.detach().clone()
    trainer.fit(task, dm)
    assert task.model.logit_scale.item() != before.item()  # trained
    res = trainer.test(task, dm, verbose=False)[0]
    assert {"test/acc", "test/acc_top5", "test/i2t_r1", "test/t2i_r10"} <= set(res)
    assert 0.0 <= res["test/acc"] <= res["test/acc_top5"] <= 1.0


def test_digits_teacher_data_augments_with_the_reinforce_steps_crops():
    img, lab = cd.digits_split()["train"]
    tok = functools.partial(zoo.get_tokenizer("mobileclip_s0"), context_length=16)
    plain = cd.DigitsCaptionsDataset(img[:2], lab[:2], tok, 32)[0]["image"]
    aug = cd.DigitsCaptionsDataset(img[:2], lab[:2], tok, 32, seed=3, augment=True)
    a, b = aug[0]["image"], aug[0]["image"]
    assert a.shape == plain.shape == (3, 32, 32) and not torch.equal(a, b)  # a new crop per access
    assert (a - plain).abs().max() > 0.05
    assert cd.DigitsCLIPDataModule(augment=True).augment


def test_zero_shot_image_folder_and_openai_metadata(tmp_path):
    from PIL import Image

    names, templates = cd.openai_imagenet_metadata()
    assert len(names) == 1000 and len(templates) == 80 and all("{}" in t for t in templates)
    for c in ("tabby_cat", "golden_retriever"):
        (tmp_path / "val" / c).mkdir(parents=True)
        Image.new("RGB", (300, 280), (120, 30, 200)).save(tmp_path / "val" / c / "a.png")
    dm = cd.ZeroShotImageFolderDataModule(str(tmp_path), "mobileclip_s0", classnames="folders",
                                          templates=["a photo of a {}."], num_workers=0)
    dm.setup()
    assert dm.classnames == ["golden retriever", "tabby cat"]
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (2, 3, 256, 256)
    with pytest.raises(ValueError, match="1000 ImageNet class folders"):
        cd.ZeroShotImageFolderDataModule(str(tmp_path), "mobileclip_s0").setup()


def test_reinforce_with_rand_augment_stores_datacompdr_form_and_replays_deterministically(shards, tmp_path):
    _, _, teacher = shards
    img, lab = cd.digits_split()["train"]
    paths = cd.reinforce([teacher], img[:4], lab[:4], tmp_path / "dr", num_augs=2, rand_augment=(2, 9))
    samples = cd.read_shards(paths)
    aug = samples[0]["paug"][0]
    # DataCompDR's compressed form: [random_resized_crop box, [[op index, signed magnitude] x 2]]
    assert len(aug) == 2 and len(aug[0]) == 4 and len(aug[1]) == 2
    assert all(0 <= i < len(cd.RAND_AUGMENT_OPS) for i, _ in aug[1])
    ds = cd.ReinforcedDataset(samples, functools.partial(zoo.get_tokenizer("mobileclip2_s0"), context_length=16), 32)
    px = ds.pixels[0]
    a, b = cd.replay_augmentation(px, aug, 32), cd.replay_augmentation(px, aug, 32)
    assert torch.equal(a, b)  # replay is deterministic
    with torch.no_grad():  # and it is the view the teacher embedded
        emb = F.normalize(teacher.encode_image(a[None]), dim=-1)[0]
    assert torch.allclose(emb, torch.from_numpy(samples[0]["image_emb"][0].astype(np.float32)), atol=3e-3)
    crop_only = cd.replay_augmentation(px, aug[0], 32)
    identity = cd.replay_augmentation(px, [aug[0], [[0, 0.0]]], 32)  # op 0 = Identity: only the uint8 rounding
    assert (identity - crop_only).abs().max() <= 0.5 / 255 + 1e-6
    rotated = cd.replay_augmentation(px, [aug[0], [[cd.RAND_AUGMENT_OPS.index("Rotate"), 30.0]]], 32)
    assert (rotated - identity).abs().max() > 0.1
    with pytest.raises(ValueError, match="op index"):
        cd.replay_augmentation(px, [aug[0], [[14, 1.0]]], 32)
    with pytest.raises(ValueError, match="crop box"):
        cd.replay_augmentation(px, [[0, 0, 8]], 32)
    # DataCompDR keeps param_aug as a JSON string of the K augmentations: read_shards decodes it
    import io
    import json

    path = tmp_path / "str.tar"
    with tarfile.open(path, "w") as tar:
        for field, data in (("paug.json", json.dumps({"param_aug": json.dumps(samples[0]["paug"])}).encode()),
                            ("syn.json", json.dumps({"syn_text": ["x"]}).encode()), ("json", b'{"caption": "y"}'),
                            ("npz", (lambda b: (np.savez(b, image_emb=np.zeros((2, 4)), text_emb=np.zeros((2, 4))),
                                                b.getvalue())[1])(io.BytesIO()))):
            info = tarfile.TarInfo(f"00000000.{field}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert cd.read_shards([path])[0]["paug"] == samples[0]["paug"]


def test_datacompdr12m_layout_joins_images_from_a_separate_store(tmp_path):
    """The real DataCompDR-12M layout: shards with url.txt / syn.json / paug.json / npz / json and no pixels; the
    images and GT captions come from an img2dataset-style store, joined by key, uid or url (or a url mirror)."""
    import hashlib
    import io
    import json
    import random

    from PIL import Image

    shards, images = cd.write_datacompdr_toy(tmp_path / "t", n=6, shard_size=3)
    with tarfile.open(sorted(shards.glob("*.tar"))[0]) as tar:
        assert {n.split(".", 1)[1] for n in tar.getnames()} == {"url.txt", "syn.json", "paug.json", "npz", "json"}
    tok = functools.partial(zoo.get_tokenizer("mobileclip_b"), context_length=16)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ds = cd.DataCompDRDataset(shards, cd.ImageStore(images, join="key"), tok, 24, mean, std, shuffle_buffer=2)
    items = list(ds)
    assert len(items) == 6 and items[0]["image"].shape == (3, 24, 24) and items[0]["image_emb"].shape == (16,)
    # each item is a stored augmentation of its own image from the store, replayed with the bicubic resize
    key, fields = next(cd.iter_tar_samples(sorted(shards.glob("*.tar"))[0]))
    store = cd.ImageStore(images, join="uid")
    raw, caption = store.get(key, json.loads(fields["json"])["uid"], fields["url.txt"].decode())
    assert caption == "a photo of random noise number 0"
    assert hashlib.sha256(raw).hexdigest() == json.loads(fields["json"])["sha256"]
    item = ds.decode(key, fields, random.Random(0))
    npz = np.load(io.BytesIO(fields["npz"]))
    a = next(i for i, e in enumerate(npz["image_emb"]) if torch.equal(item["image_emb"], torch.from_numpy(e.astype(np.float32))))
    x = torch.from_numpy(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    paug = json.loads(json.loads(fields["paug.json"])["param_aug"])
    want = (cd.replay_augmentation(x, paug[a], 24, "bicubic") - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(item["image"], want)
    assert torch.equal(item["text"], tok(caption)[0])
    # the crop resize is PIL's bicubic (as DataCompDR's random_resized_crop on PIL images), not bilinear
    (t, l, h, w), _ = cd.decode_augmentation(paug[a])
    pil = Image.open(io.BytesIO(raw)).convert("RGB").crop((l, t, l + w, t + h)).resize((24, 24), Image.BICUBIC)
    pil = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255
    ours, bilinear = cd.replay_augmentation(x, [[t, l, h, w], None], 24, "bicubic"), cd.replay_augmentation(x, [t, l, h, w], 24)
    assert (ours - pil).abs().mean() < 0.01 < (bilinear - pil).abs().mean()
    # the other store forms give the same samples
    for store_kind, make in (("files", lambda d: cd.ImageStore(d, join="uid")),
                             ("mirror", lambda d: cd.ImageStore(url_mirror=d))):
        s2, im2 = cd.write_datacompdr_toy(tmp_path / store_kind, n=6, shard_size=3, store=store_kind)
        got = list(cd.DataCompDRDataset(s2, make(im2), tok, 24, shuffle_buffer=1))
        assert len(got) == 6
    # a missing image names the sample key and the store
    first = sorted((tmp_path / "files" / "images").rglob("000000004.jpg"))[0]
    first.unlink()
    with pytest.raises(FileNotFoundError, match=r"sample 000000004 .*uid"):
        list(cd.DataCompDRDataset(tmp_path / "files" / "shards", cd.ImageStore(tmp_path / "files" / "images", join="uid"), tok, 24))
    with pytest.warns(UserWarning, match="1 DataCompDR sample.* skipped .*000000004"):
        kept = list(cd.DataCompDRDataset(tmp_path / "files" / "shards", cd.ImageStore(tmp_path / "files" / "images",
                                                                                     join="uid"), tok, 24, on_missing="skip"))
    assert len(kept) == 5
    (tmp_path / "mirror" / "images" / "img1.example.com" / "p" / "1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"sample 000000001: its url 'https://img1.example.com/p/1.jpg'"):
        list(cd.DataCompDRDataset(tmp_path / "mirror" / "shards", cd.ImageStore(url_mirror=tmp_path / "mirror" / "images"), tok, 24))
    # a different image (sha256) and a resized copy (crop box outside) are refused, naming the sample
    p = tmp_path / "mirror" / "images" / "img0.example.com" / "p" / "0.jpg"
    Image.open(p).resize((20, 16)).save(p)
    with pytest.raises(ValueError, match="sample 000000000: the image's sha256"):
        ds3 = cd.DataCompDRDataset(tmp_path / "mirror" / "shards", cd.ImageStore(url_mirror=tmp_path / "mirror" / "images"),
                                   tok, 24, verify_sha256=True)
        ds3.decode(*next(cd.iter_tar_samples(sorted((tmp_path / "mirror" / "shards").glob("*.tar"))[0])), random.Random(0))
    ds3.verify = False
    with pytest.raises(ValueError, match="sample 000000000: stored crop box .* does not fit its image of 16x20"):
        ds3.decode(*next(cd.iter_tar_samples(sorted((tmp_path / "mirror" / "shards").glob("*.tar"))[0])), random.Random(0))
    with pytest.raises(ValueError, match="exactly one of root"):
        cd.ImageStore()
