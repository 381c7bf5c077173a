"""Checkpoint overhead: what saving costs the training loop, async vs blocking, against a run without checkpoints.

Real trainings (`radio-train`, world 1 (gloo) or --ranks 2 under torchrun) of a one-stage recipe derived from
smoke: ViT-S/16 student (so a checkpoint is ~0.35 GB of model + AdamW state, not a toy), the tiny teachers,
a checkpoint every N steps, and the same run with no checkpoint before the end. Read back from the run
directory: `stall_s` of the `checkpoint` events in events.jsonl and `step_time` from metrics.jsonl.

    loop time = Σ step times (steps 2..end) + Σ stalls (every save but the final one)
    overhead  = loop time / loop time of the run without checkpoints - 1

so an async save is charged both for its stall and for the steps its background writer slows down (on a
small machine the writer shares the cores with training), over all saves, not a median. The final save of a
run is blocking by design and is left out of every mode. Runs alternate (none, async, blocking, none, ...) so
other load hits all modes alike. Also printed: the stall alone (Σ stalls / loop time of the no-checkpoint
run) and the median step right after a save against the other steps.

    python benchmarks/checkpoint_stall.py [--arch vit_s16] [--every 3] [--steps 13] [--repeats 1] [--ranks 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from radio_scale.config import load_config
from radio_scale.config.loader import recipe_path
from radio_scale.monitoring.rundir import EVENTS, METRICS, read_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_overhead import add_setup_args  # noqa: E402  (the same step options as the other trainer benchmarks)

TARGET = 0.05  # async checkpoint overhead: share of the loop time of a run without checkpoints


def write_recipe(path: Path, arch: str, res: int, batch: int, teachers: list[str], steps: int, every: int) -> Path:
    """The smoke recipe cut to one stage and one group, with a real-size student preset; validated, then written."""
    raw = yaml.safe_load(recipe_path("smoke").read_text())
    raw["name"] = f"ckpt_stall_{arch}"
    raw["student"] = {"arch": arch, "window_sizes": [0], "cpe_grid": 32}
    group = {**raw["stages"][0]["groups"][0], "teachers": teachers, "batch_per_rank": batch, "resolution": res}
    raw["stages"] = [{**raw["stages"][0], "steps": steps, "groups": [group]}]
    raw["checkpoint"] = {"every": every, "keep": 2}
    raw["tracking"] = {"log_every": 10, "system_metrics": False}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_config(str(path))  # fail here, with the config's own message, rather than inside a subprocess
    return path


@dataclass
class RunResult:
    """What one training run recorded: per-save stalls and per-step times."""

    mode: str
    stalls: dict[int, float]  # step -> seconds
    step_times: dict[int, float]  # step -> seconds (train_step only, from metrics.jsonl)
    wall_s: float


MODES = ("none", "async", "blocking")


def run_training(recipe: Path, run_dir: Path, mode: str, ranks: int, total_steps: int) -> RunResult:
    """One radio-train run in a fresh process (torchrun for ranks > 1); its stalls and step times.
    mode: "none" (no checkpoint before the final one), "async" or "blocking"."""
    import time

    overrides = [f"checkpoint.async_save={'false' if mode == 'blocking' else 'true'}"]
    if mode == "none":
        overrides.append(f"checkpoint.every={total_steps + 1000}")
    entry = ["-m", "radio_scale.train.entry", "--recipe", str(recipe), "--run-dir", str(run_dir), *overrides]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *entry]
    else:
        cmd = [sys.executable, *entry]
    env = dict(os.environ)
    if ranks > 1:
        env.setdefault("RADIO_THREADS_PER_RANK", str(max(1, (os.cpu_count() or 2) // ranks)))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"training run in {run_dir} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    events = [e for e in read_jsonl(run_dir / EVENTS) if e.get("kind") == "checkpoint"]
    stalls = {int(e["step"]): float(e["stall_s"]) for e in events if int(e["step"]) != total_steps}
    steps = {int(m["step"]): float(m["step_time"]) for m in read_jsonl(run_dir / METRICS)}
    return RunResult(mode, stalls, steps, wall)


def loop_time(r: RunResult) -> float:
    """Σ step times after the warm-up step + Σ stalls of the saves (the final one excluded by run_training)."""
    return sum(t for s, t in r.step_times.items() if s > 1) + sum(r.stalls.values())


def summarise(results: list[RunResult], baseline_loop_s: float) -> dict[str, float]:
    """Loop time, overhead against the no-checkpoint runs, stalls over all saves, for the runs of one mode."""
    stalls, after, others = [], [], []
    for r in results:
        stalls += list(r.stalls.values())
        after += [r.step_times[s + 1] for s in r.stalls if s + 1 in r.step_times]
        others += [t for s, t in r.step_times.items() if s > 1 and s - 1 not in r.stalls]
    loop = statistics.mean(loop_time(r) for r in results)
    return {"saves": len(stalls), "loop_s": loop, "overhead": loop / baseline_loop_s - 1.0,
            "stall_total_s": sum(stalls) / len(results), "stall_share": sum(stalls) / len(results) / baseline_loop_s,
            "stall_max_s": max(stalls, default=0.0),
            "after_save_step_s": statistics.median(after) if after else float("nan"),
            "other_step_s": statistics.median(others), "wall_s": statistics.median(r.wall_s for r in results)}


def checkpoint_size_gb(run_dir: Path) -> float:
    """Size on disk of the newest checkpoint of a run."""
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    return sum(f.stat().st_size for f in ckpts[-1].rglob("*") if f.is_file()) / 1e9 if ckpts else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(ap)
    ap.add_argument("--every", type=int, default=3, help="checkpoint every N steps")
    ap.add_argument("--steps", type=int, default=13, help="steps per run (the final, blocking save is left out)")
    ap.add_argument("--repeats", type=int, default=1, help="(none, async, blocking) triples of runs")
    ap.add_argument("--ranks", type=int, default=1, help="ranks per run (>1: torchrun, gloo)")
    ap.add_argument("--json", default=None, help="also write the summary to this file")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()[0]
    results: dict[str, list[RunResult]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="ckpt_stall_") as tmp:
        recipe = write_recipe(Path(tmp) / "recipe.yaml", args.arch, args.res, args.batch,
                              [t for t in args.teachers.split(",") if t], args.steps, args.every)
        size = 0.0
        for rep in range(args.repeats):
            for mode in MODES:  # alternate, so load changes hit every mode alike
                run_dir = Path(tmp) / f"{mode}_{rep}"
                r = run_training(recipe, run_dir, mode, args.ranks, args.steps)
                size = max(size, checkpoint_size_gb(run_dir))
                results[mode].append(r)
                print(f"run {rep} {mode:8s}: {r.wall_s:5.0f} s, loop {loop_time(r):6.1f} s; stalls "
                      + ", ".join(f"step {s}: {v:.3f} s" for s, v in sorted(r.stalls.items())), flush=True)
    base = statistics.mean(loop_time(r) for r in results["none"])
    summary = {mode: summarise(rs, base) for mode, rs in results.items()}

    print(f"\nstudent {args.arch} @{args.res}px, batch {args.batch}, {args.ranks} rank(s), {args.steps} steps, "
          f"checkpoint every {args.every} steps, {size:.2f} GB per checkpoint; load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after\n")
    print("| save mode | saves | loop time s | overhead vs no checkpoints | Σ stall s (max one) | stall alone, share "
          "| step after a save s (median) | other steps s (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, s in summary.items():
        print(f"| {mode} | {s['saves']} | {s['loop_s']:.1f} | **{100 * s['overhead']:+.1f} %** | "
              f"{s['stall_total_s']:.2f} ({s['stall_max_s']:.2f}) | {100 * s['stall_share']:.1f} % | "
              f"{s['after_save_step_s']:.2f} | {s['other_step_s']:.2f} |")
    a = summary["async"]
    print(f"\nasync checkpoint overhead {100 * a['overhead']:+.1f} % of the loop (target <= {100 * TARGET:.0f} %: "
          f"{'OK' if a['overhead'] <= TARGET else 'ABOVE TARGET'}); blocking {100 * summary['blocking']['overhead']:+.1f} %")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "gb": size, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
