"""Weighted k-NN classification on summary features (the DINO protocol: k=20, T=0.07)."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: Optional[int] = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Per-class vote of each test point: sum of exp(cos/T) over its k nearest training points -> [N_test, C]."""
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"knn: features must be [N, D] with the same D, got train {tuple(train_feats.shape)}, "
            f"test {tuple(test_feats.shape)}"
        )
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(f"knn: train_labels must be [{train_feats.shape[0]}], got {tuple(train_labels.shape)}")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    if not math.isfinite(math.exp(1.0 / T)):
        raise ValueError(f"knn: temperature T={T} is too small (exp(1/T) overflows float64)")
    k = min(k, train_feats.shape[0])
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    labels = train_labels.long().to(train.device)
    out = []
    for start in range(0, test.shape[0], batch_size):
        sim = test[start:start + batch_size] @ train.T  # cosine similarity [b, N_train]
        # stable sort: equal cosines go to the smaller training index (as the streamed k-NN does), so that
        # degenerate images (an all-black one has cosine 0 to everything) get the same neighbours everywhere
        top_idx = sim.argsort(dim=1, descending=True, stable=True)[:, :k]
        top_sim = sim.gather(1, top_idx)
        weights = (top_sim.double() / T).exp()  # float64: exp(1/T) overflows fp32 below T ~ 0.011
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weights.dtype)
        votes.scatter_add_(1, labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes, dtype=torch.float64)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose true label is among the k highest scores, for each k -> {top1, top5}."""
    labels = labels.long().to(scores.device)
    n = max(1, scores.shape[0])
    ranked = scores.argsort(dim=1, descending=True)
    out = {}
    for k in ks:
        hit = (ranked[:, : min(k, scores.shape[1])] == labels[:, None]).any(dim=1)
        out[f"top{k}"] = hit.sum().item() / n
    return out


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: Optional[int] = None,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Weighted k-NN accuracy (fractions in 0..1) of test features against labelled training features."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_scores(train_feats, train_labels, test_feats, k, T, num_classes, batch_size)
    return topk_accuracy(scores, test_labels)


@torch.no_grad()
def extract_features(
    encoder_fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `encoder_fn` over (images, labels) batches -> (features [N, D] on CPU in fp32, labels [N])."""
    feats, labels = [], []
    for images, y in loader:
        feats.append(encoder_fn(images).float().cpu())
        labels.append(torch.as_tensor(y).long().cpu())
    if not feats:
        raise ValueError("extract_features: the loader yielded no batch")
    return torch.cat(feats), torch.cat(labels)
