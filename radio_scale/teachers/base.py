"""The teacher contract: a frozen model that maps normalised images to summary + spatial features."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from radio_scale.teachers.spec import TeacherSpec


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
    patch_size (output stride), embed_dim (C of spatial), summary_dim (C of summary),
    mean/std (per-channel normalisation on 0..1 pixels), has_summary, resize_mode
    ("squash": resize the crop to input_size x input_size; "longest_pad": SAM-style longest side
    to input_size, then zero-pad bottom/right to a square).

    Adapters built by `build_teacher` also carry `family`, `spec` (their TeacherSpec) and `model`
    (the library's own module). Outputs are float32 whatever dtype the teacher runs in.
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
    family: str = ""
    _grid: Optional[tuple[int, int]] = None

    def adopt_spec(self, spec: "TeacherSpec") -> None:
        """Take name, sizes, normalisation and grid from the spec, so spec and teacher agree by construction."""
        self.spec = spec
        self.name, self.family = spec.name, spec.family
        self.input_size, self.patch_size = spec.input_size, spec.patch_size
        self.embed_dim, self.summary_dim, self.has_summary = spec.embed_dim, spec.summary_dim, spec.has_summary
        self.mean, self.std, self.resize_mode = tuple(spec.mean), tuple(spec.std), spec.resize_mode
        self._grid = tuple(spec.grid_size)

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
        if self._grid is not None:
            return self._grid
        g = self.input_size // self.patch_size
        return (g, g)

    def check_input(self, images: torch.Tensor) -> torch.Tensor:
        """The batch cast to the teacher's dtype, after checking it is [B, 3, input_size, input_size]."""
        s = self.input_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (s, s):
            raise ValueError(f"teacher '{self.name}': expects images [B, 3, {s}, {s}], got {list(images.shape)}")
        param = next(self.parameters(), None)
        return images if param is None else images.to(param.dtype)

    def forward(self, images: torch.Tensor) -> TeacherOutput:  # pragma: no cover - abstract
        """images: [B, 3, input_size, input_size], already normalised with mean/std."""
        raise NotImplementedError


def tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens [B, h*w, C] (row-major) -> feature map [B, C, h, w]."""
    b, n, c = tokens.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} patch tokens do not form a {grid[0]}x{grid[1]} grid")
    return tokens.transpose(1, 2).reshape(b, c, grid[0], grid[1])


@contextmanager
def constructing(seed: int, random_init: bool, device: torch.device) -> Iterator[torch.device]:
    """Where a teacher's modules are constructed, with their random init drawn from `seed`.

    Random-weight teachers are built on the CPU, so a seed gives the same weights on any machine; teachers
    about to load a checkpoint are built directly on their device (fast init, no host copy of the model).
    The global RNG states are left as they were.
    """
    where = torch.device("cpu") if random_init else torch.device(device)
    cuda = [where.index if where.index is not None else torch.cuda.current_device()] if where.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.device(where):
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that would reseed every GPU too
        if cuda:
            torch.cuda.manual_seed(seed)
        yield where
