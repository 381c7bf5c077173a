"""Segmentation and instance data at dataset scale, streamed: ADE20K, Pascal VOC 2012, COCO instances.

- ADE20K (SceneParsing, `ADEChallengeData2016/`): images/{training,validation}/*.jpg with
  annotations/{training,validation}/*.png; 150 classes; annotation 0 ("other") is ignored and c -> c - 1
  (the usual reduce-zero-label rule of the benchmark).
- Pascal VOC 2012 (`VOCdevkit/VOC2012/`): JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette indices),
  ImageSets/Segmentation/{train,val}.txt; 21 classes (background + 20); 255 (the object boundary band) is ignored.
- COCO instances (`annotations/instances_val2017.json` + `val2017/`): per image the non-crowd objects' boxes
  (XYWH -> XYXY) and masks (polygons or RLE, decoded here without pycocotools), for the SAM drop-in.

Every image is resized (short side to `size`) and centre-cropped to size x size; masks follow with nearest
interpolation. Bad data is a counted skip (missing mask, undecodable file, mask of another size, label out of
range); a missing root or split is a FileNotFoundError of one line.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from radio_scale.eval.segprobe import IGNORE_INDEX
from radio_scale.eval.streams import Batch, Split

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
assert len(ADE20K_CLASSES) == 150 and len(VOC_CLASSES) == 21

# the paper's linear-probe protocol: 512 x 512 crops for both (ADE20K: "512-crop")
DEFAULT_SEG_SIZE = {"ade20k": 512, "voc": 512}


def _resize_pair(img, mask, size: Optional[int]):
    """PIL image + PIL/np mask -> (0..1 [3, S, S], long [S, S]): short side to size, centre crop (nearest for masks)."""
    from PIL import Image

    if size is None:
        return img, mask
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
    left, top = (nw - size) // 2, (nh - size) // 2
    box = (left, top, left + size, top + size)
    img = img.resize((nw, nh), Image.BICUBIC).crop(box)
    mask = mask.resize((nw, nh), Image.NEAREST).crop(box)
    return img, mask


class SegSplit(Split):
    """(image, class-id mask) pairs; `label_map` turns the stored mask into class ids with IGNORE_INDEX."""

    def __init__(self, pairs: Sequence[tuple[str, str]], classnames: Sequence[str], size: Optional[int],
                 kind: str, name: str):
        if not pairs:
            raise FileNotFoundError(f"{kind} {name}: no image")
        self.pairs, self.classnames, self.size, self.kind, self.name = list(pairs), list(classnames), size, kind, name

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def __len__(self) -> int:
        return len(self.pairs)

    def units(self, num_processes: int = 1, batch_size: int = 16) -> list:
        return [range(i, min(i + batch_size, len(self.pairs))) for i in range(0, len(self.pairs), batch_size)]

    def count_batches(self, units, batch_size):
        return len(units)

    def label_map(self, m: np.ndarray) -> Optional[np.ndarray]:
        """Stored mask -> class ids (IGNORE_INDEX ignored); None when it holds a label out of range."""
        m = m.astype(np.int64)
        if self.kind == "ade20k":
            m = m - 1
            m[m < 0] = IGNORE_INDEX  # 0 = "other objects": not scored
        bad = (m != IGNORE_INDEX) & ((m < 0) | (m >= self.num_classes))
        return None if bad.any() else m

    def load(self, i: int, skipped: Counter):
        """(image 0..1 [3, S, S], mask [S, S]) of pair i, or None (counted in skipped)."""
        from PIL import Image

        ipath, mpath = self.pairs[i]
        if not os.path.isfile(mpath):
            skipped["missing_mask"] += 1
            return None
        try:
            with Image.open(ipath) as im, Image.open(mpath) as mm:
                img = im.convert("RGB")
                if mm.mode not in ("L", "P", "I", "I;16"):
                    skipped["bad_mask_mode"] += 1
                    return None
                mask = mm.copy()
        except FileNotFoundError:
            skipped["missing_file"] += 1
            return None
        except Exception:
            skipped["undecodable"] += 1
            return None
        if img.size != mask.size:
            skipped["size_mismatch"] += 1
            return None
        img, mask = _resize_pair(img, mask, self.size)
        m = self.label_map(np.asarray(mask))
        if m is None:
            skipped["bad_label"] += 1
            return None
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0
        return x, torch.from_numpy(m)

    def read(self, unit, batch_size: int) -> Iterator[Batch]:
        ids, images, masks, skipped = [], [], [], Counter()
        for i in unit:
            item = self.load(i, skipped)
            if item is None:
                continue
            ids.append(i)
            images.append(item[0])
            masks.append(item[1])
        if images and len({tuple(m.shape) for m in masks}) > 1:
            raise ValueError(f"{self.kind} {self.name}: images differ in size; pass a size (--seg-size)")
        if not ids:
            yield Batch(torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, 1, 1), torch.zeros(0, 1, 1, dtype=torch.long),
                        skipped)
            return
        yield Batch(torch.tensor(ids), torch.stack(images), torch.stack(masks), skipped)


def _find(root: Path, *candidates: str, holds: Sequence[str] = ()) -> Optional[Path]:
    """The first of root/<candidate> that is a directory holding every sub-directory in `holds`."""
    for c in candidates:
        if (root / c).is_dir() and all((root / c / h).is_dir() for h in holds):
            return (root / c).resolve()
    return None


def _ade_base(root: Path) -> Optional[Path]:
    return _find(root, ".", "ADEChallengeData2016", holds=("images", "annotations"))


def _voc_base(root: Path) -> Optional[Path]:
    return _find(root, ".", "VOC2012", "VOCdevkit/VOC2012", holds=("JPEGImages", "SegmentationClass"))


def ade20k_split(root: str | Path, split: str = "validation", size: Optional[int] = 512) -> SegSplit:
    """ADE20K (ADEChallengeData2016 or its parent): split 'training'/'train' or 'validation'/'val'."""
    root = Path(root)
    base = _ade_base(root)
    split = {"train": "training", "val": "validation"}.get(split, split)
    if base is None or not (base / "images" / split).is_dir():
        raise FileNotFoundError(f"ADE20K {root}: no images/{split}/ (expected ADEChallengeData2016/images/{split}/*.jpg "
                                f"and annotations/{split}/*.png)")
    files = sorted(p for p in (base / "images" / split).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    pairs = [(str(p), str(base / "annotations" / split / f"{p.stem}.png")) for p in files]
    return SegSplit(pairs, ADE20K_CLASSES, size, "ade20k", f"ade20k/{split}")


def voc_split(root: str | Path, split: str = "val", size: Optional[int] = 512) -> SegSplit:
    """Pascal VOC 2012 (VOCdevkit, VOCdevkit/VOC2012 or VOC2012): split 'train' / 'val' / 'trainval'."""
    root = Path(root)
    base = _voc_base(root)
    if base is None:
        raise FileNotFoundError(f"VOC {root}: expected VOC2012/JPEGImages/ and VOC2012/SegmentationClass/")
    listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"VOC {root}: no split list ImageSets/Segmentation/{split}.txt")
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    pairs = [(str(base / "JPEGImages" / f"{i}.jpg"), str(base / "SegmentationClass" / f"{i}.png")) for i in ids]
    return SegSplit(pairs, VOC_CLASSES, size, "voc", f"voc/{split}")


def seg_kind(spec: str) -> Optional[str]:
    """'ade20k' / 'voc' for 'ade20k:<root>', 'voc:<root>' or a root in either layout; None otherwise."""
    if spec.startswith(("ade20k:", "voc:")):
        return spec.split(":", 1)[0]
    root = Path(spec)
    if _ade_base(root) is not None:
        return "ade20k"
    if _voc_base(root) is not None:
        return "voc"
    return None


def seg_splits(spec: str, size: Optional[int] = None) -> tuple[SegSplit, SegSplit, str]:
    """(train, val, name) of an ADE20K or VOC root (size None: the protocol's default, 512; 0: images as stored)."""
    kind = seg_kind(spec)
    root = spec.split(":", 1)[1] if spec.startswith(("ade20k:", "voc:")) else spec
    if kind is None:
        raise FileNotFoundError(f"segmentation data '{spec}': neither an ADE20K nor a Pascal VOC 2012 layout")
    size = DEFAULT_SEG_SIZE[kind] if size is None else (size or None)
    if kind == "ade20k":
        return ade20k_split(root, "training", size), ade20k_split(root, "validation", size), "ade20k"
    return voc_split(root, "train", size), voc_split(root, "val", size), "voc2012"


# ---------------------------------------------------------------- COCO instances (SAM drop-in)

def rle_decode(rle: dict) -> np.ndarray:
    """COCO RLE ({'size': [h, w], 'counts': list or compressed string}) -> bool mask [h, w] (column-major runs)."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = _rle_string_to_counts(counts.decode() if isinstance(counts, bytes) else counts)
    flat = np.zeros(h * w, dtype=bool)
    pos, val = 0, False
    for c in counts:
        if val:
            flat[pos:pos + c] = True
        pos += c
        val = not val
    return flat.reshape(w, h).T


def _rle_string_to_counts(s: str) -> list[int]:
    """The compressed counts of pycocotools (maskApi.c rleFrString): 5-bit groups, +48, delta after the 3rd."""
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def polygons_to_mask(polygons: Sequence[Sequence[float]], h: int, w: int) -> np.ndarray:
    """COCO polygons ([x0, y0, x1, y1, ...] per part) -> bool mask [h, w]."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        if len(poly) >= 6:
            draw.polygon([(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)], fill=1)
    return np.asarray(canvas).astype(bool)


@dataclass
class CocoImage:
    """One image of a COCO instances file: 0..1 pixels [3, H, W], XYXY boxes [K, 4], masks [K, H, W], categories."""

    id: int
    image: torch.Tensor
    boxes: torch.Tensor
    masks: torch.Tensor
    categories: list[int]


class CocoInstances:
    """A COCO instances JSON + its image folder; images that hold at least one non-crowd object, in id order."""

    def __init__(self, annotations: str | Path, images: Optional[str | Path] = None, min_area: float = 0.0,
                 max_images: Optional[int] = None):
        ann = Path(annotations)
        if not ann.is_file():
            raise FileNotFoundError(f"COCO annotations {ann}: no such file")
        try:
            data = json.loads(ann.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"COCO annotations {ann}: not a JSON file ({e.__class__.__name__} at {getattr(e, 'pos', '?')})") from None
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"COCO annotations {ann}: no '{key}' list (not an instances file)")
        self.images_dir = Path(images) if images else ann.parent.parent / ann.stem.split("_")[-1]
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"COCO images {self.images_dir}: not a directory (pass the image folder)")
        self.categories = {int(c["id"]): c.get("name", str(c["id"])) for c in data["categories"]}
        self.skipped: Counter = Counter()
        by_image: dict[int, list] = {}
        for a in data["annotations"]:
            if a.get("iscrowd", 0):
                self.skipped["crowd_object"] += 1
                continue
            if float(a.get("area", 1.0)) < min_area:
                self.skipped["small_object"] += 1
                continue
            bbox = a.get("bbox")
            if not bbox or len(bbox) != 4 or bbox[2] <= 0 or bbox[3] <= 0:
                self.skipped["bad_box"] += 1
                continue
            by_image.setdefault(int(a["image_id"]), []).append(a)
        self.records = [(int(im["id"]), im["file_name"], int(im["height"]), int(im["width"]), by_image[int(im["id"])])
                        for im in sorted(data["images"], key=lambda im: int(im["id"])) if int(im["id"]) in by_image]
        if max_images is not None:
            self.records = self.records[:max_images]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_objects(self) -> int:
        return sum(len(r[4]) for r in self.records)

    def load(self, i: int, skipped: Optional[Counter] = None) -> Optional[CocoImage]:
        """Record i with its masks decoded; None (counted) for a missing/undecodable image or bad segmentation."""
        from radio_scale.eval.streams import decode_image

        skipped = self.skipped if skipped is None else skipped
        image_id, name, h, w, anns = self.records[i]
        path = self.images_dir / name
        try:
            img = decode_image(str(path), None)
        except FileNotFoundError:
            skipped["missing_file"] += 1
            return None
        except Exception:
            skipped["undecodable"] += 1
            return None
        if tuple(img.shape[-2:]) != (h, w):
            skipped["size_mismatch"] += 1
            return None
        boxes, masks, cats = [], [], []
        for a in anns:
            seg = a.get("segmentation")
            try:
                if isinstance(seg, list):
                    m = polygons_to_mask(seg, h, w)
                elif isinstance(seg, dict):
                    m = rle_decode(seg)
                else:
                    raise ValueError("no segmentation")
                if m.shape != (h, w):
                    raise ValueError("mask size")
            except (ValueError, TypeError, KeyError, IndexError):
                skipped["bad_segmentation"] += 1
                continue
            x, y, bw, bh = (float(v) for v in a["bbox"])
            boxes.append([x, y, x + bw, y + bh])
            masks.append(m)
            cats.append(int(a.get("category_id", -1)))
        if not boxes:
            return None
        return CocoImage(image_id, img, torch.tensor(boxes), torch.from_numpy(np.stack(masks)), cats)
