"""Step FLOP/s against the machine's fp32 matmul peak (MFU on this CPU).

The step is `Trainer.train_step` as in a job (world 1, gloo, FSDP2) with a ViT-S/16 student and the smoke
recipe's tiny teachers (see trainer_overhead.py). Its FLOPs are analytic, 1 MAC = 2 FLOPs:
  student: 3 x radio_scale.models.student_forward_flops (forward + backward = 3 forwards), per image
  heads:   3 x 2 x (weights of every adaptor-head Linear) x the tokens each head sees (training runs every head)
  teachers: teacher_spec(tc).forward_gflops (forward only, no_grad)
The peak is a square fp32 matmul at the same thread count, timed as radio_scale.eval.throughput.measure_matmul_peak
times it (which is also printed once), on both the wall clock and the process CPU clock. Steps and peak
measurements are interleaved (peak, step, peak, step, ...) and medians compared, so other load on the machine
hits both alike; with one torch thread (the default) the CPU-clock ratio holds even while other jobs share the
cores.

    python benchmarks/step_flops.py [--arch vit_s16] [--res 128] [--batch 8] [--steps 8] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from radio_scale.eval.throughput import measure_matmul_peak
from radio_scale.models import student_forward_flops
from radio_scale.teachers import teacher_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_overhead import add_setup_args, bench_config, build_trainer, trainer_step  # noqa: E402  (same step, same setup)


def head_forward_flops(heads: nn.Module, summary_tokens: int, patch_tokens: int) -> float:
    """Forward FLOPs of every adaptor head for one image: summary MLPs on one token, spatial MLPs on every patch."""
    total = 0.0
    for kind, tokens in (("summary", summary_tokens), ("spatial", patch_tokens)):
        for mlp in getattr(heads, kind).values():
            total += sum(2.0 * m.in_features * m.out_features * tokens for m in mlp.modules()
                         if isinstance(m, nn.Linear))
    return total


def matmul_peak(n: int, iters: int) -> tuple[float, float]:
    """(wall, process-CPU) FLOP/s of an n x n fp32 matmul: one warm-up, then `iters` timed products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        a @ b
    flops = 2.0 * n**3 * iters
    return flops / (time.perf_counter() - t0), flops / (time.process_time() - c0)


def step_flops(cfg, trainer) -> dict[str, float]:
    """Analytic FLOPs of one training step of stage 0's first group, by part."""
    g = cfg.stages[0].groups[0]
    n_summary = len(trainer.model.student.summary_teachers)
    grid = g.resolution // trainer.model.student.patch_size
    own = getattr(trainer.model.student, "forward_flops", None)  # E-RADIO / timm students: their own count
    student = 3 * (own(g.resolution) if own else
                   student_forward_flops(cfg.student, g.resolution, num_summary_tokens=n_summary))
    heads = 3 * head_forward_flops(trainer.model.heads, 1, grid * grid)
    teachers = sum(teacher_spec(cfg.teacher(n)).forward_gflops * 1e9 for n in g.teachers)
    return {"student fwd+bwd": g.batch_per_rank * student, "heads fwd+bwd": g.batch_per_rank * heads,
            "teachers fwd": g.batch_per_rank * teachers}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(ap)
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--matmul-n", type=int, default=2048, help="side of the square matmul that measures the peak")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: process CPU time = compute even on a shared machine; 0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from radio_scale.distributed.env import shutdown

    cfg = bench_config(args.arch, args.res, args.batch, args.teachers)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="step_flops_") as tmp:
        trainer, group, batches = build_trainer(cfg, Path(tmp) / "run", args.steps + 2)
        parts = step_flops(cfg, trainer)
        for batch in batches[:2]:  # warm-up
            trainer_step(trainer, group, batch)
        library_peak = measure_matmul_peak(n=args.matmul_n, iters=3)
        peaks, steps = [], []
        for batch in batches[2:]:
            peaks.append(matmul_peak(args.matmul_n, 3))
            t0, c0 = time.perf_counter(), time.process_time()
            trainer_step(trainer, group, batch)
            steps.append((time.perf_counter() - t0, time.process_time() - c0))
        peaks.append(matmul_peak(args.matmul_n, 3))  # bracket the last step too
        trainer.checkpointer.close()
        trainer.stage.close()
    shutdown()

    med = statistics.median
    total = sum(parts.values())
    print(f"student {args.arch} @{args.res}px, batch {args.batch}, teachers {args.teachers}; fp32, torch threads "
          f"{torch.get_num_threads()}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after\n")
    print("| part | GFLOP/step (analytic) | share |")
    print("|---|---|---|")
    for k, v in parts.items():
        print(f"| {k} | {v / 1e9:.1f} | {100 * v / total:.0f} % |")
    print(f"| total | {total / 1e9:.1f} | |\n")
    print(f"| clock | step ms (median of {len(steps)}) | step GFLOP/s | fp32 matmul {args.matmul_n}^2 GFLOP/s "
          f"(median of {len(peaks)}) | MFU on this CPU |")
    print("|---|---|---|---|---|")
    for i, clock in enumerate(("wall", "process CPU")):
        step_s, peak = med(s[i] for s in steps), med(p[i] for p in peaks)
        print(f"| {clock} | {1e3 * step_s:.0f} | {total / step_s / 1e9:.1f} | {peak / 1e9:.1f} | "
              f"**{total / step_s / peak:.3f}** |")
    print(f"\n(measure_matmul_peak, once, wall clock: {library_peak / 1e9:.1f} GFLOP/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
