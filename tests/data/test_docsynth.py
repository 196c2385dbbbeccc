"""DocSynth (Mesh-candidate BestFit): the layout invariants, the BestFit choice against a brute-force transcription
of the algorithm, determinism, the small-element cap, atomic writing, the COCO-pool path, `zoo docsynth` and the
DataModule."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from zoo.data import docsynth as ds


def _overlap(a, b) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


@pytest.fixture(scope="module")
def pool():
    return ds.procedural_element_pool(size=2000, seed=0)


def test_pool_split_large_small(pool):
    assert pool.categories == list(ds.DOCSTRUCTBENCH_CLASSES)
    assert all(e.w >= 0.05 and e.h >= 0.05 for e in pool.large)
    assert all((e.w < 0.05 or e.h < 0.05) and e.w >= 0.01 and e.h >= 0.01 for e in pool.small)
    assert len(pool.large) > 495 and pool.small
    tiny = ds.split_pool([ds.Element(0, 0.5, 0.5), ds.Element(0, 0.005, 0.5), ds.Element(0, 0.3, 0.02)], ["x"])
    assert len(tiny.large) == 1 and len(tiny.small) == 1  # the 0.005-wide one is dropped


@pytest.mark.parametrize("seed", range(4))
def test_layout_invariants(pool, seed):
    layout = ds.mesh_candidate_bestfit(pool, np.random.default_rng(seed))
    assert len(layout) >= 4
    assert layout[0].grid is None and layout[0].fill == 1.0
    covered = 0.0
    for i, p in enumerate(layout):
        x0, y0, x1, y1 = p.box
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1  # inside the page
        # the final shrink: each side scaled by U(0.8, 0.95) around the element's centre
        assert 0.8 - 1e-9 <= (x1 - x0) / p.element.w <= 0.95 + 1e-9
        assert 0.8 - 1e-9 <= (y1 - y0) / p.element.h <= 0.95 + 1e-9
        if p.grid is not None:  # centred in its mesh rectangle, which it fitted, with the recorded fill rate
            gx0, gy0, gx1, gy1 = p.grid
            assert abs((x0 + x1) / 2 - (gx0 + gx1) / 2) < 1e-12 and abs((y0 + y1) / 2 - (gy0 + gy1) / 2) < 1e-12
            assert p.element.w <= gx1 - gx0 + 1e-12 and p.element.h <= gy1 - gy0 + 1e-12
            assert 0 < p.fill <= 1 and p.fill == pytest.approx(p.element.w * p.element.h / ((gx1 - gx0) * (gy1 - gy0)))
        for q in layout[i + 1:]:
            assert _overlap(p.box, q.box) == 0  # no overlaps
        covered += (x1 - x0) * (y1 - y0)
    assert sum(not p.element.large for p in layout) <= 5
    # BestFit packs the page: before the shrink the elements cover most of it; fill rates are high on average
    assert covered / 0.875**2 > 0.45
    assert np.mean([p.fill for p in layout[1:]]) > 0.5


def _bestfit_bruteforce(cands, rng, max_small=5):
    """The algorithm as the reference states it, in plain loops (rectangles from all pairs of tick points, IoU == 0
    with every placed box, strict '>' over candidates then rectangles). Returns [(candidate index, pre-shrink box)]."""
    n = len(cands)
    first = int(rng.integers(n))
    e = cands[first]
    cx = rng.uniform(min(e.w / 2, 1 - e.w / 2), max(e.w / 2, 1 - e.w / 2))
    cy = rng.uniform(min(e.h / 2, 1 - e.h / 2), max(e.h / 2, 1 - e.h / 2))
    placed = [(first, (cx - e.w / 2, cy - e.h / 2, cx + e.w / 2, cy + e.h / 2))]
    left = [i for i in range(n) if i != first]
    small = int(not e.large)
    while left:
        xt = sorted({0.0, 1.0, *(b[0] for _, b in placed), *(b[2] for _, b in placed)})
        yt = sorted({0.0, 1.0, *(b[1] for _, b in placed), *(b[3] for _, b in placed)})
        grids = [(x1, y1, x2, y2) for x1, x2 in itertools.combinations(xt, 2) for y1, y2 in itertools.combinations(yt, 2)
                 if all(_overlap((x1, y1, x2, y2), b) == 0 for _, b in placed)]
        best, choice = 0.0, None
        for i in left:
            for g in grids:
                gw, gh = g[2] - g[0], g[3] - g[1]
                if cands[i].w <= gw and cands[i].h <= gh and cands[i].w * cands[i].h / (gw * gh) > best:
                    best, choice = cands[i].w * cands[i].h / (gw * gh), (i, g)
        if choice is None:
            break
        i, g = choice
        if not cands[i].large:
            small += 1
            if small > max_small:
                break
        cx, cy = (g[0] + g[2]) / 2, (g[1] + g[3]) / 2
        placed.append((i, (cx - cands[i].w / 2, cy - cands[i].h / 2, cx + cands[i].w / 2, cy + cands[i].h / 2)))
        left.remove(i)
    return placed


@pytest.mark.parametrize("seed", [0, 1])
def test_bestfit_matches_bruteforce(pool, seed):
    rng = np.random.default_rng(seed)
    cands = [pool.large[i] for i in rng.choice(len(pool.large), 16, replace=False)] + pool.small[:4]
    ours = ds.bestfit_place(cands, np.random.default_rng([seed, 1]), max_small=2, shrink=(1.0, 1.0))
    ref = _bestfit_bruteforce(cands, np.random.default_rng([seed, 1]), max_small=2)
    assert [p.element for p in ours] == [cands[i] for i, _ in ref]
    np.testing.assert_allclose([p.box for p in ours], [b for _, b in ref], atol=1e-12)


def test_small_element_cap():
    elements = [ds.Element(0, 0.3, 0.3)] * 5 + [ds.Element(1, 0.04, 0.02)] * 400
    pool = ds.split_pool(elements, ["big", "note"])
    for seed in range(3):
        layout = ds.mesh_candidate_bestfit(pool, np.random.default_rng(seed), candidate_num=100, small_fraction=0.9)
        n_small = sum(not p.element.large for p in layout)
        assert n_small == 5  # plenty of room and small candidates: the cap is what stops the loop
        n3 = sum(not p.element.large for p in ds.mesh_candidate_bestfit(
            pool, np.random.default_rng(seed), candidate_num=100, small_fraction=0.9, max_small=3))
        assert n3 == 3


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("docsynth") / "set"
    return ds.write_docsynth(root, {"train": 3, "val": 2}, seed=5, width_range=(120, 160), pool_size=800)


def test_written_dataset_is_coco_and_pages_match(written):
    from PIL import Image

    from zoo.data.detection import load_coco_annotations

    info = json.loads((written / "docsynth.json").read_text())
    assert info["stats"]["pages"] == 5 and info["categories"] == list(ds.DOCSTRUCTBENCH_CLASSES)
    ann = load_coco_annotations(written / "train" / "annotations.json")
    assert [c["id"] for c in ann["categories"]] == list(range(1, 11))
    for im in ann["images"]:
        with Image.open(written / "train" / "images" / im["file_name"]) as f:
            assert f.size == (im["width"], im["height"]) and 120 <= im["width"] <= 160
            page = np.asarray(f.convert("L"))
        boxes = [a["bbox"] for a in ann["annotations"] if a["image_id"] == im["id"]]
        assert boxes
        ink = page < 250
        inside = np.zeros_like(ink)
        for x, y, w, h in boxes:
            assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
            inside[y:y + h, x:x + w] = True
        assert not (ink & ~inside).any()  # every drawn pixel belongs to an annotated element


def test_deterministic_and_atomic(written, tmp_path):
    again = ds.write_docsynth(tmp_path / "again", {"train": 3, "val": 2}, seed=5, width_range=(120, 160), pool_size=800)
    other = ds.write_docsynth(tmp_path / "other", {"train": 3}, seed=6, width_range=(120, 160), pool_size=800)
    for split in ("train", "val"):
        assert (again / split / "annotations.json").read_bytes() == (written / split / "annotations.json").read_bytes()
    assert (again / "train/images/000002.png").read_bytes() == (written / "train/images/000002.png").read_bytes()
    assert (other / "train" / "annotations.json").read_text() != (written / "train" / "annotations.json").read_text()
    with pytest.raises(FileExistsError, match="never overwritten"):
        ds.write_docsynth(again, {"train": 1})
    assert ds.write_docsynth(again, {"train": 1}, exist_ok=True) == again  # a finished cache is reused
    # a failure half-way (an element whose source page is gone) leaves neither the folder nor a temporary one
    broken = ds.split_pool([ds.Element(0, 0.5, 0.4, (str(tmp_path / "gone.png"), (0, 0, 10, 10)))], ["x"])
    with pytest.raises(RuntimeError, match="gone.png"):
        ds.write_docsynth(tmp_path / "broken", {"train": 2}, pool=broken, width_range=(64, 64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]


def test_coco_pool_and_cli(written, tmp_path, capsys):
    from zoo.cli import main

    pool = ds.coco_element_pool(written / "train" / "annotations.json", written / "train" / "images")
    assert pool.large and pool.categories == list(ds.DOCSTRUCTBENCH_CLASSES)
    assert all(e.source is not None for e in pool.large)
    out = tmp_path / "from_pool"
    assert main(["docsynth", str(out), "--pages", "2", "--test", "1", "--width", "96,128", "--pool-ann",
                 str(written / "train" / "annotations.json"), "--pool-images", str(written / "train" / "images")]) == 0
    assert "3 pages" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["docsynth.json", "done", "test", "train"]
    assert main(["docsynth", str(out), "--pages", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["docsynth", str(tmp_path / "x"), "--categories", "plain text,comic"]) == 2
    assert "comic" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_datamodule_generates_once_and_reads_coco(tmp_path):
    from zoo.data.layout import DocSynthDetection

    kw = dict(splits={"train": 2, "val": 1}, categories=["plain text", "figure", "table"], width_range=(96, 128),
              image_size=64, batch_size=2, data_dir=str(tmp_path))
    dm = DocSynthDetection(**kw)
    dm.prepare_data()
    assert dm.num_classes == 3 and dm.class_names == ["plain text", "figure", "table"]
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 64, 64) and targets[0]["labels"].max() < 3
    assert set(dm.hparams) >= {"splits", "categories", "seed"} and "shapes" not in dm.hparams
    (root,) = list(tmp_path.iterdir())
    stamp = (root / "train" / "annotations.json").stat().st_mtime_ns
    DocSynthDetection(**kw).prepare_data()  # same options: the cache is reused
    assert (root / "train" / "annotations.json").stat().st_mtime_ns == stamp
    DocSynthDetection(**{**kw, "seed": 1}).prepare_data()
    assert len(list(tmp_path.iterdir())) == 2


def test_model_card_cpu_recipe_rows_are_the_results_file():
    """MODEL_CARD.md's DocSynth CPU-recipe table is `benchmarks/doclayout_docsynth_cpu.py --table` of the committed
    results file (the figures are measured once, by that script; nothing is typed by hand)."""
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("doclayout_docsynth_cpu", root / "benchmarks" / "doclayout_docsynth_cpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    doc = json.loads((root / "benchmarks" / "results" / "doclayout_docsynth_cpu.json").read_text())
    for k in ("map", "map_50"):  # the task's metric (torchmetrics, pycocotools backend) == COCOeval on the json
        assert doc["eval"]["coco"][k] == pytest.approx(doc["eval"]["torchmetrics"][k], abs=1.5e-4)
    assert script.table(doc) in (root / "MODEL_CARD.md").read_text()
