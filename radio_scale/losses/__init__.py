"""Distillation losses (per sample, per teacher term) and the balancers that weight the terms."""
from radio_scale.losses.balancers import (
    AdaLossBalancer,
    BalancedLoss,
    Balancer,
    NaiveBalancer,
    UncertaintyBalancer,
    build_balancer,
)
from radio_scale.losses.terms import (
    TERM_KINDS,
    cosine_distance,
    crop_to_content,
    match_grids,
    spatial_loss,
    summary_loss,
    term_name,
    term_weights,
)

__all__ = [
    "AdaLossBalancer", "BalancedLoss", "Balancer", "NaiveBalancer", "TERM_KINDS", "UncertaintyBalancer",
    "build_balancer", "cosine_distance", "crop_to_content", "match_grids", "spatial_loss", "summary_loss", "term_name", "term_weights",
]
