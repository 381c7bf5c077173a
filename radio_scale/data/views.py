"""One decoded image → one random scale+crop → the student view and every teacher view."""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from radio_scale.data.shards import DataError

# OpenAI CLIP normalisation: the student's inputs; trainer and evaluation reuse these.
STUDENT_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
STUDENT_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ("squash", "longest_pad")


@dataclass(frozen=True)
class ViewSpec:
    """How one model sees the shared crop: square side, normalisation and resize rule.

    resize_mode "squash": the crop is resized to size x size. "longest_pad" (SAM): the longest side
    becomes `size`, aspect kept, then zero-padded bottom/right to size x size after normalisation.
    """

    name: str
    size: int
    mean: tuple[float, float, float] = STUDENT_MEAN
    std: tuple[float, float, float] = STUDENT_STD
    resize_mode: str = "squash"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size <= 0:
            raise DataError(f"view {self.name!r}: size must be a positive int, got {self.size!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise DataError(f"view {self.name!r}: resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise DataError(f"view {self.name!r}: mean/std must be 3 values with std > 0")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def render_key(self) -> tuple:
        """Views with equal keys produce identical tensors (computed once per batch)."""
        return (self.size, self.mean, self.std, self.resize_mode)


def student_view(size: int) -> ViewSpec:
    """The student's view at `size` px (OpenAI CLIP normalisation, squash)."""
    return ViewSpec("student", size, STUDENT_MEAN, STUDENT_STD, "squash")


@dataclass
class Batch:
    """Views of B samples: student [B,3,R,R], teachers {name: [B,3,S,S]}, labels [B] (or None), keys.

    content: for every padded teacher view ("longest_pad"), [B, 2] float32, the (height, width) fraction of
    each sample's view that holds the image (the rest is padding); the loss uses it to line the teacher's
    map up with the student's squashed view (radio_scale.losses.crop_to_content).
    """

    student: torch.Tensor
    teachers: dict[str, torch.Tensor]
    labels: Optional[torch.Tensor]
    keys: list[str]
    meta: dict = field(default_factory=dict)  # stream position and counters (see DistillLoader)
    content: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "Batch":
        """Page-locked copies of the tensors (the DataLoader calls this when pin_memory=True)."""
        return Batch(
            self.student.pin_memory(),
            {k: v.pin_memory() for k, v in self.teachers.items()},
            None if self.labels is None else self.labels.pin_memory(),
            self.keys,
            self.meta,
            self.content,
        )

    def to(self, device, non_blocking: bool = True) -> "Batch":
        """The batch with every tensor on `device`."""
        return Batch(
            self.student.to(device, non_blocking=non_blocking),
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.teachers.items()},
            None if self.labels is None else self.labels.to(device, non_blocking=non_blocking),
            self.keys,
            self.meta,
            self.content,
        )


@dataclass(frozen=True)
class CropBox:
    """A crop in source pixel coordinates (float, so drafted decodes scale it exactly)."""

    left: float
    top: float
    width: float
    height: float

    def scaled(self, sx: float, sy: float) -> tuple[float, float, float, float]:
        """PIL box (left, top, right, bottom) after scaling the source by (sx, sy)."""
        return (self.left * sx, self.top * sy, (self.left + self.width) * sx, (self.top + self.height) * sy)


def sample_crop(
    width: int,
    height: int,
    scale: Optional[Sequence[float]],
    ratio: Sequence[float],
    rng: np.random.Generator,
) -> CropBox:
    """A RandomResizedCrop-style box (area fraction in `scale`, aspect in `ratio`); whole image if scale is None."""
    if scale is None:
        return CropBox(0.0, 0.0, float(width), float(height))
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return CropBox(float(left), float(top), float(w), float(h))
    # Fallback as in torchvision: the largest centred crop whose aspect is inside `ratio`.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return CropBox(float((width - w) // 2), float((height - h) // 2), float(w), float(h))


def longest_side_shape(width: float, height: float, size: int) -> tuple[int, int]:
    """(w, h) with the longest side equal to `size`, aspect kept (segment_anything's ResizeLongestSide rule)."""
    scale = size / max(width, height)
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


class SampleSkip(Exception):
    """A sample that cannot be used; args[0] is the skip reason counted in the stats."""


def decode_views(
    data: bytes,
    views: Sequence[ViewSpec],
    crop_scale: Optional[Sequence[float]],
    crop_ratio: Sequence[float],
    rng: np.random.Generator,
) -> dict[tuple, np.ndarray]:
    """Decode once, crop once, and resize that crop for every distinct view: {render_key: uint8 HWC}."""
    if len(data) == 0:
        raise SampleSkip("empty_image")
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
    except Exception as exn:  # PIL raises many types for non-images
        raise SampleSkip("undecodable") from exn
    if width <= 0 or height <= 0:
        raise SampleSkip("empty_image")
    box = sample_crop(width, height, crop_scale, crop_ratio, rng)
    try:
        if img.format == "JPEG":
            # Decode at the smallest DCT scale that still covers every view's pixels (big source images
            # are the norm on web data; this is most of the decode cost).
            need = max(_needed_scale(v, box) for v in views)
            if need < 0.5:
                img.draft("RGB", (math.ceil(width * need), math.ceil(height * need)))
        img = img.convert("RGB")
    except Exception as exn:  # truncated or corrupt payloads only fail here, at full decode
        raise SampleSkip("undecodable") from exn
    sx, sy = img.size[0] / width, img.size[1] / height
    pil_box = box.scaled(sx, sy)
    out: dict[tuple, np.ndarray] = {}
    for v in views:
        if v.render_key in out:
            continue
        if v.resize_mode == "squash":
            shape = (v.size, v.size)
        else:
            shape = longest_side_shape(box.width, box.height, v.size)
        out[v.render_key] = np.asarray(img.resize(shape, Image.BICUBIC, box=pil_box))
    return out


def _needed_scale(v: ViewSpec, box: CropBox) -> float:
    if v.resize_mode == "squash":
        return max(v.size / box.width, v.size / box.height)
    return v.size / max(box.width, box.height)


def stack_view(images: list[np.ndarray], view: ViewSpec) -> torch.Tensor:
    """Normalised float32 [B,3,S,S] from uint8 HWC images (longest_pad: zero pad after normalising)."""
    # numpy, not torch: tiny per-batch ops in torch pay for intra-op thread sync on a busy host.
    scale = (1.0 / (255.0 * np.asarray(view.std, dtype=np.float32))).reshape(1, 3, 1, 1)
    shift = (-np.asarray(view.mean, dtype=np.float32) / np.asarray(view.std, dtype=np.float32)).reshape(1, 3, 1, 1)
    if view.resize_mode == "squash":
        planar = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))  # uint8 moves are 4x cheaper
        out = np.empty(planar.shape, dtype=np.float32)
        np.multiply(planar, scale, out=out)
        out += shift
        return torch.from_numpy(out)
    out = np.zeros((len(images), 3, view.size, view.size), dtype=np.float32)
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        dst = out[i, :, :h, :w]
        np.multiply(np.ascontiguousarray(im.transpose(2, 0, 1)), scale[0], out=dst)
        dst += shift[0]
    return torch.from_numpy(out)


def content_fraction(images: list[np.ndarray], view: ViewSpec) -> Optional[torch.Tensor]:
    """[B, 2] (height, width) fraction of a padded view that each uint8 HWC image fills; None for squash views."""
    if view.resize_mode == "squash":
        return None
    return torch.tensor([[im.shape[0] / view.size, im.shape[1] / view.size] for im in images], dtype=torch.float32)


def probe_image(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image, fully decoded (to catch truncation); SampleSkip if unusable."""
    if len(data) == 0:
        raise SampleSkip("empty_image")
    try:
        img = Image.open(io.BytesIO(data))
        size = img.size
        if img.format == "JPEG":
            img.draft("RGB", (1, 1))  # still parses every byte, but skips most of the IDCT work
        img.load()
    except Exception as exn:
        raise SampleSkip("undecodable") from exn
    if size[0] <= 0 or size[1] <= 0:
        raise SampleSkip("empty_image")
    return size
