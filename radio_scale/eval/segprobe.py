"""Linear-probe semantic segmentation on frozen patch features: BatchNorm + 1x1 conv, mIoU."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = 255


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel confusion counts [C_true, C_pred] over all pixels whose target is not ignore_index."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if pred.shape != target.shape:
        raise ValueError(f"mIoU: prediction has {pred.numel()} pixels, target {target.numel()}")
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (target.max() >= num_classes or target.min() < 0):
        raise ValueError(f"mIoU: target holds class {int(target.max())} but num_classes is {num_classes}")
    idx = target * num_classes + pred.clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(conf: torch.Tensor) -> torch.Tensor:
    """Per-class IoU = TP / (TP + FP + FN); NaN for a class absent from both prediction and target."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> float:
    """Mean IoU over the classes present in prediction or target (dataset-level confusion)."""
    iou = iou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))
    return float(iou.nanmean()) if (~iou.isnan()).any() else float("nan")


class LinearSegHead(nn.Module):
    """The linear probe: BatchNorm2d over the frozen features, then a 1x1 convolution to class logits."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_dim)
        self.classifier = nn.Conv2d(in_dim, num_classes, kernel_size=1)

    def forward(self, feats: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Patch features [B, D, h, w] -> logits [B, C, *out_size] (bilinear upsampling)."""
        logits = self.classifier(self.norm(feats))
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class ProbeConfig:
    """How the linear probe is trained."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0


@torch.no_grad()
def extract_patch_features(
    feature_fn: Callable[[torch.Tensor], torch.Tensor], images: Sequence[torch.Tensor] | torch.Tensor, batch_size: int = 16
) -> torch.Tensor:
    """Frozen features of all images -> [N, D, h, w] (fp32, CPU); the backbone runs once, not per epoch."""
    out = []
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        batch = batch if isinstance(batch, torch.Tensor) else torch.stack(list(batch))
        out.append(feature_fn(batch).float().cpu())
    return torch.cat(out)


def train_linear_probe(
    feats: torch.Tensor, masks: torch.Tensor, num_classes: int, cfg: ProbeConfig = ProbeConfig()
) -> LinearSegHead:
    """Fit a LinearSegHead on cached features [N, D, h, w] against label maps [N, H, W] (255 = ignore)."""
    if feats.shape[0] != masks.shape[0]:
        raise ValueError(f"segprobe: {feats.shape[0]} feature maps but {masks.shape[0]} masks")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    head = LinearSegHead(feats.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * -(-feats.shape[0] // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
    masks = masks.long()
    head.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(feats.shape[0], generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            if len(idx) < 2 and len(order) > 1:  # BatchNorm needs more than one sample in train mode
                continue
            logits = head(feats[idx], masks.shape[-2:])
            loss = F.cross_entropy(logits, masks[idx], ignore_index=IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


@torch.no_grad()
def predict_masks(head: LinearSegHead, feats: torch.Tensor, out_size: tuple[int, int], batch_size: int = 32) -> torch.Tensor:
    """Argmax class map [N, H, W] of a trained probe."""
    head.eval()
    return torch.cat([head(feats[i:i + batch_size], out_size).argmax(1) for i in range(0, feats.shape[0], batch_size)])


def evaluate_segprobe(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    train_images: torch.Tensor,
    train_masks: torch.Tensor,
    test_images: torch.Tensor,
    test_masks: torch.Tensor,
    num_classes: int,
    cfg: ProbeConfig = ProbeConfig(),
) -> dict[str, float]:
    """Train the probe on the train split and report {miou, pixel_acc, train_miou} on the test split."""
    train_feats = extract_patch_features(feature_fn, train_images)
    test_feats = extract_patch_features(feature_fn, test_images)
    head = train_linear_probe(train_feats, train_masks, num_classes, cfg)
    pred = predict_masks(head, test_feats, test_masks.shape[-2:])
    valid = test_masks != IGNORE_INDEX
    train_pred = predict_masks(head, train_feats, train_masks.shape[-2:])
    return {
        "miou": mean_iou(pred, test_masks, num_classes),
        "pixel_acc": float((pred[valid] == test_masks[valid]).float().mean()) if valid.any() else float("nan"),
        "train_miou": mean_iou(train_pred, train_masks, num_classes),
    }
