"""The offline "bundled" dataset: real photos shipped with scikit-image / scikit-learn, as webdataset shards.

Sets (manifest.json names them): "train" (random crops/flips of the photos, varied sizes, jpg, no
labels) and the labelled held-out sets "digits/train", "digits/val" (scikit-learn's 8x8 digits
upsampled to 64x64) and "lfw/train", "lfw/val" (scikit-image's LFW faces vs non-faces at 64x64), png.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from radio_scale.data.shards import DataError

BUNDLED_VERSION = 1
TRAIN_SHARDS = 4
TRAIN_PER_SHARD = 128
_MTIME = 1_700_000_000  # fixed member timestamps: the same bytes on every machine

# scikit-image photos that ship inside the wheel (the others download on first use, which fails offline).
_SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
    "camera", "coins", "clock", "moon", "grass", "gravel", "brick", "cell", "colorwheel", "page", "text",
)


def default_root() -> Path:
    """Where "bundled" lives: $RADIO_DATA_DIR, else ~/.cache/radio_scale/bundled."""
    return Path(os.environ.get("RADIO_DATA_DIR") or "~/.cache/radio_scale/bundled").expanduser()


def ensure_bundled_data(root: Optional[os.PathLike] = None) -> Path:
    """The bundled dataset's directory, written on first use (atomically: safe when processes race)."""
    root = Path(root).expanduser() if root is not None else default_root()
    if read_manifest(root) is not None:
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(f"bundled data: {root} exists but holds no manifest.json; delete it or set RADIO_DATA_DIR")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write_sample_data(tmp)
        try:
            os.rename(tmp, root)  # atomic; fails if another process got there first
        except OSError:
            if read_manifest(root) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def read_manifest(root: Path) -> Optional[dict]:
    """The manifest of a bundled dataset directory, None if it has none (DataError if from another version)."""
    path = root / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("version") != BUNDLED_VERSION:
        raise DataError(f"bundled data: {path} is version {manifest.get('version')}, expected {BUNDLED_VERSION}; delete {root}")
    return manifest


def bundled_manifest(root: Optional[os.PathLike] = None) -> dict:
    """The bundled dataset's manifest (sets, shard names, counts, label names)."""
    root = ensure_bundled_data(root)
    return read_manifest(root)


def bundled_shards(name: str = "train", root: Optional[os.PathLike] = None) -> list[str]:
    """Absolute shard paths of one bundled set ("train", "digits/train", "digits/val", "lfw/train", "lfw/val")."""
    root = ensure_bundled_data(root)
    sets = read_manifest(root)["sets"]
    if name not in sets:
        raise DataError(f"data.shards: bundled set {name!r} does not exist (have: {', '.join(sorted(sets))})")
    return [str(root / s) for s in sets[name]["shards"]]


# -- writing ------------------------------------------------------------------------------------


def load_photos() -> dict[str, np.ndarray]:
    """The offline photos as uint8 RGB arrays, by name."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos: dict[str, np.ndarray] = {}
    for name in _SKIMAGE_PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception:  # a loader that needs a download in this skimage version
            continue
        photos[name] = _to_rgb(img)
    try:
        left, right, _ = skimage.data.stereo_motorcycle()
        photos["motorcycle_left"], photos["motorcycle_right"] = _to_rgb(left), _to_rgb(right)
    except Exception:
        pass
    sk = load_sample_images()
    for fname, img in zip(sk.filenames, sk.images):
        photos[Path(fname).stem] = _to_rgb(img)
    return photos


def _to_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    return buf.getvalue()


def _write_set(root: Path, name: str, samples, per_shard: int) -> dict:
    import webdataset as wds

    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    stem = name.replace("/", "-")
    count = 0
    with wds.ShardWriter(str(folder / f"{stem}-%06d.tar"), maxcount=per_shard, verbose=0, mtime=_MTIME) as sink:
        for sample in samples:
            sink.write(sample)
            count += 1
    shards = sorted(str(p.relative_to(root)) for p in folder.glob("*.tar"))
    return {"shards": shards, "count": count}


def _train_samples(photos: dict[str, np.ndarray], n: int, rng: np.random.Generator):
    names = sorted(photos)
    images = [Image.fromarray(photos[name]) for name in names]
    for i in range(n):
        img = images[i % len(images)]
        w, h = img.size
        area = w * h * rng.uniform(0.2, 1.0)
        aspect = np.exp(rng.uniform(np.log(0.6), np.log(1.6)))
        cw, ch = min(w, int(np.sqrt(area * aspect))), min(h, int(np.sqrt(area / aspect)))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        flip = rng.random() < 0.5
        s = int(rng.integers(96, 513)) / max(cw, ch)
        size = (max(8, round(cw * s)), max(8, round(ch * s)))
        crop = img.resize(size, Image.BILINEAR, box=(x, y, x + cw, y + ch), reducing_gap=2.0)
        if flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        yield {"__key__": f"train{i:06d}", "jpg": _encode(crop, "JPEG")}


def _labelled_samples(prefix: str, images: np.ndarray, labels: np.ndarray, indices, size: int):
    for i in indices:
        img = Image.fromarray(images[i]).convert("RGB").resize((size, size), Image.BILINEAR)
        yield {"__key__": f"{prefix}{i:05d}", "png": _encode(img, "PNG"), "cls": str(int(labels[i]))}


def write_sample_data(out: os.PathLike, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Write the bundled dataset into `out` (created; must be new or empty) and return its manifest."""
    import skimage.data
    from sklearn.datasets import load_digits

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise DataError(f"sample-data: {out} is not empty")
    say = progress or (lambda msg: None)
    rng = np.random.default_rng(0)
    photos = load_photos()
    sets: dict[str, dict] = {}
    say(f"train: {TRAIN_SHARDS * TRAIN_PER_SHARD} crops of {len(photos)} photos")
    sets["train"] = _write_set(out, "train", _train_samples(photos, TRAIN_SHARDS * TRAIN_PER_SHARD, rng), TRAIN_PER_SHARD)
    sets["train"]["labels"] = None

    digits = load_digits()
    pix = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    idx = np.arange(len(pix))
    say(f"digits: {len(pix)} labelled 64x64 images")
    names = [str(c) for c in digits.target_names]
    for split, keep in (("train", idx % 5 != 0), ("val", idx % 5 == 0)):
        sets[f"digits/{split}"] = _write_set(out, f"digits/{split}", _labelled_samples("digit", pix, digits.target, idx[keep], 64), 512)
        sets[f"digits/{split}"]["labels"] = names

    faces = (np.clip(skimage.data.lfw_subset(), 0, 1) * 255).round().astype(np.uint8)
    # skimage documents the order: the first 100 images are faces, the next 100 are not.
    face_labels = (np.arange(len(faces)) >= 100).astype(np.int64)
    idx = np.arange(len(faces))
    say(f"lfw: {len(faces)} labelled 64x64 images (face / non_face)")
    for split, keep in (("train", idx % 4 != 0), ("val", idx % 4 == 0)):
        sets[f"lfw/{split}"] = _write_set(out, f"lfw/{split}", _labelled_samples("lfw", faces, face_labels, idx[keep], 64), 512)
        sets[f"lfw/{split}"]["labels"] = ["face", "non_face"]

    manifest = {"version": BUNDLED_VERSION, "sets": sets, "photos": sorted(photos)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
