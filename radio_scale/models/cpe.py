"""Cropped Position Embedding (CPE): one learned position grid serving every input resolution and aspect."""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class CroppedPosEmbed(nn.Module):
    """A learned grid × grid × D position grid resampled to the current patch grid.

    Training: each sample takes a random crop of the grid (area fraction drawn from `scale`, aspect w/h
    log-uniform in `ratio`, uniform position), bilinearly resampled to (h, w). Evaluation: the whole grid,
    bilinearly resized to max(h, w) square, then the top-left h × w (RADIO's inference rule; a plain resize
    for square inputs). Random numbers come from `generator` (None: torch's global CPU RNG), so
    seeded runs draw the same crops.
    """

    def __init__(self, dim: int, grid: int, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (0.75, 1.3333)):
        super().__init__()
        if grid <= 0:
            raise ValueError(f"student.cpe_grid must be > 0, got {grid}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"student.cpe_scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"student.cpe_ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        self.grid = grid
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.generator: Optional[torch.Generator] = None
        self.pos = nn.Parameter(torch.zeros(1, dim, grid, grid))
        nn.init.trunc_normal_(self.pos, std=0.02)

    def crop_boxes(self, batch: int) -> torch.Tensor:
        """Random crops [batch, 4] as (center x, center y, half width, half height) in [-1, 1] grid coordinates."""
        r = torch.rand(batch, 4, generator=self.generator)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * r[:, 0]
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * r[:, 1])  # width / height
        half_w = torch.sqrt(area * aspect).clamp(max=1.0)
        half_h = torch.sqrt(area / aspect).clamp(max=1.0)
        cx = (1 - half_w) * (2 * r[:, 2] - 1)
        cy = (1 - half_h) * (2 * r[:, 3] - 1)
        return torch.stack([cx, cy, half_w, half_h], dim=1)

    def forward(self, h: int, w: int, batch: int) -> torch.Tensor:
        """Position embeddings for an h × w patch grid: [batch, D, h, w] in training, [1, D, h, w] in eval.

        The crop boxes, the sampling grid and the interpolation are computed in fp32 whatever the grid's dtype
        (FSDP's bf16 parameter policy, autocast), then cast: a crop box rounded to bf16 moves the positions by a
        quarter to half a cell of a 128-cell grid.
        """
        pos = self.pos
        with _autocast_off(pos.device.type):
            if not self.training:
                if (h, w) == (self.grid, self.grid):
                    return pos
                # RADIO's inference rule (NVlabs/RADIO's patch generator): the grid resized to the longer side,
                # square, then its top-left h x w taken; for square inputs this is a plain resize. Training views
                # are square, and exports loaded by RADIO's own code then give the same features at any shape.
                side = max(h, w)
                square = F.interpolate(pos.float(), size=(side, side), mode="bilinear", align_corners=False)
                return square[:, :, :h, :w].to(pos.dtype)
            boxes = self.crop_boxes(batch).to(device=pos.device, dtype=torch.float32)
            cx, cy, half_w, half_h = boxes.unbind(1)
            zero = torch.zeros_like(cx)
            theta = torch.stack([torch.stack([half_w, zero, cx], 1), torch.stack([zero, half_h, cy], 1)], 1)
            sampling = F.affine_grid(theta, [batch, 1, h, w], align_corners=False)
            grid = pos.float().expand(batch, -1, -1, -1)
            out = F.grid_sample(grid, sampling, mode="bilinear", padding_mode="border", align_corners=False)
            return out.to(pos.dtype)


def _autocast_off(device_type: str):
    """Autocast disabled for this device type if it is on (the meta device, used for FLOP counts, has none)."""
    if device_type in ("cpu", "cuda", "xpu", "mps", "hpu") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
