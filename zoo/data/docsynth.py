"""DocSynth: document pages synthesized by the Mesh-candidate BestFit algorithm (DocLayout-YOLO, arXiv 2410.12628).

The algorithm (:func:`mesh_candidate_bestfit`) fills a page with layout elements taken from an element pool:

1. the pool is split into *large* elements (``w >= 0.05`` and ``h >= 0.05`` of the page) and *small* ones; elements
   under 0.01 of the page in either direction are dropped;
2. per page, 500 candidates are sampled, 99 % large and 1 % small;
3. one random candidate is put at a uniformly random position fully inside the page;
4. loop: the *mesh* is every rectangle whose corners are tick points (the x / y ticks are 0, 1 and every placed box
   edge) and that overlaps no placed box; over all (candidate, mesh rectangle) pairs where the candidate fits, the
   pair with the highest fill rate (element area / rectangle area) wins and the element goes to the centre of its
   rectangle. The loop stops when nothing fits or when placing a sixth small element would be needed (so at most
   five small elements per page);
5. every placed element's width and height are then each scaled by U(0.8, 0.95) around its centre.

Pages are rendered by pasting each element into its box (stretched, as the reference's PyMuPDF
``insert_image(keep_proportion=False)``) on a white page whose size is sampled as the reference does (width
1200-2000 px, height / width 0.7-1.5, at most 3000 px high; both ranges are options).

The element pool comes from a COCO-format layout dataset (:func:`coco_element_pool`: crops of its annotated
instances) or, by default, from procedurally drawn elements (:func:`procedural_element_pool`: the ten DocStructBench
classes drawn with Pillow: titles, paragraphs, page headers/footers ("abandon"), figures (charts, plots, photo-like
fields), tables, captions, table footnotes and display formulas), so the default needs no download.

:func:`write_docsynth` writes a COCO-format dataset (``root/<split>/images/*.png``, ``root/<split>/annotations.json``)
atomically; ``zoo docsynth`` is its command line and :class:`DocSynthDetection` the DataModule that generates it
once into a cache and reads it through the COCO code.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

DOCSYNTH_VERSION = 1
# DocStructBench's classes (the released DocLayout-YOLO general model's head), the default pool's categories
DOCSTRUCTBENCH_CLASSES = ("title", "plain text", "abandon", "figure", "figure_caption", "table", "table_caption",
                          "table_footnote", "isolate_formula", "formula_caption")
MIN_SIZE, LARGE_SIZE = 0.01, 0.05  # of the page: dropped below MIN_SIZE; large when both sides >= LARGE_SIZE

# procedural element sizes (fraction of page width, of page height) and text size (fraction of page width)
_SIZES = {
    "title": ((0.25, 0.8), (0.03, 0.09), (0.022, 0.032)),
    "plain text": ((0.3, 0.95), (0.05, 0.35), (0.011, 0.015)),
    "abandon": ((0.05, 0.6), (0.012, 0.03), (0.009, 0.012)),
    "figure": ((0.2, 0.9), (0.1, 0.45), (0.01, 0.012)),
    "figure_caption": ((0.2, 0.85), (0.02, 0.07), (0.01, 0.013)),
    "table": ((0.3, 0.95), (0.1, 0.45), (0.009, 0.012)),
    "table_caption": ((0.2, 0.85), (0.02, 0.06), (0.01, 0.013)),
    "table_footnote": ((0.2, 0.85), (0.02, 0.07), (0.008, 0.011)),
    "isolate_formula": ((0.15, 0.6), (0.04, 0.12), (0.016, 0.022)),
    "formula_caption": ((0.03, 0.07), (0.02, 0.04), (0.012, 0.016)),
}


@dataclass(frozen=True)
class Element:
    """One pool element: its category (index into the pool's category list), its size as a fraction of the page,
    and where its pixels come from (``source`` = (image path, (x0, y0, x1, y1)) for a crop of a real page; ``None``
    for a procedurally drawn element)."""

    category: int
    w: float
    h: float
    source: tuple[str, tuple[float, float, float, float]] | None = None

    @property
    def large(self) -> bool:
        return self.w >= LARGE_SIZE and self.h >= LARGE_SIZE


@dataclass
class ElementPool:
    categories: list[str]
    large: list[Element]
    small: list[Element]


def split_pool(elements: Sequence[Element], categories: Sequence[str]) -> ElementPool:
    """Drop elements under 1 % of the page in either direction; split the rest into large and small."""
    keep = [e for e in elements if e.w >= MIN_SIZE and e.h >= MIN_SIZE and e.w <= 1 and e.h <= 1]
    pool = ElementPool(list(categories), [e for e in keep if e.large], [e for e in keep if not e.large])
    if not pool.large:
        raise ValueError("the element pool has no large elements (w and h >= 5 % of the page); BestFit needs them")
    return pool


def procedural_element_pool(size: int = 4000, seed: int = 0, categories: Sequence[str] | None = None) -> ElementPool:
    """``size`` procedurally drawn elements spread evenly over ``categories`` (default: all ten DocStructBench
    classes), with per-class sizes of typical pages."""
    categories = list(categories or DOCSTRUCTBENCH_CLASSES)
    unknown = [c for c in categories if c not in _SIZES]
    if unknown:
        raise ValueError(f"no procedural drawing for categories {unknown}; known: {list(_SIZES)}")
    rng = np.random.default_rng([seed, DOCSYNTH_VERSION, 1])
    elements = []
    for i in range(size):
        c = i % len(categories)
        (w0, w1), (h0, h1), _ = _SIZES[categories[c]]
        elements.append(Element(c, float(rng.uniform(w0, w1)), float(rng.uniform(h0, h1))))
    return split_pool(elements, categories)


def coco_element_pool(ann_file: str | os.PathLike, images_dir: str | os.PathLike) -> ElementPool:
    """Every instance of a COCO-format layout dataset as an element (crop of its page), sized relative to its page."""
    from zoo.data.detection import load_coco_annotations

    data = load_coco_annotations(ann_file)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(cats)}
    images = {im["id"]: im for im in data["images"]}
    elements = []
    for a in data["annotations"]:
        if a.get("iscrowd", 0):
            continue
        im = images[a["image_id"]]
        W, H = float(im.get("width") or 0), float(im.get("height") or 0)
        if W <= 0 or H <= 0:
            raise ValueError(f"{ann_file}: image {im['id']} has no width/height; the pool needs page sizes")
        x, y, w, h = a["bbox"]
        path = str(Path(images_dir) / im["file_name"])
        elements.append(Element(index[a["category_id"]], w / W, h / H, (path, (x, y, x + w, y + h))))
    return split_pool(elements, [c.get("name", str(c["id"])) for c in cats])


# ----------------------------------------------------------------------------------------- Mesh-candidate BestFit


@dataclass
class Placement:
    element: Element
    box: tuple[float, float, float, float]  # final xyxy in [0, 1] page coordinates (after the shrink)
    grid: tuple[float, float, float, float] | None  # the mesh rectangle it was centred in (None: the first one)
    fill: float  # element area / grid area when placed (1.0 for the first one)


def _mesh(placed: np.ndarray, min_w: float = 0.0, min_h: float = 0.0) -> np.ndarray:
    """The free mesh rectangles: xyxy (G, 4) of all tick-point rectangles overlapping no placed box, ordered by
    (x1, x2, y1, y2); those narrower than ``min_w`` or lower than ``min_h`` (nothing fits) are left out."""
    xt = np.unique(np.concatenate([[0.0, 1.0], placed[:, 0], placed[:, 2]]))
    yt = np.unique(np.concatenate([[0.0, 1.0], placed[:, 1], placed[:, 3]]))
    xi, xj = np.triu_indices(len(xt), 1)
    yi, yj = np.triu_indices(len(yt), 1)
    kx, ky = xt[xj] - xt[xi] >= min_w, yt[yj] - yt[yi] >= min_h
    x1, x2, y1, y2 = xt[xi[kx]], xt[xj[kx]], yt[yi[ky]], yt[yj[ky]]
    # IoU == 0 <=> the intersection has no area <=> the x or the y intervals do not overlap (open intervals)
    ox = (x1[:, None] < placed[None, :, 2]) & (placed[None, :, 0] < x2[:, None])  # (Px, n)
    oy = (y1[:, None] < placed[None, :, 3]) & (placed[None, :, 1] < y2[:, None])  # (Py, n)
    free = (ox.astype(np.float32) @ oy.astype(np.float32).T) == 0  # (Px, Py): no box overlaps in both
    px, py = np.nonzero(free)
    return np.stack([x1[px], y1[py], x2[px], y2[py]], 1)


def mesh_candidate_bestfit(pool: ElementPool, rng: np.random.Generator, candidate_num: int = 500,
                           small_fraction: float = 0.01, max_small: int = 5,
                           shrink: tuple[float, float] = (0.8, 0.95)) -> list[Placement]:
    """One layout. Candidates are sampled without replacement when the pool is big enough (else with). Ties in
    fill rate go to the earliest candidate, then the earliest mesh rectangle, as the reference's nested loops."""
    n_large, n_small = int(candidate_num * (1 - small_fraction)), int(candidate_num * small_fraction)
    cands: list[Element] = []
    for group, n in ((pool.large, n_large), (pool.small, n_small)):
        if group and n:
            cands += [group[i] for i in rng.choice(len(group), n, replace=len(group) < n)]
    return bestfit_place(cands, rng, max_small, shrink)


def bestfit_place(cands: Sequence[Element], rng: np.random.Generator, max_small: int = 5,
                  shrink: tuple[float, float] = (0.8, 0.95)) -> list[Placement]:
    """Steps 3-5 of the algorithm on a given candidate list (see the module docstring)."""
    cw = np.array([e.w for e in cands])
    ch = np.array([e.h for e in cands])
    small = np.array([not e.large for e in cands])
    alive = np.ones(len(cands), dtype=bool)

    first = int(rng.integers(len(cands)))
    e0 = cands[first]
    cx = rng.uniform(min(e0.w / 2, 1 - e0.w / 2), max(e0.w / 2, 1 - e0.w / 2))
    cy = rng.uniform(min(e0.h / 2, 1 - e0.h / 2), max(e0.h / 2, 1 - e0.h / 2))
    placed = [(first, (cx - e0.w / 2, cy - e0.h / 2, cx + e0.w / 2, cy + e0.h / 2), None, 1.0)]
    alive[first] = False
    small_count = int(small[first])
    while alive.any():
        idx = np.nonzero(alive)[0]
        grids = _mesh(np.array([p[1] for p in placed]), cw[idx].min(), ch[idx].min())
        if not len(grids):
            break
        gw, gh = grids[:, 2] - grids[:, 0], grids[:, 3] - grids[:, 1]
        # the fill rate depends on the rectangle's size only: score each size once (its first rectangle, so ties
        # still go to the earliest)
        _, first_of = np.unique(np.stack([gw, gh], 1), axis=0, return_index=True)
        keep = np.sort(first_of)
        grids, gw, gh = grids[keep], gw[keep], gh[keep]
        fits = (cw[idx, None] <= gw[None]) & (ch[idx, None] <= gh[None])
        fill = np.where(fits, (cw[idx] * ch[idx])[:, None] / (gw * gh)[None], 0.0)
        k = int(np.argmax(fill))  # first maximum in (candidate, grid) order
        best = fill.flat[k]
        if best <= 0:
            break
        e, g = int(idx[k // len(grids)]), k % len(grids)
        if small[e]:
            small_count += 1
            if small_count > max_small:
                break
        gx1, gy1, gx2, gy2 = grids[g]
        cx, cy = (gx1 + gx2) / 2, (gy1 + gy2) / 2
        placed.append((e, (cx - cw[e] / 2, cy - ch[e] / 2, cx + cw[e] / 2, cy + ch[e] / 2), tuple(grids[g].tolist()),
                       float(best)))
        alive[e] = False
    out = []
    for e, (x1, y1, x2, y2), grid, fill in placed:
        sw, sh = rng.uniform(*shrink), rng.uniform(*shrink)
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * sw, (y2 - y1) * sh
        out.append(Placement(cands[e], (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), grid, fill))
    return out


# ---------------------------------------------------------------------------------------------------- rendering

_FONTS: dict[int, Any] = {}
_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyzeeeaaoottnnssrrhhiill"))


def _font(size: int):
    from PIL import ImageFont

    size = max(4, int(size))
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]


def _words(rng: np.random.Generator, n: int, capital: bool = False) -> str:
    lens = rng.integers(1, 10, n)
    words = ["".join(rng.choice(_LETTERS, k)) for k in lens]
    if capital and words:
        words[0] = words[0].capitalize()
    return " ".join(words)


def _text_block(draw, rng, w: int, h: int, font_px: float, ink: int, bold: bool = False, justify: bool = True,
                prefix: str = "", centred: bool = False) -> None:
    """Lines of random words filling (w, h): first line at the top, last line at the bottom, lines running to the
    right edge (the element image clips them) except a ragged last line."""
    font_px = max(4.0, font_px)
    pitch = font_px * 1.35
    n = max(1, int(round(h / pitch)))
    pitch = h / n
    size = max(4, int(min(font_px, pitch * 0.85)))
    font = _font(size)
    chars = max(2, int(w / (font.getlength("etaoin shrdlu cmfwyp") / 20)) + 1)  # enough to reach the right edge
    for i in range(n):
        last = i == n - 1 and n > 1
        k = chars if (justify and not last) else max(2, int(chars * rng.uniform(0.3, 0.9)))
        text = (prefix if i == 0 else "") + _words(rng, max(1, k // 5 + 1), capital=i == 0)
        text = text[:k]
        y = i * pitch + (pitch - size) / 2 - size * 0.15
        x = 0
        if centred:
            x = max(0, (w - font.getlength(text)) / 2)
        draw.text((x, y), text, fill=ink, font=font, stroke_width=1 if bold and size >= 10 else 0, stroke_fill=ink)


def _figure(img, draw, rng, w: int, h: int) -> None:
    from PIL import Image

    kind = rng.integers(3)
    if kind == 0:  # photo-like field: a coarse random colour grid, bilinearly enlarged
        gh, gw = (int(v) for v in rng.integers(2, 9, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (gh, gw, 3), dtype=np.uint8))
        img.paste(coarse.resize((w, h), Image.BILINEAR), (0, 0))
        return
    # charts: axes, then bars or lines, light frame
    draw.rectangle([0, 0, w - 1, h - 1], outline=(90, 90, 90), width=max(1, w // 200))
    m = max(3, int(min(w, h) * 0.1))
    draw.line([(m, m // 2), (m, h - m), (w - m // 2, h - m)], fill=(20, 20, 20), width=max(1, w // 150))
    n = int(rng.integers(3, 12))
    colours = [tuple(int(v) for v in rng.uniform(0, 220, 3)) for _ in range(3)]
    if kind == 1:
        bw = (w - 1.5 * m) / n
        for i in range(n):
            top = rng.uniform(m, h - m - 2)
            draw.rectangle([m + i * bw + bw * 0.15, top, m + (i + 1) * bw - bw * 0.15, h - m], fill=colours[i % 2])
    else:
        for c in colours[: int(rng.integers(1, 4))]:
            ys = h - m - np.cumsum(rng.normal(0, 1, n)) * (h - 2 * m) / 8 - (h - 2 * m) / 2
            xs = np.linspace(m, w - m / 2, n)
            draw.line(list(zip(xs.tolist(), np.clip(ys, m / 2, h - m).tolist())), fill=c, width=max(1, w // 120))


def _table(draw, rng, w: int, h: int, font_px: float) -> None:
    rows, cols = int(rng.integers(3, 12)), int(rng.integers(2, 8))
    lw = max(1, int(round(w / 300)))
    ink = (20, 20, 20)
    full_grid = rng.random() < 0.5
    rh, cw = h / rows, w / cols
    size = max(4, int(min(font_px, rh * 0.6)))
    font = _font(size)
    if rng.random() < 0.3:  # shaded header row
        draw.rectangle([0, 0, w, rh], fill=(225, 225, 225))
    for r in range(rows):
        for c in range(cols):
            s = _words(rng, 1) if c == 0 else f"{rng.uniform(0, 100):.{int(rng.integers(0, 3))}f}"
            draw.text((c * cw + cw * 0.1, r * rh + (rh - size) / 2), s[: max(1, int(cw / (size * 0.55)))],
                      fill=ink, font=font)
    if full_grid:
        for r in range(rows + 1):
            y = min(h - lw, r * rh)
            draw.line([(0, y), (w, y)], fill=ink, width=lw)
        for c in range(cols + 1):
            x = min(w - lw, c * cw)
            draw.line([(x, 0), (x, h)], fill=ink, width=lw)
    else:  # three-line (booktabs) table
        for y in (0, rh, h - lw):
            draw.line([(0, y), (w, y)], fill=ink, width=lw + 1)


def _formula(draw, rng, w: int, h: int, font_px: float) -> None:
    ink = (10, 10, 10)
    size = max(4, int(min(font_px, h * 0.35)))
    font = _font(size)
    syms = ["=", "+", "-", "(", ")", "x", "y", "z", "a", "b", "n", "i", "k", "2", "f", "g", "sin", "log", "exp"]
    left = " ".join(rng.choice(syms, int(rng.integers(2, 5))))
    draw.text((0, (h - size) / 2), left + " =", fill=ink, font=font)
    x0 = font.getlength(left + " = ") + size * 0.3
    # a fraction filling the rest: numerator, bar, denominator
    num = " ".join(rng.choice(syms, int(rng.integers(3, 9))))
    den = " ".join(rng.choice(syms, int(rng.integers(2, 7))))
    draw.text((x0, 0), num, fill=ink, font=font)
    draw.line([(x0, h / 2), (w, h / 2)], fill=ink, width=max(1, size // 10))
    draw.text((x0, h - size * 1.2), den, fill=ink, font=font)


def render_element(element: Element, name: str, w: int, h: int, page_w: int, rng: np.random.Generator):
    """The element's pixels at (w, h): a crop of its source page (stretched), or a procedural drawing."""
    from PIL import Image, ImageDraw

    if element.source is not None:
        path, (x0, y0, x1, y1) = element.source
        try:
            with Image.open(path) as src:
                crop = src.convert("RGB").crop((int(x0), int(y0), int(math.ceil(x1)), int(math.ceil(y1))))
        except OSError as e:
            raise RuntimeError(f"cannot read element source image {path}: {e}") from e
        return crop.resize((w, h), Image.BILINEAR)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    lo, hi = _SIZES[name][2] if name in _SIZES else (0.011, 0.015)
    font_px = page_w * rng.uniform(lo, hi)
    grey = int(rng.integers(0, 70))
    ink = (grey, grey, grey)
    if name == "figure":
        _figure(img, draw, rng, w, h)
    elif name == "table":
        _table(draw, rng, w, h, font_px)
    elif name == "isolate_formula":
        _formula(draw, rng, w, h, font_px)
    elif name == "title":
        _text_block(draw, rng, w, h, font_px, ink, bold=True, justify=False, centred=rng.random() < 0.3)
    elif name in ("figure_caption", "table_caption"):
        pre = "Figure " if name == "figure_caption" else "Table "
        _text_block(draw, rng, w, h, font_px, ink, prefix=f"{pre}{int(rng.integers(1, 20))}: ")
    elif name == "formula_caption":
        _text_block(draw, rng, w, h, font_px, ink, justify=False, prefix=f"({int(rng.integers(1, 40))})")
    elif name == "abandon":
        _text_block(draw, rng, w, h, font_px, (110, 110, 110), justify=False)
    else:  # plain text, table_footnote and any other text class
        _text_block(draw, rng, w, h, font_px, ink)
    return img


def sample_page_size(rng: np.random.Generator, width_range=(1200, 2000), ratio_range=(0.7, 1.5),
                     max_height: int = 3000) -> tuple[int, int]:
    """(width, height) as the reference renderer samples it: width uniform, height = width * uniform ratio."""
    w = int(rng.integers(int(width_range[0]), int(width_range[1]) + 1))
    h = min(int(max_height), int(round(w * rng.uniform(*ratio_range))))
    return w, h


def render_page(layout: Sequence[Placement], categories: Sequence[str], size: tuple[int, int],
                rng: np.random.Generator):
    """Paste every element into its box on a white page. Returns the PIL image and the objects (``bbox`` [x, y, w,
    h] in pixels, integer-aligned to the pasted pixels, and ``label``)."""
    from PIL import Image

    W, H = size
    page = Image.new("RGB", (W, H), (255, 255, 255))
    objects = []
    for p in layout:
        x0, y0 = int(round(p.box[0] * W)), int(round(p.box[1] * H))
        x1, y1 = int(round(p.box[2] * W)), int(round(p.box[3] * H))
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue  # under 2 pixels at this page size: not drawn, not annotated
        page.paste(render_element(p.element, categories[p.element.category], x1 - x0, y1 - y0, W, rng), (x0, y0))
        objects.append({"bbox": [x0, y0, x1 - x0, y1 - y0], "label": p.element.category})
    return page, objects


# -------------------------------------------------------------------------------------------------- dataset files


def docsynth_options_tag(opts: dict[str, Any]) -> str:
    return json.dumps(opts, sort_keys=True, default=str)


def write_docsynth(
    root: str | os.PathLike,
    splits: dict[str, int] | None = None,
    seed: int = 0,
    pool: ElementPool | None = None,
    categories: Sequence[str] | None = None,
    pool_size: int = 4000,
    width_range: Sequence[int] = (1200, 2000),
    ratio_range: Sequence[float] = (0.7, 1.5),
    max_height: int = 3000,
    candidate_num: int = 500,
    small_fraction: float = 0.01,
    max_small: int = 5,
    shrink: Sequence[float] = (0.8, 0.95),
    image_format: str = "png",
    exist_ok: bool = False,
    progress: bool = False,
) -> Path:
    """Write a COCO-format DocSynth dataset: ``root/<split>/images/*.<format>`` and ``root/<split>/annotations.json``
    (category ids 1..K in the pool's category order), plus ``root/docsynth.json`` with the options. Deterministic
    in ``seed`` (each page has its own random stream, so a split's pages do not depend on the other splits).

    Written into a temporary sibling folder and renamed into place at the end, so ``root`` is either complete or
    absent. An existing complete ``root`` is returned as is with ``exist_ok`` (a cache), else it is an error."""
    from PIL import Image

    root = Path(root)
    splits = dict(splits or {"train": 1000, "val": 100, "test": 100})
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if (root / "done").exists() and exist_ok:
        return root
    if root.exists():
        raise FileExistsError(f"{root} already exists; choose a new folder (datasets are never overwritten)")
    pool = pool or procedural_element_pool(pool_size, seed, categories)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cats = [{"id": i + 1, "name": n, "supercategory": "layout"} for i, n in enumerate(pool.categories)]
    stats = {"pages": 0, "objects": 0, "small": 0}
    try:
        for split_idx, (split, count) in enumerate(splits.items()):
            (tmp / split / "images").mkdir(parents=True)
            images, annotations = [], []
            for i in range(int(count)):
                rng = np.random.default_rng([seed, split_idx, i, DOCSYNTH_VERSION])
                layout = mesh_candidate_bestfit(pool, rng, candidate_num, small_fraction, max_small, tuple(shrink))
                size = sample_page_size(rng, width_range, ratio_range, max_height)
                page, objs = render_page(layout, pool.categories, size, rng)
                name = f"{i:06d}.{image_format}"
                page.save(tmp / split / "images" / name, **({"quality": 92} if image_format == "jpg" else {}))
                images.append({"id": i + 1, "file_name": name, "width": size[0], "height": size[1]})
                for o in objs:
                    x, y, w, h = o["bbox"]
                    annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": o["label"] + 1,
                                        "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
                stats["pages"] += 1
                stats["objects"] += len(objs)
                stats["small"] += sum(not p.element.large for p in layout)
                if progress and (i + 1) % 100 == 0:
                    print(f"docsynth: {split} {i + 1}/{count}", file=sys.stderr, flush=True)
            ann = {"info": {"description": f"zoo DocSynth v{DOCSYNTH_VERSION} (Mesh-candidate BestFit), seed {seed}, "
                                           f"split {split}"},
                   "images": images, "annotations": annotations, "categories": cats}
            (tmp / split / "annotations.json").write_text(json.dumps(ann))
        (tmp / "docsynth.json").write_text(json.dumps({
            "version": DOCSYNTH_VERSION, "seed": seed, "splits": splits, "categories": pool.categories,
            "pool": {"large": len(pool.large), "small": len(pool.small)}, "width_range": list(width_range),
            "ratio_range": list(ratio_range), "max_height": max_height, "candidate_num": candidate_num,
            "small_fraction": small_fraction, "max_small": max_small, "shrink": list(shrink), "stats": stats,
        }, indent=1))
        (tmp / "done").write_text("ok\n")
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished the same cache first
            if not (exist_ok and (root / "done").exists()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _parse_pair(text: str, kind=float) -> tuple:
    parts = text.replace(",", " ").split()
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers 'LO,HI', got {text!r}")
    return tuple(kind(p) for p in parts)


def main(argv: list[str] | None = None) -> int:
    """``zoo docsynth OUT --pages N``: write a DocSynth COCO-format dataset."""
    p = argparse.ArgumentParser(
        prog="zoo docsynth",
        description="Synthesize document pages with Mesh-candidate BestFit (DocLayout-YOLO) and write them as a "
                    "COCO-format dataset: OUT/<split>/images/*.png + OUT/<split>/annotations.json. Elements come "
                    "from --pool-ann/--pool-images (any COCO-format layout set) or, by default, are drawn "
                    "procedurally (the ten DocStructBench classes).")
    p.add_argument("out", help="output folder (must not exist; written atomically)")
    p.add_argument("--pages", type=int, default=1000, help="training pages (default 1000)")
    p.add_argument("--val", type=int, default=0, help="validation pages (default 0)")
    p.add_argument("--test", type=int, default=0, help="test pages (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool-ann", help="COCO instances json of a layout dataset to take the elements from")
    p.add_argument("--pool-images", help="its images folder (with --pool-ann)")
    p.add_argument("--categories", help="comma-separated subset of the procedural classes "
                                        f"({', '.join(DOCSTRUCTBENCH_CLASSES)})")
    p.add_argument("--width", type=lambda s: _parse_pair(s, int), default=(1200, 2000), metavar="LO,HI",
                   help="page width range in pixels (default 1200,2000)")
    p.add_argument("--ratio", type=_parse_pair, default=(0.7, 1.5), metavar="LO,HI",
                   help="page height/width range (default 0.7,1.5)")
    p.add_argument("--candidates", type=int, default=500, help="candidates per page (default 500)")
    p.add_argument("--format", choices=("png", "jpg"), default="png")
    args = p.parse_args(argv)
    if bool(args.pool_ann) != bool(args.pool_images):
        p.error("--pool-ann and --pool-images go together")
    if args.pool_ann and args.categories:
        p.error("--categories selects procedural classes; a --pool-ann pool keeps its own categories")
    if args.pages < 1 or args.val < 0 or args.test < 0:
        p.error("--pages must be >= 1, --val and --test >= 0")
    splits = {"train": args.pages, **({"val": args.val} if args.val else {}), **({"test": args.test} if args.test else {})}
    try:
        pool = coco_element_pool(args.pool_ann, args.pool_images) if args.pool_ann else procedural_element_pool(
            seed=args.seed, categories=[c.strip() for c in args.categories.split(",")] if args.categories else None)
        root = write_docsynth(args.out, splits, seed=args.seed, pool=pool, width_range=args.width,
                              ratio_range=args.ratio, candidate_num=args.candidates, image_format=args.format,
                              progress=True)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        print(f"zoo docsynth: error: {e}", file=sys.stderr)
        return 2
    info = json.loads((root / "docsynth.json").read_text())
    print(f"wrote {root}: {info['stats']['pages']} pages, {info['stats']['objects']} objects, "
          f"classes {', '.join(info['categories'])}")
    return 0
