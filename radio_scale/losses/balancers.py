"""Loss balancers: how the per-teacher loss terms are weighted into the one loss the student minimises.

Every balancer is built from the run's terms (name -> static weight, e.g. {"clip/summary": 1.0,
"clip/spatial": 1.0, "sam/spatial": 1.0}) and called with a dict of already-reduced scalar terms. A term
absent from the call (its teacher is not on this rank's group this step) contributes nothing; the weights
returned for logging cover every term. Static weights act as a prior in every balancer: a term with weight
0 is never optimised.
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple, Union

import torch
from torch import nn

from radio_scale.config.schema import LossConfig

TermSpec = Union[Mapping[str, float], "list[str]", "tuple[str, ...]"]


class BalancedLoss(NamedTuple):
    """The weighted total (differentiable) and each term's effective weight (detached, for logging)."""

    total: torch.Tensor
    weights: dict[str, torch.Tensor]


class Balancer(nn.Module):
    """Base: holds the term names (a fixed order) and static weights; subclasses give dynamic weights."""

    def __init__(self, terms: TermSpec):
        super().__init__()
        static = dict(terms) if isinstance(terms, Mapping) else {name: 1.0 for name in terms}
        if not static:
            raise ValueError("loss balancer: no loss terms given")
        for name, w in static.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"loss balancer: static weight of term '{name}' must be a finite number >= 0, got {w!r}")
        self.names: tuple[str, ...] = tuple(static)
        self.static: dict[str, float] = {k: float(v) for k, v in static.items()}

    def _index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"loss balancer: unknown term '{name}' (terms: {', '.join(self.names)})") from None

    def _check(self, terms: Mapping[str, torch.Tensor]) -> None:
        for name, value in terms.items():
            self._index(name)
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                raise ValueError(f"loss balancer: term '{name}' must be a scalar tensor (reduce it over the batch first)")

    def effective_weights(self) -> torch.Tensor:
        """Current weight of every term, in `names` order, without gradient: [len(names)]."""
        raise NotImplementedError

    def weighting(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight of every term in `names` order, regulariser): differentiable where learned. For a trainer
        that sums weight × partial term over ranks and micro-steps and adds the regulariser once per step."""
        w = self.effective_weights()
        return w, w.new_zeros(())

    def forward(self, terms: Mapping[str, torch.Tensor]) -> BalancedLoss:
        """Weighted total of the given scalar terms, and every term's effective weight."""
        self._check(terms)
        w = self.effective_weights()
        total = sum(w[self._index(n)].to(v.dtype) * v for n, v in terms.items())
        return BalancedLoss(torch.as_tensor(total), self._weight_dict(w))

    def _weight_dict(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = w.detach()
        return {n: w[i] for i, n in enumerate(self.names)}


class NaiveBalancer(Balancer):
    """Fixed weights from the config: λ_i for summary terms, γ_i for spatial terms (the paper's choice)."""

    def __init__(self, weights: TermSpec):
        super().__init__(weights)
        self.register_buffer("weights", torch.tensor([self.static[n] for n in self.names]), persistent=False)

    def effective_weights(self) -> torch.Tensor:
        return self.weights


class UncertaintyBalancer(Balancer):
    """Learned homoscedastic uncertainty (Kendall et al., 2018): total = Σ w_k·(exp(−s_k)·L_k + s_k).

    s_k = `log_vars[k]` is a parameter to optimise with the student; at the optimum exp(s_k) = L_k, so a
    term that stays large gets a small weight w_k·exp(−s_k). Terms absent from a call add 0·s_k so every
    s_k always has a gradient (needed for FSDP, which reduces gradients of all parameters on all ranks).
    """

    def __init__(self, terms: TermSpec):
        super().__init__(terms)
        self.register_buffer("prior", torch.tensor([self.static[n] for n in self.names]), persistent=False)
        self.log_vars = nn.Parameter(torch.zeros(len(self.names)))

    def effective_weights(self) -> torch.Tensor:
        return (self.prior * torch.exp(-self.log_vars)).detach()

    def weighting(self) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 whatever the parameter's compute dtype (FSDP's bf16 policy gathers log_vars as bf16). Under FSDP
        # call it inside the root module's forward (DistillModel.forward(weighting=True)), where the parameter
        # is gathered: outside it, it is a shard (a DTensor) and mixing it with the prior fails.
        log_vars = self.log_vars.float()
        return self.prior * torch.exp(-log_vars), (self.prior * log_vars).sum()

    def forward(self, terms: Mapping[str, torch.Tensor]) -> BalancedLoss:
        self._check(terms)
        parts = []
        for i, name in enumerate(self.names):
            s = self.log_vars[i]
            if name in terms:
                parts.append(self.prior[i] * (torch.exp(-s) * terms[name].float() + s))
            else:
                parts.append(0.0 * s)
        return BalancedLoss(torch.stack(parts).sum(), self._weight_dict(self.effective_weights()))


class AdaLossBalancer(Balancer):
    """AdaLoss (Hu et al., 2019): weight_k ∝ 1 / running mean of L_k, normalised to sum to the number of
    (non-zero-weight) terms, times the static weight.

    Running means are an EMA with `momentum`, kept in buffers (checkpointed) and never differentiated.
    forward() does NOT update them: call `update(values)` once per step with the *globally reduced* term
    values (the same floats on every rank), so all ranks keep identical statistics and weights. Until a term
    has a statistic it counts with the mean inverse of the others (all weights 1 before the first update).
    """

    def __init__(self, terms: TermSpec, momentum: float = 0.99, eps: float = 1e-12):
        super().__init__(terms)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"loss.adaloss_momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("prior", torch.tensor([self.static[n] for n in self.names]), persistent=False)
        self.register_buffer("running_mean", torch.zeros(len(self.names)))
        self.register_buffer("count", torch.zeros(len(self.names), dtype=torch.int64))

    @torch.no_grad()
    def update(self, term_values: Mapping[str, Union[float, torch.Tensor]]) -> None:
        """Fold one step's globally reduced term values into the running means (non-finite values skipped)."""
        for name, value in term_values.items():
            i = self._index(name)
            v = float(value)
            if not math.isfinite(v):
                continue  # one diverged step must not poison the statistics
            if self.count[i] == 0:
                self.running_mean[i] = v
            else:
                self.running_mean[i] = self.momentum * self.running_mean[i] + (1.0 - self.momentum) * v
            self.count[i] += 1

    @torch.no_grad()
    def effective_weights(self) -> torch.Tensor:
        active = self.prior > 0
        seen = active & (self.count > 0)
        inv = 1.0 / self.running_mean.clamp(min=self.eps)
        if seen.any():
            inv = torch.where(seen, inv, inv[seen].mean())
        else:
            inv = torch.ones_like(inv)
        inv = torch.where(active, inv, torch.zeros_like(inv))
        n_active = int(active.sum())
        dynamic = inv * n_active / inv.sum() if n_active else inv
        return (self.prior * dynamic).float()


def build_balancer(loss_cfg: LossConfig, terms: Mapping[str, float]) -> Balancer:
    """The balancer named by loss.balancer over `terms` (term name -> static weight)."""
    if loss_cfg.balancer == "naive":
        return NaiveBalancer(terms)
    if loss_cfg.balancer == "uncertainty":
        return UncertaintyBalancer(terms)
    if loss_cfg.balancer == "adaloss":
        return AdaLossBalancer(terms, momentum=loss_cfg.adaloss_momentum)
    raise ValueError(f"loss.balancer must be naive, uncertainty or adaloss, got '{loss_cfg.balancer}'")
