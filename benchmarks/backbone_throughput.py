"""Student backbone throughput: measured on this CPU for the small presets, analytic for the large ones.

Measured (vit_s16, vit_b16 by default): eval forward (no_grad, global attention), fp32, 224 px, batch 8,
images/s; rounds alternate between the presets and a square fp32 matmul (the machine's measured peak), and
medians are reported, so other load hits every row alike (images per process-CPU-second are printed too). Their analytic FLOPs are cross-checked against
torch's FlopCounterMode on the meta device.
Analytic (vit_l16, vit_h16, vit_g14 by default): forward GFLOPs per image at 224 / 432 / 1024 px (global
attention; radio_scale.models.student_forward_flops) and parameters (radio_scale.models.student_param_count);
nothing is built or run for them.

Every student: StudentConfig(arch, cpe_grid=128) with 3 summary tokens (two_stage's summary teachers:
dfn_clip, openai_clip, dinov2), no registers, no heads.

    python benchmarks/backbone_throughput.py [--measure vit_s16,vit_b16] [--analytic vit_l16,vit_h16,vit_g14]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from radio_scale.config.schema import StudentConfig
from radio_scale.eval.throughput import flop_crosscheck, measure_matmul_peak, measure_throughput
from radio_scale.models import build_student, resolve_student_dims, student_forward_flops, student_param_count

SUMMARY_TEACHERS = ("dfn_clip", "openai_clip", "dinov2")


def student_config(arch: str) -> StudentConfig:
    """The benchmarked student of a preset."""
    return StudentConfig(arch=arch, cpe_grid=128)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", default="vit_s16,vit_b16", help="presets to time on this machine")
    ap.add_argument("--analytic", default="vit_l16,vit_h16,vit_g14", help="presets to describe analytically only")
    ap.add_argument("--res", type=int, default=224, help="resolution of the measured rows")
    ap.add_argument("--analytic-res", default="224,432,1024", help="resolutions of the analytic columns")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each: 2 timed batches per preset)")
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    measured = [a for a in args.measure.split(",") if a]
    analytic = [a for a in args.analytic.split(",") if a]
    n_sum = len(SUMMARY_TEACHERS)
    load_before = os.getloadavg()[0]

    models, flops, check = {}, {}, {}
    for arch in measured:
        torch.manual_seed(0)
        models[arch] = build_student(student_config(arch), SUMMARY_TEACHERS).eval()
        flops[arch] = student_forward_flops(student_config(arch), args.res, num_summary_tokens=n_sum)
        check[arch] = flop_crosscheck(models[arch], student_config(arch), args.res, n_sum)["rel_diff"]
    ips: dict[str, list[float]] = {a: [] for a in measured}
    cpu_ips: dict[str, list[float]] = {a: [] for a in measured}
    peaks: list[float] = []
    for arch, m in models.items():  # warm-up
        measure_throughput(m, args.res, args.batch, warmup=1, iters=1)
    for _ in range(args.rounds):
        peaks.append(measure_matmul_peak(n=args.matmul_n, iters=5))
        for arch, m in models.items():
            c0 = time.process_time()
            r = measure_throughput(m, args.res, args.batch, warmup=0, iters=2)
            ips[arch].append(r.images_per_s)
            cpu_ips[arch].append(2 * args.batch / (time.process_time() - c0))
    peak = statistics.median(peaks)

    print(f"fp32, torch threads {torch.get_num_threads()}, batch {args.batch}, {args.rounds} interleaved rounds; "
          f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s (median; {min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f})\n")
    print(f"Measured on this CPU: eval forward at {args.res} px")
    print("| preset | params M | GFLOP/img (analytic; vs counted) | images/s (median; min-max) | GFLOP/s | of matmul peak "
          "| images per CPU-second |")
    print("|---|---|---|---|---|---|---|")
    for arch in measured:
        params = sum(p.numel() for p in models[arch].parameters())
        med = statistics.median(ips[arch])
        print(f"| {arch} | {params / 1e6:.1f} | {flops[arch] / 1e9:.2f} ({100 * check[arch]:.1f} % off) | "
              f"{med:.2f} ({min(ips[arch]):.2f}-{max(ips[arch]):.2f}) | {med * flops[arch] / 1e9:.1f} | "
              f"{med * flops[arch] / peak:.2f} | {statistics.median(cpu_ips[arch]):.2f} |")

    resolutions = [int(r) for r in args.analytic_res.split(",") if r]
    print("\nAnalytic only (not built, not run): forward GFLOP per image, global attention")
    print("| preset | params M | " + " | ".join(f"GFLOP @{r}" for r in resolutions) + " |")
    print("|---|---|" + "---|" * len(resolutions))
    for arch in analytic:
        sc = student_config(arch)
        patch = resolve_student_dims(sc).patch_size
        cells = []
        for r in resolutions:
            side = round(r / patch) * patch  # a patch-14 preset runs at the nearest multiple of 14
            gflops = student_forward_flops(sc, side, num_summary_tokens=n_sum) / 1e9
            cells.append(f"{gflops:.0f}" if side == r else f"{gflops:.0f} (at {side} px)")
        print(f"| {arch} | {student_param_count(sc, n_sum) / 1e6:.0f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
