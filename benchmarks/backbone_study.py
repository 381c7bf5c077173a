"""E-RADIO vs ViT students: parameters, forward FLOPs and CPU throughput (AM-RADIO Table 6/7 at CPU scale).

For each student (default: eradio_b, vit_h16): parameters, forward GFLOPs per image at --res (the student's own
figure: analytic for ViTs, FlopCounterMode on the meta device for E-RADIO / timm students), and eval-forward
throughput on this CPU in fp32 (no_grad) at each batch size in --batches; rounds alternate between the students so
other load hits both alike, and medians are reported. Then the throughput ratio (first / second) next to the
analytic FLOP ratio (second / first). 3 summary teachers (two_stage's), no heads.

    python benchmarks/backbone_study.py [--archs eradio_b,vit_h16] [--res 224] [--batches 1,8] [--rounds 2]

--distill (AM-RADIO Table 7 at CPU size): every student in --students is distilled under one recipe and one data
budget (`distill_effnet`: the real ImageNet EfficientNet-Lite0 teacher, --steps steps x 64 images at 64 px, seed
--seed, one rank) with radio-launch, then measured on held-out images with benchmarks/real_distillation.py's
evaluation: parameters (student backbone, heads excluded), analytic forward GFLOPs per image at 64 px (the
student's own count), CPU throughput (median training img/s from the run's metrics, teacher included, and the
student's eval-forward img/s at batch 64), the held-out feature-distillation loss (the recipe's loss terms:
summary cosine distance + spatial 0.9 cosine + 0.1 smooth-L1, weighted as in the recipe) and summary/spatial cosine
to the teacher on digits/val, and k-NN top-1 of the effnet summary head on digits/val and lfw/val.
--tiny-teachers adds the smoke recipe's tiny random-weight CLIP and DINOv2 teachers to the one group (multi-teacher
distillation; the measurements stay against EfficientNet-Lite0).

    python benchmarks/backbone_study.py --distill [--steps 60] [--students vit,eradio,resnet,regnety,convnext]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import sys
from pathlib import Path

from radio_scale.config.schema import StudentConfig
from radio_scale.models import student_forward_flops
from radio_scale.models.registry import build_any_student, is_vit

SUMMARY_TEACHERS = ("dfn_clip", "openai_clip", "dinov2")

# --distill students: name -> (label, recipe overrides). "vit" is distill_effnet's own student.
DISTILL_STUDENTS = {
    "vit": ("ViT (recipe student: width 192, depth 6, patch 32)", []),
    "eradio": ("E-RADIO (eradio_pico, width 16, stride 16)", ["student.arch=eradio_pico"]),
    "eradio_noup": ("E-RADIO w/o upsample (eradio_pico_noup)", ["student.arch=eradio_pico_noup"]),
    "resnet": ("timm:resnet18", ["student.arch=timm:resnet18"]),
    "regnety": ("timm:regnety_002", ["student.arch=timm:regnety_002"]),
    "convnext": ("timm:convnext_atto", ["student.arch=timm:convnext_atto"]),
    "efficientnet": ("timm:efficientnet_b0", ["student.arch=timm:efficientnet_b0"]),
}


# --tiny-teachers: the smoke recipe's tiny random-weight CLIP and DINOv2 teachers join the real EfficientNet-Lite0
# in the one group (the measurements stay against EfficientNet-Lite0, the only teacher with real knowledge)
TINY_TEACHERS = [
    "teachers.clip={family: open_clip, model: ViT-B-16, random_init: true, input_size: 64, model_kwargs: {tiny: true}}",
    "teachers.dino={family: dinov2, model: vit_small_patch14_dinov2, random_init: true, input_size: 56, "
    "model_kwargs: {tiny: true}}",
    "stages.0.groups.0.teachers=[effnet, clip, dino]",
]


def student_gflops(sc: StudentConfig, student, resolution: int, num_summary: int) -> float:
    """The student's own forward FLOP figure per image (analytic for ViTs, the student's count otherwise), in G."""
    if is_vit(sc.arch):
        return student_forward_flops(sc, resolution, num_summary_tokens=num_summary) / 1e9
    return student.forward_flops(resolution) / 1e9


@torch.no_grad()
def heldout_loss(model_dir: Path, set_name: str = "digits") -> float:
    """The recipe's distillation loss of the export's effnet head against the teacher on `set_name`/val."""
    import real_distillation as rd

    from radio_scale.eval.datasets import classification_set
    from radio_scale.eval.loading import load_student
    from radio_scale.eval.report import eval_resolution
    from radio_scale.eval.suite import build_eval_teacher
    from radio_scale.losses.terms import spatial_loss, summary_loss

    student, heads, cfg = load_student(model_dir)
    tc = next(t for t in cfg.teachers if t.name == rd.TEACHER)
    teacher = build_eval_teacher(cfg, rd.TEACHER)
    images = classification_set(set_name).test_images
    t_sum, t_sp = rd.teacher_features(teacher, images)
    s_sum, s_sp = rd.student_features(student, heads, images, eval_resolution(cfg))
    return float(tc.summary_weight * summary_loss(s_sum, t_sum).mean()
                 + tc.spatial_weight * spatial_loss(s_sp, t_sp).mean())


def eval_throughput(model_dir: Path, resolution: int = 64, batch: int = 64, rounds: int = 3) -> float:
    """Median eval-forward img/s of the exported student alone (fp32, no_grad) at `resolution`."""
    from radio_scale.eval.loading import load_student

    student = load_student(model_dir)[0].eval()
    x = torch.randn(batch, 3, resolution, resolution)
    times = []
    with torch.no_grad():
        student(x)
        for _ in range(rounds):
            t0 = time.perf_counter()
            student(x)
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def distill(args) -> int:
    """Distil each student under one recipe and budget, measure it on held-out images, print the table."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import json
    import tempfile

    import real_distillation as rd

    from radio_scale.config import load_config
    from radio_scale.eval.loading import load_student

    names = [n for n in args.students.split(",") if n]
    unknown = [n for n in names if n not in DISTILL_STUDENTS]
    if unknown:
        print(f"--students: unknown {unknown} (known: {', '.join(DISTILL_STUDENTS)})", file=sys.stderr)
        return 2
    root = args.run_root or Path(tempfile.mkdtemp(prefix="backbone_distill_"))
    load = os.getloadavg()[0]
    rows = []
    for name in names:
        label, arch_overrides = DISTILL_STUDENTS[name]
        overrides = [f"seed={args.seed}", f"stages.0.steps={args.steps}", f"checkpoint.every={args.steps}",
                     *arch_overrides, *(TINY_TEACHERS if args.tiny_teachers else []), *args.overrides]
        run_dir = root / name / "run"
        export = run_dir / "export"
        if args.reuse and (export / "model.safetensors").is_file():
            print(f"[{name}] measuring the finished run in {run_dir} (--reuse)", flush=True)
            wall = None
        else:
            print(f"[{name}] training {rd.RECIPE} ({' '.join(overrides)}) into {run_dir} ...", flush=True)
            proc, wall = rd.launch(run_dir, overrides, ranks=1)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
                print(f"[{name}] radio-launch failed with exit code {proc.returncode}", file=sys.stderr)
                return 1
        student, _heads, cfg = load_student(export)
        sc = cfg.student
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train_ips = statistics.median(r["images_per_s"] for r in recs if "images_per_s" in r)
        res = rd.evaluate(export, teachers=[rd.TEACHER])[rd.TEACHER]
        row = {
            "student": label, "arch": sc.arch, "train_wall_s": None if wall is None else round(wall, 1),
            "params_m": sum(p.numel() for p in student.parameters()) / 1e6,
            "gflops": student_gflops(sc, student, 64, len(student.summary_teachers)),
            "train_img_s": train_ips, "eval_img_s": eval_throughput(export),
            "loss": heldout_loss(export, "digits"),
            "final_train_loss": recs[-1]["loss/total"],
            "results": res,
        }
        rows.append(row)
        print(f"[{name}] {'reused' if wall is None else f'trained in {wall:.0f} s'}; digits/val loss {row['loss']:.4f}, k-NN top-1 "
              f"{res['digits']['student_top1']:.3f}", flush=True)
    cfg0 = load_config(rd.RECIPE)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; recipe {rd.RECIPE}, "
          f"{args.steps} steps x {cfg0.stages[0].groups[0].batch_per_rank} images at "
          f"{cfg0.stages[0].groups[0].resolution} px, seed {args.seed}, 1 rank; held-out: digits/val, lfw/val; "
          f"load average {load:.2f} -> {os.getloadavg()[0]:.2f}\n")
    print("| student | params (M) | GFLOPs/img @64 | train img/s | eval img/s | held-out loss | summary cos "
          "| spatial cos | k-NN top-1 digits | k-NN top-1 lfw |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d, lfw = r["results"]["digits"], r["results"]["lfw"]
        print(f"| {r['student']} | {r['params_m']:.2f} | {r['gflops']:.3f} | {r['train_img_s']:.0f} "
              f"| {r['eval_img_s']:.0f} | {r['loss']:.4f} | {d['student_summary_cos']:.3f} "
              f"| {d['student_spatial_cos']:.3f} | {d['student_top1']:.3f} | {lfw['student_top1']:.3f} |")
    d, lfw = rows[0]["results"]["digits"], rows[0]["results"]["lfw"]
    print(f"\nteacher k-NN top-1: digits {d['teacher_top1']:.3f}, lfw {lfw['teacher_top1']:.3f}; best constant "
          f"predictor on digits/val: summary cos {d['constant_summary_cos']:.3f}, spatial cos "
          f"{d['constant_spatial_cos']:.3f}; untrained k-NN top-1 digits / lfw: "
          + ", ".join(f"{r['arch']} {r['results']['digits']['initial_top1']:.3f} / "
                      f"{r['results']['lfw']['initial_top1']:.3f}" for r in rows))
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "seed": args.seed, "rows": rows}, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="eradio_b,vit_h16")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each: 1 timed batch per student)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--distill", action="store_true", help="distil --students from the real teacher (see above)")
    ap.add_argument("--students", default="vit,eradio,resnet,regnety,convnext",
                    help=f"--distill: comma-separated, of {', '.join(DISTILL_STUDENTS)}")
    ap.add_argument("--steps", type=int, default=60, help="--distill: training steps per student")
    ap.add_argument("--seed", type=int, default=0, help="--distill: run seed")
    ap.add_argument("--tiny-teachers", action="store_true",
                    help="--distill: add the tiny random-weight CLIP and DINOv2 teachers to the recipe's group")
    ap.add_argument("--run-root", type=Path, help="--distill: keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="--distill: also write the rows here")
    ap.add_argument("--reuse", action="store_true",
                    help="--distill: measure a student's finished run in --run-root instead of training it again")
    ap.add_argument("overrides", nargs="*", help="--distill: further key=value recipe overrides for every run")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.distill:
        if not args.threads:
            torch.set_num_threads(max(1, os.cpu_count() or 1))
        return distill(args)
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
