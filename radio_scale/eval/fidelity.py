"""Teacher fidelity: how closely each student head reproduces its teacher on held-out images."""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from radio_scale.losses import match_grids  # the loss's rule: the smaller grid goes up to the larger


def summary_fidelity(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean cosine similarity and MSE between summary vectors [B, C]."""
    pred, target = pred.float(), target.float()
    if pred.shape != target.shape:
        raise ValueError(f"fidelity: summary shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    return {
        "summary_cosine": float(F.cosine_similarity(pred, target, dim=1).mean()),
        "summary_mse": float(F.mse_loss(pred, target)),
    }


def spatial_fidelity(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean per-position cosine similarity and MSE between spatial maps, after the loss's grid matching."""
    pred, target = match_grids(pred.float(), target.float())
    return {
        "spatial_cosine": float(F.cosine_similarity(pred, target, dim=1).mean()),
        "spatial_mse": float(F.mse_loss(pred, target)),
    }


def teacher_fidelity(
    pred_summary: Optional[torch.Tensor],
    pred_spatial: torch.Tensor,
    target_summary: Optional[torch.Tensor],
    target_spatial: torch.Tensor,
) -> dict[str, float]:
    """Summary (when both exist) and spatial fidelity of one head against one teacher."""
    out = spatial_fidelity(pred_spatial, target_spatial)
    if pred_summary is not None and target_summary is not None:
        out.update(summary_fidelity(pred_summary, target_summary))
    return out


def mean_of(records: list[Mapping[str, float]], weights: list[int]) -> dict[str, float]:
    """Batch-size-weighted mean of per-batch metric dicts."""
    total = sum(weights)
    keys = records[0].keys()
    return {k: sum(r[k] * w for r, w in zip(records, weights)) / total for k in keys}
