"""Evaluation data: labelled classification sets and segmentation sets (folders or built from real images).

Every set holds 0..1 pixel tensors; each model makes its own view (radio_scale.eval.encoders).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from radio_scale.eval.segprobe import IGNORE_INDEX

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ClassificationSet:
    """A labelled train/test split of 0..1 images [N, 3, H, W] with class names."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classnames: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass
class SegmentationSet:
    """Images [N, 3, H, W] (0..1), class-id masks [N, H, W] (255 = ignore), optional instance masks per image."""

    images: torch.Tensor
    masks: torch.Tensor
    classnames: list[str]
    instances: Optional[list[torch.Tensor]] = None  # per image: [K, H, W] bool, one mask per object

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def split(self, test_every: int = 5) -> tuple["SegmentationSet", "SegmentationSet"]:
        """Deterministic train/test split: every `test_every`-th image goes to test."""
        idx = torch.arange(len(self.images))
        test = idx % test_every == test_every - 1

        def pick(m):
            inst = [self.instances[i] for i in idx[m].tolist()] if self.instances is not None else None
            return SegmentationSet(self.images[m], self.masks[m], self.classnames, inst)

        return pick(~test), pick(test)


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) mini-batches in order, for extract_features."""
    for i in range(0, len(images), batch_size):
        yield images[i:i + batch_size], labels[i:i + batch_size]


# ---------------------------------------------------------------- classification sets

def classification_set(name_or_path: str, size: int = 64) -> ClassificationSet:
    """A bundled labelled set ('digits', 'lfw') or an image folder (<dir>/train/<class>/*, <dir>/val/<class>/*)."""
    path = Path(name_or_path)
    if path.is_dir():
        return folder_classification_set(path, size)
    if name_or_path in BUNDLED_SETS:
        return bundled_classification_set(name_or_path)
    raise FileNotFoundError(
        f"classification data '{name_or_path}': not a bundled set ({', '.join(BUNDLED_SETS)}) and not a folder")


BUNDLED_SETS = ("digits", "lfw")


@lru_cache(maxsize=4)
def _all_shards(urls):
    """No splitting across ranks or workers: every reader sees every shard."""
    yield from urls


def bundled_classification_set(name: str) -> ClassificationSet:
    """A labelled held-out set of radio_scale's bundled data ('digits' or 'lfw'), read from its shards."""
    import webdataset as wds

    from radio_scale.data.bundled import bundled_manifest, bundled_shards

    manifest = bundled_manifest()
    if f"{name}/train" not in manifest["sets"]:
        raise FileNotFoundError(f"bundled data has no labelled set '{name}' (have: {', '.join(BUNDLED_SETS)})")

    def read(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        # every rank reads the whole evaluation set (evaluation inside training runs the same passes on all ranks)
        ds = wds.WebDataset(bundled_shards(f"{name}/{split}"), shardshuffle=False, empty_check=False,
                            nodesplitter=_all_shards, workersplitter=_all_shards)
        ds = ds.decode("torchrgb").to_tuple("png", "cls")
        images, labels = [], []
        for img, cls in ds:
            images.append(img.float())
            labels.append(int(cls))
        return torch.stack(images), torch.tensor(labels)

    (xtr, ytr), (xte, yte) = read("train"), read("val")
    return ClassificationSet(name, xtr, ytr, xte, yte, list(manifest["sets"][f"{name}/train"]["labels"]))


def _load_rgb(path: Path, size: Optional[int]) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None:
            im = im.resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0


def folder_classification_set(root: str | Path, size: int = 64) -> ClassificationSet:
    """ImageFolder layout with train/ and val/ (class sub-folders); images resized to size x size."""
    from torchvision.datasets import ImageFolder

    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"classification folder {root}: missing '{split}/' (expected {split}/<class>/*.png|jpg)")
    train, val = ImageFolder(str(root / "train")), ImageFolder(str(root / "val"))
    if train.classes != val.classes:
        raise ValueError(f"classification folder {root}: train/ and val/ have different classes")

    def load(ds):
        images = torch.stack([_load_rgb(Path(p), size) for p, _ in ds.samples])
        return images, torch.tensor([y for _, y in ds.samples])

    (xtr, ytr), (xte, yte) = load(train), load(val)
    return ClassificationSet(root.name, xtr, ytr, xte, yte, [c.replace("_", " ") for c in train.classes])


# ---------------------------------------------------------------- segmentation sets

@lru_cache(maxsize=1)
def _background_photos(max_side: int = 256) -> tuple[np.ndarray, ...]:
    """Real photos bundled with scikit-image (no download), downscaled once."""
    import skimage.data as skd

    photos = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field",
                 "camera", "coins", "moon", "brick", "grass", "gravel"):
        im = torch.from_numpy(np.asarray(getattr(skd, name)()).astype(np.float32) / 255.0)
        im = im[..., None].expand(-1, -1, 3) if im.ndim == 2 else im[..., :3]
        scale = min(1.0, max_side / max(im.shape[:2]))
        size = (round(im.shape[0] * scale), round(im.shape[1] * scale))
        im = F.interpolate(im.permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False, antialias=True)
        photos.append(im[0].permute(1, 2, 0).numpy())
    return tuple(photos)


def digits_on_photos(n: int = 40, size: int = 64, seed: int = 0, max_digits: int = 3,
                     digit_px: tuple[int, int] = (18, 30)) -> SegmentationSet:
    """Segmentation set made of real data: sklearn digits pasted onto crops of real skimage photos.

    Class 0 is background, class d+1 is digit d; the soft edge of each stroke (between the two
    intensity thresholds) is labelled 255 (ignored), like the boundary band of Pascal VOC masks.
    Each pasted digit is also an instance mask (for the SAM box-prompt evaluation).
    """
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    photos = _background_photos()
    images = np.zeros((n, size, size, 3), np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    instances = []
    for i in range(n):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(min(photo.shape[:2]) // 3, min(photo.shape[:2]) + 1))
        y0 = int(rng.integers(0, photo.shape[0] - side + 1))
        x0 = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = torch.from_numpy(photo[y0:y0 + side, x0:x0 + side]).permute(2, 0, 1)[None]
        img = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        img = img.permute(1, 2, 0).numpy().copy()
        mask = np.zeros((size, size), np.uint8)
        taken = np.zeros((size, size), bool)
        inst = []
        for _ in range(int(rng.integers(1, max_digits + 1))):
            j = int(rng.integers(len(digits.images)))
            d = int(rng.integers(digit_px[0], min(digit_px[1], size) + 1))
            glyph = F.interpolate(torch.from_numpy(digits.images[j] / 16.0).float()[None, None], size=(d, d),
                                  mode="bilinear", align_corners=False)[0, 0].numpy()
            for _try in range(20):  # non-overlapping placement, so every instance stays whole
                y, x = (int(v) for v in rng.integers(0, size - d + 1, size=2))
                if not taken[y:y + d, x:x + d].any():
                    break
            else:
                continue
            taken[y:y + d, x:x + d] = True
            region = img[y:y + d, x:x + d]
            # ink that contrasts with the local background, so the digit is visible on any photo
            ink = np.full(3, 0.0 if region.mean() > 0.5 else 1.0, np.float32) * 0.8 + rng.random(3).astype(np.float32) * 0.2
            alpha = np.clip(glyph, 0, 1)[..., None]
            img[y:y + d, x:x + d] = region * (1 - alpha) + ink * alpha
            fg = glyph >= 0.5
            edge = (glyph >= 0.2) & ~fg
            sub = mask[y:y + d, x:x + d]
            sub[edge] = IGNORE_INDEX
            sub[fg] = digits.target[j] + 1
            full = np.zeros((size, size), bool)
            full[y:y + d, x:x + d] = fg
            inst.append(full)
        images[i], masks[i] = img, mask
        instances.append(torch.from_numpy(np.stack(inst)) if inst else torch.zeros(0, size, size, dtype=torch.bool))
    return SegmentationSet(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().clamp(0, 1),
        torch.from_numpy(masks).long(),
        ["background"] + [str(d) for d in range(10)],
        instances,
    )


def instances_from_semantic(mask: torch.Tensor, background: int = 0, min_pixels: int = 4) -> torch.Tensor:
    """Instance masks [K, H, W] of a class-id mask: each connected region of one non-background class."""
    from scipy import ndimage

    m = mask.numpy()
    found = []
    for c in np.unique(m):
        if c in (background, IGNORE_INDEX):
            continue
        regions, n = ndimage.label(m == c)
        found += [regions == i for i in range(1, n + 1) if (regions == i).sum() >= min_pixels]
    if not found:
        return torch.zeros(0, *mask.shape, dtype=torch.bool)
    return torch.from_numpy(np.stack(found))


def write_segmentation_folder(root: str | Path, seg: SegmentationSet) -> Path:
    """Write a set as <root>/images/NNNN.png and <root>/masks/NNNN.png (class ids as 8-bit grey)."""
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i, (img, mask) in enumerate(zip(seg.images, seg.masks)):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(root / "images" / f"{i:05d}.png")
        Image.fromarray(mask.numpy().astype(np.uint8), mode="L").save(root / "masks" / f"{i:05d}.png")
    (root / "classes.txt").write_text("\n".join(seg.classnames) + "\n")
    return root


def load_segmentation_folder(root: str | Path, size: Optional[int] = None,
                             classnames: Optional[Sequence[str]] = None) -> SegmentationSet:
    """<root>/images/*.png|jpg with <root>/masks/<same stem>.png (class ids, 255 ignore) -> SegmentationSet.

    size: resize images (bilinear) and masks (nearest) to size x size; None requires one common size.
    Class names come from `classnames`, else <root>/classes.txt, else the ids found.
    """
    from PIL import Image

    root = Path(root)
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise FileNotFoundError(f"segmentation folder {root}: expected images/ and masks/ sub-folders")
    files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"segmentation folder {root}: no .png/.jpg in images/")
    images, masks = [], []
    for p in files:
        mpath = mask_dir / f"{p.stem}.png"
        if not mpath.is_file():
            raise FileNotFoundError(f"segmentation folder {root}: image {p.name} has no mask masks/{p.stem}.png")
        img = _load_rgb(p, None)
        with Image.open(mpath) as m:
            if m.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"segmentation mask {mpath}: mode {m.mode}, expected single-channel class ids")
            mask = torch.from_numpy(np.asarray(m).astype(np.int64))
        if mask.shape != img.shape[-2:]:
            raise ValueError(f"segmentation mask {mpath}: size {tuple(mask.shape)} != image size {tuple(img.shape[-2:])}")
        if size is not None:
            img = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
            mask = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
        images.append(img)
        masks.append(mask)
    shapes = {tuple(m.shape) for m in masks}
    if len(shapes) > 1:
        raise ValueError(f"segmentation folder {root}: images differ in size {sorted(shapes)[:3]}...; pass a size")
    masks_t = torch.stack(masks)
    if classnames is None and (root / "classes.txt").is_file():
        classnames = [c for c in (root / "classes.txt").read_text().splitlines() if c.strip()]
    valid = masks_t[masks_t != IGNORE_INDEX]
    found = int(valid.max()) + 1 if valid.numel() else 1
    if classnames is None:
        classnames = [str(c) for c in range(found)]
    if found > len(classnames):
        raise ValueError(f"segmentation folder {root}: masks hold class id {found - 1} but only {len(classnames)} classes")
    return SegmentationSet(torch.stack(images), masks_t, list(classnames))


def segmentation_set(name_or_path: str, size: Optional[int] = None, n: int = 40, seed: int = 0
                     ) -> tuple[SegmentationSet, SegmentationSet]:
    """(train, test) of the built-in 'digits_on_photos' set or a folder (with train/ and val/, or split 4:1)."""
    if name_or_path == "digits_on_photos":
        return digits_on_photos(n=n, size=size or 64, seed=seed).split()
    root = Path(name_or_path)
    if not root.is_dir():
        raise FileNotFoundError(f"segmentation data '{name_or_path}': not 'digits_on_photos' and not a folder")
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = load_segmentation_folder(root / "train", size)
        test = load_segmentation_folder(root / "val", size, train.classnames)
        return train, test
    return load_segmentation_folder(root, size).split()
