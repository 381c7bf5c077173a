"""Per-sample distillation losses: cosine distance for summaries; cosine + smooth-L1 for spatial features."""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
import torch.nn.functional as F

from radio_scale.config.schema import TeacherConfig

TERM_KINDS = ("summary", "spatial")


def term_name(teacher: str, kind: str) -> str:
    """The name of one loss term, e.g. "clip/summary" (how terms are weighted, balanced and logged)."""
    if kind not in TERM_KINDS:
        raise ValueError(f"loss term kind must be one of {TERM_KINDS}, got '{kind}'")
    return f"{teacher}/{kind}"


def term_weights(teachers: Iterable[TeacherConfig], has_summary: Mapping[str, bool]) -> dict[str, float]:
    """Static weight of every loss term of the run: λ_i for "<teacher>/summary" (teachers with a summary
    only) and γ_i for "<teacher>/spatial"."""
    weights: dict[str, float] = {}
    for tc in teachers:
        if tc.name not in has_summary:
            raise ValueError(f"loss terms: no has_summary given for teacher '{tc.name}'")
        if has_summary[tc.name]:
            weights[term_name(tc.name, "summary")] = float(tc.summary_weight)
        weights[term_name(tc.name, "spatial")] = float(tc.spatial_weight)
    return weights


def cosine_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − cos(pred, target) over channels (dim 1), averaged over any spatial positions: [B]."""
    if pred.shape != target.shape:
        raise ValueError(f"cosine distance: shapes differ: pred {list(pred.shape)} vs target {list(target.shape)}")
    dist = 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=1, eps=1e-8)
    return dist.flatten(1).mean(1) if dist.dim() > 1 else dist


def summary_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine distance between summary vectors [B, C] -> [B]."""
    if pred.dim() != 2:
        raise ValueError(f"summary loss expects [B, C] vectors, got pred {list(pred.shape)}")
    return cosine_distance(pred, target)


def match_grids(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two [B, C, h, w] maps to one grid by bilinear upsampling, never by discarding positions.

    If one grid is at least as large as the other in both height and width, the smaller one is resized to
    it. If neither dominates (e.g. 4×8 vs 8×4), both are resized to the elementwise maximum (8×8).
    """
    if pred.dim() != 4 or pred.shape[:2] != target.shape[:2]:
        raise ValueError(
            f"spatial loss expects [B, C, h, w] maps with equal B and C, got pred {list(pred.shape)} "
            f"vs target {list(target.shape)}"
        )
    (hp, wp), (ht, wt) = pred.shape[-2:], target.shape[-2:]
    size = (max(hp, ht), max(wp, wt))

    def resize(x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    return resize(pred), resize(target)


def crop_to_content(spatial: torch.Tensor, content: Optional[torch.Tensor]) -> torch.Tensor:
    """A padded view's feature maps [B, C, h, w], each sample's content region stretched back over the whole grid.

    content [B, 2]: the (height, width) fraction of each sample's view that holds the image; the rest is
    padding (SAM's view: longest side resized to the input size, zero-padded bottom/right). The student sees
    the same crop squashed to a square, so position (i, j) of its grid and of the returned map cover the same
    image content, and padded positions never reach a loss. Bilinear resampling with edge clamping, the same
    rule as match_grids' resize, clamped to the cells that hold content (a cell the content edge cuts
    through is content). None or all fractions 1: returned as is.
    """
    if content is None:
        return spatial
    if spatial.dim() != 4 or tuple(content.shape) != (spatial.shape[0], 2):
        raise ValueError(f"crop_to_content expects [B, C, h, w] maps and [B, 2] fractions, got "
                         f"{list(spatial.shape)} and {list(content.shape)}")
    b, _, h, w = spatial.shape
    if bool((content >= 1).all()):
        return spatial
    frac = content.to(device=spatial.device, dtype=torch.float32).clamp(min=1e-6, max=1.0)

    def axis(n: int, f: torch.Tensor) -> torch.Tensor:
        # Source coordinate of each output cell centre (F.interpolate's align_corners=False rule applied to the
        # content's extent n·f), clamped to the centres of the cells that hold content, then normalised for
        # grid_sample: no output position ever reads a cell that is padding only.
        centres = (torch.arange(n, device=spatial.device, dtype=torch.float32) + 0.5)[None] * f[:, None] - 0.5
        last = (torch.ceil(n * f - 1e-4) - 1).clamp(min=0)[:, None]
        src = torch.minimum(centres.clamp(min=0), last)
        return (2 * src + 1) / n - 1  # [B, n]

    ys, xs = axis(h, frac[:, 0]), axis(w, frac[:, 1])
    grid = torch.stack([xs[:, None, :].expand(b, h, w), ys[:, :, None].expand(b, h, w)], dim=-1)
    return F.grid_sample(spatial, grid.to(spatial.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def spatial_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.9, beta: float = 0.1) -> torch.Tensor:
    """alpha·cosine distance (over channels, mean over positions) + beta·smooth-L1 (β=1, mean over channels
    and positions), per sample, after match_grids: [B]."""
    pred, target = match_grids(pred.float(), target.float())
    cos = cosine_distance(pred, target)
    l1 = F.smooth_l1_loss(pred, target, reduction="none", beta=1.0).flatten(1).mean(1)
    return alpha * cos + beta * l1
