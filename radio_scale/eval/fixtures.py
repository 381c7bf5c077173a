"""Small dataset trees in the real formats (ADE20K, Pascal VOC 2012, COCO instances), built offline from the
bundled real images (sklearn digits pasted on scikit-image photos, `datasets.digits_on_photos`).

They let the readers, the CLI and the tests run without the real datasets, and show the exact layouts
`radio-eval` expects (docs/evaluation.md).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from radio_scale.eval.segprobe import IGNORE_INDEX


def _png(img01, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img01.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(path)


def _jpg(img01, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img01.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(path, quality=95)


def write_ade20k_tree(root: str | Path, n_train: int = 12, n_val: int = 6, size: int = 64, seed: int = 0) -> Path:
    """<root>/ADEChallengeData2016/{images,annotations}/{training,validation}: digit d -> ADE id d + 2 ('building'..),
    background -> 1 ('wall'), the stroke edge -> 0 ('other', ignored by the benchmark)."""
    from PIL import Image

    from radio_scale.eval.datasets import digits_on_photos

    base = Path(root) / "ADEChallengeData2016"
    for split, n, s in (("training", n_train, seed), ("validation", n_val, seed + 1)):
        seg = digits_on_photos(n=n, size=size, seed=s)
        for i, (img, mask) in enumerate(zip(seg.images, seg.masks)):
            stem = f"ADE_{'train' if split == 'training' else 'val'}_{i:08d}"
            _jpg(img, base / "images" / split / f"{stem}.jpg")
            m = mask.numpy().astype(np.int64)
            ade = np.where(m == IGNORE_INDEX, 0, m + 1).astype(np.uint8)  # class c -> ADE id c + 1; ignore -> 0
            (base / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(ade, mode="L").save(base / "annotations" / split / f"{stem}.png")
    return base


def _voc_palette() -> list[int]:
    """The VOC colour map (bit-interleaved), 256 entries."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def write_voc_tree(root: str | Path, n_train: int = 12, n_val: int = 6, size: int = 64, seed: int = 0) -> Path:
    """<root>/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}: palette PNG masks,
    class ids 0 (background) and digit d -> d + 1 (<= 10 of VOC's 20 classes), 255 on the stroke edge."""
    from PIL import Image

    from radio_scale.eval.datasets import digits_on_photos

    base = Path(root) / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    for split, n, s in (("train", n_train, seed), ("val", n_val, seed + 1)):
        seg = digits_on_photos(n=n, size=size, seed=s)
        ids = []
        for i, (img, mask) in enumerate(zip(seg.images, seg.masks)):
            name = f"2012_{split}{i:05d}"
            ids.append(name)
            _jpg(img, base / "JPEGImages" / f"{name}.jpg")
            m = Image.fromarray(mask.numpy().astype(np.uint8), mode="P")
            m.putpalette(_voc_palette())
            (base / "SegmentationClass").mkdir(parents=True, exist_ok=True)
            m.save(base / "SegmentationClass" / f"{name}.png")
        (base / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return base


def rle_encode(mask: np.ndarray, compressed: bool = True) -> dict:
    """bool mask [h, w] -> COCO RLE (column-major runs, starting with a run of zeros); compressed as pycocotools."""
    flat = np.asarray(mask, bool).T.reshape(-1)
    counts, val, run = [], False, 0
    for v in flat:
        if bool(v) != val:
            counts.append(run)
            run, val = 0, bool(v)
        run += 1
    counts.append(run)
    rle = {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}
    if compressed:
        s = []
        for i, x in enumerate(counts):
            if i > 2:
                x -= counts[i - 2]
            more = True
            while more:
                c = x & 0x1F
                x >>= 5
                more = (x != -1) if (c & 0x10) else (x != 0)
                if more:
                    c |= 0x20
                s.append(chr(c + 48))
        rle["counts"] = "".join(s)
    return rle


def write_coco_tree(root: str | Path, n: int = 6, size: int = 64, seed: int = 3,
                    crowd_every: Optional[int] = 4) -> Path:
    """<root>/val2017/*.jpg + <root>/annotations/instances_val2017.json: each pasted digit an object (category
    digit + 1), segmentations as polygons, uncompressed and compressed RLE in turn; every crowd_every-th object
    is marked iscrowd (skipped by the reader). Returns the JSON path."""
    from radio_scale.eval.datasets import digits_on_photos

    root = Path(root)
    seg = digits_on_photos(n=n, size=size, seed=seed)
    images, anns = [], []
    k = 0
    for i, (img, inst, mask) in enumerate(zip(seg.images, seg.instances, seg.masks)):
        name = f"{i + 1:012d}.jpg"
        _jpg(img, root / "val2017" / name)
        images.append({"id": i + 1, "file_name": name, "height": size, "width": size})
        for m in inst.numpy():
            ys, xs = np.nonzero(m)
            if len(ys) == 0:
                continue
            cat = int(np.bincount(mask.numpy()[m]).argmax())
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            if k % 3 == 0:  # a polygon: the mask's bounding rectangle outline traced around its pixels
                seg_field = [[x0, y0, x1, y0, x1, y1, x0, y1]]
            else:
                seg_field = rle_encode(m, compressed=(k % 3 == 2))
            anns.append({"id": k + 1, "image_id": i + 1, "category_id": cat, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": float(m.sum()), "segmentation": seg_field,
                         "iscrowd": int(bool(crowd_every) and k % crowd_every == crowd_every - 1)})
            k += 1
    cats = [{"id": c, "name": str(c - 1)} for c in range(1, 11)]
    ann_path = root / "annotations" / "instances_val2017.json"
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    ann_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return ann_path
