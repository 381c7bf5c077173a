"""How each model sees an evaluation image: 0..1 pixels -> its own view -> summary or spatial features.

Every encoder here is a function images[B, 3, H, W] (0..1 pixels) -> features, so one dataset feeds
the student and any teacher, each with its own resolution, resize rule and normalisation.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

Encoder = Callable[[torch.Tensor], torch.Tensor]


def make_view(
    images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float], resize_mode: str = "squash"
) -> torch.Tensor:
    """0..1 images [B, 3, H, W] -> normalised square views [B, 3, size, size], by the training views' rules.

    squash: resize to size x size. longest_pad (SAM): longest side to size, aspect kept, then
    zero-pad bottom/right after normalisation (as segment_anything's preprocess does).
    """
    from radio_scale.data.views import RESIZE_MODES, longest_side_shape

    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"view: unknown resize_mode '{resize_mode}' (one of {', '.join(RESIZE_MODES)})")
    images = images.float()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    h, w = images.shape[-2:]
    if resize_mode == "squash":
        nh, nw = size, size
    else:
        nw, nh = longest_side_shape(w, h, size)
    if (h, w) != (nh, nw):
        images = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    out = (images - mean_t) / std_t
    return F.pad(out, (0, size - nw, 0, size - nh)) if (nh, nw) != (size, size) else out


def student_norm() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The student's input normalisation (mean, std), as in training."""
    from radio_scale.data.views import STUDENT_MEAN, STUDENT_STD

    return tuple(STUDENT_MEAN), tuple(STUDENT_STD)


def _device_of(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def teacher_view(images: torch.Tensor, teacher) -> torch.Tensor:
    """0..1 images -> the teacher's own input view."""
    return make_view(images, teacher.input_size, teacher.mean, teacher.std, getattr(teacher, "resize_mode", "squash"))


def teacher_output(teacher, images: torch.Tensor, aligned: bool = False):
    """The teacher's TeacherOutput (summary, spatial) on 0..1 images, seen through its own view.

    aligned: for a padded view (SAM), crop the spatial map to the image content and stretch it over the grid,
    as training does, so that it lines up position by position with a squashed (student) view.
    """
    with torch.no_grad():
        out = teacher(teacher_view(images, teacher).to(_device_of(teacher)))
    if aligned and getattr(teacher, "resize_mode", "squash") == "longest_pad":
        from radio_scale.data.views import longest_side_shape
        from radio_scale.losses import crop_to_content
        from radio_scale.teachers.base import TeacherOutput

        nw, nh = longest_side_shape(images.shape[-1], images.shape[-2], teacher.input_size)
        frac = torch.tensor([[nh / teacher.input_size, nw / teacher.input_size]]).expand(images.shape[0], 2)
        out = TeacherOutput(out.summary, crop_to_content(out.spatial, frac))
    return out


def teacher_summary_encoder(teacher) -> Encoder:
    """The teacher's summary vector of each image."""
    if not teacher.has_summary:
        raise ValueError(f"teacher '{teacher.name}' has no summary output")
    return lambda images: teacher_output(teacher, images).summary


def teacher_spatial_encoder(teacher) -> Encoder:
    """The teacher's spatial feature map of each image."""
    return lambda images: teacher_output(teacher, images).spatial


def student_forward(student, heads, images: torch.Tensor, resolution: int, resize_mode: str = "squash",
                    names: Optional[Sequence[str]] = None):
    """(StudentOutput, head outputs or None) of the student on 0..1 images shown at `resolution`.

    names: the heads to run (None: every head, as FSDP needs when the student is sharded).
    """
    mean, std = student_norm()
    x = make_view(images, resolution, mean, std, resize_mode).to(_device_of(student))
    out = student(x)
    if heads is None:
        return out, None
    return out, (heads(out) if names is None else heads(out, list(names), run_unused=False))


def _head(head_out: dict, name: str):
    if name not in head_out:
        raise KeyError(f"no adaptor head for teacher '{name}' (heads: {', '.join(head_out)})")
    return head_out[name]


def student_summary_encoder(student, heads, teacher_name: str, resolution: int, source: str = "head") -> Encoder:
    """The student's summary for one teacher: its adaptor head output ("head") or raw CLS token ("backbone")."""
    if source not in ("head", "backbone"):
        raise ValueError(f"student summary source must be 'head' or 'backbone', got '{source}'")
    names = getattr(heads, "teacher_names", ())
    if source == "head" and names and teacher_name not in names:
        raise KeyError(f"no adaptor head for teacher '{teacher_name}' (heads: {', '.join(names)})")

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        if source == "backbone":
            out, _ = student_forward(student, None, images, resolution)
            if teacher_name not in out.summary:
                raise KeyError(f"student has no summary token for '{teacher_name}' (has: {', '.join(out.summary)})")
            return out.summary[teacher_name]
        _, head_out = student_forward(student, heads, images, resolution, names=[teacher_name])
        summary = _head(head_out, teacher_name)[0]
        if summary is None:
            raise ValueError(f"the adaptor head for '{teacher_name}' has no summary output")
        return summary

    return encode


def student_spatial_encoder(
    student, heads, teacher_name: Optional[str], resolution: int, resize_mode: str = "squash"
) -> Encoder:
    """The student's spatial map: one teacher's head output, or the backbone patch tokens when teacher_name is None."""

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        if teacher_name is None:
            return student_forward(student, None, images, resolution, resize_mode)[0].patches
        _, head_out = student_forward(student, heads, images, resolution, resize_mode, names=[teacher_name])
        return _head(head_out, teacher_name)[1]

    return encode
