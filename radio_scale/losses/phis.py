"""PHI-S teacher standardisation: every teacher's features rotated and scaled to zero mean and unit variance
in every dimension, so that no teacher dominates the loss by the scale of its features.

For one feature kind of one teacher (its summary vectors, or the vectors at every position of its spatial map),
with mean μ and covariance Σ = U Λ Uᵀ estimated on the training stream:

    x' = H Uᵀ (x − μ) / s,        s² = tr(Σ) / C

H is a normalised Hadamard matrix (H Hᵀ = I, every entry ±1/√C): the PCA rotation Uᵀ makes the dimensions
uncorrelated, and H mixes them so that every output dimension carries the same variance, mean(Λ) = s², which
the one scalar s then brings to 1. The transform is orthogonal up to that scalar, so cosine similarities are
unchanged and distances only scaled. Its inverse, x = s U Hᵀ x' + μ, maps the heads' outputs back to the
teacher's own space (exports bake it into the heads' last layer).

Hadamard matrices of order C are built as Sylvester doublings (order 2ᵏ) of a Paley matrix of order q + 1, q a
prime ≡ 3 mod 4 (orders 4, 8, 12, 20, 24, 32, 44, 48, ...): every teacher width in the shipped recipes is such an
order (256, 768 = 12·64, 1024, 1280 = 20·64, 1536 = 12·128; the smoke teachers' 32, 64, 1280). A width that is
not is refused by name (config error), not approximated.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
from torch import nn


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(math.isqrt(n)) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order q + 1 for a prime q ≡ 3 (mod 4), entries ±1."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]  # the Legendre symbol
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    for i in range(q):
        for j in range(q):
            s[1 + i, 1 + j] = chi[(j - i) % q]
    return s + torch.eye(n, dtype=torch.float64)


def hadamard_order_supported(n: int) -> bool:
    """Whether `hadamard(n)` can build a matrix of order n."""
    try:
        _base(n)
        return True
    except ValueError:
        return False


def _base(n: int) -> tuple[int, int]:
    """(m, k) with n = m · 2ᵏ and m = 1, 2 or a Paley order q + 1."""
    if n < 1:
        raise ValueError(f"Hadamard order must be >= 1, got {n}")
    k = 0
    m = n
    while True:
        if m in (1, 2) or (m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3):
            return m, k
        if m % 2:
            break
        m //= 2
        k += 1
    raise ValueError(f"no Hadamard matrix of order {n} in this construction (2^k x (q + 1), q prime = 3 mod 4)")


@lru_cache(maxsize=16)
def _hadamard_cached(n: int) -> torch.Tensor:
    m, k = _base(n)
    h = torch.ones(1, 1, dtype=torch.float64) if m == 1 else (
        torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) if m == 2 else _paley(m - 1))
    for _ in range(k):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard(n: int) -> torch.Tensor:
    """A normalised Hadamard matrix of order n (float64, H Hᵀ = I, entries ±1/√n); ValueError if not buildable."""
    return _hadamard_cached(n).clone()


def phi_s_transform(count: float, total: torch.Tensor, outer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean [C], tx [C, C], inverse [C, C]) from the sums of a feature stream: x' = tx (x − mean), x = inv x' + mean.

    count: number of vectors; total: Σ x [C]; outer: Σ x xᵀ [C, C] (float64).
    """
    if count < 2:
        raise ValueError(f"PHI-S needs at least 2 feature vectors, got {count}")
    total, outer = total.double(), outer.double()
    mean = total / count
    cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
    cov = 0.5 * (cov + cov.T)
    evals, evecs = torch.linalg.eigh(cov)
    c = cov.shape[0]
    scale = math.sqrt(max(float(evals.clamp(min=0).sum()) / c, 1e-12))
    rot = hadamard(c) @ evecs.T  # orthogonal
    tx = rot / scale
    inv = rot.T * scale
    return mean.float(), tx.float(), inv.float()


class Standardizer(nn.Module):
    """PHI-S transforms of every loss term (`<teacher>/summary`, `<teacher>/spatial`), kept as buffers so they
    travel with the model in checkpoints; `ready[i]` says whether term i has its estimate yet."""

    def __init__(self, dims: dict[str, int]):
        super().__init__()
        self.terms = tuple(dims)
        for term, c in dims.items():
            key = _key(term)
            self.register_buffer(f"{key}_mean", torch.zeros(c))
            self.register_buffer(f"{key}_tx", torch.eye(c))
            self.register_buffer(f"{key}_inv", torch.eye(c))
        self.register_buffer("ready", torch.zeros(len(self.terms)))

    def is_ready(self, term: str) -> bool:
        return bool(self.ready[self.terms.index(term)] > 0)

    def set(self, term: str, mean: torch.Tensor, tx: torch.Tensor, inv: torch.Tensor) -> None:
        key = _key(term)
        with torch.no_grad():
            getattr(self, f"{key}_mean").copy_(mean)
            getattr(self, f"{key}_tx").copy_(tx)
            getattr(self, f"{key}_inv").copy_(inv)
            self.ready[self.terms.index(term)] = 1.0

    def parts(self, term: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = _key(term)
        return getattr(self, f"{key}_mean"), getattr(self, f"{key}_tx"), getattr(self, f"{key}_inv")

    def forward_map(self, term: str, x: torch.Tensor) -> torch.Tensor:
        """Standardise features: [B, C] vectors or [B, C, h, w] maps (channels are the feature dimension)."""
        mean, tx, _ = self.parts(term)
        return _apply(x, tx.to(x.dtype), mean.to(x.dtype), before=True)

    def inverse_map(self, term: str, x: torch.Tensor) -> torch.Tensor:
        """Back to the teacher's space: [B, C] or [B, C, h, w]."""
        mean, _, inv = self.parts(term)
        return _apply(x, inv.to(x.dtype), mean.to(x.dtype), before=False)


def _key(term: str) -> str:
    return term.replace("/", "__")


def _apply(x: torch.Tensor, m: torch.Tensor, mean: torch.Tensor, before: bool) -> torch.Tensor:
    if x.dim() == 2:
        return (x - mean) @ m.T if before else x @ m.T + mean
    if x.dim() == 4:
        t = x.permute(0, 2, 3, 1)
        t = (t - mean) @ m.T if before else t @ m.T + mean
        return t.permute(0, 3, 1, 2)
    raise ValueError(f"PHI-S expects [B, C] or [B, C, h, w] features, got {list(x.shape)}")


def feature_rows(x: torch.Tensor) -> torch.Tensor:
    """Feature vectors as rows [N, C] from [B, C] or [B, C, h, w]."""
    return x if x.dim() == 2 else x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def bake_inverse(weight: torch.Tensor, bias: torch.Tensor, inv: torch.Tensor,
                 mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A head's last Linear (W, b) followed by the inverse transform, as one Linear: (inv W, inv b + mean)."""
    return inv @ weight, inv @ bias + mean


def stats_size(c: int) -> int:
    """Length of the flat statistics vector of one term: count, Σx [C], Σxxᵀ [C²]."""
    return 1 + c + c * c


def stats_of(rows: Optional[torch.Tensor], c: int) -> torch.Tensor:
    """Flat float64 [count, Σx, Σxxᵀ] of rows [N, C] (zeros when None: a rank without the teacher)."""
    out = torch.zeros(stats_size(c), dtype=torch.float64, device=rows.device if rows is not None else None)
    if rows is not None and rows.numel():
        r = rows.double()
        out[0] = r.shape[0]
        out[1:1 + c] = r.sum(0)
        out[1 + c:] = (r.T @ r).flatten()
    return out


def transform_from_stats(stats: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """phi_s_transform from a (reduced) flat statistics vector."""
    return phi_s_transform(float(stats[0]), stats[1:1 + c], stats[1 + c:].reshape(c, c))
