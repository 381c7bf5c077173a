"""Evaluation data at dataset scale, streamed: class folders and webdataset shards (classification).

A split is a list of *work units* (a batch of files, or a shard or part of one); `radio_scale.eval.scale`
splits the units over processes with accelerate and reads them in batches, so memory per process is one batch
(plus the DataLoader's prefetch), however large the split. Every sample carries a global id, so features
gathered from many processes are put back in one order, exactly once.

Batches are formed *inside* a unit and do not depend on the number of processes, so each image is encoded in the
same batch with 1 or N processes (same features, bit for bit).

Bad data is never fatal: an undecodable image, a sample without an image or with a bad label, an unreadable or
truncated shard are counted by reason (`skipped`), and the run goes on. A missing folder, an empty split or a
spec that matches no file is a FileNotFoundError with one line naming it.
"""
from __future__ import annotations

import glob
import io
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
FOLDER_IMAGE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTS) + (".JPEG",)
CROP_PCT = 0.875  # resize the short side to size / 0.875, then center-crop size (the ImageNet eval transform)
_SHARD_STRIDE = 1 << 32  # sample id of a shard sample: shard index * stride + position in the shard


@dataclass
class Batch:
    """One batch of a split: global ids [B], 0..1 images [B, 3, S, S], labels [B]; `skipped` counts by reason."""

    ids: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    skipped: Counter

    def __len__(self) -> int:
        return int(self.ids.numel())


# ---------------------------------------------------------------- decoding

def decode_image(data, size: Optional[int], crop_pct: float = CROP_PCT) -> torch.Tensor:
    """Bytes or a path -> 0..1 RGB [3, S, S]: short side to round(size / crop_pct), centre crop size (None: as is)."""
    from PIL import Image

    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(src) as im:
        im = im.convert("RGB")
        if size is not None:
            w, h = im.size
            short = max(size, int(round(size / crop_pct)))
            scale = short / min(w, h)
            nw, nh = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def _collate(ids: list[int], images: list[torch.Tensor], labels: list[int], skipped: Counter) -> Batch:
    if images:
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:  # native sizes differ (no --image-size): centre-crop to the smallest common square
            side = min(min(s[1], s[2]) for s in shapes)
            images = [_center_square(im, side) for im in images]
        return Batch(torch.tensor(ids, dtype=torch.long), torch.stack(images), torch.tensor(labels, dtype=torch.long),
                     skipped)
    return Batch(torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.long), skipped)


def _center_square(im: torch.Tensor, side: int) -> torch.Tensor:
    import torch.nn.functional as F

    h, w = im.shape[-2:]
    s = min(h, w)
    im = im[:, (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if s != side:
        im = F.interpolate(im[None], size=(side, side), mode="bilinear", align_corners=False, antialias=True)[0]
    return im


# ---------------------------------------------------------------- splits

class Split:
    """A split to stream: `units(num_processes)` lists work units, `read(unit, batch_size)` yields Batches."""

    name: str = ""
    classnames: Optional[list[str]] = None

    def units(self, num_processes: int = 1, batch_size: int = 64) -> list:
        raise NotImplementedError

    def read(self, unit, batch_size: int) -> Iterator[Batch]:
        raise NotImplementedError

    def count_batches(self, units: Sequence, batch_size: int) -> Optional[int]:
        """Batches the units will yield, when known without reading (for the progress bar's ETA)."""
        return None


class FolderSplit(Split):
    """ImageNet-style class folders: <root>/<class>/<image> (class index = sorted folder order, as ImageFolder)."""

    def __init__(self, root: str | Path, image_size: Optional[int] = None, classnames: Optional[Sequence[str]] = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"class folder {self.root}: not a directory (expected <class>/<image> inside)")
        classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"class folder {self.root}: no class sub-folders")
        self.classes = classes
        self.files: list[tuple[str, int]] = []
        for ci, c in enumerate(classes):
            for dirpath, _, names in sorted(os.walk(self.root / c)):
                self.files += [(os.path.join(dirpath, n), ci) for n in sorted(names)
                               if n.endswith(FOLDER_IMAGE_SUFFIXES) or n.lower().endswith(FOLDER_IMAGE_SUFFIXES)]
        if not self.files:
            raise FileNotFoundError(f"class folder {self.root}: no images ({', '.join(IMAGE_EXTS)}) in its class folders")
        self.name = self.root.name
        self.image_size = image_size
        self.classnames = list(classnames) if classnames is not None else [c.replace("_", " ") for c in classes]

    def __len__(self) -> int:
        return len(self.files)

    def units(self, num_processes: int = 1, batch_size: int = 64) -> list:
        return [range(i, min(i + batch_size, len(self.files))) for i in range(0, len(self.files), batch_size)]

    def read(self, unit, batch_size: int) -> Iterator[Batch]:
        ids, images, labels, skipped = [], [], [], Counter()
        for i in unit:
            path, label = self.files[i]
            try:
                img = decode_image(path, self.image_size)
            except FileNotFoundError:
                skipped["missing_file"] += 1
                continue
            except Exception:  # PIL raises many types for broken files
                skipped["undecodable"] += 1
                continue
            ids.append(i)
            images.append(img)
            labels.append(label)
        yield _collate(ids, images, labels, skipped)

    def count_batches(self, units: Sequence, batch_size: int) -> Optional[int]:
        return len(units)


def expand_shard_spec(spec: str) -> list[str]:
    """'a/{000..009}.tar', globs, a directory of .tar files, a list file (.txt), several joined by '::'."""
    import braceexpand

    urls: list[str] = []
    for part in str(spec).split("::"):
        part = part.strip()
        if not part:
            continue
        p = Path(part)
        if p.is_dir():
            found = sorted(str(q) for q in p.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"shards {part}: directory holds no .tar files")
            urls += found
            continue
        if p.suffix == ".txt" and p.is_file():
            urls += [line.strip() for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
            continue
        for u in braceexpand.braceexpand(part):
            if u.startswith(("pipe:", "http://", "https://", "s3://", "gs://")):
                urls.append(u)
            elif any(ch in u for ch in "*?["):
                matched = sorted(glob.glob(u))
                if not matched:
                    raise FileNotFoundError(f"shards {u}: the pattern matches no file")
                urls += matched
            else:
                urls.append(u)
    if not urls:
        raise FileNotFoundError(f"shards '{spec}': no shard")
    return urls


class ShardSplit(Split):
    """webdataset shards: <key>.jpg|png|webp + <key>.cls (an integer class index) per sample.

    With at least as many shards as processes each shard is one unit; with fewer, a shard is read by several
    processes and each keeps every P-th batch of it, so no process stands idle on a small split.
    """

    def __init__(self, urls: Sequence[str] | str, image_size: Optional[int] = None,
                 classnames: Optional[Sequence[str]] = None, name: Optional[str] = None):
        self.urls = expand_shard_spec(urls) if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise FileNotFoundError("shards: empty shard list")
        self.image_size = image_size
        self.classnames = list(classnames) if classnames is not None else None
        self.name = name or Path(self.urls[0]).parent.name

    def units(self, num_processes: int = 1, batch_size: int = 64) -> list:
        parts = max(1, -(-num_processes // len(self.urls)))
        return [(s, p, parts) for s in range(len(self.urls)) for p in range(parts)]

    def read(self, unit, batch_size: int) -> Iterator[Batch]:
        shard, part, parts = unit
        url = self.urls[shard]
        ids, images, labels, skipped = [], [], [], Counter()
        shard_skips: Counter = Counter()  # a broken shard counts once, in part 0, however many processes read it
        pos = 0
        for sample in _tar_samples(url, shard_skips):
            mine = (pos // batch_size) % parts == part
            pos += 1
            if mine:
                item = self._decode(sample, skipped)
                if item is not None:
                    ids.append(shard * _SHARD_STRIDE + pos - 1)
                    images.append(item[0])
                    labels.append(item[1])
            if pos % batch_size == 0:
                if mine:
                    yield _collate(ids, images, labels, skipped)
                    ids, images, labels, skipped = [], [], [], Counter()
        if part == 0:
            skipped.update(shard_skips)
        if ids or skipped:
            yield _collate(ids, images, labels, skipped)

    def _decode(self, sample: dict, skipped: Counter):
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            skipped["no_image"] += 1
            return None
        if "cls" not in sample:
            skipped["no_label"] += 1
            return None
        try:
            label = int(sample["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            skipped["bad_label"] += 1
            return None
        if label < 0 or (self.classnames is not None and label >= len(self.classnames)):
            skipped["bad_label"] += 1
            return None
        try:
            return decode_image(sample[ext], self.image_size), label
        except Exception:
            skipped["undecodable"] += 1
            return None


def _tar_samples(url: str, skipped: Counter) -> Iterator[dict]:
    """Samples of one tar shard ({ext: bytes}, grouped by key as webdataset does); a broken shard is counted."""
    from webdataset.gopen import gopen

    try:
        stream = gopen(url, "rb")
    except Exception:
        skipped["unreadable_shard"] += 1
        return
    current: Optional[dict] = None
    key = None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if base.startswith("."):
                    continue
                k, _, ext = base.partition(".")
                k = os.path.join(os.path.dirname(member.name), k)
                data = tar.extractfile(member).read()
                if k != key:
                    if current:
                        yield current
                    current, key = {}, k
                current[ext.lower()] = data
        if current:
            yield current
    except (tarfile.TarError, OSError, EOFError, ValueError):
        skipped["bad_shard"] += 1
        if current:
            yield current  # the samples before the break are good
    finally:
        try:
            stream.close()
        except Exception:
            pass


# ---------------------------------------------------------------- what --data names

def bundled_split(name: str, split: str, image_size: Optional[int] = None) -> ShardSplit:
    """A split of the bundled labelled sets ('digits' / 'lfw', 'train' / 'val'), streamed from its shards."""
    from radio_scale.data.bundled import bundled_manifest, bundled_shards

    manifest = bundled_manifest()
    if f"{name}/{split}" not in manifest["sets"]:
        raise FileNotFoundError(f"bundled data has no labelled set '{name}/{split}'")
    return ShardSplit(bundled_shards(f"{name}/{split}"), image_size,
                      manifest["sets"][f"{name}/train"]["labels"], name=name)


def read_classnames(spec: Optional[str]) -> Optional[list[str]]:
    """Class names: 'imagenet' (the 1,000 standard names open_clip ships) or a text file, one name a line."""
    if spec is None:
        return None
    if spec == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    p = Path(spec)
    if not p.is_file():
        raise FileNotFoundError(f"class names {spec}: not 'imagenet' and not a file (one class name a line)")
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def open_split(spec: str, image_size: Optional[int] = None, classnames: Optional[Sequence[str]] = None) -> Split:
    """A class folder (<class>/<image>) or a shard spec (<key>.<img> + <key>.cls)."""
    p = Path(spec)
    if p.is_dir() and not any(p.glob("*.tar")):
        return FolderSplit(p, image_size, classnames)
    names = list(classnames) if classnames is not None else None
    if names is None and p.is_dir() and (p / "classnames.txt").is_file():
        names = read_classnames(str(p / "classnames.txt"))
    return ShardSplit(spec, image_size, names, name=p.name if p.is_dir() else None)


def classification_splits(data: Optional[str], train: Optional[str] = None, val: Optional[str] = None,
                          image_size: Optional[int] = None, classnames: Optional[str] = None
                          ) -> tuple[Split, Split, str]:
    """(train split, val split, name) of --data (bundled name or a root with train/ and val/) or --train/--val-data."""
    from radio_scale.eval.datasets import BUNDLED_SETS

    names = read_classnames(classnames)
    if train or val:
        if not (train and val):
            raise FileNotFoundError("classification data: --train-data and --val-data go together")
        tr = open_split(train, image_size, names)
        va = open_split(val, image_size, names or tr.classnames)
        return tr, va, Path(data).name if data else va.name or "data"
    if data in BUNDLED_SETS:
        return bundled_split(data, "train", image_size), bundled_split(data, "val", image_size), data
    root = Path(data or "")
    if not data or not root.is_dir():
        raise FileNotFoundError(f"classification data '{data}': not a bundled set ({', '.join(BUNDLED_SETS)}) "
                                "and not a folder with train/ and val/")
    for split in ("train", "val"):
        if not (root / split).exists():
            raise FileNotFoundError(f"classification data {root}: missing '{split}/' (class folders or .tar shards)")
    if names is None and (root / "classnames.txt").is_file():
        names = read_classnames(str(root / "classnames.txt"))
    tr = open_split(str(root / "train"), image_size, names)
    va = open_split(str(root / "val"), image_size, names or tr.classnames)
    if isinstance(tr, FolderSplit) and isinstance(va, FolderSplit) and tr.classes != va.classes:
        raise ValueError(f"classification folder {root}: train/ and val/ have different classes")
    return tr, va, root.name
