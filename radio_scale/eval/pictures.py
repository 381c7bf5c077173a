"""Pictures of a run: loss curves from metrics.jsonl and PCA maps of student vs teacher features."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def read_loss_history(metrics_path: str | Path, prefix: str = "loss/") -> dict[str, tuple[list[int], list[float]]]:
    """`metrics.jsonl` records -> {key: (steps, values)} for every key starting with `prefix`."""
    path = Path(metrics_path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"loss curves: no metrics file at {path}")
    series: dict[str, tuple[list[int], list[float]]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            # a run killed mid-write leaves a truncated last line; earlier lines are still valid
            continue
        if not isinstance(rec, dict) or "step" not in rec:
            continue
        for key, value in rec.items():
            if key.startswith(prefix) and isinstance(value, (int, float)) and np.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(rec["step"]))
                values.append(float(value))
    return series


def plot_loss_curves(metrics_path: str | Path, out_png: str | Path, prefix: str = "loss/") -> Path:
    """Plot every `loss/...` series of a run against its step into one PNG."""
    series = read_loss_history(metrics_path, prefix)
    if not series:
        raise ValueError(f"loss curves: no '{prefix}*' values with a 'step' in {metrics_path}")
    fig, ax = plt.subplots(figsize=(8, 5))
    for key in sorted(series):
        steps, values = series[key]
        ax.plot(steps, values, label=key[len(prefix):] or key, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(v > 0 for _, vals in series.values() for v in vals):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def pca_basis(feats: torch.Tensor, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [C] and first n principal directions [C, n] of a feature map [C, h, w]."""
    x = feats.float().flatten(1).T  # positions x channels
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    basis = v[:n].T
    if basis.shape[1] < n:  # fewer positions/channels than components: pad with zeros
        basis = torch.cat([basis, basis.new_zeros(basis.shape[0], n - basis.shape[1])], 1)
    return mean, basis


def pca_rgb(feats: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor,
            lo: Optional[torch.Tensor] = None, hi: Optional[torch.Tensor] = None) -> np.ndarray:
    """Project a feature map [C, h, w] onto a PCA basis -> an RGB image [h, w, 3] in 0..1."""
    c, h, w = feats.shape
    proj = (feats.float().flatten(1).T - mean) @ basis  # [h*w, 3]
    lo = proj.quantile(0.01, dim=0) if lo is None else lo
    hi = proj.quantile(0.99, dim=0) if hi is None else hi
    rgb = ((proj - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1)
    return rgb.T.reshape(3, h, w).permute(1, 2, 0).numpy()


def pca_pair(student: torch.Tensor, teacher: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """RGB PCA maps of a student head map and its teacher map [C, h, w], in the teacher's basis and colour range.

    One shared basis makes the colours comparable: the same colour means the same feature direction.
    """
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"PCA maps: student has {student.shape[0]} channels, teacher {teacher.shape[0]}")
    mean, basis = pca_basis(teacher)
    proj = (teacher.float().flatten(1).T - mean) @ basis
    lo, hi = proj.quantile(0.01, dim=0), proj.quantile(0.99, dim=0)
    return pca_rgb(student, mean, basis, lo, hi), pca_rgb(teacher, mean, basis, lo, hi)


def plot_pca_maps(
    image: torch.Tensor,
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
    out_png: str | Path,
) -> Path:
    """One row per teacher: the image (0..1 [3, H, W]), the student head's PCA map, the teacher's PCA map."""
    if not pairs:
        raise ValueError("PCA maps: no (student, teacher) feature pair given")
    img = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    fig, axes = plt.subplots(len(pairs), 3, figsize=(9, 3 * len(pairs)), squeeze=False)
    for row, (name, (s, t)) in enumerate(pairs.items()):
        s_rgb, t_rgb = pca_pair(s.detach().cpu(), t.detach().cpu())
        for ax, pic, title in zip(axes[row], (img, s_rgb, t_rgb), ("image", f"student → {name}", f"teacher {name}")):
            ax.imshow(pic, interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def log_pictures(paths: Sequence[str | Path], tracker=None, artifact_path: str = "pictures") -> None:
    """Log PNGs as MLflow artifacts through a started Tracker (no-op without one)."""
    if tracker is None:
        return
    for p in paths:
        tracker.log_artifact(str(p), artifact_path)
