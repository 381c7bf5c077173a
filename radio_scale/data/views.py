"""One decoded image → one random scale+crop → the student view and every teacher view."""
from __future__ import annotations

import dataclasses
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

    The loader's views are uint8 pixels (a quarter of float32 through the workers' shared memory and to the
    device); `normalized(device)` moves them and normalises them there, with each view's mean/std (`views`,
    `student_view`), into the float32 views the models take. A batch whose views are already floating point
    (built by hand) is taken as normalised.

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
    views: dict[str, ViewSpec] = field(default_factory=dict)  # teacher name -> its view (mean/std, padding)
    student_view: Optional[ViewSpec] = None

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "Batch":
        """Page-locked copies of the tensors (the DataLoader calls this when pin_memory=True)."""
        return dataclasses.replace(
            self,
            student=self.student.pin_memory(),
            teachers={k: v.pin_memory() for k, v in self.teachers.items()},
            labels=None if self.labels is None else self.labels.pin_memory(),
        )

    def to(self, device, non_blocking: bool = True) -> "Batch":
        """The batch with every tensor on `device` (as it is: uint8 views stay uint8)."""
        return dataclasses.replace(
            self,
            student=self.student.to(device, non_blocking=non_blocking),
            teachers={k: v.to(device, non_blocking=non_blocking) for k, v in self.teachers.items()},
            labels=None if self.labels is None else self.labels.to(device, non_blocking=non_blocking),
        )

    def normalized(self, device=None, non_blocking: bool = True) -> "Batch":
        """The batch on `device` (None: where it is) with float32 normalised views: uint8 views are moved first
        and normalised on the device (`normalize_view`), floating views are moved as they are."""
        def view(x: torch.Tensor, spec: Optional[ViewSpec], name: str, content=None) -> torch.Tensor:
            x = x if device is None else x.to(device, non_blocking=non_blocking)
            if x.is_floating_point():
                return x
            if spec is None:
                raise DataError(f"batch view {name!r} holds uint8 pixels but the batch carries no view spec to "
                                "normalise it with")
            return normalize_view(x, spec, content)

        return dataclasses.replace(
            self,
            student=view(self.student, self.student_view, "student"),
            teachers={k: view(v, self.views.get(k), k, self.content.get(k)) for k, v in self.teachers.items()},
        )


def normalize_view(pixels: torch.Tensor, view: ViewSpec, content: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 [B,3,S,S] -> float32 (pixel / 255 - mean) / std, computed where the pixels are (e.g. the GPU).

    The same float32 operations in the same order as the loader's former host-side normalisation, so the
    result is identical. A padded view ("longest_pad") needs `content` ([B, 2] height/width fraction of each
    view that holds the image): the padding is zero after normalisation, as segment_anything pads.
    """
    std = torch.tensor(view.std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std)).reshape(1, 3, 1, 1).to(pixels.device)
    shift = (-torch.tensor(view.mean, dtype=torch.float32) / std).reshape(1, 3, 1, 1).to(pixels.device)
    out = pixels.to(torch.float32) * scale
    out += shift
    if view.resize_mode == "squash":
        return out
    if content is None:
        raise DataError(f"view {view.name!r}: a padded view needs its content fractions to zero the padding")
    size = pixels.shape[-1]
    rows_cols = torch.round(content.to(torch.float64) * size).to(device=pixels.device, dtype=torch.int64)  # [B, 2]
    idx = torch.arange(size, device=pixels.device)
    rows, cols = rows_cols[:, 0].view(-1, 1, 1), rows_cols[:, 1].view(-1, 1, 1)
    inside = (idx.view(1, size, 1) < rows) & (idx.view(1, 1, size) < cols)
    return torch.where(inside.unsqueeze(1), out, torch.zeros((), dtype=out.dtype, device=out.device))


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
    """uint8 [B,3,S,S] pixels from uint8 HWC images (longest_pad: zero-padded bottom/right).

    Not normalised: uint8 crosses the workers' shared memory and the host-to-device copy at a quarter of the
    bytes of float32 (about 3 GB less per rank and step at stage 2's batch); `Batch.normalized` normalises on
    the device, where the padding of a padded view is zeroed after normalisation (`normalize_view`).
    """
    if view.resize_mode == "squash":
        return torch.from_numpy(np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2)))
    out = np.zeros((len(images), 3, view.size, view.size), dtype=np.uint8)
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        out[i, :, :h, :w] = im.transpose(2, 0, 1)
    return torch.from_numpy(out)


def stack_view_float(images: list[np.ndarray], view: ViewSpec) -> torch.Tensor:
    """Normalised float32 [B,3,S,S] from uint8 HWC images, on the host (longest_pad: zero pad after normalising).

    The loader's former output, kept as the reference `normalize_view` is checked against."""
    scale = (1.0 / (255.0 * np.asarray(view.std, dtype=np.float32))).reshape(1, 3, 1, 1)
    shift = (-np.asarray(view.mean, dtype=np.float32) / np.asarray(view.std, dtype=np.float32)).reshape(1, 3, 1, 1)
    if view.resize_mode == "squash":
        planar = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))
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
