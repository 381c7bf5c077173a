"""GPU acceptance run: one GPU, at most ten minutes, pass/fail (exit code 0 only when every check passed).

It runs the real Trainer on the two_stage_auto recipe at production shapes per rank (random-weight teachers of
the real architectures: DFN CLIP-H/14-378, OpenAI CLIP-L/14-336, DINOv2-g/14-reg4, SAM ViT-H; nothing is
downloaded) on a one-rank world, and checks what a 64-GPU run would hit first:

  teachers     bf16-vs-fp32 cosine of every teacher's summary and spatial features (>= --min-teacher-cosine)
  precision    the student runs under FSDP2 (`fully_shard` on a one-rank mesh, bf16 parameter policy): a hook on
               every Linear of the student asserts bf16 compute, the master weights stay fp32
  windows      one step per attention window (0/8/16) of stage 2 (CLIP+DINOv2 group 32 x 432 px with the
               planned activation checkpointing, SAM group 2 x 1024 px) with the student's attention
               restricted to the fused kernels (flash / memory-efficient / cuDNN): falling back to the slow
               math kernel fails; each step timed, MFU against the detected GPU's dense bf16 peak
               (H100 SXM / H200 989, H100 NVL / H200 NVL 835, H100 PCIe 756 TFLOPS; >= --min-mfu)
  memory       under a cap of --memory-cap-gb (80: what the plan assumes), peak memory within
               --memory-tolerance of the plan's estimate for this world
  balancer     the uncertainty balancer's weights move and stay finite
  checkpoint   one asynchronous DCP save, then a load that restores the saved weights exactly
  eval         one periodic evaluation (k-NN + teacher fidelity) through the sharded root module
  export       the consolidated export, read back equal
  loader       the data loader's samples/s (its own workers) against the step's consumption
  deepspeed    the same Trainer under distributed_backend deepspeed (ZeRO-2, bf16): one timed step per window
               (finite, MFU reported), a DeepSpeed checkpoint saved and restored exactly, the export read back
  eradio       E-RADIO-B and E-RADIO-L students alone (3 summary outputs, no heads): training img/s (forward +
               backward + AdamW step) and eval img/s (no_grad forward), bf16 autocast, at 224 px, and the
               achieved TFLOPS from each student's own FLOP count; passes when every step is finite (reported,
               not judged against a target). The trainer checks above run the recipe's ViT student.

Results print as a table and go to $OUT/gpu_check.json (or --json) after every check. --cpu-dry runs the same
code on CPU with tiny shapes (tiny members of the same teacher families, a pico student, windows 0/2/3, bf16
by default) so the script cannot rot: tests/test_gpu_check.py runs it.

    python benchmarks/gpu_check.py                 # on one H100 / H200
    python benchmarks/gpu_check.py --cpu-dry       # anywhere
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

# Dense bf16 tensor-core peaks (no sparsity) from NVIDIA's data sheets; the first name that matches wins
# (GH200 before H200, the NVL/PCIe variants before their SXM name).
BF16_PEAK_TFLOPS = (("GH200", 989.0), ("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0),
                    ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))
GB = 1024**3


@dataclass(frozen=True)
class Shapes:
    """What the checks run: production shapes per rank on a GPU, tiny ones for --cpu-dry (same code)."""

    dry: bool
    overrides: tuple[str, ...]
    windows: tuple[int, ...]
    stage: int  # the stage with both groups (CLIP+DINOv2 and SAM)
    warmup: int
    iters: int
    eval_images: tuple[int, int]  # (train, test) images of the periodic evaluation's k-NN
    loader_batches: int
    # the eradio check: (student.arch, ...), resolution, train batch, eval batch, timed iterations
    eradio: tuple[str, ...] = ("eradio_b", "eradio_l")
    eradio_res: int = 224
    eradio_batch: tuple[int, int] = (64, 256)
    eradio_iters: int = 5


TEACHERS = ("dfn_clip", "openai_clip", "dinov2", "sam")


def shapes_for(args: argparse.Namespace) -> Shapes:
    common = [f"teachers.{n}.{k}" for n in TEACHERS for k in ("random_init=true", "checkpoint=null")]
    common += ["loss.balancer=uncertainty", "data.shards=bundled", "tracking.system_metrics=false",
               f"precision={args.precision}", "checkpoint.async_save=true", "eval.datasets=[digits]",
               f"hardware.gpu_memory_gb={args.memory_cap_gb}"]
    if not args.cpu_dry:
        return Shapes(False, tuple(common + ["data.num_workers=8"]), (0, 8, 16), 1, warmup=1, iters=2,
                      eval_images=(1000, 300), loader_batches=6)
    tiny = [f"teachers.{n}.model_kwargs={{tiny: true}}" for n in TEACHERS]
    tiny += ["teachers.dinov2.model=vit_small_patch14_reg4_dinov2", "teachers.dinov2.input_size=56",
             "teachers.dfn_clip.input_size=56", "teachers.openai_clip.input_size=56", "teachers.sam.input_size=128",
             "student.arch=vit_pico16", "student.cpe_grid=32", "student.global_blocks=[1]",
             "student.window_sizes=[0,2,3]", "stages.0.groups.0.resolution=64",
             "stages.1.groups.0.resolution=64", "stages.1.groups.0.batch_per_rank=2",
             "stages.1.groups.1.resolution=128", "stages.1.groups.1.batch_per_rank=1", "data.num_workers=1"]
    return Shapes(True, tuple(common + tiny), (0, 2, 3), 1, warmup=1, iters=1, eval_images=(200, 60),
                  loader_batches=3, eradio=("eradio_pico", "eradio_pico_noup"), eradio_res=64, eradio_batch=(2, 4),
                  eradio_iters=1)


def acceptance_config(sh: Shapes):
    from radio_scale.config import load_config

    return load_config("two_stage_auto", list(sh.overrides))


# ---------------------------------------------------------------------------------------------- bookkeeping
class Report:
    """Checks by name ({"ok": bool, ...}), written to JSON after every check."""

    def __init__(self, path: Optional[Path], meta: dict):
        self.path = path
        self.data = {"meta": meta, "checks": {}}

    def record(self, name: str, result: dict) -> None:
        self.data["checks"][name] = result
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1, default=str))

    @property
    def failed(self) -> list[str]:
        return [n for n, r in self.data["checks"].items() if not r.get("ok")]


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def card_peak(name: str) -> Optional[float]:
    """The card's dense bf16 peak in FLOP/s from its name (None: not in the table)."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None


def cap_memory(device: torch.device, cap_gb: float) -> Optional[float]:
    """Limit this process to cap_gb of the GPU (the memory the plan assumes); returns the fraction set."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, cap_gb * GB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


@contextmanager
def fused_attention_only():
    """The student's attention restricted to fused SDPA kernels: a call only the math kernel could run raises
    (torch: "No available kernel"), instead of silently running the slow, memory-hungry path."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import radio_scale.models.student as student_module

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]

    class _FusedOnly:
        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def scaled_dot_product_attention(*args, **kwargs):
            with sdpa_kernel(fused):
                return F.scaled_dot_product_attention(*args, **kwargs)

    old = student_module.F
    student_module.F = _FusedOnly()
    try:
        yield
    finally:
        student_module.F = old


# ---------------------------------------------------------------------------------------------- teachers
def check_teachers(cfg, device: torch.device, cache: dict, min_cosine: float) -> dict:
    """Each teacher in fp32 and as the bf16 copy training uses, on the same images: cosine of both outputs.

    The bf16 copies are kept in `cache` for the trainer (built once: full-size random teachers take a while)."""
    from radio_scale.teachers import build_teacher

    out, ok = {}, True
    for name in TEACHERS:
        tc = cfg.teacher(name)
        t0 = time.perf_counter()
        teacher = build_teacher(tc, device)
        built = time.perf_counter() - t0
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, teacher.input_size, teacher.input_size, generator=g).to(device)
        with torch.no_grad():
            ref = teacher(x)
            teacher.to(torch.bfloat16)
            low = teacher(x)
        row = {"model": tc.model, "input_size": teacher.input_size, "build_s": built,
               "spatial_cosine": _cosine(low.spatial, ref.spatial, dim=1)}
        if ref.summary is not None:
            row["summary_cosine"] = _cosine(low.summary, ref.summary, dim=-1)
        row["ok"] = all(v >= min_cosine for k, v in row.items() if k.endswith("_cosine"))
        ok &= row["ok"]
        out[name] = row
        cache[name] = teacher
        del ref, low
    return {"ok": ok, "min_cosine": min_cosine, "teachers": out}


def _cosine(a: torch.Tensor, b: torch.Tensor, dim: int) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=dim).mean())


@contextmanager
def teachers_from(cache: dict):
    """The trainer's stage takes the already built teachers (same config, same seed) instead of building again."""
    import radio_scale.train.stage as stage

    build = stage.build_teacher

    def cached(tc, device=None):
        return cache.pop(tc.name) if tc.name in cache else build(tc, device=device)

    stage.build_teacher = cached
    try:
        yield
    finally:
        stage.build_teacher = build


# ---------------------------------------------------------------------------------------------- E-RADIO students
def check_eradio(sh: Shapes, device: torch.device, precision: str) -> dict:
    """Training and eval throughput of each E-RADIO student alone (one warm-up, median of sh.eradio_iters)."""
    from radio_scale.config.schema import StudentConfig
    from radio_scale.models.registry import build_any_student

    res, (train_b, eval_b) = sh.eradio_res, sh.eradio_batch
    bf16 = precision == "bf16"
    out, ok = {}, True
    for arch in sh.eradio:
        torch.manual_seed(0)
        student = build_any_student(StudentConfig(arch=arch), ("dfn_clip", "openai_clip", "dinov2")).to(device)
        flops = student.forward_flops(res)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

        def train_step(x):
            with amp:
                o = student(x)
                loss = o.patches.float().square().mean() + sum(v.float().square().mean() for v in o.summary.values())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return torch.isfinite(loss).item()

        def eval_step(x):
            with amp, torch.no_grad():
                o = student(x)
            return bool(torch.isfinite(o.patches).all().item())

        row: dict = {"params_m": student.param_count() / 1e6, "gflops_per_img": flops / 1e9, "resolution": res,
                     "dtype": "bf16" if bf16 else "fp32"}
        finite = True
        for mode, batch, fn, k in (("train", train_b, train_step, 3), ("eval", eval_b, eval_step, 1)):
            student.train(mode == "train")
            x = torch.randn(batch, 3, res, res, device=device)
            reset_peak(device)
            finite &= fn(x)  # warm-up
            times = []
            for _ in range(sh.eradio_iters):
                sync(device)
                t0 = time.perf_counter()
                finite &= fn(x)
                sync(device)
                times.append(time.perf_counter() - t0)
            s = sorted(times)[len(times) // 2]
            row[f"{mode}_batch"] = batch
            row[f"{mode}_img_s"] = batch / s
            row[f"{mode}_tflops"] = k * flops * batch / s / 1e12  # training: forward + backward = 3 forwards
            row[f"{mode}_peak_gb"] = peak_gb(device)
        row["ok"] = bool(finite)
        ok &= row["ok"]
        out[arch] = row
        del student, opt
        reset_peak(device)
    return {"ok": ok, "students": out}


# ---------------------------------------------------------------------------------------------- the trainer
class Acceptance:
    """The real Trainer on one rank, at the stage with both groups, and the checks that run on it."""

    def __init__(self, cfg, sh: Shapes, device: torch.device, run_dir: Path, peak: Optional[float]):
        from radio_scale.distributed.env import init_distributed
        from radio_scale.train.trainer import Trainer

        self.cfg, self.sh, self.device, self.peak = cfg, sh, device, peak
        self.env = init_distributed(device=device.type)
        reset_peak(device)
        self.trainer = Trainer(cfg, self.env, run_dir)
        self.trainer.run_id = self.trainer.tracker.start()
        from radio_scale.monitoring.watchdog import Watchdog

        mon = cfg.monitor
        self.trainer.watchdog = Watchdog(run_dir, 0, {"startup": mon.startup_timeout_s, "train": mon.hang_timeout_s,
                                                      "checkpoint": mon.checkpoint_timeout_s}, exit_code=None,
                                         initial_phase="train")
        self.trainer._enter_stage(sh.stage)
        self.trainer.step = self.trainer.stage.start_step
        # one real batch per group (uint8 views from the loader, normalised on the device by the trainer)
        self.batches = {g.name: next(self.trainer._iters[g.name]) for g in self.trainer.stage.groups}
        self.steps: dict[int, dict] = {}

    def close(self) -> None:
        t = self.trainer
        t.checkpointer.close()
        if t.watchdog:
            t.watchdog.stop()
        t.tracker.end("FINISHED", timeout_s=10)
        t.stage.close()

    def step(self, window: int):
        t = self.trainer
        t.window_size = lambda step, w=window: w  # this step's attention window
        stats = t.train_step(dict(self.batches))
        t.step += 1
        return stats

    def step_flops(self, window: int, useful: bool = True) -> float:
        """FLOPs of one step on this rank: every group's batch through the student (x3, x4 recomputed when the
        plan checkpoints) and its teachers."""
        from radio_scale.distributed.cost import RECOMPUTE_FORWARDS, STUDENT_TRAIN_FORWARDS
        from radio_scale.models import student_forward_flops

        t = self.trainer
        n_sum = len(t.model.student.summary_teachers)
        total = 0.0
        for g in t.stage.groups:
            k = STUDENT_TRAIN_FORWARDS + (RECOMPUTE_FORWARDS if (g.activation_checkpointing and not useful) else 0)
            student = student_forward_flops(self.cfg.student, g.resolution, window, n_sum)
            teachers = sum(t.stage.teachers[n].spec.forward_gflops * 1e9 for n in g.teachers)
            total += g.batch_per_rank * (k * student + teachers)
        return total

    # -- checks ---------------------------------------------------------------------------------------------
    def check_precision(self) -> dict:
        """bf16 compute in every Linear of the student, fp32 master weights, the student under fully_shard."""
        from torch.distributed.fsdp import FSDPModule

        t = self.trainer
        seen: dict[str, set] = {}

        def hook(mod, inputs, output, name=None):
            seen.setdefault(name, set()).add((str(inputs[0].dtype), str(output.dtype)))

        handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
                   for n, m in t.model.student.named_modules() if isinstance(m, torch.nn.Linear)]
        try:
            stats = self.step(self.sh.windows[0])
        finally:
            for h in handles:
                h.remove()
        want = self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and self.device.type == "cuda")
        dtype = "torch.bfloat16" if want else "torch.float32"
        wrong = sorted(n for n, s in seen.items() if s != {(dtype, dtype)})
        units = sum(isinstance(m, FSDPModule) for m in t.model.modules())
        master = sorted({str(p.dtype) for p in t.model.parameters()})
        # bf16 runs the student under fully_shard even on one rank; fp32 at world size 1 runs it as a plain module
        ok = bool(seen) and not wrong and master == ["torch.float32"] and (units > 1 or not want) and stats.finite
        return {"ok": ok, "compute_dtype": dtype, "linears": len(seen), "not_in_compute_dtype": wrong[:10],
                "master_dtypes": master, "fsdp_units": units, "finite": stats.finite}

    def check_windows(self, min_mfu: float) -> dict:
        """Each window timed; the student's attention must run on a fused kernel (no math fallback)."""
        out, ok = {}, True
        for w in self.sh.windows:
            try:
                with fused_attention_only():
                    for _ in range(self.sh.warmup):
                        self.step(w)
                    times = []
                    for _ in range(self.sh.iters):
                        sync(self.device)
                        t0 = time.perf_counter()
                        stats = self.step(w)  # returns host floats: synchronised
                        times.append(time.perf_counter() - t0)
                s = sorted(times)[len(times) // 2]
                flops = self.step_flops(w, useful=False)
                row = {"step_ms": 1e3 * s, "tflops": flops / s / 1e12, "finite": stats.finite,
                       "mfu": flops / s / self.peak if self.peak else None,
                       "useful_mfu": self.step_flops(w) / s / self.peak if self.peak else None}
                row["ok"] = stats.finite and (row["mfu"] is None or row["mfu"] >= min_mfu)
                self.steps[w] = row
            except RuntimeError as e:  # "No available kernel": only the math kernel could run this attention
                row = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                       "math_fallback": "No available kernel" in str(e)}
            out[str(w)] = row
            ok &= row["ok"]
        return {"ok": ok, "min_mfu": min_mfu if self.peak else None, "windows": out,
                "peak_tflops": None if self.peak is None else self.peak / 1e12}

    def check_memory(self, tolerance: float) -> dict:
        """Peak memory of the steps against the plan's estimate for this world (one rank: every group here)."""
        plan = self.trainer.stage.plan
        estimate = max(g.memory_gb for g in plan.groups)
        measured = peak_gb(self.device)
        row = {"plan_estimate_gb": estimate, "peak_gb": measured, "cap_gb": self.cfg.hardware.gpu_memory_gb,
               "groups": {g.name: {"batch": g.batch_per_rank, "resolution": g.resolution,
                                   "activation_checkpointing": g.activation_checkpointing,
                                   "memory_gb": g.memory_gb} for g in plan.groups}}
        if measured is None:  # CPU: nothing to measure; the plan side of the check still ran
            row["ok"] = True
        else:
            row["ratio"] = measured / estimate
            row["ok"] = measured <= self.cfg.hardware.gpu_memory_gb and measured <= estimate * (1 + tolerance)
        return row

    def check_balancer(self) -> dict:
        """The uncertainty balancer (learned weights, FSDP-sharded parameters) moved over the steps so far."""
        t = self.trainer
        first = dict(getattr(self, "_first_weights", {}))
        stats = self.step(self.sh.windows[0])
        moved = bool(first) and any(abs(stats.weights[k] - first[k]) > 0 for k in first)
        finite = all(math.isfinite(v) for v in stats.weights.values())
        return {"ok": bool(moved and finite and stats.finite), "first": first, "now": stats.weights,
                "balancer": type(t.model.balancer).__name__}

    def check_checkpoint(self) -> dict:
        """Asynchronous save (its stall timed), then the weights of a later step replaced by the saved ones."""
        from radio_scale.train.checkpoint import latest_complete

        t = self.trainer
        probe = dict(t.model.named_parameters())
        name = next(n for n in probe if "cpe" in n or "pos" in n)
        saved = _full(probe[name])
        t0 = time.perf_counter()
        t.save(block=False)
        stall = time.perf_counter() - t0
        t.checkpointer.wait()
        total = time.perf_counter() - t0
        self.step(self.sh.windows[0])  # the weights move on
        moved = not torch.equal(_full(probe[name]), saved)
        path = latest_complete(t.checkpointer.root)
        t.checkpointer.load(path, t.backend)
        restored = torch.equal(_full(dict(t.model.named_parameters())[name]), saved)
        return {"ok": bool(path is not None and moved and restored), "path": str(path), "stall_s": stall,
                "save_s": total, "param": name, "moved_after_save": moved, "restored_exactly": restored}

    def check_eval(self) -> dict:
        import radio_scale.eval.report as report

        t = self.trainer
        run = report.run_periodic_eval
        train_n, test_n = self.sh.eval_images

        def sized(*args, **kwargs):
            return run(*args, **{**kwargs, "max_train": train_n, "max_test": test_n})

        report.run_periodic_eval = sized
        t0 = time.perf_counter()
        try:
            t._periodic_eval()
        finally:
            report.run_periodic_eval = run
        lines = (t.run_dir / "eval.jsonl").read_text().splitlines()
        rec = json.loads(lines[-1])
        values = {k: v for k, v in rec.items() if k.startswith("eval/") and k != "eval/seconds"}
        ok = bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values.values())
        return {"ok": ok, "seconds": time.perf_counter() - t0, "metrics": len(values),
                "knn_top1": {k: v for k, v in values.items() if k.endswith("/top1")}}

    def check_export(self, out_dir: Path) -> dict:
        from radio_scale.eval.loading import load_student
        from radio_scale.train.export import export_student

        t = self.trainer
        t0 = time.perf_counter()
        full = t.backend.full_state_dict()  # the backend's gather (FSDP2 or DeepSpeed), as Trainer.run exports
        path = export_student(full, self.cfg, t.specs, out_dir, is_main=True)
        took = time.perf_counter() - t0
        student, heads, _ = load_student(path)
        mine = {k[len("student."):]: v for k, v in full.items() if k.startswith("student.")}
        theirs = student.state_dict()
        same = all(torch.equal(mine[k].to(theirs[k].dtype), theirs[k]) for k in theirs if k in mine)
        size = sum(p.stat().st_size for p in Path(path).iterdir()) / GB
        return {"ok": bool(same and mine), "seconds": took, "size_gb": size, "tensors": len(theirs)}

    def check_loader(self) -> dict:
        """The loader (its own workers, the group's views) against what the measured step consumes."""
        from radio_scale.data import build_loader
        from radio_scale.train.stage import teacher_view

        t, cfg = self.trainer, self.cfg
        step_s = min(r["step_ms"] for r in self.steps.values()) / 1e3 if self.steps else None
        out, ok = {}, True
        for g in t.stage.groups:
            views = [teacher_view(t.stage.teachers[n]) for n in g.teachers]
            loader = build_loader(cfg.data.shards, g.resolution, views, g.batch_per_rank, seed=1,
                                  num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer)
            try:
                next(loader)  # workers started, first chunk read
                t0 = time.perf_counter()
                n = sum(len(next(loader)) for _ in range(self.sh.loader_batches))
                rate = n / (time.perf_counter() - t0)
            finally:
                loader.close()
            need = g.batch_per_rank / step_s if step_s else None
            row = {"workers": cfg.data.num_workers, "samples_per_s": rate, "step_needs_per_s": need,
                   "headroom": rate / need if need else None}
            row["ok"] = need is None or rate >= need
            ok &= row["ok"]
            out[g.name] = row
        return {"ok": ok, "groups": out}


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def check_deepspeed(sh: Shapes, device: torch.device, run_dir: Path, peak: Optional[float]) -> dict:
    """The acceptance steps under the DeepSpeed backend (ZeRO-2 on one rank: the engine, its bf16 mode, its
    checkpoint format and the export path; the FSDP2-only checks are not repeated)."""
    from radio_scale.config import load_config

    cfg = load_config("two_stage_auto", [*sh.overrides, "distributed_backend=deepspeed", "deepspeed.zero_stage=2"])
    acc = Acceptance(cfg, sh, device, run_dir, peak)
    try:
        rows, ok = {}, True
        for w in sh.windows:
            for _ in range(sh.warmup):
                acc.step(w)
            sync(device)
            t0 = time.perf_counter()
            stats = acc.step(w)
            s = time.perf_counter() - t0
            flops = acc.step_flops(w, useful=False)
            rows[str(w)] = {"step_ms": 1e3 * s, "finite": stats.finite, "mfu": flops / s / peak if peak else None}
            ok &= stats.finite
        ckpt = acc.check_checkpoint()
        export = acc.check_export(run_dir / "export")
        return {"ok": bool(ok and ckpt["ok"] and export["ok"]), "zero_stage": 2, "windows": rows,
                "checkpoint": {k: ckpt[k] for k in ("ok", "stall_s", "save_s", "restored_exactly")},
                "export": {k: export[k] for k in ("ok", "seconds", "tensors")}}
    finally:
        acc.close()


# ---------------------------------------------------------------------------------------------- main
def print_table(report: Report) -> None:
    meta = report.data["meta"]
    print(f"\n{meta['device_name']} | torch {meta['torch']} | dense bf16 peak "
          f"{meta['peak_tflops'] or '?'} TFLOPS | {'dry run' if meta['dry_run'] else 'production shapes'}\n")
    print("| check | result | details |")
    print("|---|---|---|")
    for name, r in report.data["checks"].items():
        details = {k: v for k, v in r.items() if k not in ("ok", "traceback")}
        text = json.dumps(details, default=lambda v: f"{v:.3g}" if isinstance(v, float) else str(v))
        print(f"| {name} | {'PASS' if r.get('ok') else 'FAIL'} | {text[:400]} |")
    verdict = "PASS" if not report.failed else f"FAIL ({', '.join(report.failed)})"
    print(f"\ngpu_check: {verdict}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry", action="store_true", help="the same checks on CPU with tiny shapes")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="the run's precision (bf16)")
    ap.add_argument("--memory-cap-gb", type=float, default=80.0, help="GPU memory cap (what the plan assumes)")
    ap.add_argument("--memory-tolerance", type=float, default=0.25,
                    help="peak memory may exceed the plan's estimate by this fraction")
    ap.add_argument("--min-mfu", type=float, default=0.25, help="least MFU of a full step (recompute counted)")
    ap.add_argument("--min-teacher-cosine", type=float, default=0.98, help="least bf16-vs-fp32 feature cosine")
    ap.add_argument("--budget-s", type=float, default=540.0, help="checks that would start after this fail")
    ap.add_argument("--json", default=None, help="result file (default: $OUT/gpu_check.json if $OUT is set)")
    args = ap.parse_args(argv)

    if not args.cpu_dry and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available: run it on a machine with an NVIDIA GPU, or pass --cpu-dry",
              file=sys.stderr)
        return 2
    faulthandler.dump_traceback_later(args.budget_s + 60, exit=True)  # a hang must not eat the machine's time
    device = torch.device("cpu" if args.cpu_dry else "cuda")
    sh = shapes_for(args)
    cfg = acceptance_config(sh)
    name = "CPU (dry run)" if args.cpu_dry else torch.cuda.get_device_name(device)
    peak = None if args.cpu_dry else card_peak(name)
    out = args.json or (str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else None)
    report = Report(Path(out) if out else None, {
        "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda, "dry_run": args.cpu_dry,
        "peak_tflops": None if peak is None else peak / 1e12, "memory_cap_fraction": cap_memory(device,
                                                                                                args.memory_cap_gb),
        "overrides": list(sh.overrides), "budget_s": args.budget_s})
    if not args.cpu_dry and peak is None:
        report.record("gpu", {"ok": False, "error": f"no dense bf16 peak known for '{name}' (add it to "
                                                     "BF16_PEAK_TFLOPS): MFU cannot be judged"})
    budget = Budget(args.budget_s)
    cache: dict = {}
    acc: Optional[Acceptance] = None

    def run(check: str, fn: Callable[[], dict], need_s: float = 0.0) -> None:
        if budget.left() < need_s:
            report.record(check, {"ok": False, "error": f"not run: {budget.left():.0f} s of the budget left"})
            return
        print(f"check {check} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # record it and go on: one failure must not hide the others
            result = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}",
                      "traceback": traceback.format_exc(limit=10)}
            print(result["traceback"], file=sys.stderr, flush=True)
        result["wall_s"] = time.perf_counter() - t0
        report.record(check, result)
        print(f"  {check}: {'PASS' if result.get('ok') else 'FAIL'} ({result['wall_s']:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        run("teachers", lambda: check_teachers(cfg, device, cache, args.min_teacher_cosine))
        try:
            with teachers_from(cache):
                acc = Acceptance(cfg, sh, device, Path(tmp) / "run", peak)
        except Exception as e:
            report.record("trainer", {"ok": False, "error": f"{type(e).__name__}: {str(e)[:500]}",
                                      "traceback": traceback.format_exc(limit=10)})
            print(traceback.format_exc(), file=sys.stderr)
        cache.clear()
        if acc is not None:
            reset_peak(device)
            run("precision", acc.check_precision)
            acc._first_weights = _weights_now(acc)  # the balancer's weights at the first step
            run("windows", lambda: acc.check_windows(args.min_mfu), need_s=30)
            run("memory", lambda: acc.check_memory(args.memory_tolerance))
            run("balancer", acc.check_balancer, need_s=10)
            run("checkpoint", acc.check_checkpoint, need_s=60)
            run("eval", acc.check_eval, need_s=40)
            run("export", lambda: acc.check_export(Path(tmp) / "export"), need_s=30)
            run("loader", acc.check_loader, need_s=30)
            acc.close()
            acc = None
            gc.collect()
        run("deepspeed", lambda: check_deepspeed(sh, device, Path(tmp) / "run_deepspeed", peak), need_s=90)
        gc.collect()
        run("eradio", lambda: check_eradio(sh, device, args.precision), need_s=45)
    from radio_scale.distributed.env import shutdown

    shutdown()
    faulthandler.cancel_dump_traceback_later()
    print_table(report)
    if report.path:
        print(f"wrote {report.path}")
    return 1 if report.failed else 0


def _weights_now(acc: Acceptance) -> dict:
    """The balancer's term weights as the last step used them."""
    t = acc.trainer
    return dict(zip(t.terms, t._step_weights.float().cpu().tolist()))


if __name__ == "__main__":
    sys.exit(main())
