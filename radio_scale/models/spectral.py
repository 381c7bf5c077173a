"""σReparam (Zhai et al., 2023): linear layers whose weight is W·γ/σ(W), σ the spectral norm of W, γ learned.

Implemented as a plain nn.Linear subclass holding `weight`, `bias`, `gamma` and power-iteration buffers `u`,
`v`, with the normalised weight computed inside forward, rather than with torch.nn.utils.parametrize: FSDP2
(`fully_shard`) and DCP then see ordinary parameters under their usual names, and the unsharded weight that
FSDP2 materialises for forward is exactly what the power iteration reads.

Under FSDP2 (or DeepSpeed ZeRO) the buffers are replicated, not synchronised: every rank builds the model from the
same seed and sees the same unsharded weight, so every rank makes the same update. The step is taken inside the
layer's own forward, where a sharded weight is gathered, at most once per `advance_pending` (which the trainer
arms for the first micro-batch of a step): the recomputation of activation checkpointing in backward finds it
spent and reuses the σ the forward used, so the buffers advance once per step on every rank, whether or not that
rank checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpectralLinear(nn.Linear):
    """nn.Linear whose effective weight is γ·W/σ(W); σ from one power-iteration step per training forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_iters: int = 30):
        """init_iters=0 leaves γ and u, v unset: the owner re-initialises W and calls reset_spectral()."""
        super().__init__(in_features, out_features, bias)
        # Shape [1], not a scalar: FSDP2 cannot shard 0-dim parameters.
        self.gamma = nn.Parameter(torch.ones(1))
        self.register_buffer("u", torch.zeros(out_features))
        self.register_buffer("v", torch.zeros(in_features))
        self.advance_pending = True  # the next training forward takes one power-iteration step, then disarms it
        if init_iters > 0:
            self.reset_spectral(init_iters)

    @torch.no_grad()
    def reset_spectral(self, iters: int = 30) -> None:
        """Re-estimate σ(W) from a random start and set γ = σ, so the layer computes exactly x·Wᵀ + b again."""
        w = self.weight.detach().float()
        u = F.normalize(torch.randn(w.shape[0], device=w.device), dim=0)
        v = F.normalize(w.t() @ u, dim=0)
        for _ in range(iters):
            v = F.normalize(w.t() @ u, dim=0)
            u = F.normalize(w @ v, dim=0)
        self.u.copy_(u)
        self.v.copy_(v)
        self.gamma.copy_(torch.dot(u, w @ v).reshape(1))  # a tensor op, so building on "meta" works too

    def sigma(self) -> torch.Tensor:
        """The current spectral-norm estimate uᵀWv (differentiable in W)."""
        # Clones: the buffers are updated in place by the next training forward, which must not invalidate
        # tensors this forward saved for backward (two forwards before one backward, or a recomputation).
        u, v = self.u.float().clone(), self.v.float().clone()
        return torch.dot(u, self.weight.float() @ v)

    @torch.no_grad()
    def power_step(self) -> None:
        """One power-iteration step of the u, v estimate of σ(W)."""
        w = self.weight.detach().float()
        v = F.normalize(w.t() @ self.u.float(), dim=0)
        u = F.normalize(w @ v, dim=0)
        self.v.copy_(v)
        self.u.copy_(u)

    def effective_weight(self) -> torch.Tensor:
        """γ·W/σ(W), advancing the power iteration first in the first training forward after it was armed."""
        if self.training and self.advance_pending and torch.is_grad_enabled():
            self.power_step()
            self.advance_pending = False
        return self.weight * (self.gamma[0] / self.sigma()).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


def make_linear(in_features: int, out_features: int, spectral: bool) -> nn.Linear:
    """A Linear layer, σ-reparametrised when `spectral` (then call reset_spectral() after initialising W)."""
    if spectral:
        return SpectralLinear(in_features, out_features, init_iters=0)
    return nn.Linear(in_features, out_features)
