"""The teacher contract: a frozen model that maps normalised images to summary + spatial features."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class TeacherOutput:
    """What a teacher produces for a batch: summary [B, C] (or None) and spatial [B, C, h, w]."""

    summary: Optional[torch.Tensor]
    spatial: torch.Tensor


class TeacherLoadError(RuntimeError):
    """A teacher checkpoint is missing or not in the expected format (one-line message)."""


class Teacher(nn.Module):
    """Base class of every teacher adapter.

    Attributes every adapter sets: name, input_size (square side in px the teacher expects),
    patch_size (output stride), embed_dim (C of summary and spatial), summary_dim (C of summary),
    mean/std (per-channel normalisation on 0..1 pixels), has_summary, resize_mode
    ("squash": resize the crop to input_size x input_size; "longest_pad": SAM-style longest side
    to input_size, then zero-pad bottom/right to a square).
    """

    name: str
    input_size: int
    patch_size: int
    embed_dim: int
    summary_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_summary: bool
    resize_mode: str = "squash"

    def freeze(self) -> "Teacher":
        """Frozen: no gradients, eval mode forever (train() is a no-op)."""
        self.requires_grad_(False)
        super().train(False)
        return self

    def train(self, mode: bool = True) -> "Teacher":  # teachers never leave eval mode
        return super().train(False)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Spatial output grid (h, w) for a square input of input_size."""
        g = self.input_size // self.patch_size
        return (g, g)

    def forward(self, images: torch.Tensor) -> TeacherOutput:  # pragma: no cover - abstract
        """images: [B, 3, input_size, input_size], already normalised with mean/std."""
        raise NotImplementedError
