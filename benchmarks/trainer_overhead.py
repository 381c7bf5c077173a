"""Trainer overhead: `Trainer.train_step` against a hand-written single-process PyTorch loop doing the same math.

Both sides get the same student + heads (`build_model(cfg)`, same seed), the same frozen teachers
(`build_teacher`), the same pre-generated batches, the same losses (`summary_loss` / `spatial_loss` with the
run's term weights), gradient clipping and the same fused AdamW (`build_optimizer`: same parameter groups).
The trainer runs as it does in a job: `init_distributed()` (world 1, gloo), the per-step all-reduce of the loss
terms and counters; at world size 1 in fp32 the student is not FSDP2-wrapped (shard_student), so there is no
FSDP2 side to measure. Steps are timed interleaved (trainer, reference, trainer, ...) and medians reported, so other load
on the machine hits both sides alike; wall-clock and process CPU time are both reported (with one torch thread,
the default, CPU time is the step's compute even while other jobs share the cores). Also reported: the per-step bookkeeping of `Trainer.run` (heartbeat file, metrics.jsonl line,
MLflow) that sits outside `train_step`, and with --profile torch.profiler summaries of every side.

    python benchmarks/trainer_overhead.py [--arch vit_s16] [--res 128] [--batch 8] [--steps 10] [--threads 1] [--profile]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from radio_scale.config import RunConfig, load_config
from radio_scale.losses import spatial_loss, summary_loss
from radio_scale.teachers import build_teacher
from radio_scale.train.optim import build_optimizer, lr_at
from radio_scale.train.trainer import build_model, loss_weights

TARGET = 1.05  # trainer step / reference step


def add_setup_args(ap: argparse.ArgumentParser) -> None:
    """The step every trainer benchmark measures: student preset, resolution, batch, the group's smoke teachers."""
    ap.add_argument("--arch", default="vit_s16", help="student preset")
    ap.add_argument("--res", type=int, default=128, help="student resolution (px)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--teachers", default="clip,dino,effnet", help="smoke teachers of the one group")


def bench_config(arch: str, res: int, batch: int, teachers: str = "clip,dino,effnet") -> RunConfig:
    """The smoke recipe with a real-size student preset, one group (the tiny teachers), global attention."""
    names = [t for t in teachers.split(",") if t]
    return load_config("smoke", [
        f"student.arch={arch}", "student.embed_dim=null", "student.depth=null", "student.num_heads=null",
        "student.window_sizes=[0]", "student.global_blocks=[]",
        f"stages.0.groups.0.resolution={res}", f"stages.0.groups.0.batch_per_rank={batch}",
        f"stages.0.groups.0.teachers=[{','.join(names)}]",
        "data.num_workers=0",  # no loader worker process competing for the cores while steps are timed
        "tracking.system_metrics=false", "tracking.log_every=10",  # the default (smoke logs every step)
    ])


class ReferenceLoop:
    """The same step written as a plain single-process PyTorch loop (no FSDP, no process group, no bookkeeping)."""

    def __init__(self, cfg: RunConfig, teacher_names: list[str]):
        self.cfg = cfg
        self.model, _ = build_model(cfg)
        self.teachers = {n: build_teacher(cfg.teacher(n)) for n in teacher_names}
        self.weights = {k: float(v) for k, v in loss_weights(self.model.balancer)[0].items()}
        o = cfg.optim
        self.opt = build_optimizer(self.model, o)  # the trainer's own: fused AdamW, same parameter groups
        self.step_index = 0
        self.fwd_bwd_s = 0.0

    def step(self, batch) -> tuple[float, float]:
        """One optimisation step on `batch`; returns (loss, grad norm) as Python floats."""
        t0 = time.perf_counter()
        batch = batch.normalized()  # uint8 views -> float32, as Trainer.train_step does
        with torch.no_grad():
            targets = {n: t(batch.teachers[n]) for n, t in self.teachers.items()}
        preds = self.model(batch.student, window_size=0)
        loss = torch.zeros(())
        for name, tgt in targets.items():
            pred = preds[name]
            if pred.summary is not None and tgt.summary is not None:
                loss = loss + self.weights[f"{name}/summary"] * summary_loss(pred.summary, tgt.summary).mean()
            loss = loss + self.weights[f"{name}/spatial"] * spatial_loss(
                pred.spatial, tgt.spatial, self.cfg.loss.alpha, self.cfg.loss.beta).mean()
        loss.backward()
        self.fwd_bwd_s = time.perf_counter() - t0
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        lr = lr_at(self.step_index, self.cfg.stages[0], self.cfg.optim)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_index += 1
        return float(loss.detach()), float(grad_norm)


class OptimizerTimer:
    """Seconds the last optimizer.step() took, through the optimizer's own step hooks."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.last_s = 0.0
        self._t0 = 0.0
        optimizer.register_step_pre_hook(self._pre)
        optimizer.register_step_post_hook(self._post)

    def _pre(self, *_) -> None:
        self._t0 = time.perf_counter()

    def _post(self, *_) -> None:
        self.last_s = time.perf_counter() - self._t0


@dataclass
class Bench:
    """The sides, built once, and the batches they share."""

    cfg: RunConfig
    trainer: object  # world 1, gloo: as in a job
    reference: ReferenceLoop
    batches: list
    group: str


def build_trainer(cfg: RunConfig, run_dir: Path, steps: int):
    """A Trainer as in a job (init_distributed: world 1, gloo) in stage 0, its group, and `steps` batches."""
    from radio_scale.distributed.env import init_distributed
    from radio_scale.train.trainer import Trainer

    trainer = Trainer(cfg, init_distributed(device="cpu"), run_dir)
    trainer._enter_stage(0)
    group = trainer.stage.groups[0].name
    batches = [next(trainer._iters[group]) for _ in range(steps)]  # data time is not part of any timed step
    return trainer, group, batches


def build_bench(cfg: RunConfig, steps: int, run_dir: Path) -> Bench:
    """The trainer in stage 0, the reference loop, and `steps` batches from the stage's stream."""
    trainer, group, batches = build_trainer(cfg, run_dir, steps)
    reference = ReferenceLoop(cfg, list(trainer.stage.groups[0].teachers))
    for side, opt in ((trainer, trainer.optimizer), (reference, reference.opt)):
        side.opt_timer = OptimizerTimer(opt)
    return Bench(cfg, trainer, reference, batches, group)


def trainer_step(trainer, group: str, batch) -> tuple[float, float]:
    """One Trainer.train_step as Trainer.run calls it; returns (loss, grad norm)."""
    stats = trainer.train_step({group: batch})
    trainer.step += 1
    return stats.loss, stats.grad_norm


def bookkeeping_ms(b: Bench, reps: int = 20) -> dict[str, float]:
    """Median ms of Trainer.run's per-step work outside train_step: heartbeat file, metrics.jsonl line + NaN
    guard + checkpoint poll, and one MLflow log_metrics call (made every tracking.log_every steps)."""
    stats = b.trainer.train_step({b.group: b.batches[0]}, apply=False)  # a real StepStats to log
    b.trainer.optimizer.zero_grad(set_to_none=True)
    b.trainer.run_id = b.trainer.tracker.start()  # the run's sqlite MLflow store, as Trainer.run opens it
    out: dict[str, list[float]] = {"heartbeat": [], "metrics line": [], "mlflow log_metrics": []}
    every = b.cfg.tracking.log_every
    for _ in range(reps * every):
        b.trainer.step += 1
        t0 = time.perf_counter()
        b.trainer.heartbeat.beat(step=b.trainer.step, stage=0, loss=stats.loss, step_time=0.1, phase="train",
                                 group=b.group, wall_time=0.1)
        t1 = time.perf_counter()
        b.trainer.nan_guard.check(stats.loss)
        b.trainer._log(stats, 0.1, 0)
        b.trainer.checkpointer.poll()
        t2 = time.perf_counter()
        out["heartbeat"].append(t1 - t0)
        out["mlflow log_metrics" if b.trainer.step % every == 0 else "metrics line"].append(t2 - t1)
    b.trainer.tracker.end("FINISHED")
    return {k: 1e3 * statistics.median(v) for k, v in out.items() if v}


def sides(b: Bench) -> dict:
    """name -> (one step on a batch, returning (loss, grad norm); seconds of its teachers+fwd+bwd; its AdamW timer)."""
    return {
        "Trainer.train_step (world 1, gloo)": (lambda x: trainer_step(b.trainer, b.group, x),
                                               lambda: b.trainer.compute_s, b.trainer.opt_timer),
        "hand-written loop": (b.reference.step, lambda: b.reference.fwd_bwd_s, b.reference.opt_timer),
    }


def check_same_math(b: Bench) -> dict[str, tuple[float, float]]:
    """Every side's (loss, grad norm) on the first batch from the same RNG state: the same math gives the same numbers."""
    out = {}
    for name, (step, _, _) in sides(b).items():
        torch.manual_seed(1234)  # the student's CPE crop draws from the global RNG: give every side the same draw
        out[name] = step(b.batches[0])
    return out


def profile_sides(b: Bench, steps: int = 4, rows: int = 14) -> None:
    """Where the time goes: torch.profiler self-CPU time per step by operator, as differences between sides."""
    from torch.profiler import ProfilerActivity, profile

    per_op: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in sides(b)}
    for batch in b.batches[1: 1 + steps]:
        for name, (step, _, _) in sides(b).items():  # one profiled step per side in turn, like the timing
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(batch)
            acc = per_op[name]
            for e in prof.key_averages():
                t, n = acc.get(e.key, (0.0, 0.0))
                acc[e.key] = (t + e.self_cpu_time_total / 1e3 / steps, n + e.count / steps)
    names = list(per_op)
    for slow, fast in ((names[0], names[1]), (names[1], names[2])):
        a, c = per_op[slow], per_op[fast]
        diff = {k: a.get(k, (0.0, 0))[0] - c.get(k, (0.0, 0))[0] for k in set(a) | set(c)}
        total_a, total_c = sum(v[0] for v in a.values()), sum(v[0] for v in c.values())
        print(f"\n--- profiled self CPU ms/step: '{slow}' {total_a:.0f} vs '{fast}' {total_c:.0f} "
              f"(+{total_a - total_c:.0f}); largest differences:")
        print(f"| operator | {slow} ms | {fast} ms | difference ms | calls |")
        print("|---|---|---|---|---|")
        for k in sorted(diff, key=lambda k: -abs(diff[k]))[:rows]:
            (ta, na), (tc, nc) = a.get(k, (0.0, 0)), c.get(k, (0.0, 0))
            print(f"| {k[:60]} | {ta:.1f} | {tc:.1f} | {diff[k]:+.1f} | {na:.0f} / {nc:.0f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(ap)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side (after 2 warm-up steps each)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: process CPU time = compute even on a shared machine; 0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler summaries of every side")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from radio_scale.distributed.env import shutdown

    cfg = bench_config(args.arch, args.res, args.batch, args.teachers)
    med = statistics.median
    with tempfile.TemporaryDirectory(prefix="trainer_overhead_") as tmp:
        b = build_bench(cfg, args.steps + 2, Path(tmp) / "run")
        n_params = sum(p.numel() for p in b.reference.model.parameters())
        print(f"student {args.arch} @{args.res}px, batch {args.batch}, teachers {args.teachers}; "
              f"student+heads {n_params / 1e6:.1f} M params; torch threads {torch.get_num_threads()}; "
              f"load average before {os.getloadavg()[0]:.2f}")
        first = check_same_math(b)
        ref_loss, ref_gn = first["hand-written loop"]
        for name, (loss, gn) in first.items():
            print(f"  step 1 {name:40s} loss {loss:.6f} (rel diff {abs(loss - ref_loss) / abs(ref_loss):.1e}) "
                  f"grad norm {gn:.5f}")
        todo = sides(b)
        for name, (step, _, _) in todo.items():  # second warm-up step (optimizer state now exists)
            step(b.batches[1])
        times = {name: {"step": [], "cpu": [], "fwd_bwd": [], "adamw": []} for name in todo}
        for batch in b.batches[2:]:
            for name, (step, fwd_bwd, opt_timer) in todo.items():  # interleaved: load hits every side alike
                t0, c0 = time.perf_counter(), time.process_time()
                step(batch)
                times[name]["step"].append(time.perf_counter() - t0)
                times[name]["cpu"].append(time.process_time() - c0)
                times[name]["fwd_bwd"].append(fwd_bwd())
                times[name]["adamw"].append(opt_timer.last_s)
        book = bookkeeping_ms(b)
        if args.profile:
            profile_sides(b)
        load_after = os.getloadavg()[0]
        b.trainer.checkpointer.close()
        b.trainer.stage.close()
    shutdown()

    ref = med(times["hand-written loop"]["step"])
    ref_cpu = med(times["hand-written loop"]["cpu"])
    print(f"\n{args.steps} interleaved steps per side, medians; load average after {load_after:.2f}\n")
    print("| side | wall ms/step | process CPU ms/step | teachers+fwd+bwd ms | rest ms (reduce, clip, AdamW, zero_grad) "
          "| of which AdamW ms | vs hand-written: wall / CPU |")
    print("|---|---|---|---|---|---|---|")
    for name, t in times.items():
        step_ms, fb_ms, cpu_ms = 1e3 * med(t["step"]), 1e3 * med(t["fwd_bwd"]), 1e3 * med(t["cpu"])
        print(f"| {name} | {step_ms:.0f} | {cpu_ms:.0f} | {fb_ms:.0f} | {step_ms - fb_ms:.0f} | "
              f"{1e3 * med(t['adamw']):.0f} | {step_ms / 1e3 / ref:.3f}x / {cpu_ms / 1e3 / ref_cpu:.3f}x |")
    main_side = times["Trainer.train_step (world 1, gloo)"]
    ratio, ratio_cpu = med(main_side["step"]) / ref, med(main_side["cpu"]) / ref_cpu
    pairs = med(a / r for a, r in zip(main_side["step"], times["hand-written loop"]["step"]))
    print(f"\nratio trainer / hand-written: wall {ratio:.3f} (median of per-step pairs {pairs:.3f}), process CPU time "
          f"{ratio_cpu:.3f}; target <= {TARGET} -> {'OK' if max(ratio, ratio_cpu) <= TARGET else 'ABOVE TARGET'}")
    every = cfg.tracking.log_every
    per_step = book["heartbeat"] + book["metrics line"] + (book.get("mlflow log_metrics", book["metrics line"])
                                                          - book["metrics line"]) / every
    print("Trainer.run per-step work outside train_step (median ms): "
          + ", ".join(f"{k} {v:.2f}" for k, v in book.items())
          + f" (MLflow every {every} steps, with that step's metrics line) -> {per_step:.2f} ms/step = "
          f"{100 * per_step / (1e3 * ref):.2f} % of a hand-written step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
