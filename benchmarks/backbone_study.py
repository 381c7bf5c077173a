"""E-RADIO vs ViT students: parameters, forward FLOPs and CPU throughput (AM-RADIO Table 6/7 at CPU scale).

For each student (default: eradio_b, vit_h16): parameters, forward GFLOPs per image at --res (the student's own
figure: analytic for ViTs, FlopCounterMode on the meta device for E-RADIO / timm students), and eval-forward
throughput on this CPU in fp32 (no_grad) at each batch size in --batches; rounds alternate between the students so
other load hits both alike, and medians are reported. Then the throughput ratio (first / second) next to the
analytic FLOP ratio (second / first). 3 summary teachers (two_stage's), no heads.

    python benchmarks/backbone_study.py [--archs eradio_b,vit_h16] [--res 224] [--batches 1,8] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from radio_scale.config.schema import StudentConfig
from radio_scale.models import student_forward_flops
from radio_scale.models.registry import build_any_student, is_vit

SUMMARY_TEACHERS = ("dfn_clip", "openai_clip", "dinov2")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="eradio_b,vit_h16")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each: 1 timed batch per student)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = [a for a in args.archs.split(",") if a]
    batches = [int(b) for b in args.batches.split(",") if b]
    models, flops, params = {}, {}, {}
    for arch in archs:
        torch.manual_seed(0)
        sc = StudentConfig(arch=arch, cpe_grid=128)
        m = build_any_student(sc, SUMMARY_TEACHERS).eval()
        models[arch] = m
        params[arch] = sum(p.numel() for p in m.parameters())
        flops[arch] = (student_forward_flops(sc, args.res, num_summary_tokens=len(SUMMARY_TEACHERS)) if is_vit(arch)
                       else m.forward_flops(args.res))
    times: dict = {(a, b): [] for a in archs for b in batches}
    load = os.getloadavg()[0]
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, 3, args.res, args.res)
            for a in archs:
                models[a](x)  # warm-up
            for _ in range(args.rounds):
                for a in archs:
                    t0 = time.perf_counter()
                    models[a](x)
                    times[(a, b)].append(time.perf_counter() - t0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.res} px, fp32, eval forward; "
          f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print("| student | params (M) | GFLOPs/img | " + " | ".join(f"img/s @ batch {b}" for b in batches) + " |")
    print("|---|---|---|" + "---|" * len(batches))
    ips = {}
    for a in archs:
        cells = []
        for b in batches:
            ips[(a, b)] = b / statistics.median(times[(a, b)])
            cells.append(f"{ips[(a, b)]:.2f}")
        print(f"| {a} | {params[a] / 1e6:.1f} | {flops[a] / 1e9:.1f} | " + " | ".join(cells) + " |")
    if len(archs) >= 2:
        a, v = archs[0], archs[1]
        ratios = ", ".join(f"batch {b}: {ips[(a, b)] / ips[(v, b)]:.2f}x" for b in batches)
        print(f"\nthroughput {a} / {v}: {ratios}; analytic FLOP ratio {v} / {a}: {flops[v] / flops[a]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
