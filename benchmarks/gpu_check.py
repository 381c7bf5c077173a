"""GPU check, run by hand on one H100 / H200 (about 2-4 minutes; CI has no GPU and never runs or imports this).

  (a) student:  ViT-H/16 @432 forward + backward, bf16 parameters, batch 32: images/s, TFLOP/s, MFU against the
                card's dense bf16 peak (H100 SXM / H200: 989 TFLOPS) and against a measured bf16 matmul;
                target MFU >= 45 %. --compile also times a torch.compile'd copy.
  (b) step:     one full distillation step of the two_stage recipe's CLIP+DINOv2 group through the real
                Trainer (world 1, NCCL, FSDP2 bf16, activation checkpointing, as configured) with full-size
                architectures and random weights (TeacherConfig random_init: DFN CLIP-H/14-378, OpenAI
                CLIP-L/14-336, DINOv2-g/14-reg4; nothing is downloaded), student @432, reduced batch.
  (c) teachers: forward images/s at the paper's resolutions (DFN CLIP-H/14@378, CLIP-L/14@336, DINOv2-g@224,
                SAM-H@1024), bf16.

Each part runs in its own try/except (a failure is recorded, the others still run) and only if the time
budget allows it. Results print as a table and go to $OUT/gpu_check.json (or --json) after every part.
--cpu-dry runs the same code on CPU with tiny sizes and fp32, to check the script without a GPU.

    python benchmarks/gpu_check.py [--batch 32] [--step-batch 8] [--compile] [--budget-s 280]
    python benchmarks/gpu_check.py --cpu-dry
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch

# Dense bf16 tensor-core peaks (no sparsity), from NVIDIA's data sheets; the first name that matches wins.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("GH200", 989.0))
MFU_TARGET = 0.45
SUMMARY_TEACHERS = ("dfn_clip", "openai_clip", "dinov2")  # two_stage's teachers with a summary (CLS) token
TEACHER_BATCH = {"dfn_clip": 32, "openai_clip": 32, "dinov2": 64, "sam": 4}


@dataclass(frozen=True)
class Sizes:
    """What each part runs: the real sizes on a GPU, tiny ones for --cpu-dry."""

    student_arch: str
    student_res: int
    student_batch: int
    step_res: int
    step_batch: int
    tiny: bool
    warmup: int
    iters: int
    recipe_overrides: tuple[str, ...] = ()


def sizes_for(args: argparse.Namespace) -> Sizes:
    """Real sizes, or tiny ones (same code path) for --cpu-dry."""
    if not args.cpu_dry:
        return Sizes("vit_h16", 432, args.batch, 432, args.step_batch, tiny=False, warmup=3, iters=args.iters)
    tiny_student = ("student.arch=vit_pico16", "student.cpe_grid=32", "student.global_blocks=[1]",
                    "student.window_sizes=[0,2]")
    return Sizes("vit_pico16", 64, 2, 64, 2, tiny=True, warmup=1, iters=1, recipe_overrides=tiny_student)


class Budget:
    """Wall-clock budget of the whole check: parts that would not fit are skipped, not started."""

    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


class Report:
    """Results by part, written to JSON after every part (a later crash or kill keeps what was measured)."""

    def __init__(self, path: Optional[Path], meta: dict):
        self.path = path
        self.data = {"meta": meta, "parts": {}}

    def record(self, part: str, result: dict) -> None:
        self.data["parts"][part] = result
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1, default=str))


def card_peak(name: str) -> Optional[float]:
    """The card's dense bf16 peak in FLOP/s from its name, or None for a card not in the table."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of one call of fn after warm-up calls (each call synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def max_memory_gb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def utilisation(flops: float, seconds: float, peak: Optional[float], matmul_peak: float) -> dict:
    """Achieved TFLOP/s and MFU against the card's peak and against the measured matmul peak."""
    achieved = flops / seconds
    return {"tflops": achieved / 1e12, "mfu": achieved / peak if peak else None,
            "of_measured_matmul_peak": achieved / matmul_peak}


# ---------------------------------------------------------------------------------------------- (a) student
def part_student(sz: Sizes, device: torch.device, dtype: torch.dtype, peak: Optional[float], matmul_peak: float,
                 compile_too: bool) -> dict:
    """ViT-H/16 student forward + backward (no optimizer), parameters in `dtype`."""
    from radio_scale.config.schema import StudentConfig
    from radio_scale.models import build_student, student_forward_flops

    sc = StudentConfig(arch=sz.student_arch, cpe_grid=32 if sz.tiny else 128)
    torch.manual_seed(0)
    model = build_student(sc, SUMMARY_TEACHERS).to(device=device, dtype=dtype).train()
    x = torch.randn(sz.student_batch, 3, sz.student_res, sz.student_res, device=device, dtype=dtype)
    flops = 3 * student_forward_flops(sc, sz.student_res, num_summary_tokens=len(SUMMARY_TEACHERS)) * sz.student_batch

    def run(m) -> Callable[[], None]:
        def step() -> None:
            out = m(x)
            loss = out.patches.float().square().mean() + sum(s.float().square().mean() for s in out.summary.values())
            loss.backward()
            model.zero_grad(set_to_none=True)
        return step

    result = {"arch": sz.student_arch, "resolution": sz.student_res, "batch": sz.student_batch,
              "dtype": str(dtype), "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "gflop_per_step": flops / 1e9}
    fresh_memory(device)
    s = timed(run(model), device, sz.warmup, sz.iters)
    result.update({"step_ms": 1e3 * s, "images_per_s": sz.student_batch / s, "max_memory_gb": max_memory_gb(device),
                   **utilisation(flops, s, peak, matmul_peak)})
    if compile_too:
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        run(compiled)()
        sync(device)
        result["compile_s"] = time.perf_counter() - t0
        s = timed(run(compiled), device, max(1, sz.warmup - 1), sz.iters)
        u = utilisation(flops, s, peak, matmul_peak)
        result.update({"compiled_step_ms": 1e3 * s, "compiled_images_per_s": sz.student_batch / s,
                       "compiled_tflops": u["tflops"], "compiled_mfu": u["mfu"]})
    best = max((result.get("mfu"), result.get("compiled_mfu")), key=lambda v: -1 if v is None else v)
    result["meets_target"] = None if best is None else best >= MFU_TARGET
    return result


# ---------------------------------------------------------------------------------------------- (b) step
def step_config(sz: Sizes):
    """two_stage with random-weight teachers, its CLIP+DINOv2 group at `step_res` and a reduced batch, stage 0 only."""
    from radio_scale.config import load_config

    overrides = [f"teachers.{n}.{k}" for n in SUMMARY_TEACHERS for k in ("random_init=true", "checkpoint=null")]
    if sz.tiny:
        overrides += [f"teachers.{n}.model_kwargs={{tiny: true}}" for n in SUMMARY_TEACHERS]
        # timm's giant DINOv2 asserts its own widths: the dry run uses the small member of the same family
        overrides += ["teachers.dinov2.model=vit_small_patch14_reg4_dinov2", "teachers.dinov2.input_size=56"]
    overrides += [
        f"stages.0.groups.0.resolution={sz.step_res}", f"stages.0.groups.0.batch_per_rank={sz.step_batch}",
        "data.shards=bundled", "data.num_workers=0", "tracking.system_metrics=false", *sz.recipe_overrides,
    ]
    return load_config("two_stage", overrides)


def synthetic_batch(trainer, group, batch: int):
    """Random views of the group's sizes (the data pipeline is benchmarked elsewhere)."""
    from radio_scale.data.views import Batch

    res = group.resolution
    views = {n: torch.randn(batch, 3, trainer.stage.teachers[n].input_size, trainer.stage.teachers[n].input_size)
             for n in group.teachers}
    return Batch(torch.randn(batch, 3, res, res), views, None, [str(i) for i in range(batch)])


def part_step(sz: Sizes, device: torch.device, peak: Optional[float], matmul_peak: float, keep: dict) -> dict:
    """One Trainer.train_step of the CLIP+DINOv2 group; the built teachers are kept in `keep` for part (c)."""
    from radio_scale.distributed.env import init_distributed
    from radio_scale.models import student_forward_flops
    from radio_scale.train.trainer import Trainer

    cfg = step_config(sz)
    env = init_distributed(device=device.type)
    fresh_memory(device)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        t0 = time.perf_counter()
        trainer = Trainer(cfg, env, Path(tmp) / "run")
        t_model = time.perf_counter() - t0
        trainer._enter_stage(0)  # builds the random-weight teachers (on the CPU, from their seed) and the stream
        t_teachers = time.perf_counter() - t0 - t_model
        group = trainer.stage.groups[0]
        batch = synthetic_batch(trainer, group, sz.step_batch)
        n_sum = len(trainer.model.student.summary_teachers)
        teacher_flops = sum(trainer.stage.teachers[n].spec.forward_gflops * 1e9 for n in group.teachers)
        steps = []
        for i in range(sz.warmup + sz.iters):
            sync(device)
            t = time.perf_counter()
            stats = trainer.train_step({group.name: batch})  # returns host floats: synchronised
            trainer.step += 1
            if i >= sz.warmup:
                flops = sz.step_batch * (3 * student_forward_flops(cfg.student, group.resolution, stats.window, n_sum)
                                         + teacher_flops)
                steps.append((time.perf_counter() - t, flops, stats.window, stats.loss))
        keep.update(trainer.stage.teachers)
        result = {
            "group": group.name, "teachers": list(group.teachers), "resolution": group.resolution,
            "batch": sz.step_batch, "precision": cfg.precision, "activation_checkpointing":
            cfg.student.activation_checkpointing, "build_student_s": t_model, "build_teachers_s": t_teachers,
            "max_memory_gb": max_memory_gb(device), "finite": bool(stats.finite), "loss": stats.loss,
            "steps": [{"s": s, "window": w, "loss": loss, **utilisation(f, s, peak, matmul_peak)}
                      for s, f, w, loss in steps],
        }
        s, f = sorted(steps)[len(steps) // 2][:2]
        result.update({"step_ms": 1e3 * s, "images_per_s": sz.step_batch / s, **utilisation(f, s, peak, matmul_peak)})
        trainer.checkpointer.close()
        trainer.stage.close()
        del trainer
    fresh_memory(device)
    return result


# ---------------------------------------------------------------------------------------------- (c) teachers
def part_teachers(sz: Sizes, device: torch.device, dtype: torch.dtype, peak: Optional[float], matmul_peak: float,
                  have: dict, budget: Budget) -> dict:
    """Forward images/s of each paper teacher at its resolution (random weights)."""
    from radio_scale.eval.throughput import measure_throughput
    from radio_scale.teachers import build_teacher

    cfg = step_config(sz)
    results = {}
    for name, batch in TEACHER_BATCH.items():
        if budget.left() < 30:
            results[name] = {"skipped": f"time budget ({budget.left():.0f} s left)"}
            continue
        try:
            tc = replace(cfg.teacher(name), random_init=True, checkpoint=None)
            if sz.tiny:
                tc = replace(tc, model_kwargs={"tiny": True}, input_size=56 if name == "dinov2" else None,
                             model="vit_small_patch14_reg4_dinov2" if name == "dinov2" else tc.model)
                batch = 2
            built = 0.0
            teacher = have.pop(name, None)
            if teacher is None:
                t0 = time.perf_counter()
                teacher = build_teacher(tc, device).to(dtype)
                built = time.perf_counter() - t0
            fresh_memory(device)
            r = measure_throughput(teacher, teacher.input_size, batch, warmup=sz.warmup, iters=sz.iters,
                                   device=device)
            flops = teacher.spec.forward_gflops * 1e9
            results[name] = {"model": tc.model, "input_size": teacher.input_size, "batch": batch,
                             "params_m": sum(p.numel() for p in teacher.parameters()) / 1e6,
                             "gflop_per_image": flops / 1e9, "images_per_s": r.images_per_s, "build_s": built,
                             "max_memory_gb": max_memory_gb(device),
                             **utilisation(flops * batch, r.s_per_batch, peak, matmul_peak)}
            del teacher
        except Exception as e:  # one teacher failing must not lose the others
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
        fresh_memory(device)
    return results


# ---------------------------------------------------------------------------------------------- main
def print_table(data: dict) -> None:
    """The results as one markdown table."""
    def pct(v) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    meta = data["meta"]
    print(f"\n{meta['device_name']} | torch {meta['torch']} | peak bf16 {meta['peak_tflops'] or '?'} TFLOPS "
          f"(data sheet), measured matmul {meta['matmul_tflops']:.0f} TFLOPS ({meta['matmul_dtype']})\n")
    print("| part | what | ms | images/s | TFLOP/s | MFU (data-sheet peak) | of measured matmul | max mem GB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    parts = data["parts"]
    a = parts.get("a_student", {})
    if "step_ms" in a:
        rows.append(("(a) student", f"{a['arch']}@{a['resolution']} fwd+bwd, batch {a['batch']}", a["step_ms"],
                     a["images_per_s"], a["tflops"], a["mfu"], a["of_measured_matmul_peak"], a["max_memory_gb"]))
        if "compiled_step_ms" in a:
            rows.append(("(a) student, compiled", f"compile {a['compile_s']:.0f} s", a["compiled_step_ms"],
                         a["compiled_images_per_s"], a["compiled_tflops"], a["compiled_mfu"], None, None))
    b = parts.get("b_step", {})
    if "step_ms" in b:
        rows.append(("(b) distillation step", f"{'+'.join(b['teachers'])} @{b['resolution']}, batch {b['batch']}, "
                     f"teachers built in {b['build_teachers_s']:.0f} s", b["step_ms"], b["images_per_s"],
                     b["tflops"], b["mfu"], b["of_measured_matmul_peak"], b["max_memory_gb"]))
    for name, t in parts.get("c_teachers", {}).items():
        if isinstance(t, dict) and "images_per_s" in t:
            rows.append((f"(c) teacher {name}", f"{t['model']}@{t['input_size']}, batch {t['batch']}",
                         1e3 * t["batch"] / t["images_per_s"], t["images_per_s"], t["tflops"], t["mfu"],
                         t["of_measured_matmul_peak"], t["max_memory_gb"]))
    for part, what, ms, ips, tf, mfu, mm, mem in rows:
        print(f"| {part} | {what} | {ms:.1f} | {ips:.1f} | {tf:.3g} | {pct(mfu)} | {pct(mm)} | "
              f"{'-' if mem is None else f'{mem:.1f}'} |")
    for part, r in parts.items():
        failed = {k: v for k, v in (r.items() if isinstance(r, dict) else []) if k in ("error", "skipped")}
        for k, v in failed.items():
            print(f"{part}: {k}: {v}")
        if part == "c_teachers":
            for name, t in r.items():
                for k in ("error", "skipped"):
                    if isinstance(t, dict) and k in t:
                        print(f"{part} {name}: {k}: {t[k]}")
    if "mfu" in a and a.get("meets_target") is not None:
        best = max(v for v in (a.get("mfu"), a.get("compiled_mfu")) if v is not None)
        print(f"\nstudent MFU {pct(best)} (target >= {pct(MFU_TARGET)}): {'OK' if a['meets_target'] else 'BELOW TARGET'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry", action="store_true", help="run the same code on CPU, tiny sizes, fp32")
    ap.add_argument("--batch", type=int, default=32, help="(a) student batch")
    ap.add_argument("--step-batch", type=int, default=8, help="(b) distillation step batch")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per measurement")
    ap.add_argument("--compile", action="store_true", help="(a) also time a torch.compile'd student")
    ap.add_argument("--parts", default="a,b,c", help="which parts to run")
    ap.add_argument("--budget-s", type=float, default=280.0, help="skip parts that would start after this")
    ap.add_argument("--json", default=None, help="result file (default: $OUT/gpu_check.json if $OUT is set)")
    args = ap.parse_args(argv)

    if not args.cpu_dry and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available (torch.cuda.is_available() is False): run this on a machine with "
              "an NVIDIA GPU, or pass --cpu-dry to check the script on CPU with tiny sizes", file=sys.stderr)
        return 2
    # A hung collective or kernel must not eat the machine's time: dump every thread's stack and exit.
    faulthandler.dump_traceback_later(args.budget_s + 240, exit=True)
    device = torch.device("cpu" if args.cpu_dry else "cuda")
    dtype = torch.float32 if args.cpu_dry else torch.bfloat16  # bf16 matmuls on CPU are tens of times slower than fp32
    sz = sizes_for(args)
    budget = Budget(args.budget_s)
    name = "CPU (dry run)" if args.cpu_dry else torch.cuda.get_device_name(device)
    peak = None if args.cpu_dry else card_peak(name)
    from radio_scale.eval.throughput import measure_matmul_peak

    matmul_peak = measure_matmul_peak(dtype, device, n=512 if args.cpu_dry else 8192, iters=3 if args.cpu_dry else 20)
    out = args.json or (str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None)
    report = Report(Path(out) if out else None, {
        "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda, "dry_run": args.cpu_dry,
        "peak_tflops": None if peak is None else peak / 1e12, "matmul_tflops": matmul_peak / 1e12,
        "matmul_dtype": str(dtype), "sizes": sz.__dict__, "budget_s": args.budget_s,
    })
    print(f"gpu_check on {name}: data-sheet bf16 peak {peak / 1e12 if peak else '?'} TFLOPS, measured "
          f"{str(dtype)} matmul {matmul_peak / 1e12:.1f} TFLOPS", flush=True)
    parts = [p.strip() for p in args.parts.split(",")]
    kept: dict = {}
    # (part, minimum seconds it needs, how to run it)
    plan = [
        ("a", "a_student", 40, lambda: part_student(sz, device, dtype, peak, matmul_peak, args.compile)),
        ("b", "b_step", 90, lambda: part_step(sz, device, peak, matmul_peak, kept)),
        ("c", "c_teachers", 40, lambda: part_teachers(sz, device, dtype, peak, matmul_peak, kept, budget)),
    ]
    for key, part, need, fn in plan:
        if key not in parts:
            continue
        if budget.left() < need and not args.cpu_dry:
            report.record(part, {"skipped": f"time budget: {budget.left():.0f} s left, needs ~{need} s"})
            continue
        t0 = time.perf_counter()
        print(f"running {part} ...", flush=True)
        try:
            result = fn()
        except Exception as e:  # record and go on: one part failing must not lose the others
            result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
            print(result["traceback"], file=sys.stderr, flush=True)
        result["wall_s"] = time.perf_counter() - t0
        report.record(part, result)
        print(f"  {part} done in {result['wall_s']:.0f} s", flush=True)
    kept.clear()
    from radio_scale.distributed.env import shutdown

    shutdown()
    faulthandler.cancel_dump_traceback_later()
    print_table(report.data)
    if report.path:
        print(f"\nwrote {report.path}")
    failed = [p for p, r in report.data["parts"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
